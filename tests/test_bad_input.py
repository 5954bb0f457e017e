"""Hostile and broken input: decompression bombs and huge declared sizes are refused before any pixel buffer
is allocated, truncated and corrupted files of every format fail with AdapterError, and a job mixing many bad
files with a few good ones ends `partial` with each bad file's error stored on its item.
"""

from __future__ import annotations

import os
import struct
import time
import uuid
import zlib
from pathlib import Path

import pytest

from adapters import AdapterError, open_input
from adapters.base import InputTooLarge
from tests.conftest import start_process, stop_process
from tests.fixtures.bad_input.corpus import exercise, make_seeds, make_series

FORMATS = ["jpeg", "png", "webp", "bmp", "tiff", "geotiff", "dicom", "dicom_multiframe"]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_seeds(tmp_path_factory.mktemp("seeds"))


# Bombs and huge declared sizes ----------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(path: Path, width: int, height: int, real_rows: int | None = None) -> Path:
    """A grayscale PNG declaring ``width x height``; its IDAT holds ``real_rows`` rows of zeros (all rows when
    None: a genuine zlib bomb, ~1000:1), streamed so the test itself never holds the raw image."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    idat = b"".join(comp.compress(row) for _ in range(height if real_rows is None else real_rows)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))
    return path


def jpeg_huge(path: Path, seed_jpeg: Path, width: int, height: int) -> Path:
    """A real JPEG whose SOF header is rewritten to declare ``width x height``."""
    data = bytearray(seed_jpeg.read_bytes())
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5:i + 9] = struct.pack(">HH", height, width)
            break
        i += 2 + length
    path.write_bytes(bytes(data))
    return path


def _refused_fast(path: Path, max_pixels: int) -> InputTooLarge:
    t0 = time.perf_counter()
    with pytest.raises(InputTooLarge) as err:
        exercise(path, max_pixels=max_pixels)
    # Allocating the declared buffer (gigabytes) could not be this fast on this machine.
    assert time.perf_counter() - t0 < 3
    assert path.name in str(err.value)
    return err.value


def test_png_zlib_bomb_refused(tmp_path: Path) -> None:
    bomb = png_bomb(tmp_path / "bomb.png", 12_000, 12_000)  # 144 Mpx of zeros in ~140 kB
    assert bomb.stat().st_size < 300_000
    _refused_fast(bomb, max_pixels=50_000_000)


@pytest.mark.parametrize("size", [(100_000, 100_000), (65_535, 65_535), (2**31 - 1, 1)])
def test_png_huge_declared_size_refused_at_default_limit(tmp_path: Path, size: tuple[int, int]) -> None:
    from adapters.base import DEFAULT_MAX_PIXELS

    p = png_bomb(tmp_path / "huge.png", *size, real_rows=1)
    if size[0] * size[1] > DEFAULT_MAX_PIXELS:
        _refused_fast(p, max_pixels=DEFAULT_MAX_PIXELS)
    else:  # a 2-gigapixel-wide single row: under the pixel limit, refused by the small test limit instead
        _refused_fast(p, max_pixels=10_000_000)


def test_jpeg_huge_declared_size_refused(tmp_path: Path, seeds: dict[str, Path]) -> None:
    from adapters.base import DEFAULT_MAX_PIXELS

    p = jpeg_huge(tmp_path / "huge.jpg", seeds["jpeg"], 65_500, 65_500)
    _refused_fast(p, max_pixels=DEFAULT_MAX_PIXELS)


def test_geotiff_huge_sparse_raster_refused(tmp_path: Path) -> None:
    import rasterio

    p = tmp_path / "huge.tif"
    # A sparse tiled GeoTIFF: 100k x 100k declared, only tile index tables on disk (no tile written).
    with rasterio.open(p, "w", driver="GTiff", width=100_000, height=100_000, count=3, dtype="uint8",
                       tiled=True, blockxsize=1024, blockysize=1024, sparse_ok=True, crs="EPSG:3857",
                       transform=rasterio.transform.from_origin(0, 0, 1, 1)):
        pass
    assert p.stat().st_size < 5_000_000
    err = _refused_fast(p, max_pixels=40_000 * 40_000)
    assert "100000x100000" in str(err)


def test_dicom_huge_declared_frames_refused(tmp_path: Path, seeds: dict[str, Path]) -> None:
    import pydicom

    ds = pydicom.dcmread(seeds["dicom"])
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65_535, 65_535, 1000
    p = tmp_path / "huge.dcm"
    ds.save_as(p)
    _refused_fast(p, max_pixels=40_000 * 40_000)


def test_settings_limit_reaches_the_adapters(tmp_path: Path, ts_env: dict[str, str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """TILESEG_MAX_PIXELS is what planning passes to the adapters: a job with a too-large input fails the item."""
    from core import jobs
    from core.settings import get_settings, reset_settings

    monkeypatch.setenv("TILESEG_MAX_PIXELS", "1000000")
    reset_settings()
    p = png_bomb(tmp_path / "two-mpx.png", 2000, 1000)
    (planned,) = jobs.expand_inputs([{"path": str(p)}], get_settings().max_pixels, {})
    assert planned.error and "exceeds the limit of 1,000,000" in planned.error and "two-mpx.png" in planned.error


# Truncated and corrupted files of every format ------------------------------------------------------------
def _corruptions(data: bytes) -> dict[str, bytes]:
    n = len(data)
    out = {f"truncated-{k}": data[:k] for k in (1, 8, 16, 64, 200) if k < n}
    out.update({f"truncated-{p}pct": data[: n * p // 100] for p in (10, 25, 50, 75, 90, 99)})
    out["header-zeroed"] = data[:4] + b"\x00" * min(256, n - 4) + data[4 + 256:]
    out["header-ff"] = data[:4] + b"\xff" * min(256, n - 4) + data[4 + 256:]
    out["body-zeroed"] = data[: n // 4] + b"\x00" * (n - n // 4)
    out["body-garbage"] = data[: n // 4] + os.urandom(n - n // 4)
    out["tail-garbage"] = data + os.urandom(512)
    out["text-with-magic"] = data[:16] + b"this is not an image\n" * 20
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_and_corrupted_files_fail_cleanly(tmp_path: Path, seeds: dict[str, Path], fmt: str) -> None:
    data = seeds[fmt].read_bytes()
    refused, read = [], []
    for name, blob in _corruptions(data).items():
        p = tmp_path / f"{fmt}-{name}{seeds[fmt].suffix}"
        p.write_bytes(blob)
        try:
            exercise(p)
            read.append(name)  # e.g. trailing garbage after a complete image is harmless
        except AdapterError as exc:
            assert p.name in str(exc), exc  # the message names the file
            refused.append(name)
    # The short truncations cannot be images; whatever else is refused is refused with AdapterError.
    assert {"truncated-1", "truncated-8", "truncated-10pct"} <= set(refused), (refused, read)
    assert "body-zeroed" in read or "body-zeroed" in refused


@pytest.mark.parametrize("damage", ["truncate-one", "garbage-one", "all-truncated"])
def test_dicom_series_with_damaged_slices(tmp_path: Path, damage: str) -> None:
    series = make_series(tmp_path / "series", n=3)
    slices = sorted(series.glob("*.dcm"))
    targets = slices if damage == "all-truncated" else slices[1:2]
    for s in targets:
        data = s.read_bytes()
        s.write_bytes(data[: len(data) // 2] if damage != "garbage-one" else data[:132] + os.urandom(len(data) - 132))
    if damage == "all-truncated":
        with pytest.raises(AdapterError):
            exercise(series)
        return
    # One bad slice must not sink the series' good slices: they still open and read.
    try:
        n = exercise(series)
    except AdapterError as exc:
        assert "slice_01" in str(exc), exc
    else:
        assert n == 2


def test_open_input_never_trusts_the_extension(tmp_path: Path, seeds: dict[str, Path]) -> None:
    """A DICOM named .png and a PNG named .dcm are read by content; a text file named .tif is refused."""
    (tmp_path / "scan.png").write_bytes(seeds["dicom"].read_bytes())
    (tmp_path / "photo.dcm").write_bytes(seeds["png"].read_bytes())
    (tmp_path / "photo.tif").write_bytes(seeds["png"].read_bytes())
    (tmp_path / "notes.tif").write_text("II*\x00 not really a tiff")
    assert open_input(str(tmp_path / "scan.png"))[0].name == "dicom"
    assert open_input(str(tmp_path / "photo.tif"))[0].name == "photo"
    # The DICOM adapter claims preamble-less *.dcm files by name, so a PNG named .dcm is refused rather than
    # read as a photo: a clean refusal that names the file (see docs/reliability.md).
    try:
        assert open_input(str(tmp_path / "photo.dcm"))[0].name == "photo"
    except AdapterError as exc:
        assert "photo.dcm" in str(exc)
    with pytest.raises(AdapterError, match="notes.tif"):
        exercise(tmp_path / "notes.tif")


# A mixed job through the real worker ----------------------------------------------------------------------
def run_job_with_worker(inputs: list[Path], tmp_path: Path, timeout: float = 240) -> uuid.UUID:
    """Submit one job in the embedded stack (SQLite + SQLite queue) and run a real `tileseg worker` on it."""
    from core.db import session_scope, upgrade
    from core.jobs import InputSpec
    from core.models import Job
    from worker.submit import submit_job

    upgrade()
    job_id = submit_job([InputSpec(str(p)) for p in inputs])
    log = tmp_path / "worker.log"
    w = start_process(["worker", "--pool", "solo", "--loglevel", "INFO"], {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                      log)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            with session_scope() as s:
                job = s.get(Job, job_id)
                if job.finished_at is not None:
                    return job_id
            assert w.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        raise AssertionError(f"job still {job.status} after {timeout} s\n{log.read_text()[-3000:]}")
    finally:
        stop_process(w)


@pytest.mark.slow
def test_mixed_job_ends_partial_with_every_bad_file_recorded(tiny_models: Path, tmp_path: Path,
                                                            seeds: dict[str, Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from core import jobs
    from core.db import session_scope

    inp = tmp_path / "in"
    inp.mkdir()
    good = []
    for fmt in ("jpeg", "png", "geotiff", "dicom"):
        p = inp / f"good-{fmt}{seeds[fmt].suffix}"
        p.write_bytes(seeds[fmt].read_bytes())
        good.append(p.name)
    bad = {}
    for fmt in FORMATS:
        data = seeds[fmt].read_bytes()
        for kind, blob in (("cut", data[: len(data) // 3]), ("head", data[:8]), ("text", b"hello" * 50)):
            p = inp / f"bad-{kind}-{fmt}{seeds[fmt].suffix}"
            p.write_bytes(blob)
            bad[p.name] = kind
    (inp / "empty.png").write_bytes(b"")
    bad["empty.png"] = "empty"
    png_bomb(inp / "bomb.png", 12_000, 12_000)
    bad["bomb.png"] = "bomb"
    monkeypatch.setenv("TILESEG_MAX_PIXELS", "50000000")
    from tests.conftest import reset_all

    reset_all()
    # One input per file: a folder holding .dcm files would be read as one DICOM series.
    job_id = run_job_with_worker(sorted(inp.iterdir()), tmp_path)
    with session_scope() as s:
        job = jobs.get_job(s, job_id)
        items, _ = jobs.list_items(s, job_id, limit=1000)
    by_name: dict[str, list] = {}
    for it in items:
        by_name.setdefault(Path(it.source).name, []).append(it)
    assert job.status == "partial", job.error
    assert job.items_done == job.items_total == len(items)
    for name in good:
        assert [i.status for i in by_name[name]] == ["succeeded"], (name, [i.error for i in by_name[name]])
        assert all(i.artifacts for i in by_name[name])
    # Truncating a file to a third can leave a readable header with damaged pixels (a photo decoder may
    # even recover part of it), but every file either succeeds or fails with its name in the message.
    hard = {n for n, k in bad.items() if k != "cut"}
    for name in bad:
        its = by_name[name]
        for it in its:
            if it.status == "failed":
                assert it.error and name in it.error, (name, it.error)
        if name in hard:
            assert [i.status for i in its] == ["failed"], (name, [(i.status, i.error) for i in its])
    failed = sum(i.status == "failed" for i in items)
    assert job.items_failed == failed >= len(hard)
    assert "exceeds the limit" in by_name["bomb.png"][0].error
