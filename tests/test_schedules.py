"""Schedules: due-run computation (DST), change detection, DICOM settling, runs exactly once — fast,
in-process on the embedded stack (SQLite database and queue, no worker: submitted jobs wait in the queue)."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core import schedules as sch
from core.schedules import Fingerprint, KnownFile

Z = UTC


def _utc(*a: int) -> datetime:
    return datetime(*a, tzinfo=Z)


def _slots(cron: str, tz: str, start: datetime, n: int) -> list[datetime]:
    out, t = [], start
    for _ in range(n):
        t = sch.next_slot(cron, tz, t)
        out.append(t)
    return out


# Due-run computation --------------------------------------------------------------------------------------
def test_daily_slots_follow_wall_clock_across_dst() -> None:
    # 09:00 in Berlin is 08:00 UTC in winter and 07:00 UTC in summer.
    assert sch.next_slot("0 9 * * *", "Europe/Berlin", _utc(2026, 1, 10)) == _utc(2026, 1, 10, 8)
    assert sch.next_slot("0 9 * * *", "Europe/Berlin", _utc(2026, 7, 10)) == _utc(2026, 7, 10, 7)
    # Spring forward (29 March 2026, 02:00 -> 03:00): 02:30 does not exist; that day it runs once, at
    # 03:30 CEST.
    got = _slots("30 2 * * *", "Europe/Berlin", _utc(2026, 3, 27, 12), 3)
    assert got == [_utc(2026, 3, 28, 1, 30), _utc(2026, 3, 29, 1, 30), _utc(2026, 3, 30, 0, 30)]
    # Fall back (1 Nov 2026 in New York, 01:00-02:00 happens twice): 01:30 runs once, at its first occurrence.
    got = _slots("30 1 * * *", "America/New_York", _utc(2026, 10, 31, 12), 2)
    assert got == [_utc(2026, 11, 1, 5, 30), _utc(2026, 11, 2, 6, 30)]


def test_hourly_slots_never_repeat_an_instant_across_dst() -> None:
    for tz, start in (("Europe/Berlin", _utc(2026, 3, 28, 20)), ("America/New_York", _utc(2026, 10, 31, 20))):
        got = _slots("30 * * * *", tz, start, 12)
        assert got == sorted(set(got)), got  # strictly increasing, no instant twice
        assert all(b - a <= timedelta(hours=2) for a, b in zip(got, got[1:], strict=False))


def test_latest_slot_and_due_catch_up_once() -> None:
    created = _utc(2026, 5, 1, 12)
    # Beat was down for three days: one run, for the latest missed slot, not three.
    now = _utc(2026, 5, 4, 13, 15)
    slot = sch.due_slot("0 2 * * *", "UTC", created, now)
    assert slot == _utc(2026, 5, 4, 2)
    assert sch.due_slot("0 2 * * *", "UTC", slot, now) is None
    assert sch.due_slot("0 2 * * *", "UTC", slot, _utc(2026, 5, 5, 2)) == _utc(2026, 5, 5, 2)
    # A slot exactly at `now` is due; before the first slot after creation nothing is.
    assert sch.latest_slot("*/10 * * * * *", "UTC", _utc(2026, 5, 1, 12, 0, 20)) == _utc(
        2026, 5, 1, 12, 0, 20
    )
    assert sch.due_slot("0 2 * * *", "UTC", created, _utc(2026, 5, 2, 1, 59)) is None


@pytest.mark.parametrize(
    ("cron", "fragment"),
    [
        ("", "empty"),
        ("* * *", "3 fields"),
        ("61 * * * *", "not a valid"),
        ("* * * * * * *", "7 fields"),
        ("every day", "2 fields"),
    ],
)
def test_bad_cron_is_explained(cron: str, fragment: str) -> None:
    with pytest.raises(sch.ScheduleError, match=fragment):
        sch.normalize_cron(cron)


def test_cron_and_timezone_validation_accepts_good_input() -> None:
    assert sch.normalize_cron(" 0  2 * * * ") == "0 2 * * *"
    assert sch.normalize_cron("@daily") == "@daily"
    assert sch.validate_timezone("Europe/Berlin") == "Europe/Berlin"
    for bad in ("Mars/Olympus", "", "../etc/passwd", "CEST+2"):
        with pytest.raises(sch.ScheduleError, match="IANA"):
            sch.validate_timezone(bad)


def test_location_must_be_under_the_input_roots(tmp_path: Path) -> None:
    (tmp_path / "drop").mkdir()
    assert sch.validate_location(str(tmp_path / "drop"), [tmp_path]) == str((tmp_path / "drop").resolve())
    assert sch.validate_location(str(tmp_path / "drop" / "*.jpg"), [tmp_path]).endswith("/drop/*.jpg")
    for bad in ("/etc", str(tmp_path / "drop" / ".." / ".." / "x"), "s3://bucket/x"):
        with pytest.raises(sch.ScheduleError, match="location"):
            sch.validate_location(bad, [tmp_path])
    with pytest.raises(sch.ScheduleError, match="TILESEG_INPUT_ROOTS"):
        sch.validate_location(str(tmp_path), [])


# Change detection -----------------------------------------------------------------------------------------
def test_is_new_or_changed_rules() -> None:
    fp = Fingerprint(path="/a.jpg", kind="file", size=10, mtime=100.0, sha256="h1")
    assert sch.is_new_or_changed(fp, None)
    assert not sch.is_new_or_changed(fp, KnownFile(10, 100.0, "h1"))
    assert sch.is_new_or_changed(fp, KnownFile(11, 100.0, "h1"))  # size
    assert not sch.is_new_or_changed(fp, KnownFile(10, 50.0, "h1"))  # touched, same content
    assert sch.is_new_or_changed(fp, KnownFile(10, 100.0, "h2"))  # same size and mtime, new content
    assert sch.is_new_or_changed(fp, KnownFile(10, 100.0, "h1", retry=True))
    big = Fingerprint(path="/big.tif", kind="file", size=10, mtime=100.0, sha256=None)  # over the hash limit
    assert not sch.is_new_or_changed(big, KnownFile(10, 100.0, None))
    assert sch.is_new_or_changed(big, KnownFile(10, 99.0, None))


def _dicom_bytes() -> bytes:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm")).read_bytes()


def _age(path: Path, seconds: float) -> None:
    t = datetime.now(UTC).timestamp() - seconds
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (t, t))


def test_scan_splits_files_and_series_and_waits_for_dicom_to_settle(tmp_path: Path, photo_dir: Path) -> None:
    drop = photo_dir
    series = drop / "ct-0001"
    series.mkdir()
    for n in range(3):
        (series / f"slice{n}.dcm").write_bytes(_dicom_bytes())
    (series / "notes").mkdir()
    (series / "notes" / "extra.dcm").write_bytes(_dicom_bytes())
    (drop / "loose.dcm").write_bytes(_dicom_bytes())
    (drop / ".hidden.jpg").write_bytes(b"x")
    _age(drop, 3600)
    (series / "slice3.dcm").write_bytes(_dicom_bytes())  # a slice just arrived: the series is still settling

    scan = sch.scan_location(str(drop), settle_seconds=60)
    photos = sorted(str(p) for p in drop.glob("[!.]*.jpg"))
    assert sorted(fp.path for fp in scan.ready) == sorted([*photos, str(drop / "loose.dcm")])
    assert scan.settling == [str(series)]
    assert all(fp.kind == "file" and fp.sha256 for fp in scan.ready)

    _age(series, 120)
    scan = sch.scan_location(str(drop), settle_seconds=60)
    [ser] = [fp for fp in scan.ready if fp.kind == "series"]
    assert ser.path == str(series) and ser.files == 5 and not scan.settling  # the whole sub-tree is one input
    # Unchanged series: same manifest digest; one more slice: different.
    again = [fp for fp in sch.scan_location(str(drop), settle_seconds=60).ready if fp.kind == "series"][0]
    assert again.sha256 == ser.sha256
    (series / "slice4.dcm").write_bytes(_dicom_bytes())
    _age(series, 120)
    changed = [fp for fp in sch.scan_location(str(drop), settle_seconds=60).ready if fp.kind == "series"][0]
    assert changed.sha256 != ser.sha256 and changed.files == 6

    # A glob: matched files, and a matched folder holding DICOM is a series.
    scan = sch.scan_location(str(drop / "ct-*"), settle_seconds=0)
    assert [(fp.path, fp.kind) for fp in scan.ready] == [(str(series), "series")]


def test_scan_hashes_only_what_may_have_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.jpg").write_bytes(b"aaaa")
    st = (tmp_path / "a.jpg").stat()
    calls: list[str] = []
    real = sch._sha256
    monkeypatch.setattr(sch, "_sha256", lambda p: calls.append(p) or real(p))
    known = {str(tmp_path / "a.jpg"): KnownFile(4, st.st_mtime, "old")}
    [fp] = sch.scan_location(str(tmp_path), settle_seconds=0, known=known).ready
    assert calls == [] and fp.sha256 is None  # unchanged size and mtime: one stat, no read
    os.utime(tmp_path / "a.jpg", (st.st_mtime + 5, st.st_mtime + 5))
    [fp] = sch.scan_location(str(tmp_path), settle_seconds=0, known=known).ready
    assert calls == [str(tmp_path / "a.jpg")] and fp.sha256 is not None
    [fp] = sch.scan_location(str(tmp_path), settle_seconds=0, hash_limit=3).ready
    assert fp.sha256 is None  # over the limit: size and mtime only


def test_scan_skips_symlinks_out_of_the_roots(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "drop").mkdir(parents=True)
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"secret")
    (root / "drop" / "link.jpg").symlink_to(outside)
    (root / "drop" / "ok.jpg").write_bytes(b"ok")
    scan = sch.scan_location(str(root / "drop"), settle_seconds=0, roots=[root])
    assert [Path(fp.path).name for fp in scan.ready] == ["ok.jpg"]
    assert "link.jpg" in scan.skipped[0] and "outside the input roots" in scan.skipped[0]
    with pytest.raises(sch.ScheduleError, match="no such file or folder"):
        sch.scan_location(str(root / "gone"), settle_seconds=0)


# Runs against the database --------------------------------------------------------------------------------
@pytest.fixture
def db(ts_env: dict[str, str]) -> None:
    from core.db import upgrade

    upgrade()


def _make(
    tmp_path: Path, location: Path, cron: str = "0 2 * * *", created: datetime | None = None, **kw: object
) -> uuid.UUID:
    from core.db import session_scope
    from core.models import Schedule

    with session_scope() as s:
        row = sch.create_schedule(
            s,
            name=kw.pop("name", "nightly"),
            cron=cron,
            location=str(location),
            owner="alice",
            roots=[tmp_path],
            **kw,
        )
        if created is not None:
            s.get(Schedule, row.id).created_at = created
        return row.id


def _runs(sid: uuid.UUID) -> list[tuple[str, int, list[str]]]:
    """(outcome, new files, job input basenames) per run, oldest first."""
    from core.db import session_scope
    from core.models import Job

    with session_scope() as s:
        rows, _ = sch.list_runs(s, sid, limit=1000)
        out = []
        for r, _status in reversed(rows):
            job = s.get(Job, r.job_id) if r.job_id else None
            out.append(
                (r.outcome, r.new_files, sorted(Path(i["path"]).name for i in job.inputs) if job else [])
            )
        return out


def test_runs_take_each_file_once_and_nothing_new_submits_nothing(
    db: None, tmp_path: Path, photo_dir: Path
) -> None:
    from core.db import session_scope
    from core.models import Job

    t0 = _utc(2026, 6, 1, 12)
    sid = _make(tmp_path, photo_dir, created=t0, settle_seconds=0)
    assert sch.run_due(t0 + timedelta(hours=1)) == []  # first slot is tomorrow 02:00
    day1 = _utc(2026, 6, 2, 2, 0, 30)
    assert len(sch.run_due(day1)) == 1
    assert sch.run_due(day1) == []  # the same slot again: nothing
    names = sorted(p.name for p in photo_dir.glob("*.jpg"))
    assert _runs(sid) == [("submitted", 3, names)]
    with session_scope() as s:
        [job] = s.query(Job).all()
        assert (job.owner, job.status, job.pipeline) == ("alice", "queued", "auto")

    sch.run_due(_utc(2026, 6, 3, 2, 0, 30))  # nothing dropped since
    (photo_dir / "new.jpg").write_bytes(next(photo_dir.glob("*.jpg")).read_bytes())
    first = sorted(photo_dir.glob("*.jpg"))[0]
    os.utime(first, (first.stat().st_atime, first.stat().st_mtime + 10))  # touched, same content: not new
    sch.run_due(_utc(2026, 6, 4, 2, 0, 30))
    assert _runs(sid)[1:] == [("nothing_new", 0, []), ("submitted", 1, ["new.jpg"])]
    with session_scope() as s:
        assert s.query(Job).count() == 2


def test_missed_slots_are_caught_up_once(db: None, tmp_path: Path, photo_dir: Path) -> None:
    from core.db import session_scope
    from core.models import Schedule, ScheduleRun

    sid = _make(tmp_path, photo_dir, cron="0 * * * *", created=_utc(2026, 6, 1, 0, 30), settle_seconds=0)
    now = _utc(2026, 6, 3, 9, 10)  # 57 hourly slots missed
    assert len(sch.run_due(now)) == 1
    assert sch.run_due(now + timedelta(minutes=20)) == []
    with session_scope() as s:
        [run] = s.query(ScheduleRun).all()
        assert sch._aware(run.scheduled_for) == _utc(2026, 6, 3, 9)
        assert sch._aware(s.get(Schedule, sid).last_run_for) == _utc(2026, 6, 3, 9)


def test_two_ticks_for_the_same_slot_carry_it_out_once(db: None, tmp_path: Path, photo_dir: Path) -> None:
    import threading

    sid = _make(tmp_path, photo_dir, cron="0 * * * *", created=_utc(2026, 6, 1), settle_seconds=0)
    now = _utc(2026, 6, 1, 5, 0, 5)
    results: list[list[uuid.UUID]] = []
    threads = [threading.Thread(target=lambda: results.append(sch.run_due(now))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(len(r) for r in results) == [0, 0, 1]
    assert [o for o, *_ in _runs(sid)] == ["submitted"]


def test_trigger_and_concurrent_trigger_do_not_double_files(
    db: None, tmp_path: Path, photo_dir: Path
) -> None:
    sid = _make(tmp_path, photo_dir, settle_seconds=0)
    a = sch.trigger(sid)
    b = sch.trigger(sid)
    assert (a.outcome, a.new_files, b.outcome, b.new_files) == ("submitted", 3, "nothing_new", 0)


def test_dicom_series_is_taken_once_settled(db: None, tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    series = drop / "ct-1"
    series.mkdir(parents=True)
    for n in range(2):
        (series / f"s{n}.dcm").write_bytes(_dicom_bytes())
    sid = _make(tmp_path, drop, settle_seconds=300)
    run = sch.trigger(sid)
    assert run.outcome == "nothing_new" and "1 DICOM input(s) still settling: ct-1" in run.message
    _age(series, 600)
    assert sch.trigger(sid).new_files == 1
    assert sch.trigger(sid).outcome == "nothing_new"
    assert _runs(sid)[1][2] == ["ct-1"]


def test_job_that_failed_unread_is_retried_but_read_failures_are_not(
    db: None, tmp_path: Path, photo_dir: Path
) -> None:
    from core.db import session_scope
    from core.models import Item, Job, JobStatus

    sid = _make(tmp_path, photo_dir, settle_seconds=0)
    first = sch.trigger(sid)
    with session_scope() as s:  # the job died before planning (e.g. its queue message was lost)
        s.get(Job, first.job_id).status = JobStatus.failed
    again = sch.trigger(sid)
    assert (again.outcome, again.new_files) == ("submitted", 3) and "3 retried" in again.message
    with session_scope() as s:  # this one was read: every item failed on its content
        job = s.get(Job, again.job_id)
        job.status = JobStatus.failed
        for n, p in enumerate(sorted(photo_dir.glob("*.jpg"))):
            s.add(Item(job_id=job.id, seq=n, source=str(p), key="", status="failed", error="corrupt"))
    assert sch.trigger(sid).outcome == "nothing_new"


def test_queue_down_fails_the_run_and_keeps_files_for_later(
    db: None, tmp_path: Path, photo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.tasks import plan_job

    sid = _make(tmp_path, photo_dir, settle_seconds=0)

    def boom(*_a: object, **_k: object) -> None:
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr(plan_job, "delay", boom)
    run = sch.trigger(sid)
    assert run.outcome == "failed" and "queue unavailable" in run.message
    monkeypatch.undo()
    assert sch.trigger(sid).new_files == 3


def test_pause_skips_and_resume_does_not_replay(db: None, tmp_path: Path, photo_dir: Path) -> None:
    from core.db import session_scope
    from core.models import Schedule

    sid = _make(tmp_path, photo_dir, cron="0 * * * *", created=_utc(2026, 6, 1), settle_seconds=0)
    with session_scope() as s:
        sch.set_enabled(s, s.get(Schedule, sid), False)
    assert sch.run_due(_utc(2026, 6, 1, 3, 1)) == []
    with session_scope() as s:
        row = sch.set_enabled(s, s.get(Schedule, sid), True, now=_utc(2026, 6, 1, 5, 30))
        assert sch.next_run_at(row, _utc(2026, 6, 1, 5, 30)) == _utc(2026, 6, 1, 6)
    assert sch.run_due(_utc(2026, 6, 1, 5, 31)) == []
    assert len(sch.run_due(_utc(2026, 6, 1, 6, 0, 1))) == 1


def test_create_rejects_duplicates_and_unknown_pipelines(db: None, tmp_path: Path, photo_dir: Path) -> None:
    _make(tmp_path, photo_dir)
    with pytest.raises(sch.ScheduleError, match="already exists"):
        _make(tmp_path, photo_dir)
    with pytest.raises(sch.ScheduleError, match="unknown pipeline"):
        _make(tmp_path, photo_dir, name="other", pipeline="no-such-model")
