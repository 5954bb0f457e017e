"""Scheduled processing for real: PostgreSQL + Redis on this machine, a `tileseg worker` and a `tileseg beat`
subprocess ticking every second, schedules firing every 3 s (six-field cron, seconds first)."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import reset_all, start_process, stop_process

pytestmark = [pytest.mark.services, pytest.mark.slow]


def _runs(sid: uuid.UUID) -> list[dict]:
    from core import schedules
    from core.db import session_scope

    with session_scope() as s:
        rows, _ = schedules.list_runs(s, sid, limit=1000)
        return [
            {
                "outcome": r.outcome,
                "job_id": r.job_id,
                "job_status": st,
                "new": r.new_files,
                "for": r.scheduled_for,
                "at": r.started_at,
                "message": r.message,
            }
            for r, st in reversed(rows)
        ]


def _wait(what: str, cond: Callable[[], object], logs: list[Path], timeout: float = 90) -> object:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = cond()
        if got:
            return got
        time.sleep(0.3)
    tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


def _drop(src: Path, dst_dir: Path, name: str) -> None:
    """Copy the way a drop folder should be fed: a hidden temporary name, then an atomic rename."""
    tmp = dst_dir / f".{name}.part"
    shutil.copyfile(src, tmp)
    tmp.rename(dst_dir / name)


def test_beat_processes_dropped_files_exactly_once(
    tiny_models: Path,
    photo_dir: Path,
    pg_url: str,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pydicom.data import get_testdata_file

    from core import schedules
    from core.db import session_scope, upgrade
    from core.models import Item, Job, Schedule

    monkeypatch.setenv("TILESEG_DATABASE_URL", pg_url)
    monkeypatch.setenv("TILESEG_BROKER_URL", redis_url)
    monkeypatch.setenv("TILESEG_ARTIFACT_URL", str(tmp_path / "store"))
    monkeypatch.setenv("TILESEG_SCHEDULE_TICK_SECONDS", "1")
    reset_all()
    upgrade(url=pg_url)
    env = dict(os.environ)

    photos = sorted(photo_dir.glob("*.jpg"))
    drop, late, ct = tmp_path / "drop", tmp_path / "late", tmp_path / "ct"
    for d in (drop, late, ct / "series-1"):
        d.mkdir(parents=True)
    _drop(photos[0], drop, "p0.jpg")
    _drop(photos[1], late, "l0.jpg")
    ct_written = time.time()
    for n in range(2):
        shutil.copyfile(get_testdata_file("CT_small.dcm"), ct / "series-1" / f"slice{n}.dcm")

    every3 = "*/3 * * * * *"
    with session_scope() as s:
        kw = {"owner": "alice", "roots": [tmp_path], "settle_seconds": 0, "pipeline": "auto"}
        a = schedules.create_schedule(s, name="drop", cron=every3, location=str(drop), **kw).id
        # Yearly, created two years ago: beat was "down" for two slots; it must catch up once, not twice.
        b_row = schedules.create_schedule(s, name="late", cron="0 0 1 1 *", location=str(late), **kw)
        b_row.created_at = datetime(datetime.now(UTC).year - 2, 6, 1, tzinfo=UTC)
        b = b_row.id
        c = schedules.create_schedule(
            s, name="ct", cron=every3, location=str(ct), **{**kw, "settle_seconds": 5}
        ).id

    logs = [tmp_path / "worker.log", tmp_path / "beat.log"]
    procs = [
        start_process(["worker", "--concurrency", "1", "--loglevel", "INFO"], env, logs[0]),
        start_process(["beat", "--loglevel", "INFO"], env, logs[1]),
    ]
    try:

        def finished(sid: uuid.UUID, n: int) -> list[dict] | None:
            runs = [r for r in _runs(sid) if r["outcome"] == "submitted"]
            done = [r for r in runs if r["job_status"] in ("succeeded", "partial", "failed")]
            return runs if len(done) >= n else None

        def idle_after(sid: uuid.UUID, n_submitted: int) -> bool:
            """A nothing_new run after the n-th submitted one."""
            runs = _runs(sid)
            subs = [i for i, r in enumerate(runs) if r["outcome"] == "submitted"]
            return len(subs) >= n_submitted and any(
                r["outcome"] == "nothing_new" for r in runs[subs[-1] + 1 :]
            )

        _wait("the first scheduled job", lambda: finished(a, 1), logs)
        _wait("a run with nothing new", lambda: idle_after(a, 1), logs)
        _drop(photos[2], drop, "p1.jpg")
        _drop(photos[0], drop, "p2.jpg")  # same content as p0, another name: a new input
        _wait("the second scheduled job", lambda: finished(a, 2), logs)
        _wait("another run with nothing new", lambda: idle_after(a, 2), logs)
        _wait("the settled DICOM series", lambda: finished(c, 1), logs)
    finally:
        for p in procs:
            stop_process(p)

    # Each dropped photo went into exactly one job, and every item of it succeeded.
    runs = _runs(a)
    submitted = [r for r in runs if r["outcome"] == "submitted"]
    assert [r["new"] for r in submitted] == [1, 2], runs
    assert all(r["job_id"] is None and r["new"] == 0 for r in runs if r["outcome"] == "nothing_new")
    assert {r["outcome"] for r in runs} <= {"submitted", "nothing_new"}, runs
    with session_scope() as s:
        jobs = s.query(Job).filter(Job.id.in_([r["job_id"] for r in submitted])).all()
        assert len(jobs) == 2 and all(j.owner == "alice" and j.status == "succeeded" for j in jobs)
        items = s.query(Item).filter(Item.job_id.in_([j.id for j in jobs])).all()
        assert Counter(Path(i.source).name for i in items) == {"p0.jpg": 1, "p1.jpg": 1, "p2.jpg": 1}
        assert all(i.status == "succeeded" and i.artifacts for i in items)
        # Nothing else was submitted: only the schedules' jobs exist.
        all_jobs = s.query(Job).count()
        assert s.get(Schedule, a).last_success_at is not None

    # The missed yearly slots: one catch-up run, for the latest slot.
    [late_run] = _runs(b)
    assert late_run["for"].astimezone(UTC) == datetime(datetime.now(UTC).year, 1, 1, tzinfo=UTC)
    assert late_run["outcome"] == "submitted" and late_run["new"] == 1

    # The series waited until it had been quiet for 5 s, then went as ONE input.
    ct_runs = _runs(c)
    [ct_sub] = [r for r in ct_runs if r["outcome"] == "submitted"]
    assert ct_sub["new"] == 1 and ct_sub["at"].timestamp() >= ct_written + 5 - 0.2
    early = [r for r in ct_runs if r["for"] < ct_sub["for"]]
    assert all(r["outcome"] == "nothing_new" and "settling" in r["message"] for r in early)
    with session_scope() as s:
        ct_items = s.query(Item).filter(Item.job_id == ct_sub["job_id"]).all()
        assert ct_items and {i.source for i in ct_items} == {str(ct / "series-1")}
        assert all(i.format == "dicom" for i in ct_items)
        assert all_jobs == 4  # drop x2, late, ct
