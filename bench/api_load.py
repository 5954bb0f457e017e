"""Load benchmark: many concurrent clients polling job status and listing jobs against a real `tileseg api` on
PostgreSQL while a real worker processes a job (so the database sees writes), loopback only, bounded in time.

Each client has its own API token (owners are spread over 20 users) and repeatedly asks for one of its jobs
(``GET /jobs/{id}``) and every fifth time lists its jobs (``GET /jobs?limit=20``). ``--interval`` is each
client's pause between requests (1 s = a client polling once a second; 0 = back to back, a stress test).
Reports requests, throughput, p50/p90/p99/max latency and errors (non-200 answers and exceptions).

    .venv/bin/python bench/api_load.py [--clients 200] [--seconds 30] [--interval 1.0] [--api-workers 2]
        [--no-worker] [--json]

Needs PostgreSQL (TILESEG_TEST_PG, default postgresql+psycopg://postgres@127.0.0.1:5432/test: a fresh
database is created next to it and dropped afterwards) and Redis (TILESEG_TEST_REDIS, db 15 is used and
flushed). The API runs as ``tileseg api --workers N``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PG_ADMIN_URL = os.environ.get("TILESEG_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TILESEG_TEST_REDIS", "redis://127.0.0.1:6379") + "/15"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(sorted_ms: list[float], p: float) -> float:
    if not sorted_ms:
        return float("nan")
    k = min(len(sorted_ms) - 1, max(0, round(p / 100 * (len(sorted_ms) - 1))))
    return sorted_ms[k]


def _seed(n_owners: int, jobs_per_owner: int, items_per_job: int) -> dict[str, list[str]]:
    """Tokens and finished-looking jobs with items, straight into the database. Returns token -> job IDs."""
    from core import jobs
    from core.db import session_scope
    from core.models import ItemStatus
    from core.tokens import create_token

    out: dict[str, list[str]] = {}
    for o in range(n_owners):
        with session_scope() as s:
            _, token = create_token(s, f"user{o:02d}")
        ids = []
        for _ in range(jobs_per_owner):
            with session_scope() as s:
                job = jobs.create_job(s, [jobs.InputSpec(f"/data/user{o}/batch")], "auto", owner=f"user{o:02d}")
                planned = [jobs.PlannedItem(source=f"/data/user{o}/img{i}.png", key="", group=None,
                                            format="photo", truth=None, meta={"height": 512, "width": 512})
                           for i in range(items_per_job)]
                rows = jobs.record_plan(s, job.id, planned)
                for r in rows[: items_per_job // 2]:
                    jobs.finish_item(s, r.id, job.id, ItemStatus.succeeded, artifacts={})
                ids.append(str(job.id))
        out[token] = ids
    return out


def _writer_job(tmp: Path, n_files: int) -> Path:
    """GeoTIFFs and a tiny real model for the worker to chew on during the run."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    from tests.conftest import write_spec

    inp = tmp / "inputs"
    inp.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n_files):
        with rasterio.open(inp / f"s{i:03d}.tif", "w", driver="GTiff", width=256, height=256, count=3,
                           dtype="uint8", crs="EPSG:32618", transform=from_origin(0, 0, 1, 1)) as ds:
            ds.write(rng.integers(0, 255, (3, 256, 256), dtype=np.uint8))
    write_spec(tmp / "models" / "bench-geo", "bench-geo", default_for=["geotiff"], input_size=64)
    return inp


async def _client(base: str, token: str, job_ids: list[str], until: float, warm_until: float, interval: float,
                  lat: dict[str, list[float]], errors: Counter, session) -> None:  # noqa: ANN001
    headers = {"Authorization": f"Bearer {token}"}
    rnd = random.Random(token)
    await asyncio.sleep(rnd.random() * max(interval, 0.2))  # spread the first wave
    n = 0
    while time.monotonic() < until:
        n += 1
        kind = "list" if n % 5 == 0 else "status"
        url = f"{base}/jobs?limit=20" if kind == "list" else f"{base}/jobs/{rnd.choice(job_ids)}"
        started, t0 = time.monotonic(), time.perf_counter()
        try:
            async with session.get(url, headers=headers) as r:
                await r.read()
                ok = r.status == 200
                if not ok:
                    errors[f"HTTP {r.status}"] += 1
        except Exception as exc:  # noqa: BLE001 - counted, the run goes on
            ok = False
            errors[type(exc).__name__] += 1
        ms = (time.perf_counter() - t0) * 1000
        if ok and started >= warm_until:
            lat[kind].append(ms)
        if interval:
            await asyncio.sleep(interval * (0.5 + rnd.random()))


