"""Faults injected into a real distributed stack: `tileseg worker` processes on PostgreSQL and Redis, killed,
cut off and restarted mid-job. Each test checks the job completes and every item is stored exactly once.

See docs/reliability.md for what each test shows and how to reproduce it by hand.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, free_port, reset_all, start_process, stop_process

pytestmark = [pytest.mark.services, pytest.mark.slow]

INJECT = REPO / "tests" / "fixtures" / "faults" / "inject_worker.py"


# Helpers --------------------------------------------------------------------------------------------------
def make_geotiffs(folder: Path, n: int, size: int = 384, prefix: str = "scene") -> list[Path]:
    """``n`` tiled 3-band uint8 GeoTIFFs with a CRS, big enough that a tiny model takes ~1 s on each."""
    import rasterio
    from rasterio.transform import from_origin

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = folder / f"{prefix}-{i:02d}.tif"
        data = rng.integers(0, 255, (3, size, size), dtype=np.uint8)
        with rasterio.open(p, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                           crs="EPSG:32618", transform=from_origin(100000 + i * 1000, 2800000, 10, 10),
                           tiled=True, blockxsize=128, blockysize=128) as ds:
            ds.write(data)
        out.append(p)
    return out


def wait_for(cond: Callable[[], object], timeout: float, what: str, logs: list[Path] = ()) -> object:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(0.3)
    tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def job_row(job_id: uuid.UUID):  # noqa: ANN201
    from core.db import session_scope
    from core.models import Job

    with session_scope() as s:
        return s.get(Job, job_id)


def items_of(job_id: uuid.UUID) -> list:
    from core import jobs
    from core.db import session_scope

    with session_scope() as s:
        return jobs.list_items(s, job_id, limit=10_000)[0]


def count_status(job_id: uuid.UUID) -> Counter:
    return Counter(i.status for i in items_of(job_id))


def finished(job_id: uuid.UUID) -> bool:
    j = job_row(job_id)
    return j.status in ("succeeded", "failed", "partial", "cancelled") and j.finished_at is not None and \
        j.items_done >= j.items_total


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def assert_exactly_once(job_id: uuid.UUID, store: Path, expect_status: str = "succeeded") -> None:
    """Counters match, one set of metric rows per succeeded item, every artifact present with its checksum,
    no temporary file recorded as a result."""
    from sqlalchemy import func, select

    from core.db import session_scope
    from core.models import ClassMetric, InstanceRow

    job = job_row(job_id)
    assert job.status == expect_status, (job.status, job.error)
    assert job.items_done == job.items_total > 0
    items = items_of(job_id)
    assert job.items_failed == sum(i.status == "failed" for i in items)
    with session_scope() as s:
        per_key = s.execute(select(ClassMetric.item_id, ClassMetric.class_id, func.count())
                            .where(ClassMetric.job_id == job_id, ClassMetric.item_id.is_not(None))
                            .group_by(ClassMetric.item_id, ClassMetric.class_id)).all()
        assert per_key and all(n == 1 for _, _, n in per_key), per_key
        n_inst = s.scalar(select(func.count()).select_from(InstanceRow).where(InstanceRow.job_id == job_id))
        assert n_inst == 0  # semantic models only here
        job_level = s.scalar(select(func.count()).select_from(ClassMetric)
                             .where(ClassMetric.job_id == job_id, ClassMetric.item_id.is_(None)))
        assert job_level == len({c for _, c, _ in per_key})
    with_metrics = {i for i, _, _ in per_key}
    for it in items:
        if it.status != "succeeded":
            assert it.id not in with_metrics
            continue
        assert it.id in with_metrics
        assert it.artifacts, it.source
        for art in it.artifacts.values():
            path = Path(art["uri"])
            assert ".part-" not in path.name
            assert path.is_file(), art["uri"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == art["sha256"], art["uri"]
            assert path.stat().st_size == art["bytes"]


class Stack:
    """A distributed tileseg on the local PostgreSQL and a Redis: env for subprocesses, workers, cleanup."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp, self.env = tmp, env
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    @property
    def store(self) -> Path:
        return Path(self.env["TILESEG_ARTIFACT_URL"])

    def worker(self, name: str, *extra: str, inject: bool = False, env: dict[str, str] | None = None
               ) -> subprocess.Popen:
        log = self.tmp / f"{name}-{len(self.logs)}.log"
        args = ["worker", "--concurrency", "1", "-n", f"{name}@%h", "--loglevel", "INFO", *extra]
        e = {**self.env, **(env or {})}
        if inject:
            fh = open(log, "wb")  # noqa: SIM115 - kept open for the process lifetime
            p = subprocess.Popen([sys.executable, str(INJECT), *args], env=e, stdout=fh, stderr=subprocess.STDOUT,
                                 cwd=REPO, start_new_session=True)
        else:
            p = start_process(args, e, log)
        self.procs.append(p)
        self.logs.append(log)
        return p

    def submit(self, *paths: Path | str) -> uuid.UUID:
        from core.jobs import InputSpec
        from worker.submit import submit_job

        return submit_job([InputSpec(str(p)) for p in paths])

    def wait_done(self, job_id: uuid.UUID, timeout: float = 240) -> None:
        wait_for(lambda: finished(job_id), timeout, f"job {job_id} to finish", self.logs)

    def close(self) -> None:
        for p in self.procs:
            stop_process(p)


