"""Segmentation metrics, pure numpy; the same code scores jobs with ground truth and ``tileseg eval``.

Class ids outside ``[0, num_classes)`` (255 = nodata / ignore) never count, in truth or prediction.
Scores that are undefined (a class absent from both truth and prediction) are ``None``, not 0, so
means are taken over the classes that occur.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "ClassAccumulator",
    "bootstrap_difference",
    "bootstrap_intervals",
    "coco_mask_ap",
    "confusion_matrix",
    "scores",
    "TruthClasses",
    "truth_classes",
]

#: Truth class id of pixels that are not scored.
IGNORE = 255
_CHUNK = 1 << 22


class TruthClasses(NamedTuple):
    """:func:`truth_classes`' answer: the class ids, the unscored values' pixel counts, and every value found."""

    classes: np.ndarray
    unscored: dict[int, int]
    values: tuple[int, ...]


def truth_classes(
    values: np.ndarray, num_classes: int, mapping: dict[int, int] | None = None, others: int | None = None
) -> TruthClasses:
    """Stored ground-truth values ``(H, W)`` int -> class ids ``(H, W) uint8`` (:data:`IGNORE` = not scored).

    Without ``mapping`` the values are class ids already: ``[0, num_classes)`` are kept and :data:`IGNORE`
    is the documented "not scored". With it, each listed value becomes its class id (which may be
    :data:`IGNORE`), and the values it does not list become class ``others``, or are not scored when
    ``others`` is None. Returns the classes and ``{value: pixel count}`` of the values that fell out
    without being asked to (a 0/255 mask read as class ids, a trimap value missing from the map), so the
    caller can say so instead of scoring silently on part of the truth; and the distinct values found.
    """
    values = np.asarray(values)
    if values.dtype.kind not in "uib":
        raise ValueError(f"truth values must be integers, got {values.dtype}")
    flat = values.reshape(-1)
    # 8/16-bit labels (nearly all): counted and looked up through a table, in chunks, so a whole-raster
    # truth of 10^9 pixels never has an 8-byte copy (np.bincount and fancy indexing make one per call).
    small = values.dtype.kind in "ub" and values.dtype.itemsize <= 2
    chunks = [flat[i : i + _CHUNK] for i in range(0, flat.size, _CHUNK)]
    if small:
        size = 2 if values.dtype.kind == "b" else 1 << (8 * values.dtype.itemsize)
        counts = np.zeros(size, np.int64)
        for c in chunks:
            counts += np.bincount(c.astype(np.intp), minlength=size)
        uniq = np.flatnonzero(counts)
        counts = counts[uniq]
    else:
        uniq, counts = np.unique(flat, return_counts=True)
    lut = np.full(uniq.shape, IGNORE, np.uint8)
    dropped = np.zeros(uniq.shape, bool)
    for i, v in enumerate(uniq.tolist()):
        if mapping is None:
            if 0 <= v < num_classes:
                lut[i] = v
            else:
                dropped[i] = v != IGNORE
        elif v in mapping:
            lut[i] = mapping[v]
        elif others is not None:
            lut[i] = others
        else:
            dropped[i] = True
    out = np.empty(flat.size, np.uint8)
    if small:
        table = np.full(size, IGNORE, np.uint8)
        table[uniq] = lut
        for n, c in enumerate(chunks):
            out[n * _CHUNK : n * _CHUNK + c.size] = table[c.astype(np.intp)]
    else:
        for n, c in enumerate(chunks):
            out[n * _CHUNK : n * _CHUNK + c.size] = lut[np.searchsorted(uniq, c)]
    classes = out.reshape(values.shape)
    unscored = {int(uniq[i]): int(counts[i]) for i in np.flatnonzero(dropped)}
    return TruthClasses(classes, unscored, tuple(int(v) for v in uniq))


def confusion_matrix(
    truth: np.ndarray, pred: np.ndarray, num_classes: int, valid: np.ndarray | None = None
) -> np.ndarray:
    """``(K, K) int64`` counts, rows = truth class, columns = predicted class.

    ``truth`` and ``pred`` are integer arrays of the same shape (e.g. ``(H, W)``); ``valid`` (same shape,
    bool) drops pixels; pixels whose truth or prediction is outside ``[0, K)`` are dropped too.
    """
    if truth.shape != pred.shape:
        raise ValueError(f"truth shape {truth.shape} != prediction shape {pred.shape}")
    if num_classes < 1:
        raise ValueError("num_classes must be >= 1")
    t = truth.reshape(-1).astype(np.int64)
    p = pred.reshape(-1).astype(np.int64)
    keep = (t >= 0) & (t < num_classes) & (p >= 0) & (p < num_classes)
    if valid is not None:
        if valid.shape != truth.shape:
            raise ValueError(f"valid mask shape {valid.shape} != truth shape {truth.shape}")
        keep &= valid.reshape(-1).astype(bool)
    idx = t[keep] * num_classes + p[keep]
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def scores(confusion: np.ndarray) -> dict[str, Any]:
    """Pixel accuracy, mean IoU and per-class Dice/IoU from a ``(K, K)`` confusion matrix (rows = truth).

    Returns ``{"pixel_accuracy": float | None, "mean_iou": float | None, "mean_dice": float | None,
    "per_class": [{"class_id", "dice", "iou", "support"}, ...]}``; ``support`` is the truth pixel count.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion must be square (K, K), got shape {cm.shape}")
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    per_class = []
    for k in range(cm.shape[0]):
        per_class.append({
            "class_id": k,
            "iou": _ratio(tp[k], tp[k] + fp[k] + fn[k]),
            "dice": _ratio(2 * tp[k], 2 * tp[k] + fp[k] + fn[k]),
            "support": int(tp[k] + fn[k]),
        })
    ious = [c["iou"] for c in per_class if c["iou"] is not None]
    dices = [c["dice"] for c in per_class if c["dice"] is not None]
    return {
        "pixel_accuracy": _ratio(tp.sum(), cm.sum()),
        "mean_iou": float(np.mean(ious)) if ious else None,
        "mean_dice": float(np.mean(dices)) if dices else None,
        "per_class": per_class,
    }


