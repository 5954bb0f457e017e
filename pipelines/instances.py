"""Instance segmentation runtime for TF2 Object Detection API style SavedModels.

Any SavedModel with the OD API serving signature runs here unchanged: the TF Hub / Kaggle Mask R-CNN, a
Model Garden export, or a test model. Signature: input ``uint8 [1, H, W, 3]``; outputs ``detection_boxes``
``[1, N, 4]`` (normalised ymin, xmin, ymax, xmax), ``detection_classes`` ``[1, N]``, ``detection_scores``
``[1, N]``, ``num_detections`` ``[1]`` and ``detection_masks`` ``[1, N, h, w]`` box-relative masks.

Masks are kept as tight crops (``_Piece``) while detecting and merging, so a large raster never needs a
full-size array per object; they become full-item COCO RLEs only at the end.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pycocotools import mask as mask_utils

from adapters.base import Item, Window
from pipelines.registry import LoadedModel
from pipelines.spec import ModelSpec

__all__ = [
    "Detections",
    "Detector",
    "Instance",
    "InstanceModelError",
    "class_name_map",
    "coco_labels",
    "detect_image",
    "detect_item",
    "detections_to_instances",
    "fuse_detections",
    "instance_figures",
    "load_instance_model",
    "merge_instances",
    "reframe_box_masks_to_image_masks",
    "rle_area",
    "rle_decode",
    "stretch_bounds",
    "tile_windows",
    "to_coco_results",
    "to_uint8_rgb",
    "shrink_to_fit",
    "unflip_detections",
]

COCO_LABELS_PATH = Path(__file__).parent / "models" / "coco_labels.json"

#: Box-relative mask threshold after bilinear reframing (as the OD API / TF Hub colab do).
MASK_THRESHOLD = 0.5


@dataclass
class Instance:
    """One detected object, in the pixel coordinates of its item.

    ``box`` is COCO ``(x, y, width, height)`` in pixels; ``rle`` is a COCO run-length encoding
    (pycocotools, ``{"size": [H, W], "counts": str}``) of the full-item mask; ``area`` is the mask's pixel count.
    """

    class_id: int
    score: float
    box: tuple[float, float, float, float]
    rle: dict[str, Any]
    area: int


class InstanceModelError(RuntimeError):
    """The detector is missing, has the wrong signature or failed while running."""


# --------------------------------------------------------------------------------------------------------
# Label maps


@cache
def coco_labels() -> dict[int, str]:
    """The COCO 2017 label map in the 90-id scheme the OD API uses (80 names; ids 12, 26, ... unused)."""
    data = json.loads(COCO_LABELS_PATH.read_text())
    return {int(k): v for k, v in data.items()}


def class_name_map(spec: ModelSpec) -> dict[int, str]:
    """``{class_id: name}`` from a spec's classes (ids are the model's output ids, e.g. COCO's 1..90)."""
    return {c.id: c.name for c in spec.classes}


def _name_of(class_names: Mapping[int, str] | Sequence[str], class_id: int) -> str:
    if isinstance(class_names, Mapping):
        return class_names.get(class_id, f"class {class_id}")
    return class_names[class_id] if 0 <= class_id < len(class_names) else f"class {class_id}"


# --------------------------------------------------------------------------------------------------------
# The detector


@dataclass
class Detections:
    """Raw detector output for one image, padding removed, in the detector's order (score descending).

    ``boxes`` ``(N, 4) float32`` normalised ymin, xmin, ymax, xmax; ``classes`` ``(N,) int32``; ``scores``
    ``(N,) float32``; ``masks`` ``(N, h, w) float32`` box-relative in [0, 1], or None for box-only models.
    """

    boxes: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    masks: np.ndarray | None


