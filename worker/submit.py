"""Submitting a job: validate, store it, enqueue its planning task. Used by the API and the CLI."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

from core import jobs
from core.db import session_scope
from core.models import Job, JobStatus, utcnow

log = logging.getLogger(__name__)

__all__ = ["QueueUnavailable", "UnknownPipeline", "submit_job", "validate_pipeline"]


class UnknownPipeline(ValueError):
    pass


class QueueUnavailable(RuntimeError):
    pass


def validate_pipeline(name: str) -> None:
    """Raise :class:`UnknownPipeline` unless ``name`` is 'auto' or a registered model."""
    if name == "auto":
        return
    from pipelines.registry import find_specs

    specs = find_specs()
    if name not in specs:
        raise UnknownPipeline(f"unknown pipeline {name!r}; registered: {', '.join(sorted(specs)) or 'none'} "
                              "(or 'auto')")


def submit_job(inputs: Sequence[jobs.InputSpec], pipeline: str = "auto", options: dict[str, Any] | None = None,
               owner: str | None = None) -> uuid.UUID:
    """Create a queued job and enqueue its planning. Returns the job ID."""
    validate_pipeline(pipeline)
    with session_scope() as session:
        job = jobs.create_job(session, inputs, pipeline, options, owner)
        job_id = job.id
    from worker.tasks import plan_job

    try:
        plan_job.delay(str(job_id))
    except Exception as exc:  # the job row exists: record why it will not run rather than losing it
        log.exception("cannot enqueue job %s", job_id)
        with session_scope() as session:
            job = session.get(Job, job_id)
            job.status = JobStatus.failed
            job.error = f"queue unavailable: {exc}"
            job.finished_at = utcnow()
        raise QueueUnavailable(f"queue unavailable: {exc}") from exc
    return job_id
