"""Shared fixtures: an isolated tileseg environment per test, tiny real Keras models, real services."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PG_ADMIN_URL = os.environ.get("TILESEG_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TILESEG_TEST_REDIS", "redis://127.0.0.1:6379")


def shared(*parts: str) -> Path:
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not available: {p}")
    return p


def reset_all() -> None:
    """Make every cached settings/engine/app pick up the current environment."""
    from core.db import reset_engine
    from core.settings import reset_settings

    reset_settings()
    reset_engine()
    from pipelines import registry

    registry.clear_cache()
    from worker.app import configure

    configure()


@pytest.fixture
def ts_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """An isolated embedded-mode environment (own data dir, SQLite, SQLite queue)."""
    for k in list(os.environ):
        if k.startswith("TILESEG_"):
            monkeypatch.delenv(k)
    data = tmp_path / "data"
    monkeypatch.setenv("TILESEG_DATA_DIR", str(data))
    monkeypatch.setenv("TILESEG_INPUT_ROOTS", str(tmp_path))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    reset_all()
    yield {"TILESEG_DATA_DIR": str(data)}
    reset_all()


def build_tiny_semantic_model(path: Path, num_classes: int = 3, channels: int = 3, seed: int = 0) -> Path:
    """A real (random-weight, deterministic) fully convolutional Keras model saved as .keras.

    It is translation equivariant (no pooling), so any input size works; its output depends on the input.
    """
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((None, None, channels))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    x = keras.layers.Conv2D(num_classes, 1)(x)
    out = keras.layers.Softmax()(x)
    model = keras.Model(inp, out)
    model.save(path)
    return path


def write_spec(folder: Path, name: str, *, default_for: list[str], mode: str = "tile", input_size: int = 64,
               overlap: int = 8, normalization: dict | None = None, channels: int = 3, classes: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    build_tiny_semantic_model(folder / "model.keras", num_classes=classes, channels=channels)
    names = ["background", "thing", "other", "extra"][:classes]
    spec = {
        "name": name, "kind": "semantic", "source": "model.keras", "source_format": "keras",
        "classes": [{"id": i, "name": n, "color": [40 * i, 200 - 40 * i, 90]} for i, n in enumerate(names)],
        "background_class": 0, "channels": channels, "input_size": input_size, "overlap": overlap,
        "mode": mode, "batch_size": 4, "default_for": default_for,
        "normalization": normalization or {"kind": "scale", "scale": 255.0},
    }
    (folder / "spec.json").write_text(json.dumps(spec))
    return folder


@pytest.fixture
def tiny_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ts_env: dict[str, str]) -> Path:
    """A model dir with small real models registered as defaults for photos, GeoTIFFs and DICOM."""
    models = tmp_path / "models"
    write_spec(models / "tiny-photo", "tiny-photo", default_for=["photo"], mode="resize", input_size=32)
    write_spec(models / "tiny-geo", "tiny-geo", default_for=["geotiff"], mode="tile", input_size=64,
               normalization={"kind": "percentile", "low": 2, "high": 98})
    write_spec(models / "tiny-ct", "tiny-ct", default_for=["dicom"], mode="tile", input_size=64, channels=1,
               normalization={"kind": "window", "center": 40, "width": 400})
    monkeypatch.setenv("TILESEG_MODEL_DIRS", str(models))
    reset_all()
    return models


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60) -> None:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise TimeoutError(url)


def start_process(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    fh = open(log, "wb")  # noqa: SIM115 - kept open for the process lifetime
    return subprocess.Popen([sys.executable, "-m", "core.cli", *args], env=env, stdout=fh, stderr=subprocess.STDOUT,
                            cwd=REPO, start_new_session=True)


def stop_process(p: subprocess.Popen, timeout: float = 20) -> None:
    import signal

    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database on the local server, dropped afterwards."""
    import sqlalchemy as sa

    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"tileseg_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis logical database of its own, emptied before and after."""
    import redis

    db = 1 + (os.getpid() % 14)
    url = f"{REDIS_URL}/{db}"
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis is not reachable at {url}: {exc}")
    yield url
    client.flushdb()


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    """Three real pet photos from the repository samples."""
    src = REPO / "samples" / "photos"
    files = sorted(src.glob("*.jpg"))[:3]
    if not files:
        pytest.skip("no sample photos")
    d = tmp_path / "photos"
    d.mkdir()
    for f in files:
        (d / f.name).write_bytes(f.read_bytes())
    return d
