"""Jobs as data: creation, expansion into items, state transitions and queries.

Used by the API, the CLI and the worker. State changes are conditional UPDATEs so that a task delivered
twice (worker killed, broker restarted) never counts an item twice or moves a finished job backwards.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import Connection, bindparam, case, func, select, update
from sqlalchemy.orm import Session

from core.models import TERMINAL_ITEM, ClassMetric, InstanceRow, Item, ItemStatus, Job, JobStatus, utcnow

__all__ = [
    "InputSpec",
    "PathNotAllowed",
    "Started",
    "cancel_job",
    "check_input_path",
    "create_job",
    "expand_inputs",
    "finish_item",
    "get_job",
    "list_items",
    "list_jobs",
]

log = logging.getLogger(__name__)


class PathNotAllowed(ValueError):
    """A server-side input path resolves outside the configured input roots."""


@dataclass(frozen=True)
class InputSpec:
    """One submitted input: a path or URL, and optionally a ground-truth mask for scoring."""

    path: str
    truth: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "truth": self.truth}


#: A ground-truth pixel value as written in a truth map's keys (8- or 16-bit label images).
TRUTH_VALUE = r"^[0-9]{1,5}$"
#: Class ids a truth value may map to; 255 marks pixels that are not scored.
IGNORE_CLASS = 255


def check_truth_map(mapping: Any) -> dict[str, int]:
    """``{truth value: class id}`` as stored in job options, or ValueError naming the bad entry. Checked at
    submission: a bad entry used to surface in the worker, failing every scored item of the job."""
    if not isinstance(mapping, dict):
        raise ValueError("truth map: must be a JSON object of truth value -> class id, e.g. {\"1\": 0}")
    out = {}
    for k, v in mapping.items():
        if not re.match(TRUTH_VALUE, str(k)):
            raise ValueError(f"truth map: key {k!r} is not a truth pixel value (an integer 0-99999)")
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= IGNORE_CLASS:
            raise ValueError(f"truth map: class id {v!r} for {k!r} is not an integer 0-{IGNORE_CLASS} "
                             f"({IGNORE_CLASS} = not scored)")
        out[str(int(k))] = v
    return out


def check_input_path(path: str, roots: Sequence[Path]) -> str:
    """Resolve ``path`` (symlinks included) and require it to lie inside one of ``roots``.

    Returns the resolved path. Raises :class:`PathNotAllowed`: no ``..`` escapes, no symlinks pointing out,
    no absolute paths elsewhere. Object-store URLs are checked by the store's own credentials instead.
    """
    if "://" in path:
        return path
    if "\x00" in path:
        raise PathNotAllowed("input path contains a NUL byte")
    if not roots:
        raise PathNotAllowed("server-side input paths are disabled: set TILESEG_INPUT_ROOTS on the server")
    resolved_roots = [Path(r).expanduser().resolve() for r in roots]
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        candidate = resolved_roots[0] / candidate
    resolved = candidate.resolve()
    for root in resolved_roots:
        if resolved == root or resolved.is_relative_to(root):
            return str(resolved)
    raise PathNotAllowed(f"{path}: outside the allowed input roots")


def create_job(
    session: Session,
    inputs: Sequence[InputSpec],
    pipeline: str = "auto",
    options: dict[str, Any] | None = None,
    owner: str | None = None,
) -> Job:
    """Insert a queued job; the caller commits and then enqueues ``plan_job``."""
    job = Job(
        id=uuid.uuid4(),
        owner=owner,
        pipeline=pipeline,
        options=dict(options or {}),
        inputs=[i.to_json() for i in inputs],
        status=JobStatus.queued,
    )
    session.add(job)
    session.flush()
    return job


def _walk(path: str) -> Iterable[str]:
    """Files and DICOM-series folders under ``path``, in a stable order (sidecars such as world files and
    ``.aux.xml`` go with their raster, :func:`adapters.folder_inputs`)."""
    from adapters import detect, folder_inputs

    if "://" in path:
        yield from _walk_url(path)
        return
    if any(ch in path for ch in "*?[") and not os.path.exists(path):
        for p in sorted(glob.glob(path, recursive=True)):
            yield from _walk(p)
        return
    if not os.path.isdir(path):
        yield path
        return
    try:
        fmt = detect(path)
    except Exception:  # noqa: BLE001 - any folder nobody claims is walked instead
        fmt = None
    if fmt is not None:
        # A DICOM series folder is one source; any other files in it still go to their own adapters.
        from adapters.dicom import looks_dicom

        yield path
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for name in folder_inputs(filenames):
                p = os.path.join(dirpath, name)
                if not looks_dicom(Path(p)):
                    yield p
        return
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in folder_inputs(filenames):
            yield os.path.join(dirpath, name)


def _walk_url(url: str) -> Iterable[str]:
    """Object-store inputs: a file URL as is; a folder URL expanded to its files, except a DICOM series
    folder (its first file starts with the DICOM preamble), which stays one source."""
    from fsspec.core import url_to_fs

    from core.settings import get_settings

    fs, root = url_to_fs(url, **get_settings().storage_options)
    if not fs.isdir(root):
        yield url
        return
    from adapters import folder_inputs

    proto = url.split("://", 1)[0]
    by_folder: dict[str, list[str]] = {}
    for f in fs.find(root):
        by_folder.setdefault(os.path.dirname(f), []).append(os.path.basename(f))
    files = sorted(os.path.join(d, n) for d, names in by_folder.items() for n in folder_inputs(names))
    if files:
        with fs.open(files[0], "rb") as fh:
            if fh.read(132)[128:132] == b"DICM":
                yield url
                return
    for f in files:
        yield f"{proto}://{f}"


@dataclass
class PlannedItem:
    source: str
    key: str
    group: str | None
    format: str | None
    truth: str | None
    meta: dict[str, Any]
    error: str | None = None


def part_rows(height: int, width: int, split_pixels: int) -> list[tuple[int, int]]:
    """Row ranges splitting a ``height x width`` raster into parts of about ``split_pixels`` pixels
    (multiples of 256 rows, at least 512), or one range when it is small enough."""
    if height * width <= split_pixels:
        return [(0, height)]
    rows = max(512, (split_pixels // max(width, 1)) // 256 * 256)
    return [(r, min(r + rows, height)) for r in range(0, height, rows)]


def _redacted(path: str) -> str:
    """``path`` with any ``user:password@`` of a URL removed, for messages and logs."""
    return re.sub(r"^([a-zA-Z][\w+.-]*://)[^/@]*@", r"\1", path)


def truth_for(path: str, root: str, truth: str | None) -> tuple[str | None, str | None]:
    """``(truth file, note)`` for the input file ``path`` found under the submitted input ``root``.

    A truth *file* serves every item of its input. A truth *folder* beside an input folder (``images/`` and
    ``labels/``, as training sets are laid out) pairs by name: the file at the same path relative to the
    folders, with the same stem and any extension (``images/a/07.png`` -> ``labels/a/07.tif``), preferring
    the same extension when there are several. Without one, the input is segmented unscored and ``note``
    says why. Object-store truth folders are not paired (the truth is used as given).
    """
    if truth is None or "://" in truth or not os.path.isdir(truth) or os.path.isdir(path):
        return truth, None  # a DICOM series folder is one source: its truth is used as given
    rel = os.path.relpath(path, root) if os.path.isdir(root) else os.path.basename(path)
    folder = os.path.join(truth, os.path.dirname(rel))
    stem, ext = os.path.splitext(os.path.basename(rel))
    try:
        names = sorted(n for n in os.listdir(folder)
                       if os.path.splitext(n)[0] == stem and os.path.isfile(os.path.join(folder, n)))
    except OSError:
        names = []
    if not names:
        return None, f"no truth file named {stem}.* in {os.path.basename(os.path.normpath(folder))}/: not scored"
    same = [n for n in names if os.path.splitext(n)[1].lower() == ext.lower()]
    return os.path.join(folder, (same or names)[0]), None


def expand_inputs(inputs: Sequence[dict[str, Any]], max_pixels: int, storage_options: dict[str, Any],
                  split_pixels: int | None = None) -> list[PlannedItem]:
    """Open every input and list its items. Inputs that cannot be read become failed items, not errors.

    With ``split_pixels``, streamable rasters larger than that become several items, one per row part
    (keys ``<key>@rows=a:b``, sharing a group so their outputs are mosaicked at the end).
    """
    from adapters import AdapterError, open_input
    from adapters.base import part_key
    from core.store import fetch_input

    planned: list[PlannedItem] = []
    for spec in inputs:
        try:
            paths = list(_walk(spec["path"]))
        except Exception as exc:  # noqa: BLE001 - an unreachable URL or unlistable folder fails this input only
            log.warning("cannot list input %s: %s", _redacted(spec["path"]), exc)
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            planned.append(PlannedItem(source=spec["path"], key="", group=None, format=None, truth=spec.get("truth"),
                                       meta={}, error=f"{_redacted(spec['path'])}: cannot be listed "
                                                      f"({type(exc).__name__}: {first})"))
            continue
        for path in paths:
            truth, note = truth_for(path, spec["path"], spec.get("truth"))
            try:
                with fetch_input(path, storage_options) as local:
                    fmt, source = open_input(local, max_pixels=max_pixels)
                    with source:
                        items = list(source.items())
                    if not items:
                        raise AdapterError(f"{os.path.basename(path)}: contains no images")
                    for it in items:
                        meta = it.info.to_json()
                        if note:
                            meta["warnings"] = [*meta.get("warnings", []), note]
                        ranges = (part_rows(it.info.height, it.info.width, split_pixels)
                                  if split_pixels and it.streamable else [(0, it.info.height)])
                        if len(ranges) == 1:
                            planned.append(PlannedItem(source=path, key=it.key, group=it.group, format=fmt.name,
                                                       truth=truth, meta=meta))
                            continue
                        for n, (a, b) in enumerate(ranges):
                            part = {"rows": [a, b], "index": n, "count": len(ranges)}
                            planned.append(PlannedItem(source=path, key=part_key(it.key, a, b),
                                                       group=f"parts:{path}#{it.key}", format=fmt.name,
                                                       truth=truth, meta={**meta, "part": part}))
            except AdapterError as exc:
                planned.append(PlannedItem(source=path, key="", group=None, format=None, truth=truth, meta={},
                                           error=str(exc)))
            except Exception as exc:  # noqa: BLE001 - a hostile file must not sink the whole job
                log.exception("unexpected error opening %s", path)
                msg = f"{os.path.basename(path)}: cannot be read ({type(exc).__name__}: {exc})"
                planned.append(PlannedItem(source=path, key="", group=None, format=None, truth=truth, meta={},
                                           error=msg))
    return planned


def record_plan(session: Session, job_id: uuid.UUID, planned: Sequence[PlannedItem]) -> list[Item]:
    """Store the planned items and counters in one transaction (idempotent: a planned job is left alone)."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None or job.planned:
        return []
    rows: list[Item] = []
    failed = 0
    now = utcnow()
    # Cancelled while its inputs were being expanded (the lock above waits for cancel_job): record the plan,
    # nothing of it pending, so a cancelled job never shows items that nobody will run.
    cancelled = job.status == JobStatus.cancelled
    for seq, p in enumerate(planned):
        if p.error:
            status, error = ItemStatus.failed, p.error
        elif cancelled:
            status, error = ItemStatus.cancelled, "cancelled by user"
        else:
            status, error = ItemStatus.pending, None
        failed += bool(p.error)
        rows.append(Item(id=uuid.uuid4(), job_id=job_id, seq=seq, source=p.source, key=p.key, group=p.group,
                         format=p.format, truth=p.truth, meta=p.meta, status=status, error=error,
                         finished_at=None if status == ItemStatus.pending else now))
    session.add_all(rows)
    job.items_total = len(rows)
    job.items_done = len(rows) if cancelled else failed
    job.items_failed = failed
    job.planned = True
    if job.status == JobStatus.queued:
        job.status = JobStatus.running
        job.started_at = now
    if not rows:
        job.error = "no inputs found"
    return rows


