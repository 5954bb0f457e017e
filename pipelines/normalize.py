"""Raw pixel values -> model input, per :class:`pipelines.spec.Normalization`. Pure numpy.

Percentile stretches need statistics of the whole item, which a streamed raster cannot provide tile by
tile (each tile would get its own stretch and seams would appear): :func:`band_stats` computes them once
from a sample (whole small image, or a spread of windows over a large raster) and every tile reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.spec import Normalization

__all__ = ["BandStats", "band_stats", "normalize"]


@dataclass
class BandStats:
    """Per-band stretch limits: ``low`` and ``high`` are ``(C,)`` float64 values in the input's units."""

    low: np.ndarray
    high: np.ndarray


def band_stats(
    sample: np.ndarray, low_pct: float, high_pct: float, valid: np.ndarray | None = None
) -> BandStats:
    """Per-band ``low_pct`` / ``high_pct`` percentiles of ``sample`` ``(C, H, W)`` (any dtype).

    ``valid`` ``(H, W) bool`` excludes nodata pixels; NaNs are ignored too. A band with no valid pixel
    gets ``low = high = 0`` (it then normalises to 0).
    """
    if sample.ndim != 3:
        raise ValueError(f"band_stats expects (C, H, W), got shape {sample.shape}")
    if not 0 <= low_pct <= high_pct <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low <= high <= 100, got {low_pct}, {high_pct}")
    c = sample.shape[0]
    flat = sample.reshape(c, -1)
    if valid is not None:
        if valid.shape != sample.shape[1:]:
            raise ValueError(f"valid mask shape {valid.shape} does not match sample {sample.shape[1:]}")
        flat = flat[:, valid.reshape(-1)]
    low = np.zeros(c, np.float64)
    high = np.zeros(c, np.float64)
    for b in range(c):
        band = flat[b].astype(np.float64, copy=False)
        band = band[np.isfinite(band)]
        if band.size:
            low[b], high[b] = np.percentile(band, [low_pct, high_pct])
    return BandStats(low=low, high=high)


def _stretch(x: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """In place: ``(x - low) / (high - low)`` clipped to [0, 1]; bands with ``high <= low`` become 0."""
    span = (high - low).astype(np.float64)
    safe = np.where(span > 0, span, 1.0)
    x -= low.astype(np.float32)[:, None, None]
    x *= (1.0 / safe).astype(np.float32)[:, None, None]
    np.clip(x, 0.0, 1.0, out=x)
    x[span <= 0] = 0.0
    return x


def normalize(pixels: np.ndarray, norm: Normalization, stats: BandStats | None = None) -> np.ndarray:
    """``(C, H, W)`` raw pixels (any dtype) -> ``(H, W, C)`` float32 model input.

    - ``scale``: ``(x - offset) / scale`` (unclipped).
    - ``percentile``: stretch between ``stats.low`` and ``stats.high`` to [0, 1]; without ``stats`` they are
      computed from ``pixels`` (only right for whole images, see module docs).
    - ``window``: CT window ``[center - width/2, center + width/2]`` -> [0, 1], clipped.
    - ``fixed``: clip to ``[norm.low, norm.high]`` -> [0, 1].

    Non-finite inputs (NaN nodata in float rasters) become 0.
    """
    if pixels.ndim != 3:
        raise ValueError(f"normalize expects (C, H, W), got shape {pixels.shape}")
    c = pixels.shape[0]
    x = pixels.astype(np.float32, copy=True)
    if norm.kind == "scale":
        if norm.scale == 0:
            raise ValueError("normalization scale must not be 0")
        x -= np.float32(norm.offset)
        x *= np.float32(1.0 / norm.scale)
    elif norm.kind == "percentile":
        if stats is None:
            stats = band_stats(pixels, norm.low, norm.high)
        if stats.low.shape != (c,) or stats.high.shape != (c,):
            raise ValueError(f"band stats are for {stats.low.shape} bands, pixels have {c}")
        _stretch(x, stats.low, stats.high)
    elif norm.kind == "window":
        if norm.width <= 0:
            raise ValueError("normalization window width must be > 0")
        lo = norm.center - norm.width / 2.0
        _stretch(x, np.full(c, lo), np.full(c, lo + norm.width))
    elif norm.kind == "fixed":
        _stretch(x, np.full(c, norm.low), np.full(c, norm.high))
    else:  # pragma: no cover - guarded by the spec's Literal
        raise ValueError(f"unknown normalization {norm.kind!r}")
    np.nan_to_num(x, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return np.ascontiguousarray(np.moveaxis(x, 0, -1))
