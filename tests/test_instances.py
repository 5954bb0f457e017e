"""Instance runtime: reframing, RLE, thresholds, tiled detection with merging across seams, figures."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from adapters.base import Item, ItemInfo, Window
from pipelines import registry
from pipelines.instances import (
    Detections,
    Detector,
    Instance,
    _rle_from_crop,
    coco_labels,
    detect_image,
    detect_item,
    detections_to_instances,
    instance_figures,
    load_instance_model,
    merge_instances,
    reframe_box_masks_to_image_masks,
    rle_area,
    rle_decode,
    shrink_to_fit,
    tile_windows,
    to_coco_results,
    to_uint8_rgb,
)
from pipelines.spec import ModelSpec
from tests.test_instances_blobmodel import blob_image, blob_masks, blob_model_dir

tf = pytest.importorskip("tensorflow")

RED, GREEN = (240, 40, 40), (40, 200, 40)


class ArrayItem(Item):
    """An in-memory item: ``(C, H, W)`` pixels, optional ``(H, W) bool`` valid mask."""

    def __init__(self, pixels: np.ndarray, valid: np.ndarray | None = None):
        self.key = ""
        self.pixels = pixels
        self.valid = valid
        self.reads: list[Window] = []
        c, h, w = pixels.shape
        self.info = ItemInfo(height=h, width=w, bands=c, dtype=str(pixels.dtype), modality="photo")

    def read(self, window: Window | None = None) -> np.ndarray:
        if window is None:
            return self.pixels
        self.reads.append(window)
        r, c = int(window.row_off), int(window.col_off)
        return self.pixels[:, r : r + int(window.height), c : c + int(window.width)]

    def valid_mask(self, window: Window | None = None) -> np.ndarray | None:
        if self.valid is None or window is None:
            return self.valid
        r, c = int(window.row_off), int(window.col_off)
        return self.valid[r : r + int(window.height), c : c + int(window.width)]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> registry.LoadedModel:
    d = tmp_path_factory.mktemp("spec")
    spec = ModelSpec(
        name="blobs", kind="instance", source=str(blob_model_dir(tmp_path_factory)), source_format="savedmodel",
        classes=[{"id": 1, "name": "red"}, {"id": 2, "name": "green"}], input_size=128, overlap=32,
        score_threshold=0.3, max_detections=20,
    )
    spec.to_file(d / "spec.json")
    return load_instance_model(ModelSpec.from_file(d / "spec.json"))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _match(instances: list[Instance], truth: list[np.ndarray]) -> list[float]:
    """Best IoU of each truth mask among the instances."""
    masks = [rle_decode(i.rle) for i in instances]
    return [max((_iou(m, t) for m in masks), default=0.0) for t in truth]


# ---------------------------------------------------------------------------------------------- reframing

def test_box_mask_of_ones_fills_exactly_its_box():
    boxes = np.array([[0.2, 0.3, 0.5, 0.7], [0.0, 0.0, 1.0, 1.0], [0.9, 0.95, 1.0, 1.0]], np.float32)
    out = reframe_box_masks_to_image_masks(np.ones((3, 33, 33), np.float32), boxes, 101, 101)
    expected = np.zeros((3, 101, 101), bool)
    expected[0, 20:51, 30:71] = True  # pixel i sits at i / (H - 1): rows 20..50, cols 30..70
    expected[1] = True
    expected[2, 90:, 95:] = True
    np.testing.assert_array_equal(out > 0.5, expected)


def test_reframe_matches_tf_crop_and_resize():
    rng = np.random.default_rng(0)
    masks = rng.random((6, 28, 28)).astype(np.float32)
    lo = rng.uniform(0.0, 0.6, (6, 2))
    boxes = np.concatenate([lo, lo + rng.uniform(0.05, 0.4, (6, 2))], axis=1)[:, [0, 1, 2, 3]].astype(np.float32)
    h, w = 57, 83
    ymin, xmin, ymax, xmax = boxes.T
    bh, bw = ymax - ymin, xmax - xmin
    corners = np.stack([-ymin / bh, -xmin / bw, (1 - ymin) / bh, (1 - xmin) / bw], axis=1)  # OD API formula
    ref = tf.image.crop_and_resize(masks[..., None], corners, tf.range(6), [h, w], extrapolation_value=0)
    np.testing.assert_allclose(reframe_box_masks_to_image_masks(masks, boxes, h, w), ref.numpy()[..., 0],
                               atol=1e-4)


# ---------------------------------------------------------------------------------------------------- RLE

@pytest.mark.parametrize("shape,y0,x0,h,w", [((7, 9), 3, 4, 20, 30), ((20, 5), 0, 2, 20, 10),
                                              ((1, 1), 0, 0, 1, 1), ((4, 30), 16, 0, 20, 30)])
def test_crop_rle_equals_pycocotools_encode_and_round_trips(shape, y0, x0, h, w):
    rng = np.random.default_rng(1)
    crop = rng.random(shape) > 0.4
    crop[0, 0] = True
    full = np.zeros((h, w), bool)
    full[y0 : y0 + shape[0], x0 : x0 + shape[1]] = crop
    rle = _rle_from_crop(crop, y0, x0, h, w)
    ref = mask_utils.encode(np.asfortranarray(full.astype(np.uint8)))
    assert isinstance(rle["counts"], str)
    assert rle["counts"] == ref["counts"].decode()
    np.testing.assert_array_equal(rle_decode(rle), full)
    assert rle_area(rle) == full.sum()


def test_full_height_runs_join_across_columns():
    crop = np.ones((10, 3), bool)  # spans the full image height: one run over three columns
    rle = _rle_from_crop(crop, 0, 2, 10, 6)
    np.testing.assert_array_equal(mask_utils.decode({"size": [10, 6], "counts": rle["counts"].encode()}),
                                  np.pad(np.ones((10, 3), np.uint8), ((0, 0), (2, 1))))


# --------------------------------------------------------------------------------------- post-processing

def _fake_detections(n: int) -> Detections:
    boxes = np.array([[0.1 * i / n, 0.1, 0.1 * i / n + 0.2, 0.4] for i in range(n)], np.float32)
    return Detections(boxes=boxes, classes=np.arange(1, n + 1, dtype=np.int32),
                      scores=np.linspace(0.2, 0.9, n).astype(np.float32)[::-1].copy(),
                      masks=np.ones((n, 15, 15), np.float32))


def test_score_threshold_and_max_detections():
    det = _fake_detections(8)
    all_ = detections_to_instances(det, 50, 60, score_threshold=0.0, max_detections=100)
    assert len(all_) == 8
    above = detections_to_instances(det, 50, 60, score_threshold=0.5, max_detections=100)
    assert [i.score for i in above] == [float(s) for s in det.scores if s >= 0.5]
    top3 = detections_to_instances(det, 50, 60, score_threshold=0.0, max_detections=3)
    assert [i.class_id for i in top3] == [1, 2, 3]
    inst = all_[0]
    assert inst.rle["size"] == [50, 60]
    np.testing.assert_allclose(inst.box, (0.1 * 60, 0.0, 0.3 * 60, 0.2 * 50), atol=1e-4)
    assert inst.area == rle_area(inst.rle) == rle_decode(inst.rle).sum()


def test_box_only_detector_uses_the_box_as_mask():
    det = _fake_detections(1)
    det.masks = None
    (inst,) = detections_to_instances(det, 101, 101, score_threshold=0.0)
    m = rle_decode(inst.rle)
    assert m[0:21, 10:41].all() and m.sum() == 21 * 31


def test_detect_image_through_saved_model(model):
    blobs = [("rect", 8, 10, 40, 50, RED), ("disk", 70, 90, 15, GREEN), ("rect", 80, 10, 90, 20, (90, 140, 60))]
    img = blob_image(110, 130, blobs)
    truth = blob_masks(110, 130, blobs)
    found = detect_image(model, img)
    assert [i.class_id for i in found] == [1, 2, 2]
    assert [i.score for i in found] == sorted((i.score for i in found), reverse=True)
    assert min(_match(found, truth)) > 0.9
    np.testing.assert_allclose(found[0].box, (10, 8, 40, 32), atol=0.5)
    # thresholds are honoured end to end: the dim third blob (score 140/255) drops out at 0.6
    assert len(detect_image(model, img, score_threshold=0.6)) == 2
    assert len(detect_image(model, img, max_detections=1)) == 1
    with pytest.raises(TypeError):
        model.predict(np.zeros((1, 8, 8, 3), np.float32))


def test_shrink_to_fit_keeps_aspect_and_averages_fine_detail():
    board = (np.indices((600, 300)).sum(0) % 2 * 200).astype(np.uint8)
    img = np.repeat(board[..., None], 3, axis=2)
    small = shrink_to_fit(img, 256)
    assert small.shape == (256, 128, 3) and small.dtype == np.uint8
    assert np.abs(small.astype(int) - 100).max() <= 3  # an even grey, not a sampled pattern
    assert shrink_to_fit(img, None) is img and shrink_to_fit(img, 600) is img


def test_detector_size_shrinks_large_views_before_the_graph(model, tmp_path):
    """A photo 4x the detector's size: with ``detector_size`` the graph sees it at most that large and
    antialiased, so a 1-px bright/black texture averages to a dim grey instead of becoming an object; boxes
    and masks still land on the large photo's pixels."""
    blobs = [("rect", 8, 10, 40, 50, RED), ("disk", 70, 90, 15, GREEN)]
    small = blob_image(110, 130, blobs)
    big = np.kron(small, np.ones((4, 4, 1), np.uint8))
    big[300:420, 20:200] = (np.indices((120, 180)).sum(0) % 2 * 220)[..., None].astype(np.uint8)
    truth = [np.kron(m, np.ones((4, 4), bool)) for m in blob_masks(110, 130, blobs)]
    seen = []

    def graph(x):
        seen.append(tuple(x.shape))
        return model.raw._sig(input_tensor=x)

    plain = Detector(graph, "rec")(big)
    assert seen[-1] == (1, 440, 520, 3) and len(plain.scores) == 3  # the texture is found as an object
    shrunk = Detector(graph, "rec", max_side=130)(big)
    assert seen[-1] == (1, 110, 130, 3)
    assert sorted(shrunk.classes.tolist()) == [1, 2]

    spec = model.spec.model_validate({**model.spec.model_dump(), "detector_size": 130})
    found = detect_image(load_instance_model(spec), big)
    assert [i.class_id for i in found] == [1, 2]
    assert min(_match(found, truth)) > 0.9
    np.testing.assert_allclose(found[0].box, 4 * np.asarray(detect_image(model, small)[0].box), atol=4)
    with pytest.raises(ValueError):
        ModelSpec.model_validate({**model.spec.model_dump(), "detector_size": 4})


