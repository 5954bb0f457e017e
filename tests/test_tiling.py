"""Tiled inference engine: grid, weights, streaming accumulation, equivalence with whole-image predict."""

from __future__ import annotations

import threading
import tracemalloc

import numpy as np
import pytest

from adapters.base import AdapterError
from pipelines.tiling import (
    TiledRaster,
    TilingConfig,
    axis_starts,
    blend_weights,
    predict_array,
    predict_tiled,
    predict_tiled_many,
    window_grid,
)

keras = pytest.importorskip("keras")


def _pointwise(weights: np.ndarray):
    """A real pointwise model in numpy: softmax(x @ W) per pixel (translation equivariant, exact)."""

    def predict(x: np.ndarray) -> np.ndarray:
        z = x @ weights
        z -= z.max(-1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(-1, keepdims=True)).astype(np.float32)

    return predict


def _keras_model(channels: int, classes: int, kernel: int, seed: int = 0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((None, None, channels))
    x = inp
    if kernel > 1:
        x = keras.layers.Conv2D(8, kernel, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(classes, kernel, padding="same")(x)
    out = keras.layers.Softmax()(x)
    model = keras.Model(inp, out)
    calls: list[int] = []

    def predict(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape[0])
        return np.asarray(model(batch, training=False), np.float32)

    return predict, calls


@pytest.mark.parametrize("length,tile,overlap", [(1, 8, 2), (8, 8, 2), (9, 8, 2), (100, 16, 4), (37, 10, 0),
                                                  (64, 16, 7)])
def test_axis_starts_cover_and_overlap(length, tile, overlap):
    starts = axis_starts(length, tile, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    size = min(tile, length)
    assert starts[-1] + size == length
    covered = np.zeros(length, int)
    for s in starts:
        covered[s : s + size] += 1
    assert covered.min() >= 1
    for a, b in zip(starts, starts[1:], strict=False):
        assert a + size - b >= overlap  # neighbours share at least `overlap` pixels


def test_window_grid_shapes_and_bounds():
    wins = window_grid(50, 23, 16, 4)
    assert all(w.height == 16 and w.width == 16 for w in wins)
    assert all(w.row_off + w.height <= 50 and w.col_off + w.width <= 23 for w in wins)
    assert [(w.row_off, w.col_off) for w in wins] == sorted((w.row_off, w.col_off) for w in wins)
    small = window_grid(3, 5, 16, 4)
    assert len(small) == 1 and (small[0].height, small[0].width) == (3, 5)


def test_bad_config_rejected():
    with pytest.raises(ValueError):
        TilingConfig(tile=8, overlap=8)
    with pytest.raises(ValueError):
        TilingConfig(tile=8, overlap=2, blend="linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        axis_starts(0, 8, 2)


@pytest.mark.parametrize("kind", ["gaussian", "cosine", "constant"])
@pytest.mark.parametrize("tile", [1, 2, 7, 64])
def test_blend_weights(kind, tile):
    w = blend_weights(tile, kind)
    assert w.shape == (tile, tile) and w.dtype == np.float32
    assert (w > 0).all() and np.isclose(w.max(), 1.0)
    np.testing.assert_allclose(w, w.T)
    np.testing.assert_allclose(w, w[::-1, ::-1], rtol=1e-6)
    if kind != "constant" and tile >= 7:
        assert w[tile // 2, tile // 2] > 10 * w[0, 0]  # edges of a tile count less than its centre


def _run_recording(image, predict, k, cfg):
    reads, blocks = [], []

    def read(win):
        reads.append(win)
        r, c = int(win.row_off), int(win.col_off)
        return image[r : r + int(win.height), c : c + int(win.width)]

    def emit(win, probs):
        blocks.append((win, probs))

    predict_tiled(read, image.shape[0], image.shape[1], predict, k, cfg, emit)
    return reads, blocks


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (5, 7), (16, 16), (17, 33), (61, 40)])
def test_blocks_cover_raster_exactly_once_top_to_bottom(shape, prefetch):
    rng = np.random.default_rng(1)
    image = rng.random((*shape, 2), dtype=np.float32)
    cfg = TilingConfig(tile=16, overlap=5, batch_size=3, prefetch=prefetch)
    reads, blocks = _run_recording(image, _pointwise(rng.normal(size=(2, 3))), 3, cfg)
    hits = np.zeros(shape, int)
    origins = {(int(w.row_off), int(w.col_off)): w for w in reads}
    last_row = -1
    for win, probs in blocks:
        r, c, h, w = int(win.row_off), int(win.col_off), int(win.height), int(win.width)
        assert probs.shape == (h, w, 3) and probs.dtype == np.float32
        hits[r : r + h, c : c + w] += 1
        assert r >= last_row
        last_row = r
        # each block starts at a tile origin and lies inside that tile (semantic.py relies on it)
        tile = origins[(r, c)]
        assert h <= tile.height and w <= tile.width
    assert (hits == 1).all()


@pytest.mark.parametrize("blend", ["gaussian", "cosine", "constant"])
@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 40), (29, 31), (64, 64), (70, 45)])
def test_pointwise_keras_model_tiled_equals_whole(shape, blend, pad_mode):
    predict, _ = _keras_model(3, 4, kernel=1)
    rng = np.random.default_rng(2)
    image = rng.random((*shape, 3), dtype=np.float32)
    whole = predict(image[None])[0]
    cfg = TilingConfig(tile=16, overlap=4, batch_size=4, blend=blend, pad_mode=pad_mode)
    tiled = predict_array(image, predict, 4, cfg)
    np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tiled.sum(-1), 1.0, atol=1e-5)


