"""Instance segmentation through the whole service: a TF2 OD-API SavedModel registered by spec, a photo
and a georeferenced raster with objects across tile seams, COCO JSON / GeoJSON outputs and instance rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import reset_all
from tests.test_e2e_embedded import run_cli
from tests.test_instances_blobmodel import blob_image, export_blob_model

pytestmark = pytest.mark.slow


@pytest.fixture
def blob_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ts_env: dict[str, str]) -> Path:
    models = tmp_path / "models"
    folder = models / "blobs"
    folder.mkdir(parents=True)
    export_blob_model(folder / "saved")
    spec = {"name": "blobs", "kind": "instance", "source": "saved", "source_format": "savedmodel",
            "classes": [{"id": 1, "name": "red-thing", "color": [255, 0, 0]},
                        {"id": 2, "name": "green-thing", "color": [0, 255, 0]}],
            "input_size": 96, "overlap": 16, "score_threshold": 0.3, "max_detections": 20,
            "ground_resolution_m": 0.25}
    (folder / "spec.json").write_text(json.dumps(spec))
    monkeypatch.setenv("TILESEG_MODEL_DIRS", str(models))
    reset_all()
    return folder


def test_instance_job(blob_spec: Path, tmp_path: Path) -> None:
    import rasterio
    from PIL import Image
    from rasterio.transform import from_origin

    photo = tmp_path / "in" / "blobs.png"
    photo.parent.mkdir()
    Image.fromarray(blob_image(80, 90, [("rect", 10, 10, 30, 40, (220, 30, 30)),
                                        ("disk", 55, 60, 12, (30, 230, 30))])).save(photo)
    # A 200x200 raster tiled at 96 px with 16 px overlap: both objects straddle tile seams.
    raster = tmp_path / "in" / "scene.tif"
    img = blob_image(200, 200, [("rect", 70, 60, 110, 130, (230, 40, 40)), ("disk", 150, 85, 15, (40, 220, 40))])
    with rasterio.open(raster, "w", driver="GTiff", width=200, height=200, count=3, dtype="uint8",
                       crs="EPSG:32618", transform=from_origin(500000, 4000000, 0.5, 0.5)) as ds:
        ds.write(np.moveaxis(img, -1, 0))
    labels = tmp_path / "labels.png"  # a class mask: an instance model cannot score it, and says so
    Image.fromarray(np.zeros((80, 90), np.uint8)).save(labels)
    proc = run_cli("run", str(photo), str(raster), "--truth", str(labels), "--truth", str(labels),
                   "--pipeline", "blobs", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["status"] == "succeeded", out
    by_name = {Path(i["source"]).name: i for i in out["items"]}
    assert by_name["blobs.png"]["instances"] == 2
    assert by_name["scene.tif"]["instances"] == 2  # one instance per object despite the seams
    assert {"coco_json", "overlay"} <= set(by_name["blobs.png"]["artifacts"])
    geo = by_name["scene.tif"]
    # Instance models run on the input's own pixels; a 0.5 m raster for a 0.25 m model is flagged.
    assert any("differs from the 0.25 m" in w for w in geo["meta"]["warnings"]), geo["meta"]
    (note,) = by_name["blobs.png"]["meta"]["warnings"]
    assert note.startswith("ground truth labels.png is not scored: blobs is an instance model")
    assert note in geo["meta"]["warnings"] and not by_name["blobs.png"]["scores"]
    assert {"geojson", "gpkg", "instance_raster", "class_raster"} <= set(geo["artifacts"])
    import pyogrio

    layer = pyogrio.read_info(geo["artifacts"]["gpkg"])
    assert layer["features"] == 2 and layer["driver"] == "GPKG" and "32618" in str(layer["crs"])
    _, _, _, fields = pyogrio.raw.read(geo["artifacts"]["gpkg"], columns=["score"])
    assert all(0.3 <= v <= 1 for v in fields[0])
    features = json.loads(Path(geo["artifacts"]["geojson"]).read_text())["features"]
    assert len(features) == 2 and all(0.3 <= f["properties"]["score"] <= 1 for f in features)
    xs = [x for f in features for ring in f["geometry"]["coordinates"] for x, _ in ring]
    assert 500000 <= min(xs) and max(xs) <= 500100  # polygons are in the source CRS (UTM metres)
    coco = json.loads(Path(by_name["blobs.png"]["artifacts"]["coco_json"]).read_text())
    assert sorted(a["category_id"] for a in coco["annotations"]) == [1, 2]
    red = [m for m in geo["metrics"] if m["class_name"] == "red-thing"][0]
    assert red["instance_count"] == 1
    assert red["area"] == pytest.approx(40 * 70 * 0.25, rel=0.05) and red["area_unit"] == "m2"
    job = {c["class_name"]: c for c in out["classes"]}
    assert job["red-thing"]["instance_count"] == 2 and job["green-thing"]["instance_count"] == 2


def test_eval_instance_model_on_pets_layout(blob_spec: Path, tmp_path: Path) -> None:
    """`tileseg eval` on an instance model: COCO mask/box AP from a folder laid out like oxford_pets."""
    from PIL import Image

    spec = json.loads((blob_spec / "spec.json").read_text())
    spec["classes"] = [{"id": 1, "name": "cat", "color": [255, 0, 0]}, {"id": 2, "name": "dog", "color": [0, 255, 0]}]
    (blob_spec / "spec.json").write_text(json.dumps(spec))
    data = tmp_path / "pets"
    for sub in ("images", "trimaps", "annotations"):
        (data / sub).mkdir(parents=True)
    lines = []
    for n in range(4):
        # Red blob = cat (class 1), green = dog (class 2); trimap 1 = pet, 2 = background, 3 = outline.
        colour, name = ((220, 30, 30), f"Cat_{n}") if n % 2 == 0 else ((30, 220, 30), f"dog_{n}")
        img = blob_image(64, 64, [("rect", 10 + n, 12, 50, 44 + n, colour)])
        Image.fromarray(img).save(data / "images" / f"{name}.jpg", quality=95)
        trimap = np.full((64, 64), 2, np.uint8)
        trimap[10 + n : 50, 12 : 44 + n] = 1
        Image.fromarray(trimap).save(data / "trimaps" / f"{name}.png")
        lines.append(f"{name} 1 {1 if n % 2 == 0 else 2} 1")
    (data / "annotations" / "trainval.txt").write_text("\n".join(lines) + "\n")
    proc = run_cli("eval", "--model", "blobs", "--data", str(data), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["kind"] == "instance" and report["images"] == 4
    assert report["mask_ap50"] == pytest.approx(1.0) and report["box_ap50"] == pytest.approx(1.0)
    assert 0.5 < report["mask_ap"] <= 1.0