class Started(NamedTuple):
    """An item this task may process. ``restarts``: how many times, this one included, it was started while
    it was still marked running, i.e. after the process working on it died."""

    restarts: int


def start_item(session: Session, item_id: uuid.UUID) -> Started | None:
    """Mark an item running; None if it is already finished (a redelivered task skips it).

    An item found still ``running`` had its worker die mid-item (transient errors put items back to
    ``pending`` before retrying), so that start counts as a restart.
    """
    restarted = case((Item.status == ItemStatus.running, 1), else_=0)
    row = session.execute(
        update(Item)
        .where(Item.id == item_id, Item.status.not_in([s.value for s in TERMINAL_ITEM]))
        .values(status=ItemStatus.running, started_at=utcnow(), attempts=Item.attempts + 1,
                restarts=Item.restarts + restarted)
        .returning(Item.restarts)
    ).first()
    return None if row is None else Started(int(row[0]))


def finish_item(session: Session, item_id: uuid.UUID, job_id: uuid.UUID, status: ItemStatus,
                error: str | None = None, artifacts: dict[str, Any] | None = None,
                meta: dict[str, Any] | None = None) -> bool:
    """Move an item to a terminal status and count it on its job, exactly once.

    Returns True when this call completed the job's last item (the caller then enqueues finalisation).
    """
    values: dict[str, Any] = {"status": status, "error": error, "finished_at": utcnow()}
    if artifacts is not None:
        values["artifacts"] = artifacts
    if meta is not None:
        values["meta"] = meta
    res = session.execute(
        update(Item).where(Item.id == item_id, Item.status.not_in([s.value for s in TERMINAL_ITEM])).values(**values)
    )
    if res.rowcount != 1:
        return False
    failed = 1 if status == ItemStatus.failed else 0
    row = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(items_done=Job.items_done + 1, items_failed=Job.items_failed + failed)
        .returning(Job.items_done, Job.items_total, Job.planned)
    ).one()
    return bool(row.planned and row.items_done >= row.items_total)


