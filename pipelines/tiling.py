"""Streaming sliding-window inference: window grid, blend weights, bounded accumulation.

Pure numpy (no TensorFlow import): the model is any ``predict((N, S, S, C)) -> (N, S, S, K)`` callable.

How a raster flows through :func:`predict_tiled`::

    reader thread:  read(window) -> pad to (S, S, C) ----> bounded queue
    caller thread:  stack batch_size tiles -> predict -----> bounded queue
    writer thread:  weight, add into the pending cells, emit every finished block (h, w, K)

Tiles are visited row-major over a grid whose windows all have the same size (the last row/column is
shifted back inside the raster, as MONAI does, so only rasters smaller than a tile need padding).
Because of that grid, block ``(i, j)`` = rows ``[r_i, r_{i+1})`` x cols ``[c_j, c_{j+1})`` is touched only
by tiles ``(i', j')`` with ``i' <= i`` and ``j' <= j``: it is final as soon as tile ``(i, j)`` has been
added, and it starts at that tile's origin and lies inside it. Only pixels touched but not yet emitted are
held (about ``2 x overlap x width x K`` float32 plus a tile), so memory does not depend on the raster
height; the weight normaliser is separable (every tile uses the same outer-product window) and costs two
1-D arrays.
"""

from __future__ import annotations

import bisect
import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from rasterio.windows import Window

__all__ = [
    "TiledRaster",
    "TilingConfig",
    "axis_starts",
    "blend_weights",
    "blend_weights_1d",
    "predict_array",
    "predict_tiled",
    "predict_tiled_many",
    "window_grid",
]

BlendKind = Literal["gaussian", "cosine", "constant"]

#: Floor of the 1-D blend window so that every pixel keeps a positive, well-conditioned weight
#: (nnU-Net replaces zeros by the smallest positive value for the same reason).
_WEIGHT_FLOOR = 1e-4


@dataclass(frozen=True)
class TilingConfig:
    """Sliding-window settings.

    ``tile``: model input edge in pixels; ``overlap``: pixels shared by neighbouring tiles (``< tile / 2``
    is what model specs allow, anything ``< tile`` works here); ``batch_size``: tiles per model call;
    ``blend``: weight window for overlapping predictions; ``pad_mode``: how tiles are filled past the
    raster edge (only rasters smaller than a tile need it); ``prefetch``: batches buffered between the
    reader, the model and the writer (0 runs everything on the caller's thread).
    """

    tile: int
    overlap: int
    batch_size: int = 8
    blend: BlendKind = "gaussian"
    pad_mode: Literal["reflect", "constant"] = "reflect"
    prefetch: int = 2

    def __post_init__(self) -> None:
        if self.tile < 1:
            raise ValueError(f"tile must be >= 1, got {self.tile}")
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"overlap must be in [0, tile), got {self.overlap} for tile {self.tile}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.blend not in ("gaussian", "cosine", "constant"):
            raise ValueError(f"unknown blend {self.blend!r}")
        if self.pad_mode not in ("reflect", "constant"):
            raise ValueError(f"unknown pad_mode {self.pad_mode!r}")
        if self.prefetch < 0:
            raise ValueError("prefetch must be >= 0")