def _checked_items(confusions: np.ndarray | Sequence[np.ndarray], resamples: int, level: float) -> np.ndarray:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError("resamples must be >= 1")
    cms = np.asarray(confusions, dtype=np.int64)
    if cms.ndim != 3 or cms.shape[1] != cms.shape[2]:
        raise ValueError(f"confusions must be (N, K, K), got shape {cms.shape}")
    return cms


def _resampled_scores(stacks: Sequence[np.ndarray], resamples: int, seed: int) -> list[list[dict[str, Any]]]:
    """For each ``(N, K, K)`` stack, :func:`scores` of ``resamples`` item resamples; every stack is resampled
    with the same draws (paired), so differences between stacks keep their item-by-item pairing."""
    n = stacks[0].shape[0]
    rng = np.random.default_rng(seed)
    # Each row: how often each item is drawn; a resampled matrix is the count-weighted sum of the items'.
    counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(resamples)])
    return [[scores(cm) for cm in np.einsum("rn,nkl->rkl", counts, cms)] for cms in stacks]


def _percentiles(values: Sequence[float | None], level: float) -> list[float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return [None, None]
    return [float(np.percentile(vals, 50.0 * (1.0 - level))), float(np.percentile(vals, 50.0 * (1.0 + level)))]


def bootstrap_intervals(
    confusions: np.ndarray | Sequence[np.ndarray],
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Percentile bootstrap intervals of pixel accuracy and mean IoU over items (images, slices, tiles).

    ``confusions`` is ``(N, K, K)``: one confusion matrix per item (rows = truth). Each resample draws ``N``
    items with replacement and scores their summed matrix with :func:`scores`, so an item's pixels stay
    together: neighbouring pixels are not independent, and a pixel-level interval would be far too narrow.
    Returns ``{"level", "resamples", "items", "pixel_accuracy": [low, high], "mean_iou": [low, high]}``
    (bounds None when fewer than 2 items). Deterministic for a given ``seed``.
    """
    cms = _checked_items(confusions, resamples, level)
    out: dict[str, Any] = {"level": level, "resamples": resamples, "items": cms.shape[0],
                           "pixel_accuracy": [None, None], "mean_iou": [None, None]}
    if cms.shape[0] < 2:
        return out
    (runs,) = _resampled_scores([cms], resamples, seed)
    for key in ("pixel_accuracy", "mean_iou"):
        out[key] = _percentiles([r[key] for r in runs], level)
    return out


def bootstrap_difference(
    baseline: np.ndarray | Sequence[np.ndarray],
    candidate: np.ndarray | Sequence[np.ndarray],
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired bootstrap of ``candidate - baseline`` in pixel accuracy and mean IoU, over the same items.

    Both are ``(N, K, K)`` per-item confusion matrices of the same N items in the same order (two models, or
    two settings, scored on one split). Resampling the items once for both keeps each item's difficulty
    on both sides, so the interval of the difference is much narrower than the two separate intervals: it
    says whether a change on a small validation split is larger than the split's noise. Returns
    ``{"level", "resamples", "items", "pixel_accuracy": {"difference", "interval"}, "mean_iou": {...}}``.
    """
    a, b = _checked_items(baseline, resamples, level), _checked_items(candidate, resamples, level)
    if a.shape != b.shape:
        raise ValueError(f"baseline {a.shape} and candidate {b.shape} must hold the same items and classes")
    out: dict[str, Any] = {"level": level, "resamples": resamples, "items": a.shape[0]}
    runs_a, runs_b = _resampled_scores([a, b], resamples, seed) if a.shape[0] >= 2 else ([], [])
    whole_a, whole_b = scores(a.sum(axis=0)), scores(b.sum(axis=0))
    for key in ("pixel_accuracy", "mean_iou"):
        diffs = [None if ra[key] is None or rb[key] is None else rb[key] - ra[key]
                 for ra, rb in zip(runs_a, runs_b, strict=True)]
        point = None if whole_a[key] is None or whole_b[key] is None else whole_b[key] - whole_a[key]
        out[key] = {"difference": point, "interval": _percentiles(diffs, level)}
    return out


class ClassAccumulator:
    """Streaming per-class figures over blocks of one or many items.

    ``counts`` ``(K,) int64`` predicted pixels per class, ``confidence_sum`` ``(K,) float64``,
    ``valid_pixels`` / ``total_pixels`` ints, ``confusion`` ``(K, K) int64`` once any block came with
    ground truth (else None).
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.num_classes = num_classes
        self.counts = np.zeros(num_classes, np.int64)
        self.confidence_sum = np.zeros(num_classes, np.float64)
        self.valid_pixels = 0
        self.total_pixels = 0
        self.confusion: np.ndarray | None = None

    def update(
        self,
        classes: np.ndarray,
        confidence: np.ndarray,
        valid: np.ndarray | None = None,
        truth: np.ndarray | None = None,
    ) -> None:
        """Add one block: ``classes`` ``(h, w)`` int ids, ``confidence`` ``(h, w)`` float in [0, 1],
        ``valid`` ``(h, w)`` bool (None = all valid), ``truth`` ``(h, w)`` int ids or None.

        Pixels with a class outside ``[0, K)`` (255 = nodata) count as not valid.
        """
        if confidence.shape != classes.shape:
            raise ValueError(f"confidence shape {confidence.shape} != classes shape {classes.shape}")
        k = self.num_classes
        cls = classes.reshape(-1).astype(np.int64)
        keep = (cls >= 0) & (cls < k)
        if valid is not None:
            if valid.shape != classes.shape:
                raise ValueError(f"valid shape {valid.shape} != classes shape {classes.shape}")
            keep &= valid.reshape(-1).astype(bool)
        self.total_pixels += int(cls.size)
        self.valid_pixels += int(keep.sum())
        kept = cls[keep]
        self.counts += np.bincount(kept, minlength=k)
        self.confidence_sum += np.bincount(
            kept, weights=confidence.reshape(-1)[keep].astype(np.float64), minlength=k
        )
        if truth is not None:
            cm = confusion_matrix(truth, classes, k, valid=keep.reshape(classes.shape))
            self.confusion = cm if self.confusion is None else self.confusion + cm

    def merge(self, other: ClassAccumulator) -> None:
        """Add ``other``'s figures into this one (same ``num_classes``)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self.counts += other.counts
        self.confidence_sum += other.confidence_sum
        self.valid_pixels += other.valid_pixels
        self.total_pixels += other.total_pixels
        if other.confusion is not None:
            mine = self.confusion
            self.confusion = other.confusion.copy() if mine is None else mine + other.confusion

    def mean_confidence(self) -> list[float | None]:
        """Mean max-probability per class (None where the class has no pixel)."""
        return [float(s / n) if n else None for s, n in zip(self.confidence_sum, self.counts, strict=True)]

    def fractions(self) -> list[float]:
        """Share of valid pixels per class (zeros when nothing is valid)."""
        if self.valid_pixels == 0:
            return [0.0] * self.num_classes
        return [float(n / self.valid_pixels) for n in self.counts]


def coco_mask_ap(gt: Sequence[dict[str, Any]], dt: Sequence[dict[str, Any]]) -> dict[str, float]:
    """COCO mask and box AP (pycocotools) of detections ``dt`` against ground truth ``gt``.

    Each record: ``{"image_id": int, "category_id": int, "segmentation": RLE dict {"size": [H, W],
    "counts": str|bytes}}``; detections add ``"score": float``. Boxes and areas are derived from the
    masks. Returns ``{"AP", "AP50", "AP75", "box_AP"}`` in [0, 1] (-1 where COCO finds nothing to score).
    """
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def prepare(records: Sequence[dict[str, Any]], with_score: bool) -> list[dict[str, Any]]:
        out = []
        for n, r in enumerate(records, start=1):
            rle = dict(r["segmentation"])
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
            ann = {
                "id": n,
                "image_id": int(r["image_id"]),
                "category_id": int(r["category_id"]),
                "segmentation": rle,
                "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            }
            if with_score:
                ann["score"] = float(r["score"])
            out.append(ann)
        return out

    gts = prepare(gt, with_score=False)
    dts = prepare(dt, with_score=True)
    sizes: dict[int, list[int]] = {}
    for a in gts + dts:
        sizes.setdefault(a["image_id"], list(a["segmentation"]["size"]))
    cats = sorted({a["category_id"] for a in gts + dts})
    results: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {
            "images": [{"id": i, "height": s[0], "width": s[1]} for i, s in sizes.items()],
            "annotations": gts,
            "categories": [{"id": c, "name": str(c)} for c in cats],
        }
        coco_gt.createIndex()
        # Without "bbox" loadRes takes the mask branch: areas and boxes come from the masks.
        coco_dt = coco_gt.loadRes([{k: v for k, v in a.items() if k not in ("bbox", "area")} for a in dts]) \
            if dts else COCO()
        for iou_type in ("segm", "bbox"):
            if not dts:
                results.update({"AP": -1.0, "AP50": -1.0, "AP75": -1.0, "box_AP": -1.0})
                break
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            if iou_type == "segm":
                results.update({"AP": float(ev.stats[0]), "AP50": float(ev.stats[1]),
                                "AP75": float(ev.stats[2])})
            else:
                results["box_AP"] = float(ev.stats[0])
    return results
