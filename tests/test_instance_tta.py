"""Flip test-time augmentation for instance models: un-mirroring, mask resampling, class-aware fusion."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.instances import (
    Detections,
    Detector,
    _to_box,
    box_areas,
    detect_image,
    fuse_detections,
    fuse_views,
    load_instance_model,
    rle_decode,
    unflip_detections,
    unzoom_detections,
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


def test_fuse_views_groups_k_views_and_ranks_by_how_many_found_it():
    box = [0.1, 0.1, 0.5, 0.5]
    views = [_det([box, [0.6, 0.6, 0.9, 0.9]], [1, 2], [0.9, 0.6]),
             _det([[0.1, 0.12, 0.5, 0.52]], [1], [0.6]),
             _det([box, [0.0, 0.0, 0.2, 0.2]], [1, 1], [0.3, 0.9])]
    f = fuse_views(views)
    # found by all three: (0.9 + 0.6 + 0.3) / 3; the others by one view each: score / 3
    np.testing.assert_allclose(f.scores, [0.6, 0.3, 0.2], atol=1e-6)
    np.testing.assert_array_equal(f.classes, [1, 1, 2])
    expected = (0.9 * views[0].boxes[0] + 0.6 * views[1].boxes[0] + 0.3 * views[2].boxes[0]) / 1.8
    np.testing.assert_allclose(f.boxes[0], expected, atol=1e-6)
    np.testing.assert_allclose(f.boxes[1], views[2].boxes[1])
    assert f.masks.shape == (3, 8, 8)
    # two views: the pairwise fusion
    a, b = views[0], views[2]
    g, h = fuse_views([a, b]), fuse_detections(a, b)
    np.testing.assert_array_equal(g.classes, h.classes)
    np.testing.assert_allclose(g.scores, h.scores)
    with pytest.raises(ValueError):
        fuse_views([])


def test_unzoom_maps_boxes_of_the_padded_image_back():
    h, w, py, px = 100, 60, 10, 6
    # a box in pixels of the original image, seen in the padded one
    y0, x0, y1, x1 = 20.0, 5.0, 90.0, 60.0
    padded = np.array([[(y0 + py) / (h + 2 * py), (x0 + px) / (w + 2 * px),
                        (y1 + py) / (h + 2 * py), (x1 + px) / (w + 2 * px)]], np.float32)
    back = unzoom_detections(_det(padded, [1], [0.5]), py, px, h, w)
    np.testing.assert_allclose(back.boxes, [[y0 / h, x0 / w, y1 / h, x1 / w]], atol=1e-6)
    np.testing.assert_allclose(box_areas(back.boxes), [(y1 - y0) / h * (x1 - x0) / w], atol=1e-6)


class _ZoomOnlyDetector:
    """Finds two objects, a large and a small one, only in images with a black border (zoomed-out views),
    at fixed places of the original image; nothing in the photo itself or its mirror."""

    def __init__(self, h: int, w: int, frac: float) -> None:
        self.py, self.px = round(frac * h), round(frac * w)
        self.h, self.w = h, w
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        img = np.asarray(x)[0]
        boxes = np.zeros((1, 2, 4), np.float32)
        if img[0, 0].any():  # no border: the photo or its mirror
            return {"detection_boxes": boxes, "detection_scores": np.zeros((1, 2), np.float32),
                    "detection_classes": np.ones((1, 2), np.float32), "num_detections": np.array([0.0])}
        hp, wp = self.h + 2 * self.py, self.w + 2 * self.px
        for k, (y0, x0, y1, x1) in enumerate([(0, 0, 80, 60), (0, 0, 10, 10)]):  # 0.6 and 0.012 of the photo
            boxes[0, k] = [(y0 + self.py) / hp, (x0 + self.px) / wp, (y1 + self.py) / hp, (x1 + self.px) / wp]
        if not np.array_equal(img[self.py + 1, self.px + 1], [200, 200, 200]):  # the mirror: un-mirror later
            boxes[0, :, [1, 3]] = 1.0 - boxes[0, :, [3, 1]]
        return {"detection_boxes": boxes, "detection_scores": np.full((1, 2), 0.8, np.float32),
                "detection_classes": np.array([[1.0, 2.0]], np.float32), "num_detections": np.array([2.0])}


def test_zoom_out_views_count_only_for_objects_covering_the_minimum_area():
    h, w = 100, 100
    img = np.full((h, w, 3), 50, np.uint8)
    img[1, 1] = 200  # marks the un-mirrored photo's top-left corner
    fake = _ZoomOnlyDetector(h, w, 0.1)
    det = Detector(fake, "fake", tta=True, zoom_out=(0.1,), zoom_min_area=0.25)(img)
    assert fake.calls == 4
    # the large object, found by the two zoomed views out of four; the small one is outside their range
    np.testing.assert_array_equal(det.classes, [1])
    np.testing.assert_allclose(det.scores, [0.8 * 2 / 4], atol=1e-6)
    np.testing.assert_allclose(det.boxes, [[0.0, 0.0, 0.8, 0.6]], atol=1e-6)
    every = Detector(_ZoomOnlyDetector(h, w, 0.1), "fake", tta=True, zoom_out=(0.1,), zoom_min_area=0.0)(img)
    assert sorted(every.classes.tolist()) == [1, 2]
    assert len(Detector(_ZoomOnlyDetector(h, w, 0.1), "fake", tta=True)(img).scores) == 0


def test_tta_zoom_out_is_checked_in_the_spec():
    classes = [{"id": 1, "name": "a"}]
    with pytest.raises(ValueError, match="instance models with tta 'flip'"):
        ModelSpec(name="d", kind="instance", source="x", classes=classes, tta="none", tta_zoom_out=[0.1])
    with pytest.raises(ValueError, match="instance models with tta 'flip'"):
        ModelSpec(name="s", kind="semantic", source="x", classes=classes, tta="flip", tta_zoom_out=[0.1])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ModelSpec(name="d", kind="instance", source="x", classes=classes, tta="flip", tta_zoom_out=[0.0])


def test_zoom_out_tta_through_a_saved_model(tmp_path_factory):
    from tests.test_instances import GREEN, RED, _match
    from tests.test_instances_blobmodel import blob_image, blob_masks, blob_model_dir

    src = str(blob_model_dir(tmp_path_factory))
    spec = ModelSpec(name="blobs", kind="instance", source=src, source_format="savedmodel",
                     classes=[{"id": 1, "name": "red"}, {"id": 2, "name": "green"}], input_size=128,
                     score_threshold=0.3, tta="flip", tta_zoom_out=[0.1], tta_zoom_min_area=0.2)
    model = load_instance_model(spec)
    assert model.raw.zoom_out == (0.1,) and model.raw.zoom_min_area == 0.2
    # one large rectangle (about 0.4 of the photo) and one small disk (about 0.05)
    blobs = [("rect", 8, 10, 80, 70, RED), ("disk", 80, 105, 12, GREEN)]
    img = blob_image(110, 130, blobs)
    calls = []
    once = model.raw._once
    model.raw._once = lambda image: calls.append(image.shape) or once(image)
    found = detect_image(model, img)
    assert calls == [(110, 130, 3)] * 2 + [(132, 156, 3)] * 2  # photo, mirror, padded photo, padded mirror
    assert [i.class_id for i in found] == [1, 2]
    assert min(_match(found, blob_masks(110, 130, blobs))) > 0.9
    plain = detect_image(model, img, tta=False)
    assert len(calls) == 5 and [i.class_id for i in plain] == [1, 2]