# ------------------------------------------------------------------------------------------------ tiling

def test_tile_windows_cover_with_overlap():
    wins = tile_windows(300, 250, 128, 32)
    cover = np.zeros((300, 250), int)
    for w in wins:
        assert (w.width, w.height) == (128, 128)
        cover[int(w.row_off) : int(w.row_off) + 128, int(w.col_off) : int(w.col_off) + 128] += 1
    assert cover.min() >= 1
    assert tile_windows(100, 90, 128, 32) == [Window(0, 0, 90, 100)]
    with pytest.raises(ValueError):
        tile_windows(100, 100, 32, 32)


# Tiles of 128 with overlap 32 on 300 px: starts 0, 96, 172 -> seams (tile edges) at 96, 128, 172, 224.
SEAM_BLOBS = [
    ("rect", 20, 60, 60, 160, RED),          # 100 px wide, across two column seams
    ("disk", 128, 128, 30, GREEN),           # on a four-tile corner
    ("rect", 180, 110, 290, 140, RED),       # tall, across row seams
    ("disk", 250, 40, 6, GREEN),             # small, fully inside an overlap band -> duplicates
    ("rect", 210, 200, 232, 299, GREEN),     # to the item edge, across the last column seam
]


def test_tiled_detection_merges_objects_across_seams(model):
    truth = blob_masks(300, 300, SEAM_BLOBS)
    item = ArrayItem(np.moveaxis(blob_image(300, 300, SEAM_BLOBS), -1, 0))
    tiled = detect_item(item, model)  # tile/overlap from the spec: 128 / 32
    assert len(item.reads) == 9
    whole = detect_item(item, model, tile=0)
    assert len(whole) == len(SEAM_BLOBS)
    assert len(tiled) == len(SEAM_BLOBS)
    assert min(_match(tiled, truth)) > 0.95
    unmerged = detect_item(item, model, merge_threshold=2.0, seam_fraction=2.0)
    assert len(unmerged) >= 3 * len(SEAM_BLOBS)  # the pieces really were cut and duplicated
    for t in truth:
        best = max(tiled, key=lambda i, t=t: _iou(rle_decode(i.rle), t))
        assert abs(best.area - t.sum()) <= 0.03 * t.sum()
    assert sorted(i.class_id for i in tiled) == sorted(1 if b[-1] == RED else 2 for b in SEAM_BLOBS)
    # merged objects' boxes span all their pieces
    boxes = sorted(i.box for i in tiled if i.box[2] > 90)
    np.testing.assert_allclose(boxes, [(60, 20, 100, 40), (200, 210, 99, 22)], atol=1.0)


