"""Semantic segmentation runner: an adapter :class:`Item`, a :class:`LoadedModel` and a :class:`MaskSink`.

Per item: pick the model's bands, normalise per the spec, predict (``tile``: streamed sliding windows at
native resolution; ``resize``: whole image resized to the model input, many items per model call), turn
probabilities into class ids (argmax, uint8) and confidence (max probability, float32), blank nodata
(class 255, confidence 0), hand blocks to the sink and count per-class figures. The caller closes the
sink (``sink.close()`` returns the artifacts it records).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from adapters.base import AdapterError, Item, MaskSink, Window
from pipelines.metrics import ClassAccumulator, scores
from pipelines.normalize import BandStats, band_stats, normalize
from pipelines.registry import LoadedModel
from pipelines.spec import ModelSpec
from pipelines.tiling import TiledRaster, TilingConfig, axis_starts, predict_tiled_many, window_grid

__all__ = [
    "NODATA_CLASS",
    "ClassFigure",
    "SemanticResult",
    "bilinear_matrix",
    "predict_multiscale",
    "tta_edges",
    "resize_bilinear",
    "input_resizer",
    "resize_photo",
    "shrink_matrix",
    "segment_item",
    "segment_items",
]

#: Class id written where the input has no data.
NODATA_CLASS = 255
#: Streamed rasters in ``resize`` mode are read whole only up to this many pixels.
MAX_RESIZE_PIXELS = 8192 * 8192
#: Rows per block when resized probabilities are scaled back and written (bounds memory for big photos).
_RESIZE_BLOCK_ROWS = 512
#: Windows sampled over a streamed raster for percentile statistics (a grid of n x n windows).
_STATS_GRID = 8
_STATS_WINDOW = 256


@dataclass
class ClassFigure:
    """Figures for one class over an item's valid pixels (``area`` in ``area_unit``, e.g. m2 or mm2)."""

    class_id: int
    name: str
    pixel_count: int
    fraction: float
    mean_confidence: float | None
    area: float | None
    area_unit: str | None
    dice: float | None = None
    iou: float | None = None


@dataclass
class SemanticResult:
    """Per-class figures of one item; ``confusion`` ``(K, K) int64`` (rows = truth) when truth was given."""

    figures: list[ClassFigure]
    valid_pixels: int
    total_pixels: int
    confusion: np.ndarray | None = None


def _label(item: Item) -> str:
    path = getattr(item, "path", None) or item.info.extra.get("path") or item.info.extra.get("filename")
    name = str(path) if path else "item"
    return f"{name}[{item.key}]" if item.key else name


def _num_classes(spec: ModelSpec) -> int:
    return max(c.id for c in spec.classes) + 1


def _band_indices(item: Item, spec: ModelSpec) -> list[int]:
    """0-based band indices, in model order, to take from the item's ``(C, H, W)`` pixels."""
    n = item.info.bands
    if spec.bands is not None:
        if min(spec.bands) < 1 or max(spec.bands) > n:
            raise AdapterError(
                f"{_label(item)}: model {spec.name} reads bands {spec.bands} but the input has {n} band(s)"
            )
        return [b - 1 for b in spec.bands]
    if n >= spec.channels:
        return list(range(spec.channels))
    if n == 1 and spec.channels == 3:
        return [0, 0, 0]
    raise AdapterError(
        f"{_label(item)}: model {spec.name} needs {spec.channels} band(s) but the input has {n}"
    )


def _read_bands(item: Item, window: Window | None, idx: list[int]) -> np.ndarray:
    raw = item.read(window)
    if raw.ndim != 3 or raw.shape[0] <= max(idx):
        raise AdapterError(f"{_label(item)}: read returned shape {raw.shape}, expected (bands, H, W)")
    if window is not None and raw.shape[1:] != (int(window.height), int(window.width)):
        raise AdapterError(f"{_label(item)}: read {window} returned {raw.shape[1:]} pixels")
    return raw[idx]


def _sample_windows(height: int, width: int) -> list[Window]:
    """A spread of windows over the raster for statistics (all of it when small)."""
    size = _STATS_WINDOW
    if height * width <= (size * _STATS_GRID) ** 2:
        return [Window(0, 0, width, height)]
    rows = np.linspace(0, max(height - size, 0), _STATS_GRID).astype(int)
    cols = np.linspace(0, max(width - size, 0), _STATS_GRID).astype(int)
    return [Window(int(c), int(r), min(size, width), min(size, height)) for r in rows for c in cols]


