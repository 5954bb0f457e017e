"""Flip test-time augmentation for instance models: un-mirroring, mask resampling, class-aware fusion."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.instances import (
    Detections,
    Detector,
    _to_box,
    detect_image,
    fuse_detections,
    load_instance_model,
    rle_decode,
    unflip_detections,
)
from pipelines.spec import ModelSpec


def _det(boxes, classes, scores, masks=None) -> Detections:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    masks = np.ones((len(boxes), 8, 8), np.float32) if masks is None else np.asarray(masks, np.float32)
    return Detections(boxes, np.asarray(classes, np.int32), np.asarray(scores, np.float32), masks)


def test_unflip_mirrors_boxes_and_masks():
    mask = np.zeros((8, 8), np.float32)
    mask[:, :2] = 1.0  # left edge of the box in the mirrored image = right edge in the original
    det = _det([[0.1, 0.2, 0.5, 0.3]], [1], [0.9], mask[None])
    back = unflip_detections(det)
    np.testing.assert_allclose(back.boxes, [[0.1, 0.7, 0.5, 0.8]], atol=1e-6)
    assert back.masks[0][:, 6:].all() and not back.masks[0][:, :6].any()
    again = unflip_detections(back)
    np.testing.assert_allclose(again.boxes, det.boxes, atol=1e-6)
    np.testing.assert_array_equal(again.masks, det.masks)
    empty = unflip_detections(_det(np.zeros((0, 4)), [], [], np.zeros((0, 8, 8))))
    assert empty.boxes.shape == (0, 4)


def test_mask_resampled_into_another_box_stays_where_it_was_in_the_image():
    m = 16
    mask = np.zeros((m, m), np.float32)
    mask[:, : m // 2] = 1.0  # left half of the unit box
    np.testing.assert_allclose(_to_box(mask, np.array([0, 0, 1, 1.0]), np.array([0, 0, 1, 1.0])), mask, atol=1e-6)
    # the left half of the unit box is all of the box [0, 0, 1, 0.5]: every sample is inside it
    left = _to_box(mask, np.array([0, 0, 1, 1.0]), np.array([0, 0, 1, 0.5]))
    assert left[:, :-1].min() > 0.99
    # a box reaching beyond the source box samples zeros there
    wide = _to_box(np.ones((m, m), np.float32), np.array([0, 0, 1, 0.5]), np.array([0, 0, 1, 1.0]))
    assert wide[:, : m // 2 - 1].min() > 0.99 and wide[:, m // 2 + 1 :].max() == 0.0


def test_fusion_pairs_same_class_boxes_and_halves_unconfirmed_ones():
    a = _det([[0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]], [1, 2], [0.8, 0.6])
    b = _det([[0.12, 0.1, 0.52, 0.5], [0.0, 0.7, 0.2, 0.95]], [1, 1], [0.6, 0.4])
    f = fuse_detections(a, b)
    np.testing.assert_allclose(f.scores, [0.7, 0.3, 0.2], atol=1e-6)
    np.testing.assert_array_equal(f.classes, [1, 2, 1])
    # score-weighted mean box of the pair
    np.testing.assert_allclose(f.boxes[0], (0.8 * a.boxes[0] + 0.6 * b.boxes[0]) / 1.4, atol=1e-6)
    np.testing.assert_allclose(f.boxes[1], a.boxes[1])
    np.testing.assert_allclose(f.boxes[2], b.boxes[1])
    assert f.masks.shape == (3, 8, 8)


def test_fusion_is_class_aware_and_one_to_one():
    box = [0.1, 0.1, 0.5, 0.5]
    f = fuse_detections(_det([box], [1], [0.8]), _det([box], [2], [0.8]))
    assert sorted(f.classes.tolist()) == [1, 2] and np.allclose(f.scores, 0.4)
    # two detections of a cannot both take b's single match
    f = fuse_detections(_det([box, box], [1, 1], [0.9, 0.5]), _det([box], [1], [0.7]))
    np.testing.assert_allclose(f.scores, [0.8, 0.25], atol=1e-6)
    # one pass empty: the other's detections, unconfirmed
    f = fuse_detections(_det(np.zeros((0, 4)), [], [], np.zeros((0, 8, 8))), _det([box], [1], [0.6]))
    np.testing.assert_allclose(f.scores, [0.3], atol=1e-6)


def test_paired_masks_average_after_resampling():
    # the same object seen with slightly different boxes: masks full of ones in their own boxes average to
    # ones inside the intersection and to 0.5 where only one box reaches
    a = _det([[0.0, 0.0, 1.0, 1.0]], [1], [0.5], np.ones((1, 20, 20)))
    b = _det([[0.0, 0.0, 1.0, 0.8]], [1], [0.5], np.ones((1, 20, 20)))
    f = fuse_detections(a, b)
    np.testing.assert_allclose(f.boxes[0], [0, 0, 1, 0.9], atol=1e-6)
    assert f.masks[0][:, :16].min() > 0.99
    np.testing.assert_allclose(f.masks[0][:, -1], 0.5, atol=1e-6)


tf = pytest.importorskip("tensorflow")


def test_flip_tta_through_a_saved_model(tmp_path_factory):
    from tests.test_instances import GREEN, RED, _match
    from tests.test_instances_blobmodel import blob_image, blob_masks, blob_model_dir

    src = str(blob_model_dir(tmp_path_factory))
    spec = ModelSpec(name="blobs", kind="instance", source=src, source_format="savedmodel",
                     classes=[{"id": 1, "name": "red"}, {"id": 2, "name": "green"}], input_size=128,
                     score_threshold=0.3, tta="flip")
    model = load_instance_model(spec)
    assert isinstance(model.raw, Detector) and model.raw.tta
    blobs = [("rect", 8, 10, 40, 50, RED), ("disk", 70, 90, 15, GREEN)]
    img = blob_image(110, 130, blobs)
    calls = []
    once = model.raw._once
    model.raw._once = lambda image: calls.append(image.copy()) or once(image)
    found = detect_image(model, img)
    # the spec's tta runs the model on the photo and on its mirror
    assert len(calls) == 2
    assert sorted(np.array_equal(c, img[:, ::-1]) + 2 * np.array_equal(c, img) for c in calls) == [1, 2]
    plain = detect_image(model, img, tta=False)
    assert len(calls) == 3
    # this detector finds the same blobs in the mirror, so fusion gives the same objects and scores
    assert [i.class_id for i in found] == [i.class_id for i in plain] == [1, 2]
    np.testing.assert_allclose([i.score for i in found], [i.score for i in plain], atol=1e-5)
    assert min(_match(found, blob_masks(110, 130, blobs))) > 0.9
    for f, p in zip(found, plain, strict=True):
        a, b = rle_decode(f.rle).astype(bool), rle_decode(p.rle).astype(bool)
        assert (a & b).sum() / (a | b).sum() > 0.95
