"""Database models. The schema is created and changed only through Alembic (``migrations/``).

A job is data: its inputs, pipeline, options and counters live here, and every task is a function of row
IDs that is safe to run twice (status transitions are conditional updates; outputs have deterministic keys).
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = ["ApiToken", "Base", "ClassMetric", "InstanceRow", "Item", "ItemStatus", "Job", "JobStatus", "Schedule",
           "ScheduleFile", "ScheduleRun", "utcnow"]


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    partial = "partial"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.partial, JobStatus.cancelled)


class ItemStatus(enum.StrEnum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL_ITEM = (ItemStatus.succeeded, ItemStatus.failed, ItemStatus.cancelled)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    owner: Mapped[str | None] = mapped_column(String(128), index=True)
    pipeline: Mapped[str] = mapped_column(String(64))
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: What the user submitted: [{"path": ..., "truth": ...}], kept verbatim so nothing is lost.
    inputs: Mapped[list[Any]] = mapped_column(JSON, default=list)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued, index=True)
    items_total: Mapped[int] = mapped_column(Integer, default=0)
    items_done: Mapped[int] = mapped_column(Integer, default=0)
    items_failed: Mapped[int] = mapped_column(Integer, default=0)
    #: True once every input has been expanded into items (the done counter can only finish after this).
    planned: Mapped[bool] = mapped_column(default=False)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    items: Mapped[list[Item]] = relationship(back_populates="job", cascade="all, delete-orphan")

    @property
    def progress(self) -> float:
        return 0.0 if not self.items_total else self.items_done / self.items_total


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (Index("ix_items_job_seq", "job_id", "seq", unique=True),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    #: Position within the job (stable order for listings and deterministic artifact keys).
    seq: Mapped[int] = mapped_column(Integer)
    #: The input path or URL and the item's key inside it ("" for single images, "slice-0003", ...).
    source: Mapped[str] = mapped_column(Text)
    key: Mapped[str] = mapped_column(String(128), default="")
    group: Mapped[str | None] = mapped_column(String(256))
    format: Mapped[str | None] = mapped_column(String(32))
    truth: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=ItemStatus.pending, index=True)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: Starts that found the item still running: its previous worker process died (or lost its broker
    #: message) mid-item. Capped by TILESEG_ITEM_MAX_RESTARTS.
    restarts: Mapped[int] = mapped_column(Integer, default=0)
    #: Input metadata: size, bands, dtype, CRS, transform, modality, pixel area, warnings.
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: {"kind": {"uri": ..., "sha256": ..., "bytes": ..., "media_type": ...}}
    artifacts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    job: Mapped[Job] = relationship(back_populates="items")


class ClassMetric(Base):
    """Per-class figures for one item (``item_id`` set) or aggregated over a job (``item_id`` NULL)."""

    __tablename__ = "class_metrics"
    __table_args__ = (Index("ix_metrics_job_item", "job_id", "item_id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    item_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    #: The model that produced the figures: a job may mix models (photos, GeoTIFFs and DICOM in one batch),
    #: and its job-level rows are aggregated per model. NULL on rows written before the column existed.
    model: Mapped[str | None] = mapped_column(String(64))
    class_id: Mapped[int] = mapped_column(Integer)
    class_name: Mapped[str] = mapped_column(String(128))
    pixel_count: Mapped[int] = mapped_column(BigInteger, default=0)
    fraction: Mapped[float | None] = mapped_column(Float)
    mean_confidence: Mapped[float | None] = mapped_column(Float)
    area: Mapped[float | None] = mapped_column(Float)
    area_unit: Mapped[str | None] = mapped_column(String(8))
    dice: Mapped[float | None] = mapped_column(Float)
    iou: Mapped[float | None] = mapped_column(Float)
    instance_count: Mapped[int | None] = mapped_column(Integer)
    mean_score: Mapped[float | None] = mapped_column(Float)
    #: Raw sums that make job-level aggregation exact (confidence sum, confusion row counts ...).
    sums: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class InstanceRow(Base):
    """One detected object: class, score, COCO box (x, y, w, h px), COCO RLE mask, area."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    item_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    class_id: Mapped[int] = mapped_column(Integer)
    class_name: Mapped[str] = mapped_column(String(128))
    score: Mapped[float] = mapped_column(Float)
    box: Mapped[list[Any]] = mapped_column(JSON)
    rle: Mapped[dict[str, Any]] = mapped_column(JSON)
    area_px: Mapped[int] = mapped_column(BigInteger)
    area: Mapped[float | None] = mapped_column(Float)
    area_unit: Mapped[str | None] = mapped_column(String(8))


class ApiToken(Base):
    """An API token. Only its SHA-256 is stored (tokens are 256-bit random, so a fast hash is enough)."""

    __tablename__ = "api_tokens"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(128))
    owner: Mapped[str] = mapped_column(String(128), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Schedule(Base):
    """A recurring job over a watched location (folder or glob under the input roots)."""

    __tablename__ = "schedules"
    __table_args__ = (Index("ix_schedules_owner_name", "owner", "name", unique=True),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(128))
    owner: Mapped[str | None] = mapped_column(String(128), index=True)
    #: Five-field crontab expression, evaluated in ``timezone``.
    cron: Mapped[str] = mapped_column(String(128))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    location: Mapped[str] = mapped_column(Text)
    pipeline: Mapped[str] = mapped_column(String(64), default="auto")
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    enabled: Mapped[bool] = mapped_column(default=True)
    #: A folder (DICOM series) counts as complete once no file in it changed for this many seconds.
    settle_seconds: Mapped[int] = mapped_column(Integer, default=300)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: The scheduled time of the last run that was carried out (runs are keyed by their scheduled time).
    last_run_for: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_success_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ScheduleRun(Base):
    """One firing of a schedule; unique per scheduled time, so a run is never carried out twice."""

    __tablename__ = "schedule_runs"
    __table_args__ = (Index("ix_schedule_runs_unique", "schedule_id", "scheduled_for", unique=True),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    schedule_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("schedules.id", ondelete="CASCADE"), index=True)
    scheduled_for: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: submitted | nothing_new | failed
    outcome: Mapped[str] = mapped_column(String(16))
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    new_files: Mapped[int] = mapped_column(Integer, default=0)
    message: Mapped[str | None] = mapped_column(Text)


class ScheduleFile(Base):
    """What a schedule has seen of one input (path, size, mtime, content hash) and which job took it."""

    __tablename__ = "schedule_files"
    __table_args__ = (Index("ix_schedule_files_unique", "schedule_id", "path", unique=True),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    schedule_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("schedules.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime: Mapped[float] = mapped_column(Float)
    sha256: Mapped[str | None] = mapped_column(String(64))
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