class Detector:
    """Calls an OD API style SavedModel on one ``(H, W, 3) uint8`` image.

    Uses the ``serving_default`` signature when the SavedModel has one (passing the image under whatever
    name the signature declares, ``input_tensor`` for OD API exports), else calls the object itself.
    """

    REQUIRED = ("detection_boxes", "detection_scores", "detection_classes")

    def __init__(self, obj: Any, source: str = "", *, tta: bool = False, zoom_out: Sequence[float] = (),
                 zoom_min_area: float = 0.25, max_side: int | None = None) -> None:
        self.obj = obj
        self.source = source
        #: A view whose longer side exceeds this is shrunk to it (antialiased) before the graph sees it
        #: (:attr:`pipelines.spec.ModelSpec.detector_size`); outputs are normalised, so nothing maps back.
        self.max_side = max_side
        #: Flip test-time augmentation: run on the image and its mirror and fuse (:func:`fuse_detections`).
        self.tta = tta
        #: Zoom-out test-time augmentation (with ``tta``): also run on the image padded by each of these
        #: fractions of its height and width on every side (black, the letterbox colour detectors train
        #: with), and its mirror. Those views count only for detections covering at least ``zoom_min_area``
        #: of the image: they shrink large objects towards the sizes the detector saw most, and would lose
        #: small ones (scale-specific views, as SNIP's valid ranges).
        self.zoom_out = tuple(zoom_out)
        self.zoom_min_area = zoom_min_area
        sigs = getattr(obj, "signatures", None)
        self._sig = sigs["serving_default"] if sigs is not None and "serving_default" in sigs else None
        self._input_name: str | None = None
        if self._sig is not None:
            _, kwargs = self._sig.structured_input_signature
            if len(kwargs) != 1:
                raise InstanceModelError(
                    f"{source}: serving_default takes {sorted(kwargs)}; expected one uint8 image tensor"
                )
            self._input_name = next(iter(kwargs))
        elif not callable(obj):
            raise InstanceModelError(f"{source}: SavedModel has no serving_default signature and is not callable")

    def __call__(self, image: np.ndarray, *, tta: bool | None = None) -> Detections:
        """Run on ``image`` ``(H, W, 3) uint8``; ``tta`` overrides the detector's flip TTA setting."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"detector input must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        if not (self.tta if tta is None else tta):
            return self._once(shrink_to_fit(image, self.max_side))
        base = self._both_ways(image)
        near = fuse_views(base)
        if not self.zoom_out:
            return near
        h, w = image.shape[:2]
        zoomed = []
        for frac in self.zoom_out:
            py, px = round(frac * h), round(frac * w)
            padded = np.pad(image, ((py, py), (px, px), (0, 0)))
            zoomed += [unzoom_detections(d, py, px, h, w) for d in self._both_ways(padded)]
        far = fuse_views(base + zoomed)
        return _concat(_subset(near, box_areas(near.boxes) < self.zoom_min_area),
                       _subset(far, box_areas(far.boxes) >= self.zoom_min_area))

    def _both_ways(self, image: np.ndarray) -> list[Detections]:
        """Detections of ``image`` and of its mirror (mapped back). A view larger than ``max_side`` is shrunk
        once for both: the filter is symmetric, so the mirror of the shrunk view is the shrunk mirror."""
        image = shrink_to_fit(image, self.max_side)
        mirrored = self._once(np.ascontiguousarray(image[:, ::-1]))
        return [self._once(image), unflip_detections(mirrored)]

    def _once(self, image: np.ndarray) -> Detections:
        import tensorflow as tf

        x = tf.convert_to_tensor(image[None])
        try:
            out = self._sig(**{self._input_name: x}) if self._sig is not None else self.obj(x)
        except Exception as e:  # tf.errors.* from inside the graph
            raise InstanceModelError(f"{self.source}: detector failed on a {image.shape} image: {e}") from e
        missing = [k for k in self.REQUIRED if k not in out]
        if missing:
            raise InstanceModelError(
                f"{self.source}: outputs {sorted(out)} lack {missing}; not an Object Detection API signature"
            )
        scores = np.asarray(out["detection_scores"], dtype=np.float32)[0]
        n = int(np.asarray(out["num_detections"]).reshape(-1)[0]) if "num_detections" in out else len(scores)
        n = min(n, len(scores))
        masks = out.get("detection_masks")
        return Detections(
            boxes=np.asarray(out["detection_boxes"], dtype=np.float32)[0, :n],
            # OD API exports classes as float ids
            classes=np.rint(np.asarray(out["detection_classes"], dtype=np.float32)[0, :n]).astype(np.int32),
            scores=scores[:n],
            masks=None if masks is None else np.asarray(masks, dtype=np.float32)[0, :n],
        )


def shrink_to_fit(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """``(H, W, 3) uint8`` image with its longer side shrunk to ``max_side`` (aspect kept, antialiased with
    :func:`pipelines.semantic.resize_photo`), or the image itself when it already fits or ``max_side`` is
    None."""
    h, w = image.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return image
    from pipelines.semantic import resize_photo

    scale = max_side / max(h, w)
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    small = resize_photo(image.astype(np.float32), sh, sw)
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def unflip_detections(det: Detections) -> Detections:
    """Detections of a left-right mirrored image mapped back onto the original (boxes and masks mirrored)."""
    ymin, xmin, ymax, xmax = det.boxes.T if len(det.boxes) else np.zeros((4, 0), np.float32)
    boxes = np.stack([ymin, 1.0 - xmax, ymax, 1.0 - xmin], axis=1).astype(np.float32).reshape(-1, 4)
    masks = None if det.masks is None else np.ascontiguousarray(det.masks[:, :, ::-1])
    return Detections(boxes=boxes, classes=det.classes.copy(), scores=det.scores.copy(), masks=masks)


def _box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``(4,)`` box with ``(N, 4)`` boxes, all ``ymin, xmin, ymax, xmax``."""
    ih = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iw = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ih * iw
    area = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-12)


def _resample_matrix(lo: float, hi: float, new_lo: float, new_hi: float, m: int) -> np.ndarray:
    """``(m, m)`` bilinear weights: samples of a box-relative mask axis on ``[lo, hi]`` -> on ``[new_lo, new_hi]``.

    Sample ``i`` sits at the centre of cell ``i``; positions outside the source box get weight 0.
    """
    centres = new_lo + (np.arange(m) + 0.5) / m * (new_hi - new_lo)
    pos = (centres - lo) / max(hi - lo, 1e-12) * m - 0.5  # continuous source index
    w = np.zeros((m, m), np.float32)
    inside = (pos >= -0.5) & (pos <= m - 0.5)
    p = np.clip(pos, 0, m - 1)
    i0 = np.floor(p).astype(int)
    i1 = np.minimum(i0 + 1, m - 1)
    f = (p - i0).astype(np.float32)
    rows = np.flatnonzero(inside)
    np.add.at(w, (rows, i0[rows]), 1 - f[rows])
    np.add.at(w, (rows, i1[rows]), f[rows])
    return w