def _stats_for(item: Item, spec: ModelSpec, idx: list[int], whole: np.ndarray | None,
               whole_valid: np.ndarray | None) -> BandStats | None:
    norm = spec.normalization
    if norm.kind != "percentile":
        return None
    if whole is not None:
        return band_stats(whole, norm.low, norm.high, whole_valid)
    samples, masks = [], []
    for win in _sample_windows(item.info.height, item.info.width):
        px = _read_bands(item, win, idx)
        v = item.valid_mask(win)
        samples.append(px.reshape(px.shape[0], -1))
        masks.append(np.ones(px.shape[1] * px.shape[2], bool) if v is None else v.reshape(-1))
    sample = np.concatenate(samples, axis=1)[:, None, :]
    return band_stats(sample, norm.low, norm.high, np.concatenate(masks)[None, :])


def _check_truth(item: Item, truth: np.ndarray | None, rows: tuple[int, int] | None = None) -> None:
    height = item.info.height if rows is None else rows[1] - rows[0]
    if truth is not None and truth.shape != (height, item.info.width):
        raise AdapterError(
            f"{_label(item)}: ground truth shape {truth.shape} != image "
            f"({height}, {item.info.width})"
        )


class _ItemRun:
    """State of one item while its blocks stream through: reading, figures, sink writes."""

    def __init__(self, item: Item, spec: ModelSpec, sink: MaskSink, truth: np.ndarray | None,
                 progress: Callable[[float], None] | None, *, read_whole: bool,
                 rows: tuple[int, int] | None = None) -> None:
        _check_truth(item, truth, rows)
        self.item, self.spec, self.sink, self.truth, self.progress = item, spec, sink, truth, progress
        self.rows = rows
        self.idx = _band_indices(item, spec)
        self.acc = ClassAccumulator(_num_classes(spec))
        self.done_pixels = 0
        height = item.info.height if rows is None else rows[1] - rows[0]
        self.total = height * item.info.width
        self.read_whole = read_whole
        self.whole: np.ndarray | None = None
        self.whole_valid: np.ndarray | None = None
        self.stats: BandStats | None = None
        self.loaded = False
        self.tiles_left = len(window_grid(item.info.height, item.info.width, spec.input_size, spec.overlap))
        if rows is not None:
            th = min(spec.input_size, item.info.height)
            starts = axis_starts(item.info.height, spec.input_size, spec.overlap)
            n_rows = sum(1 for r in starts if r < rows[1] and r + th > rows[0])
            self.tiles_left = n_rows * len(axis_starts(item.info.width, spec.input_size, spec.overlap))
        # Valid masks of tiles read but not yet emitted, keyed by tile origin: the tiling engine
        # guarantees each block starts at the origin of a tile window that was read and lies inside
        # it, so the writer thread never touches the item (adapters are not thread-safe).
        self._masks: dict[tuple[int, int], np.ndarray | None] = {}
        self._lock = threading.Lock()

    def load(self) -> None:
        """Read the pixels (whole items) and the percentile stats; done lazily so that a batch of many
        items only ever holds the ones being predicted."""
        item = self.item
        if self.read_whole:
            self.whole = _read_bands(item, None, self.idx)
            if self.whole.shape[1:] != (item.info.height, item.info.width):
                raise AdapterError(
                    f"{_label(item)}: read returned {self.whole.shape[1:]} pixels, info says "
                    f"({item.info.height}, {item.info.width})"
                )
            valid = item.valid_mask(None)
            self.whole_valid = None if valid is None else np.asarray(valid, bool)
        self.stats = _stats_for(item, self.spec, self.idx, self.whole, self.whole_valid)
        self.loaded = True

    def unload(self) -> None:
        self.whole = self.whole_valid = None

    def read_tile(self, win: Window) -> np.ndarray:
        """Tiling ``read`` callback (reader thread): ``(h, w, C)`` float32 model input of ``win``."""
        if not self.loaded:
            self.load()
        r, c, h, w = int(win.row_off), int(win.col_off), int(win.height), int(win.width)
        if self.whole is not None:
            raw = self.whole[:, r : r + h, c : c + w]
            valid = None if self.whole_valid is None else self.whole_valid[r : r + h, c : c + w]
        else:
            raw = _read_bands(self.item, win, self.idx)
            valid = self.item.valid_mask(win)
        x = normalize(raw, self.spec.normalization, self.stats)
        if valid is not None:
            valid = np.asarray(valid, bool)
            x[~valid] = 0.0  # nodata fill values must not steer the neighbours' predictions
        with self._lock:
            self._masks[(r, c)] = valid
        self.tiles_left -= 1
        if self.tiles_left == 0:
            self.unload()  # the masks of pending blocks stay referenced in _masks
        return x

    def emit_probs(self, win: Window, probs: np.ndarray) -> None:
        r, c, h, w = int(win.row_off), int(win.col_off), int(win.height), int(win.width)
        with self._lock:
            tile_valid = self._masks.pop((r, c), None)
        valid = None if tile_valid is None else tile_valid[:h, :w]
        if self.rows is not None:
            # A part of a split raster: keep the block's rows inside the part, in part coordinates.
            start, stop = self.rows
            a, b = max(r, start), min(r + h, stop)
            if a >= b:
                return
            probs = probs[a - r : b - r]
            valid = None if valid is None else valid[a - r : b - r]
            win = Window(c, a - start, w, b - a)
        self.write(win, probs, valid)

    def write(self, win: Window, probs: np.ndarray, valid: np.ndarray | None) -> None:
        """Class ids + confidence for one block of ``(h, w, K)`` probabilities; figures; sink write."""
        r, c, h, w = int(win.row_off), int(win.col_off), int(win.height), int(win.width)
        classes, conf = label_and_confidence(probs)
        if valid is not None:
            classes[~valid] = NODATA_CLASS
            conf[~valid] = 0.0
        truth = None if self.truth is None else self.truth[r : r + h, c : c + w]
        self.acc.update(classes, conf, valid, truth)
        self.sink.write(win, classes, conf)
        self.done_pixels += h * w
        if self.progress is not None:
            self.progress(self.done_pixels / self.total)

    def result(self) -> SemanticResult:
        spec, info, acc = self.spec, self.item.info, self.acc
        mean_conf = acc.mean_confidence()
        fractions = acc.fractions()
        per_class = scores(acc.confusion)["per_class"] if acc.confusion is not None else None
        figures = []
        for cls in spec.classes:
            n = int(acc.counts[cls.id])
            figures.append(ClassFigure(
                class_id=cls.id,
                name=cls.name,
                pixel_count=n,
                fraction=fractions[cls.id],
                mean_confidence=mean_conf[cls.id],
                area=n * info.pixel_area if info.pixel_area is not None else None,
                area_unit=info.area_unit if info.pixel_area is not None else None,
                dice=per_class[cls.id]["dice"] if per_class else None,
                iou=per_class[cls.id]["iou"] if per_class else None,
            ))
        return SemanticResult(figures=figures, valid_pixels=acc.valid_pixels, total_pixels=acc.total_pixels,
                              confusion=acc.confusion)


