"""Huge rasters split into row parts: each part predicts exactly the full-raster grid's tiles that touch it,
so the mosaic equals a whole-raster run; parts run as separate items and are mosaicked at the end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from adapters.base import MaskSink, RegionItem, Window, part_key, split_key
from core.jobs import part_rows
from tests.conftest import build_tiny_semantic_model


class ArraySink(MaskSink):
    def __init__(self, h: int, w: int) -> None:
        self.classes = np.full((h, w), 254, np.uint8)
        self.conf = np.full((h, w), -1.0, np.float32)

    def write(self, window: Window, classes: np.ndarray, confidence: np.ndarray) -> None:
        r, c, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
        assert (self.classes[r : r + h, c : c + w] == 254).all(), "block written twice"
        self.classes[r : r + h, c : c + w] = classes
        self.conf[r : r + h, c : c + w] = confidence

    def close(self) -> list:
        return []


def _raster(path: Path, h: int, w: int) -> Path:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:h, :w]
    img = np.stack([(yy * 3 + xx) % 256, (xx * 5) % 256, rng.integers(0, 255, (h, w))]).astype(np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint8", tiled=True,
                       blockxsize=256, blockysize=256, crs="EPSG:32633",
                       transform=from_origin(400000, 5000000, 2.0, 2.0)) as ds:
        ds.write(img)
    return path


def test_part_rows() -> None:
    assert part_rows(100, 100, 10_000) == [(0, 100)]
    parts = part_rows(3000, 1000, 600_000)
    assert parts[0] == (0, 512) and parts[-1][1] == 3000
    assert all(a < b for a, b in parts) and all(p[1] == q[0] for p, q in zip(parts, parts[1:], strict=False))
    assert split_key(part_key("k", 3, 9)) == ("k", (3, 9)) and split_key("slice-0001") == ("slice-0001", None)


def test_parts_equal_whole_run(tmp_path: Path) -> None:
    from adapters.geotiff import GeoTiffFormat
    from pipelines.registry import LoadedModel
    from pipelines.semantic import segment_item
    from pipelines.spec import ModelSpec

    path = _raster(tmp_path / "big.tif", 300, 230)
    build_tiny_semantic_model(tmp_path / "m.keras")
    spec = ModelSpec(name="t", kind="semantic", source=str(tmp_path / "m.keras"), input_size=64, overlap=12,
                     batch_size=3, classes=[{"id": i, "name": f"c{i}"} for i in range(3)],
                     normalization={"kind": "percentile"})
    import keras

    net = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    model = LoadedModel(spec=spec, predict=lambda x: np.asarray(net(x, training=False)))
    with GeoTiffFormat().open(str(path)) as src:
        item = next(iter(src.items()))
        whole = ArraySink(300, 230)
        full = segment_item(item, model, whole)
        parts = ArraySink(300, 230)
        counts = np.zeros(3, np.int64)
        for a, b in [(0, 70), (70, 171), (171, 300)]:
            region = RegionItem(item, a, b)
            sink = ArraySink(b - a, 230)
            res = segment_item(item, model, sink, rows=(a, b))
            parts.classes[a:b], parts.conf[a:b] = sink.classes, sink.conf
            counts += [f.pixel_count for f in res.figures]
            assert region.info.transform[5] == pytest.approx(5000000 - 2.0 * a)
    assert (whole.classes != 254).all() and (parts.classes != 254).all()
    np.testing.assert_allclose(parts.conf, whole.conf, atol=1e-5)
    assert (parts.classes == whole.classes).mean() > 0.999
    assert counts.sum() == 300 * 230 and abs(counts - [f.pixel_count for f in full.figures]).sum() <= 70


@pytest.mark.slow
def test_split_job_is_mosaicked(tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_e2e_embedded import run_cli

    path = _raster(tmp_path / "scene.tif", 700, 500)
    # Ground truth on the raster's grid: each part reads only its own rows of it.
    truth = tmp_path / "truth.tif"
    with rasterio.open(path) as src, rasterio.open(truth, "w", driver="GTiff", width=500, height=700, count=1,
                                                   dtype="uint8", crs=src.crs, transform=src.transform) as ds:
        ds.write((np.mgrid[:700, :500][1] // 170).astype(np.uint8), 1)
    whole = run_cli("run", str(path), "--truth", str(truth), "--json")
    assert whole.returncode == 0, whole.stderr[-2000:]
    one = json.loads(whole.stdout)
    assert one["items_total"] == 1
    split = run_cli("run", str(path), "--truth", str(truth), "--json", env={"TILESEG_SPLIT_PIXELS": "100000"})
    assert split.returncode == 0, split.stderr[-2000:]
    out = json.loads(split.stdout)
    assert out["status"] == "succeeded" and out["items_total"] == 2
    assert [i["meta"]["part"]["rows"] for i in out["items"]] == [[0, 512], [512, 700]]
    first = out["items"][0]["artifacts"]
    assert {"full_class_raster", "full_geojson", "full_gpkg", "full_overlay"} <= set(first)
    reference = one["items"][0]["artifacts"]["class_raster"]
    with rasterio.open(first["full_class_raster"]) as a, rasterio.open(reference) as b:
        assert a.transform == b.transform and a.crs == b.crs and (a.width, a.height) == (500, 700)
        assert (a.read(1) == b.read(1)).mean() > 0.999
    job_pixels = sum(c["pixel_count"] for c in out["classes"])
    assert job_pixels == 700 * 500 == sum(c["pixel_count"] for c in one["classes"])
    assert [i["scores"][0]["scored_pixels"] for i in out["items"]] == [512 * 500, 188 * 500]
    (split_score,), (whole_score,) = out["scores"], one["scores"]
    assert split_score["scored_pixels"] == whole_score["scored_pixels"] == 700 * 500
    assert split_score["pixel_accuracy"] == pytest.approx(whole_score["pixel_accuracy"], abs=1e-3)