def _to_box(mask: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """A ``(h, w)`` box-relative mask of box ``src`` resampled into box ``dst`` (normalised yxyx)."""
    h, w = mask.shape
    wy = _resample_matrix(src[0], src[2], dst[0], dst[2], h)
    wx = _resample_matrix(src[1], src[3], dst[1], dst[3], w)
    return wy @ mask @ wx.T


def fuse_detections(a: Detections, b: Detections, *, iou_threshold: float = 0.55) -> Detections:
    """Fuse two passes over the same image (e.g. the image and its un-flipped mirror), class-aware.

    Each detection of ``a`` (best first) is paired with the best-overlapping unpaired detection of ``b`` of
    the same class (box IoU ≥ ``iou_threshold``). A pair becomes one detection: score-weighted mean box,
    mean score, mean of both masks resampled into that box. A detection found by one pass only keeps its
    box and mask with half its score, since the other pass did not confirm it. Output is score descending.
    """
    return fuse_views([a, b], iou_threshold=iou_threshold)


def fuse_views(views: Sequence[Detections], *, iou_threshold: float = 0.55) -> Detections:
    """Fuse ``K`` passes over the same image, class-aware; :func:`fuse_detections` for ``K`` views.

    Views are taken in order; each detection not yet used (best first within its view) gathers from every
    later view the best-overlapping unused detection of its class (box IoU ≥ ``iou_threshold`` with it).
    Each group becomes one detection: score-weighted mean box, mask = mean of its members' masks resampled
    into that box, score = sum of its members' scores / ``K``, so an object that some views missed is
    ranked down in proportion. Output is score descending.
    """
    k = len(views)
    if k == 0:
        raise ValueError("no views to fuse")
    with_masks = all(v.masks is not None for v in views)
    used = [np.zeros(len(v.scores), bool) for v in views]
    boxes, classes, scores, masks = [], [], [], []
    for v, det in enumerate(views):
        for i in np.argsort(-det.scores, kind="stable"):
            if used[v][i]:
                continue
            used[v][i] = True
            members = [(v, int(i))]
            for u in range(v + 1, k):
                other = views[u]
                if not len(other.scores):
                    continue
                iou = _box_iou(det.boxes[i], other.boxes)
                iou[(other.classes != det.classes[i]) | used[u]] = -1.0
                j = int(np.argmax(iou))
                if iou[j] >= iou_threshold:
                    used[u][j] = True
                    members.append((u, j))
            w = np.asarray([views[m].scores[j] for m, j in members], np.float64)
            if len(members) == 1:
                box = det.boxes[i]
            else:
                box = sum(float(wt) * views[m].boxes[j] for wt, (m, j) in zip(w, members, strict=True))
                box = (box / max(float(w.sum()), 1e-12)).astype(np.float32)
            boxes.append(box), classes.append(det.classes[i]), scores.append(float(w.sum()) / k)
            if with_masks:
                if len(members) == 1:
                    masks.append(det.masks[i])
                else:
                    masks.append(np.mean([_to_box(views[m].masks[j], views[m].boxes[j], box) for m, j in members],
                                         axis=0))
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    shape = next((v.masks.shape[1:] for v in views if v.masks is not None), (0, 0))
    return Detections(
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4)[order],
        classes=np.asarray(classes, np.int32)[order],
        scores=np.asarray(scores, np.float32)[order],
        masks=(np.asarray(masks, np.float32).reshape(-1, *shape)[order] if with_masks else None),
    )


def unzoom_detections(det: Detections, pad_y: int, pad_x: int, height: int, width: int) -> Detections:
    """Detections of a ``height x width`` image padded by ``pad_y`` rows and ``pad_x`` columns on each side,
    mapped back onto the unpadded image. Boxes stay normalised ``ymin, xmin, ymax, xmax`` (they may reach
    past [0, 1] where a detection runs into the padding); box-relative masks are unchanged."""
    b = det.boxes.astype(np.float64).reshape(-1, 4).copy()
    b[:, [0, 2]] = (b[:, [0, 2]] * (height + 2 * pad_y) - pad_y) / height
    b[:, [1, 3]] = (b[:, [1, 3]] * (width + 2 * pad_x) - pad_x) / width
    return Detections(b.astype(np.float32), det.classes.copy(), det.scores.copy(), det.masks)


