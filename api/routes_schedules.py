"""Schedules over HTTP: create, list, change, pause, resume, delete, trigger now, list runs.

Same access rules as jobs: a caller sees and changes only their own schedules (admins: all); unknown and
foreign IDs both answer 404. Bad cron expressions, time zones and locations answer 422 with a readable
message.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from api.auth import CurrentPrincipal
from api.schemas import MAX_OFFSET, JobOptions, Page, UtcDatetime
from core import schedules
from core.db import session_scope
from core.models import Job, Schedule, ScheduleRun
from core.settings import get_settings
from core.tokens import Principal

router = APIRouter(prefix="/schedules", tags=["schedules"])


#: Five or six fields, or an ``@alias``. Published in the schema only, so clients see the shape; requests are
#: checked by core.schedules.normalize_cron, whose 422 says how many fields were given and which are wanted.
CRON_SHAPE = r"^\s*(@[A-Za-z]+|\S+(\s+\S+){4,5})\s*$"


class ScheduleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    cron: str = Field(
        min_length=1,
        max_length=128,
        json_schema_extra={"pattern": CRON_SHAPE},
        description="crontab expression read in `timezone`, e.g. '0 2 * * *'; six fields = seconds first, or an "
        "alias such as '@daily'",
    )
    timezone: str = Field(default="UTC", max_length=64, description="IANA time zone name")
    location: str = Field(min_length=1, max_length=4096, description="folder or glob under the input roots")
    pipeline: str = Field(default="auto", max_length=64)
    options: JobOptions = JobOptions()
    settle_seconds: int = Field(
        default=300,
        ge=0,
        le=7 * 24 * 3600,
        description="a DICOM series is taken once unchanged for this long",
    )
    enabled: bool = True


class ScheduleChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=128)
    cron: str | None = Field(default=None, min_length=1, max_length=128,
                             json_schema_extra={"pattern": CRON_SHAPE})
    timezone: str | None = Field(default=None, max_length=64)
    location: str | None = Field(default=None, min_length=1, max_length=4096)
    pipeline: str | None = Field(default=None, max_length=64)
    options: JobOptions | None = None
    settle_seconds: int | None = Field(default=None, ge=0, le=7 * 24 * 3600)


class ScheduleOut(BaseModel):
    id: uuid.UUID
    name: str
    owner: str | None
    cron: str
    timezone: str
    location: str
    pipeline: str
    options: dict[str, Any]
    enabled: bool
    settle_seconds: int
    created_at: UtcDatetime
    last_run_for: UtcDatetime | None
    last_success_at: UtcDatetime | None
    next_run_at: UtcDatetime | None

    @classmethod
    def of(cls, s: Schedule) -> ScheduleOut:
        return cls(
            id=s.id,
            name=s.name,
            owner=s.owner,
            cron=s.cron,
            timezone=s.timezone,
            location=s.location,
            pipeline=s.pipeline,
            options=s.options or {},
            enabled=s.enabled,
            settle_seconds=s.settle_seconds,
            created_at=s.created_at,
            last_run_for=s.last_run_for,
            last_success_at=s.last_success_at,
            next_run_at=schedules.next_run_at(s),
        )


class RunOut(BaseModel):
    id: uuid.UUID
    schedule_id: uuid.UUID
    scheduled_for: UtcDatetime
    started_at: UtcDatetime
    outcome: str = Field(description="running | enqueuing | submitted | nothing_new | failed")
    job_id: uuid.UUID | None
    job_status: str | None
    new_files: int
    message: str | None

    @classmethod
    def of(cls, r: ScheduleRun, job_status: str | None) -> RunOut:
        return cls(
            id=r.id,
            schedule_id=r.schedule_id,
            scheduled_for=r.scheduled_for,
            started_at=r.started_at,
            outcome=r.outcome,
            job_id=r.job_id,
            job_status=job_status,
            new_files=r.new_files,
            message=r.message,
        )


class RunList(Page):
    runs: list[RunOut]


def _or_404(session: Any, schedule_id: uuid.UUID, who: Principal) -> Schedule:
    row = schedules.get_schedule(session, schedule_id, who.scope)
    if row is None:
        raise HTTPException(404, f"schedule {schedule_id} not found")
    return row


@router.post("", status_code=201, response_model=ScheduleOut)
def create(body: ScheduleIn, who: CurrentPrincipal, response: Response) -> ScheduleOut:
    """Create a schedule owned by the caller; its runs submit ordinary jobs owned by the caller."""
    try:
        with session_scope() as session:
            row = schedules.create_schedule(
                session,
                name=body.name,
                cron=body.cron,
                location=body.location,
                owner=who.owner,
                timezone=body.timezone,
                pipeline=body.pipeline,
                options=body.options.model_dump(exclude_none=True),
                settle_seconds=body.settle_seconds,
                enabled=body.enabled,
                roots=get_settings().input_roots,
            )
            out = ScheduleOut.of(row)
    except schedules.ScheduleError as exc:
        raise HTTPException(409 if str(exc).startswith("name: a schedule") else 422, str(exc)) from exc
    response.headers["Location"] = f"/schedules/{out.id}"
    return out


@router.get("", response_model=list[ScheduleOut])
def list_all(who: CurrentPrincipal) -> list[ScheduleOut]:
    with session_scope() as session:
        return [ScheduleOut.of(s) for s in schedules.list_schedules(session, who.scope)]


@router.get("/{schedule_id}", response_model=ScheduleOut)
def get_one(schedule_id: uuid.UUID, who: CurrentPrincipal) -> ScheduleOut:
    with session_scope() as session:
        return ScheduleOut.of(_or_404(session, schedule_id, who))


@router.patch("/{schedule_id}", response_model=ScheduleOut)
def change(schedule_id: uuid.UUID, body: ScheduleChange, who: CurrentPrincipal) -> ScheduleOut:
    """Change fields; a new cron or time zone starts from now (no catch-up under the new timetable)."""
    changes = body.model_dump(exclude_unset=True)
    if "options" in changes and body.options is not None:
        changes["options"] = body.options.model_dump(exclude_none=True)
    changes = {k: v for k, v in changes.items() if v is not None}
    try:
        with session_scope() as session:
            row = schedules.update_schedule(
                session, _or_404(session, schedule_id, who), roots=get_settings().input_roots, **changes
            )
            return ScheduleOut.of(row)
    except schedules.ScheduleError as exc:
        raise HTTPException(409 if str(exc).startswith("name: a schedule") else 422, str(exc)) from exc


@router.delete("/{schedule_id}", status_code=204)
def delete(schedule_id: uuid.UUID, who: CurrentPrincipal) -> Response:
    """Delete the schedule and its run history; jobs it submitted and their results are kept."""
    with session_scope() as session:
        schedules.delete_schedule(session, _or_404(session, schedule_id, who))
    return Response(status_code=204)


@router.post("/{schedule_id}/pause", response_model=ScheduleOut)
def pause(schedule_id: uuid.UUID, who: CurrentPrincipal) -> ScheduleOut:
    with session_scope() as session:
        return ScheduleOut.of(schedules.set_enabled(session, _or_404(session, schedule_id, who), False))


@router.post("/{schedule_id}/resume", response_model=ScheduleOut)
def resume(schedule_id: uuid.UUID, who: CurrentPrincipal) -> ScheduleOut:
    """Resume; slots missed while paused are not replayed (the next slot takes what arrived meanwhile)."""
    with session_scope() as session:
        return ScheduleOut.of(schedules.set_enabled(session, _or_404(session, schedule_id, who), True))


@router.post("/{schedule_id}/trigger", status_code=201, response_model=RunOut)
def trigger(schedule_id: uuid.UUID, who: CurrentPrincipal) -> RunOut:
    """Run now, outside the timetable: scans the location and submits one job with what is new
    (outcome ``submitted``), or records ``nothing_new``. Follow the job at ``/jobs/{job_id}``."""
    with session_scope() as session:
        _or_404(session, schedule_id, who)
    try:
        run = schedules.trigger(schedule_id)
    except schedules.ScheduleError as exc:
        raise HTTPException(409, str(exc)) from exc
    with session_scope() as session:
        job = session.get(Job, run.job_id) if run.job_id else None
        return RunOut.of(run, job.status if job else None)


@router.get("/{schedule_id}/runs", response_model=RunList)
def runs(
    schedule_id: uuid.UUID,
    who: CurrentPrincipal,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> RunList:
    """The schedule's runs, newest first, with outcome and the status of the job each submitted."""
    with session_scope() as session:
        _or_404(session, schedule_id, who)
        rows, total = schedules.list_runs(session, schedule_id, limit=limit, offset=offset)
        return RunList(total=total, limit=limit, offset=offset, runs=[RunOut.of(r, s) for r, s in rows])
