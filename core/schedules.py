"""Scheduled processing: recurring jobs over a watched location, each input processed once.

A schedule fires at the slots of its crontab expression, evaluated in its IANA time zone; slots are stored in
UTC. A run is keyed by ``(schedule_id, scheduled_for)`` (a unique index), so two ticks or two beat
processes can never both carry out the same slot, and a schedule whose slots were missed (beat or workers
down) is caught up with ONE run for the latest missed slot.

Each run walks the location, keeps the inputs that are new or changed since they were last taken (per input:
path, size, mtime and a SHA-256 where cheap) and submits them as one ordinary job. DICOM waits until it has
settled: a series folder is taken only once no file in it changed for ``settle_seconds``.

Inputs ("units") of a location:
- every non-DICOM file is its own input;
- a sub-folder that directly holds DICOM files is one series input covering its whole sub-tree (that is what
  the job does with a folder); for a glob, a matched folder holding DICOM files is a series too;
- DICOM files lying directly in the location folder are single-file inputs (keep series in sub-folders).

Retry policy: a file whose job failed before reading it (the job ended ``failed`` with no item for that input,
e.g. the queue was unreachable) is offered again next run. A file that was read and failed stays done until it
changes (so a corrupt file is not retried every night); files of queued or running jobs are never resubmitted.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, available_timezones

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core import jobs
from core.db import session_scope
from core.models import Item, Job, JobStatus, Schedule, ScheduleFile, ScheduleRun, utcnow

__all__ = [
    "HASH_LIMIT",
    "Fingerprint",
    "KnownFile",
    "RunOutcome",
    "Scan",
    "ScheduleError",
    "create_schedule",
    "delete_schedule",
    "due_slot",
    "execute_run",
    "get_schedule",
    "is_new_or_changed",
    "latest_slot",
    "list_runs",
    "list_schedules",
    "next_slot",
    "normalize_cron",
    "resolve_schedule",
    "run_due",
    "scan_location",
    "set_enabled",
    "trigger",
    "update_schedule",
    "validate_location",
    "validate_timezone",
]

log = logging.getLogger(__name__)

#: Files up to this size get a SHA-256 (a touched-but-identical file is then not reprocessed); larger files
#: are compared by size and mtime only.
HASH_LIMIT = 64 * 1024 * 1024
#: A run still "running" or "enqueuing" after this long was abandoned by a process that died.
STUCK_AFTER = timedelta(minutes=10)
#: Suffixes that are certainly not DICOM (spares opening every photo to sniff it).
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp", ".gif"}


class ScheduleError(ValueError):
    """A schedule definition or location that cannot be used; the message says what and why."""


class RunOutcome:
    running = "running"  # claimed, scanning
    enqueuing = "enqueuing"  # job stored, planning task being sent
    submitted = "submitted"
    nothing_new = "nothing_new"
    failed = "failed"


# Validation -----------------------------------------------------------------------------------------------
def normalize_cron(expr: str) -> str:
    """Check a crontab expression: five fields (minute hour day month weekday), six fields with seconds
    FIRST (``*/10 * * * * *``: every 10 s), or an alias (``@daily``). Returns it with spaces normalised."""
    from croniter import croniter

    text = " ".join((expr or "").split())
    if not text:
        raise ScheduleError("cron: empty expression")
    n = len(text.split())
    if not text.startswith("@") and n not in (5, 6):
        raise ScheduleError(
            f"cron: {expr!r} has {n} fields; use five (minute hour day month weekday) "
            "or six with seconds first"
        )
    if not croniter.is_valid(text, second_at_beginning=n == 6):
        raise ScheduleError(f"cron: {expr!r} is not a valid crontab expression")
    return text


@cache
def _zones() -> frozenset[str]:
    return frozenset(available_timezones())


def validate_timezone(name: str) -> str:
    """An IANA time zone name (``Europe/Berlin``, ``UTC``); raises :class:`ScheduleError` otherwise."""
    if name not in _zones():
        raise ScheduleError(f"timezone: {name!r} is not an IANA time zone name (e.g. 'UTC', 'Europe/Berlin')")
    return name


def validate_location(location: str, roots: Sequence[Path], *, require_roots: bool = True) -> str:
    """A folder, file or glob under the input roots; returns it resolved (symlinks and ``..`` removed).

    ``require_roots=False`` (the local CLI) accepts any path when no input roots are configured.
    Object-store URLs are not supported by schedules (change detection reads the local file system).
    """
    if not location or not location.strip():
        raise ScheduleError("location: empty")
    if "://" in location:
        raise ScheduleError(
            f"location: {location}: object-store URLs cannot be watched yet; use a folder under "
            "the input roots"
        )
    if not roots and not require_roots:
        return str(Path(location).expanduser().resolve())
    try:
        return jobs.check_input_path(location, roots)
    except jobs.PathNotAllowed as exc:
        raise ScheduleError(f"location: {exc}") from exc


def _validate_pipeline(name: str) -> None:
    from worker.submit import UnknownPipeline, validate_pipeline

    try:
        validate_pipeline(name)
    except UnknownPipeline as exc:
        raise ScheduleError(f"pipeline: {exc}") from exc


# Due-run computation (pure) -------------------------------------------------------------------------------
def _aware(dt: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _to_utc(local_naive: datetime, zone: ZoneInfo) -> datetime:
    # fold=0: a wall time that occurs twice (DST ends) means its first occurrence, a wall time that does not
    # exist (DST starts) is read with the offset before the change, i.e. it runs that much after the gap.
    return local_naive.replace(tzinfo=zone, fold=0).astimezone(UTC)


def _iter(cron: str, local_naive: datetime) -> Any:
    from croniter import croniter

    six = not cron.startswith("@") and len(cron.split()) == 6
    return croniter(cron, local_naive, ret_type=datetime, second_at_beginning=six)


def latest_slot(cron: str, tz: str, now: datetime) -> datetime:
    """The most recent firing time at or before ``now``, as an aware UTC datetime."""
    zone = ZoneInfo(tz)
    now = _aware(now)
    local = now.astimezone(zone).replace(tzinfo=None)
    it = _iter(cron, local + timedelta(seconds=1))  # croniter's get_prev excludes its start
    for _ in range(1000):
        slot = _to_utc(it.get_prev(datetime), zone)
        if slot <= now:
            return slot
    raise ScheduleError(f"cron: {cron!r} has no firing time before {now:%Y-%m-%d %H:%M}")


def next_slot(cron: str, tz: str, after: datetime) -> datetime:
    """The first firing time strictly after ``after``, as an aware UTC datetime."""
    zone = ZoneInfo(tz)
    after = _aware(after)
    it = _iter(cron, after.astimezone(zone).replace(tzinfo=None))
    for _ in range(1000):
        slot = _to_utc(it.get_next(datetime), zone)
        if slot > after:
            return slot
    raise ScheduleError(f"cron: {cron!r} has no firing time after {after:%Y-%m-%d %H:%M}")


def due_slot(cron: str, tz: str, since: datetime, now: datetime) -> datetime | None:
    """The slot to run now, or None: the latest slot in ``(since, now]``.

    ``since`` is the last slot carried out (or the schedule's creation). Earlier missed slots are not
    returned: however many were missed, they are caught up by this one run.
    """
    slot = latest_slot(cron, tz, now)
    return slot if slot > _aware(since) else None


# Change detection (pure apart from reading the file system) ------------------------------------------------
@dataclass(frozen=True)
class KnownFile:
    """What a schedule recorded of an input when a job took it. ``retry``: offer it again (see module doc)."""

    size: int
    mtime: float
    sha256: str | None
    retry: bool = False


@dataclass(frozen=True)
class Fingerprint:
    """An input of a location as seen now. For a series folder: size is the total bytes, mtime the newest
    file's, sha256 a digest of its manifest (relative path, size, mtime of every file)."""

    path: str
    kind: str  # "file" | "series"
    size: int
    mtime: float
    sha256: str | None
    files: int = 1


@dataclass
class Scan:
    ready: list[Fingerprint] = field(default_factory=list)
    #: DICOM inputs that changed less than ``settle_seconds`` ago (taken by a later run).
    settling: list[str] = field(default_factory=list)
    #: Paths skipped, with the reason (unreadable, symlink out of the input roots).
    skipped: list[str] = field(default_factory=list)


def is_new_or_changed(fp: Fingerprint, known: KnownFile | None) -> bool:
    """True when ``fp`` was never taken, changed since, or must be retried.

    Size decides first; then the content hash when both sides have one (a touched but identical file is not
    a change); otherwise the modification time.
    """
    if known is None or known.retry:
        return True
    if fp.size != known.size:
        return True
    if fp.sha256 is not None and known.sha256 is not None:
        return fp.sha256 != known.sha256
    return fp.mtime != known.mtime


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _looks_dicom(path: str) -> bool:
    if Path(path).suffix.lower() in _IMAGE_SUFFIXES:
        return False
    from adapters.dicom import looks_dicom

    return looks_dicom(Path(path))


def _listing(root: str) -> list[tuple[str, list[str]]]:
    """(folder, files directly in it) for ``root`` and every sub-folder, sorted; hidden names skipped.
    Symlinked folders are not followed (a link could loop or leave the input roots)."""
    from adapters import folder_inputs

    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = folder_inputs(filenames)
        out.append((dirpath, [os.path.join(dirpath, n) for n in names]))
    return out


def _inside(path: str, roots: Sequence[Path]) -> bool:
    if not roots:
        return True
    try:
        jobs.check_input_path(path, roots)
        return True
    except jobs.PathNotAllowed:
        return False


def _units(location: str) -> list[tuple[str, str, list[str]]]:
    """Split a location into inputs: [(path, kind, member files)], kind "file", "dicom-file" or "series"."""
    from adapters import SKIP_NAMES

    is_glob = any(ch in location for ch in "*?[") and not os.path.exists(location)
    if is_glob:
        tops = sorted(glob.glob(location, recursive=True))
    elif os.path.exists(location):
        tops = [location]
    else:
        raise ScheduleError(f"{location}: no such file or folder")
    units: list[tuple[str, str, list[str]]] = []
    seen: set[str] = set()
    for top in tops:
        if os.path.isfile(top):
            if top not in seen and os.path.basename(top) not in SKIP_NAMES:
                seen.add(top)
                units.append((top, "dicom-file" if _looks_dicom(top) else "file", [top]))
            continue
        if not os.path.isdir(top):
            continue
        listing = _listing(top)
        dicom_dirs = {d for d, files in listing if any(_looks_dicom(f) for f in files)}
        # Loose DICOM at the top of the watched folder are single files; a folder matched by a glob is a
        # series.
        series_roots: list[str] = []
        for d, _ in listing:
            if d not in dicom_dirs or (d == top and not is_glob):
                continue
            if not any(d.startswith(r + os.sep) for r in series_roots):
                series_roots.append(d)
        members: dict[str, list[str]] = {r: [] for r in series_roots}
        for d, files in listing:
            owner = next((r for r in series_roots if d == r or d.startswith(r + os.sep)), None)
            for f in files:
                if f in seen:
                    continue
                seen.add(f)
                if owner is not None:
                    members[owner].append(f)
                else:
                    units.append((f, "dicom-file" if _looks_dicom(f) else "file", [f]))
        units.extend((r, "series", members[r]) for r in series_roots if members[r])
    units.sort(key=lambda u: u[0])
    return units


def scan_location(
    location: str,
    *,
    settle_seconds: float,
    now: datetime | None = None,
    known: Mapping[str, KnownFile] | None = None,
    roots: Sequence[Path] = (),
    hash_limit: int = HASH_LIMIT,
) -> Scan:
    """Fingerprint every input of ``location`` (see the module doc for what an input is).

    DICOM inputs whose newest file is younger than ``settle_seconds`` go to ``Scan.settling``. A file is
    hashed only when it is at most ``hash_limit`` bytes and its size or mtime differ from ``known`` (so an
    unchanged folder costs one ``stat`` per file). Raises :class:`ScheduleError` if the location is gone.
    """
    known = known or {}
    now_ts = _aware(now or utcnow()).timestamp()
    units = _units(location)
    scan = Scan()
    for path, kind, files in units:
        if not _inside(path, roots) or any(not _inside(f, roots) for f in files):
            scan.skipped.append(f"{path}: outside the input roots (symlink?)")
            continue
        try:
            stats = [(f, os.stat(f)) for f in files]
        except OSError as exc:
            scan.skipped.append(f"{path}: {exc.strerror or exc}")
            continue
        newest = max(st.st_mtime for _, st in stats)
        if kind != "file" and now_ts - newest < settle_seconds:
            scan.settling.append(path)
            continue
        size = sum(st.st_size for _, st in stats)
        if kind == "series":
            manifest = "".join(
                f"{os.path.relpath(f, path)}\0{st.st_size}\0{st.st_mtime_ns}\n" for f, st in stats
            )
            sha: str | None = hashlib.sha256(manifest.encode()).hexdigest()
        else:
            prev = known.get(path)
            need = prev is None or prev.retry or prev.size != size or prev.mtime != newest
            try:
                sha = _sha256(path) if need and size <= hash_limit else None
            except OSError as exc:
                scan.skipped.append(f"{path}: {exc.strerror or exc}")
                continue
        scan.ready.append(
            Fingerprint(
                path=path,
                kind="series" if kind == "series" else "file",
                size=size,
                mtime=newest,
                sha256=sha,
                files=len(files),
            )
        )
    return scan


# CRUD ------------------------------------------------------------------------------------------------------
def create_schedule(
    session: Session,
    *,
    name: str,
    cron: str,
    location: str,
    owner: str | None,
    timezone: str = "UTC",
    pipeline: str = "auto",
    options: dict[str, Any] | None = None,
    settle_seconds: int = 300,
    enabled: bool = True,
    roots: Sequence[Path] = (),
    require_roots: bool = True,
) -> Schedule:
    """Validate and insert a schedule (the caller commits). Raises :class:`ScheduleError` with a readable
    message for a bad name, cron expression, time zone, location, pipeline or a duplicate name."""
    name = (name or "").strip()
    if not name or len(name) > 128:
        raise ScheduleError("name: must be 1 to 128 characters")
    if settle_seconds < 0:
        raise ScheduleError("settle_seconds: must be >= 0")
    cron = normalize_cron(cron)
    timezone = validate_timezone(timezone)
    location = validate_location(location, roots, require_roots=require_roots)
    _validate_pipeline(pipeline)
    clash = select(Schedule.id).where(
        Schedule.name == name, Schedule.owner.is_(None) if owner is None else Schedule.owner == owner
    )
    if session.scalar(clash) is not None:
        raise ScheduleError(f"name: a schedule named {name!r} already exists")
    row = Schedule(
        id=uuid.uuid4(),
        name=name,
        owner=owner,
        cron=cron,
        timezone=timezone,
        location=location,
        pipeline=pipeline,
        options=dict(options or {}),
        enabled=enabled,
        settle_seconds=settle_seconds,
        created_at=utcnow(),
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError as exc:  # a concurrent create with the same name
        raise ScheduleError(f"name: a schedule named {name!r} already exists") from exc
    return row


def update_schedule(
    session: Session,
    schedule: Schedule,
    *,
    roots: Sequence[Path] = (),
    require_roots: bool = True,
    now: datetime | None = None,
    **changes: Any,
) -> Schedule:
    """Change fields (name, cron, timezone, location, pipeline, options, settle_seconds). A new cron or time
    zone starts from now: slots of the new timetable before now are not caught up."""
    allowed = {"name", "cron", "timezone", "location", "pipeline", "options", "settle_seconds"}
    unknown = set(changes) - allowed
    if unknown:
        raise ScheduleError(f"cannot change {', '.join(sorted(unknown))}")
    if "name" in changes:
        name = (changes["name"] or "").strip()
        if not name or len(name) > 128:
            raise ScheduleError("name: must be 1 to 128 characters")
        clash = select(Schedule.id).where(
            Schedule.name == name,
            Schedule.id != schedule.id,
            Schedule.owner.is_(None) if schedule.owner is None else Schedule.owner == schedule.owner,
        )
        if session.scalar(clash) is not None:
            raise ScheduleError(f"name: a schedule named {name!r} already exists")
        schedule.name = name
    if "cron" in changes:
        schedule.cron = normalize_cron(changes["cron"])
    if "timezone" in changes:
        schedule.timezone = validate_timezone(changes["timezone"])
    if "location" in changes:
        schedule.location = validate_location(changes["location"], roots, require_roots=require_roots)
    if "pipeline" in changes:
        _validate_pipeline(changes["pipeline"])
        schedule.pipeline = changes["pipeline"]
    if "options" in changes:
        schedule.options = dict(changes["options"] or {})
    if "settle_seconds" in changes:
        if changes["settle_seconds"] < 0:
            raise ScheduleError("settle_seconds: must be >= 0")
        schedule.settle_seconds = changes["settle_seconds"]
    if "cron" in changes or "timezone" in changes:
        _skip_to_now(schedule, now)
    session.flush()
    return schedule


def _skip_to_now(schedule: Schedule, now: datetime | None) -> None:
    """Treat every slot up to now as done, so a new timetable or a resume does not fire a catch-up run."""
    slot = latest_slot(schedule.cron, schedule.timezone, now or utcnow())
    if schedule.last_run_for is None or _aware(schedule.last_run_for) < slot:
        schedule.last_run_for = slot


def get_schedule(session: Session, schedule_id: uuid.UUID, owner: str | None = None) -> Schedule | None:
    """The schedule, or None if it does not exist or belongs to someone else (``owner`` None = any)."""
    row = session.get(Schedule, schedule_id)
    if row is None or (owner is not None and row.owner != owner):
        return None
    return row


def resolve_schedule(session: Session, ref: str, owner: str | None = None) -> Schedule | None:
    """A schedule by ID or by name (names are unique per owner; an ambiguous name raises)."""
    try:
        return get_schedule(session, uuid.UUID(ref), owner)
    except ValueError:
        pass
    q = select(Schedule).where(Schedule.name == ref)
    if owner is not None:
        q = q.where(Schedule.owner == owner)
    rows = list(session.scalars(q).all())
    if len(rows) > 1:
        raise ScheduleError(f"{ref!r} names {len(rows)} schedules of different owners; use the ID")
    return rows[0] if rows else None


def list_schedules(session: Session, owner: str | None = None) -> list[Schedule]:
    q = select(Schedule).order_by(Schedule.name, Schedule.created_at)
    if owner is not None:
        q = q.where(Schedule.owner == owner)
    return list(session.scalars(q).all())


def set_enabled(session: Session, schedule: Schedule, enabled: bool, now: datetime | None = None) -> Schedule:
    """Pause or resume. Resuming does not replay the slots missed while paused (the next slot, or a
    trigger, takes everything that arrived meanwhile)."""
    if enabled and not schedule.enabled:
        _skip_to_now(schedule, now)
    schedule.enabled = enabled
    session.flush()
    return schedule


def delete_schedule(session: Session, schedule: Schedule) -> None:
    """Delete a schedule with its runs and file records; its jobs and their results are kept."""
    session.query(ScheduleRun).filter(ScheduleRun.schedule_id == schedule.id).delete()
    session.query(ScheduleFile).filter(ScheduleFile.schedule_id == schedule.id).delete()
    session.delete(schedule)
    session.flush()


def next_run_at(schedule: Schedule, now: datetime | None = None) -> datetime | None:
    """When the schedule fires next (None while paused)."""
    if not schedule.enabled:
        return None
    since = max(_aware(schedule.last_run_for or schedule.created_at), _aware(now or utcnow()))
    return next_slot(schedule.cron, schedule.timezone, since)


def list_runs(
    session: Session, schedule_id: uuid.UUID, *, limit: int = 50, offset: int = 0
) -> tuple[list[tuple[ScheduleRun, str | None]], int]:
    """A schedule's runs, newest first, each with its job's status (None when no job was submitted)."""
    total = (
        session.scalar(
            select(func.count()).select_from(ScheduleRun).where(ScheduleRun.schedule_id == schedule_id)
        )
        or 0
    )
    rows = session.execute(
        select(ScheduleRun, Job.status)
        .outerjoin(Job, Job.id == ScheduleRun.job_id)
        .where(ScheduleRun.schedule_id == schedule_id)
        .order_by(ScheduleRun.scheduled_for.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    return [(r, s) for r, s in rows], total


# Runs ------------------------------------------------------------------------------------------------------
def claim_run(schedule_id: uuid.UUID, scheduled_for: datetime, *, advance: bool = True) -> uuid.UUID | None:
    """Insert the run row for a slot; None if that slot is already taken (by another tick or beat).

    ``advance`` moves the schedule's ``last_run_for`` to the slot (cron slots; manual triggers don't).
    """
    scheduled_for = _aware(scheduled_for)
    run_id = uuid.uuid4()
    try:
        with session_scope() as session:
            if advance:
                res = session.execute(
                    update(Schedule)
                    .where(
                        Schedule.id == schedule_id,
                        (Schedule.last_run_for.is_(None)) | (Schedule.last_run_for < scheduled_for),
                    )
                    .values(last_run_for=scheduled_for)
                )
                if res.rowcount != 1:
                    return None
            session.add(
                ScheduleRun(
                    id=run_id,
                    schedule_id=schedule_id,
                    scheduled_for=scheduled_for,
                    started_at=utcnow(),
                    outcome=RunOutcome.running,
                    new_files=0,
                )
            )
    except IntegrityError:
        return None
    return run_id


def _known(session: Session, schedule_id: uuid.UUID) -> dict[str, KnownFile]:
    rows = session.execute(
        select(ScheduleFile, Job.status)
        .outerjoin(Job, Job.id == ScheduleFile.job_id)
        .where(ScheduleFile.schedule_id == schedule_id)
    ).all()
    failed_jobs = {f.job_id for f, st in rows if st == JobStatus.failed}
    read: set[tuple[uuid.UUID, str]] = set()
    if failed_jobs:
        read = {
            (j, s)
            for j, s in session.execute(
                select(Item.job_id, Item.source).where(Item.job_id.in_(failed_jobs)).distinct()
            )
        }
    return {
        f.path: KnownFile(
            size=f.size,
            mtime=f.mtime,
            sha256=f.sha256,
            retry=f.job_id in failed_jobs and (f.job_id, f.path) not in read,
        )
        for f, _ in rows
    }


def _finish(run_id: uuid.UUID, outcome: str, message: str | None, **values: Any) -> None:
    with session_scope() as session:
        session.execute(
            update(ScheduleRun)
            .where(ScheduleRun.id == run_id)
            .values(outcome=outcome, message=message, **values)
        )


def _notes(scan: Scan) -> list[str]:
    notes = []
    if scan.settling:
        notes.append(
            f"{len(scan.settling)} DICOM input(s) still settling: "
            + ", ".join(os.path.basename(p) for p in scan.settling[:5])
        )
    if scan.skipped:
        notes.append(f"{len(scan.skipped)} skipped: " + "; ".join(scan.skipped[:5]))
    return notes


def execute_run(run_id: uuid.UUID, *, now: datetime | None = None) -> str:
    """Carry out a claimed run: scan, submit one job with the new or changed inputs. Returns the outcome.

    The job row, the file records and the run's outcome are written in one transaction (under a write lock
    on the schedule row, so two runs of one schedule cannot take the same file); the planning task is sent
    after that commits.
    """
    from core.settings import get_settings

    with session_scope() as session:
        run = session.get(ScheduleRun, run_id)
        if run is None or run.outcome != RunOutcome.running:
            return run.outcome if run is not None else RunOutcome.failed
        sched = session.get(Schedule, run.schedule_id)
        if sched is None:  # deleted meanwhile (its runs go with it)
            return RunOutcome.failed
        sid, location, settle = sched.id, sched.location, sched.settle_seconds
        pipeline, options, owner = sched.pipeline, dict(sched.options or {}), sched.owner
        known = _known(session, sid)
    now = _aware(now or utcnow())
    try:
        scan = scan_location(
            location, settle_seconds=settle, now=now, known=known, roots=get_settings().input_roots
        )
        candidates = [fp for fp in scan.ready if is_new_or_changed(fp, known.get(fp.path))]
        if candidates:
            _validate_pipeline(pipeline)
    except (ScheduleError, OSError) as exc:
        _finish(run_id, RunOutcome.failed, str(exc))
        return RunOutcome.failed
    notes = _notes(scan)

    with session_scope() as session:
        # Write first: on PostgreSQL this locks the schedule row, on SQLite it takes the write lock, so a
        # concurrent run of the same schedule waits here and then sees the files this one took.
        session.execute(update(Schedule).where(Schedule.id == sid).values(last_success_at=now))
        known = _known(session, sid)
        new = [fp for fp in candidates if is_new_or_changed(fp, known.get(fp.path))]
        rows = {
            f.path: f for f in session.scalars(select(ScheduleFile).where(ScheduleFile.schedule_id == sid))
        }
        # A touched but identical file: remember its new mtime so it is not hashed again next time.
        for fp in scan.ready:
            row = rows.get(fp.path)
            if row is not None and fp not in new and fp.sha256 is not None and row.mtime != fp.mtime:
                row.mtime = fp.mtime
        run = session.get(ScheduleRun, run_id)
        if not new:
            run.outcome, run.message = RunOutcome.nothing_new, "; ".join(notes) or None
            return RunOutcome.nothing_new
        job = jobs.create_job(session, [jobs.InputSpec(path=fp.path) for fp in new], pipeline, options, owner)
        job_id = job.id
        for fp in new:
            row = rows.get(fp.path)
            if row is None:
                session.add(
                    ScheduleFile(
                        schedule_id=sid,
                        path=fp.path,
                        size=fp.size,
                        mtime=fp.mtime,
                        sha256=fp.sha256,
                        job_id=job_id,
                        processed_at=now,
                    )
                )
            else:
                row.size, row.mtime, row.sha256, row.job_id, row.processed_at = (
                    fp.size,
                    fp.mtime,
                    fp.sha256,
                    job_id,
                    now,
                )
        retried = sum(1 for fp in new if (k := known.get(fp.path)) is not None and k.retry)
        if retried:
            notes.insert(0, f"{retried} retried after a failed job")
        run.outcome, run.job_id, run.new_files = RunOutcome.enqueuing, job_id, len(new)
        run.message = "; ".join(notes) or None
    return _enqueue(run_id, job_id)


def _enqueue(run_id: uuid.UUID, job_id: uuid.UUID) -> str:
    from worker.tasks import plan_job

    try:
        plan_job.delay(str(job_id))
    except Exception as exc:  # noqa: BLE001 - record why; the files are retried next run (job failed unread)
        log.exception("cannot enqueue scheduled job %s", job_id)
        with session_scope() as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(status=JobStatus.failed, error=f"queue unavailable: {exc}", finished_at=utcnow())
            )
            session.execute(
                update(ScheduleRun)
                .where(ScheduleRun.id == run_id)
                .values(outcome=RunOutcome.failed, message=f"queue unavailable: {exc}")
            )
        return RunOutcome.failed
    with session_scope() as session:
        session.execute(
            update(ScheduleRun)
            .where(ScheduleRun.id == run_id, ScheduleRun.outcome == RunOutcome.enqueuing)
            .values(outcome=RunOutcome.submitted)
        )
    return RunOutcome.submitted


def recover_stuck(now: datetime | None = None) -> int:
    """Finish runs whose process died: "enqueuing" ones get their planning task sent (planning is idempotent),
    "running" ones are marked failed (their files were not recorded, so the next run takes them)."""
    cutoff = _aware(now or utcnow()) - STUCK_AFTER
    with session_scope() as session:
        stuck = session.execute(
            select(ScheduleRun.id, ScheduleRun.outcome, ScheduleRun.job_id).where(
                ScheduleRun.outcome.in_([RunOutcome.running, RunOutcome.enqueuing]),
                ScheduleRun.started_at < cutoff,
            )
        ).all()
    for run_id, outcome, job_id in stuck:
        if outcome == RunOutcome.enqueuing and job_id is not None:
            _enqueue(run_id, job_id)
        else:
            _finish(run_id, RunOutcome.failed, "abandoned: the process carrying out this run stopped")
    return len(stuck)


def run_due(now: datetime | None = None) -> list[uuid.UUID]:
    """The scheduler tick: carry out each enabled schedule's due slot exactly once. Returns the run IDs this
    call carried out (a slot another tick or beat already took is skipped)."""
    now = _aware(now or utcnow())
    recover_stuck(now)
    with session_scope() as session:
        due = session.execute(
            select(
                Schedule.id, Schedule.cron, Schedule.timezone, Schedule.created_at, Schedule.last_run_for
            ).where(Schedule.enabled.is_(True))
        ).all()
    done = []
    for sid, cron, tz, created, last in due:
        try:
            slot = due_slot(cron, tz, last or created, now)
        except (ScheduleError, ValueError, KeyError) as exc:  # a row edited by hand; don't stop the others
            log.error("schedule %s: %s", sid, exc)
            continue
        if slot is None:
            continue
        run_id = claim_run(sid, slot)
        if run_id is None:
            continue
        try:
            execute_run(run_id, now=now)
        except Exception as exc:  # noqa: BLE001 - one broken schedule must not stop the others
            log.exception("schedule %s run %s failed", sid, run_id)
            _finish(run_id, RunOutcome.failed, f"{type(exc).__name__}: {exc}")
        done.append(run_id)
    return done


def trigger(schedule_id: uuid.UUID, *, now: datetime | None = None) -> ScheduleRun:
    """Run a schedule now (paused or not), outside its timetable; returns the finished run row."""
    now = _aware(now or utcnow())
    run_id = claim_run(schedule_id, now, advance=False)
    if run_id is None:  # same microsecond as another trigger
        raise ScheduleError("a run for this instant already exists; try again")
    try:
        execute_run(run_id, now=now)
    except Exception as exc:
        _finish(run_id, RunOutcome.failed, f"{type(exc).__name__}: {exc}")
        raise
    with session_scope() as session:
        return session.get(ScheduleRun, run_id)