def box_areas(boxes: np.ndarray) -> np.ndarray:
    """Areas of normalised ``(N, 4)`` ymin, xmin, ymax, xmax boxes, as fractions of the image."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def _subset(det: Detections, keep: np.ndarray) -> Detections:
    return Detections(det.boxes[keep], det.classes[keep], det.scores[keep],
                      None if det.masks is None else det.masks[keep])


def _concat(a: Detections, b: Detections) -> Detections:
    """``a`` and ``b`` together, score descending."""
    scores = np.concatenate([a.scores, b.scores])
    order = np.argsort(-scores, kind="stable")
    masks = None if a.masks is None or b.masks is None else np.concatenate([a.masks, b.masks])[order]
    return Detections(np.concatenate([a.boxes, b.boxes])[order],
                      np.concatenate([a.classes, b.classes])[order], scores[order], masks)


def _not_semantic(x: np.ndarray) -> np.ndarray:
    raise TypeError("instance models have no per-pixel predict(); use pipelines.instances.detect_item/detect_image")


def load_instance_model(spec: ModelSpec) -> LoadedModel:
    """Load an instance model (TF Hub handle or SavedModel directory); ``raw`` is a :class:`Detector`.

    Raises :class:`pipelines.hub.ModelUnavailable` when the weights are not available offline.
    """
    from pipelines.hub import load_hub

    if spec.source_format not in ("hub", "savedmodel"):
        raise InstanceModelError(
            f"model {spec.name}: instance models must be SavedModels (source_format 'hub' or 'savedmodel'), "
            f"not {spec.source_format!r}"
        )
    src = spec.resolve_source()
    return LoadedModel(spec=spec, predict=_not_semantic,
                       raw=Detector(load_hub(src), source=src, tta=spec.tta == "flip", zoom_out=spec.tta_zoom_out,
                                    zoom_min_area=spec.tta_zoom_min_area, max_side=spec.detector_size),
                       foreground=_foreground_fn(spec) if spec.refine is not None else None)


def _foreground_fn(spec: ModelSpec) -> Callable[[np.ndarray], np.ndarray]:
    """``(H, W, 3) uint8 -> (H, W) float32`` foreground probability of the spec's refining semantic model.

    The semantic model is loaded through the registry (once per process) and run with its own spec's mode,
    normalisation and flip TTA. Raises :class:`InstanceModelError` when it is missing, not semantic, or lacks a
    foreground class.
    """
    from pipelines.evaluate import make_predictor
    from pipelines.registry import ModelNotFound, get_spec, load

    ref = spec.refine
    if ref is None:
        raise ValueError(f"model {spec.name}: spec has no refine")
    local = spec.spec_path.parent / ref.model if spec.spec_path is not None else None
    try:
        sem_spec = get_spec(str(local) if local is not None and local.exists() else ref.model)
    except ModelNotFound as e:
        raise InstanceModelError(f"model {spec.name}: refining model {ref.model!r} not found: {e}") from e
    if sem_spec.kind != "semantic":
        raise InstanceModelError(f"model {spec.name}: refining model {sem_spec.name} is not a semantic model")
    names = sem_spec.class_names
    missing = [n for n in ref.foreground if n not in names]
    if missing:
        raise InstanceModelError(
            f"model {spec.name}: refining model {sem_spec.name} has no class {missing} (it has {names})"
        )
    channels = [names.index(n) for n in ref.foreground]
    # Boxes are crops near the model's own input size, so its multi-scale sizes (tuned on whole photos) are
    # left out: the flip alone, as this rule was validated, at a third of the cost.
    predict = make_predictor(load(sem_spec), multiscale=False)

    def foreground(rgb: np.ndarray) -> np.ndarray:
        return np.clip(predict(rgb)[..., channels].sum(-1), 0.0, 1.0).astype(np.float32)

    return foreground


# --------------------------------------------------------------------------------------------------------
# Mask reframing


def _axis_weights(lo: float, hi: float, size: int, m: int) -> tuple[int, np.ndarray]:
    """Bilinear weights mapping ``m`` box-mask samples onto the image pixels the box covers, on one axis.

    Mirrors ``tf.image.crop_and_resize`` with the image corners expressed relative to the box (the OD API's
    ``reframe_box_masks_to_image_masks``): image pixel ``i`` sits at normalised ``i / (size - 1)``, maps to
    mask coordinate ``(t - lo) / (hi - lo) * (m - 1)`` and is 0 outside ``[0, m - 1]``. A tiny tolerance
    keeps pixels lying exactly on the box edge inside despite float rounding.

    Returns ``(start, weights)``: image pixels ``start .. start + k - 1`` and ``weights`` ``(k, m) float32``.
    """
    ext = max(hi - lo, 1e-4)
    denom = size - 1
    if denom <= 0:
        t = np.array([0.5])
        first = 0
    else:
        first = max(int(math.floor(lo * denom)) - 1, 0)
        last = min(int(math.ceil((lo + ext) * denom)) + 1, size - 1)
        if last < first:
            return 0, np.zeros((0, m), np.float32)
        t = np.arange(first, last + 1, dtype=np.float64) / denom
    pos = (t - lo) / ext * (m - 1)
    eps = 1e-4
    inside = (pos >= -eps) & (pos <= m - 1 + eps)
    if not inside.any():
        return 0, np.zeros((0, m), np.float32)
    idx = np.nonzero(inside)[0]
    pos = np.clip(pos[idx[0] : idx[-1] + 1], 0.0, m - 1)
    top = np.floor(pos).astype(np.int64)
    frac = pos - top
    bottom = np.minimum(top + 1, m - 1)
    w = np.zeros((len(pos), m), np.float64)
    rows = np.arange(len(pos))
    np.add.at(w, (rows, top), 1.0 - frac)
    np.add.at(w, (rows, bottom), frac)
    return first + int(idx[0]), w.astype(np.float32)


def _reframe_crop(box_mask: np.ndarray, box: np.ndarray, height: int, width: int) -> tuple[int, int, np.ndarray]:
    """One box-relative mask resampled onto the image pixels of its box: ``(y0, x0, (h, w) float32)``."""
    m = np.asarray(box_mask, np.float32)
    if m.shape[0] == 1:  # crop_and_resize degenerates with one sample; treat as constant over the box
        m = np.repeat(m, 2, axis=0)
    if m.shape[1] == 1:
        m = np.repeat(m, 2, axis=1)
    ymin, xmin, ymax, xmax = (float(v) for v in box)
    y0, wy = _axis_weights(ymin, ymax, height, m.shape[0])
    x0, wx = _axis_weights(xmin, xmax, width, m.shape[1])
    return y0, x0, wy @ m @ wx.T


def reframe_box_masks_to_image_masks(
    box_masks: np.ndarray, boxes: np.ndarray, image_height: int, image_width: int
) -> np.ndarray:
    """Box-relative masks to full-image masks, bilinear, as the OD API's function of the same name.

    ``box_masks`` ``(N, h, w) float32`` in [0, 1]; ``boxes`` ``(N, 4)`` normalised ymin, xmin, ymax, xmax.
    Returns ``(N, image_height, image_width) float32`` (threshold at 0.5 for binary masks).
    """
    out = np.zeros((len(box_masks), image_height, image_width), np.float32)
    for k, (bm, box) in enumerate(zip(box_masks, boxes, strict=True)):
        y0, x0, crop = _reframe_crop(bm, box, image_height, image_width)
        out[k, y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
    return out


# --------------------------------------------------------------------------------------------------------
# Pieces: instances whose masks are tight crops (internal representation while detecting and merging)


@dataclass
class _Piece:
    class_id: int
    score: float
    y0: int
    x0: int
    mask: np.ndarray  # (h, w) bool, tight around the True pixels
    box: tuple[float, float, float, float]  # detection box, x0, y0, x1, y1 in item pixels
    tile: int = 0
    #: Tile borders this piece was cut by: (side, item-pixel row/col of the piece's outermost line).
    cuts: list[tuple[str, int]] = field(default_factory=list)

    @property
    def y1(self) -> int:
        return self.y0 + self.mask.shape[0]

    @property
    def x1(self) -> int:
        return self.x0 + self.mask.shape[1]

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))


def _tighten(y0: int, x0: int, mask: np.ndarray) -> tuple[int, int, np.ndarray] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return (y0 + int(rows[0]), x0 + int(cols[0]),
            mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])


def _select(det: Detections, score_threshold: float, max_detections: int) -> np.ndarray:
    order = np.argsort(-det.scores, kind="stable")
    keep = order[det.scores[order] >= score_threshold]
    return keep[: max(max_detections, 0)]


def _pieces(
    det: Detections, height: int, width: int, score_threshold: float, max_detections: int,
    refine: _Refine | None = None,
) -> list[_Piece]:
    """Thresholded, reframed detections of one ``height x width`` image; empty masks are dropped.

    ``refine`` blends each reframed mask with a semantic model's foreground before the 0.5 threshold
    (:class:`pipelines.spec.MaskRefinement`, :func:`blend_foreground`).
    """
    pieces = []
    for k in _select(det, score_threshold, max_detections):
        box = np.clip(det.boxes[k], 0.0, 1.0)
        if det.masks is None:  # box-only detector: the box is the mask
            bm = np.ones((2, 2), np.float32)
        else:
            bm = det.masks[k]
        y0, x0, crop = _reframe_crop(bm, box, height, width)
        ymin, xmin, ymax, xmax = (float(v) for v in box)
        box_px = (xmin * width, ymin * height, xmax * width, ymax * height)
        if refine is not None:
            crop = blend_foreground(crop, y0, x0, box_px, refine.rgb, refine.foreground, refine.weight)
        t = _tighten(y0, x0, crop > MASK_THRESHOLD)
        if t is None:
            continue
        pieces.append(_Piece(
            class_id=int(det.classes[k]), score=float(det.scores[k]), y0=t[0], x0=t[1], mask=t[2], box=box_px,
        ))
    return pieces


@dataclass
class _Refine:
    rgb: np.ndarray
    foreground: Callable[[np.ndarray], np.ndarray]
    weight: float


#: Context around a detection box given to the refining model, as a fraction of the box's side.
REFINE_MARGIN = 0.1


def blend_foreground(
    crop: np.ndarray, y0: int, x0: int, box: tuple[float, float, float, float], rgb: np.ndarray,
    foreground: Callable[[np.ndarray], np.ndarray], weight: float, margin: float = REFINE_MARGIN,
) -> np.ndarray:
    """``(1 - weight) * crop + weight * foreground`` for one detection.

    ``crop`` ``(h, w) float32`` is the detection's reframed mask probability, whose top-left pixel is
    ``(y0, x0)`` in ``rgb`` ``(H, W, 3) uint8``; ``box`` ``(x0, y0, x1, y1)`` its box in pixels. The
    semantic model sees the box grown by ``margin`` of its side on every edge, cut out of ``rgb``: one pet
    filling the frame, as in its training photos, however small the pet is in the image and however many
    others are near it. ``foreground`` maps that ``(h', w', 3) uint8`` cut-out to ``(h', w') float32``;
    pixels of ``crop`` outside the cut-out get foreground 0.
    """
    height, width = rgb.shape[:2]
    bx0, by0, bx1, by1 = box
    mx, my = margin * (bx1 - bx0), margin * (by1 - by0)
    gy0, gy1 = max(0, int(math.floor(by0 - my))), min(height, int(math.ceil(by1 + my)))
    gx0, gx1 = max(0, int(math.floor(bx0 - mx))), min(width, int(math.ceil(bx1 + mx)))
    fg = np.zeros_like(crop, dtype=np.float32)
    if gy1 - gy0 >= 2 and gx1 - gx0 >= 2:
        cut = np.asarray(foreground(np.ascontiguousarray(rgb[gy0:gy1, gx0:gx1])), np.float32)
        # Overlap of the crop's rows/cols with the cut-out's, in each one's own coordinates.
        r0, r1 = max(y0, gy0), min(y0 + crop.shape[0], gy1)
        c0, c1 = max(x0, gx0), min(x0 + crop.shape[1], gx1)
        if r1 > r0 and c1 > c0:
            fg[r0 - y0 : r1 - y0, c0 - x0 : c1 - x0] = cut[r0 - gy0 : r1 - gy0, c0 - gx0 : c1 - gx0]
    return (1.0 - weight) * crop + weight * fg


# --------------------------------------------------------------------------------------------------------
# RLE


def _rle_from_crop(mask: np.ndarray, y0: int, x0: int, height: int, width: int) -> dict[str, Any]:
    """COCO compressed RLE of a ``height x width`` image that is False outside ``mask`` at ``(y0, x0)``.

    Equal to ``pycocotools.mask.encode`` of the full mask, without allocating it (runs are column-major).
    """
    h, w = mask.shape
    padded = np.zeros((w, h + 2), np.int8)
    padded[:, 1:-1] = mask.T
    d = np.diff(padded, axis=1)
    sc, sr = np.nonzero(d == 1)
    ec, er = np.nonzero(d == -1)
    starts = (x0 + sc).astype(np.int64) * height + y0 + sr
    ends = (x0 + ec).astype(np.int64) * height + y0 + er
    if starts.size:
        # a run ending at the bottom of one column and restarting at the top of the next is one run
        joined = np.zeros(starts.size, bool)
        joined[1:] = starts[1:] == ends[:-1]
        keep_start = ~joined
        keep_end = np.append(~joined[1:], True)
        starts, ends = starts[keep_start], ends[keep_end]
    bounds = np.empty(starts.size * 2 + 2, np.int64)
    bounds[0] = 0
    bounds[1:-1:2] = starts
    bounds[2:-1:2] = ends
    bounds[-1] = height * width
    counts = np.diff(bounds).tolist()
    if len(counts) > 1 and counts[-1] == 0:  # pycocotools ends on the last run of ones
        counts.pop()
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def rle_decode(rle: Mapping[str, Any]) -> np.ndarray:
    """A COCO RLE (str or bytes counts) as an ``(H, W) bool`` mask."""
    counts = rle["counts"]
    r = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(r).astype(bool)


def rle_area(rle: Mapping[str, Any]) -> int:
    """Pixel count of a COCO RLE."""
    counts = rle["counts"]
    r = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return int(mask_utils.area(r))


def _to_instance(p: _Piece, height: int, width: int) -> Instance:
    x0, y0, x1, y1 = p.box
    x0, x1 = max(0.0, x0), min(float(width), x1)
    y0, y1 = max(0.0, y0), min(float(height), y1)
    return Instance(
        class_id=p.class_id,
        score=p.score,
        box=(x0, y0, max(0.0, x1 - x0), max(0.0, y1 - y0)),
        rle=_rle_from_crop(p.mask, p.y0, p.x0, height, width),
        area=p.area,
    )


def detections_to_instances(
    det: Detections, height: int, width: int, *, score_threshold: float = 0.5, max_detections: int = 100
) -> list[Instance]:
    """Threshold, keep the ``max_detections`` best, reframe masks (bilinear, > 0.5) and RLE-encode them."""
    return [_to_instance(p, height, width) for p in _pieces(det, height, width, score_threshold, max_detections)]


def detect_image(
    model: LoadedModel,
    image: np.ndarray,
    *,
    score_threshold: float | None = None,
    max_detections: int | None = None,
    tta: bool | None = None,
    refine: bool | None = None,
) -> list[Instance]:
    """Instances in one ``(H, W, 3) uint8`` image, score descending.

    Thresholds default to the model spec's ``score_threshold`` / ``max_detections``, flip TTA to its
    ``tta`` and mask refinement to its ``refine`` (``refine=False`` gives the detector's own masks).
    Detections whose mask is empty are dropped.
    """
    thr = model.spec.score_threshold if score_threshold is None else score_threshold
    mx = model.spec.max_detections if max_detections is None else max_detections
    h, w = image.shape[:2]
    det = _detector(model)(image, tta=tta)
    return [_to_instance(p, h, w) for p in _pieces(det, h, w, thr, mx, _refinement(model, image, refine))]


def _refinement(model: LoadedModel, rgb: np.ndarray, refine: bool | None) -> _Refine | None:
    """What :func:`_pieces` needs to refine masks on ``rgb``, or None (no ``refine`` in the spec, or off)."""
    ref = model.spec.refine
    if ref is None or refine is False:
        return None
    if model.foreground is None:
        raise InstanceModelError(f"model {model.spec.name}: spec has refine but no foreground model was loaded")
    return _Refine(rgb, model.foreground, ref.weight)


def _detector(model: LoadedModel) -> Detector:
    if not isinstance(model.raw, Detector):
        raise InstanceModelError(f"model {model.spec.name} is not an instance model (kind={model.spec.kind})")
    return model.raw


# --------------------------------------------------------------------------------------------------------
# Converting item pixels to detector input


def _pick_bands(pixels: np.ndarray, bands: Sequence[int] | None) -> np.ndarray:
    """``(C, H, W)`` to ``(3, H, W)``: spec bands (1-based) if given, else the first three; one band is
    replicated (grey), two bands use the first."""
    if bands is not None and len(bands) == 3 and max(bands) <= pixels.shape[0]:
        return pixels[[b - 1 for b in bands]]
    if pixels.shape[0] >= 3:
        return pixels[:3]
    return np.repeat(pixels[:1], 3, axis=0)


def stretch_bounds(
    item: Item, *, low: float = 2.0, high: float = 98.0, bands: Sequence[int] | None = None,
    sample_tile: int = 512, max_samples: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-band ``(lo, hi)`` percentiles (``(3,) float64`` each) of an item, over its valid finite pixels.

    Computed once per item so every tile is stretched the same way; large items are sampled on an even
    grid of at most ``max_samples`` windows of ``sample_tile`` pixels.
    """
    info = item.info
    if info.height * info.width <= 4 * sample_tile * sample_tile:
        windows = [Window(0, 0, info.width, info.height)]
    else:
        n = max(1, int(math.sqrt(max_samples)))
        ys = np.linspace(0, max(info.height - sample_tile, 0), n).astype(int)
        xs = np.linspace(0, max(info.width - sample_tile, 0), n).astype(int)
        windows = [Window(int(x), int(y), min(sample_tile, info.width), min(sample_tile, info.height))
                   for y in ys for x in xs]
    samples = []
    for win in windows:
        px = _pick_bands(np.asarray(item.read(win)), bands).astype(np.float64)
        ok = np.isfinite(px).all(axis=0)
        valid = item.valid_mask(win)
        if valid is not None:
            ok &= valid
        samples.append(px[:, ok])
    data = np.concatenate(samples, axis=1) if samples else np.zeros((3, 0))
    if data.shape[1] == 0:
        return np.zeros(3), np.ones(3)
    return np.percentile(data, low, axis=1), np.percentile(data, high, axis=1)


def to_uint8_rgb(
    pixels: np.ndarray,
    bounds: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    bands: Sequence[int] | None = None,
) -> np.ndarray:
    """Item pixels ``(C, H, W)`` (any dtype) as detector input ``(H, W, 3) uint8``.

    uint8 is passed through; other dtypes are stretched linearly from ``bounds`` (per-band lo, hi, see
    :func:`stretch_bounds`; the window's own 2-98 % percentiles when None) to 0-255. NaNs become 0.
    """
    rgb = _pick_bands(np.asarray(pixels), bands)
    if rgb.dtype == np.uint8:  # always a copy: callers blank nodata in place
        return np.array(np.moveaxis(rgb, 0, -1), order="C", copy=True)
    x = rgb.astype(np.float64)
    if bounds is None:
        finite = np.where(np.isfinite(x), x, np.nan)
        lo = np.nan_to_num(np.nanpercentile(finite.reshape(3, -1), 2.0, axis=1)) if x.size else np.zeros(3)
        hi = np.nan_to_num(np.nanpercentile(finite.reshape(3, -1), 98.0, axis=1)) if x.size else np.ones(3)
    else:
        lo, hi = (np.asarray(b, np.float64) for b in bounds)
    scale = np.where(hi > lo, hi - lo, 1.0)
    y = (x - lo[:, None, None]) / scale[:, None, None] * 255.0
    y = np.nan_to_num(y, nan=0.0, posinf=255.0, neginf=0.0)
    return np.ascontiguousarray(np.moveaxis(np.clip(np.rint(y), 0, 255).astype(np.uint8), 0, -1))


# --------------------------------------------------------------------------------------------------------
# Tiling and merging


def _starts(n: int, tile: int, overlap: int) -> list[int]:
    if n <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, n - tile, stride))
    starts.append(n - tile)  # last tile flush with the edge, so every tile is full size
    return sorted(set(starts))


