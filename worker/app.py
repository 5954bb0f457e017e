"""The Celery application, configured from tileseg's settings.

Reliability settings (see docs/reliability.md): tasks are acknowledged after they finish (acks_late) and
requeued when a worker process dies (reject_on_worker_lost), each worker process takes one task at a time
(prefetch 1), and children are recycled after N tasks or when they exceed a memory cap. TensorFlow is only
imported inside tasks, i.e. in the forked child, never in the parent.
"""

from __future__ import annotations

import importlib.util
import logging

from celery import Celery
from celery.signals import worker_process_init, worker_ready

from core.settings import get_settings

app = Celery("tileseg", include=["worker.tasks"])
if importlib.util.find_spec("worker.beat") is not None:
    # Scheduled processing (beat) tasks live in their own module.
    app.conf.include = [*app.conf.include, "worker.beat"]


def configure(app: Celery = app) -> Celery:
    """(Re)apply settings to the app; call after changing TILESEG_* variables in-process."""
    s = get_settings()
    if s.embedded_queue:
        s.ensure_dirs()
    if app.conf.get("broker_url") not in (None, s.queue_url):
        # Pooled connections and producers still point at the old broker: drop them.
        app.close()
        if "amqp" in app.__dict__:
            app.amqp._producer_pool = None
    app.conf.update(
        broker_url=s.queue_url,
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=s.worker_max_tasks_per_child,
        worker_max_memory_per_child=s.worker_max_memory_per_child_kb,
        worker_concurrency=s.worker_concurrency,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # A task running when the broker connection drops finishes its item (its writes are idempotent and
        # the redelivered copy skips finished items) instead of being cancelled and redone from scratch.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # kombu's SQLAlchemy transport passes its options to create_engine, so only Redis gets these.
        broker_transport_options={} if s.embedded_queue else {
            "visibility_timeout": s.visibility_timeout,
            # kombu scans for expired unacked messages only every interval * throttle seconds (100 s by
            # default); tie it to the visibility timeout so a dead worker's task comes back promptly.
            "unacked_restore_interval": max(1, min(10, s.visibility_timeout // 2)),
            "unacked_restore_throttle": 1,
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            "health_check_interval": 10,
        },
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 20, "interval_start": 0.2, "interval_step": 0.5,
                                   "interval_max": 3},
        # Only item processing is bounded: planning a huge job or mosaicking a split raster may take long.
        task_annotations={"tileseg.process_items": {"soft_time_limit": s.task_time_limit,
                                                    "time_limit": s.task_time_limit + 120}},
        task_default_queue="tileseg",
        task_serializer="json",
        accept_content=["json"],
        timezone="UTC",
        enable_utc=True,
    )
    return app


configure()


@worker_process_init.connect
def _after_fork(**_: object) -> None:
    # Connections inherited from the parent must not be shared with the child. Drop them without closing:
    # closing would send a terminate message on sockets the parent (recovery sweeper) still uses.
    from core import db

    if db.engine.cache_info().currsize:
        db.engine().dispose(close=False)
    db.reset_engine()


@worker_ready.connect
def _start_recovery(sender: object = None, **_: object) -> None:
    # In the worker's main process: re-enqueue jobs whose messages the broker lost (see worker.recovery).
    # It runs on the worker's own event-loop timer, not in a thread: prefork forks new children from this
    # process (recycling), and a fork while another thread holds a lock (logging, the DB pool) leaves the
    # child deadlocked before it runs its first task.
    from worker.recovery import recover_stalled_jobs, start_sweeper

    vt = get_settings().visibility_timeout
    interval, stall_after = max(1.0, min(60.0, vt / 2)), float(vt)
    timer = getattr(sender, "timer", None)
    if timer is None or not hasattr(timer, "call_repeatedly"):
        start_sweeper(interval=interval, stall_after=stall_after)
        return

    def sweep() -> None:
        try:
            recover_stalled_jobs(stall_after)
        except Exception:  # noqa: BLE001 - the next round tries again; never kill the worker
            logging.getLogger("worker.recovery").warning("recovery sweep failed", exc_info=True)

    timer.call_repeatedly(interval, sweep)

    def clean_parts() -> None:
        from core.store import ArtifactStore

        s = get_settings()
        try:
            n = ArtifactStore(s.artifacts, s.storage_options).remove_stale_parts(max(3600.0, float(vt)))
            if n:
                logging.getLogger("worker.recovery").warning("removed %d stale .part files from the store", n)
        except Exception:  # noqa: BLE001 - housekeeping must never kill the worker
            logging.getLogger("worker.recovery").warning("stale part cleanup failed", exc_info=True)

    # Temp files of copies interrupted by a crash: once at start, then hourly.
    timer.call_after(5.0, clean_parts)
    timer.call_repeatedly(3600.0, clean_parts)
