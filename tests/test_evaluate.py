"""``tileseg eval``: JSON report on a small oxford_pets-like folder, checked against pipelines.metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from click.testing import CliRunner  # noqa: E402
from PIL import Image  # noqa: E402

from core.cli_train import eval_command  # noqa: E402
from pipelines.evaluate import (  # noqa: E402
    compare_reports,
    evaluate_folder,
    export_model,
    flip_tta,
    resize_square,
    through_size,
)
from pipelines.metrics import confusion_matrix, scores  # noqa: E402
from pipelines.registry import clear_cache, get_spec  # noqa: E402
from pipelines.train import is_validation  # noqa: E402
from pipelines.unet import build_unet  # noqa: E402
from tests.test_train import make_pets_folder, pick_names  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "pipelines" / "models" / "unet-pets"


@pytest.fixture(scope="module")
def pets5(tmp_path_factory) -> tuple[Path, list[str]]:
    names = pick_names(2, 3)
    root = make_pets_folder(tmp_path_factory.mktemp("pets5"), names, extra_listed=("missing_cat_1",))
    return root, names


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[Path, object]:
    """A small real U-Net (random weights, BN in inference mode) exported as a registry folder."""
    tmp = tmp_path_factory.mktemp("model")
    tf.keras.utils.set_random_seed(4)
    model = build_unet(input_size=32, base_filters=4, depth=2)
    model.save(tmp / "ckpt.keras")
    spec = export_model(tmp / "ckpt.keras", tmp / "tiny-pets", name="tiny-pets", input_size=32)
    assert spec.class_names == ["pet", "background", "outline"]
    clear_cache()
    return tmp / "tiny-pets", model


def _run_eval(*args: str) -> dict:
    res = CliRunner().invoke(eval_command, [*args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _reference_scores(model, root: Path, names: list[str]) -> dict:
    """Predictions computed independently with tf.image.resize (the photo antialiased, as the service shrinks
    it), scored by pipelines.metrics."""
    cm = np.zeros((3, 3), np.int64)
    for n in names:
        rgb = np.asarray(Image.open(root / "images" / f"{n}.jpg").convert("RGB"), np.float32) / 255.0
        truth = np.asarray(Image.open(root / "trimaps" / f"{n}.png")).astype(np.int64) - 1
        x = tf.image.resize(rgb[None], (32, 32), method="bilinear", antialias=True)
        p = tf.image.resize(model(x, training=False), truth.shape, method="bilinear")
        cm += confusion_matrix(truth, np.argmax(p.numpy()[0], -1), 3)
    return {"cm": cm, **scores(cm)}


def test_eval_json_matches_metrics_module(pets5, tiny_model):
    root, names = pets5
    folder, model = tiny_model
    report = _run_eval("--model", str(folder), "--data", str(root))
    assert {"pixel_accuracy", "mean_iou", "per_class", "images", "skipped", "pixels", "mode"} <= set(report)
    assert list(report["per_class"]) == ["pet", "background", "outline"]
    assert all(set(v) >= {"dice", "iou"} for v in report["per_class"].values())
    assert report["images"] == 5 and report["skipped"] == 1 and report["mode"] == "resize"
    # Every pixel of every trimap, at the trimap's own resolution.
    sizes = [Image.open(root / "trimaps" / f"{n}.png").size for n in names]
    assert report["pixels"] == sum(w * h for w, h in sizes)

    ref = _reference_scores(model, root, names)
    # Same sampling as tf.image.resize; only float rounding at argmax ties may differ.
    assert np.abs(np.array(report["confusion"]) - ref["cm"]).sum() <= report["pixels"] * 1e-4
    assert report["pixel_accuracy"] == pytest.approx(ref["pixel_accuracy"], abs=1e-4)
    assert report["mean_iou"] == pytest.approx(ref["mean_iou"], abs=1e-3)
    for name, ref_c in zip(report["per_class"], ref["per_class"], strict=True):
        for key in ("dice", "iou"):
            assert report["per_class"][name][key] == pytest.approx(ref_c[key], abs=1e-3)

    # Each image's own scores, worst first; together they are the whole report.
    per_image = report["per_image"]
    assert sorted(r["name"] for r in per_image) == sorted(names)
    assert sum(r["pixels"] for r in per_image) == report["pixels"]
    accs = [r["pixel_accuracy"] for r in per_image]
    assert accs == sorted(accs)
    assert sum(a * r["pixels"] for a, r in zip(accs, per_image, strict=True)) / report["pixels"] == pytest.approx(
        report["pixel_accuracy"])
    ci = report["intervals"]
    assert ci["items"] == 5 and ci["level"] == 0.95
    assert min(accs) <= ci["pixel_accuracy"][0] <= report["pixel_accuracy"] <= ci["pixel_accuracy"][1] <= max(accs)


def test_square_protocol_resizes_photo_and_trimap_before_scoring(pets5, tiny_model):
    """--square 48: every photo and trimap at 48x48 (trimap nearest), the model run as served on that photo
    (here resized to its 32 px input and back), scored on 48 * 48 pixels per photo."""
    root, names = pets5
    folder, model = tiny_model
    report = _run_eval("--model", str(folder), "--data", str(root), "--square", "48")
    assert report["square"] == 48 and report["images"] == 5 and report["pixels"] == 5 * 48 * 48
    cm = np.zeros((3, 3), np.int64)
    for n in names:
        rgb = Image.open(root / "images" / f"{n}.jpg").convert("RGB").resize((48, 48), Image.BILINEAR)
        truth = np.asarray(Image.open(root / "trimaps" / f"{n}.png").resize((48, 48), Image.NEAREST)) - 1
        x = tf.image.resize(np.asarray(rgb, np.float32)[None] / 255.0, (32, 32), method="bilinear", antialias=True)
        p = tf.image.resize(model(x, training=False), (48, 48), method="bilinear")
        cm += confusion_matrix(truth.astype(np.int64), np.argmax(p.numpy()[0], -1), 3)
    assert np.abs(np.array(report["confusion"]) - cm).sum() <= report["pixels"] * 1e-3
    # Unknown labels stay unknown through the resize; labels are never blended into a new class.
    photo, lab = resize_square(np.zeros((10, 20, 3), np.uint8), np.asarray([[-1] * 10 + [2] * 10] * 10, np.int16),
                               7)
    assert photo.shape == (7, 7, 3) and set(np.unique(lab)) == {-1, 2}
    res = CliRunner().invoke(eval_command, ["--model", str(folder), "--data", str(root), "--square", "4"])
    assert res.exit_code != 0 and "--square" in res.output


def test_through_degrades_the_photo_only_and_scores_on_the_native_trimap(pets5, tiny_model):
    """--through 24: each photo resized to 24x24 and back before it is served; the trimap is untouched."""
    root, names = pets5
    folder, model = tiny_model
    report = _run_eval("--model", str(folder), "--data", str(root), "--through", "24")
    native = _run_eval("--model", str(folder), "--data", str(root))
    assert report["through"] == 24 and report["pixels"] == native["pixels"]
    cm = np.zeros((3, 3), np.int64)
    for n in names:
        photo = Image.open(root / "images" / f"{n}.jpg").convert("RGB")
        soft = photo.resize((24, 24), Image.BILINEAR).resize(photo.size, Image.BILINEAR)
        truth = np.asarray(Image.open(root / "trimaps" / f"{n}.png")).astype(np.int64) - 1
        x = tf.image.resize(np.asarray(soft, np.float32)[None] / 255.0, (32, 32), method="bilinear", antialias=True)
        p = tf.image.resize(model(x, training=False), truth.shape, method="bilinear")
        cm += confusion_matrix(truth, np.argmax(p.numpy()[0], -1), 3)
    assert np.abs(np.array(report["confusion"]) - cm).sum() <= report["pixels"] * 1e-3
    assert report["confusion"] != native["confusion"]
    np.testing.assert_array_equal(through_size(np.full((9, 13, 3), 77, np.uint8), 4), np.full((9, 13, 3), 77))


def test_split_val_selects_held_out_names(pets5, tiny_model):
    root, names = pets5
    folder, _ = tiny_model
    report = _run_eval("--model", str(folder), "--data", str(root), "--split", "val")
    expected = [n for n in names if is_validation(n, 0.15)]
    assert len(expected) == 3
    assert report["images"] == 3 and report["split"] == "val"
    sizes = [Image.open(root / "trimaps" / f"{n}.png").size for n in expected]
    assert report["pixels"] == sum(w * h for w, h in sizes)


def test_tile_mode_and_table_output(pets5, tiny_model):
    root, _ = pets5
    folder, _ = tiny_model
    tiled = evaluate_folder(str(folder), root, mode="tile")
    assert tiled["mode"] == "tile" and 0.0 <= tiled["pixel_accuracy"] <= 1.0
    res = CliRunner().invoke(eval_command, ["--model", str(folder), "--data", str(root)])
    assert res.exit_code == 0
    assert "mean IoU" in res.stdout and "outline" in res.stdout
    assert "skipped 1" in res.stderr


def test_bad_files_are_named_and_the_other_images_scored_as_alone(pets5, tiny_model, tmp_path):
    """A truncated photo, a text file named .jpg, an RGB trimap and a trimap of another size each cost their
    own image only: named with the reason in ``errors``, while the good images score exactly as in a folder
    without them. A listed name with no files is named in ``missing``."""
    root, names = pets5
    folder, _ = tiny_model
    good = names[:2]
    clean = make_pets_folder(tmp_path / "clean", good)
    mixed = make_pets_folder(tmp_path / "mixed", good, extra_listed=("gone_cat_9",))
    src = root / "images" / f"{names[2]}.jpg"
    tri = Image.open(root / "trimaps" / f"{names[2]}.png")
    bad = {
        "cut_cat_1": (src.read_bytes()[:2000], tri),
        "text_cat_2": (b"not a photo at all\n", tri),
        "rgb_cat_3": (src.read_bytes(), tri.convert("RGB")),
        "small_cat_4": (src.read_bytes(), tri.resize((20, 10))),
    }
    for name, (photo, trimap) in bad.items():
        (mixed / "images" / f"{name}.jpg").write_bytes(photo)
        trimap.save(mixed / "trimaps" / f"{name}.png")
    with (mixed / "annotations" / "list.txt").open("a") as f:
        f.write("".join(f"{n} 1 1 1\n" for n in bad))

    report = evaluate_folder(str(folder), mixed)
    alone = evaluate_folder(str(folder), clean)
    assert report["images"] == 2 and report["confusion"] == alone["confusion"]
    assert report["missing"] == ["gone_cat_9"] and report["skipped"] == 5
    reasons = {e["name"]: e["error"] for e in report["errors"]}
    assert list(reasons) == list(bad)
    assert "unreadable image" in reasons["cut_cat_1"] and "unreadable image" in reasons["text_cat_2"]
    assert "single-channel" in reasons["rgb_cat_3"] and "sizes differ" in reasons["small_cat_4"]
    assert sorted(r["name"] for r in report["per_image"]) == sorted(good)

    res = CliRunner().invoke(eval_command, ["--model", str(folder), "--data", str(mixed)])
    assert res.exit_code == 0, res.output
    assert "gone_cat_9" in res.stderr and all(n in res.stderr for n in bad)

    only_bad = make_pets_folder(tmp_path / "bad", [])
    for name, (photo, trimap) in bad.items():
        (only_bad / "images" / f"{name}.jpg").write_bytes(photo)
        trimap.save(only_bad / "trimaps" / f"{name}.png")
    (only_bad / "annotations" / "list.txt").write_text("".join(f"{n} 1 1 1\n" for n in bad))
    res = CliRunner().invoke(eval_command, ["--model", str(folder), "--data", str(only_bad)])
    assert res.exit_code != 0 and "none of the 4 images could be scored" in res.output


def test_eval_accepts_bare_keras_file(pets5, tiny_model):
    root, _ = pets5
    folder, _ = tiny_model
    by_folder = evaluate_folder(str(folder), root)
    by_file = evaluate_folder(str(folder / "model.keras"), root)
    assert by_file["confusion"] == by_folder["confusion"]


def test_flip_tta_is_symmetric(tiny_model):
    _, model = tiny_model

    def predict(x):
        return np.asarray(model(x, training=False))

    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    a = flip_tta(predict)(x)
    b = flip_tta(predict)(x[:, :, ::-1])[:, :, ::-1]
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)


def test_spec_tta_flip_is_what_the_service_runs_and_eval_follows_it(tmp_path, pets5, tiny_model):
    """``"tta": "flip"`` in spec.json: the loaded model's predict is the flip average (what the worker
    calls), ``single`` stays one pass, and eval uses the spec's choice unless told otherwise."""
    import shutil

    from pipelines.registry import load
    from pipelines.spec import ModelSpec

    root, _ = pets5
    folder, model = tiny_model
    flip_dir = tmp_path / "tiny-flip"
    shutil.copytree(folder, flip_dir)
    spec = ModelSpec.from_file(flip_dir / "spec.json").model_copy(update={"name": "tiny-flip", "tta": "flip"})
    spec.to_file(flip_dir / "spec.json")
    clear_cache()
    loaded = load(str(flip_dir))
    x = np.random.default_rng(1).random((3, 32, 32, 3), dtype=np.float32)
    one = np.asarray(model(x, training=False))
    np.testing.assert_allclose(loaded.single(x), one, atol=1e-5)
    np.testing.assert_allclose(loaded.predict(x), 0.5 * (one + np.asarray(model(x[:, :, ::-1]))[:, :, ::-1]),
                               atol=1e-5)
    assert not np.allclose(loaded.predict(x), one, atol=1e-4)

    as_spec = _run_eval("--model", str(flip_dir), "--data", str(root))
    forced = _run_eval("--model", str(folder), "--data", str(root), "--tta")
    plain = _run_eval("--model", str(flip_dir), "--data", str(root), "--no-tta")
    assert as_spec["tta"] is True and plain["tta"] is False
    assert as_spec["confusion"] == forced["confusion"]
    assert plain["confusion"] == _run_eval("--model", str(folder), "--data", str(root))["confusion"]


