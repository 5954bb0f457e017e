"""U-Net training on the JAX backend: schedule, resampling, pack format, augmentation, a real tiny run whose
weights are exported and served by the TensorFlow backend."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

tf = pytest.importorskip("tensorflow")
jax = pytest.importorskip("jax")

from pipelines.train_jax import (  # noqa: E402
    EXTRA,
    TRAIN,
    UNLABELED,
    VAL,
    FitConfig,
    _augment_fn,
    _bilinear,
    _nearest,
    consistency_targets,
    crop_coords,
    cutmix,
    ema_decay,
    export_run,
    load_pack,
    load_weights_npz,
    lowres,
    lowres_matrix,
    lr_at,
    main,
    pack_folders,
)
from pipelines.unet import build_unet  # noqa: E402
from tests.test_train import PETS, make_pets_folder, pick_names  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_lr_schedule_warmup_then_cosine_to_floor():
    lrs = [lr_at(s, 100, 1e-3, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lr_at(100, 100, 1e-3, 10) == pytest.approx(2e-5)
    assert lr_at(500, 100, 1e-3, 10) == pytest.approx(2e-5)


def test_resampling_matches_tf_image_resize():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (37, 53, 3)).astype(np.uint8)
    lab = rng.integers(0, 3, (37, 53)).astype(np.uint8)
    ys, xs = crop_coords(np, 0.0, 0.0, 37.0, 53.0, 24, False)
    ours = _bilinear(np, img, ys, xs)
    ref = tf.image.resize(img.astype(np.float32), (24, 24), method="bilinear", antialias=False).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    ref_lab = tf.image.resize(lab[..., None], (24, 24), method="nearest").numpy()[..., 0]
    np.testing.assert_array_equal(_nearest(np, lab, ys, xs), ref_lab)
    ys, xs = crop_coords(np, 0.0, 0.0, 37.0, 53.0, 24, True)
    np.testing.assert_allclose(_bilinear(np, img, ys, xs), ref[:, ::-1], atol=1e-3)
    # A crop never samples outside itself.
    ys, xs = crop_coords(np, 5.0, 7.0, 10.0, 20.0, 40, False)
    assert ys.min() >= 5 and ys.max() <= 14 and xs.min() >= 7 and xs.max() <= 26


def test_augmentation_keeps_labels_on_their_pixels():
    # Left half dark with label 0, right half bright with label 1: after any crop, flip and colour jitter the
    # pixels labelled 1 must stay brighter than those labelled 0.
    img = np.zeros((48, 64, 3), np.uint8)
    img[:, 32:] = 200
    lab = np.zeros((48, 64), np.uint8)
    lab[:, 32:] = 1
    n = 16
    aug = _augment_fn(24)
    x, y = aug(jax.random.split(jax.random.PRNGKey(0), n), np.stack([img] * n), np.stack([lab] * n),
               np.asarray([[48, 64]] * n, np.int32))
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == (n, 24, 24, 3) and y.shape == (n, 24, 24)
    assert x.min() >= 0.0 and x.max() <= 1.0 and set(np.unique(y)) <= {0, 1}
    flipped = 0
    for k in range(n):
        bright = x[k].mean(-1)
        if (y[k] == 0).any() and (y[k] == 1).any():
            assert bright[y[k] == 1].mean() > bright[y[k] == 0].mean() + 0.2
        flipped += int(y[k][:, 0].mean() > y[k][:, -1].mean())
    assert 0 < flipped < n  # both orientations occur


def test_cutmix_pastes_one_rectangle_of_the_next_item_into_photo_and_label_alike():
    n, size = 6, 32
    # Item k is filled with the value k in every channel and in its label, so the source of a pixel is visible.
    x = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, size, size, 3)).copy()
    y = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, size, size)).copy()
    mx, my = (np.asarray(a) for a in cutmix(jax.random.PRNGKey(3), x, y, 1.0))
    for k in range(n):
        pasted = my[k] != k
        assert set(np.unique(my[k])) == {k, (k - 1) % n}
        np.testing.assert_array_equal(mx[k, ..., 0] != k, pasted)  # photo and label pasted together
        rows, cols = np.flatnonzero(pasted.any(1)), np.flatnonzero(pasted.any(0))
        assert pasted[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()  # one rectangle
        assert 0.02 < pasted.mean() < 0.6
    kx, ky = cutmix(jax.random.PRNGKey(3), x, y, 0.0)
    np.testing.assert_array_equal(np.asarray(kx), x)
    np.testing.assert_array_equal(np.asarray(ky), y)


@pytest.mark.parametrize("fraction", [1.0, 0.75, 0.5, 0.41])
def test_lowres_matrix_matches_the_tensorflow_resample(fraction):
    from pipelines.train import lowres_resample

    img = np.random.default_rng(5).random((40, 40, 3)).astype(np.float32)
    a = np.asarray(lowres_matrix(40, np.float32(fraction)))
    ours = np.einsum("ia,abc,jb->ijc", a, img, a)
    np.testing.assert_allclose(ours, lowres_resample(img, fraction).numpy(), atol=1e-4)


def test_lowres_softens_the_chosen_photos_only():
    x = np.random.default_rng(6).random((8, 32, 32, 3)).astype(np.float32)
    out = np.asarray(lowres(jax.random.PRNGKey(0), x, 0.5))
    changed = [not np.allclose(out[k], x[k]) for k in range(8)]
    assert 0 < sum(changed) < 8
    for k in range(8):
        if changed[k]:
            assert np.abs(np.diff(out[k], axis=1)).mean() < 0.8 * np.abs(np.diff(x[k], axis=1)).mean()
    np.testing.assert_array_equal(np.asarray(lowres(jax.random.PRNGKey(0), x, 0.0)), x)


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> tuple[Path, list[str]]:
    names = pick_names(3, 2)
    root = make_pets_folder(tmp_path_factory.mktemp("pets"), names)
    # An extra (pseudo-label) folder that also lists a validation name, which must not train.
    extra = tmp_path_factory.mktemp("pseudo")
    for sub in ("images", "trimaps", "annotations"):
        (extra / sub).mkdir()
    extra_names = ["pseudo_a", names[-1]]
    for n, src in zip(extra_names, names[:1] + names[-1:], strict=True):
        (extra / "images" / f"{n}.jpg").symlink_to(PETS / "images" / f"{src}.jpg")
        Image.open(PETS / "trimaps" / f"{src}.png").point(lambda v: 0 if v == 3 else v).save(
            extra / "trimaps" / f"{n}.png")
    (extra / "annotations" / "list.txt").write_text("".join(f"{n} 1 1 1\n" for n in extra_names))
    # A folder of photos without labels, also listing a validation photo, which must not be packed at all.
    unlabeled = tmp_path_factory.mktemp("unlabeled")
    for sub in ("images", "annotations"):
        (unlabeled / sub).mkdir()
    (unlabeled / "images" / "free_a.jpg").symlink_to(PETS / "images" / f"{names[1]}.jpg")
    (unlabeled / "images" / f"{names[-1]}.jpg").symlink_to(PETS / "images" / f"{names[-1]}.jpg")
    # A truncated JPEG is reported and left out; the other photos are packed.
    good = (PETS / "images" / f"{names[0]}.jpg").read_bytes()
    (unlabeled / "images" / "broken_b.jpg").write_bytes(good[: len(good) // 3])
    (unlabeled / "annotations" / "list.txt").write_text(f"free_a 1 1 1\n{names[-1]} 1 1 1\nbroken_b 1 1 1\n")
    out = tmp_path_factory.mktemp("pack") / "new" / "pets.npz"  # pack makes missing folders
    counts = pack_folders(root, out, [extra], unlabeled=[unlabeled])
    skipped = counts.pop("skipped")
    assert counts == {"train": 3, "extra": 1, "val": 2, "unlabeled": 1}
    assert list(skipped) == ["broken_b"] and "broken_b.jpg" in skipped["broken_b"]
    return out, names


def test_pack_roundtrip_decodes_photos_and_labels(pack):
    path, names = pack
    d = load_pack(path)
    assert d.names == [*names[:3], *names[3:], "pseudo_a", "free_a"]
    assert list(d.split) == [TRAIN] * 3 + [VAL] * 2 + [EXTRA, UNLABELED]
    for k, n in enumerate(names):
        img = np.asarray(Image.open(PETS / "images" / f"{n}.jpg").convert("RGB"))
        tri = np.asarray(Image.open(PETS / "trimaps" / f"{n}.png"))
        h, w = img.shape[:2]
        assert tuple(d.hw[k]) == (h, w)
        np.testing.assert_array_equal(d.images[k, :h, :w], img)
        np.testing.assert_array_equal(d.labels[k, :h, :w], tri - 1)
        assert (d.labels[k, h:] == 255).all() and (d.labels[k, :, w:] == 255).all()
    # Pseudo-label value 0 (unknown) becomes 255.
    assert 255 in np.unique(d.labels[5, : d.hw[5][0], : d.hw[5][1]])
    # The unlabelled photo is the photo itself, with every pixel unknown.
    h, w = d.hw[6]
    np.testing.assert_array_equal(d.images[6, :h, :w], d.images[1, : d.hw[1][0], : d.hw[1][1]])
    assert (d.labels[6] == 255).all()


def test_consistency_targets_keep_only_confident_teacher_pixels():
    probs = np.asarray([[0.95, 0.03, 0.02], [0.5, 0.3, 0.2], [0.05, 0.05, 0.9], [0.1, 0.89, 0.01]], np.float32)
    np.testing.assert_array_equal(np.asarray(consistency_targets(probs, 0.9)), [0, 255, 2, 255])
    np.testing.assert_array_equal(np.asarray(consistency_targets(probs, 0.0)), [0, 0, 2, 1])
    assert np.asarray(consistency_targets(probs.reshape(2, 2, 3), 0.9)).shape == (2, 2)


def test_ema_decay_forgets_the_start_then_holds_the_configured_decay():
    assert float(ema_decay(0.999, 0)) == pytest.approx(0.1)
    assert float(ema_decay(0.999, 90)) == pytest.approx(0.91)
    assert float(ema_decay(0.999, 1e6)) == pytest.approx(0.999)
    assert all(float(ema_decay(0.99, s)) <= 0.99 + 1e-6 for s in (0, 10, 1000, 10**7))  # float32


def test_fit_config_refuses_consistency_without_a_teacher_and_bad_values():
    with pytest.raises(ValueError, match="needs a teacher"):
        FitConfig(pack="p.npz", out="o", consistency=1.0)
    with pytest.raises(ValueError, match="ema"):
        FitConfig(pack="p.npz", out="o", ema=1.0)
    with pytest.raises(ValueError, match="precision"):
        FitConfig(pack="p.npz", out="o", precision="float16")
    assert FitConfig(pack="p.npz", out="o", ema=0.999, consistency=1.0).consistency == 1.0


@pytest.mark.parametrize(
    "options",
    [[], ["--precision", "mixed_bfloat16", "--cutmix", "1.0"], ["--ema", "0.9", "--consistency", "1.0",
                                                                 "--consistency-threshold", "0.0", "--lowres", "0.5"]],
    ids=["float32", "bfloat16-cutmix", "ema-consistency"])
def test_fit_on_jax_then_export_and_serve_on_tensorflow(pack, tmp_path, options):
    path, _ = pack
    out = tmp_path / "run"
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-m", "pipelines.train_jax", "fit", "--pack", str(path), "--out", str(out), "--size", "32",
         "--base-filters", "4", "--depth", "2", "--batch-size", "2", "--budget-s", "1", "--evals", "2", *options],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    # The unlabelled photo never trains with the labelled ones.
    assert run["steps"] == 20 and run["train_images"] == 4 and run["val_images"] == 2
    assert "jax" in run and 0.0 <= run["final_val"]["mean_iou"] <= 1.0
    if "--ema" in options:
        # Consistency draws from every photo that may train: 3 labelled, 1 pseudo-labelled, 1 unlabelled.
        assert run["pool_images"] == 5 and 0.0 <= run["student_val"]["mean_iou"] <= 1.0
        averaged, student = np.load(out / "weights.npz"), np.load(out / "weights_student.npz")
        assert averaged.files == student.files
        kernels = [k for k in averaged.files if k.endswith("kernel")]
        assert not all(np.allclose(averaged[k], student[k]) for k in kernels)
        export_run(out, tmp_path / "student", student=True)
        import keras

        served = keras.saving.load_model(tmp_path / "student" / "model.keras", compile=False)
        rebuilt = build_unet(input_size=32, base_filters=4, depth=2, dropout=0.1)
        load_weights_npz(rebuilt, out / "weights_student.npz")
        x = np.random.default_rng(2).random((1, 32, 32, 3)).astype(np.float32)
        np.testing.assert_allclose(np.asarray(served(x)), np.asarray(rebuilt(x)), atol=1e-6)
    with open(out / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert int(rows[-1]["step"]) == 20 and 0 < float(rows[-1]["loss"]) < 100
    # Mixed precision computes in bfloat16 but keeps float32 weights, which is what the export loads.
    assert {np.load(out / "weights.npz")[k].dtype for k in np.load(out / "weights.npz").files} == {np.dtype("float32")}

    spec = export_run(out, tmp_path / "export")
    assert spec.input_size == 32 and spec.tta == "flip" and spec.kind == "semantic"
    assert (tmp_path / "export" / "training_curve.png").stat().st_size > 0
    import keras

    served = keras.saving.load_model(tmp_path / "export" / "model.keras", compile=False)
    rebuilt = build_unet(input_size=32, base_filters=4, depth=2, dropout=0.1)
    load_weights_npz(rebuilt, out / "weights.npz")
    x = np.random.default_rng(1).random((2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(served(x)), np.asarray(rebuilt(x)), atol=1e-6)
    # The training run really changed the weights (BatchNorm statistics and kernels).
    fresh = build_unet(input_size=32, base_filters=4, depth=2, dropout=0.1)
    assert not np.allclose(np.asarray(fresh(x)), np.asarray(rebuilt(x)))


def test_load_weights_npz_refuses_another_architecture(tmp_path):
    small = build_unet(input_size=32, base_filters=4, depth=2)
    np.savez(tmp_path / "w.npz", **{v.path: np.asarray(v.value) for v in small.weights})
    with pytest.raises(ValueError, match="shape"):
        load_weights_npz(build_unet(input_size=32, base_filters=8, depth=2), tmp_path / "w.npz")
    with pytest.raises(ValueError, match="no weights"):
        load_weights_npz(build_unet(input_size=32, base_filters=4, depth=3), tmp_path / "w.npz")


def test_fit_warm_starts_from_a_served_model_and_saves_float16(pack, tmp_path):
    """``weights`` turns a served model file into a ``.npz``; ``fit --init`` starts from it; ``--save-dtype
    float16`` halves the weight files and ``export --dtype float16`` the model file, which serves in float32."""
    import keras

    path, _ = pack
    start = build_unet(input_size=32, base_filters=4, depth=2, dropout=0.1)
    x = np.random.default_rng(4).random((2, 32, 32, 3)).astype(np.float32)
    start(x, training=True)  # move the BatchNorm statistics off their defaults
    start.save(tmp_path / "start.keras")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}


    init = tmp_path / "gpu" / "init.npz"
    # The TensorFlow side runs in this process, through the same command line.
    assert main(["weights", "--model", str(tmp_path / "start.keras"), "--out", str(init), "--dtype", "float16"]) == 0
    z = np.load(init)
    assert {z[k].dtype for k in z.files} == {np.dtype("float16")}
    assert sorted(z.files) == sorted(v.path for v in start.weights)

    out = tmp_path / "run"
    # A learning rate of ~0 keeps every kernel where --init put it, so the run shows where it started.
    res = subprocess.run(
        [sys.executable, "-m", "pipelines.train_jax", "fit", "--pack", str(path), "--out", str(out), "--size", "32",
         "--base-filters", "4", "--depth", "2", "--batch-size", "2", "--budget-s", "1", "--evals", "1", "--ema", "0.9",
         "--consistency", "1.0", "--learning-rate", "1e-12", "--init", str(init), "--save-dtype", "float16"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("weights.npz", "weights_student.npz"):
        w = np.load(out / name)
        assert {w[k].dtype for k in w.files} == {np.dtype("float16")}
        for v in start.weights:
            if v.path.endswith("kernel"):
                np.testing.assert_allclose(w[v.path], np.asarray(v.value), rtol=2e-3, atol=2e-4)
    assert json.loads((out / "run.json").read_text())["config"]["init"] == str(init)

    assert main(["export", "--run", str(out), "--out", str(tmp_path / "export"), "--dtype", "float16"]) == 0
    stored = keras.saving.load_model(tmp_path / "export" / "model.keras", compile=False)
    assert {str(np.dtype(v.dtype)) for v in stored.weights} == {"float16"}
    from pipelines import registry

    served = registry.load(str(tmp_path / "export"))
    assert {str(np.dtype(v.dtype)) for v in served.raw.weights} == {"float32"}
    rebuilt = build_unet(input_size=32, base_filters=4, depth=2, dropout=0.1)
    load_weights_npz(rebuilt, out / "weights.npz")
    np.testing.assert_allclose(served.single(x), np.asarray(rebuilt(x)), atol=2e-3)


def test_fit_config_refuses_a_missing_init_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match="init"):
        FitConfig(pack="p.npz", out="o", init=str(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match="save_dtype"):
        FitConfig(pack="p.npz", out="o", save_dtype="bfloat16")
    with pytest.raises(ValueError, match="lowres"):
        FitConfig(pack="p.npz", out="o", lowres=2.0)
