"""Artifact store and inputs on an S3-compatible server (moto in server mode on loopback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, reset_all


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    yield opts
    server.stop()


def test_store_roundtrip(s3: dict, tmp_path: Path) -> None:
    from core.store import ArtifactStore, fetch_input

    store = ArtifactStore("s3://tileseg-test/prefix", s3)
    f = tmp_path / "mask.png"
    f.write_bytes(b"\x89PNG fake but bytes are bytes" * 100)
    art = store.put(f, "jobs/1/2/mask.png", "image/png")
    assert art.uri == "s3://tileseg-test/prefix/jobs/1/2/mask.png" and art.bytes == f.stat().st_size
    with store.open(art.uri) as fh:
        assert fh.read() == f.read_bytes()
    with fetch_input(art.uri, s3) as local:
        assert Path(local).read_bytes() == f.read_bytes()
    assert store.local_path(art.uri) is None


@pytest.mark.slow
def test_job_with_s3_inputs_and_outputs(s3: dict, tiny_models: Path, photo_dir: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec

    fs = fsspec.filesystem("s3", **s3)
    fs.mkdir("inbox")
    first, second = sorted(photo_dir.glob("*.jpg"))[:2]
    fs.put_file(str(first), f"inbox/photos/{first.name}")
    fs.put_file(str(second), "inbox/photos/chat noir \"été\".jpg")  # a name that needs quoting in HTTP
    env = {**os.environ, "TILESEG_ARTIFACT_URL": "s3://outbox/tileseg", "TILESEG_STORAGE_OPTIONS": json.dumps(s3)}
    proc = subprocess.run([sys.executable, "-m", "core.cli", "run", "s3://inbox/photos", "--json"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["status"] == "succeeded" and out["items_total"] == 2
    for it in out["items"]:
        assert it["source"].startswith("s3://inbox/photos/")
        for uri in it["artifacts"].values():
            assert uri.startswith("s3://outbox/tileseg/jobs/") and fs.size(uri) > 0
    monkeypatch.setenv("TILESEG_ARTIFACT_URL", "s3://outbox/tileseg")
    monkeypatch.setenv("TILESEG_STORAGE_OPTIONS", json.dumps(s3))
    reset_all()

    # The API streams artifacts that are not on local disk; the file name travels RFC 6266-encoded.
    from urllib.parse import quote

    from fastapi.testclient import TestClient

    from api.app import app
    from core.db import session_scope
    from core.tokens import create_token

    with session_scope() as s:
        _, token = create_token(s, "alice", admin=True)
    client = TestClient(app, headers={"Authorization": f"Bearer {token}"})
    it = next(i for i in out["items"] if "été" in i["source"])
    r = client.get(f"/jobs/{out['id']}/items/{it['id']}/artifacts/mask_png")
    assert r.status_code == 200, r.text
    name = it["artifacts"]["mask_png"].rsplit("/", 1)[1]
    assert name == "chat_noir_été_mask.png"
    assert r.headers["content-disposition"] == f"attachment; filename*=utf-8''{quote(name)}"
    assert r.content == fs.cat_file(it["artifacts"]["mask_png"])
