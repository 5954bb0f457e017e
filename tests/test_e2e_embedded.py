"""The embedded default end to end: `tileseg run` with no servers, a mixed batch, one bad file."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core.cli", *args], cwd=REPO, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def test_run_mixed_batch(tiny_models: Path, photo_dir: Path, tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    bad = photo_dir / "broken.jpg"
    bad.write_bytes((photo_dir / sorted(os.listdir(photo_dir))[0]).read_bytes()[:300])
    notes = photo_dir / "notes.txt"
    notes.write_text("not an image")
    geotiff = REPO / "samples" / "geotiff" / "rio_img64.tif"
    ct = get_testdata_file("CT_small.dcm")

    proc = run_cli("run", str(photo_dir), str(geotiff), ct, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["status"] == "partial"
    assert out["items_total"] == 7 and out["items_done"] == 7 and out["items_failed"] == 2
    by_name = {Path(i["source"]).name: i for i in out["items"]}
    assert by_name["broken.jpg"]["status"] == "failed" and "broken.jpg" in by_name["broken.jpg"]["error"]
    assert by_name["notes.txt"]["status"] == "failed" and "notes.txt" in by_name["notes.txt"]["error"]
    ok = [i for i in out["items"] if i["status"] == "succeeded"]
    assert len(ok) == 5
    assert {i["meta"]["model"] for i in ok} == {"tiny-photo", "tiny-geo", "tiny-ct"}
    geo = by_name["rio_img64.tif"]
    assert geo["format"] == "geotiff" and "class_raster" in geo["artifacts"]
    assert by_name["CT_small.dcm"]["format"] == "dicom"
    # Each input got its kind's default model, so no item is flagged as run by a model made for another.
    assert not [w for i in ok for w in i["meta"].get("warnings", []) if "was made for" in w]

    # Every artifact exists and matches its stored checksum; per-item figures cover every valid pixel.
    import sqlalchemy as sa

    from core.settings import get_settings

    eng = sa.create_engine(get_settings().db_url)
    with eng.connect() as c:
        rows = c.execute(sa.text("SELECT id, artifacts FROM items WHERE status='succeeded'")).all()
    eng.dispose()
    for _, artifacts in rows:
        artifacts = json.loads(artifacts) if isinstance(artifacts, str) else artifacts
        assert artifacts
        for art in artifacts.values():
            p = Path(art["uri"])
            assert p.is_file() and _sha(p) == art["sha256"] and p.stat().st_size == art["bytes"]
    for it in ok:
        total = sum(m["pixel_count"] for m in it["metrics"])
        assert total == it["meta"]["height"] * it["meta"]["width"] or it["format"] == "geotiff"
        assert abs(sum(m["fraction"] for m in it["metrics"]) - 1.0) < 1e-6
    ct_metrics = by_name["CT_small.dcm"]["metrics"]
    assert all(m["area_unit"] == "mm2" for m in ct_metrics if m["pixel_count"])
    # Job-level rows aggregate the items per model (the three models have different classes).
    assert {c["model"] for c in out["classes"]} == {"tiny-photo", "tiny-geo", "tiny-ct"}
    for model in ("tiny-photo", "tiny-geo", "tiny-ct"):
        job_rows = [c for c in out["classes"] if c["model"] == model]
        item_rows = [m for it in ok if it["meta"]["model"] == model for m in it["metrics"]]
        assert all(m["model"] == model for m in item_rows)
        assert sum(c["pixel_count"] for c in job_rows) == sum(m["pixel_count"] for m in item_rows)
        assert abs(sum(c["fraction"] for c in job_rows) - 1.0) < 1e-6

    # The stored results are queryable again by job ID.
    again = run_cli("results", out["id"], "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["items"] == out["items"]
    human = run_cli("results", out["id"])
    assert "per-class figures" in human.stdout and "broken.jpg" in human.stdout


def test_ground_truth_gives_dice(tiny_models: Path, tmp_path: Path) -> None:
    """Scoring against a supplied mask: Dice/IoU stored per item and for the job."""
    import numpy as np
    from PIL import Image

    img = tmp_path / "img.png"
    truth = tmp_path / "truth.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(img)
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(truth)  # everything is class 0
    proc = run_cli("run", str(img), "--truth", str(truth), "--pipeline", "tiny-photo", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    metrics = {m["class_id"]: m for m in out["items"][0]["metrics"]}
    frac0 = metrics.get(0, {"pixel_count": 0})["pixel_count"] / (40 * 50)
    # All truth is class 0, so IoU(0) = predicted share of class 0, Dice = 2p/(1+p).
    assert metrics[0]["iou"] == pytest.approx(frac0, abs=1e-6)
    assert metrics[0]["dice"] == pytest.approx(2 * frac0 / (1 + frac0), abs=1e-6)
    job0 = {c["class_id"]: c for c in out["classes"]}[0]
    assert job0["iou"] == pytest.approx(frac0, abs=1e-6)


def test_a_tiff_stack_is_one_item_per_page_scored_against_its_own_truth_page(tiny_models: Path,
                                                                             tmp_path: Path) -> None:
    """An image stack with a label stack beside it (microscopy's usual pair of files): every page is an
    item with its own outputs and its own truth page. A label stack with a page too few costs only the
    scoring of the page it lacks: that page is segmented, unscored, and says why."""
    import numpy as np
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    pages = [Image.fromarray(rgb)] * 3
    for name in ("stack.tif", "short.tif"):
        pages[0].save(tmp_path / name, save_all=True, append_images=pages[1:])
    labels = [Image.fromarray(np.full((40, 50), c, np.uint8)) for c in (0, 1, 0)]
    labels[0].save(tmp_path / "labels.tif", save_all=True, append_images=labels[1:])
    labels[0].save(tmp_path / "labels2.tif", save_all=True, append_images=labels[1:2])

    proc = run_cli("run", str(tmp_path / "stack.tif"), str(tmp_path / "short.tif"), "--truth",
                   str(tmp_path / "labels.tif"), "--truth", str(tmp_path / "labels2.tif"), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    items = {(Path(i["source"]).name, i["key"]): i for i in out["items"]}
    assert sorted(items) == sorted((f, f"page-{n:04d}") for f in ("stack.tif", "short.tif") for n in range(3))
    for n, truth_class in enumerate((0, 1, 0)):
        it = items["stack.tif", f"page-{n:04d}"]
        assert it["status"] == "succeeded" and it["meta"]["page"] == n
        assert {Path(a).name for a in it["artifacts"].values()} == {
            f"stack_page-{n:04d}_mask.png", f"stack_page-{n:04d}_overlay.png", *(["stack_masks.tif"] if n == 0 else [])}
        metrics = {m["class_id"]: m for m in it["metrics"]}
        # The same photo on every page, so the same prediction; only the truth page differs. All of a page's
        # truth is one class, so that class's IoU is its predicted share and the other classes' IoU is 0.
        share = metrics.get(truth_class, {"pixel_count": 0})["pixel_count"] / (40 * 50)
        assert metrics[truth_class]["iou"] == pytest.approx(share, abs=1e-6)
        assert all(m["iou"] in (0.0, None) for c, m in metrics.items() if c != truth_class)
    assert items["short.tif", "page-0001"]["status"] == "succeeded"
    lacking = items["short.tif", "page-0002"]
    assert lacking["status"] == "succeeded" and "mask_png" in lacking["artifacts"]
    assert "labels2.tif holds 2 images and none for page-0002" in lacking["meta"]["truth_unscored"]
    assert any("ground truth labels2.tif not scored" in w for w in lacking["meta"]["warnings"])
    assert all(m["iou"] is None for m in lacking["metrics"]) and not lacking.get("scores")

    # The stack's masks come back as one multi-page TIFF, page for page, on the first page's item; the short
    # stack, with a page failed, gets none (every later mask would land on the wrong slice) and says why.
    from PIL import Image as PILImage

    stack = items["stack.tif", "page-0000"]["artifacts"]["mask_stack"]
    assert Path(stack).name == "stack_masks.tif"
    with PILImage.open(stack) as tif:
        assert tif.n_frames == 3
        for n in range(3):
            tif.seek(n)
            with PILImage.open(items["stack.tif", f"page-{n:04d}"]["artifacts"]["mask_png"]) as png:
                np.testing.assert_array_equal(np.asarray(tif), np.asarray(png))
    # Every page of the short stack has its mask too, so it gets its stack (a page that failed would stop
    # it: test_adapter_photo.test_mask_stack_needs_every_page).
    assert "mask_stack" in items["short.tif", "page-0000"]["artifacts"]
    assert not out.get("error")


def test_a_truth_folder_scores_an_input_folder_by_file_name(tiny_models: Path, tmp_path: Path) -> None:
    """`tileseg run images/ --truth labels/`: each photo is scored against the label of the same name; one
    without a label, one whose label has another aspect ratio and one whose label is not an image are
    segmented, unscored, with a warning that says why (the bad truth used to fail the item and lose its
    segmentation)."""
    import numpy as np
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for name, truth_class in (("a", 1), ("b", 0), ("c", None)):
        Image.fromarray(rgb).save(tmp_path / "images" / f"{name}.png")
        if truth_class is not None:
            Image.fromarray(np.full((40, 50), truth_class, np.uint8)).save(tmp_path / "labels" / f"{name}.png")
    for name in ("d", "e"):
        Image.fromarray(rgb).save(tmp_path / "images" / f"{name}.png")
    Image.fromarray(np.zeros((40, 90), np.uint8)).save(tmp_path / "labels" / "d.png")
    (tmp_path / "labels" / "e.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 20)
    proc = run_cli("run", str(tmp_path / "images"), "--truth", str(tmp_path / "labels"), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    items = {Path(i["source"]).stem: i for i in json.loads(proc.stdout)["items"]}
    assert all(i["status"] == "succeeded" for i in items.values())
    for name, truth_class in (("a", 1), ("b", 0)):
        metrics = {m["class_id"]: m for m in items[name]["metrics"]}
        share = metrics.get(truth_class, {"pixel_count": 0})["pixel_count"] / (40 * 50)
        assert metrics[truth_class]["iou"] == pytest.approx(share, abs=1e-6)
        assert all(m["iou"] in (0.0, None) for c, m in metrics.items() if c != truth_class)
    assert all(m["iou"] is None for m in items["c"]["metrics"])
    assert "no truth file named c.* in labels/: not scored" in items["c"]["meta"]["warnings"]
    for name in ("d", "e"):
        it = items[name]
        assert "mask_png" in it["artifacts"] and all(m["iou"] is None for m in it["metrics"])
        assert any(w.startswith(f"ground truth {name}.png not scored: ") for w in it["meta"]["warnings"])
    assert "it is 90x40 px and the image 50x40 px" in items["d"]["meta"]["truth_unscored"]
    job = json.loads(proc.stdout)
    (score,) = job["scores"]
    assert score["scored_pixels"] == 2 * 40 * 50  # a and b only
    human = run_cli("results", job["id"])
    assert "c.png: no truth file named c.*" in human.stdout
    assert "truth not scored (see warnings)" in human.stdout


def test_a_model_made_for_another_input_kind_runs_with_a_warning(tiny_models: Path, tmp_path: Path) -> None:
    """`--pipeline tiny-ct` on a photo: the user asked for it, so it runs, but the item says what it was made
    for, in JSON and in the human report; the DICOM item, which fits, carries no such warning."""
    import numpy as np
    from PIL import Image
    from pydicom.data import get_testdata_file

    img = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(img)
    proc = run_cli("run", str(img), get_testdata_file("CT_small.dcm"), "--pipeline", "tiny-ct", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["status"] == "succeeded"
    by_name = {Path(i["source"]).name: i for i in out["items"]}
    note = "model tiny-ct was made for dicom inputs, this is a photo input"
    assert any(note in w for w in by_name["cat.png"]["meta"]["warnings"])
    assert not any("was made for" in w for w in by_name["CT_small.dcm"]["meta"].get("warnings", []))
    human = run_cli("results", out["id"])
    assert "warnings:" in human.stdout and note in human.stdout and "cat.png" in human.stdout


def _workers_of(data_dir: Path) -> list[int]:
    """PIDs of `core.cli worker` processes running on ``data_dir`` (read from /proc)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes()
            env = (proc / "environ").read_bytes()
        except (OSError, ValueError):
            continue
        if b"core.cli\x00worker" in cmd and f"TILESEG_DATA_DIR={data_dir}".encode() in env:
            pids.append(int(proc.name))
    return pids


def test_ctrl_c_cancels_the_job_and_stops_the_local_worker(tiny_models: Path, photo_dir: Path,
                                                          tmp_path: Path) -> None:
    """Ctrl-C on `tileseg run` in embedded mode: nobody else would finish the job, so it is cancelled (items
    done keep their results), the message says so, the exit code is 130 and no worker is left behind."""
    import shutil
    import signal
    import time

    from core.db import session_scope
    from core.models import Job, JobStatus

    many = tmp_path / "many"
    many.mkdir()
    for i in range(40):
        src = sorted(photo_dir.glob("*.jpg"))[i % 3]
        shutil.copy(src, many / f"p{i:02d}.jpg")
    data_dir = Path(os.environ["TILESEG_DATA_DIR"])
    proc = subprocess.Popen([sys.executable, "-m", "core.cli", "run", str(many), "--pipeline", "tiny-photo"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    def planned() -> bool:
        with session_scope() as s:
            return any(j.items_total for j in s.query(Job).all())

    t0 = time.monotonic()
    while not (_workers_of(data_dir) and planned()) and time.monotonic() - t0 < 90:
        time.sleep(0.2)
    assert _workers_of(data_dir) and planned(), "the local worker never planned the job"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out[-2000:], err[-2000:])
    assert "interrupted: job" in err and "cancelled" in err
    assert not _workers_of(data_dir)
    with session_scope() as s:
        (job,) = s.query(Job).all()
        assert job.status == JobStatus.cancelled and job.items_total == 40
        assert job.items_done == 40  # every item either finished before the cancel or was cancelled


def test_an_item_that_kills_the_local_worker_fails_alone(tiny_models: Path, photo_dir: Path,
                                                         tmp_path: Path) -> None:
    """`tileseg run` on a batch where one photo kills the process working on it (as a decoder's segfault or
    the OOM killer would; injected, tests/fixtures/faults). The run's own worker survives it: the photo is
    failed after TILESEG_ITEM_MAX_RESTARTS restarts, the others succeed, and the run ends with the job
    partial. With a solo-pool local worker the first crash ended the whole run."""
    import shutil

    first = sorted(photo_dir.iterdir())[0]
    shutil.copy(first, photo_dir / "crash-photo.jpg")
    site = REPO / "tests" / "fixtures" / "faults" / "site"
    env = {"TILESEG_INJECT_FAULTS": "1", "TILESEG_ITEM_MAX_RESTARTS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    proc = run_cli("run", str(photo_dir), "--json", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    by_name = {Path(i["source"]).name: i for i in out["items"]}
    crashed = by_name.pop("crash-photo.jpg")
    assert crashed["status"] == "failed" and "died" in crashed["error"]
    assert by_name and all(i["status"] == "succeeded" for i in by_name.values())
    assert out["status"] == "partial" and out["items_failed"] == 1


def test_the_task_time_limit_applies_to_the_local_worker(tiny_models: Path, photo_dir: Path) -> None:
    """A photo whose read never returns (injected) is failed at TILESEG_TASK_TIME_LIMIT under `tileseg run`
    too; the GeoTIFF beside it, a task of its own, succeeds. The solo pool ignored the limit: the run hung."""
    import shutil

    hang = photo_dir.parent / "hang"
    hang.mkdir()
    shutil.copy(sorted(photo_dir.iterdir())[0], hang / "hang-photo.jpg")
    site = REPO / "tests" / "fixtures" / "faults" / "site"
    env = {"TILESEG_INJECT_FAULTS": "1", "TILESEG_TASK_TIME_LIMIT": "20",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    geotiff = REPO / "samples" / "geotiff" / "rio_img64.tif"
    proc = run_cli("run", str(hang / "hang-photo.jpg"), str(geotiff), "--json", "--timeout", "300", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    by_name = {Path(i["source"]).name: i for i in out["items"]}
    assert by_name["rio_img64.tif"]["status"] == "succeeded"
    hung = by_name["hang-photo.jpg"]
    assert hung["status"] == "failed" and "longer than TILESEG_TASK_TIME_LIMIT (20 s)" in hung["error"]


def test_unknown_pipeline_is_refused(tiny_models: Path, photo_dir: Path) -> None:
    proc = run_cli("submit", str(photo_dir), "--pipeline", "nope")
    assert proc.returncode != 0 and "unknown pipeline" in proc.stderr


def test_models_json(tiny_models: Path) -> None:
    proc = run_cli("models", "--json")
    assert proc.returncode == 0
    names = {m["name"]: m for m in json.loads(proc.stdout)}
    assert names["tiny-ct"]["channels"] == 1 and names["tiny-ct"]["default_for"] == ["dicom"]


def test_truth_in_the_models_own_convention_is_read_through_its_spec(tiny_models: Path, tmp_path: Path) -> None:
    """A model whose data writes truth as trimaps (1/2/3 for its classes 0/1/2) scores trimaps without a
    `--truth-map`; a mask in another convention is scored on what the map covers and the item says how much
    it left out. Before, trimap value 2 was scored as class 2, and the other mask silently."""
    import numpy as np
    from PIL import Image

    spec_path = tiny_models / "tiny-photo" / "spec.json"
    spec = json.loads(spec_path.read_text())
    spec["truth_map"] = {"values": {"1": 0, "2": 1, "3": 2}, "reads": "trimaps (1, 2, 3)"}
    spec_path.write_text(json.dumps(spec))
    rgb = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for name in ("a", "b"):
        Image.fromarray(rgb).save(tmp_path / "images" / f"{name}.png")
    Image.fromarray(np.full((40, 50), 2, np.uint8)).save(tmp_path / "labels" / "a.png")  # all class 1
    ids = np.zeros((40, 50), np.uint8)
    ids[:, 25:] = 1
    pal = Image.fromarray(ids, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(tmp_path / "labels" / "b.png")
    proc = run_cli("run", str(tmp_path / "images"), "--truth", str(tmp_path / "labels"), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    items = {Path(i["source"]).stem: i for i in json.loads(proc.stdout)["items"]}
    metrics = {m["class_id"]: m for m in items["a"]["metrics"]}
    share = metrics.get(1, {"pixel_count": 0})["pixel_count"] / (40 * 50)
    assert metrics[1]["iou"] == pytest.approx(share, abs=1e-6)
    assert all(m["iou"] in (0.0, None) for c, m in metrics.items() if c != 1)
    assert items["a"]["meta"]["truth_map"]["from"] == "model tiny-photo"
    # All of a's values (2) are class ids too, so the item says how it read them and how to read them else.
    (doubt,) = items["a"]["meta"]["warnings"]
    assert "values (2) are all class ids of tiny-photo too; they were read as trimaps (1, 2, 3)" in doubt
    doubt, warning = items["b"]["meta"]["warnings"]
    assert "50.0% of its pixels hold values not in the truth map" in warning and "0 (50.0%)" in warning
    # Pixel accuracy and mean IoU against the truth, per item and for the job, from the stored confusion.
    (sa,) = items["a"]["scores"]
    assert sa["scored_pixels"] == 40 * 50 and sa["pixel_accuracy"] == pytest.approx(share, abs=1e-9)
    (sb,) = items["b"]["scores"]
    assert sb["scored_pixels"] == 40 * 25
    (job,) = json.loads(proc.stdout)["scores"]
    assert job["model"] == "tiny-photo" and job["scored_pixels"] == 3000
    assert job["pixel_accuracy"] == pytest.approx(
        (sa["pixel_accuracy"] * 2000 + sb["pixel_accuracy"] * 1000) / 3000, abs=1e-9)
    human = run_cli("results", json.loads(proc.stdout)["id"])
    assert "b.png: ground truth: 50.0% of its pixels" in human.stdout
    assert f"against the ground truth (tiny-photo, 3,000 scored pixels): pixel accuracy {job['pixel_accuracy']:.4f}" \
        in human.stdout
    assert f"vs truth: acc {sa['pixel_accuracy']:.3f}" in " ".join(human.stdout.replace("│", " ").split())


def test_a_dicom_series_scored_against_its_dicom_seg(tiny_models: Path, tmp_path: Path) -> None:
    """`tileseg run series/ --truth liver_seg.dcm`: every slice is scored against the SEG's frame for it."""
    dcmqi = REPO.parent / "shared" / "data" / "medical_labeled" / "ct_liver_spine_heart_dcmqi"
    if not (dcmqi / "dicom_seg" / "liver_seg.dcm").is_file():
        pytest.skip("real data absent: medical_labeled/ct_liver_spine_heart_dcmqi")
    spec_path = tiny_models / "tiny-ct" / "spec.json"
    spec = json.loads(spec_path.read_text())
    spec["classes"][1]["name"] = "liver"
    spec_path.write_text(json.dumps(spec))
    proc = run_cli("run", str(dcmqi / "dicom_ct"), "--truth", str(dcmqi / "dicom_seg" / "liver_seg.dcm"), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["status"] == "succeeded" and len(out["items"]) == 3
    for item in out["items"]:
        (score,) = item["scores"]
        assert score["scored_pixels"] == 512 * 512
        assert item["meta"]["truth_map"]["values"] == {"0": 0, "1": 1}
        liver = {m["class_name"]: m for m in item["metrics"]}["liver"]
        assert liver["iou"] is not None
    assert out["scores"][0]["scored_pixels"] == 3 * 512 * 512
