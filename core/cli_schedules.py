"""``tileseg schedule ...`` (create, list, pause, resume, delete, trigger, runs) and ``tileseg beat``.

Registered on the ``tileseg`` group by :mod:`core.cli` through ``COMMANDS``.
"""

from __future__ import annotations

import json
from typing import Any

import click

from core.settings import get_settings

__all__ = ["COMMANDS", "beat_command", "schedule_group"]


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _schedule_json(row: Any) -> dict[str, Any]:
    from core.schedules import next_run_at

    return {
        "id": str(row.id),
        "name": row.name,
        "owner": row.owner,
        "cron": row.cron,
        "timezone": row.timezone,
        "location": row.location,
        "pipeline": row.pipeline,
        "options": row.options or {},
        "enabled": row.enabled,
        "settle_seconds": row.settle_seconds,
        "created_at": row.created_at,
        "last_run_for": row.last_run_for,
        "last_success_at": row.last_success_at,
        "next_run_at": next_run_at(row),
    }


def _run_json(run: Any, job_status: str | None) -> dict[str, Any]:
    return {
        "id": str(run.id),
        "schedule_id": str(run.schedule_id),
        "scheduled_for": run.scheduled_for,
        "started_at": run.started_at,
        "outcome": run.outcome,
        "job_id": str(run.job_id) if run.job_id else None,
        "job_status": job_status,
        "new_files": run.new_files,
        "message": run.message,
    }


def _find(session: Any, ref: str) -> Any:
    from core.schedules import ScheduleError, resolve_schedule

    try:
        row = resolve_schedule(session, ref)
    except ScheduleError as exc:
        raise click.ClickException(str(exc)) from exc
    if row is None:
        raise click.ClickException(f"no schedule {ref!r}")
    return row


@click.group("schedule")
def schedule_group() -> None:
    """Recurring jobs over a watched folder (run by `tileseg beat` and the workers)."""


@schedule_group.command("create")
@click.argument("name")
@click.argument("location")
@click.option(
    "--cron",
    required=True,
    help="crontab expression, e.g. '0 2 * * *' (02:00 daily); six fields = seconds first",
)
@click.option("--tz", "timezone", default="UTC", show_default=True, help="IANA time zone the cron is read in")
@click.option("--pipeline", "-p", default="auto", show_default=True, help="model name or 'auto'")
@click.option(
    "--settle",
    "settle_seconds",
    type=click.IntRange(min=0),
    default=300,
    show_default=True,
    help="a DICOM series is taken once no file in it changed for this many seconds",
)
@click.option("--score-threshold", type=float, help="instance models: minimum score")
@click.option("--owner", default=None, help="owner of the schedule and its jobs (as for API tokens)")
@click.option("--paused", is_flag=True, help="create it paused")
@click.option("--json", "as_json", is_flag=True)
def create(
    name: str,
    location: str,
    cron: str,
    timezone: str,
    pipeline: str,
    settle_seconds: int,
    score_threshold: float | None,
    owner: str | None,
    paused: bool,
    as_json: bool,
) -> None:
    """Create schedule NAME over LOCATION (a folder or a quoted glob)."""
    from core.cli import ensure_schema
    from core.db import session_scope
    from core.schedules import ScheduleError, create_schedule

    ensure_schema()
    opts = {"score_threshold": score_threshold} if score_threshold is not None else {}
    try:
        with session_scope() as session:
            row = create_schedule(
                session,
                name=name,
                cron=cron,
                location=location,
                owner=owner,
                timezone=timezone,
                pipeline=pipeline,
                options=opts,
                settle_seconds=settle_seconds,
                enabled=not paused,
                roots=get_settings().input_roots,
                require_roots=False,
            )
            out = _schedule_json(row)
    except ScheduleError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        _echo_json(out)
    else:
        click.echo(out["id"])