def test_bad_inputs_give_clear_errors(tmp_path, tiny_model):
    folder, _ = tiny_model
    res = CliRunner().invoke(eval_command, ["--model", "no-such-model", "--data", str(tmp_path)])
    assert res.exit_code != 0 and "no-such-model" in res.output
    res = CliRunner().invoke(eval_command, ["--model", str(folder), "--data", str(tmp_path)])
    assert res.exit_code != 0 and "not a known layout" in res.output and "trimaps" in res.output
    assert "tileseg run IMAGES/ --truth LABELS/" in " ".join(res.output.split())
    (tmp_path / "annotations").mkdir()  # looks like oxford_pets but lists nothing
    res = CliRunner().invoke(eval_command, ["--model", str(folder), "--data", str(tmp_path)])
    assert res.exit_code != 0 and "annotations" in res.output


@pytest.mark.skipif(not (SHIPPED / "spec.json").is_file(), reason="shipped model not present")
def test_shipped_model_spec_and_load():
    import keras

    spec = get_spec("unet-pets")
    assert spec.kind == "semantic" and spec.class_names == ["pet", "background", "outline"]
    assert spec.background_class == 1 and "photo" in spec.default_for
    weights = Path(spec.resolve_source())
    files = [Path(f) for f in spec.resolve_sources()]
    assert files[0] == weights and len(files) == 1 + len(spec.members)
    # The cap is on the weights the model ships, every ensemble member included.
    assert sum(f.stat().st_size for f in files) <= 20 * 1024 * 1024
    for f in files:
        model = keras.saving.load_model(f, compile=False)
        y = np.asarray(model(np.zeros((1, spec.input_size, spec.input_size, 3), np.float32)))
        assert y.shape == (1, spec.input_size, spec.input_size, 3)
        np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-3)
    # The fast variant serves the same weights (no second copy in the repository) in one pass.
    fast = get_spec("unet-pets-fast")
    assert Path(fast.resolve_source()).resolve() == weights.resolve()
    assert spec.tta == "flip" and spec.tta_sizes and fast.tta == "none" and fast.tta_sizes == []
    assert fast.default_for == [] and fast.classes == spec.classes


