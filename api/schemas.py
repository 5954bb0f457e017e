"""Request and response models of the HTTP API (pydantic), shared with the CLI's --json output."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, StrictInt, StringConstraints, field_validator

from core import jobs
from core.models import ClassMetric, InstanceRow, Item, Job

#: Largest page offset accepted: far beyond any real listing, and inside the databases' 64-bit integers (an
#: offset of 10^21 reached SQLite and failed with a 500).
MAX_OFFSET = 1_000_000_000


def as_utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime. The database keeps UTC; SQLite hands it back without the offset."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: A time in responses: RFC 3339 with its UTC offset (``2026-11-27T04:56:35.710684+00:00``), in both modes.
#: Embedded mode used to send it without one, which strict clients reject and browsers read as local time.
UtcDatetime = Annotated[datetime, PlainSerializer(lambda v: as_utc(v).isoformat(), return_type=str)]


class ValidationProblem(BaseModel):
    """The body of every 422."""

    detail: str = Field(description="what is wrong, one readable sentence per problem, joined by '; '")
    errors: list[dict[str, Any]] = Field(default_factory=list, description="pydantic's structured errors, if any")


class InputIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=4096, description="server-side path (under the input roots) or URL")
    truth: str | None = Field(default=None, max_length=4096, description=(
        "ground-truth mask for scoring; a folder beside an input folder pairs by file name"))


class JobOptions(BaseModel):
    """Per-job options. Unknown keys are rejected so typos don't pass silently."""

    model_config = ConfigDict(extra="forbid")

    score_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    max_detections: int | None = Field(default=None, ge=1, le=10_000)
    truth_map: dict[Annotated[str, StringConstraints(pattern=jobs.TRUTH_VALUE)],
                    Annotated[StrictInt, Field(ge=0, le=jobs.IGNORE_CLASS)]] | None = Field(
        default=None, description=f"ground-truth pixel value -> class id, e.g. Oxford trimaps "
        f'{{"1": 0, "2": 1, "3": 2}}; {jobs.IGNORE_CLASS} = not scored, as are values not listed')


class JobIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[InputIn | Annotated[str, StringConstraints(min_length=1, max_length=4096)]] = Field(min_length=1)
    pipeline: str = Field(default="auto", max_length=64, description="model name, or 'auto' for per-input defaults")
    options: JobOptions = JobOptions()

    @field_validator("inputs")
    @classmethod
    def _normalise(cls, v: list[InputIn | str]) -> list[InputIn | str]:
        return [InputIn(path=i) if isinstance(i, str) else i for i in v]


class JobOut(BaseModel):
    id: uuid.UUID
    owner: str | None
    pipeline: str
    options: dict[str, Any]
    status: str
    items_total: int
    items_done: int
    items_failed: int
    progress: float
    error: str | None
    created_at: UtcDatetime
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        return cls(id=job.id, owner=job.owner, pipeline=job.pipeline, options=job.options or {}, status=job.status,
                   items_total=job.items_total, items_done=job.items_done, items_failed=job.items_failed,
                   progress=round(job.progress, 4), error=job.error, created_at=job.created_at,
                   started_at=job.started_at, finished_at=job.finished_at)


class JobDetail(JobOut):
    inputs: list[dict[str, Any]]

    @classmethod
    def of(cls, job: Job) -> JobDetail:
        return cls(**JobOut.of(job).model_dump(), inputs=job.inputs)


class Page(BaseModel):
    total: int
    limit: int
    offset: int


class JobList(Page):
    jobs: list[JobOut]


class MetricOut(BaseModel):
    #: The model the figures come from (job-level figures are per model; None for rows from before 0003).
    model: str | None = None
    class_id: int
    class_name: str
    pixel_count: int
    fraction: float | None
    mean_confidence: float | None
    area: float | None
    area_unit: str | None
    dice: float | None
    iou: float | None
    instance_count: int | None
    mean_score: float | None

    @classmethod
    def of(cls, m: ClassMetric) -> MetricOut:
        return cls(model=m.model, class_id=m.class_id, class_name=m.class_name, pixel_count=m.pixel_count,
                   fraction=m.fraction, mean_confidence=m.mean_confidence, area=m.area, area_unit=m.area_unit,
                   dice=m.dice, iou=m.iou, instance_count=m.instance_count, mean_score=m.mean_score)


class ArtifactOut(BaseModel):
    kind: str
    url: str
    sha256: str
    bytes: int
    media_type: str


class InstanceOut(BaseModel):
    class_id: int
    class_name: str
    score: float
    box: list[float]
    area_px: int
    area: float | None
    area_unit: str | None
    rle: dict[str, Any]

    @classmethod
    def of(cls, r: InstanceRow) -> InstanceOut:
        return cls(class_id=r.class_id, class_name=r.class_name, score=r.score, box=r.box, area_px=r.area_px,
                   area=r.area, area_unit=r.area_unit, rle=r.rle)


class ItemOut(BaseModel):
    id: uuid.UUID
    seq: int
    source: str
    key: str
    format: str | None
    status: str
    error: str | None
    meta: dict[str, Any]
    artifacts: list[ArtifactOut]
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None

    @classmethod
    def of(cls, item: Item, base_url: str = "") -> ItemOut:
        arts = [ArtifactOut(kind=k, url=f"{base_url}/jobs/{item.job_id}/items/{item.id}/artifacts/{k}",
                            sha256=v["sha256"], bytes=v["bytes"], media_type=v["media_type"])
                for k, v in sorted((item.artifacts or {}).items())]
        return cls(id=item.id, seq=item.seq, source=item.source, key=item.key, format=item.format,
                   status=item.status, error=item.error, meta=item.meta or {}, artifacts=arts,
                   started_at=item.started_at, finished_at=item.finished_at)


class ScoreOut(BaseModel):
    """Figures against the ground truth given with the inputs, per model (``tileseg eval``'s definitions)."""

    model: str | None
    pixel_accuracy: float | None = Field(description="correct scored pixels / scored pixels")
    mean_iou: float | None = Field(description="mean over the classes present in truth or prediction")
    mean_dice: float | None
    scored_pixels: int = Field(description="pixels with a truth class (255 and unmapped values are not scored)")


class ItemDetail(ItemOut):
    metrics: list[MetricOut]
    scores: list[ScoreOut] = []
    instances: list[InstanceOut]


class ItemList(Page):
    items: list[ItemOut]


class JobMetrics(BaseModel):
    job_id: uuid.UUID
    status: str
    classes: list[MetricOut]
    #: Only for jobs scored against ground truth.
    scores: list[ScoreOut] = []


class ModelOut(BaseModel):
    name: str
    kind: str
    source: str
    source_format: str
    classes: list[str]
    input_size: int
    channels: int
    mode: str
    default_for: list[str]
    description: str
    truth_map: dict[str, Any] | None = Field(default=None, description=(
        "how ground truth for this model's data writes its classes, used when a job gives no truth_map"))


class Health(BaseModel):
    status: str
    database: str
    broker: str
