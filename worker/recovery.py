"""Recovery of jobs whose queue messages were lost (a broker restarted without persistence, a publish that
failed while the broker was down): re-enqueue ``plan_job`` for jobs that are not finished, have made no
progress for a while, while the queue is empty.

Re-planning is safe because every task is idempotent: ``plan_job`` on a planned job just enqueues its
unfinished items again (or finalisation when none is left), a redelivered item that already finished is
skipped, and results are written under deterministic keys. Worst case of a false alarm is an item computed
twice, never counted twice.

Each ``tileseg worker`` runs :func:`recover_stalled_jobs` every ``visibility_timeout / 2`` seconds (at most
60 s) in a thread of its main process (see ``worker.app``); "no progress" means no item of the job started
or finished within ``visibility_timeout`` seconds, the same bound Redis already uses to redeliver a task
whose worker died, so the deployment rule "tasks are shorter than the visibility timeout" covers both.
"""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import datetime, timedelta

from sqlalchemy import func, select

from core.db import session_scope
from core.models import Item, Job, JobStatus, utcnow

log = logging.getLogger(__name__)

__all__ = ["queue_size", "recover_stalled_jobs", "stalled_jobs", "start_sweeper"]


def _aware(t: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes for timezone columns; they are stored in UTC.
    if t is not None and t.tzinfo is None:
        from datetime import UTC

        return t.replace(tzinfo=UTC)
    return t


def stalled_jobs(stall_after: float, now: datetime | None = None) -> list[uuid.UUID]:
    """IDs of unfinished jobs (queued or running) with no activity for ``stall_after`` seconds.

    Activity is the job's creation or start, or any of its items starting or finishing.
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=stall_after)
    out: list[uuid.UUID] = []
    with session_scope() as session:
        jobs_ = session.execute(
            select(Job.id, Job.created_at, Job.started_at)
            .where(Job.status.in_([JobStatus.queued, JobStatus.running]), Job.created_at < cutoff)
        ).all()
        for job_id, created, started in jobs_:
            last_start, last_finish = session.execute(
                select(func.max(Item.started_at), func.max(Item.finished_at)).where(Item.job_id == job_id)
            ).one()
            times = [_aware(t) for t in (created, started, last_start, last_finish) if t is not None]
            if max(times) < cutoff:
                out.append(job_id)
    return out


def queue_size(queue: str = "tileseg") -> int:
    """Messages waiting in the broker queue (not counting ones delivered and unacknowledged)."""
    from worker.app import app

    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=5)
        # Not a passive declare: Redis has no empty queues (an empty list is no key), and a broker restarted
        # without persistence has also forgotten the exchange binding that routes our publishes.
        q = app.amqp.queues[queue].bind(conn.default_channel)
        q.declare()
        _, count, _ = q.queue_declare(passive=False)
        return int(count)


def recover_stalled_jobs(stall_after: float, *, require_empty_queue: bool = True) -> list[uuid.UUID]:
    """Re-enqueue planning for stalled jobs; returns their IDs.

    With ``require_empty_queue`` nothing happens while messages are waiting: a backlog means the workers
    are busy, not that messages were lost, and repeated sweeps must not pile up duplicates.
    """
    from worker.tasks import plan_job

    stalled = stalled_jobs(stall_after)
    if not stalled:
        return []
    if require_empty_queue and queue_size() > 0:
        return []
    for job_id in stalled:
        log.warning("job %s made no progress for %.0f s with an empty queue: re-enqueueing it", job_id,
                    stall_after)
        plan_job.delay(str(job_id))
    return stalled


def start_sweeper(interval: float, stall_after: float) -> threading.Event:
    """Run :func:`recover_stalled_jobs` every ``interval`` seconds in a daemon thread; set the returned
    event to stop it. Errors (database or broker down) are logged and retried next round."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            try:
                recover_stalled_jobs(stall_after)
            except Exception:  # noqa: BLE001 - the next round tries again; never kill the worker
                log.warning("recovery sweep failed", exc_info=True)

    threading.Thread(target=loop, name="tileseg-recovery", daemon=True).start()
    return stop