def test_tta_sizes_run_a_fixed_size_model_at_other_sizes(tmp_path, pets5, tiny_model):
    """The tiny model was saved with a fixed 32x32 input; ``tta_sizes`` re-wires it to any size at load, and
    eval's report (as served) averages the three sizes, which ``--no-tta`` turns off with the flip."""
    import shutil

    from pipelines.evaluate import make_predictor
    from pipelines.registry import load
    from pipelines.spec import ModelSpec

    root, names = pets5
    folder, model = tiny_model
    ms_dir = tmp_path / "tiny-ms"
    shutil.copytree(folder, ms_dir)
    spec = ModelSpec.from_file(ms_dir / "spec.json").model_copy(update={"name": "tiny-ms", "tta_sizes": [24, 48]})
    spec.to_file(ms_dir / "spec.json")
    clear_cache()
    loaded = load(str(ms_dir))
    assert model.input_shape[1:3] == (32, 32) and loaded.raw.input_shape[1:3] == (None, None)

    # Reference: the same weights in a model built for any size, each size through tf.image.resize.
    anysize = build_unet(input_size=None, base_filters=4, depth=2)
    anysize.set_weights(model.get_weights())
    rgb = np.asarray(Image.open(root / "images" / f"{names[0]}.jpg").convert("RGB"))
    h, w = rgb.shape[:2]
    x = rgb[None].astype(np.float32) / 255.0
    probs = [tf.image.resize(np.asarray(anysize(tf.image.resize(x, (e, e), antialias=True), training=False)),
                             (32, 32)) for e in (32, 24, 48)]
    ref = tf.image.resize(np.mean(probs, axis=0), (h, w)).numpy()[0]
    got = make_predictor(loaded)(rgb)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert not np.allclose(make_predictor(loaded, multiscale=False)(rgb), ref, atol=1e-3)

    report = _run_eval("--model", str(ms_dir), "--data", str(root))
    plain = _run_eval("--model", str(ms_dir), "--data", str(root), "--no-tta")
    assert report["tta_sizes"] == [24, 48] and plain["tta_sizes"] == []
    assert plain["confusion"] == _run_eval("--model", str(folder), "--data", str(root))["confusion"]
    assert report["confusion"] != plain["confusion"]

    # --tta-sizes measures another setting without editing the spec; the served one is not disturbed.
    clear_cache()
    assert _run_eval("--model", str(folder), "--data", str(root), "--tta-sizes", "24,48")["confusion"] == \
        report["confusion"]
    assert _run_eval("--model", str(ms_dir), "--data", str(root), "--tta-sizes", "none")["confusion"] == \
        plain["confusion"]
    assert evaluate_folder(str(ms_dir), root, tta_sizes=[24, 48])["confusion"] == report["confusion"]
    assert _run_eval("--model", str(folder), "--data", str(root))["confusion"] == plain["confusion"]
    bad = CliRunner().invoke(eval_command, ["--model", str(folder), "--data", str(root), "--tta-sizes", "24,x"])
    assert bad.exit_code == 2 and "--tta-sizes" in bad.output
    repeated = CliRunner().invoke(eval_command, ["--model", str(folder), "--data", str(root), "--tta-sizes", "24,24"])
    assert repeated.exit_code == 1 and "tta_sizes must be distinct input edges" in repeated.output


    # --baseline: the multi-scale setting against the plain one, paired image by image.
    base_file = tmp_path / "plain.json"
    base_file.write_text(json.dumps(plain))
    vs = _run_eval("--model", str(ms_dir), "--data", str(root), "--baseline", str(base_file))["versus_baseline"]
    assert vs["baseline"] == str(base_file) and vs["items"] == 5
    assert vs["pixel_accuracy"]["difference"] == pytest.approx(report["pixel_accuracy"] - plain["pixel_accuracy"])
    low, high = vs["pixel_accuracy"]["interval"]
    assert low <= vs["pixel_accuracy"]["difference"] <= high
    table = CliRunner().invoke(eval_command, ["--model", str(ms_dir), "--data", str(root),
                                              "--baseline", str(base_file)])
    assert table.exit_code == 0 and "paired 95% interval: pixel accuracy" in table.stdout