def test_object_larger_than_a_tile_is_one_instance(model):
    # no tile holds the whole object and neighbouring pieces share only the 32 px overlap band
    blobs = [("rect", 40, 20, 250, 280, GREEN)]
    item = ArrayItem(np.moveaxis(blob_image(300, 300, blobs), -1, 0))
    (found,) = detect_item(item, model)
    (truth,) = blob_masks(300, 300, blobs)
    assert _iou(rle_decode(found.rle), truth) > 0.98
    assert len(detect_item(item, model, seam_fraction=2.0)) > 1  # overlap alone does not join the pieces


def test_abutting_tiles_without_overlap_still_merge(model):
    blobs = [("rect", 30, 100, 60, 160, RED), ("disk", 128, 128, 20, GREEN)]
    item = ArrayItem(np.moveaxis(blob_image(256, 256, blobs), -1, 0))
    found = detect_item(item, model, tile=128, overlap=0)
    assert len(found) == 2
    assert min(_match(found, blob_masks(256, 256, blobs))) > 0.95


def test_neighbours_near_a_seam_stay_separate(model):
    # A ends before tile 0's edge (127) but is cut by tile 1's left edge (96); B starts after a 3 px gap.
    blobs = [("rect", 40, 80, 80, 126, RED), ("rect", 40, 129, 80, 170, RED)]
    item = ArrayItem(np.moveaxis(blob_image(200, 300, blobs), -1, 0))
    found = detect_item(item, model, tile=128, overlap=32)
    assert len(found) == 2
    assert min(_match(found, blob_masks(200, 300, blobs))) > 0.95