async def _drive(base: str, tokens: dict[str, list[str]], clients: int, seconds: float, interval: float,
                 warmup: float) -> tuple[dict[str, list[float]], Counter, float]:
    # aiohttp rather than httpx: the load generator shares the CPU with the server it measures, and aiohttp's
    # client costs several times less CPU per request at hundreds of concurrent connections.
    import aiohttp

    lat: dict[str, list[float]] = {"status": [], "list": []}
    errors: Counter = Counter()
    items = list(tokens.items())
    connector = aiohttp.TCPConnector(limit=clients, limit_per_host=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
        start = time.monotonic()
        warm_until, until = start + warmup, start + warmup + seconds
        await asyncio.gather(*[
            _client(base, *items[c % len(items)], until, warm_until, interval, lat, errors, session)
            for c in range(clients)])
    return lat, errors, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--warmup", type=float, default=3)
    ap.add_argument("--interval", type=float, default=1.0, help="pause between one client's requests, s")
    ap.add_argument("--api-workers", type=int, default=2)
    ap.add_argument("--no-worker", action="store_true", help="no background worker writing results")
    ap.add_argument("--owners", type=int, default=20)
    ap.add_argument("--jobs-per-owner", type=int, default=25)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import sqlalchemy as sa

    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    dbname = f"tileseg_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{dbname}"'))
    db_url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{dbname}"
    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="tileseg-load-"))
    try:
        import redis

        redis.Redis.from_url(REDIS_URL).flushdb()
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("TILESEG_")},
               "TILESEG_DATABASE_URL": db_url, "TILESEG_BROKER_URL": REDIS_URL,
               "TILESEG_ARTIFACT_URL": str(tmp / "store"), "TILESEG_INPUT_ROOTS": str(tmp),
               "TILESEG_MODEL_DIRS": str(tmp / "models"), "TILESEG_DATA_DIR": str(tmp / "data"),
               "TF_CPP_MIN_LOG_LEVEL": "3", "TILESEG_LOG_LEVEL": "WARNING"}
        os.environ.update(env)
        from core.db import upgrade
        from core.settings import reset_settings

        reset_settings()
        upgrade(url=db_url)
        tokens = _seed(args.owners, args.jobs_per_owner, 20)
        port = _free_port()
        logf = open(tmp / "api.log", "wb")  # noqa: SIM115 - closed with the process
        cmd = [sys.executable, "-m", "core.cli", "api", "--port", str(port), "--workers", str(args.api_workers)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        writer_job = None
        if not args.no_worker:
            inp = _writer_job(tmp, 400)
            wlog = open(tmp / "worker.log", "wb")  # noqa: SIM115
            procs.append(subprocess.Popen([sys.executable, "-m", "core.cli", "worker", "--concurrency", "1",
                                           "--loglevel", "WARNING"], env=env, cwd=ROOT, stdout=wlog,
                                          stderr=subprocess.STDOUT, start_new_session=True))
            from core.jobs import InputSpec
            from worker.submit import submit_job

            writer_job = submit_job([InputSpec(str(inp))], owner="writer")
        import httpx

        base = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > 60:
                raise SystemExit("API did not start:\n" + (tmp / "api.log").read_text()[-2000:])
            time.sleep(0.3)
        if writer_job is not None:  # wait for the worker to be writing before measuring
            from core.db import session_scope
            from core.models import Job

            while True:
                with session_scope() as s:
                    if s.get(Job, writer_job).items_done > 0:
                        break
                if time.monotonic() - t0 > 180:
                    raise SystemExit("worker never finished an item:\n" + (tmp / "worker.log").read_text()[-2000:])
                time.sleep(0.5)
            with session_scope() as s:
                done_before = s.get(Job, writer_job).items_done

        lat, errors, secs = asyncio.run(_drive(base, tokens, args.clients, args.seconds, args.interval, args.warmup))

        written = None
        if writer_job is not None:
            with session_scope() as s:
                written = s.get(Job, writer_job).items_done - done_before
        all_ms = sorted(lat["status"] + lat["list"])
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpus": os.cpu_count(), "clients": args.clients,
            "seconds": secs, "interval_s": args.interval, "api_workers": args.api_workers,
            "requests": len(all_ms) + sum(errors.values()), "ok": len(all_ms), "errors": dict(errors),
            "throughput_rps": round(len(all_ms) / secs, 1),
            "items_written_during_run": written,
        }
        for name, ms in (("all", all_ms), ("status", sorted(lat["status"])), ("list", sorted(lat["list"]))):
            result[name] = {"p50_ms": round(_percentile(ms, 50), 1), "p90_ms": round(_percentile(ms, 90), 1),
                            "p99_ms": round(_percentile(ms, 99), 1), "max_ms": round(ms[-1], 1) if ms else None,
                            "mean_ms": round(statistics.fmean(ms), 1) if ms else None, "n": len(ms)}
        print(json.dumps(result, indent=1 if not args.json else None))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        from core.db import reset_engine

        reset_engine()
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
