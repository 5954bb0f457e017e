"""What a task does with its items: read through the adapter, run the pipeline, write outputs through the
adapter, upload them to the artifact store, and record rows. Called from worker.tasks; no Celery here, so
the same code runs in tests and in any worker.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import traceback
import uuid
from collections import defaultdict
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import delete, select, update
from sqlalchemy.exc import DBAPIError, OperationalError

from adapters import AdapterError, get_format
from adapters.base import Format, RegionItem, split_key
from adapters.base import Item as AdapterItem
from core import jobs
from core.db import session_scope
from core.models import TERMINAL_ITEM, ClassMetric, InstanceRow, Item, ItemStatus, Job, JobStatus, utcnow
from core.settings import get_settings
from core.store import ArtifactStore, fetch_input
from worker.truth import truth_or_note, with_truth_notes

log = logging.getLogger(__name__)

__all__ = ["Processed", "TransientError", "finalize_job", "model_for_item", "plan_job", "process_items"]

#: Errors worth retrying: the database or broker went away for a moment.
TRANSIENT = (OperationalError, ConnectionError, TimeoutError)


class TransientError(Exception):
    """Raised to ask Celery for a retry with backoff."""


def store() -> ArtifactStore:
    s = get_settings()
    return ArtifactStore(s.artifacts, s.storage_options)


# Planning -------------------------------------------------------------------------------------------------
def plan_job(job_id: uuid.UUID) -> list[list[uuid.UUID]]:
    """Expand a job's inputs into items; returns batches of pending item IDs to enqueue.

    Photos going through the same model are batched (one model call per batch), everything else is one
    item per task. Safe to run twice: a planned job just returns its unfinished items again.
    """
    s = get_settings()
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"job {job_id} not found")
        if JobStatus(job.status).terminal:
            return []
        already = job.planned
        inputs = list(job.inputs)
        pipeline = job.pipeline
    if not already:
        planned = jobs.expand_inputs(inputs, s.max_pixels, s.storage_options, _split_pixels(pipeline))
        with session_scope() as session:
            jobs.record_plan(session, job_id, planned)
    with session_scope() as session:
        job = session.get(Job, job_id)
        pending = session.scalars(
            select(Item).where(Item.job_id == job_id, Item.status.in_([ItemStatus.pending, ItemStatus.running]))
            .order_by(Item.seq)
        ).all()
        batches: list[list[uuid.UUID]] = []
        photo_batches: dict[str, list[uuid.UUID]] = defaultdict(list)
        for it in pending:
            if it.format == "photo":
                model = model_for_item(job.pipeline, it.format)
                key = model or "?"
                photo_batches[key].append(it.id)
                if len(photo_batches[key]) >= s.photo_batch:
                    batches.append(photo_batches.pop(key))
            else:
                batches.append([it.id])
        batches.extend(photo_batches.values())
    return batches


def _split_pixels(pipeline: str) -> int | None:
    """Rasters are split into parts only for tile-mode semantic models (instances would be cut at part
    borders; resize models need the whole image)."""
    from pipelines.registry import ModelNotFound, get_spec

    name = model_for_item(pipeline, "geotiff")
    try:
        spec = get_spec(name) if name else None
    except ModelNotFound:
        return None
    if spec is None or spec.kind != "semantic" or spec.mode != "tile":
        return None
    return get_settings().split_pixels


def model_for_item(pipeline: str, fmt: str | None) -> str | None:
    """The model name for an item: the job's pipeline, or the registry's default for the input kind."""
    if pipeline and pipeline != "auto":
        return pipeline
    from pipelines.registry import default_for

    spec = default_for(fmt or "")
    return spec.name if spec else None


# Processing -----------------------------------------------------------------------------------------------
def _fail(item_id: uuid.UUID, job_id: uuid.UUID, message: str) -> bool:
    with session_scope() as session:
        return jobs.finish_item(session, item_id, job_id, ItemStatus.failed, error=message[:4000])


@dataclass
class Processed:
    """What :func:`process_items` did: ``last`` when the job's last item finished here; ``isolate``: items
    of a batch whose worker died, put back to pending, to be enqueued one task each (so one item that kills
    its process cannot take the others of its batch down with it)."""

    last: bool = False
    isolate: list[uuid.UUID] = field(default_factory=list)


def _time_limit_message() -> str:
    return (f"processing took longer than TILESEG_TASK_TIME_LIMIT ({get_settings().task_time_limit} s) and "
            "was stopped (a hung read or decoder, or an input too large for this limit)")


def _crash_message(deaths: int) -> str:
    return (f"the worker process died {deaths} times while processing this item (killed for using too much "
            "memory, or a crash in a native library); not tried again (TILESEG_ITEM_MAX_RESTARTS="
            f"{get_settings().item_max_restarts})")


def process_items(item_ids: Sequence[uuid.UUID]) -> Processed:
    """Process a batch of items of one job.

    Per-item problems (bad input, a model that cannot run on it) fail that item with a stored message;
    database and broker hiccups raise :class:`TransientError` so the task is retried. An item whose
    worker died more than ``TILESEG_ITEM_MAX_RESTARTS`` times is failed; a batch that lost its worker is
    split into single items (:attr:`Processed.isolate`).
    """
    from pipelines.registry import ModelNotFound, load

    with session_scope() as session:
        rows = session.scalars(select(Item).where(Item.id.in_(list(item_ids))).order_by(Item.seq)).all()
        if not rows:
            return Processed()
        job = session.get(Job, rows[0].job_id)
        job_id, pipeline, options = job.id, job.pipeline, dict(job.options or {})
        job_cancelled = job.status == JobStatus.cancelled
        todo = [(r.id, r.source, r.key, r.format, r.truth, dict(r.meta or {})) for r in rows]
    done_job = False
    isolate: list[uuid.UUID] = []
    if job_cancelled:
        return Processed()
    max_restarts = get_settings().item_max_restarts

    # Group by model so photos share model calls.
    by_model: dict[str | None, list[tuple]] = defaultdict(list)
    for t in todo:
        by_model[model_for_item(pipeline, t[3])].append(t)

    for model_name, group in by_model.items():
        started = []
        for t in group:
            with session_scope() as session:
                st = jobs.start_item(session, t[0])
            if st is None:
                continue
            if st.restarts > max_restarts:
                done_job |= _fail(t[0], job_id, _crash_message(st.restarts))
            elif st.restarts and len(todo) > 1:
                isolate.append(t[0])
            else:
                started.append(t)
        if not started:
            continue
        if model_name is None:
            for t in started:
                done_job |= _fail(t[0], job_id, f"no model given and no default model for {t[3]} inputs; "
                                  "name one with --pipeline (see `tileseg models`)")
            continue
        try:
            model = load(model_name)
        except ModelNotFound as exc:
            for t in started:
                done_job |= _fail(t[0], job_id, str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - e.g. hub model not downloadable: fail items, say why
            for t in started:
                done_job |= _fail(t[0], job_id, f"model {model_name!r} cannot be loaded: {exc}")
            continue
        started = [_with_fit_note(t, model.spec) for t in started]
        if model.spec.kind == "semantic" and model.spec.mode == "resize" and len(started) > 1:
            done_job |= _run_semantic_batch(job_id, started, model, options)
        else:
            for t in started:
                done_job |= _run_one(job_id, t, model, options)

    if isolate:
        with session_scope() as session:
            session.execute(update(Item).where(Item.id.in_(isolate), Item.status == ItemStatus.running)
                            .values(status=ItemStatus.pending))
    if not done_job:
        with session_scope() as session:
            done_job = jobs.job_complete(session, job_id)
    return Processed(done_job, isolate)


def model_fit_note(spec: Any, fmt: str | None) -> str | None:
    """A warning when a job's pipeline names a model made for another kind of input (None when it fits).

    "Made for" is the spec's ``default_for``; a model that is no kind's default (e.g. a user's) gets none.
    The item still runs, since the user asked for that model, but a CT window on a photo or a pets model
    on a CT slice gives results that mean little, and the item's record should say so.
    """
    if not spec.default_for or not fmt or fmt in spec.default_for:
        return None
    return (f"model {spec.name} was made for {' / '.join(spec.default_for)} inputs, this is a {fmt} input: "
            "read its results with care")


def _with_fit_note(t: tuple, spec: Any) -> tuple:
    note = model_fit_note(spec, t[3])
    if note is None:
        return t
    meta = dict(t[5])
    meta["warnings"] = [*meta.get("warnings", []), note]
    return (*t[:5], meta)


def _artifact_key(job_id: uuid.UUID, item_id: uuid.UUID, name: str) -> str:
    return f"jobs/{job_id}/{item_id}/{name}"


def _open_source(stack: ExitStack, source: str, fmt_name: str | None) -> tuple[Any, Any]:
    """``(format, source)`` for an input, opened through its adapter (URLs downloaded first); both are
    closed when ``stack`` closes."""
    local = stack.enter_context(fetch_input(source, get_settings().storage_options))
    fmt = get_format(fmt_name) if fmt_name else None
    if fmt is None:
        from adapters import detect

        fmt = detect(local)
    opened = fmt.open(local, max_pixels=get_settings().max_pixels)
    stack.callback(opened.close)
    return fmt, opened


def _item_of(source: Any, key: str) -> AdapterItem:
    """The item ``key`` names in an opened source; a row range (``@rows=a:b``) gives that part of it."""
    key, rows = split_key(key)
    item = source.item(key)
    return RegionItem(item, *rows) if rows else item


class _Opened:
    """An item opened through its adapter for the duration of processing (downloads URLs first)."""

    def __init__(self, source: str, key: str, fmt: str | None) -> None:
        self.source_path, self.key, self.fmt_name = source, key, fmt

    def __enter__(self) -> tuple[Any, AdapterItem]:
        self._stack = ExitStack()
        try:
            fmt, opened = _open_source(self._stack, self.source_path, self.fmt_name)
            return fmt, _item_of(opened, self.key)
        except BaseException:
            self._stack.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self._stack.__exit__(*exc)


def _upload(job_id: uuid.UUID, item_id: uuid.UUID, artifacts: Sequence[Any]) -> dict[str, Any]:
    st = store()
    out: dict[str, Any] = {}
    for a in artifacts:
        stored = st.put(Path(a.path), _artifact_key(job_id, item_id, Path(a.path).name), a.media_type)
        out[a.kind] = stored.to_json()
    return out


def _semantic_rows(job_id: uuid.UUID, item_id: uuid.UUID, result: Any, model: str) -> list[ClassMetric]:
    rows = []
    for f in result.figures:
        conf_sum = (f.mean_confidence or 0.0) * f.pixel_count
        sums: dict[str, Any] = {"confidence_sum": conf_sum, "valid_pixels": result.valid_pixels}
        rows.append(ClassMetric(job_id=job_id, item_id=item_id, model=model, class_id=f.class_id, class_name=f.name,
                                pixel_count=int(f.pixel_count), fraction=f.fraction,
                                mean_confidence=f.mean_confidence, area=f.area, area_unit=f.area_unit,
                                dice=f.dice, iou=f.iou, sums=sums))
    if result.confusion is not None:
        # The confusion matrix makes job-level Dice/IoU exact (sum matrices, not average scores).
        for r in rows:
            r.sums["confusion"] = result.confusion.tolist()
    return rows


def _record_success(job_id: uuid.UUID, item_id: uuid.UUID, artifacts: dict[str, Any], metric_rows: list,
                    instance_rows: list, meta: dict[str, Any]) -> bool:
    meta = {**meta, "processed_by": f"{socket.gethostname()}:{os.getpid()}"}
    with session_scope() as session:
        # Two deliveries of one task can race here (a task redelivered while its first worker still runs):
        # lock the item row so the second waits, then sees the item finished and leaves its rows alone.
        status = session.scalar(select(Item.status).where(Item.id == item_id).with_for_update())
        if status is None or ItemStatus(status) in TERMINAL_ITEM:
            return False
        # Idempotent: a re-run replaces this item's rows instead of adding duplicates.
        session.execute(delete(ClassMetric).where(ClassMetric.item_id == item_id))
        session.execute(delete(InstanceRow).where(InstanceRow.item_id == item_id))
        session.add_all(metric_rows)
        session.add_all(instance_rows)
        return jobs.finish_item(session, item_id, job_id, ItemStatus.succeeded, artifacts=artifacts, meta=meta)


def _handle_error(job_id: uuid.UUID, item_id: uuid.UUID, exc: BaseException) -> bool:
    if isinstance(exc, TRANSIENT) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
        # Put it back so the retried task picks it up.
        with session_scope() as session:
            session.execute(update(Item).where(Item.id == item_id, Item.status == ItemStatus.running)
                            .values(status=ItemStatus.pending))
        raise TransientError(str(exc)) from exc
    if isinstance(exc, AdapterError):
        return _fail(item_id, job_id, str(exc))
    if isinstance(exc, SoftTimeLimitExceeded):
        return _fail(item_id, job_id, _time_limit_message())
    log.error("item %s failed: %s", item_id, "".join(traceback.format_exception(exc)))
    return _fail(item_id, job_id, f"{type(exc).__name__}: {exc}")


def _run_one(job_id: uuid.UUID, t: tuple, model: Any, options: dict[str, Any]) -> bool:
    item_id, source, key, fmt_name, truth, meta = t
    try:
        with tempfile.TemporaryDirectory(prefix="tileseg-out-") as tmp, _Opened(source, key, fmt_name) as (fmt, item):
            out_dir = Path(tmp)
            meta = {**meta, "model": model.spec.name}
            if model.spec.kind == "semantic":
                from pipelines.semantic import segment_item

                gt = None
                if truth:
                    if isinstance(item, RegionItem):  # a part of a split raster: its rows of the truth
                        gt, told = truth_or_note(truth, options, key, model.spec, item.base.info,
                                                 (item.start, item.stop))
                    else:
                        gt, told = truth_or_note(truth, options, key, model.spec, item.info)
                    meta = with_truth_notes(meta, told)
                sink = fmt.semantic_sink(item, out_dir, model.spec.names_by_id(), model.spec.colors_by_id())
                if isinstance(item, RegionItem):
                    rows = (item.start, item.stop)
                    result = segment_item(item.base, model, sink, ground_truth=gt, rows=rows)
                elif model.spec.ground_resolution_m and item.info.crs_wkt:
                    # Georeferenced input at another ground resolution: resample to the model's, return the
                    # result on the input's own grid.
                    from pipelines.domains import segment_at_model_resolution

                    result, scale = segment_at_model_resolution(item, model, sink, ground_truth=gt)
                    if scale is not None:
                        note = (f"resampled x{scale:.3f} to the model's {model.spec.ground_resolution_m} m "
                                "ground resolution; outputs are on the input grid")
                        meta = {**meta, "warnings": [*meta.get("warnings", []), note]}
                else:
                    result = segment_item(item, model, sink, ground_truth=gt)
                artifacts = _upload(job_id, item_id, sink.close())
                rows = _semantic_rows(job_id, item_id, result, model.spec.name)
                return _record_success(job_id, item_id, artifacts, rows, [], meta)
            from pipelines.instances import detect_item, instance_figures

            spec = model.spec
            notes = [_instance_resolution_note(item, spec)]
            if truth:
                notes.append(f"ground truth {os.path.basename(truth)} is not scored: {spec.name} is an instance "
                             "model, scored by mask AP against instance annotations (tileseg eval --model "
                             f"{spec.name}); a semantic model scores class masks")
            if any(notes):
                meta = {**meta, "warnings": [*meta.get("warnings", []), *filter(None, notes)]}
            found = detect_item(item, model, tile=spec.input_size, overlap=spec.overlap,
                                score_threshold=float(options.get("score_threshold", spec.score_threshold)),
                                max_detections=int(options.get("max_detections", spec.max_detections)))
            arts = fmt.write_instances(item, found, out_dir, spec.names_by_id(), spec.colors_by_id())
            artifacts = _upload(job_id, item_id, arts)
            names = {c.id: c.name for c in spec.classes}
            px_area, unit = item.info.pixel_area, item.info.area_unit
            inst_rows = [InstanceRow(job_id=job_id, item_id=item_id, class_id=i.class_id,
                                     class_name=names.get(i.class_id, str(i.class_id)), score=float(i.score),
                                     box=list(i.box), rle=i.rle, area_px=int(i.area),
                                     area=(i.area * px_area if px_area else None), area_unit=unit)
                         for i in found]
            figs = instance_figures(found, names, px_area, unit)
            metric_rows = [ClassMetric(job_id=job_id, item_id=item_id, model=spec.name, class_id=f["class_id"],
                                       class_name=f["class_name"], pixel_count=int(f["area_px"]), fraction=None,
                                       area=f.get("area"), area_unit=f.get("area_unit"),
                                       instance_count=int(f["instance_count"]), mean_score=f.get("mean_score"),
                                       sums={"score_sum": (f.get("mean_score") or 0) * f["instance_count"]})
                           for f in figs]
            return _record_success(job_id, item_id, artifacts, metric_rows, inst_rows, meta)
    except TransientError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified in _handle_error
        return _handle_error(job_id, item_id, exc)


def _instance_resolution_note(item: Any, spec: Any) -> str | None:
    """A warning when a georeferenced item's ground resolution differs from an instance model's by > 25 %.

    Instance models run at the item's native pixels (masks and polygons stay exact on its grid); object
    sizes then differ from what the detector learned, which users should know when reading the results.
    """
    if not spec.ground_resolution_m or not item.info.crs_wkt:
        return None
    from pipelines.domains import ground_resolution_m

    res = ground_resolution_m(item.info)
    if res is None or abs(res / spec.ground_resolution_m - 1) <= 0.25:
        return None
    return (f"ground resolution {res:.2f} m differs from the {spec.ground_resolution_m} m model "
            f"{spec.name} was trained at; instance models run at the input's own pixels, so objects look "
            f"{spec.ground_resolution_m / res:.2f}x their trained size")


def _run_semantic_batch(job_id: uuid.UUID, batch: Sequence[tuple], model: Any, options: dict[str, Any]) -> bool:
    """Photos: open all, one batched model call per ``batch_size`` images, then write each one's outputs."""
    from pipelines.semantic import segment_items

    done_job = False
    with tempfile.TemporaryDirectory(prefix="tileseg-out-") as tmp, ExitStack() as stack:
        opened, sinks, truths, notes = [], [], [], []
        for t in batch:
            item_id, source, key, fmt_name, truth, _ = t
            try:
                fmt, item = stack.enter_context(_Opened(source, key, fmt_name))
                out_dir = Path(tmp) / str(item_id)
                out_dir.mkdir()
                sink = fmt.semantic_sink(item, out_dir, model.spec.names_by_id(), model.spec.colors_by_id())
                gt, told = truth_or_note(truth, options, key, model.spec, item.info) if truth else (None, {})
            except TransientError:
                raise
            except Exception as exc:  # noqa: BLE001
                done_job |= _handle_error(job_id, item_id, exc)
                continue
            opened.append((t, item))
            sinks.append(sink)
            truths.append(gt)
            notes.append(told)
        if not opened:
            return done_job
        try:
            results = segment_items([it for _, it in opened], model, sinks, ground_truths=truths)
        except SoftTimeLimitExceeded:
            # Out of time: which photo hung is unknown, and going one by one would overrun the hard limit.
            for t, _ in opened:
                done_job |= _fail(t[0], job_id, _time_limit_message())
            return done_job
        except Exception:  # noqa: BLE001 - one bad image must not fail its batch-mates: go one by one
            log.warning("batched prediction failed; retrying items one by one", exc_info=True)
            for t, _ in opened:
                done_job |= _run_one(job_id, t, model, options)
            return done_job
        for (t, _item), sink, result, told in zip(opened, sinks, results, notes, strict=True):
            item_id, meta = t[0], with_truth_notes({**t[5], "model": model.spec.name}, told)
            try:
                artifacts = _upload(job_id, item_id, sink.close())
                rows = _semantic_rows(job_id, item_id, result, model.spec.name)
                done_job |= _record_success(job_id, item_id, artifacts, rows, [], meta)
            except Exception as exc:  # noqa: BLE001
                done_job |= _handle_error(job_id, item_id, exc)
    return done_job


# Finalisation ---------------------------------------------------------------------------------------------
def _aggregate(session: Any, job_id: uuid.UUID) -> None:
    """Job-level per-class rows from the item rows, per model (a job may mix models with different
    classes): sums of counts and areas, exact Dice/IoU from summed confusion matrices, pixel-weighted mean
    confidence, fractions of the valid pixels of that model's items."""
    session.execute(delete(ClassMetric).where(ClassMetric.job_id == job_id, ClassMetric.item_id.is_(None)))
    rows = session.scalars(select(ClassMetric).where(ClassMetric.job_id == job_id,
                                                     ClassMetric.item_id.is_not(None))).all()
    by_model: dict[str | None, list[ClassMetric]] = defaultdict(list)
    for r in rows:
        by_model[r.model].append(r)
    for model in sorted(by_model, key=lambda m: m or ""):
        for row in _aggregate_model(job_id, model, by_model[model]):
            session.add(row)


def _aggregate_model(job_id: uuid.UUID, model: str | None, rows: Sequence[ClassMetric]) -> list[ClassMetric]:
    import numpy as np

    from pipelines.metrics import scores

    by_class: dict[tuple[int, str], list[ClassMetric]] = defaultdict(list)
    for r in rows:
        by_class[(r.class_id, r.class_name)].append(r)
    confusion = None
    seen_items: set[uuid.UUID] = set()
    valid_total = 0
    for r in rows:
        if r.item_id in seen_items:
            continue
        seen_items.add(r.item_id)
        valid_total += int(r.sums.get("valid_pixels", 0))
        if "confusion" in r.sums:
            m = np.asarray(r.sums["confusion"], dtype=np.int64)
            confusion = m if confusion is None or confusion.shape != m.shape else confusion + m
    per_class = scores(confusion)["per_class"] if confusion is not None else None
    out = []
    for (cid, name), group in sorted(by_class.items()):
        pixels = sum(r.pixel_count for r in group)
        conf_sum = sum(float(r.sums.get("confidence_sum", 0.0)) for r in group)
        counts = [r.instance_count for r in group if r.instance_count is not None]
        score_sum = sum(float(r.sums.get("score_sum", 0.0)) for r in group)
        areas = [r.area for r in group if r.area is not None]
        units = {r.area_unit for r in group if r.area_unit}
        n_inst = sum(counts) if counts else None
        dice = iou = None
        if per_class is not None and cid < len(per_class):
            dice, iou = per_class[cid]["dice"], per_class[cid]["iou"]
        out.append(ClassMetric(
            job_id=job_id, item_id=None, model=model, class_id=cid, class_name=name, pixel_count=pixels,
            fraction=(pixels / valid_total) if valid_total and not counts else None,
            mean_confidence=(conf_sum / pixels) if pixels and not counts else None,
            # Areas are only summed when every item has the same physical unit.
            area=sum(areas) if areas and len(units) == 1 and len(areas) == len(group) else None,
            area_unit=units.pop() if len(units) == 1 else None,
            dice=dice, iou=iou, instance_count=n_inst,
            mean_score=(score_sum / n_inst) if n_inst else None,
            sums={"confidence_sum": conf_sum, "valid_pixels": valid_total,
                  **({"confusion": confusion.tolist()} if confusion is not None else {})},
        ))
    return out


def _finalize_groups(session: Any, job_id: uuid.UUID) -> None:
    """Outputs spanning several items (one DICOM SEG per series, the mosaic of a split raster), attached to
    the group's first item. A split raster is mosaicked only when every part succeeded."""
    items = session.scalars(select(Item).where(Item.job_id == job_id, Item.group.is_not(None))
                            .order_by(Item.seq)).all()
    groups: dict[tuple[str, str], list[Item]] = defaultdict(list)
    for it in items:
        groups[(it.format or "", it.group)].append(it)
    st = store()
    from pipelines.registry import get_spec

    for (fmt_name, group), everyone in groups.items():
        members = [m for m in everyone if m.status == ItemStatus.succeeded]
        if not members:
            continue
        if group.startswith("parts:") and len(members) < len(everyone):
            job = session.get(Job, job_id)
            note = f"{Path(members[0].source).name}: {len(everyone) - len(members)} part(s) failed, no mosaic"
            job.error = ((job.error or "") + "\n" + note).strip()
            continue
        fmt = get_format(fmt_name)
        if type(fmt).finalize_group is Format.finalize_group:  # nothing group-wide to write: skip the I/O
            continue
        try:
            spec = get_spec(members[0].meta.get("model"))
            with tempfile.TemporaryDirectory(prefix="tileseg-grp-") as tmp, _OpenedMany(members) as opened:
                mask_files = []
                for m in members:
                    art = m.artifacts.get("mask_png") or m.artifacts.get("class_raster")
                    dest = Path(tmp) / f"{m.seq:06d}-{Path(art['uri']).name}"
                    with st.open(art["uri"]) as src, open(dest, "wb") as out:
                        out.write(src.read())
                    mask_files.append(dest)
                out_dir = Path(tmp) / "out"
                out_dir.mkdir()
                arts = fmt.finalize_group(opened, mask_files, out_dir, spec.names_by_id(), spec.colors_by_id())
                stored = _upload(job_id, members[0].id, arts)
            first = members[0]
            first.artifacts = {**first.artifacts, **stored}
        except Exception as exc:  # noqa: BLE001 - the per-item results stay; the job records the problem
            log.exception("group output failed for job %s", job_id)
            job = session.get(Job, job_id)
            job.error = ((job.error or "") + f"\ngroup output failed: {exc}").strip()


class _OpenedMany:
    """The items of a group, each input opened once (the pages of a stack share one open file)."""

    def __init__(self, members: Sequence[Item]) -> None:
        self.members = members

    def __enter__(self) -> list[AdapterItem]:
        self._stack = ExitStack()
        sources: dict[tuple[str, str | None], Any] = {}
        items = []
        for m in self.members:
            if (m.source, m.format) not in sources:
                sources[m.source, m.format] = _open_source(self._stack, m.source, m.format)[1]
            items.append(_item_of(sources[m.source, m.format], m.key))
        return items

    def __exit__(self, *exc: object) -> None:
        self._stack.__exit__(*exc)


def finalize_job(job_id: uuid.UUID) -> str | None:
    """Aggregate metrics, write group outputs and set the final status. Idempotent."""
    with session_scope() as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or not job.planned or job.items_done < job.items_total:
            return None
        if job.finished_at is not None and JobStatus(job.status) != JobStatus.cancelled:
            return job.status
        _finalize_groups(session, job_id)
        _aggregate(session, job_id)
        if job.status != JobStatus.cancelled:
            ok = job.items_total - job.items_failed
            if job.items_total == 0 or ok == 0:
                job.status = JobStatus.failed
                job.error = job.error or ("no inputs found" if job.items_total == 0 else "every item failed")
            elif job.items_failed:
                job.status = JobStatus.partial
            else:
                job.status = JobStatus.succeeded
        job.finished_at = job.finished_at or utcnow()
        return job.status


def give_up(item_ids: Sequence[str | uuid.UUID], message: str) -> None:
    """Fail items whose task exhausted its retries, so the job ends instead of staying `running`."""
    last_job = None
    for raw in item_ids:
        item_id = uuid.UUID(str(raw))
        with session_scope() as session:
            it = session.get(Item, item_id)
            if it is None:
                continue
            if jobs.finish_item(session, item_id, it.job_id, ItemStatus.failed, error=message):
                last_job = it.job_id
    if last_job is not None:
        finalize_job(last_job)
