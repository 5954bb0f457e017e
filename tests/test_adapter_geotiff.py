"""GeoTIFF adapter: real rasters, generated rasters with explicit CRS/transform, sinks, polygons, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from pycocotools import mask as mask_utils
from rasterio.crs import CRS
from rasterio.windows import Window

from adapters.base import AdapterError, InputTooLarge, UnsupportedInput
from adapters.geotiff import GeoTiffFormat, polygon_area, rle_crop
from adapters.photo import PhotoFormat
from pipelines.instances import Instance

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "geotiff_samples"
NAMES = ["background", "water", "building"]
COLORS = [(0, 0, 0), (0, 0, 255), (255, 0, 0)]


def _sample(name: str) -> str:
    p = DATA / name
    if not p.is_file():
        pytest.skip(f"real data absent: {p}")
    return str(p)


def _head(path: str | Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(1024)


def _write(path: Path, data: np.ndarray, **kw) -> Path:
    prof = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype=data.dtype)
    prof.update(kw)
    with rasterio.open(path, "w", **prof) as ds:
        ds.write(data)
    return path


@pytest.fixture
def fmt() -> GeoTiffFormat:
    return GeoTiffFormat()


# 10 m pixels in UTM 33N, origin at (500000, 4600000).
UTM = CRS.from_epsg(32633)
T10 = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4600000.0)


# --------------------------------------------------------------------------------------------- real files


@pytest.mark.parametrize(
    "name", ["RGB.byte.tif", "shade.tif", "goes.tif", "cogeo.tif", "spacenet6_rotterdam_ms4.tif"]
)
def test_real_samples_sniff_as_geotiff_not_photo(fmt, name):
    path = _sample(name)
    assert fmt.sniff(path, _head(path))
    assert not PhotoFormat().sniff(path, _head(path))


def test_rgb_byte_nodata_mask_and_area(fmt):
    path = _sample("RGB.byte.tif")
    with fmt.open(path) as src:
        (item,) = list(src.items())
        assert item.streamable and item.key == ""
        info = item.info
        assert (info.height, info.width, info.bands, info.dtype) == (718, 791, 3, "uint8")
        assert CRS.from_wkt(info.crs_wkt).to_epsg() == 32618
        assert info.pixel_area == pytest.approx(300.0379266750948 * 300.041782729805)
        assert info.area_unit == "m2"
        win = Window(0, 0, 200, 150)  # top-left corner: part of the black nodata collar
        px = item.read(win)
        assert px.shape == (3, 150, 200) and px.dtype == np.uint8
        valid = item.valid_mask(win)
        assert valid.shape == (150, 200)
        # dataset mask: invalid exactly where every band is nodata (0)
        np.testing.assert_array_equal(valid, (px != 0).any(axis=0))
        assert 0 < valid.mean() < 1


def test_shade_nodata_255(fmt):
    with fmt.open(_sample("shade.tif")) as src:
        item = next(src.items())
        win = Window(256, 256, 300, 300)
        np.testing.assert_array_equal(item.valid_mask(win), item.read(win)[0] != 255)


def test_goes_non_epsg_crs_kept_as_wkt(fmt):
    with fmt.open(_sample("goes.tif")) as src:
        info = next(src.items()).info
    crs = CRS.from_wkt(info.crs_wkt)
    assert crs.to_epsg() is None and "geos" in crs.to_proj4()
    assert info.extra["epsg"] is None
    assert info.pixel_area == pytest.approx(20054.962950561665**2)


def test_float64_four_band_read_native_and_preview(fmt):
    with fmt.open(_sample("spacenet6_rotterdam_ms4.tif")) as src:
        item = next(src.items())
        assert item.info.bands == 4 and item.info.dtype == "float64"
        assert item.valid_mask() is None
        px = item.read(Window(10, 20, 30, 40), bands=[4, 3])
        assert px.shape == (2, 40, 30) and px.dtype == np.float64 and px.max() > 255  # raw DNs, not scaled
        prev = item.preview(128)
        assert prev.shape == (128, 128, 3) and prev.dtype == np.uint8
        assert prev.min() == 0 and prev.max() == 255  # percentile stretch uses the full range


def test_cog_preview_is_decimated(fmt):
    with fmt.open(_sample("cogeo.tif")) as src:
        prev = next(src.items()).preview(100)
    assert prev.shape == (100, 100, 3) and prev.std() > 5


# --------------------------------------------------------------------------------------------- reads


def test_windowed_reads_match_full_read_and_pad_outside(tmp_path, fmt):
    rng = np.random.default_rng(0)
    data = rng.integers(1, 4000, (2, 70, 90), dtype=np.uint16)
    data[:, :5, :] = 0
    p = _write(tmp_path / "a.tif", data, crs=UTM, transform=T10, nodata=0, tiled=True, blockxsize=32, blockysize=32)
    with fmt.open(str(p)) as src:
        item = next(src.items())
        np.testing.assert_array_equal(item.read(), data)
        np.testing.assert_array_equal(item.read(Window(33, 17, 20, 11)), data[:, 17:28, 33:53])
        # window hanging over the bottom-right edge: padded with nodata and reported invalid
        edge = item.read(Window(80, 60, 16, 16))
        assert edge.shape == (2, 16, 16)
        np.testing.assert_array_equal(edge[:, :10, :10], data[:, 60:, 80:])
        assert (edge[:, 10:, :] == 0).all()
        vm = item.valid_mask(Window(80, 60, 16, 16))
        assert vm[:10, :10].all() and not vm[10:, :].any() and not vm[:, 10:].any()
        assert not item.valid_mask(Window(0, 0, 10, 10))[:5].any()


def test_internal_mask_is_honoured(tmp_path, fmt):
    data = np.full((3, 40, 40), 100, np.uint8)
    p = tmp_path / "m.tif"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(
        p, "w", driver="GTiff", width=40, height=40, count=3, dtype="uint8", crs=UTM, transform=T10
    ) as ds:
        ds.write(data)
        mask = np.full((40, 40), 255, np.uint8)
        mask[:, :13] = 0
        ds.write_mask(mask)
    with fmt.open(str(p)) as src:
        vm = next(src.items()).valid_mask()
    assert not vm[:, :13].any() and vm[:, 13:].all()


def test_no_crs_multiband_is_processed_with_warning(tmp_path, fmt):
    p = _write(tmp_path / "nocrs.tif", np.ones((5, 20, 30), np.uint16))
    assert fmt.sniff(str(p), _head(p))  # >3 bands and 16-bit: not a photo
    with fmt.open(str(p)) as src:
        item = next(src.items())
        info = item.info
        assert info.crs_wkt is None and info.transform is None and info.pixel_area is None
        assert any("no CRS" in w for w in info.warnings)
        sink = fmt.semantic_sink(item, tmp_path / "out", NAMES, COLORS)
        sink.write(Window(0, 0, 30, 20), np.ones((20, 30), np.uint8), np.full((20, 30), 0.5, np.float32))
        kinds = {a.kind for a in sink.close()}
    assert kinds == {"class_raster", "confidence", "overlay"}  # no geo outputs


def test_multipage_16bit_stack_is_one_item_per_page(tmp_path, fmt, monkeypatch):
    """A 16-bit image stack (no CRS, so not a photo) gives every page an item; pages open again after
    release, so a long stack holds no file handle per page."""
    from PIL import Image

    rng = np.random.default_rng(1)
    pages = [rng.integers(0, 65535, (24, 40), np.uint16) for _ in range(3)]
    p = tmp_path / "stack16.tif"
    Image.fromarray(pages[0]).save(p, save_all=True, append_images=[Image.fromarray(a) for a in pages[1:]])
    assert fmt.sniff(str(p), _head(p))
    with fmt.open(str(p)) as src:
        items = list(src.items())
        assert [i.key for i in items] == ["page-0000", "page-0001", "page-0002"]
        assert all(i._dataset is None for i in items)
        assert items[1].info.extra["page"] == 1 and items[1].info.extra["pages"] == 3
        np.testing.assert_array_equal(items[2].read()[0], pages[2])
        np.testing.assert_array_equal(items[0].read(Window(5, 4, 10, 6))[0], pages[0][4:10, 5:15])
        np.testing.assert_array_equal(src.item("page-0001").read()[0], pages[1])
        sink = fmt.semantic_sink(items[2], tmp_path / "out", NAMES, COLORS)
        sink.write(Window(0, 0, 40, 24), np.ones((24, 40), np.uint8), np.full((24, 40), 0.5, np.float32))
        names = {a.path.name for a in sink.close()}
    assert {"stack16_page-0002_classes.tif", "stack16_page-0002_confidence.tif"} <= names

    # A worker asks for one page: only that page is opened (each open walks the file's page chain, so opening
    # all of them at every item cost 29 s per item on a 2,000-page stack).
    import adapters.geotiff as geotiff

    opened: list[str] = []
    real_open = geotiff.rasterio.open

    def counting_open(name, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        opened.append(str(name))
        return real_open(name, *a, **kw)

    monkeypatch.setattr(geotiff.rasterio, "open", counting_open)
    with fmt.open(str(p)) as src:
        np.testing.assert_array_equal(src.item("page-0002").read()[0], pages[2])
    assert opened[0] == str(p) and len(opened) == 3 and all(o.startswith("GTIFF_DIR:3:") for o in opened[1:])


def test_geotiff_with_overviews_is_one_item(tmp_path, fmt):
    p = _write(tmp_path / "ovr.tif", np.arange(64 * 64, dtype=np.uint16).reshape(1, 64, 64), crs=UTM, transform=T10)
    with rasterio.open(p, "r+") as ds:
        ds.build_overviews([2, 4])
    with fmt.open(str(p)) as src:
        (item,) = list(src.items())
        assert item.key == "" and item.info.height == 64


def test_plain_rgb_tiff_goes_to_photo(tmp_path, fmt):
    p = _write(tmp_path / "plain.tif", np.zeros((3, 8, 8), np.uint8))
    assert not fmt.sniff(str(p), _head(p))
    assert PhotoFormat().sniff(str(p), _head(p))


def test_geographic_crs_has_no_pixel_area(tmp_path, fmt):
    t = Affine(0.001, 0, 10.0, 0, -0.001, 45.0)
    p = _write(tmp_path / "geo.tif", np.ones((1, 10, 10), np.uint8), crs="EPSG:4326", transform=t)
    with fmt.open(str(p)) as src:
        info = next(src.items()).info
    assert info.pixel_area is None and any("geographic" in w for w in info.warnings)


# --------------------------------------------------------------------------------------------- sinks


def _stream(sink, classes: np.ndarray, conf: np.ndarray, block: int, seed: int = 0) -> None:
    """Write blocks in a shuffled order, as a tiled engine with read-ahead would."""
    h, w = classes.shape
    wins = [Window(c, r, min(block, w - c), min(block, h - r)) for r in range(0, h, block) for c in range(0, w, block)]
    for i in np.random.default_rng(seed).permutation(len(wins)):
        win = wins[i]
        sl = (slice(win.row_off, win.row_off + win.height), slice(win.col_off, win.col_off + win.width))
        sink.write(win, classes[sl], conf[sl])


def test_semantic_sink_streams_georeferenced_cog(tmp_path, fmt):
    h, w = 600, 700
    data = np.full((1, h, w), 50, np.uint8)
    data[0, :, :40] = 0  # nodata strip
    src_path = _write(tmp_path / "in.tif", data, crs=UTM, transform=T10, nodata=0)
    classes = np.zeros((h, w), np.uint8)
    classes[100:300, 200:500] = 2
    classes[400:, :] = 1
    conf = np.linspace(0, 1, h * w, dtype=np.float32).reshape(h, w)
    with fmt.open(str(src_path)) as src:
        item = next(src.items())
        sink = fmt.semantic_sink(item, tmp_path / "out", NAMES, COLORS)
        _stream(sink, classes, conf, 256)
        arts = {a.kind: a.path for a in sink.close()}
    assert set(arts) == {"class_raster", "confidence", "geojson", "gpkg", "overlay"}
    assert not list((tmp_path / "out").glob(".*partial*"))  # temporaries removed
    import json

    import pyogrio

    # The GeoPackage holds the same polygons as the GeoJSON, in the source CRS.
    layer = pyogrio.read_info(arts["gpkg"])
    n_geojson = len(json.loads(Path(arts["geojson"]).read_text())["features"])
    assert layer["driver"] == "GPKG" and layer["features"] == n_geojson > 0
    assert rasterio.crs.CRS.from_user_input(layer["crs"]) == UTM
    with rasterio.open(arts["class_raster"]) as ds:
        assert ds.crs == UTM and ds.transform.almost_equals(T10)
        assert ds.dtypes == ("uint8",) and ds.nodata == 255 and ds.count == 1
        assert ds.profile["tiled"] and ds.block_shapes[0] == (512, 512)
        assert ds.compression.value.upper() == "DEFLATE"
        assert ds.overviews(1) == [2]  # COG layout with nearest overviews
        out = ds.read(1)
    expect = classes.copy()
    expect[:, :40] = 255
    np.testing.assert_array_equal(out, expect)
    with rasterio.open(arts["confidence"]) as ds:
        c = ds.read(1)
        assert ds.nodata == 0 and ds.crs == UTM
    assert (c[:, :40] == 0).all()
    np.testing.assert_allclose(c[:, 40:] / 255.0, np.clip(conf[:, 40:], 1 / 255, 1), atol=0.5 / 255 + 1e-6)
    assert sink.class_counts[255] == h * 40
    areas = sink.class_areas()
    assert areas[2] == pytest.approx(200 * 300 * 100.0)  # m2: 10 m pixels
    from PIL import Image

    ov = Image.open(arts["overlay"])
    assert ov.size == (700, 600) and ov.mode == "RGB"


def _features(path: Path) -> list[dict]:
    gj = json.loads(Path(path).read_text())
    assert gj["type"] == "FeatureCollection"
    return gj["features"]


def _ring_bounds(ring) -> tuple[float, float, float, float]:
    xs, ys = zip(*ring, strict=True)
    return min(xs), min(ys), max(xs), max(ys)


def test_polygons_across_block_and_chunk_boundaries(tmp_path):
    """A rectangle spanning a 256-px sink block boundary and a ring with a hole spanning polygonize chunk
    edges: one feature each whatever the chunk size, corners at the transform of the pixel corners, exact
    areas (pixels * 100 m2), the hole kept."""
    h, w = 300, 400
    src_path = _write(tmp_path / "in.tif", np.ones((1, h, w), np.uint8), crs=UTM, transform=T10)
    classes = np.zeros((h, w), np.uint8)
    classes[200:290, 230:301] = 1  # rows 200..289, cols 230..300, crosses block edges at 256
    classes[10:20, 10:20] = 2
    classes[100:160, 100:160] = 2  # a ring around the chunk corner (128, 128) ...
    classes[115:145, 115:145] = 0  # ... with a hole
    for chunk in (4096, 128, 50):
        fmt = GeoTiffFormat(confidence=False, polygon_chunk=chunk)
        with fmt.open(str(src_path)) as src:
            sink = fmt.semantic_sink(next(src.items()), tmp_path / f"o{chunk}", NAMES, COLORS)
            _stream(sink, classes, np.ones((h, w), np.float32), 256, seed=chunk)
            arts = {a.kind: a.path for a in sink.close()}
        feats = _features(arts["geojson"])
        assert {f["properties"]["class_name"] for f in feats} == {"water", "building"}  # background skipped
        (water,) = [f for f in feats if f["properties"]["class_id"] == 1]
        assert water["properties"]["area_m2"] == pytest.approx(90 * 71 * 100.0)
        x0, y0, x1, y1 = _ring_bounds(water["geometry"]["coordinates"][0])
        assert (x0, y1) == pytest.approx(T10 @ (230, 200)) and (x1, y0) == pytest.approx(T10 @ (301, 290))
        buildings = sorted((f for f in feats if f["properties"]["class_id"] == 2),
                           key=lambda f: f["properties"]["area"])
        assert [f["properties"]["area"] for f in buildings] == pytest.approx([100 * 100.0, (60**2 - 30**2) * 100.0])
        ring = buildings[1]["geometry"]["coordinates"]
        assert len(ring) == 2  # exterior and the hole


def test_polygons_skip_nodata_and_keep_non_epsg_crs(tmp_path, fmt):
    crs = CRS.from_proj4("+proj=laea +lat_0=52 +lon_0=10 +x_0=4321000 +y_0=3210000 +ellps=GRS80 +units=m")
    assert crs.to_epsg(confidence_threshold=100) is None  # same parameters as EPSG:3035 but no authority
    data = np.full((1, 64, 64), 7, np.uint8)
    data[0, 32:, :] = 0
    src_path = _write(tmp_path / "laea.tif", data, crs=crs, transform=T10, nodata=0)
    with fmt.open(str(src_path)) as src:
        item = next(src.items())
        assert item.info.extra["epsg"] is None and CRS.from_wkt(item.info.crs_wkt) == crs
        sink = fmt.semantic_sink(item, tmp_path / "o", NAMES, COLORS)
        sink.write(Window(0, 0, 64, 64), np.ones((64, 64), np.uint8), np.ones((64, 64), np.float32))
        arts = {a.kind: a.path for a in sink.close()}
    gj = json.loads(arts["geojson"].read_text())
    assert "crs" not in gj and CRS.from_wkt(gj["crs_wkt"]) == crs
    (feat,) = gj["features"]
    assert feat["properties"]["area_m2"] == pytest.approx(32 * 64 * 100.0)  # nodata half never a polygon
    with rasterio.open(arts["class_raster"]) as ds:
        assert ds.crs == crs


def test_geographic_polygon_area_on_sphere():
    # 1 x 1 degree cell at the equator: R^2 * dlon * (sin(1deg) - sin(0))
    ring = [(0, 0), (1, 0), (1, 1), (0, 1), (0, 0)]
    expect = 6_371_008.8**2 * math.radians(1) * math.sin(math.radians(1))
    assert polygon_area([ring], geographic=True) == pytest.approx(expect, rel=1e-9)
    hole = [(0.25, 0.25), (0.75, 0.25), (0.75, 0.75), (0.25, 0.75), (0.25, 0.25)]
    assert polygon_area([ring, hole]) == pytest.approx(0.75)


# --------------------------------------------------------------------------------------------- instances


def _instance(mask: np.ndarray, cid: int, score: float) -> Instance:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return Instance(cid, score, tuple(float(v) for v in mask_utils.toBbox(rle)), rle, int(mask.sum()))


def test_rle_crop_matches_pycocotools():
    rng = np.random.default_rng(3)
    for _ in range(20):
        h, w = rng.integers(1, 40, 2)
        m = np.zeros((h, w), np.uint8)
        r0, c0 = rng.integers(0, h), rng.integers(0, w)
        m[r0 : r0 + rng.integers(1, h + 1), c0 : c0 + rng.integers(1, w + 1)] = 1
        m &= rng.random((h, w)) < 0.8
        rle = mask_utils.encode(np.asfortranarray(m))
        got = rle_crop(rle)
        if not m.any():
            assert got is None
            continue
        crop, rr, cc = got
        full = np.zeros((h, w), bool)
        full[rr : rr + crop.shape[0], cc : cc + crop.shape[1]] = crop
        np.testing.assert_array_equal(full, mask_utils.decode(rle).astype(bool))
        rows, cols = np.nonzero(m)
        assert (rr, cc) == (rows.min(), cols.min()) and crop.shape == (np.ptp(rows) + 1, np.ptp(cols) + 1)


def test_write_instances_rasters_and_polygons(tmp_path, fmt):
    h, w = 80, 100
    data = np.full((3, h, w), 9, np.uint8)
    data[:, 70:, :] = 0  # nodata bottom rows
    src_path = _write(tmp_path / "in.tif", data, crs=UTM, transform=T10, nodata=0)
    a = np.zeros((h, w), bool)
    a[10:30, 10:40] = True
    b = np.zeros((h, w), bool)
    b[20:40, 30:60] = True  # overlaps a; lower score
    c = np.zeros((h, w), bool)
    c[60:80, 80:90] = True  # half in nodata
    insts = [_instance(b, 1, 0.6), _instance(a, 2, 0.9), _instance(c, 1, 0.7)]
    with fmt.open(str(src_path)) as src:
        arts = {x.kind: x.path for x in fmt.write_instances(next(src.items()), insts, tmp_path / "o", NAMES, COLORS)}
    assert set(arts) == {"instance_raster", "class_raster", "geojson", "gpkg"}
    with rasterio.open(arts["instance_raster"]) as ds:
        assert ds.crs == UTM and ds.transform.almost_equals(T10) and ds.dtypes[0] == "uint16"
        ids = ds.read(1)
    with rasterio.open(arts["class_raster"]) as ds:
        cls = ds.read(1)
    assert (ids[a] == 2).all()  # higher score wins the overlap
    assert (ids[b & ~a] == 1).all()
    assert (ids[60:70, 80:90] == 3).all() and (ids[70:, :] == 0).all()
    assert ((ids == 0) == (cls == 255)).all() and (cls[a] == 2).all() and (cls[b & ~a] == 1).all()
    feats = {f["properties"]["instance_id"]: f for f in _features(arts["geojson"])}
    assert {k: feats[2]["properties"][k] for k in ("class_id", "class_name", "score")} == {
        "class_id": 2, "class_name": "building", "score": 0.9}
    assert feats[2]["properties"]["area_m2"] == pytest.approx(20 * 30 * 100.0)
    assert feats[3]["properties"]["pixels"] == 10 * 10  # nodata part dropped
    x0, y1 = T10 @ (10, 10)
    x1, y0 = T10 @ (40, 30)
    assert _ring_bounds(feats[2]["geometry"]["coordinates"][0]) == pytest.approx((x0, y0, x1, y1))


# --------------------------------------------------------------------------------------------- bad input


def test_truncated_tiff_fails_with_file_name(tmp_path, fmt):
    raw = Path(_sample("RGB.byte.tif")).read_bytes()
    p = tmp_path / "cut.tif"
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(AdapterError, match="cut.tif"):
        with fmt.open(str(p)) as src:
            next(src.items()).read()


def test_truncated_compressed_tiff_fails(tmp_path, fmt):
    rng = np.random.default_rng(1)
    src = _write(tmp_path / "full.tif", rng.integers(0, 255, (1, 256, 256), dtype=np.uint8), crs=UTM,
                 transform=T10, tiled=True, blockxsize=64, blockysize=64, compress="deflate")
    raw = src.read_bytes()
    p = tmp_path / "cut2.tif"
    p.write_bytes(raw[: int(len(raw) * 0.6)])
    with pytest.raises(AdapterError, match="cut2.tif"):
        with fmt.open(str(p)) as s:
            next(s.items()).read()


def test_text_file_named_tif(tmp_path, fmt):
    p = tmp_path / "notes.tif"
    p.write_text("this is not a raster\n" * 10)
    assert not fmt.sniff(str(p), _head(p))
    with pytest.raises(AdapterError, match="notes.tif"):
        fmt.open(str(p))


def test_empty_file(tmp_path, fmt):
    p = tmp_path / "empty.tif"
    p.write_bytes(b"")
    assert not fmt.sniff(str(p), b"")
    with pytest.raises(UnsupportedInput, match="empty"):
        fmt.open(str(p))


def test_huge_declared_size_is_refused_before_reading(tmp_path, fmt):
    p = tmp_path / "bomb.tif"
    with rasterio.open(p, "w", driver="GTiff", width=100_000, height=100_000, count=1, dtype="uint8", crs=UTM,
                       transform=T10, tiled=True, compress="deflate", sparse_ok=True) as ds:
        ds.write(np.ones((1, 16, 16), np.uint8), window=Window(0, 0, 16, 16))
    assert p.stat().st_size < 2_000_000
    assert fmt.sniff(str(p), _head(p))
    with pytest.raises(InputTooLarge, match="bomb.tif"):
        fmt.open(str(p))
    with fmt.open(str(p), max_pixels=10**10) as src:  # allowed when raised: still read window by window
        assert next(src.items()).read(Window(0, 0, 16, 16)).sum() == 256


def test_detect_routes_rasters_to_geotiff():
    pytest.importorskip("adapters.dicom")  # detect() walks every registered format
    from adapters import detect

    for name in ("RGB.byte.tif", "goes.tif", "spacenet6_rotterdam_ms4.tif"):
        assert detect(_sample(name)).name == "geotiff"


def _jp2(path: Path, data: np.ndarray, **kw) -> Path:
    return _write(path, data, driver="JP2OpenJPEG", QUALITY=100, REVERSIBLE="YES", **kw)


def test_georeferenced_jpeg2000_is_a_raster_not_a_photo(tmp_path):
    """A georeferenced JPEG 2000 (as Sentinel-2, SPOT or Pleiades deliver bands) is read window by window with
    its CRS, and the outputs are GeoTIFFs in that CRS. It was refused as "not a recognised image"."""
    from adapters import detect

    data = np.random.default_rng(4).integers(0, 4000, (1, 200, 300), np.uint16)
    p = _jp2(tmp_path / "T33TWN_B04.jp2", data, crs=UTM, transform=T10)
    fmt = detect(str(p))
    assert fmt.name == "geotiff"
    with fmt.open(str(p)) as src:
        (item,) = list(src.items())
        assert item.info.extra["driver"] == "JP2OpenJPEG" and item.info.pixel_area == pytest.approx(100.0)
        assert CRS.from_wkt(item.info.crs_wkt) == UTM
        np.testing.assert_array_equal(item.read(Window(10, 20, 64, 32)), data[:, 20:52, 10:74])
        sink = fmt.semantic_sink(item, tmp_path / "out", NAMES, COLORS)
        sink.write(Window(0, 0, 300, 200), np.ones((200, 300), np.uint8), np.full((200, 300), 0.5, np.float32))
        arts = {a.kind: a.path for a in sink.close()}
    with rasterio.open(arts["class_raster"]) as out:
        assert out.driver == "GTiff" and out.crs == UTM and out.transform == T10


def test_jpeg2000_without_georeferencing_is_read_by_gdal(tmp_path):
    """Pillow's decoder fails on GDAL-written JPEG 2000 ("broken data stream"), so every JPEG 2000 goes to
    GDAL; without a CRS it is processed in pixel space with a warning, like a plain 16-bit TIFF."""
    from adapters import detect

    data = np.random.default_rng(5).integers(0, 255, (3, 40, 50), np.uint8)
    p = _jp2(tmp_path / "photo.jp2", data)
    fmt = detect(str(p))
    assert fmt.name == "geotiff"
    with fmt.open(str(p)) as src:
        item = next(src.items())
        assert any("no CRS" in w for w in item.info.warnings)
        np.testing.assert_array_equal(item.read(), data)


def test_png_with_a_world_file_is_georeferenced(tmp_path):
    """A GIS export: PNG + world file (+ .aux.xml for the CRS). Without the sidecars the same PNG is a photo."""
    from PIL import Image

    from adapters import detect

    data = np.random.default_rng(6).integers(0, 255, (30, 40, 3), np.uint8)
    p = tmp_path / "export.png"
    Image.fromarray(data).save(p)
    assert detect(str(p)).name == "photo"
    (tmp_path / "export.pgw").write_text("10.0\n0.0\n0.0\n-10.0\n500005.0\n4599995.0\n")
    (tmp_path / "export.png.aux.xml").write_text(f"<PAMDataset><SRS>{UTM.to_wkt()}</SRS></PAMDataset>")
    fmt = detect(str(p))
    assert fmt.name == "geotiff"
    with fmt.open(str(p)) as src:
        item = next(src.items())
        assert item.info.transform == tuple(T10)[:6] and CRS.from_wkt(item.info.crs_wkt) == UTM
        np.testing.assert_array_equal(item.read(), data.transpose(2, 0, 1))
