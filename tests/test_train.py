"""Training pipeline: folder reading, deterministic split, tf.data, loss, a tiny real run with resume."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from adapters.base import AdapterError  # noqa: E402
from pipelines.train import (  # noqa: E402
    IGNORE,
    DiceCELoss,
    TrainConfig,
    is_validation,
    list_names,
    load_pairs,
    lowres_resample,
    make_dataset,
    masked_pixel_accuracy,
    pseudo_label,
    split_names,
    train_unet,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PETS = DATA / "oxford_pets"


def _need_pets() -> None:
    if not (PETS / "annotations" / "trainval.txt").is_file():
        pytest.skip("oxford_pets data not available")


def make_pets_folder(root: Path, names: list[str], extra_listed: tuple[str, ...] = ()) -> Path:
    """A small folder laid out like oxford_pets, with links to the real files."""
    for sub in ("images", "trimaps", "annotations"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for n in names:
        (root / "images" / f"{n}.jpg").symlink_to(PETS / "images" / f"{n}.jpg")
        (root / "trimaps" / f"{n}.png").symlink_to(PETS / "trimaps" / f"{n}.png")
    (root / "annotations" / "list.txt").write_text(
        "# comment line\n" + "".join(f"{n} 1 1 1\n" for n in [*names, *extra_listed])
    )
    return root


def pick_names(n_train: int, n_val: int) -> list[str]:
    _need_pets()
    names = list_names(PETS)
    train, val = split_names(names)
    return train[:n_train] + val[:n_val]


# ------------------------------------------------------------------------------------------ split


def test_split_is_deterministic_and_order_independent():
    names = [f"img_{i}" for i in range(2000)]
    _, val = split_names(names, 0.15)
    shuffled = names[:]
    random.Random(3).shuffle(shuffled)
    _, val2 = split_names(shuffled, 0.15)
    assert set(val) == set(val2)
    assert 0.12 < len(val) / len(names) < 0.18
    # A larger fraction only adds names: the held-out set is nested.
    assert set(val) <= set(split_names(names, 0.3)[1])
    assert is_validation("img_7", 0.15) == is_validation("img_7", 0.15)


def test_real_pets_split_sizes():
    _need_pets()
    names = list_names(PETS)
    train, val = split_names(names, 0.15)
    assert len(names) == 377
    assert (len(train), len(val)) == (315, 62)
    assert not set(train) & set(val)


def test_list_names_errors_without_annotations(tmp_path):
    with pytest.raises(AdapterError, match="annotations"):
        list_names(tmp_path)


def test_load_pairs_counts_missing(tmp_path):
    names = pick_names(2, 0)
    root = make_pets_folder(tmp_path / "d", names, extra_listed=("no_such_pet",))
    pairs, missing = load_pairs(root)
    assert [p[0] for p in pairs] == names and missing == 1


# ------------------------------------------------------------------------------------------ tf.data


def test_dataset_shapes_labels_and_augmentation(tmp_path):
    names = pick_names(5, 0)
    pairs, _ = load_pairs(make_pets_folder(tmp_path / "d", names))
    ds = make_dataset(pairs, size=64, batch_size=5, augment=True, seed=1)
    epoch1 = [(x.numpy(), y.numpy()) for x, y in ds]
    epoch2 = [(x.numpy(), y.numpy()) for x, y in ds]
    x, y = epoch1[0]
    assert x.shape == (5, 64, 64, 3) and x.dtype == np.float32
    assert y.shape == (5, 64, 64, 1) and y.dtype == np.uint8
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert set(np.unique(y)) <= {0, 1, 2}
    assert not np.array_equal(epoch1[0][0], epoch2[0][0])  # new crops/jitter every epoch
    # Same seed, same stream.
    again = [x.numpy() for x, _ in make_dataset(pairs, size=64, batch_size=5, augment=True, seed=1)]
    np.testing.assert_array_equal(again[0], epoch1[0][0])


def test_lowres_resample_removes_detail_only():
    rng = np.random.default_rng(0)
    # Fine detail (pixel noise) over a coarse structure (a bright square).
    img = rng.random((64, 64, 3)).astype(np.float32) * 0.2
    img[16:48, 16:48] += 0.7
    np.testing.assert_allclose(lowres_resample(img, 1.0).numpy(), img, atol=1e-5)
    half = lowres_resample(img, 0.5).numpy()
    assert half.shape == img.shape
    # Neighbouring pixels agree far more after it: the noise is gone ...
    assert np.abs(np.diff(half, axis=1)).mean() < 0.5 * np.abs(np.diff(img, axis=1)).mean()
    # ... and the square is still where it was, as bright.
    assert abs(half[20:44, 20:44].mean() - img[20:44, 20:44].mean()) < 0.02
    assert half[:12, :12].mean() < 0.2


def test_lowres_augmentation_changes_photos_not_labels(tmp_path):
    names = pick_names(4, 0)
    pairs, _ = load_pairs(make_pets_folder(tmp_path / "d", names))
    sharp = [(x.numpy(), y.numpy()) for x, y in make_dataset(pairs, size=64, batch_size=4, augment=True, seed=3)]
    soft = [(x.numpy(), y.numpy()) for x, y in make_dataset(pairs, size=64, batch_size=4, augment=True, seed=3,
                                                             lowres=1.0)]
    # The same crops and labels; every photo lost detail.
    np.testing.assert_array_equal(sharp[0][1], soft[0][1])
    for k in range(4):
        detail = lambda a: np.abs(np.diff(a, axis=1)).mean()  # noqa: E731
        assert detail(soft[0][0][k]) < detail(sharp[0][0][k])
    with pytest.raises(ValueError, match="lowres"):
        TrainConfig(data="d", out="o", lowres=1.5)


def test_eval_dataset_is_plain_resize(tmp_path):
    names = pick_names(2, 0)
    pairs, _ = load_pairs(make_pets_folder(tmp_path / "d", names))
    x, y = next(iter(make_dataset(pairs, size=32, batch_size=2)))
    img = tf.io.decode_jpeg(tf.io.read_file(str(pairs[0][1])))
    ref = tf.image.resize(tf.image.convert_image_dtype(img, tf.float32), (32, 32))
    np.testing.assert_allclose(x[0].numpy(), ref.numpy(), atol=1e-5)


def test_zero_trimap_values_become_ignore(tmp_path):
    from PIL import Image

    root = tmp_path / "p"
    for sub in ("images", "trimaps", "annotations"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 120, np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(np.array([[0, 1, 2, 3] * 2] * 8, np.uint8)).save(root / "trimaps" / "a.png")
    (root / "annotations" / "t.txt").write_text("a\n")
    pairs, _ = load_pairs(root)
    _, y = next(iter(make_dataset(pairs, size=8, batch_size=1)))
    assert y.numpy()[0, 0, :4, 0].tolist() == [IGNORE, 0, 1, 2]


# ------------------------------------------------------------------------------------------ loss


def test_loss_ignores_ignored_pixels_and_rewards_truth():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, (2, 8, 8, 1)).astype(np.uint8)
    onehot = np.eye(3, dtype=np.float32)[y[..., 0]]
    good = 0.9 * onehot + 0.1 / 3
    bad = np.roll(good, 1, axis=-1)
    loss = DiceCELoss(num_classes=3)
    assert float(loss(y, good)) < float(loss(y, bad))
    # Ignored pixels do not count, whatever is predicted there.
    y_ign = y.copy()
    y_ign[:, :4] = IGNORE
    mixed = good.copy()
    mixed[:, :4] = bad[:, :4]
    assert float(loss(y_ign, mixed)) == pytest.approx(float(loss(y[:, 4:], good[:, 4:])), rel=1e-5)
    acc = float(masked_pixel_accuracy(y_ign, mixed))
    assert acc == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ training


def _history_epochs(path: Path) -> list[int]:
    with open(path, newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


@pytest.mark.slow
def test_tiny_training_run_with_resume(tmp_path):
    names = pick_names(6, 2)
    root = make_pets_folder(tmp_path / "d", names)
    cfg = TrainConfig(data=str(root), out=str(tmp_path / "run"), epochs=1, size=32, base_filters=4, depth=2,
                      batch_size=4, val_fraction=0.15, patience=10)
    best = train_unet(cfg)
    out = tmp_path / "run"
    assert best == out / "best.keras" and best.is_file()
    for f in ("last.keras", "history.csv", "training_curve.png", "config.json", "split.json"):
        assert (out / f).is_file(), f
    assert any((out / "tensorboard").rglob("events.out.tfevents.*"))
    split = json.loads((out / "split.json").read_text())
    assert sorted(split["val"]) == sorted(names[6:])
    assert json.loads((out / "state.json").read_text())["epoch"] == 1
    assert _history_epochs(out / "history.csv") == [0]

    with pytest.raises(FileExistsError):
        train_unet(cfg)
    cfg.epochs, cfg.resume = 2, True
    train_unet(cfg)
    assert json.loads((out / "state.json").read_text())["epoch"] == 2
    assert _history_epochs(out / "history.csv") == [0, 1]


def test_training_needs_validation_images(tmp_path):
    root = make_pets_folder(tmp_path / "d", pick_names(3, 0))
    cfg = TrainConfig(data=str(root), out=str(tmp_path / "run"), epochs=1, size=32, base_filters=4, depth=2)
    with pytest.raises(AdapterError, match="validation"):
        train_unet(cfg)


def test_pseudo_label_thresholds(tmp_path):
    from PIL import Image

    from pipelines.unet import build_unet

    names = pick_names(2, 0)
    src = make_pets_folder(tmp_path / "u", names)
    model = build_unet(input_size=None, base_filters=4, depth=2)

    def predict(rgb: np.ndarray) -> np.ndarray:
        h, w = (s // 4 * 4 for s in rgb.shape[:2])
        p = np.asarray(model(rgb[None, :h, :w].astype(np.float32) / 255.0))[0]
        return np.pad(p, ((0, rgb.shape[0] - h), (0, rgb.shape[1] - w), (0, 0)), mode="edge")

    info = pseudo_label(predict, src, tmp_path / "all", threshold=0.0)
    assert info["images"] == 2 and info["kept_fraction"] == 1.0
    t = np.asarray(Image.open(tmp_path / "all" / "trimaps" / f"{names[0]}.png"))
    assert set(np.unique(t)) <= {1, 2, 3}
    none = pseudo_label(predict, src, tmp_path / "none", threshold=1.01)
    assert none["kept_fraction"] == 0.0
    assert not np.asarray(Image.open(tmp_path / "none" / "trimaps" / f"{names[0]}.png")).any()
    # The output folder is itself a training folder.
    pairs, missing = load_pairs(tmp_path / "all")
    assert len(pairs) == 2 and missing == 0


def _synthetic_unlabeled(root: Path, lines: list[str], size: tuple[int, int] = (60, 80)) -> Path:
    from PIL import Image

    for sub in ("images", "annotations"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for line in lines:
        Image.fromarray(np.full((*size, 3), 90, np.uint8)).save(root / "images" / f"{line.split()[0]}.jpg")
    (root / "annotations" / "trainval.txt").write_text("".join(f"{ln}\n" for ln in lines))
    return root


def test_pseudo_label_keeps_the_source_annotation_lines(tmp_path):
    lines = ["Maine_Coon_1 21 1 7", "pomeranian_4 25 2 19"]
    src = _synthetic_unlabeled(tmp_path / "u", lines)
    info = pseudo_label(lambda rgb: np.full((*rgb.shape[:2], 3), 1 / 3, np.float32), src, tmp_path / "p",
                        threshold=0.0)
    assert info["images"] == 2
    assert (tmp_path / "p" / "annotations" / "trainval.txt").read_text().splitlines() == lines


def test_instance_pseudo_labels_need_two_teachers_to_agree(tmp_path):
    from PIL import Image

    from pipelines.instance_eval import list_pet_samples
    from pipelines.train import pseudo_label_instances

    lines = ["Maine_Coon_1 21 1 7", "pomeranian_4 25 2 19", "havanese_9 15 2 13"]
    src = _synthetic_unlabeled(tmp_path / "u", lines)
    obj = np.zeros((60, 80), bool)
    obj[20:41, 30:51] = True

    def semantic(rgb: np.ndarray) -> np.ndarray:
        fg = obj.copy()
        fg[0:4, 0:4] = True  # a stray blob far from the detection: agreement stays high, but not labelled
        p = np.zeros((*rgb.shape[:2], 3), np.float32)
        p[..., 0], p[..., 1] = fg, ~fg  # class 1 = background
        return p

    detections = {0: obj, 1: np.zeros_like(obj), 2: None}
    detections[1][0:10, 0:10] = True  # the instance model sees something else: the photo is left out
    calls = iter(range(3))

    def detect(rgb: np.ndarray) -> np.ndarray | None:
        return detections[next(calls)]

    info = pseudo_label_instances(semantic, detect, src, tmp_path / "inst", background_index=1,
                                  min_agreement=0.7)
    assert info["images"] == 1
    assert info["skipped"] == {"unreadable": 0, "no_detection": 1, "disagree": 1}
    assert info["mean_agreement"] == pytest.approx(obj.sum() / (obj.sum() + 16))
    trimap = np.asarray(Image.open(tmp_path / "inst" / "trimaps" / "Maine_Coon_1.png"))
    np.testing.assert_array_equal(trimap, np.where(obj, 1, 2))
    assert (tmp_path / "inst" / "annotations" / "trainval.txt").read_text() == "Maine_Coon_1 21 1 7\n"
    # the folder is an instance training folder whose species come from the source lines
    (sample,) = list_pet_samples(tmp_path / "inst")
    assert sample.name == "Maine_Coon_1" and sample.category_id == 1
