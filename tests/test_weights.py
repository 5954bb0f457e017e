"""Compact weight storage (float16 on disk, float32 served) and seed ensembles (``members`` in a spec)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import keras  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from pipelines.registry import clear_cache, load  # noqa: E402
from pipelines.spec import ClassSpec, ModelSpec  # noqa: E402
from pipelines.unet import build_unet  # noqa: E402
from pipelines.weights import cast_model, weight_dtypes  # noqa: E402
from pipelines.weights import main as weights_main  # noqa: E402

CLASSES = [ClassSpec(id=i, name=n) for i, n in enumerate(["pet", "background", "outline"])]


def _trained_like(seed: int, classes: int = 3):
    """A small real U-Net with every weight random (the output layer starts at zero, a constant softmax),
    BatchNorm statistics included, as after training."""
    keras.utils.set_random_seed(seed)
    model = build_unet(input_size=32, base_filters=4, depth=2, num_classes=classes)
    rng = np.random.default_rng(seed)
    for v in model.weights:
        shape, name = tuple(v.shape), v.path.rsplit("/", 1)[-1]
        if name == "kernel":
            value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        elif name in ("gamma", "moving_variance"):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0.0, 0.1, shape)
        v.assign(value.astype(np.float32))
    return model, rng.random((4, 32, 32, 3)).astype(np.float32)


def _stored_bytes(path: Path) -> int:
    """Bytes of every array in a ``.keras`` file's weights."""
    import io
    import zipfile

    import h5py

    sizes: list[int] = []
    with zipfile.ZipFile(path) as z, h5py.File(io.BytesIO(z.read("model.weights.h5")), "r") as h5:
        h5.visititems(lambda _, obj: sizes.append(obj.nbytes) if isinstance(obj, h5py.Dataset) else None)
    return sum(sizes)


def test_float16_storage_halves_the_file_and_serves_like_float32(tmp_path):
    model, x = _trained_like(1)
    assert cast_model(model, "float32") is model
    half = cast_model(model, "float16")
    assert weight_dtypes(half) == {"float16"} and weight_dtypes(model) == {"float32"}
    model.save(tmp_path / "f32.keras")
    # The command line converts a file; the same cast as ``half``.
    assert weights_main([str(tmp_path / "f32.keras"), str(tmp_path / "f16.keras"), "--dtype", "float16"]) == 0
    # Two bytes per weight in the file's HDF5 weights (a file this small is mostly config and metadata).
    n_weights = sum(int(np.prod(v.shape)) for v in model.weights)
    assert _stored_bytes(tmp_path / "f16.keras") == 2 * n_weights
    assert _stored_bytes(tmp_path / "f32.keras") == 4 * n_weights
    stored = keras.saving.load_model(tmp_path / "f16.keras", compile=False)
    assert weight_dtypes(stored) == {"float16"}
    back = cast_model(stored, "float32")
    assert weight_dtypes(back) == {"float32"}
    assert [v.path for v in back.weights] == [v.path for v in model.weights]
    want = np.asarray(model(x, training=False))
    got = np.asarray(back(x, training=False))
    np.testing.assert_allclose(got, want, atol=2e-3)
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.99


def test_float16_storage_refuses_weights_it_cannot_hold():
    model, _ = _trained_like(2)
    var = next(v for v in model.weights if v.path.endswith("moving_variance"))
    var.assign(np.full(var.shape, 1e6, np.float32))
    with pytest.raises(ValueError, match=f"{var.path}.*float16"):
        cast_model(model, "float16")
    with pytest.raises(ValueError, match="float16 or float32"):
        cast_model(model, "bfloat16")


def _spec(folder: Path, name: str, source: str, members: list[str], **kw) -> Path:
    folder.mkdir(exist_ok=True)
    ModelSpec(name=name, kind="semantic", source=source, members=members, classes=CLASSES, input_size=32,
              overlap=4, mode="resize", normalization={"kind": "scale", "scale": 255.0}, **kw,
              ).to_file(folder / f"{name}.json")
    return folder / f"{name}.json"


def test_members_average_the_probabilities_of_every_model(tmp_path):
    a, x = _trained_like(3)
    b, _ = _trained_like(4)
    a.save(tmp_path / "a.keras")
    cast_model(b, "float16").save(tmp_path / "b.keras")  # members may be stored compactly
    b = cast_model(keras.saving.load_model(tmp_path / "b.keras", compile=False), "float32")
    pa, pb = np.asarray(a(x, training=False)), np.asarray(b(x, training=False))
    assert not np.allclose(pa, pb, atol=1e-2)  # two different models

    clear_cache()
    both = load(str(_spec(tmp_path, "pair", "a.keras", ["b.keras"])))
    np.testing.assert_allclose(both.single(x), (pa + pb) / 2, atol=1e-5)
    np.testing.assert_allclose(load(str(_spec(tmp_path, "one", "a.keras", []))).single(x), pa, atol=1e-6)

    # With flip TTA and other sizes every view goes through both members.
    flip = load(str(_spec(tmp_path, "pair-tta", "a.keras", ["b.keras"], tta="flip", tta_sizes=[48])))
    mirrored = x[:, :, ::-1]
    want = ((pa + pb) / 2 + ((np.asarray(a(mirrored)) + np.asarray(b(mirrored))) / 2)[:, :, ::-1]) / 2
    np.testing.assert_allclose(flip.predict(x), want, atol=1e-5)
    assert flip.raw.input_shape[1:3] == (None, None)


def test_members_must_be_keras_semantic_models_with_the_same_classes(tmp_path):
    a, _ = _trained_like(5)
    a.save(tmp_path / "a.keras")
    four, _ = _trained_like(6, classes=4)
    four.save(tmp_path / "four.keras")
    clear_cache()
    with pytest.raises(ValueError, match="members do not all give 3 classes"):
        load(str(_spec(tmp_path, "mixed", "a.keras", ["four.keras"])))
    with pytest.raises(ValidationError, match="members applies to semantic models in the keras format"):
        ModelSpec(name="det", kind="instance", source="saved", source_format="savedmodel", members=["x"],
                  classes=CLASSES)
    with pytest.raises(ValidationError, match="members applies"):
        ModelSpec(name="hubseg", kind="semantic", source="saved", source_format="savedmodel", members=["x"],
                  classes=CLASSES)


def test_eval_scores_the_ensemble(tmp_path):
    """``tileseg eval`` on a spec with members scores the averaged model, checked against an independent
    computation of the same average."""
    from tests.test_evaluate import _reference_scores, _run_eval
    from tests.test_train import make_pets_folder, pick_names

    names = pick_names(2, 2)
    root = make_pets_folder(tmp_path / "pets", names)
    a, _ = _trained_like(7)
    b, _ = _trained_like(8)
    a.save(tmp_path / "a.keras")
    b.save(tmp_path / "b.keras")
    clear_cache()
    pair = _run_eval("--model", str(_spec(tmp_path, "pair", "a.keras", ["b.keras"])), "--data", str(root))
    alone = _run_eval("--model", str(_spec(tmp_path, "alone", "a.keras", [])), "--data", str(root))
    assert pair["model_files"] == 2 and alone["model_files"] == 1

    def average(x, training=False):
        return (a(x, training=training) + b(x, training=training)) / 2

    assert pair["confusion"] == _reference_scores(average, root, names)["cm"].tolist()
    assert alone["confusion"] == _reference_scores(a, root, names)["cm"].tolist()
    assert pair["confusion"] != alone["confusion"]