def test_conv_net_tiled_matches_whole_image_away_from_seams():
    # Two 3x3 convs: 'same' zero padding makes tile borders differ from the whole image, so blending must
    # keep seams small; pixels far from every tile edge are exact.
    predict, _ = _keras_model(3, 3, kernel=3, seed=3)
    rng = np.random.default_rng(3)
    image = rng.random((90, 77, 3), dtype=np.float32)
    whole = predict(image[None])[0]
    errors = {}
    for blend in ("gaussian", "constant"):
        cfg = TilingConfig(tile=32, overlap=12, batch_size=5, blend=blend)
        tiled = predict_array(image, predict, 3, cfg)
        errors[blend] = np.abs(tiled - whole)
    assert errors["gaussian"].max() < 0.01
    assert errors["gaussian"].mean() < 2e-4
    # Gaussian weighting down-weights tile borders, so its seams are smaller than plain averaging's.
    assert errors["gaussian"].max() < errors["constant"].max()
    # A tile's interior (>= 2 px, the receptive radius, from its edges) sees no border effect at all.
    one_tile = predict_array(image[:16, :16], predict, 3, TilingConfig(tile=16, overlap=0, blend="constant"))
    np.testing.assert_allclose(one_tile[2:14, 2:14], whole[2:14, 2:14], atol=1e-5)


def test_batches_span_rasters_one_model_call():
    predict, calls = _keras_model(3, 2, kernel=1)
    rng = np.random.default_rng(4)
    images = [rng.random((h, w, 3), dtype=np.float32) for h, w in [(10, 12), (16, 16), (5, 3), (8, 16)]]
    outs = [np.zeros((*im.shape[:2], 2), np.float32) for im in images]

    def make(im, out):
        def read(win):
            return im[win.row_off : win.row_off + win.height, win.col_off : win.col_off + win.width]

        def emit(win, probs):
            out[win.row_off : win.row_off + win.height, win.col_off : win.col_off + win.width] = probs

        return TiledRaster(read, im.shape[0], im.shape[1], emit)

    predict_tiled_many([make(im, o) for im, o in zip(images, outs, strict=True)], predict, 2,
                       TilingConfig(tile=16, overlap=4, batch_size=8))
    assert calls == [4]  # four small images, one model call
    for im, out in zip(images, outs, strict=True):
        np.testing.assert_allclose(out, predict(im[None])[0], atol=1e-5)


