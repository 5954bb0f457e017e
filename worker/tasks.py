"""Celery tasks: thin wrappers over worker.processing, each a function of row IDs that is safe to run twice.

plan_job -> process_items (one per item, photos batched) -> finalize_job (enqueued by whichever task
finishes the last item: an atomic counter in the database, no polling loop, no chord state in the broker).
"""

from __future__ import annotations

import logging
import uuid

from worker import processing
from worker.app import app

log = logging.getLogger(__name__)

_RETRY = {"autoretry_for": (processing.TransientError,), "retry_backoff": 2, "retry_backoff_max": 60,
          "retry_jitter": True}


def _max_retries() -> int:
    from core.settings import get_settings

    return get_settings().task_max_retries


@app.task(name="tileseg.plan_job", bind=True, max_retries=None, **_RETRY)
def plan_job(self, job_id: str) -> int:  # noqa: ANN001
    """Expand inputs into items and enqueue them. Returns the number of tasks enqueued."""
    try:
        batches = processing.plan_job(uuid.UUID(job_id))
    except processing.TRANSIENT as exc:
        raise processing.TransientError(str(exc)) from exc
    for batch in batches:
        process_items.delay([str(i) for i in batch])
    if not batches:
        finalize_job.delay(job_id)
    return len(batches)


@app.task(name="tileseg.process_items", bind=True, max_retries=None, **_RETRY)
def process_items(self, item_ids: list[str]) -> None:  # noqa: ANN001
    if self.request.retries > _max_retries():
        log.error("giving up on items %s after %d retries", item_ids, self.request.retries)
        processing.give_up(item_ids, f"gave up after {self.request.retries} retries of transient errors")
        return
    try:
        done = processing.process_items([uuid.UUID(i) for i in item_ids])
    except processing.TRANSIENT as exc:
        raise processing.TransientError(str(exc)) from exc
    for item_id in done.isolate:
        log.warning("item %s was in a batch whose worker died; it runs alone now", item_id)
        process_items.delay([str(item_id)])
    if done.last:
        from core.db import session_scope
        from core.models import Item

        with session_scope() as session:
            job_id = session.get(Item, uuid.UUID(item_ids[0])).job_id
        finalize_job.delay(str(job_id))


@app.task(name="tileseg.finalize_job", bind=True, max_retries=None, **_RETRY)
def finalize_job(self, job_id: str) -> str | None:  # noqa: ANN001
    try:
        return processing.finalize_job(uuid.UUID(job_id))
    except processing.TRANSIENT as exc:
        raise processing.TransientError(str(exc)) from exc
