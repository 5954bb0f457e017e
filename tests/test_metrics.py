"""Confusion matrix, scores, streaming accumulator and COCO AP."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipelines.metrics import ClassAccumulator, coco_mask_ap, confusion_matrix, scores


def test_confusion_matrix_rows_are_truth_and_ignores():
    truth = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 7]])
    cm = confusion_matrix(truth, pred, 3)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 2, 0], [1, 0, 1]])  # 255 truth and 7 pred dropped
    valid = np.ones_like(truth, bool)
    valid[0, 1] = False
    assert confusion_matrix(truth, pred, 3, valid)[0, 1] == 0
    with pytest.raises(ValueError):
        confusion_matrix(truth, pred[:, :2], 3)


def test_scores_known_values():
    cm = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    s = scores(cm)
    assert s["pixel_accuracy"] == pytest.approx(4 / 6)
    iou = [1 / 3, 2 / 3, 1 / 2]
    dice = [2 / 4, 4 / 5, 2 / 3]
    for k in range(3):
        assert s["per_class"][k]["iou"] == pytest.approx(iou[k])
        assert s["per_class"][k]["dice"] == pytest.approx(dice[k])
    assert s["mean_iou"] == pytest.approx(np.mean(iou))
    assert [c["support"] for c in s["per_class"]] == [2, 2, 2]


def test_scores_absent_class_is_none_not_zero():
    cm = np.array([[5, 0], [0, 0]])
    s = scores(cm)
    assert s["per_class"][1]["iou"] is None and s["per_class"][1]["dice"] is None
    assert s["mean_iou"] == 1.0
    assert scores(np.zeros((2, 2)))["pixel_accuracy"] is None


def test_accumulator_streaming_equals_one_shot_and_merge():
    rng = np.random.default_rng(0)
    cls = rng.integers(0, 3, (20, 30)).astype(np.uint8)
    conf = rng.random((20, 30)).astype(np.float32)
    truth = rng.integers(0, 3, (20, 30))
    valid = rng.random((20, 30)) > 0.2
    cls[~valid] = 255
    one = ClassAccumulator(3)
    one.update(cls, conf, valid, truth)
    a, b = ClassAccumulator(3), ClassAccumulator(3)
    a.update(cls[:7], conf[:7], valid[:7], truth[:7])
    b.update(cls[7:], conf[7:], valid[7:], truth[7:])
    a.merge(b)
    np.testing.assert_array_equal(a.counts, one.counts)
    np.testing.assert_allclose(a.confidence_sum, one.confidence_sum)
    np.testing.assert_array_equal(a.confusion, one.confusion)
    assert a.valid_pixels == one.valid_pixels == valid.sum()
    assert a.total_pixels == 600
    for k in range(3):
        sel = (cls == k) & valid
        assert one.counts[k] == sel.sum()
        assert one.mean_confidence()[k] == pytest.approx(conf[sel].mean())
    np.testing.assert_array_equal(one.confusion, confusion_matrix(truth, cls, 3, valid))
    assert sum(one.fractions()) == pytest.approx(1.0)


def test_accumulator_empty():
    acc = ClassAccumulator(2)
    acc.update(np.full((2, 2), 255, np.uint8), np.zeros((2, 2), np.float32))
    assert acc.valid_pixels == 0 and acc.mean_confidence() == [None, None] and acc.fractions() == [0.0, 0.0]
    assert acc.confusion is None
    with pytest.raises(ValueError):
        acc.merge(ClassAccumulator(3))


def _rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def test_coco_mask_ap_perfect_and_shifted():
    m1 = np.zeros((40, 40), bool)
    m1[5:20, 5:20] = True
    m2 = np.zeros((40, 40), bool)
    m2[25:38, 22:39] = True
    gt = [{"image_id": 1, "category_id": 1, "segmentation": _rle(m1)},
          {"image_id": 1, "category_id": 1, "segmentation": _rle(m2)}]
    perfect = [dict(g, score=0.9) for g in gt]
    res = coco_mask_ap(gt, perfect)
    assert res["AP"] == pytest.approx(1.0) and res["box_AP"] == pytest.approx(1.0)
    shifted = np.roll(m1, 5, axis=1)  # IoU 10/20 = 0.5
    worse = coco_mask_ap(gt, [{"image_id": 1, "category_id": 1, "segmentation": _rle(shifted), "score": 0.8},
                              perfect[1]])
    assert worse["AP50"] == pytest.approx(1.0)
    assert worse["AP75"] < 0.6
    assert worse["AP"] < res["AP"]
    assert coco_mask_ap(gt, [])["AP"] == -1.0