def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile start offsets along one axis of ``length`` pixels (sorted, unique, first 0).

    The stride is ``tile - overlap``; the last tile is shifted back to end at ``length`` so that every
    tile lies inside the raster. ``length <= tile`` gives ``[0]``.
    """
    if length < 1:
        raise ValueError(f"raster dimension must be >= 1, got {length}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    if stride < 1:
        raise ValueError(f"overlap {overlap} leaves no stride for tile {tile}")
    n = math.ceil((length - tile) / stride) + 1
    starts = [min(i * stride, length - tile) for i in range(n)]
    return sorted(set(starts))


def window_grid(height: int, width: int, tile: int, overlap: int) -> list[Window]:
    """Row-major tile windows covering a ``height x width`` raster.

    Every window has size ``min(tile, height) x min(tile, width)``; neighbours overlap by at least
    ``overlap`` pixels (more at the shifted last row/column).
    """
    rows = axis_starts(height, tile, overlap)
    cols = axis_starts(width, tile, overlap)
    th, tw = min(tile, height), min(tile, width)
    return [Window(c, r, tw, th) for r in rows for c in cols]


def blend_weights_1d(tile: int, kind: str) -> np.ndarray:
    """``(tile,) float32`` window, maximum 1, > 0 everywhere; :func:`blend_weights` is its outer product.

    ``gaussian``: sigma = tile / 8 (nnU-Net); ``cosine``: Hann window sampled at pixel centres
    (``sin^2``); ``constant``: ones.
    """
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    x = np.arange(tile, dtype=np.float64) + 0.5
    if kind == "gaussian":
        sigma = tile / 8.0
        w = np.exp(-0.5 * ((x - tile / 2.0) / sigma) ** 2)
    elif kind == "cosine":
        w = np.sin(np.pi * x / tile) ** 2
    elif kind == "constant":
        w = np.ones(tile)
    else:
        raise ValueError(f"unknown blend kind {kind!r}; use gaussian, cosine or constant")
    w = w / w.max()
    return np.maximum(w, _WEIGHT_FLOOR).astype(np.float32)


def blend_weights(tile: int, kind: str) -> np.ndarray:
    """``(tile, tile) float32`` blend window, maximum 1, > 0 everywhere (see :func:`blend_weights_1d`)."""
    w = blend_weights_1d(tile, kind)
    return np.outer(w, w).astype(np.float32)


@dataclass
class TiledRaster:
    """One raster for :func:`predict_tiled_many`.

    ``read(window) -> (h, w, C) float32`` (normalised model input for that window);
    ``emit(window, probs (h, w, K) float32)`` receives finished blocks.
    """

    read: Callable[[Window], np.ndarray]
    height: int
    width: int
    emit: Callable[[Window, np.ndarray], None]
    #: Only rows ``[start, stop)`` are wanted (a part of a raster split across tasks): only the tiles of
    #: the full-raster grid that touch them are predicted. Emitted blocks may extend outside the range;
    #: their rows inside it equal the full-raster run exactly (same grid, same weights), the rest is to be
    #: discarded by the caller.
    rows: tuple[int, int] | None = None


class _Accumulator:
    """Accumulator for one raster, holding only pixels touched by a tile but not yet emitted.

    Tile edges cut the raster into cells (rows between consecutive tile starts/ends, same for columns).
    A tile adds its weighted prediction into the cells it covers (allocated on first touch); once tile
    ``(i, j)`` is added, block ``(i, j)`` is final and its cells are assembled, normalised, emitted and
    freed. What stays alive is about two overlap-high full-width bands plus one tile, so memory grows
    with ``overlap x width``, not ``tile x width`` and not with the height.
    """

    def __init__(self, raster: TiledRaster, cfg: TilingConfig, num_classes: int) -> None:
        self.raster = raster
        self.rows = axis_starts(raster.height, cfg.tile, cfg.overlap)
        self.cols = axis_starts(raster.width, cfg.tile, cfg.overlap)
        self.th = min(cfg.tile, raster.height)
        self.tw = min(cfg.tile, raster.width)
        self.wy = blend_weights_1d(self.th, cfg.blend)
        self.wx = blend_weights_1d(self.tw, cfg.blend)
        # Sum of the 1-D windows over all tiles covering each row / column: the weight of pixel (y, x)
        # summed over tiles is norm_y[y] * norm_x[x] because the grid is a Cartesian product.
        self.norm_y = _axis_norm(self.rows, self.wy, raster.height)
        self.norm_x = _axis_norm(self.cols, self.wx, raster.width)
        self.row_ends = self.rows[1:] + [raster.height]
        self.col_ends = self.cols[1:] + [raster.width]
        self.row_cuts = sorted({0, raster.height, *self.rows, *(r + self.th for r in self.rows)})
        self.col_cuts = sorted({0, raster.width, *self.cols, *(c + self.tw for c in self.cols)})
        self.num_classes = num_classes
        self.cells: dict[tuple[int, int], np.ndarray] = {}

    @property
    def row_indices(self) -> list[int]:
        """Tile rows to predict: all, or those touching the wanted row range."""
        if self.raster.rows is None:
            return list(range(len(self.rows)))
        start, stop = self.raster.rows
        return [i for i, r in enumerate(self.rows) if r < stop and r + self.th > start]

    def tiles(self) -> Iterator[tuple[int, int, Window]]:
        for i in self.row_indices:
            r = self.rows[i]
            for j, c in enumerate(self.cols):
                yield i, j, Window(c, r, self.tw, self.th)

    @staticmethod
    def _span(cuts: list[int], start: int, stop: int) -> range:
        """Indices of the cells between cut positions ``start`` and ``stop`` (both are cuts)."""
        return range(bisect.bisect_left(cuts, start), bisect.bisect_left(cuts, stop))

    def add(self, i: int, j: int, probs: np.ndarray) -> None:
        """Add tile ``(i, j)``'s ``(S, S, K)`` prediction and emit the block it finishes."""
        r, c = self.rows[i], self.cols[j]
        weighted = probs[: self.th, : self.tw] * self.wy[:, None, None]
        weighted *= self.wx[None, :, None]
        rc, cc = self.row_cuts, self.col_cuts
        for a in self._span(rc, r, r + self.th):
            for b in self._span(cc, c, c + self.tw):
                part = weighted[rc[a] - r : rc[a + 1] - r, cc[b] - c : cc[b + 1] - c]
                cell = self.cells.get((a, b))
                if cell is None:
                    self.cells[(a, b)] = part.copy()
                else:
                    cell += part
        r1, c1 = self.row_ends[i], self.col_ends[j]
        block = np.empty((r1 - r, c1 - c, self.num_classes), np.float32)
        for a in self._span(rc, r, r1):
            for b in self._span(cc, c, c1):
                block[rc[a] - r : rc[a + 1] - r, cc[b] - c : cc[b + 1] - c] = self.cells.pop((a, b))
        block /= self.norm_y[r:r1, None, None]
        block /= self.norm_x[None, c:c1, None]
        self.raster.emit(Window(c, r, c1 - c, r1 - r), block)

    def release(self) -> None:
        self.cells.clear()