def test_tta_sizes_on_a_model_that_cannot_take_other_sizes_is_a_clear_error(tmp_path):
    import keras

    from pipelines.registry import load
    from pipelines.spec import ClassSpec, ModelSpec

    inp = keras.Input((16, 16, 3))
    x = keras.layers.Dense(3 * 16 * 16)(keras.layers.Flatten()(inp))
    out = keras.layers.Softmax()(keras.layers.Reshape((16, 16, 3))(x))
    folder = tmp_path / "dense"
    folder.mkdir()
    keras.Model(inp, out).save(folder / "model.keras")
    ModelSpec(name="dense16", kind="semantic", source="model.keras", input_size=16, overlap=2, mode="resize",
              classes=[ClassSpec(id=i, name=f"c{i}") for i in range(3)], tta_sizes=[24]).to_file(folder / "spec.json")
    clear_cache()
    with pytest.raises(ValueError, match=r"tta_sizes \[24\] need a model that takes any input size"):
        load(str(folder))


def _report(rows: list[tuple[str, list[list[int]]]], model: str = "m") -> dict:
    return {"model": model, "per_image": [{"name": n, "pixels": int(np.sum(cm)), "confusion": cm} for n, cm in rows]}


def test_compare_reports_pairs_images_by_name_and_refuses_other_images():
    good, bad = [[8, 1], [1, 10]], [[5, 4], [3, 8]]
    base = _report([("a", good), ("b", bad), ("c", good)], model="old")
    # Same images listed in another order (reports sort worst first), the candidate fixes image b.
    cand = _report([("c", good), ("a", good), ("b", good)])
    vs = compare_reports(base, cand)
    assert vs["baseline_model"] == "old" and vs["items"] == 3
    assert vs["pixel_accuracy"]["difference"] == pytest.approx(54 / 60 - 49 / 60)
    assert compare_reports(base, base)["pixel_accuracy"]["interval"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="different images: 1 only in the baseline"):
        compare_reports(base, _report([("a", good), ("b", good)]))
    with pytest.raises(ValueError, match="other pixel counts"):
        compare_reports(base, _report([("a", good), ("b", good), ("c", [[1, 0], [0, 1]])]))
    with pytest.raises(ValueError, match="no per-image confusion"):
        compare_reports({"model": "x", "pixel_accuracy": 0.9}, cand)
    for not_a_report in ([1, 2], {"per_image": [{"name": "a"}]}, {"per_image": "x"}):
        with pytest.raises(ValueError, match="no per-image confusion"):
            compare_reports(not_a_report, cand)