def label_and_confidence(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(h, w, K)`` scores -> ``(h, w) uint8`` argmax (first index on ties) and ``(h, w) float32`` maximum.

    Equal to ``argmax(-1)`` and ``max(-1)``, but a channel at a time: numpy reduces a last axis of 2-3 classes
    element by element, which on a camera photo cost more than scaling its probabilities back.
    """
    conf = np.array(probs[..., 0], copy=True)  # compared in the input's own precision, as argmax does
    classes = np.zeros(probs.shape[:-1], np.uint8)
    for k in range(1, probs.shape[-1]):
        pk = probs[..., k]
        better = pk > conf
        np.copyto(conf, pk, where=better)
        classes[better] = k
    return classes, conf.astype(np.float32, copy=False)


def bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``(n_out, n_in) float32`` 1-D bilinear resampling matrix, half-pixel centres, no antialiasing
    (the same sampling as ``tf.image.resize(..., "bilinear")``)."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    m = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1.0 - frac)
    np.add.at(m, (rows, i1), frac)
    return m.astype(np.float32)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(H, W, C) float32`` -> ``(height, width, C) float32``, bilinear (see :func:`bilinear_matrix`)."""
    my = bilinear_matrix(height, image.shape[0])
    mx = bilinear_matrix(width, image.shape[1])
    tmp = np.tensordot(my, image, axes=(1, 0))  # (height, W, C)
    return np.ascontiguousarray(np.einsum("pw,hwc->hpc", mx, tmp, optimize=True), dtype=np.float32)


def shrink_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``(n_out, n_in) float32`` 1-D resampling matrix for photos: when shrinking, a triangle filter widened
    by the ratio ``n_in / n_out`` (what ``tf.image.resize(..., "bilinear", antialias=True)`` and PIL's
    bilinear reduce do), so each output pixel averages the input it covers; when enlarging, the same as
    :func:`bilinear_matrix`.

    A photo many times larger than the model's input (a phone's 4000 px against 192) sampled at two input
    pixels per output pixel would hand the model aliased fur and sensor noise it never saw in training;
    its training photos were downscaled with such a filter.
    """
    if n_out >= n_in:
        return bilinear_matrix(n_out, n_in)
    ratio = n_in / n_out
    centre = (np.arange(n_out, dtype=np.float64) + 0.5) * ratio - 0.5
    m = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in, dtype=np.float64)[None, :] - centre[:, None]) / ratio)
    # Rows are normalised over the pixels inside the image: the edge is neither darkened nor mirrored.
    return (m / m.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_photo(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(H, W, C) float32`` -> ``(height, width, C) float32`` with :func:`shrink_matrix` on each axis:
    antialiased when shrinking, bilinear when enlarging. For model inputs; probabilities are scaled back
    with :func:`resize_bilinear`."""
    my = shrink_matrix(height, image.shape[0])
    mx = shrink_matrix(width, image.shape[1])
    tmp = np.tensordot(my, image, axes=(1, 0))
    return np.ascontiguousarray(np.einsum("pw,hwc->hpc", mx, tmp, optimize=True), dtype=np.float32)