def _axis_norm(starts: Sequence[int], w: np.ndarray, length: int) -> np.ndarray:
    norm = np.zeros(length, np.float32)
    for s in starts:
        norm[s : s + len(w)] += w
    return norm


def _pad_tile(x: np.ndarray, tile: int, mode: str, where: str) -> np.ndarray:
    if x.ndim != 3:
        raise ValueError(f"{where}: read() must return (h, w, C), got shape {x.shape}")
    h, w = x.shape[:2]
    if h == tile and w == tile:
        return x
    if h > tile or w > tile:
        raise ValueError(f"{where}: read() returned {h}x{w}, larger than the tile {tile}")
    pad = ((0, tile - h), (0, tile - w), (0, 0))
    if mode == "reflect" and (h > 1 or w > 1):
        return np.pad(x, pad, mode="reflect")
    if mode == "reflect":  # a single pixel reflects onto itself
        return np.pad(x, pad, mode="edge")
    return np.pad(x, pad, mode="constant")


_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _put(q: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Blocking put that gives up when the pipeline is stopping (so no thread ever hangs)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def predict_tiled_many(
    rasters: Sequence[TiledRaster],
    predict: Callable[[np.ndarray], np.ndarray],
    num_classes: int,
    cfg: TilingConfig,
) -> None:
    """Tiled, blended prediction over several rasters, batching tiles across them into one model call.

    Rasters are processed in order; a batch may hold the last tiles of one raster and the first of the
    next. For each raster, ``emit`` gets finished non-overlapping blocks (``(h, w, K) float32``, weights
    normalised) that together cover it exactly once, row-major (top to bottom). Each block starts at the
    origin of a window that ``read`` was called with and lies inside that window. ``emit`` runs on a
    writer thread (``prefetch > 0``), one call at a time; ``read`` on a reader thread, one at a time.
    Exceptions from ``read``, ``predict`` or ``emit`` stop all threads and are re-raised here.
    """
    accs = [_Accumulator(r, cfg, num_classes) for r in rasters]

    def tile_stream() -> Iterator[tuple[int, int, int, np.ndarray]]:
        for k, acc in enumerate(accs):
            for i, j, win in acc.tiles():
                x = np.asarray(acc.raster.read(win), dtype=np.float32)
                if x.shape[:2] != (win.height, win.width):
                    raise ValueError(
                        f"read({win}) returned shape {x.shape}, expected ({win.height}, {win.width}, C)"
                    )
                yield k, i, j, _pad_tile(x, cfg.tile, cfg.pad_mode, f"raster {k} window {win}")

    def batches(tiles: Iterator[tuple[int, int, int, np.ndarray]]) -> Iterator[tuple[list, np.ndarray]]:
        keys: list[tuple[int, int, int]] = []
        arrays: list[np.ndarray] = []
        for k, i, j, x in tiles:
            keys.append((k, i, j))
            arrays.append(x)
            if len(arrays) == cfg.batch_size:
                yield keys, np.stack(arrays)
                keys, arrays = [], []
        if arrays:
            yield keys, np.stack(arrays)

    def run_model(x: np.ndarray) -> np.ndarray:
        y = np.asarray(predict(x), dtype=np.float32)
        expected = (x.shape[0], cfg.tile, cfg.tile, num_classes)
        if y.shape != expected:
            raise ValueError(f"model returned shape {y.shape} for input {x.shape}; expected {expected}")
        return y

    last_row = [acc.row_indices[-1] if acc.row_indices else -1 for acc in accs]

    def consume(keys: list[tuple[int, int, int]], y: np.ndarray) -> None:
        for (k, i, j), probs in zip(keys, y, strict=True):
            acc = accs[k]
            acc.add(i, j, probs)
            if i == last_row[k] and j == len(acc.cols) - 1:
                acc.release()

    if cfg.prefetch == 0:
        for keys, x in batches(tile_stream()):
            consume(keys, run_model(x))
        return

    stop = threading.Event()
    in_q: queue.Queue = queue.Queue(maxsize=cfg.prefetch)
    out_q: queue.Queue = queue.Queue(maxsize=cfg.prefetch)

    def reader() -> None:
        try:
            for batch in batches(tile_stream()):
                if not _put(in_q, batch, stop):
                    return
            _put(in_q, _DONE, stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            _put(in_q, _Failure(exc), stop)

    writer_error: list[BaseException] = []

    def writer() -> None:
        while True:
            try:
                item = out_q.get(timeout=0.1)
            except queue.Empty:
                if stop.is_set():
                    return
                continue
            if item is _DONE:
                return
            try:
                consume(*item)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                writer_error.append(exc)
                stop.set()
                return

    threads = [threading.Thread(target=reader, name="tiling-read", daemon=True),
               threading.Thread(target=writer, name="tiling-write", daemon=True)]
    for t in threads:
        t.start()
    try:
        while True:
            item = None
            while item is None:
                if writer_error:
                    raise writer_error[0]
                try:
                    item = in_q.get(timeout=0.1)
                except queue.Empty:
                    continue
            if isinstance(item, _Failure):
                raise item.exc
            if item is _DONE:
                _put(out_q, _DONE, stop)
                break
            keys, x = item
            y = run_model(x)
            if not _put(out_q, (keys, y), stop):
                break
        threads[1].join()
        if writer_error:
            raise writer_error[0]
    finally:
        stop.set()
        for t in threads:
            t.join()


def predict_tiled(
    read: Callable[[Window], np.ndarray],
    height: int,
    width: int,
    predict: Callable[[np.ndarray], np.ndarray],
    num_classes: int,
    cfg: TilingConfig,
    emit: Callable[[Window, np.ndarray], None],
) -> None:
    """Stream one ``height x width`` raster through ``predict`` tile by tile.

    ``read(window) -> (h, w, C) float32`` normalised input (``h, w`` may be smaller than ``cfg.tile`` when
    the raster is; tiles are padded per ``cfg.pad_mode``); ``predict((N, tile, tile, C)) -> (N, tile,
    tile, K)``; ``emit(window, probs (h, w, K) float32)`` gets finished, non-overlapping blocks covering
    the raster exactly once, top to bottom. Peak memory: about ``2 x overlap x width x K`` float32 of
    pending sums plus ``2 * prefetch + 1`` batches of tiles, independent of ``height``. See :func:`predict_tiled_many`.
    """
    predict_tiled_many([TiledRaster(read, height, width, emit)], predict, num_classes, cfg)


def predict_array(
    image: np.ndarray,
    predict: Callable[[np.ndarray], np.ndarray],
    num_classes: int,
    cfg: TilingConfig,
) -> np.ndarray:
    """In-memory convenience: ``(H, W, C)`` float32 normalised image -> ``(H, W, K)`` float32 probs."""
    if image.ndim != 3:
        raise ValueError(f"predict_array expects (H, W, C), got shape {image.shape}")
    h, w = image.shape[:2]
    out = np.empty((h, w, num_classes), np.float32)

    def read(win: Window) -> np.ndarray:
        r, c = int(win.row_off), int(win.col_off)
        return image[r : r + int(win.height), c : c + int(win.width)]

    def emit(win: Window, probs: np.ndarray) -> None:
        r, c = int(win.row_off), int(win.col_off)
        out[r : r + int(win.height), c : c + int(win.width)] = probs

    predict_tiled(read, h, w, predict, num_classes, cfg, emit)
    return out
