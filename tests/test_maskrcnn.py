"""tileseg's own Mask R-CNN: pets input (masks, boxes, multi-pet augmentation), the Model Garden parser's
labels, the exported OD API signature of a tiny model, and the shipped model on a held-out photo.

Tests marked with ``pytest.importorskip("official")`` need the ``[train]`` extra (tf-models-official); the
shipped-model test needs only TensorFlow.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipelines.maskrcnn import (
    MaskRCNNConfig,
    PetInstance,
    SampleGenerator,
    boxes_from_masks,
    copy_paste,
    letterbox,
    load_pets,
    mosaic,
)

REPO = Path(__file__).resolve().parents[1]
PETS = Path(__file__).resolve().parents[2] / "shared" / "data" / "oxford_pets"
SHIPPED = REPO / "pipelines" / "models" / "maskrcnn-pets"


def _pets_dir() -> Path:
    if not (PETS / "images").is_dir():
        pytest.skip(f"shared data not available: {PETS}")
    return PETS


@pytest.fixture(scope="module")
def few_pets() -> list[PetInstance]:
    """Two cats and two dogs from the training split."""
    from pipelines.train import list_names, split_names

    train, _ = split_names(list_names(_pets_dir()))
    cats = [n for n in train if n[:1].isupper()][:2]
    dogs = [n for n in train if n[:1].islower()][:2]
    return load_pets(PETS, cats + dogs)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# --------------------------------------------------------------------------------------------- numpy data


def test_boxes_from_masks_are_tight_with_exclusive_max_and_match_coco():
    masks = np.zeros((3, 10, 12), bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 0, 0] = True  # one pixel
    boxes = boxes_from_masks(masks)
    np.testing.assert_array_equal(boxes[0], [2, 3, 5, 9])
    np.testing.assert_array_equal(boxes[1], [0, 0, 1, 1])
    np.testing.assert_array_equal(boxes[2], [0, 0, 0, 0])  # empty
    x, y, w, h = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(masks[0].astype(np.uint8))))
    np.testing.assert_allclose(boxes[0], [y, x, y + h, x + w])


def test_real_pets_mask_from_trimap_and_box_from_mask(few_pets):
    from PIL import Image

    assert [p.class_id for p in few_pets] == [1, 1, 2, 2]
    for pet in few_pets:
        trimap = np.asarray(Image.open(PETS / "trimaps" / f"{pet.name}.png"))
        assert pet.image.dtype == np.uint8 and pet.image.shape == (*trimap.shape, 3)
        np.testing.assert_array_equal(pet.mask, (trimap == 1) | (trimap == 3))
        # A pet photo is mostly pet, and its box covers the whole mask.
        assert 0.1 < pet.mask.mean() < 0.95
        y0, x0, y1, x1 = boxes_from_masks(pet.mask[None])[0].astype(int)
        assert pet.mask[y0:y1, x0:x1].sum() == pet.mask.sum()
        assert pet.mask[y0].any() and pet.mask[y1 - 1].any() and pet.mask[:, x0].any() and pet.mask[:, x1 - 1].any()


def test_letterbox_keeps_aspect_and_fills_with_mean(few_pets):
    pet = few_pets[0]
    img, m = letterbox(pet.image, pet.mask, 100, 60)
    assert img.shape == (100, 60, 3) and m.shape == (100, 60)
    h0, w0 = pet.mask.shape
    # The pet's share of its photo survives resizing (within resampling error).
    fit = min(100 / h0, 60 / w0)
    assert abs(m.sum() / (h0 * w0 * fit * fit) - pet.mask.mean()) < 0.03


@pytest.mark.parametrize("k", [2, 3, 4])
def test_mosaic_contains_several_disjoint_instances(few_pets, k):
    rng = np.random.default_rng(k)
    image, masks, classes = mosaic(few_pets[:k], 256, rng)
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    assert masks.shape == (k, 256, 256) and masks.dtype == bool
    np.testing.assert_array_equal(classes, [p.class_id for p in few_pets[:k]])
    assert masks.sum(axis=0).max() == 1  # no pixel belongs to two pets
    areas = masks.sum(axis=(1, 2))
    assert (areas > 0.05 * 256 * 256 / k).all(), areas
    boxes = boxes_from_masks(masks)
    # Each pet keeps its own box: boxes of different pets barely overlap (cells are disjoint).
    for i in range(k):
        for j in range(i + 1, k):
            yi0, xi0, yi1, xi1 = boxes[i]
            yj0, xj0, yj1, xj1 = boxes[j]
            inter = max(0, min(yi1, yj1) - max(yi0, yj0)) * max(0, min(xi1, xj1) - max(xi0, xj0))
            assert inter == 0


def test_mosaic_rejects_wrong_counts(few_pets):
    with pytest.raises(ValueError, match="2-4"):
        mosaic(few_pets[:1], 128, np.random.default_rng(0))


def test_copy_paste_occludes_and_drops_hidden_instances():
    rng = np.random.default_rng(0)
    image = np.zeros((64, 64, 3), np.uint8)
    masks = np.zeros((2, 64, 64), bool)
    masks[0, :, :] = True  # a big pet, partly covered by the paste
    masks[1, 30:32, 30:32] = True  # a tiny one
    pet_img = np.full((40, 40, 3), 200, np.uint8)
    pet_mask = np.zeros((40, 40), bool)
    pet_mask[5:35, 5:35] = True
    pasted_pet = PetInstance("p", pet_img, pet_mask, 2)
    out, m, c = copy_paste(image, masks, np.array([1, 1]), pasted_pet, rng)
    assert m.shape[0] == len(c) and c[-1] == 2
    new = m[-1]
    assert new.any() and (out[new] == 200).all() and (out[~new] == 0).all()
    assert not (m[:-1] & new).any()  # earlier masks lose the covered pixels
    assert m[0].sum() == 64 * 64 - new.sum()
    # The tiny pet is either fully visible or dropped, never kept mostly hidden.
    if len(c) == 3:
        assert m[1].sum() >= 0.3 * 4


def test_sample_generator_yields_parser_ready_samples(few_pets):
    gen = SampleGenerator(few_pets, 128, mosaic_prob=1.0, copy_paste_prob=1.0, max_instances=8, seed=1)
    it = iter(gen)
    for _ in range(5):
        s = next(it)
        n = len(s["groundtruth_classes"])
        assert n >= 2  # a mosaic has several pets (paste may hide one, and adds one)
        h, w = s["image"].shape[:2]
        assert s["groundtruth_instance_masks"].shape == (n, h, w)
        assert s["groundtruth_boxes"].shape == (n, 4)
        assert (s["groundtruth_boxes"] >= 0).all() and (s["groundtruth_boxes"] <= 1).all()
        expect = boxes_from_masks(s["groundtruth_instance_masks"] > 0.5) / np.array([h, w, h, w])
        np.testing.assert_allclose(s["groundtruth_boxes"], expect, atol=1e-6)
        assert set(s["groundtruth_classes"].tolist()) <= {1, 2}


def test_training_split_is_the_unet_split():
    from pipelines.maskrcnn import _split
    from pipelines.train import list_names, split_names

    train, val = _split(_pets_dir(), 0.15)
    assert (train, val) == split_names(list_names(PETS), 0.15)
    assert val and not set(train) & set(val)


# --------------------------------------------------------------------------------------------- Model Garden


def test_parser_labels_follow_the_resized_image_not_the_canvas(few_pets):
    """A 128 x 64 sample on a 128 canvas: the resized image is 128 x 64 (image_info[0] * image_info[2]);
    image_info[1] is the 128 x 128 canvas. Ground truth boxes must scale by image_info[2] only."""
    pytest.importorskip("official")
    from official.vision.dataloaders import maskrcnn_input

    from pipelines.maskrcnn import build_task_config

    cfg = MaskRCNNConfig(data_dir=str(PETS), out="unused", size=128)
    m = build_task_config(cfg).model
    parser = maskrcnn_input.Parser(
        output_size=[128, 128], min_level=m.min_level, max_level=m.max_level, num_scales=m.anchor.num_scales,
        aspect_ratios=m.anchor.aspect_ratios, anchor_size=m.anchor.anchor_size, max_num_instances=4,
        include_mask=True, mask_crop_size=28)
    pet = few_pets[0]
    image, mask = letterbox(pet.image, pet.mask, 256, 128)
    boxes = boxes_from_masks(mask[None]) / np.array([256, 128, 256, 128], np.float32)
    _, labels = parser._parse_train_data({
        "image": image, "groundtruth_boxes": boxes, "groundtruth_classes": np.array([1], np.int64),
        "groundtruth_instance_masks": mask[None].astype(np.float32),
        "groundtruth_is_crowd": np.zeros(1, bool)})
    info = labels["image_info"].numpy()
    np.testing.assert_allclose(info[0], [256, 128])
    np.testing.assert_allclose(info[1], [128, 128])
    np.testing.assert_allclose(info[2], [0.5, 0.5])
    np.testing.assert_allclose(labels["gt_boxes"].numpy()[0], boxes_from_masks(mask[None])[0] * 0.5, atol=0.01)
    assert labels["gt_classes"].numpy().tolist() == [1, -1, -1, -1]
    # The box-cropped mask target is mostly pet.
    assert labels["gt_masks"].numpy()[0].mean() > 0.4


@pytest.mark.slow
def test_tiny_model_trains_exports_od_api_signature_and_loads_through_runtime(tmp_path, few_pets):
    pytest.importorskip("official")
    import tensorflow as tf

    from pipelines.instances import detect_image, load_instance_model
    from pipelines.maskrcnn import export_run, train_maskrcnn
    from pipelines.spec import ModelSpec

    cfg = MaskRCNNConfig(data_dir=str(_pets_dir()), out=str(tmp_path / "run"), size=128, steps=2, batch_size=1,
                         fpn_filters=16, head_filters=16, fc_dims=32, log_every=1, checkpoint_every=1)
    # Eager steps: tracing the training graph costs minutes of CPU, two eager steps a few seconds.
    tf.config.run_functions_eagerly(True)
    try:
        run = train_maskrcnn(cfg)
    finally:
        tf.config.run_functions_eagerly(False)
    rows = (run / "history.csv").read_text().splitlines()
    assert len(rows) == 3 and all(np.isfinite(float(v)) for v in rows[-1].split(",")[2:])
    report = export_run(run, tmp_path / "model", name="tiny-pets", evaluate=False, bn_batches=2)
    assert report["steps"] == 2

    sig = tf.saved_model.load(str(tmp_path / "model" / "saved_model")).signatures["serving_default"]
    _, kwargs = sig.structured_input_signature
    spec = kwargs["input_tensor"]
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [1, None, None, 3]
    out = sig(input_tensor=tf.convert_to_tensor(few_pets[2].image[None]))
    assert {"detection_boxes", "detection_classes", "detection_scores", "num_detections",
            "detection_masks"} <= set(out)
    n = out["detection_scores"].shape[1]
    assert out["detection_boxes"].shape == (1, n, 4) and out["detection_classes"].shape == (1, n)
    assert out["num_detections"].shape == (1,) and out["detection_masks"].shape[:2] == (1, n)
    assert out["detection_classes"].dtype == tf.float32
    b = out["detection_boxes"].numpy()
    assert (b >= 0).all() and (b <= 1).all()
    assert set(np.unique(out["detection_classes"].numpy()[0, : int(out["num_detections"][0])])) <= {1.0, 2.0}

    model = load_instance_model(ModelSpec.from_file(tmp_path / "model" / "spec.json"))
    found = detect_image(model, few_pets[0].image, score_threshold=0.0)
    h, w = few_pets[0].mask.shape
    assert all(i.class_id in (1, 2) and i.rle["size"] == [h, w] for i in found)

    # A new run can start from the export: same weights, variable by variable; another architecture is refused.
    from official.vision.tasks.maskrcnn import MaskRCNNTask

    from pipelines.maskrcnn import build_task_config, load_exported_weights, restore_model

    trained, _ = restore_model(run)
    fresh = MaskRCNNTask(build_task_config(cfg)).build_model()
    pairs = list(zip(fresh.variables, trained.variables, strict=True))
    assert any(not np.array_equal(a.numpy(), b.numpy()) for a, b in pairs)
    assert load_exported_weights(fresh, tmp_path / "model") == len(fresh.variables)
    trainable = {id(v) for v in trained.trainable_variables}
    for a, b in pairs:
        if id(b) in trainable:  # BN moving statistics were recalibrated before the export
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    wider = MaskRCNNTask(build_task_config(replace(cfg, fc_dims=64))).build_model()
    with pytest.raises(ValueError, match="shape"):
        load_exported_weights(wider, tmp_path / "model")


def test_serving_normalises_like_the_training_parser(few_pets):
    """The exported graph must feed the network what the training parser fed it: uint8 scaled to [0, 1],
    then the ImageNet mean/std. (A cast to float before ``normalize_image`` once fed 255x that range and
    made every export look untrained.)"""
    pytest.importorskip("official")
    import tensorflow as tf
    from official.vision.dataloaders import maskrcnn_input

    from pipelines.maskrcnn import serving_preprocess

    image, mask = letterbox(few_pets[0].image, few_pets[0].mask, 128, 128)
    parser = maskrcnn_input.Parser(output_size=[128, 128], min_level=3, max_level=6, num_scales=1,
                                   aspect_ratios=[1.0], anchor_size=3.0, aug_rand_hflip=False, aug_scale_min=1.0,
                                   aug_scale_max=1.0, include_mask=True, mask_crop_size=28, dtype="float32")
    trained_on, _ = parser._parse_train_data({
        "image": tf.constant(image), "groundtruth_boxes": tf.constant([[0.1, 0.1, 0.9, 0.9]], tf.float32),
        "groundtruth_classes": tf.constant([1], tf.int64),
        "groundtruth_instance_masks": tf.constant(mask[None].astype(np.float32)),
        "groundtruth_is_crowd": tf.constant([False])})
    served, info = serving_preprocess(tf.constant(image), 128)
    assert float(tf.reduce_max(tf.abs(served))) < 3.0
    np.testing.assert_allclose(served.numpy(), trained_on.numpy(), atol=1e-5)
    assert info.numpy()[:2].tolist() == [[128.0, 128.0], [128.0, 128.0]]


# --------------------------------------------------------------------------------------------- shipped model


def test_shipped_model_finds_the_pet_on_a_held_out_photo():
    """Plain TensorFlow: no tf-models-official needed to run the exported model."""
    if not (SHIPPED / "saved_model" / "saved_model.pb").is_file():
        pytest.skip("maskrcnn-pets weights are not shipped in this checkout")
    from pipelines.instance_eval import list_pet_samples
    from pipelines.instances import detect_image, load_instance_model, rle_decode
    from pipelines.spec import ModelSpec
    from pipelines.train import list_names, split_names

    spec = ModelSpec.from_file(SHIPPED / "spec.json")
    assert spec.kind == "instance" and {c.id: c.name for c in spec.classes} == {1: "cat", 2: "dog"}
    model = load_instance_model(spec)
    _, val = split_names(list_names(_pets_dir()))
    hits = 0
    samples = list_pet_samples(PETS, val[:6])
    for s in samples:
        pet = load_pets(PETS, [s.name])[0]
        found = detect_image(model, pet.image, score_threshold=0.05)
        if found:
            best = max(found, key=lambda i: _iou(rle_decode(i.rle).astype(bool), pet.mask))
            hits += _iou(rle_decode(best.rle).astype(bool), pet.mask) >= 0.5
    assert hits >= len(samples) // 2, f"pet found (mask IoU >= 0.5) on {hits} of {len(samples)} held-out photos"


def test_extra_training_folders_add_pets_but_never_validation_names(tmp_path):
    from PIL import Image

    from pipelines.maskrcnn import training_pets
    from pipelines.train import list_names, split_names

    pets = _pets_dir()
    train, val = split_names(list_names(pets))
    data = tmp_path / "data"
    for sub in ("images", "trimaps", "annotations"):
        (data / sub).mkdir(parents=True)
    for n in train[:3] + val[:1]:
        (data / "images" / f"{n}.jpg").symlink_to(pets / "images" / f"{n}.jpg")
        (data / "trimaps" / f"{n}.png").symlink_to(pets / "trimaps" / f"{n}.png")
    (data / "annotations" / "trainval.txt").write_text("".join(f"{n} 1 1 1\n" for n in train[:3] + val[:1]))
    extra = tmp_path / "extra"
    for sub in ("images", "trimaps", "annotations"):
        (extra / sub).mkdir(parents=True)
    mask = np.full((40, 50), 2, np.uint8)
    mask[10:30, 10:40] = 1
    for n in ("pomeranian_4", val[0]):  # a new photo, and a leaked validation name
        Image.fromarray(np.full((40, 50, 3), 100, np.uint8)).save(extra / "images" / f"{n}.jpg")
        Image.fromarray(mask).save(extra / "trimaps" / f"{n}.png")
    (extra / "annotations" / "trainval.txt").write_text(f"pomeranian_4 25 2 19\n{val[0]} 1 1 1\n")
    cfg = MaskRCNNConfig(data_dir=str(data), out=str(tmp_path / "run"), val_fraction=0.15,
                         extra_train=[str(extra)])
    got = training_pets(cfg)
    names = [p.name for p in got]
    assert sorted(names) == sorted(train[:3] + ["pomeranian_4"])
    new = got[names.index("pomeranian_4")]
    assert new.class_id == 2 and new.mask.sum() == 20 * 30