def test_batch_size_respected():
    predict, calls = _keras_model(3, 2, kernel=1)
    image = np.zeros((40, 40, 3), np.float32)
    predict_array(image, predict, 2, TilingConfig(tile=16, overlap=4, batch_size=3))
    n_tiles = len(window_grid(40, 40, 16, 4))
    assert sum(calls) == n_tiles and max(calls) == 3 and len(calls) == -(-n_tiles // 3)


@pytest.mark.parametrize("where", ["read", "predict", "emit"])
def test_errors_propagate_and_threads_stop(where):
    before = threading.active_count()
    good = _pointwise(np.eye(2, dtype=np.float32))

    def read(win):
        if where == "read" and win.row_off > 0:
            raise AdapterError("scene.tif: truncated tile")
        return np.zeros((win.height, win.width, 2), np.float32)

    def predict(x):
        if where == "predict":
            raise RuntimeError("model exploded")
        return good(x)

    def emit(win, probs):
        if where == "emit":
            raise OSError("disk full")

    expected = {"read": AdapterError, "predict": RuntimeError, "emit": OSError}[where]
    with pytest.raises(expected):
        predict_tiled(read, 200, 50, predict, 2, TilingConfig(tile=16, overlap=4, batch_size=2), emit)
    assert threading.active_count() == before


def test_wrong_model_output_shape_is_reported():
    def predict(x):
        return np.zeros((x.shape[0], 8, 8, 2), np.float32)

    with pytest.raises(ValueError, match="model returned shape"):
        predict_array(np.zeros((20, 20, 1), np.float32), predict, 2, TilingConfig(tile=16, overlap=2))


def test_peak_memory_independent_of_height():
    predict = _pointwise(np.ones((1, 2), np.float32))
    cfg = TilingConfig(tile=32, overlap=8, batch_size=2, prefetch=1)
    peaks = []
    for height in (128, 4096):
        tile_src = np.ones((32, 32, 1), np.float32)

        def read(win, src=tile_src):
            return src[: win.height, : win.width]

        tracemalloc.start()
        predict_tiled(read, height, 256, predict, 2, cfg, lambda w, p: None)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    # The whole 4096 x 256 x 2 float32 result would be 8 MiB; pending sums are ~2 x 8 x 256 x 2 x 4 bytes.
    assert peaks[1] < 1.3 * peaks[0] + 64 * 1024
    assert peaks[1] < 2 * 1024 * 1024


def test_pending_sums_scale_with_overlap_not_tile_height():
    # A tile-high full-width strip would be 128 x 8192 x 2 x 4 bytes = 8 MiB.
    predict = _pointwise(np.ones((1, 2), np.float32))
    cfg = TilingConfig(tile=128, overlap=4, batch_size=1, prefetch=0)
    tile_src = np.ones((128, 128, 1), np.float32)
    tracemalloc.start()
    predict_tiled(lambda w: tile_src[: w.height, : w.width], 600, 8192, predict, 2, cfg, lambda w, p: None)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2.5 * 1024 * 1024


def test_random_grids_cover_once_and_match_pointwise_model():
    rng = np.random.default_rng(11)
    for trial in range(60):
        h, w = (int(v) for v in rng.integers(1, 90, 2))
        tile = int(rng.integers(2, 24))
        overlap = int(rng.integers(0, tile))
        blend = ("gaussian", "cosine", "constant")[trial % 3]
        cfg = TilingConfig(tile=tile, overlap=overlap, batch_size=int(rng.integers(1, 6)), blend=blend,
                           prefetch=trial % 2)
        image = rng.random((h, w, 2), dtype=np.float32)
        predict = _pointwise(rng.normal(size=(2, 3)))
        reads, blocks = _run_recording(image, predict, 3, cfg)
        hits = np.zeros((h, w), int)
        out = np.zeros((h, w, 3), np.float32)
        for win, probs in blocks:
            r, c, bh, bw = int(win.row_off), int(win.col_off), int(win.height), int(win.width)
            hits[r : r + bh, c : c + bw] += 1
            out[r : r + bh, c : c + bw] = probs
        assert (hits == 1).all(), (h, w, cfg)
        np.testing.assert_allclose(out, predict(image[None])[0], rtol=1e-4, atol=1e-6, err_msg=str(cfg))
