"""Normalisation of raw pixels into model input."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.normalize import BandStats, band_stats, normalize
from pipelines.spec import Normalization


def test_scale_uint8_to_unit_range_and_layout():
    px = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 10
    out = normalize(px, Normalization(kind="scale", scale=255.0))
    assert out.shape == (3, 4, 2) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out, np.moveaxis(px, 0, -1) / 255.0, rtol=1e-6)


def test_scale_with_offset_is_not_clipped():
    px = np.array([[[0, 100, 300]]], dtype=np.int16)
    out = normalize(px, Normalization(kind="scale", offset=100, scale=100))
    np.testing.assert_allclose(out[..., 0], [[-1.0, 0.0, 2.0]])


def test_band_stats_per_band_and_valid_mask():
    a = np.arange(100, dtype=np.uint16).reshape(10, 10)
    px = np.stack([a, a * 2 + 1000])
    valid = np.ones((10, 10), bool)
    valid[5:] = False  # values 50..99 excluded
    st = band_stats(px, 0, 100, valid)
    np.testing.assert_allclose(st.low, [0, 1000])
    np.testing.assert_allclose(st.high, [49, 1098])
    st2 = band_stats(px, 2, 98)
    np.testing.assert_allclose(st2.low, np.percentile(px.reshape(2, -1), 2, axis=1))


def test_band_stats_ignores_nan_and_empty_band():
    px = np.full((2, 4, 4), np.nan, np.float32)
    px[0, 0, :] = [1, 2, 3, 4]
    st = band_stats(px, 0, 100)
    np.testing.assert_allclose(st.low, [1, 0])
    np.testing.assert_allclose(st.high, [4, 0])


def test_percentile_uses_given_stats_so_tiles_agree():
    rng = np.random.default_rng(0)
    scene = rng.integers(0, 4000, (3, 64, 64)).astype(np.uint16)
    norm = Normalization(kind="percentile", low=2, high=98)
    st = band_stats(scene, 2, 98)
    whole = normalize(scene, norm, st)
    tile = normalize(scene[:, 10:30, 20:50], norm, st)
    np.testing.assert_array_equal(tile, whole[10:30, 20:50])
    assert whole.min() == 0.0 and whole.max() == 1.0
    # without stats the image's own percentiles are used
    np.testing.assert_allclose(normalize(scene, norm), whole)


def test_percentile_degenerate_band_is_zero():
    px = np.stack([np.full((4, 4), 7.0), np.arange(16.0).reshape(4, 4)])
    out = normalize(px, Normalization(kind="percentile", low=0, high=100))
    assert (out[..., 0] == 0).all()
    np.testing.assert_allclose(out[..., 1].reshape(-1), np.arange(16) / 15, rtol=1e-6)


def test_ct_window_and_fixed():
    hu = np.array([[[-1000.0, -160.0, 40.0, 240.0, 3000.0]]], np.float32)
    out = normalize(hu, Normalization(kind="window", center=40, width=400))[..., 0]
    np.testing.assert_allclose(out, [[0.0, 0.0, 0.5, 1.0, 1.0]])
    out = normalize(hu, Normalization(kind="fixed", low=-1000, high=1000))[..., 0]
    np.testing.assert_allclose(out, [[0.0, 0.42, 0.52, 0.62, 1.0]], rtol=1e-6)


def test_nan_becomes_zero():
    px = np.array([[[np.nan, 1.0]]], np.float32)
    out = normalize(px, Normalization(kind="scale", scale=2.0))
    np.testing.assert_array_equal(out[..., 0], [[0.0, 0.5]])


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        normalize(np.zeros((4, 4)), Normalization())
    with pytest.raises(ValueError, match="bands"):
        normalize(np.zeros((3, 2, 2)), Normalization(kind="percentile"), BandStats(np.zeros(2), np.ones(2)))
    with pytest.raises(ValueError):
        band_stats(np.zeros((1, 2, 2)), 90, 10)