def job_complete(session: Session, job_id: uuid.UUID) -> bool:
    job = session.get(Job, job_id)
    return bool(job and job.planned and job.items_done >= job.items_total and not JobStatus(job.status).terminal)


def cancel_job(session: Session, job_id: uuid.UUID) -> Job | None:
    """Cancel a job: pending items are cancelled (workers skip them), finished results are kept."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        return None
    if JobStatus(job.status).terminal:
        return job
    now = utcnow()
    res = session.execute(
        update(Item)
        .where(Item.job_id == job_id, Item.status == ItemStatus.pending)
        .values(status=ItemStatus.cancelled, finished_at=now, error="cancelled by user")
    )
    job.items_done += res.rowcount
    job.status = JobStatus.cancelled
    job.finished_at = now
    return job


def get_job(session: Session, job_id: uuid.UUID, owner: str | None = None) -> Job | None:
    """The job, or None if it does not exist or belongs to someone else (``owner`` None = any)."""
    job = session.get(Job, job_id)
    if job is None or (owner is not None and job.owner != owner):
        return None
    return job


#: A job's public summary (the API's ``JobOut``), selected as plain Core rows: status polling is the hottest
#: query of the service, and ORM objects, sessions and per-call statement building cost more than the query.
_JOBS = Job.__table__
SUMMARY_COLUMNS = tuple(_JOBS.c[n] for n in (
    "id", "owner", "pipeline", "options", "status", "items_total", "items_done", "items_failed", "error",
    "created_at", "started_at", "finished_at"))
_BY_ID = select(*SUMMARY_COLUMNS).where(_JOBS.c.id == bindparam("job_id"))
_BY_ID_WITH_INPUTS = select(*SUMMARY_COLUMNS, _JOBS.c.inputs).where(_JOBS.c.id == bindparam("job_id"))
_SUMMARY_STATEMENTS = {
    (False, False): _BY_ID,
    (False, True): _BY_ID.where(_JOBS.c.owner == bindparam("owner")),
    (True, False): _BY_ID_WITH_INPUTS,
    (True, True): _BY_ID_WITH_INPUTS.where(_JOBS.c.owner == bindparam("owner")),
}


def _summary(row: Any) -> dict[str, Any]:
    d = dict(row)
    d["options"] = d["options"] or {}
    total = d["items_total"]
    d["progress"] = round(d["items_done"] / total, 4) if total else 0.0
    return d


def job_summary(conn: Connection | Session, job_id: uuid.UUID, owner: str | None = None, *,
                inputs: bool = False) -> dict[str, Any] | None:
    """One job's summary dict (``inputs`` adds the submitted inputs) in one SELECT, or None if it does not
    exist or belongs to someone else (``owner`` None = any). ``conn``: a Core connection or a session."""
    stmt = _SUMMARY_STATEMENTS[(inputs, owner is not None)]
    params: dict[str, Any] = {"job_id": job_id} if owner is None else {"job_id": job_id, "owner": owner}
    row = conn.execute(stmt, params).mappings().first()
    return None if row is None else _summary(row)


@cache
def _list_statement(by_owner: bool, by_status: bool, by_since: bool) -> Any:
    q = select(*SUMMARY_COLUMNS, func.count().over().label("_total"))
    if by_owner:
        q = q.where(_JOBS.c.owner == bindparam("owner"))
    if by_status:
        q = q.where(_JOBS.c.status == bindparam("status"))
    if by_since:
        q = q.where(_JOBS.c.created_at >= bindparam("since"))
    return q.order_by(_JOBS.c.created_at.desc()).limit(bindparam("limit")).offset(bindparam("offset"))


def list_job_summaries(conn: Connection | Session, *, owner: str | None = None, status: str | None = None,
                       since: datetime | None = None, limit: int = 50, offset: int = 0
                       ) -> tuple[list[dict[str, Any]], int]:
    """Like :func:`list_jobs` but summary dicts, newest first, with the total from the same query
    (a window count); a second COUNT runs only when the page is past the end."""
    params = {"owner": owner, "status": status, "since": since, "limit": limit, "offset": offset}
    stmt = _list_statement(owner is not None, bool(status), since is not None)
    rows = conn.execute(stmt, params).mappings().all()
    if rows:
        return [_summary({k: v for k, v in r.items() if k != "_total"}) for r in rows], rows[0]["_total"]
    matching = stmt.with_only_columns(_JOBS.c.id).order_by(None).limit(None).offset(None).subquery()
    return [], conn.execute(select(func.count()).select_from(matching), params).scalar() or 0


def list_jobs(session: Session, *, owner: str | None = None, status: str | None = None,
              since: datetime | None = None, limit: int = 50, offset: int = 0) -> tuple[list[Job], int]:
    q = select(Job)
    if owner is not None:
        q = q.where(Job.owner == owner)
    if status:
        q = q.where(Job.status == status)
    if since:
        q = q.where(Job.created_at >= since)
    total = session.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = session.scalars(q.order_by(Job.created_at.desc()).limit(limit).offset(offset)).all()
    return list(rows), total


def list_items(session: Session, job_id: uuid.UUID, *, status: str | None = None, limit: int = 100,
               offset: int = 0) -> tuple[list[Item], int]:
    q = select(Item).where(Item.job_id == job_id)
    if status:
        q = q.where(Item.status == status)
    total = session.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = session.scalars(q.order_by(Item.seq).limit(limit).offset(offset)).all()
    return list(rows), total


def score_summaries(rows: Sequence[ClassMetric]) -> list[dict[str, Any]]:
    """Pixel accuracy, mean IoU and mean Dice per model of metric rows scored against ground truth (one item's
    rows, or a job's aggregated ones), from the confusion matrix the rows carry; models without one are
    left out. Means are over the classes that occur, as in ``tileseg eval`` (:func:`pipelines.metrics.scores`).
    """
    import numpy as np

    from pipelines.metrics import scores

    out = []
    for model in dict.fromkeys(r.model for r in rows):
        confusion = next(((r.sums or {}).get("confusion") for r in rows
                          if r.model == model and (r.sums or {}).get("confusion") is not None), None)
        if confusion is None:
            continue
        cm = np.asarray(confusion, dtype=np.int64)
        s = scores(cm)
        out.append({"model": model, "pixel_accuracy": s["pixel_accuracy"], "mean_iou": s["mean_iou"],
                    "mean_dice": s["mean_dice"], "scored_pixels": int(cm.sum())})
    return out


def job_metrics(session: Session, job_id: uuid.UUID, item_id: uuid.UUID | None = None) -> list[ClassMetric]:
    q = select(ClassMetric).where(ClassMetric.job_id == job_id)
    q = q.where(ClassMetric.item_id.is_(None)) if item_id is None else q.where(ClassMetric.item_id == item_id)
    return list(session.scalars(q.order_by(ClassMetric.model, ClassMetric.class_id)).all())


def items_scores(session: Session, item_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[dict[str, Any]]]:
    """:func:`score_summaries` of each of ``item_ids`` that was scored against ground truth, in one query (a
    page of item cards)."""
    if not item_ids:
        return {}
    rows = session.scalars(select(ClassMetric).where(ClassMetric.item_id.in_(list(item_ids)))
                           .order_by(ClassMetric.item_id, ClassMetric.model, ClassMetric.class_id)).all()
    by_item: dict[uuid.UUID, list[ClassMetric]] = {}
    for r in rows:
        by_item.setdefault(r.item_id, []).append(r)
    return {i: s for i, rs in by_item.items() if (s := score_summaries(rs))}


def item_instances(session: Session, item_id: uuid.UUID) -> list[InstanceRow]:
    return list(session.scalars(select(InstanceRow).where(InstanceRow.item_id == item_id)
                                .order_by(InstanceRow.score.desc())).all())
