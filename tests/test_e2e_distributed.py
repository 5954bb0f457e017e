"""Distributed mode for real: PostgreSQL + Redis on this machine, separate `tileseg worker` processes and
`tileseg api`, a job submitted and followed over HTTP."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, free_port, start_process, stop_process, wait_http

pytestmark = [pytest.mark.services, pytest.mark.slow]


def _wait_job(base: str, job_id: str, auth: dict, timeout: float = 300) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        job = httpx.get(f"{base}/jobs/{job_id}", headers=auth, timeout=10).json()
        if job["status"] in ("succeeded", "failed", "partial", "cancelled") and job["finished_at"]:
            return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} still {job['status']}")


def test_job_through_api_with_two_workers(tiny_models: Path, photo_dir: Path, pg_url: str, redis_url: str,
                                          tmp_path: Path) -> None:
    env = {**os.environ, "TILESEG_DATABASE_URL": pg_url, "TILESEG_BROKER_URL": redis_url,
           "TILESEG_ARTIFACT_URL": str(tmp_path / "store"), "TILESEG_INPUT_ROOTS": str(tmp_path),
           "TILESEG_PHOTO_BATCH": "2"}
    from pydicom.data import get_testdata_file

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "scan.tif").write_bytes((REPO / "samples" / "geotiff" / "rio_img64.tif").read_bytes())
    (inputs / "ct.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    (inputs / "fake.dcm").write_text("this is not DICOM")

    from core.db import upgrade

    upgrade(url=pg_url)  # the one-shot migrate step of the distributed stack
    import json
    import subprocess
    import sys

    made = subprocess.run([sys.executable, "-m", "core.cli", "token", "create", "alice", "--json"], env=env, cwd=REPO,
                          capture_output=True, text=True, check=True)
    auth = {"Authorization": f"Bearer {json.loads(made.stdout)['token']}"}
    # A temp file a killed worker left mid-copy: the workers remove it at start (it is older than an hour).
    stale = tmp_path / "store" / "jobs" / "old" / ".part-killed"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half an artifact")
    os.utime(stale, (time.time() - 7 * 3600, time.time() - 7 * 3600))
    port = free_port()
    procs = [start_process(["api", "--port", str(port)], env, tmp_path / "api.log")]
    for n in range(2):
        procs.append(start_process(["worker", "--concurrency", "1", "-n", f"w{n}@%h"], env, tmp_path / f"w{n}.log"))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health")
        assert httpx.get(f"{base}/health").json() == {"status": "ok", "database": "ok", "broker": "ok"}
        r = httpx.post(f"{base}/jobs", json={"inputs": [str(photo_dir), str(inputs)]}, headers=auth, timeout=30)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        job = _wait_job(base, job_id, auth)
        assert job["status"] == "partial", job
        assert (job["items_total"], job["items_done"], job["items_failed"]) == (6, 6, 1)

        items = httpx.get(f"{base}/jobs/{job_id}/items", params={"limit": 100}, headers=auth).json()["items"]
        assert [i["seq"] for i in items] == list(range(6))
        failed = [i for i in items if i["status"] == "failed"]
        assert len(failed) == 1 and "fake.dcm" in failed[0]["error"]
        for it in items:
            if it["status"] != "succeeded":
                continue
            assert it["artifacts"], it
            for art in it["artifacts"]:
                body = httpx.get(f"{base}{art['url']}", headers=auth, timeout=30)
                assert body.status_code == 200
                assert hashlib.sha256(body.content).hexdigest() == art["sha256"]
            detail = httpx.get(f"{base}/jobs/{job_id}/items/{it['id']}", headers=auth).json()
            assert detail["metrics"] and sum(m["pixel_count"] for m in detail["metrics"]) > 0
        metrics = httpx.get(f"{base}/jobs/{job_id}/metrics", headers=auth).json()
        assert metrics["status"] == "partial" and metrics["classes"]

        # Items record which worker process did them (hostname:pid), for operators tracing a result.
        assert all(":" in i["meta"]["processed_by"] for i in items if i["status"] == "succeeded")

        assert not stale.exists()

        # An upload with its ground truth (multipart `truth`, paired by stem): the workers fetch both from
        # the artifact store, and the job and the item report pixel accuracy against it.
        import io

        import numpy as np
        from PIL import Image

        photo = sorted(photo_dir.iterdir())[0]
        with Image.open(photo) as im:
            w, h = im.size
        buf = io.BytesIO()
        Image.fromarray(np.zeros((h, w), np.uint8)).save(buf, format="PNG")  # all class 0
        r = httpx.post(f"{base}/jobs", headers=auth, timeout=30,
                       files=[("files", (photo.name, photo.read_bytes(), "image/jpeg")),
                              ("truth", (f"{photo.stem}.png", buf.getvalue(), "image/png"))])
        assert r.status_code == 202, r.text
        scored = _wait_job(base, r.json()["id"], auth)
        assert scored["status"] == "succeeded", scored
        (score,) = httpx.get(f"{base}/jobs/{scored['id']}/metrics", headers=auth).json()["scores"]
        assert score["scored_pixels"] == w * h
        (item,) = httpx.get(f"{base}/jobs/{scored['id']}/items", headers=auth).json()["items"]
        detail = httpx.get(f"{base}/jobs/{scored['id']}/items/{item['id']}", headers=auth).json()
        share0 = sum(m["pixel_count"] for m in detail["metrics"] if m["class_id"] == 0) / (w * h)
        assert detail["scores"][0]["pixel_accuracy"] == pytest.approx(share0, abs=1e-9)

        # Workers yield the CPU to the API (TILESEG_WORKER_NICE, default 10), their prefork children too.
        base_nice = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, procs[0].pid) == base_nice
        for i in items:
            if i["status"] == "succeeded":
                pid = int(i["meta"]["processed_by"].rsplit(":", 1)[1])
                assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, base_nice + 10)
    finally:
        for p in procs:
            stop_process(p)