@schedule_group.command("list")
@click.option("--owner", default=None, help="only this owner's schedules")
@click.option("--json", "as_json", is_flag=True)
def list_(owner: str | None, as_json: bool) -> None:
    """List schedules with their next run."""
    from core.cli import ensure_schema
    from core.db import session_scope
    from core.schedules import list_schedules

    ensure_schema()
    with session_scope() as session:
        rows = [_schedule_json(r) for r in list_schedules(session, owner)]
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        nxt = f"{r['next_run_at']:%Y-%m-%d %H:%M:%S}Z" if r["next_run_at"] else "paused"
        click.echo(
            f"{r['id']}  {r['name']:<20} {r['cron']:<16} {r['timezone']:<16} next {nxt:<21} {r['location']}"
        )


def _toggle(ref: str, enabled: bool) -> None:
    from core.db import session_scope
    from core.schedules import set_enabled

    with session_scope() as session:
        row = set_enabled(session, _find(session, ref), enabled)
        click.echo(f"{row.name}: {'enabled' if row.enabled else 'paused'}")


@schedule_group.command("pause")
@click.argument("ref")
def pause(ref: str) -> None:
    """Pause schedule REF (ID or name)."""
    _toggle(ref, False)


@schedule_group.command("resume")
@click.argument("ref")
def resume(ref: str) -> None:
    """Resume schedule REF; slots missed while paused are not replayed."""
    _toggle(ref, True)


@schedule_group.command("delete")
@click.argument("ref")
def delete(ref: str) -> None:
    """Delete schedule REF with its run history (its jobs and results stay)."""
    from core.db import session_scope
    from core.schedules import delete_schedule

    with session_scope() as session:
        row = _find(session, ref)
        name = row.name
        delete_schedule(session, row)
    click.echo(f"deleted {name}")


@schedule_group.command("trigger")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
def trigger_(ref: str, as_json: bool) -> None:
    """Run schedule REF now: submit one job with whatever is new (workers process it)."""
    from core.cli import ensure_schema
    from core.db import session_scope
    from core.schedules import ScheduleError, trigger

    ensure_schema()
    with session_scope() as session:
        sid = _find(session, ref).id
    try:
        run = trigger(sid)
    except ScheduleError as exc:
        raise click.ClickException(str(exc)) from exc
    out = _run_json(run, None)
    if as_json:
        _echo_json(out)
        return
    job = f" job {out['job_id']}" if out["job_id"] else ""
    click.echo(
        f"{out['outcome']}: {out['new_files']} new input(s){job}"
        + (f" ({out['message']})" if out["message"] else "")
    )


@schedule_group.command("runs")
@click.argument("ref")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def runs(ref: str, limit: int, as_json: bool) -> None:
    """The latest runs of schedule REF: outcome, job and job status."""
    from core.db import session_scope
    from core.schedules import list_runs

    with session_scope() as session:
        rows, total = list_runs(session, _find(session, ref).id, limit=limit)
        out = [_run_json(r, s) for r, s in rows]
    if as_json:
        _echo_json({"total": total, "runs": out})
        return
    for r in out:
        click.echo(
            f"{r['scheduled_for']:%Y-%m-%d %H:%M:%S}Z  {r['outcome']:<12} {r['new_files']:>5} new  "
            f"{r['job_id'] or '-':<36} {r['job_status'] or '-':<10} {r['message'] or ''}"
        )


@click.command("beat")
@click.option(
    "--tick",
    type=float,
    default=None,
    help="seconds between scheduler ticks (default: TILESEG_SCHEDULE_TICK_SECONDS or 30)",
)
@click.option("--loglevel", "-l", default="INFO", show_default=True)
def beat_command(tick: float | None, loglevel: str) -> None:
    """Run Celery beat: sends the scheduler tick that workers turn into scheduled runs. Run exactly one
    (a second one is harmless: a run is unique per schedule and slot, but it doubles the ticks)."""
    from core.cli import ensure_schema

    ensure_schema()
    from worker.app import app
    from worker.beat import install_beat_schedule

    entry = install_beat_schedule(app, tick)
    click.echo(f"tileseg beat: scheduler tick every {entry['schedule']:g} s", err=True)
    # The in-memory scheduler: the tick needs no state between restarts (runs are recorded in the database).
    app.Beat(
        loglevel=loglevel, scheduler="celery.beat:Scheduler", max_interval=max(entry["schedule"], 1)
    ).run()


COMMANDS = [schedule_group, beat_command]