def tile_windows(height: int, width: int, tile: int, overlap: int) -> list[Window]:
    """Overlapping ``tile x tile`` windows covering a ``height x width`` item, row by row.

    Neighbours overlap by at least ``overlap`` pixels; the last row/column is flush with the item's edge.
    Items smaller than ``tile`` on a side get one window of their size on that side.
    """
    if tile <= 0 or overlap < 0 or overlap >= tile:
        raise ValueError(f"need tile > overlap >= 0, got tile={tile} overlap={overlap}")
    return [Window(x, y, min(tile, width), min(tile, height))
            for y in _starts(height, tile, overlap) for x in _starts(width, tile, overlap)]


def _cuts(p: _Piece, win: Window, height: int, width: int) -> list[tuple[str, int]]:
    """Tile borders (not item borders) that ``p``'s mask touches: where an object may continue."""
    c0, r0 = int(win.col_off), int(win.row_off)
    c1, r1 = c0 + int(win.width), r0 + int(win.height)
    cuts = []
    if c0 > 0 and p.x0 == c0:
        cuts.append(("left", c0))
    if c1 < width and p.x1 == c1:
        cuts.append(("right", c1 - 1))
    if r0 > 0 and p.y0 == r0:
        cuts.append(("top", r0))
    if r1 < height and p.y1 == r1:
        cuts.append(("bottom", r1 - 1))
    return cuts


