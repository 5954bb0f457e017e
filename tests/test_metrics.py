"""Confusion matrix, scores, streaming accumulator and COCO AP."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipelines.metrics import (
    ClassAccumulator,
    bootstrap_difference,
    bootstrap_intervals,
    coco_mask_ap,
    confusion_matrix,
    scores,
    truth_classes,
)


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


def _item(correct: int, wrong: int) -> np.ndarray:
    """A 2-class item: ``correct`` pixels right, ``wrong`` pixels of class 0 called 1."""
    return np.array([[correct // 2, wrong], [0, correct - correct // 2]])


def test_bootstrap_identical_items_give_a_point_interval():
    cms = [_item(80, 20)] * 6
    ci = bootstrap_intervals(cms, resamples=300)
    assert ci["items"] == 6 and ci["level"] == 0.95 and ci["resamples"] == 300
    assert ci["pixel_accuracy"] == pytest.approx([0.8, 0.8])
    mean_iou = scores(np.sum(cms, axis=0))["mean_iou"]
    assert ci["mean_iou"] == pytest.approx([mean_iou, mean_iou])


def test_bootstrap_resamples_items_not_pixels():
    """One perfect and one all-wrong item of equal size: a resample is 0, 1/2 or 1 with odds 1:2:1, so the
    95 % interval spans [0, 1]. A pixel-level bootstrap of the same 50 % would be about +-1 point wide."""
    ci = bootstrap_intervals([_item(1000, 0), _item(0, 1000)], resamples=2000, seed=3)
    assert ci["pixel_accuracy"] == [0.0, 1.0]
    assert bootstrap_intervals([_item(1000, 0), _item(0, 1000)], resamples=2000, seed=3) == ci
    assert bootstrap_intervals([_item(10, 0)])["pixel_accuracy"] == [None, None]


def test_bootstrap_interval_covers_the_population_accuracy():
    """Items with accuracies scattered around 0.9 (like photos: most good, a few bad): over 100 samples of 40
    items, the 95 % interval holds the population's pixel accuracy about 95 % of the time."""
    rng = np.random.default_rng(11)
    population = rng.beta(18, 2, 20_000)  # per-item accuracy, mean 0.9
    truth_acc = population.mean()  # equal-size items: the pixel accuracy of the whole population
    hits = 0
    for _ in range(100):
        acc = rng.choice(population, 40)
        cms = [_item(int(round(a * 1000)), 1000 - int(round(a * 1000))) for a in acc]
        low, high = bootstrap_intervals(cms, resamples=400, seed=int(rng.integers(1 << 30)))["pixel_accuracy"]
        hits += low <= truth_acc <= high
    assert 85 <= hits <= 100


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(N, K, K\)"):
        bootstrap_intervals(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="level"):
        bootstrap_intervals([_item(1, 1)] * 2, level=1.0)


def test_bootstrap_difference_is_paired():
    """A candidate 2 points better on every item: the paired interval of the difference is tight around +0.02
    and excludes 0, though the two separate intervals overlap (items differ far more than the models)."""
    rng = np.random.default_rng(5)
    acc = rng.uniform(0.6, 0.97, 30)
    base = [_item(int(a * 1000), 1000 - int(a * 1000)) for a in acc]
    cand = [_item(int(a * 1000) + 20, 980 - int(a * 1000)) for a in acc]
    diff = bootstrap_difference(base, cand, resamples=1000)
    assert diff["items"] == 30
    assert diff["pixel_accuracy"]["difference"] == pytest.approx(0.02)
    low, high = diff["pixel_accuracy"]["interval"]
    assert 0.0 < low <= 0.02 <= high < 0.021
    assert diff["mean_iou"]["interval"][0] > 0.0
    single_b = bootstrap_intervals(base, resamples=1000)["pixel_accuracy"]
    single_c = bootstrap_intervals(cand, resamples=1000)["pixel_accuracy"]
    assert single_c[0] < single_b[1]  # apart, the two would not tell the models apart

    same = bootstrap_difference(base, base, resamples=200)
    assert same["pixel_accuracy"] == {"difference": 0.0, "interval": [0.0, 0.0]}
    with pytest.raises(ValueError, match="same items"):
        bootstrap_difference(base, cand[:-1])


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


def test_truth_classes_identity_keeps_class_ids_and_reports_the_rest():
    t = np.array([[0, 1, 2], [3, 255, 3]], np.uint8)
    classes, unscored, found = truth_classes(t, 3)
    assert found == (0, 1, 2, 3, 255)
    assert classes.dtype == np.uint8
    assert classes.tolist() == [[0, 1, 2], [255, 255, 255]]
    assert unscored == {3: 2}  # 255 is the documented "not scored", so it is not reported


def test_truth_classes_mapping_others_and_unlisted_values():
    trimap = np.array([[1, 2, 3], [0, 2, 255]], np.uint8)
    classes, unscored, _ = truth_classes(trimap, 3, {1: 0, 2: 1, 3: 2})
    assert classes.tolist() == [[0, 1, 2], [255, 1, 255]]
    assert unscored == {0: 1, 255: 1}  # neither is in the map
    mask = np.array([[0, 255], [1, 0]], np.uint8)  # 0/255 and 0/1 building masks alike
    classes, unscored, _ = truth_classes(mask, 2, {0: 0}, others=1)
    assert classes.tolist() == [[0, 1], [1, 0]] and unscored == {}
    # A value may be mapped to 255 on purpose (a "void" label): not scored, not reported.
    classes, unscored, _ = truth_classes(np.array([[7, 1]], np.uint8), 2, {7: 255, 1: 1})
    assert classes.tolist() == [[255, 1]] and unscored == {}


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.uint32])
def test_truth_classes_wide_labels_are_not_wrapped(dtype):
    """A 16-bit or 32-bit label image: 256 must not become class 0, as a uint8 cast would make it."""
    t = np.array([[256, 0], [70000 if np.iinfo(dtype).max > 70000 else 1000, 1]], dtype)
    classes, unscored, _ = truth_classes(t, 2)
    assert classes.tolist() == [[255, 0], [255, 1]]
    assert set(unscored) == {256, int(t[1, 0])}
    classes, _, _ = truth_classes(t, 2, {256: 1}, others=0)
    assert classes.tolist() == [[1, 0], [0, 0]]


def test_truth_classes_bool_and_float_inputs():
    assert truth_classes(np.array([[True, False]]), 2)[0].tolist() == [[1, 0]]
    with pytest.raises(ValueError, match="integers"):
        truth_classes(np.array([[0.5]]), 2)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32])
def test_truth_classes_in_chunks_equals_one_pass(monkeypatch, dtype):
    import pipelines.metrics as m

    values = np.random.default_rng(3).integers(0, 6, (37, 29)).astype(dtype)
    whole = truth_classes(values, 3, {1: 0, 2: 1, 3: 2}, others=None)
    monkeypatch.setattr(m, "_CHUNK", 100)  # 11 chunks, the last one short
    chunked = truth_classes(values, 3, {1: 0, 2: 1, 3: 2}, others=None)
    assert np.array_equal(whole[0], chunked[0]) and whole[1] == chunked[1]
    assert chunked[1] == {v: int((values == v).sum()) for v in (0, 4, 5)}