def tta_edges(size: int, extra_sizes: Sequence[int] = ()) -> list[int]:
    """The input edges of multi-scale test-time augmentation: ``size`` first, then the other sizes."""
    return [size, *(t for t in dict.fromkeys(extra_sizes) if t != size)]


def predict_multiscale(
    predict: Callable[[np.ndarray], np.ndarray],
    batches: dict[int, np.ndarray],
    size: int,
    num_classes: int | None = None,
) -> np.ndarray:
    """Whole-image prediction averaged over input sizes (multi-scale test-time augmentation).

    ``batches`` maps each input edge ``s`` to the same ``N`` images resized to it, ``(N, s, s, C) float32``
    (see :func:`tta_edges`); ``predict`` maps such a batch to ``(N, s, s, K)`` probabilities. Those at
    other sizes than ``size`` are resampled (bilinear) to ``size`` and all are averaged. Returns
    ``(N, size, size, K) float32``. Raises ``ValueError`` when ``predict`` returns another shape (or another
    ``K`` than ``num_classes``).
    """
    total: np.ndarray | None = None
    for s, x in batches.items():
        y = np.asarray(predict(x), np.float32)
        k = num_classes or (y.shape[-1] if y.ndim == 4 else 0)
        if y.shape != (len(x), s, s, k):
            raise ValueError(f"model returned shape {y.shape} for a {s}x{s} input; expected {(len(x), s, s, k)}")
        if s != size:
            m = bilinear_matrix(size, s)
            y = np.einsum("pw,nhwc->nhpc", m, y, optimize=True)
            y = np.einsum("ph,nhwc->npwc", m, y, optimize=True)
        total = y if total is None else total + y
    if total is None:
        raise ValueError("no input size to predict at")
    return (total / len(batches)).astype(np.float32)


def _tiling_config(spec: ModelSpec) -> TilingConfig:
    return TilingConfig(tile=spec.input_size, overlap=spec.overlap, batch_size=spec.batch_size,
                        blend=spec.blend)


def input_resizer(spec: ModelSpec) -> Callable[[np.ndarray, int, int], np.ndarray]:
    """The spec's ``resize_filter``: :func:`resize_photo` (``antialias``) or :func:`resize_bilinear`."""
    return resize_photo if spec.resize_filter == "antialias" else resize_bilinear


def _run_resize(runs: Sequence[_ItemRun], model: LoadedModel) -> None:
    spec = model.spec
    s = spec.input_size
    shrink = input_resizer(spec)
    edges = tta_edges(s, spec.tta_sizes)
    for start in range(0, len(runs), spec.batch_size):
        chunk = runs[start : start + spec.batch_size]
        inputs: dict[int, list[np.ndarray]] = {e: [] for e in edges}
        for run in chunk:
            run.load()
            assert run.whole is not None
            x = normalize(run.whole, spec.normalization, run.stats)
            if run.whole_valid is not None:
                x[~run.whole_valid] = 0.0
            for e in edges:
                inputs[e].append(shrink(x, e, e))
        try:
            probs = predict_multiscale(model.predict, {e: np.stack(v) for e, v in inputs.items()}, s,
                                       _num_classes(spec))
        except ValueError as e:
            raise ValueError(f"model {spec.name}: {e}") from e
        for run, p in zip(chunk, probs, strict=True):
            h, w = run.item.info.height, run.item.info.width
            my = bilinear_matrix(h, s)
            mx = bilinear_matrix(w, s)
            tmp = np.einsum("pw,hwc->hpc", mx, p, optimize=True)  # (s, w, K)
            # Scale back in row blocks so a large photo never holds (H, W, K) float32 at once.
            for r0 in range(0, h, _RESIZE_BLOCK_ROWS):
                r1 = min(h, r0 + _RESIZE_BLOCK_ROWS)
                block = np.tensordot(my[r0:r1], tmp, axes=(1, 0))
                valid = None if run.whole_valid is None else run.whole_valid[r0:r1]
                run.write(Window(0, r0, w, r1 - r0), block, valid)
            run.unload()