def _covers(p: _Piece, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Whether ``p``'s mask is set at item pixels (rows[i], cols[i])."""
    inside = (rows >= p.y0) & (rows < p.y1) & (cols >= p.x0) & (cols < p.x1)
    out = np.zeros(rows.shape, bool)
    out[inside] = p.mask[rows[inside] - p.y0, cols[inside] - p.x0]
    return out


def _continues(a: _Piece, b: _Piece) -> float:
    """Largest fraction of one of ``a``'s cut lines that ``b`` covers (on the line or just beyond it).

    "Just beyond" makes pieces from abutting tiles (no overlap) count: they touch at the seam.
    """
    best = 0.0
    for side, line in a.cuts:
        if side in ("left", "right"):
            rows = a.y0 + np.flatnonzero(a.mask[:, line - a.x0])
            cols = np.full(rows.shape, line)
            step = (0, -1) if side == "left" else (0, 1)
        else:
            cols = a.x0 + np.flatnonzero(a.mask[line - a.y0, :])
            rows = np.full(cols.shape, line)
            step = (-1, 0) if side == "top" else (1, 0)
        if rows.size == 0:
            continue
        hit = _covers(b, rows, cols) | _covers(b, rows + step[0], cols + step[1])
        best = max(best, float(hit.mean()))
    return best


def _intersection(a: _Piece, b: _Piece) -> int:
    ys, ye = max(a.y0, b.y0), min(a.y1, b.y1)
    xs, xe = max(a.x0, b.x0), min(a.x1, b.x1)
    if ys >= ye or xs >= xe:
        return 0
    return int(np.count_nonzero(
        a.mask[ys - a.y0 : ye - a.y0, xs - a.x0 : xe - a.x0] & b.mask[ys - b.y0 : ye - b.y0, xs - b.x0 : xe - b.x0]
    ))


def _candidate_pairs(pieces: Sequence[_Piece]) -> Iterator[tuple[int, int]]:
    """Index pairs of pieces whose mask extents overlap or touch (sweep over x)."""
    order = sorted(range(len(pieces)), key=lambda i: pieces[i].x0)
    for n, i in enumerate(order):
        a = pieces[i]
        for j in order[n + 1 :]:
            b = pieces[j]
            if b.x0 > a.x1:  # sorted by x0: nothing further can touch a
                break
            if b.y0 <= a.y1 and a.y0 <= b.y1:
                yield i, j


def _merge_group(group: Sequence[_Piece], score_mode: str) -> _Piece:
    if len(group) == 1:
        return group[0]
    y0, x0 = min(p.y0 for p in group), min(p.x0 for p in group)
    y1, x1 = max(p.y1 for p in group), max(p.x1 for p in group)
    canvas = np.zeros((y1 - y0, x1 - x0), bool)
    for p in group:
        canvas[p.y0 - y0 : p.y1 - y0, p.x0 - x0 : p.x1 - x0] |= p.mask
    if score_mode == "area":
        areas = np.array([p.area for p in group], np.float64)
        score = float(np.dot(areas, [p.score for p in group]) / max(areas.sum(), 1.0))
    else:
        score = max(p.score for p in group)
    box = (min(p.box[0] for p in group), min(p.box[1] for p in group),
           max(p.box[2] for p in group), max(p.box[3] for p in group))
    return _Piece(class_id=group[0].class_id, score=score, y0=y0, x0=x0, mask=canvas, box=box, tile=-1)


def _merge_pieces(
    pieces: Sequence[_Piece], *, merge_threshold: float, seam_fraction: float, score_mode: str
) -> list[_Piece]:
    parent = list(range(len(pieces)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in _candidate_pairs(pieces):
        a, b = pieces[i], pieces[j]
        # Same-tile pairs were already separated by the detector's own NMS: leave them alone.
        if a.class_id != b.class_id or a.tile == b.tile or find(i) == find(j):
            continue
        inter = _intersection(a, b)
        small = min(a.area, b.area)
        same = (small > 0 and inter / small >= merge_threshold) or (
            max(_continues(a, b), _continues(b, a)) >= seam_fraction
        )
        if same:
            parent[find(j)] = find(i)
    groups: dict[int, list[_Piece]] = {}
    for i, p in enumerate(pieces):
        groups.setdefault(find(i), []).append(p)
    return [_merge_group(g, score_mode) for g in groups.values()]


def merge_instances(
    instances: Sequence[Instance],
    tiles: Sequence[int],
    windows: Sequence[Window],
    *,
    merge_threshold: float = 0.5,
    seam_fraction: float = 0.5,
    score_mode: Literal["max", "area"] = "max",
) -> list[Instance]:
    """Merge instances (already in item coordinates) found on overlapping tiles.

    ``tiles[i]`` is the index into ``windows`` of the tile that produced ``instances[i]``. Two instances
    of the same class from different tiles become one when their intersection covers at least
    ``merge_threshold`` of the smaller mask (duplicates in the overlap, a cut half inside the whole), or
    when one was cut by its tile's border and the other covers at least ``seam_fraction`` of that cut
    line (on it or one pixel beyond: touching at the seam counts). Merged: mask = union, box = union,
    score = max (``score_mode="area"``: area-weighted mean). Returns score-descending instances.
    """
    if not instances:
        return []
    height, width = instances[0].rle["size"]
    pieces = []
    for inst, t in zip(instances, tiles, strict=True):
        full = rle_decode(inst.rle)
        tight = _tighten(0, 0, full)
        if tight is None:
            continue
        x, y, w, h = inst.box
        p = _Piece(inst.class_id, inst.score, tight[0], tight[1], tight[2], (x, y, x + w, y + h), tile=t)
        p.cuts = _cuts(p, windows[t], height, width)
        pieces.append(p)
    merged = _merge_pieces(pieces, merge_threshold=merge_threshold, seam_fraction=seam_fraction,
                           score_mode=score_mode)
    merged.sort(key=lambda p: -p.score)
    return [_to_instance(p, height, width) for p in merged]


def detect_item(
    item: Item,
    model: LoadedModel,
    *,
    tile: int | None = None,
    overlap: int | None = None,
    score_threshold: float | None = None,
    max_detections: int | None = None,
    merge_threshold: float = 0.5,
    seam_fraction: float = 0.5,
    score_mode: Literal["max", "area"] = "max",
    refine: bool | None = None,
) -> list[Instance]:
    """Instances of a whole item in item pixel coordinates, score descending.

    Items no larger than ``tile`` (default: the spec's ``input_size``; ``0`` = never tile) are detected in
    one call. Larger items are read window by window (``tile`` square, ``overlap`` pixels shared, default
    the spec's ``overlap``), instances are shifted to item coordinates and merged across tiles (see
    :func:`merge_instances`). ``max_detections`` applies per detector call. Pixels outside the item's
    valid mask are blanked in the input and removed from masks. Non-uint8 items are percentile-stretched
    (2-98 %, per band, bounds computed once per item); one band is replicated to RGB. With the spec's
    ``refine`` (unless ``refine=False``) the semantic model runs on the surroundings of each detection.
    """
    spec = model.spec
    detector = _detector(model)
    tile = spec.input_size if tile is None else tile
    overlap = spec.overlap if overlap is None else overlap
    thr = spec.score_threshold if score_threshold is None else score_threshold
    mx = spec.max_detections if max_detections is None else max_detections
    height, width = item.info.height, item.info.width
    bands = spec.bands if spec.channels == 3 else None
    if tile <= 0 or (height <= tile and width <= tile):
        windows = [Window(0, 0, width, height)]
    else:
        windows = tile_windows(height, width, tile, min(overlap, tile - 1))
    bounds = None if item.info.dtype == "uint8" else stretch_bounds(item, bands=bands)

    pieces: list[_Piece] = []
    for t, win in enumerate(windows):
        valid = item.valid_mask(win)
        if valid is not None and not valid.any():
            continue
        rgb = to_uint8_rgb(item.read(win), bounds, bands=bands)
        if valid is not None:
            rgb[~valid] = 0
        h, w = rgb.shape[:2]
        for p in _pieces(detector(rgb), h, w, thr, mx, _refinement(model, rgb, refine)):
            if valid is not None:
                p.mask = p.mask & valid[p.y0 : p.y1, p.x0 : p.x1]
                tight = _tighten(p.y0, p.x0, p.mask)
                if tight is None:
                    continue
                p.y0, p.x0, p.mask = tight
            c0, r0 = int(win.col_off), int(win.row_off)
            p.y0 += r0
            p.x0 += c0
            p.box = (p.box[0] + c0, p.box[1] + r0, p.box[2] + c0, p.box[3] + r0)
            p.tile = t
            p.cuts = _cuts(p, win, height, width)
            pieces.append(p)
    if len(windows) > 1:
        pieces = _merge_pieces(pieces, merge_threshold=merge_threshold, seam_fraction=seam_fraction,
                               score_mode=score_mode)
    pieces.sort(key=lambda p: -p.score)
    return [_to_instance(p, height, width) for p in pieces]


# --------------------------------------------------------------------------------------------------------
# Outputs


def instance_figures(
    instances: Sequence[Instance],
    class_names: Mapping[int, str] | Sequence[str],
    pixel_area: float | None,
    area_unit: str | None,
) -> list[dict[str, Any]]:
    """Per-class figures for one item, for classes with at least one instance, by class id.

    ``class_names``: ``{class_id: name}`` (e.g. :func:`class_name_map`), or a list indexed by class id.
    Each dict: ``class_id``, ``class_name``, ``instance_count``, ``area_px`` (pixels), ``area`` (pixels x
    ``pixel_area`` in ``area_unit``, None without a physical scale), ``area_unit``, ``mean_score``.
    """
    by_class: dict[int, list[Instance]] = {}
    for inst in instances:
        by_class.setdefault(inst.class_id, []).append(inst)
    out = []
    for cid in sorted(by_class):
        group = by_class[cid]
        area_px = int(sum(i.area for i in group))
        out.append({
            "class_id": cid,
            "class_name": _name_of(class_names, cid),
            "instance_count": len(group),
            "area_px": area_px,
            "area": area_px * pixel_area if pixel_area is not None else None,
            "area_unit": area_unit if pixel_area is not None else None,
            "mean_score": float(np.mean([i.score for i in group])),
        })
    return out


def to_coco_results(
    instances: Sequence[Instance], image_id: int, category_map: Mapping[int, int] | None = None
) -> list[dict[str, Any]]:
    """COCO results-format dicts (``image_id``, ``category_id``, ``segmentation``, ``bbox``, ``score``,
    ``area``). ``category_map`` renumbers model class ids (ids absent from it are dropped)."""
    out = []
    for inst in instances:
        cid = inst.class_id
        if category_map is not None:
            if cid not in category_map:
                continue
            cid = category_map[cid]
        out.append({
            "image_id": image_id,
            "category_id": int(cid),
            "segmentation": {"size": list(inst.rle["size"]), "counts": inst.rle["counts"]},
            "bbox": [float(v) for v in inst.box],
            "score": float(inst.score),
            "area": int(inst.area),
        })
    return out
