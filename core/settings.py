"""One settings object for every process: environment variables with the ``TILESEG_`` prefix, an optional
config file (``TILESEG_CONFIG=/path/to/tileseg.toml`` or ``.json``), then built-in defaults.

With nothing set, tileseg runs embedded: SQLite in the data directory and a SQLite-backed Celery queue,
no servers. Set ``TILESEG_DATABASE_URL`` and ``TILESEG_BROKER_URL`` for the distributed stack.
"""

from __future__ import annotations

import json
import os
import tomllib
from functools import cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

__all__ = ["Settings", "get_settings", "reset_settings"]


def _config_file_values() -> dict[str, Any]:
    path = os.environ.get("TILESEG_CONFIG")
    if not path:
        return {}
    p = Path(path).expanduser()
    if p.suffix == ".json":
        return json.loads(p.read_text())
    return tomllib.loads(p.read_text())


class _FileSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return _config_file_values()


class Settings(BaseSettings):
    """All configuration. Paths may use ``~``; URLs follow SQLAlchemy / Celery / fsspec syntax."""

    model_config = SettingsConfigDict(env_prefix="TILESEG_", extra="ignore")

    #: Where embedded mode keeps its SQLite files and local artifacts.
    data_dir: Path = Field(default_factory=lambda: Path("~/.tileseg"))
    #: SQLAlchemy URL. Default: SQLite in data_dir. Distributed: postgresql+psycopg://user@host/db
    database_url: str | None = None
    #: Celery broker URL. Default: a SQLite-backed queue in data_dir (kombu's SQLAlchemy transport).
    broker_url: str | None = None
    #: Where masks, overlays and exports go: a local directory or any fsspec URL (s3://bucket/prefix).
    artifact_url: str | None = None
    #: Extra fsspec storage options as JSON (e.g. {"endpoint_url": "http://127.0.0.1:9000"} for S3).
    storage_options: dict[str, Any] = Field(default_factory=dict)
    #: Server-side input paths accepted by the API must resolve inside one of these directories.
    input_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    #: Extra directories searched for model folders (each with a spec.json).
    model_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    #: Decompression-bomb guard: largest declared image size in pixels (width * height).
    max_pixels: int = 40_000 * 40_000
    #: Largest upload accepted by the API, bytes.
    max_upload_bytes: int = 2 * 1024**3
    #: Largest number of inputs in one job request.
    max_inputs_per_job: int = 100_000
    #: Streamed rasters larger than this many pixels are split into row parts processed by separate
    #: tasks (in parallel on several workers) and mosaicked when the last part is done.
    split_pixels: int = 8192 * 8192
    #: Photos per task (one batched model call per this many images).
    photo_batch: int = 16
    #: Worker: processes per `tileseg worker` (Celery prefork) and tasks before a child is recycled.
    worker_concurrency: int = 1
    worker_max_tasks_per_child: int = 200
    worker_max_memory_per_child_kb: int = 6_000_000
    #: Scheduling priority added to `tileseg worker` processes (0-19, Unix nice). Batch inference yields the
    #: CPU to the API and database when they share a host, and loses nothing when it runs alone.
    worker_nice: int = Field(default=10, ge=0, le=19)
    #: Task retries for transient errors (database/broker hiccups).
    task_max_retries: int = 5
    #: Seconds one processing task (one item, or a batch of photos) may run. Past it the item at work is
    #: failed ("took longer than ...") so a hung decoder or network read cannot hold a worker forever; 120 s
    #: later the process is killed if the task is stuck in native code. Keep it below the visibility timeout.
    task_time_limit: int = Field(default=5 * 3600, ge=1)
    #: Times an item is started again after the worker process running it died (killed for memory, a
    #: crash in a native decoder); at the next death it is failed instead of crash-looping the workers.
    item_max_restarts: int = Field(default=2, ge=0)
    #: Seconds a delivered-but-unacknowledged task waits before redelivery (Redis visibility timeout).
    visibility_timeout: int = 6 * 3600
    #: Require API tokens on every endpoint but /health. Switch off only for single-user local setups.
    auth: bool = True
    #: API bind address.
    api_host: str = "127.0.0.1"
    api_port: int = 8000

    @field_validator("input_roots", "model_dirs", mode="before")
    @classmethod
    def _split_paths(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                return json.loads(v)
            return [p for p in v.split(os.pathsep) if p]
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _FileSource(settings_cls))

    # Derived locations -------------------------------------------------------------------------------
    @property
    def data_path(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_path / 'tileseg.sqlite'}"

    @property
    def queue_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.data_path / 'queue.sqlite'}"

    @property
    def embedded_queue(self) -> bool:
        """True when the queue lives in a local SQLite file (no broker server)."""
        return self.queue_url.startswith("sqla+sqlite")

    @property
    def artifacts(self) -> str:
        return self.artifact_url or str(self.data_path / "artifacts")

    @property
    def uploads_path(self) -> Path:
        return self.data_path / "uploads"

    def ensure_dirs(self) -> None:
        """Create the local data directory (embedded mode needs it before SQLite opens)."""
        self.data_path.mkdir(parents=True, exist_ok=True)
        self.uploads_path.mkdir(parents=True, exist_ok=True)


@cache
def get_settings() -> Settings:
    """The process-wide settings (read once; call :func:`reset_settings` after changing the env in tests)."""
    s = Settings()
    if s.model_dirs and "TILESEG_MODEL_DIRS" not in os.environ:
        # The registry (pipelines/) reads model dirs from the environment so it stays free of core imports;
        # this carries dirs named in a config file over to it.
        os.environ["TILESEG_MODEL_DIRS"] = os.pathsep.join(str(p) for p in s.model_dirs)
    return s


def reset_settings() -> None:
    get_settings.cache_clear()
