"""Semantic runner: bands, normalisation, tile and resize modes, nodata, figures, batching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from adapters.base import AdapterError, Artifact, Item, ItemInfo, MaskSink, Window
from pipelines.metrics import confusion_matrix
from pipelines.normalize import band_stats, normalize
from pipelines.registry import LoadedModel
from pipelines.semantic import (
    bilinear_matrix,
    predict_multiscale,
    resize_bilinear,
    resize_photo,
    segment_item,
    segment_items,
    shrink_matrix,
    tta_edges,
)
from pipelines.spec import ClassSpec, ModelSpec, Normalization
from pipelines.tiling import TilingConfig, predict_array

keras = pytest.importorskip("keras")


class ArrayItem(Item):
    """An in-memory item; ``streamable`` items refuse whole reads, like a huge tiled GeoTIFF must."""

    def __init__(self, pixels: np.ndarray, *, valid: np.ndarray | None = None, streamable: bool = False,
                 pixel_area: float | None = None, key: str = "") -> None:
        self.pixels = pixels
        self.valid = valid
        self.streamable = streamable
        self.key = key
        self.reads: list[Window | None] = []
        c, h, w = pixels.shape
        self.info = ItemInfo(height=h, width=w, bands=c, dtype=str(pixels.dtype), modality="test",
                             pixel_area=pixel_area, area_unit="m2" if pixel_area else None,
                             extra={"path": "mem.tif"})

    def read(self, window: Window | None = None) -> np.ndarray:
        self.reads.append(window)
        if window is None:
            if self.streamable:
                raise AssertionError("streamed item read whole")
            return self.pixels
        r, c, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
        return self.pixels[:, r : r + h, c : c + w]

    def valid_mask(self, window: Window | None = None) -> np.ndarray | None:
        if self.valid is None:
            return None
        if window is None:
            return self.valid
        r, c, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
        return self.valid[r : r + h, c : c + w]


class ArraySink(MaskSink):
    def __init__(self, height: int, width: int) -> None:
        self.classes = np.full((height, width), 77, np.uint8)
        self.conf = np.full((height, width), -1.0, np.float32)
        self.hits = np.zeros((height, width), int)
        self.writes = 0

    def write(self, window: Window, classes: np.ndarray, confidence: np.ndarray) -> None:
        r, c, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
        assert classes.dtype == np.uint8 and confidence.dtype == np.float32
        self.classes[r : r + h, c : c + w] = classes
        self.conf[r : r + h, c : c + w] = confidence
        self.hits[r : r + h, c : c + w] += 1
        self.writes += 1

    def close(self) -> list[Artifact]:
        return []


def _model(channels=3, classes=3, kernel=1, mode="tile", size=16, overlap=4, batch=4, **spec_kw):
    keras.utils.set_random_seed(7)
    inp = keras.Input((None, None, channels))
    x = inp
    if kernel > 1:
        x = keras.layers.Conv2D(6, kernel, padding="same", activation="relu")(x)
    out = keras.layers.Softmax()(keras.layers.Conv2D(classes, kernel, padding="same")(x))
    net = keras.Model(inp, out)
    calls: list[int] = []

    def predict(b: np.ndarray) -> np.ndarray:
        calls.append(b.shape[0])
        return np.asarray(net(b, training=False), np.float32)

    spec = ModelSpec(
        name="tiny", kind="semantic", source="none.keras", channels=channels, input_size=size, mode=mode,
        overlap=overlap, batch_size=batch,
        classes=[ClassSpec(id=i, name=f"c{i}") for i in range(classes)], **spec_kw,
    )
    return LoadedModel(spec=spec, predict=predict, raw=net), calls


def _expected(model: LoadedModel, pixels: np.ndarray, stats=None) -> np.ndarray:
    spec = model.spec
    x = normalize(pixels, spec.normalization, stats)
    cfg = TilingConfig(tile=spec.input_size, overlap=spec.overlap, batch_size=spec.batch_size, blend=spec.blend)
    return predict_array(x, model.predict, len(spec.classes), cfg)


def test_tile_mode_writes_argmax_confidence_and_figures():
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (3, 37, 45)).astype(np.uint8)
    model, _ = _model()
    item = ArrayItem(px, pixel_area=0.25)
    sink = ArraySink(37, 45)
    seen: list[float] = []
    res = segment_item(item, model, sink, progress=seen.append)
    probs = _expected(model, px)
    assert (sink.hits == 1).all()
    np.testing.assert_array_equal(sink.classes, probs.argmax(-1))
    np.testing.assert_allclose(sink.conf, probs.max(-1), atol=1e-6)
    assert res.valid_pixels == res.total_pixels == 37 * 45
    assert sum(f.pixel_count for f in res.figures) == 37 * 45
    for f in res.figures:
        sel = sink.classes == f.class_id
        assert f.pixel_count == sel.sum() and f.name == f"c{f.class_id}"
        assert f.area == pytest.approx(0.25 * sel.sum()) and f.area_unit == "m2"
        assert f.fraction == pytest.approx(sel.mean())
        if sel.any():
            assert f.mean_confidence == pytest.approx(float(sink.conf[sel].mean()), rel=1e-5)
        assert f.dice is None and res.confusion is None
    assert seen[-1] == pytest.approx(1.0) and seen == sorted(seen)


def test_nodata_pixels_get_255_and_are_excluded():
    rng = np.random.default_rng(1)
    px = rng.integers(0, 256, (3, 30, 30)).astype(np.uint8)
    valid = np.ones((30, 30), bool)
    valid[:, :10] = False
    model, _ = _model()
    sink = ArraySink(30, 30)
    res = segment_item(ArrayItem(px, valid=valid), model, sink)
    assert (sink.classes[:, :10] == 255).all() and (sink.conf[:, :10] == 0).all()
    assert (sink.classes[:, 10:] < 3).all()
    assert res.valid_pixels == 600 and res.total_pixels == 900
    assert sum(f.pixel_count for f in res.figures) == 600
    assert sum(f.fraction for f in res.figures) == pytest.approx(1.0)
    assert all(f.area is None for f in res.figures)


def test_streamed_item_is_read_by_windows_with_sampled_percentile_stats():
    rng = np.random.default_rng(2)
    px = rng.integers(0, 4000, (4, 50, 41)).astype(np.uint16)
    model, _ = _model(bands=[3, 1, 2], normalization=Normalization(kind="percentile", low=2, high=98))
    item = ArrayItem(px, streamable=True)
    sink = ArraySink(50, 41)
    segment_item(item, model, sink)
    assert None not in item.reads
    assert all(w.height <= 16 and w.width <= 16 for w in item.reads[1:])  # [0] is the stats sample
    sel = px[[2, 0, 1]]
    probs = _expected(model, sel, band_stats(sel, 2, 98))
    np.testing.assert_array_equal(sink.classes, probs.argmax(-1))


def test_conv_model_tile_mode_close_to_whole_image():
    rng = np.random.default_rng(3)
    px = rng.integers(0, 256, (3, 64, 64)).astype(np.uint8)
    model, _ = _model(kernel=3, size=32, overlap=12, batch=2)
    sink = ArraySink(64, 64)
    segment_item(ArrayItem(px), model, sink)
    x = normalize(px, model.spec.normalization)
    probs = np.asarray(model.raw(x[None], training=False))[0]  # the same net on the whole image
    agree = (sink.classes == probs.argmax(-1)).mean()
    assert agree > 0.995
    np.testing.assert_allclose(sink.conf, probs.max(-1), atol=0.02)


def test_single_band_replicated_to_three_and_band_mismatch():
    rng = np.random.default_rng(4)
    gray = rng.integers(0, 256, (1, 20, 20)).astype(np.uint8)
    model, _ = _model()
    sink = ArraySink(20, 20)
    segment_item(ArrayItem(gray), model, sink)
    np.testing.assert_array_equal(sink.classes, _expected(model, np.repeat(gray, 3, 0)).argmax(-1))
    with pytest.raises(AdapterError, match=r"mem.tif.*needs 3 band"):
        segment_item(ArrayItem(np.zeros((2, 8, 8), np.uint8)), model, ArraySink(8, 8))
    model_b, _ = _model(bands=[1, 2, 5])
    with pytest.raises(AdapterError, match=r"bands \[1, 2, 5\].*4 band"):
        segment_item(ArrayItem(np.zeros((4, 8, 8), np.uint8)), model_b, ArraySink(8, 8))


def test_ground_truth_gives_dice_iou():
    rng = np.random.default_rng(5)
    px = rng.integers(0, 256, (3, 24, 24)).astype(np.uint8)
    model, _ = _model()
    sink = ArraySink(24, 24)
    truth = rng.integers(0, 3, (24, 24))
    truth[0] = 255
    res = segment_item(ArrayItem(px), model, sink, ground_truth=truth)
    np.testing.assert_array_equal(res.confusion, confusion_matrix(truth, sink.classes, 3))
    for f in res.figures:
        tp = res.confusion[f.class_id, f.class_id]
        den = res.confusion[f.class_id].sum() + res.confusion[:, f.class_id].sum()
        assert f.dice == pytest.approx(2 * tp / den)
    with pytest.raises(AdapterError, match="ground truth shape"):
        segment_item(ArrayItem(px), model, sink, ground_truth=truth[:5])


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_label_and_confidence_equal_argmax_and_max_ties_included(k):
    from pipelines.semantic import label_and_confidence

    rng = np.random.default_rng(k)
    probs = rng.random((37, 53, k)).astype(np.float32)
    probs[::5] = np.round(probs[::5], 1)  # many exact ties: the first index must win, as with argmax
    classes, conf = label_and_confidence(probs)
    assert classes.dtype == np.uint8 and conf.dtype == np.float32
    np.testing.assert_array_equal(classes, probs.argmax(-1))
    np.testing.assert_array_equal(conf, probs.max(-1))
    view = probs[:, ::2]  # a strided block, as the tiling engine hands out
    np.testing.assert_array_equal(label_and_confidence(view)[0], view.argmax(-1))
    near = probs.astype(np.float64)
    near[..., -1] = near[..., 0] + 1e-12  # differs from channel 0 below float32 precision
    np.testing.assert_array_equal(label_and_confidence(near)[0], near.argmax(-1))


def test_bilinear_matches_tf_image_resize():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(6)
    img = rng.random((13, 29, 2)).astype(np.float32)
    for h, w in [(16, 16), (5, 40), (13, 29), (1, 1)]:
        ref = tf.image.resize(img, (h, w), method="bilinear").numpy()
        np.testing.assert_allclose(resize_bilinear(img, h, w), ref, atol=1e-5)
    np.testing.assert_allclose(bilinear_matrix(7, 3).sum(1), 1.0, rtol=1e-6)


def test_photo_resize_is_antialiased_like_tf_when_shrinking_and_bilinear_when_enlarging():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(8)
    img = rng.random((301, 97, 3)).astype(np.float32)
    for h, w in [(192, 192), (40, 13), (5, 97), (301, 300), (1, 1)]:
        ref = tf.image.resize(img, (h, w), method="bilinear", antialias=True).numpy()
        np.testing.assert_allclose(resize_photo(img, h, w), ref, atol=5e-5)
    np.testing.assert_array_equal(shrink_matrix(9, 4), bilinear_matrix(9, 4))
    np.testing.assert_allclose(shrink_matrix(5, 23).sum(1), 1.0, rtol=1e-6)


def test_photo_resize_averages_detail_that_point_sampling_aliases():
    """A 1-pixel checkerboard (fur, sensor noise) shrunk 600 -> 192 px: the antialiased resize gives the even
    grey a camera at that size would record; sampling two pixels per output keeps a false pattern."""
    board = (np.indices((600, 600)).sum(0) % 2).astype(np.float32)[..., None]
    soft = resize_photo(board, 192, 192)
    sharp = resize_bilinear(board, 192, 192)
    assert np.abs(soft - 0.5).max() < 0.05
    assert np.abs(sharp - 0.5).max() > 0.2


def test_resize_filter_picks_how_the_service_shrinks_an_image():
    """``resize_filter`` ``bilinear`` serves a model exactly as :func:`resize_bilinear` would feed it (a model
    trained on such inputs); the default ``antialias`` as :func:`resize_photo`. On an image 4x the input
    size the two give different masks."""
    rng = np.random.default_rng(9)
    item = ArrayItem(rng.integers(0, 256, (3, 64, 72)).astype(np.uint8))
    got = {}
    for flt, fn in (("bilinear", resize_bilinear), ("antialias", resize_photo)):
        model, _ = _model(mode="resize", kernel=3, resize_filter=flt)
        sink = ArraySink(64, 72)
        segment_items([item], model, [sink])
        x = fn(normalize(item.pixels, model.spec.normalization), 16, 16)
        p = resize_bilinear(model.predict(x[None])[0], 64, 72)
        np.testing.assert_array_equal(sink.classes, p.argmax(-1))
        got[flt] = sink.classes
    assert (got["bilinear"] != got["antialias"]).mean() > 0.05
    with pytest.raises(ValueError):
        _model(mode="resize", resize_filter="nearest")


def test_resize_mode_batches_items_into_one_call_per_batch():
    rng = np.random.default_rng(7)
    shapes = [(20, 30), (16, 16), (9, 40), (33, 17), (16, 15)]
    items = [ArrayItem(rng.integers(0, 256, (3, h, w)).astype(np.uint8), key=f"f{i}")
             for i, (h, w) in enumerate(shapes)]
    model, calls = _model(mode="resize", batch=2)
    inner = model.predict
    items_read_at_call = []

    def predict(x):
        items_read_at_call.append(sum(bool(it.reads) for it in items))
        return inner(x)

    model.predict = predict
    sinks = [ArraySink(h, w) for h, w in shapes]
    results = segment_items(items, model, sinks)
    model.predict = inner
    assert calls == [2, 2, 1]
    assert items_read_at_call == [2, 4, 5]  # a batch of photos never holds more than batch_size images
    for item, sink, res in zip(items, sinks, results, strict=True):
        x = resize_photo(normalize(item.pixels, model.spec.normalization), 16, 16)
        p = resize_bilinear(model.predict(x[None])[0], item.info.height, item.info.width)
        np.testing.assert_array_equal(sink.classes, p.argmax(-1))
        assert (sink.hits == 1).all()
        assert res.total_pixels == item.info.height * item.info.width


def test_tile_mode_many_small_items_share_model_calls():
    rng = np.random.default_rng(8)
    shapes = [(10, 12), (16, 16), (3, 5), (12, 9)]
    items = [ArrayItem(rng.integers(0, 256, (3, h, w)).astype(np.uint8)) for h, w in shapes]
    model, calls = _model(batch=8)
    sinks = [ArraySink(h, w) for h, w in shapes]
    segment_items(items, model, sinks)
    assert calls == [4]
    for item, sink in zip(items, sinks, strict=True):
        np.testing.assert_array_equal(sink.classes, _expected(model, item.pixels).argmax(-1))


def test_adapter_error_from_read_propagates():
    class Broken(ArrayItem):
        def read(self, window=None):
            if window is not None and window.row_off > 0:
                raise AdapterError("mem.tif: truncated strip")
            return super().read(window)

    model, _ = _model()
    with pytest.raises(AdapterError, match="truncated"):
        segment_item(Broken(np.zeros((3, 60, 20), np.uint8), streamable=True), model, ArraySink(60, 20))


DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "geotiff_samples"


class RasterioItem(Item):
    """A minimal windowed reader over a real GeoTIFF (independent of adapters.geotiff)."""

    def __init__(self, path: Path, streamable: bool) -> None:
        import rasterio

        self.ds = rasterio.open(path)
        self.key, self.streamable = "", streamable
        self.whole_reads = 0
        self.info = ItemInfo(height=self.ds.height, width=self.ds.width, bands=self.ds.count,
                             dtype=self.ds.dtypes[0], modality="geotiff", area_unit="m2",
                             pixel_area=abs(self.ds.res[0] * self.ds.res[1]), extra={"path": path.name})

    def read(self, window=None):
        self.whole_reads += window is None
        return self.ds.read(window=window)

    def valid_mask(self, window=None):
        return self.ds.dataset_mask(window=window) > 0


@pytest.mark.parametrize("name,bands,norm", [
    ("RGB.byte.tif", None, Normalization(kind="scale", scale=255.0)),
    ("spacenet6_rotterdam_ms4.tif", [3, 2, 1], Normalization(kind="percentile", low=2, high=98)),
])
def test_real_geotiff_streamed_equals_whole_and_honours_nodata(name, bands, norm):
    path = DATA / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    model, _ = _model(size=64, overlap=8, batch=8, bands=bands, normalization=norm)
    streamed, whole = RasterioItem(path, True), RasterioItem(path, False)
    h, w = streamed.info.height, streamed.info.width
    sinks = [ArraySink(h, w), ArraySink(h, w)]
    try:
        res_s = segment_item(streamed, model, sinks[0])
        res_w = segment_item(whole, model, sinks[1])
    finally:
        streamed.ds.close()
        whole.ds.close()
    assert streamed.whole_reads == 0 and whole.whole_reads == 1
    np.testing.assert_array_equal(sinks[0].classes, sinks[1].classes)
    valid = sinks[1].classes != 255
    import rasterio

    with rasterio.open(path) as ds:
        assert (valid == (ds.dataset_mask() > 0)).all()
    assert res_s.valid_pixels == res_w.valid_pixels == valid.sum()
    assert res_s.figures[0].area == pytest.approx(res_s.figures[0].pixel_count * streamed.info.pixel_area)
    if name == "RGB.byte.tif":
        assert 0 < valid.mean() < 1  # the scene has a nodata collar


def test_predict_multiscale_averages_every_size_at_the_base_size():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(11)
    images = [rng.random((20, 30, 3)).astype(np.float32), rng.random((17, 9, 3)).astype(np.float32)]
    edges = tta_edges(16, [12, 16, 24, 12])
    assert edges == [16, 12, 24]  # the base size first, once; repeats dropped
    seen = []

    def identity(x):  # the image's own channels as the "probabilities": the resampling is all there is
        seen.append(x.shape)
        return x

    batches = {e: np.stack([resize_bilinear(x, e, e) for x in images]) for e in edges}
    got = predict_multiscale(identity, batches, 16, 3)
    assert seen == [(2, 16, 16, 3), (2, 12, 12, 3), (2, 24, 24, 3)] and got.shape == (2, 16, 16, 3)
    for x, g in zip(images, got, strict=True):
        ref = np.mean([tf.image.resize(tf.image.resize(x, (e, e)), (16, 16)).numpy() for e in edges], axis=0)
        np.testing.assert_allclose(g, ref, atol=1e-5)
    with pytest.raises(ValueError, match="for a 12x12 input"):
        predict_multiscale(lambda x: x if x.shape[1] != 12 else x[:, :8], batches, 16, 3)
    with pytest.raises(ValueError, match="expected"):
        predict_multiscale(identity, batches, 16, 4)  # wrong class count


def test_resize_mode_with_tta_sizes_runs_each_size_and_averages():
    rng = np.random.default_rng(12)
    shapes = [(20, 30), (33, 17), (16, 16)]
    items = [ArrayItem(rng.integers(0, 256, (3, h, w)).astype(np.uint8)) for h, w in shapes]
    model, calls = _model(mode="resize", batch=2, kernel=3, tta_sizes=[8, 24])
    sizes_seen = []
    inner = model.predict

    def predict(x):
        sizes_seen.append(x.shape[1])
        return inner(x)

    model.predict = predict
    sinks = [ArraySink(h, w) for h, w in shapes]
    segment_items(items, model, sinks)
    model.predict = inner
    assert calls == [2, 2, 2, 1, 1, 1] and sizes_seen == [16, 8, 24, 16, 8, 24]
    single_scale_differs = False
    for item, sink in zip(items, sinks, strict=True):
        x = normalize(item.pixels, model.spec.normalization)
        probs = [resize_bilinear(model.predict(resize_photo(x, e, e)[None])[0], 16, 16) for e in (16, 8, 24)]
        p = resize_bilinear(np.mean(probs, axis=0), item.info.height, item.info.width)
        np.testing.assert_array_equal(sink.classes, p.argmax(-1))
        one = resize_bilinear(probs[0], item.info.height, item.info.width)
        single_scale_differs |= bool((one.argmax(-1) != p.argmax(-1)).any())
    assert single_scale_differs  # the extra sizes really changed some pixels


def test_tta_sizes_are_checked_in_the_spec():
    classes = [ClassSpec(id=0, name="a"), ClassSpec(id=1, name="b")]
    with pytest.raises(ValueError, match="semantic models only"):
        ModelSpec(name="det", kind="instance", source="x", classes=classes, tta_sizes=[256])
    with pytest.raises(ValueError, match="distinct input edges"):
        ModelSpec(name="s", kind="semantic", source="x", classes=classes, tta_sizes=[128, 128])
    with pytest.raises(ValueError, match="distinct input edges"):
        ModelSpec(name="s", kind="semantic", source="x", classes=classes, tta_sizes=[4])