@pytest.fixture
def make_stack(tiny_models: Path, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
               ) -> Iterator[Callable[..., Stack]]:
    """Factory: ``make_stack(broker_url, **extra_env)``; the test process shares the stack's settings."""
    made: list[Stack] = []

    def make(broker_url: str, **extra: str) -> Stack:
        env_vars = {"TILESEG_DATABASE_URL": pg_url, "TILESEG_BROKER_URL": broker_url,
                    "TILESEG_ARTIFACT_URL": str(tmp_path / "store"), "TILESEG_VISIBILITY_TIMEOUT": "10",
                    "TILESEG_TASK_MAX_RETRIES": "3", **extra}
        for k, v in env_vars.items():
            monkeypatch.setenv(k, v)
        reset_all()  # worker.app.configure() drops connections pooled for an earlier test's broker
        from core.db import upgrade

        upgrade(url=pg_url)
        st = Stack(tmp_path, {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        made.append(st)
        return st

    yield make
    for st in made:
        st.close()
    from core.db import reset_engine

    reset_engine()  # before pg_url's teardown drops the database


class PrivateRedis:
    """A redis-server of this test's own on a free port, so killing it disturbs nobody."""

    def __init__(self, tmp: Path, persistent: bool) -> None:
        self.port = free_port()
        self.dir = tmp / f"redis-{self.port}"
        self.dir.mkdir()
        self.args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                     "--save", "", "--daemonize", "no"]
        self.args += ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        client = redis.Redis.from_url(self.url)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_for(up, 20, "private redis to start")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def private_redis(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[PrivateRedis]:
    r = PrivateRedis(tmp_path, persistent=getattr(request, "param", False))
    r.start()
    yield r
    r.kill()


# Tests ----------------------------------------------------------------------------------------------------
def test_sigkill_child_then_whole_worker(make_stack: Callable[..., Stack], redis_url: str, tmp_path: Path) -> None:
    """SIGKILL the prefork child mid-item, later the whole worker; a new worker finishes the job exactly once."""
    st = make_stack(redis_url)
    make_geotiffs(tmp_path / "in", 6)
    w = st.worker("victim")
    job_id = st.submit(tmp_path / "in")

    def running_after(n_ok: int) -> bool:
        c = count_status(job_id)
        return c["succeeded"] >= n_ok and c["running"] >= 1

    wait_for(lambda: running_after(1), 180, "an item running after the first success", st.logs)
    kids = children(w.pid)
    assert len(kids) == 1, kids
    os.kill(kids[0], signal.SIGKILL)  # the prefork child doing the work
    # Its item keeps status "running" until the redelivered task starts it again.
    first = {i.id for i in items_of(job_id) if i.status == "running"}
    assert len(first) == 1, first
    # The main process notices the lost child, requeues the task (reject_on_worker_lost) and forks anew.
    wait_for(lambda: children(w.pid) and children(w.pid) != kids, 60, "a replacement child", st.logs)
    ok_before = count_status(job_id)["succeeded"]

    def others_running() -> set:
        return {i.id for i in items_of(job_id) if i.status == "running" and i.id not in first}

    wait_for(lambda: count_status(job_id)["succeeded"] >= ok_before + 1 and others_running(), 180,
             "another item running", st.logs)
    second = others_running()
    os.killpg(w.pid, signal.SIGKILL)  # the whole worker: its unacked task waits out the visibility timeout
    w.wait(10)
    # An item that finished between that look and the kill was not interrupted; with the worker dead,
    # statuses no longer change, so "still running" now means "killed mid-item".
    second = {i.id for i in items_of(job_id) if i.id in second and i.status == "running"}
    assert not finished(job_id)
    st.worker("rescuer")
    st.wait_done(job_id)
    assert_exactly_once(job_id, st.store)
    items = items_of(job_id)
    # Exactly the killed items ran twice (normally one per kill); the rest once.
    assert {i.id for i in items if i.attempts == 2} == first | second, [(i.id, i.attempts) for i in items]
    assert max(i.attempts for i in items) == 2


@pytest.mark.parametrize("private_redis", [False, True], ids=["no-persistence", "aof-always"], indirect=True)
def test_redis_restart_mid_job(make_stack: Callable[..., Stack], private_redis: PrivateRedis,
                               tmp_path: Path) -> None:
    """Kill the broker mid-job and start it again on the same port. Without persistence the queued messages are
    gone: the workers' recovery sweep re-enqueues the stalled job. With AOF (appendfsync always) they survive."""
    st = make_stack(private_redis.url)
    make_geotiffs(tmp_path / "in", 6)
    st.worker("w")
    job_id = st.submit(tmp_path / "in")
    wait_for(lambda: count_status(job_id)["succeeded"] >= 1, 180, "a first finished item", st.logs)
    private_redis.kill()
    time.sleep(3)
    private_redis.start()
    st.wait_done(job_id, timeout=240)
    assert_exactly_once(job_id, st.store)
    log = "".join(p.read_text(errors="replace") for p in st.logs)
    if not private_redis.args.count("always"):
        assert "re-enqueueing" in log  # the recovery sweep, not luck, finished the job


def test_postgres_connections_dropped_mid_job(make_stack: Callable[..., Stack], redis_url: str, pg_url: str,
                                              tmp_path: Path) -> None:
    """pg_terminate_backend on every connection to the job's database, three times while items run."""
    import sqlalchemy as sa

    from tests.conftest import PG_ADMIN_URL

    st = make_stack(redis_url)
    make_geotiffs(tmp_path / "in", 6)
    st.worker("w")
    job_id = st.submit(tmp_path / "in")
    dbname = pg_url.rsplit("/", 1)[1]
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    killed = 0
    try:
        for n in range(3):
            wait_for(lambda n=n: count_status(job_id)["succeeded"] >= n and count_status(job_id)["running"], 180,
                     "an item running", st.logs)
            time.sleep(0.4)
            with admin.connect() as c:
                killed += len(c.execute(sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :d AND pid <> pg_backend_pid()"), {"d": dbname}).all())
    finally:
        admin.dispose()
    assert killed >= 3
    st.wait_done(job_id)
    assert_exactly_once(job_id, st.store)


def test_permanent_and_transient_errors_end_the_job(make_stack: Callable[..., Stack], redis_url: str,
                                                    tmp_path: Path) -> None:
    """A truncated raster fails in the task (permanent: stored message, no retry); an input whose reads keep
    raising ConnectionError is retried TILESEG_TASK_MAX_RETRIES times with backoff, then failed; the job ends
    partial with exact counts instead of staying running."""
    st = make_stack(redis_url, TILESEG_TASK_MAX_RETRIES="2")
    inp = tmp_path / "in"
    make_geotiffs(inp, 2)
    make_geotiffs(inp, 1, prefix="transient")
    (bad,) = make_geotiffs(tmp_path / "tmp", 1, prefix="cut")
    data = bad.read_bytes()
    (inp / "cut-00.tif").write_bytes(data[: len(data) // 2])  # header intact, pixel tiles missing
    st.worker("w", inject=True)
    job_id = st.submit(inp)
    st.wait_done(job_id, timeout=240)
    job = job_row(job_id)
    assert (job.status, job.items_total, job.items_done, job.items_failed) == ("partial", 4, 4, 2)
    by_name = {Path(i.source).name: i for i in items_of(job_id)}
    cut, flaky = by_name["cut-00.tif"], by_name["transient-00.tif"]
    assert cut.status == "failed" and "cut-00.tif" in cut.error and cut.attempts == 1, (cut.error, cut.attempts)
    assert flaky.status == "failed" and "gave up after 3 retries" in flaky.error
    assert flaky.attempts == 3  # the first try and two retries, then no more
    assert_exactly_once(job_id, st.store, expect_status="partial")


def test_an_item_that_kills_its_worker_is_failed_and_spares_its_batch(
        make_stack: Callable[..., Stack], redis_url: str, photo_dir: Path, tmp_path: Path) -> None:
    """A photo whose processing kills the worker process (as the OOM killer would) shares a batch task with
    three good photos. The batch's redelivery splits it into single items; the good photos succeed, the bad
    one is failed after TILESEG_ITEM_MAX_RESTARTS (2) restarts instead of crash-looping the workers.
    Without the cap the job never finished."""
    st = make_stack(redis_url)
    inp = tmp_path / "in"
    inp.mkdir()
    photos = sorted(photo_dir.glob("*.jpg"))[:3]
    for p in photos:
        shutil.copy(p, inp / p.name)
    shutil.copy(photos[0], inp / "crash-photo.jpg")
    st.worker("w", inject=True)
    job_id = st.submit(inp)
    st.wait_done(job_id, timeout=300)
    job = job_row(job_id)
    assert (job.status, job.items_total, job.items_done, job.items_failed) == ("partial", 4, 4, 1), job.error
    by_name = {Path(i.source).name: i for i in items_of(job_id)}
    crash = by_name.pop("crash-photo.jpg")
    assert crash.status == "failed" and "died 3 times" in crash.error and crash.restarts == 3, crash.error
    assert all(i.status == "succeeded" for i in by_name.values()), {n: i.error for n, i in by_name.items()}
    # The three good photos were in the killed batch: one restart each, then each ran alone.
    assert [i.restarts for i in by_name.values()] == [1, 1, 1]
    assert_exactly_once(job_id, st.store, expect_status="partial")


def test_a_hung_item_is_stopped_by_the_time_limit(make_stack: Callable[..., Stack], redis_url: str,
                                                   tmp_path: Path) -> None:
    """An input whose read never returns holds its worker until TILESEG_TASK_TIME_LIMIT; then the item is
    failed with a message naming the limit, not redelivered, and the worker goes on with the others."""
    st = make_stack(redis_url, TILESEG_TASK_TIME_LIMIT="20")
    inp = tmp_path / "in"
    make_geotiffs(inp, 2)
    make_geotiffs(inp, 1, prefix="hang")
    st.worker("w", inject=True)
    t0 = time.monotonic()
    job_id = st.submit(inp)
    st.wait_done(job_id, timeout=240)
    job = job_row(job_id)
    assert (job.status, job.items_total, job.items_done, job.items_failed) == ("partial", 3, 3, 1), job.error
    by_name = {Path(i.source).name: i for i in items_of(job_id)}
    hung = by_name.pop("hang-00.tif")
    assert hung.status == "failed" and "longer than TILESEG_TASK_TIME_LIMIT (20 s)" in hung.error, hung.error
    assert hung.attempts == 1 and hung.restarts == 0
    assert all(i.status == "succeeded" for i in by_name.values())
    assert time.monotonic() - t0 < 200  # stopped at the limit, not after the hour the read would take
    assert_exactly_once(job_id, st.store, expect_status="partial")


def test_cancel_with_a_real_worker(make_stack: Callable[..., Stack], redis_url: str, tmp_path: Path) -> None:
    """Cancel after the first result: remaining items are never started, finished results stay."""
    from core import jobs
    from core.db import session_scope

    st = make_stack(redis_url)
    make_geotiffs(tmp_path / "in", 8)
    st.worker("w")
    job_id = st.submit(tmp_path / "in")
    wait_for(lambda: count_status(job_id)["succeeded"] >= 1, 180, "a first result", st.logs)
    with session_scope() as s:
        jobs.cancel_job(s, job_id)
    started_at_cancel = {i.id for i in items_of(job_id) if i.status in ("running", "succeeded")}
    # The worker drains the queue: the running item may finish, every other message is skipped.
    wait_for(lambda: not any(i.status in ("running", "pending") for i in items_of(job_id)), 120,
             "the running item to end", st.logs)
    time.sleep(3)
    items = items_of(job_id)
    job = job_row(job_id)
    assert job.status == "cancelled" and job.items_done == job.items_total == 8
    done = [i for i in items if i.status == "succeeded"]
    cancelled = [i for i in items if i.status == "cancelled"]
    assert done and cancelled and len(done) + len(cancelled) == 8
    assert {i.id for i in done} <= started_at_cancel
    for i in cancelled:
        assert i.started_at is None and not i.artifacts  # never scheduled after the cancel
    for i in done:
        for art in i.artifacts.values():
            assert hashlib.sha256(Path(art["uri"]).read_bytes()).hexdigest() == art["sha256"]


@pytest.mark.parametrize("limit", ["tasks", "memory"])
def test_children_recycled_and_models_load_after_fork(make_stack: Callable[..., Stack], redis_url: str,
                                                      tmp_path: Path, limit: str) -> None:
    """With one task per child (or a memory cap every model-loading child exceeds) each item runs in a fresh child;
    TensorFlow is only ever loaded in children, never in the worker's main process."""
    extra = ({"TILESEG_WORKER_MAX_TASKS_PER_CHILD": "1"} if limit == "tasks" else
             # Above a fresh child (~200 MB, enough for planning) and below one that loaded TensorFlow and a
             # model (~700 MB): every item's child is replaced after its task. (A cap below a fresh child's
             # size stalled Celery's prefork pool in a trial run: keep the cap above the baseline.)
             {"TILESEG_WORKER_MAX_TASKS_PER_CHILD": "1000", "TILESEG_WORKER_MAX_MEMORY_PER_CHILD_KB": "400000"})
    st = make_stack(redis_url, **extra)
    make_geotiffs(tmp_path / "in", 3, size=128)
    w = st.worker("w")
    job_id = st.submit(tmp_path / "in")
    st.wait_done(job_id, timeout=240)
    assert_exactly_once(job_id, st.store)
    pids = [int(i.meta["processed_by"].rsplit(":", 1)[1]) for i in items_of(job_id)]
    assert len(set(pids)) == 3 and w.pid not in pids, pids
    maps = Path(f"/proc/{w.pid}/maps").read_text()
    assert "tensorflow" not in maps  # the parent never imported TF, so no model state crossed a fork