def test_non_uint8_single_band_item_and_nodata(model):
    blobs = [("rect", 20, 150, 70, 200, RED), ("rect", 150, 20, 190, 60, RED)]
    grey = blob_image(220, 240, blobs)[..., 0].astype(np.uint16) * 40 + 1000  # raw DNs, one band
    valid = np.ones((220, 240), bool)
    valid[:, 180:] = False  # nodata cuts the first object
    item = ArrayItem(grey[None], valid=valid)
    found = detect_item(item, model)
    masks = [rle_decode(i.rle) for i in found]
    assert len(found) == 2
    assert not any(m[:, 180:].any() for m in masks)
    truth = [t & valid for t in blob_masks(220, 240, blobs)]
    assert min(_match(found, truth)) > 0.95


def test_to_uint8_rgb():
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    out = to_uint8_rgb(x, (np.full(3, 2.0), np.full(3, 10.0)))
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert out[0, 0, 0] == 0 and out[2, 3, 2] == 255 and out[1, 2, 1] == round((6 - 2) / 8 * 255)
    rgb = np.random.default_rng(0).integers(0, 255, (4, 5, 6), dtype=np.uint8)
    np.testing.assert_array_equal(to_uint8_rgb(rgb), np.moveaxis(rgb[:3], 0, -1))


