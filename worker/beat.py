"""Scheduled processing on Celery: one periodic tick, sent by ONE ``tileseg beat`` process, run by any worker.

The tick asks :func:`core.schedules.run_due` for the due slots and carries each out exactly once (a run row
keyed by schedule and slot, unique in the database, so ticks that overlap or a second beat cannot double it).
Ticks expire after one interval: a worker that was busy or down for hours runs one tick when it is back, not
the whole backlog, and that tick catches each schedule up once.

``TILESEG_SCHEDULE_TICK_SECONDS`` (default 30) sets the interval; schedules are never more precise than it.
"""

from __future__ import annotations

import logging
import os

from celery import Celery

from worker.app import app

__all__ = ["TICK_TASK", "install_beat_schedule", "schedule_tick", "tick_seconds"]

log = logging.getLogger(__name__)

TICK_TASK = "tileseg.schedule_tick"
DEFAULT_TICK_SECONDS = 30.0


def tick_seconds() -> float:
    """The tick interval in seconds from ``TILESEG_SCHEDULE_TICK_SECONDS`` (default 30, at least 0.5)."""
    raw = os.environ.get("TILESEG_SCHEDULE_TICK_SECONDS", "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_TICK_SECONDS
    except ValueError:
        log.warning("TILESEG_SCHEDULE_TICK_SECONDS=%r is not a number; using %s", raw, DEFAULT_TICK_SECONDS)
        value = DEFAULT_TICK_SECONDS
    return max(value, 0.5)


def install_beat_schedule(celery_app: Celery = app, seconds: float | None = None) -> dict:
    """Put the tick on ``celery_app``'s beat schedule; returns the entry."""
    every = seconds if seconds is not None else tick_seconds()
    entry = {
        "task": TICK_TASK,
        "schedule": every,
        # A tick nobody ran within its interval is worthless: the next one does the same job.
        "options": {"expires": max(every, 1.0)},
    }
    celery_app.conf.beat_schedule = {**(celery_app.conf.beat_schedule or {}), "tileseg-schedules": entry}
    return entry


@app.task(name=TICK_TASK, ignore_result=True)
def schedule_tick() -> int:
    """Carry out every due schedule run; returns how many runs this tick carried out."""
    from core.schedules import run_due

    done = run_due()
    if done:
        log.info("scheduler tick carried out %d run(s)", len(done))
    return len(done)


install_beat_schedule()