def _prepare(item: Item, spec: ModelSpec, sink: MaskSink, truth: np.ndarray | None,
             progress: Callable[[float], None] | None, rows: tuple[int, int] | None = None) -> _ItemRun:
    if spec.kind != "semantic":
        raise ValueError(f"model {spec.name} is a {spec.kind} model, not semantic")
    if rows is not None and (spec.mode != "tile" or not item.streamable):
        raise ValueError("a row range needs a tile-mode model and a streamable item")
    if spec.mode == "resize" and item.streamable and item.info.height * item.info.width > MAX_RESIZE_PIXELS:
        raise AdapterError(
            f"{_label(item)}: {item.info.width}x{item.info.height} is too large for resize-mode model "
            f"{spec.name}; use a tile-mode model"
        )
    # Resize mode needs the whole image (streamed ones only when small enough, checked above).
    read_whole = spec.mode == "resize" or not item.streamable
    return _ItemRun(item, spec, sink, truth, progress, read_whole=read_whole, rows=rows)


def segment_items(
    items: Sequence[Item],
    model: LoadedModel,
    sinks: Sequence[MaskSink],
    *,
    ground_truths: Sequence[np.ndarray | None] | None = None,
) -> list[SemanticResult]:
    """Segment many items with one model, batching across items.

    ``resize`` models: ``batch_size`` items per model call. ``tile`` models: tiles of consecutive items
    share batches (small images fill a batch together; large rasters stream as in :func:`segment_item`).
    ``ground_truths[i]`` is ``(H, W)`` int class ids for ``items[i]`` (255 = ignore) or None.
    Raises :class:`AdapterError` for unreadable items or band mismatches (the caller may then retry
    items one by one to isolate the bad one).
    """
    if len(sinks) != len(items):
        raise ValueError(f"{len(items)} items but {len(sinks)} sinks")
    truths = list(ground_truths) if ground_truths is not None else [None] * len(items)
    if len(truths) != len(items):
        raise ValueError(f"{len(items)} items but {len(truths)} ground truths")
    spec = model.spec
    runs = [_prepare(it, spec, sk, gt, None) for it, sk, gt in zip(items, sinks, truths, strict=True)]
    _execute(runs, model)
    return [run.result() for run in runs]


def _execute(runs: Sequence[_ItemRun], model: LoadedModel) -> None:
    spec = model.spec
    if spec.mode == "resize":
        _run_resize(runs, model)
        return
    rasters = [TiledRaster(run.read_tile, run.item.info.height, run.item.info.width, run.emit_probs, run.rows)
               for run in runs]
    predict_tiled_many(rasters, model.predict, _num_classes(spec), _tiling_config(spec))


def segment_item(
    item: Item,
    model: LoadedModel,
    sink: MaskSink,
    *,
    ground_truth: np.ndarray | None = None,
    progress: Callable[[float], None] | None = None,
    rows: tuple[int, int] | None = None,
) -> SemanticResult:
    """Segment one item and stream its class ids and confidence into ``sink`` (not closed here).

    ``ground_truth`` ``(H, W)`` int class ids (255 = ignore) adds a confusion matrix and per-class Dice/IoU.
    ``progress(fraction in [0, 1])`` is called after each written block (from a worker thread).
    Streamed items (``item.streamable``) are read window by window, never whole.
    ``rows=(start, stop)`` segments only those rows of a streamed raster (one part of a raster split over
    several tasks): the result equals the same rows of a whole-raster run, because the part predicts
    exactly the full-raster grid's tiles that touch it. Windows given to ``sink`` and ``ground_truth`` are
    then in part coordinates (row 0 = ``start``); figures cover the part only.
    """
    run = _prepare(item, model.spec, sink, ground_truth, progress, rows)
    _execute([run], model)
    return run.result()