def test_merge_instances_public_api():
    full = np.zeros((40, 60), bool)
    full[10:20, 20:50] = True
    wins = [Window(0, 0, 36, 40), Window(28, 0, 32, 40)]
    left, right = full.copy(), full.copy()
    left[:, 36:] = False
    right[:, :28] = False

    def inst(m, score, cid=1):
        return Instance(cid, score, (0, 0, 1, 1), _rle_from_crop(m, 0, 0, 40, 60), int(m.sum()))

    (merged,) = merge_instances([inst(left, 0.6), inst(right, 0.9)], [0, 1], wins)
    np.testing.assert_array_equal(rle_decode(merged.rle), full)
    assert merged.score == 0.9
    assert len(merge_instances([inst(left, 0.6), inst(right, 0.9, cid=2)], [0, 1], wins)) == 2  # class-aware
    (area_w,) = merge_instances([inst(left, 0.6), inst(right, 0.9)], [0, 1], wins, score_mode="area")
    assert 0.6 < area_w.score < 0.9


# ----------------------------------------------------------------------------------------------- outputs

def test_instance_figures_and_coco_results():
    def inst(cid, score, area):
        return Instance(cid, score, (0, 0, 1, 1), {"size": [4, 4], "counts": ""}, area)

    insts = [inst(17, 0.9, 100), inst(18, 0.5, 40), inst(17, 0.7, 60)]
    figs = instance_figures(insts, coco_labels(), 0.25, "m2")
    assert figs == [
        {"class_id": 17, "class_name": "cat", "instance_count": 2, "area_px": 160, "area": 40.0,
         "area_unit": "m2", "mean_score": pytest.approx(0.8)},
        {"class_id": 18, "class_name": "dog", "instance_count": 1, "area_px": 40, "area": 10.0,
         "area_unit": "m2", "mean_score": pytest.approx(0.5)},
    ]
    assert instance_figures(insts, ["bg"] * 20, None, None)[0]["area"] is None
    res = to_coco_results(insts, image_id=3, category_map={17: 1})
    assert [r["category_id"] for r in res] == [1, 1] and res[0]["image_id"] == 3


def test_coco_label_map():
    labels = coco_labels()
    assert len(labels) == 80 and max(labels) == 90
    assert labels[1] == "person" and labels[18] == "dog" and labels[90] == "toothbrush"
    assert not {12, 26, 29, 30, 45, 66, 68, 69, 71, 83} & set(labels)


def test_wrong_signature_and_bad_input_are_clear_errors():
    from pipelines.instances import Detector, InstanceModelError

    @tf.function
    def not_a_detector(x):
        return {"logits": tf.reduce_mean(tf.cast(x, tf.float32), axis=[1, 2])}

    det = Detector(not_a_detector, "toy")
    with pytest.raises(InstanceModelError, match="toy: outputs .*logits.* not an Object Detection API"):
        det(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        det(np.zeros((8, 8), np.float32))
