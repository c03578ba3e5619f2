"""Configuration shared by the API and the workers, read from ``POISONAUDIT_*`` environment variables.

Read it through :func:`get_settings` (cached) so that tests can swap it; nothing
is built at import time.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class DatasetRoot(BaseModel):
    """A server-side dataset registered by configuration (never by a client-supplied path)."""

    loader: Literal["cifar10", "cifar100", "imagefolder", "npz"] = Field(description="The engine's reader for it.")
    path: str = Field(description="Directory on the worker's file system.")
    description: str = ""


def _sqlite_url(path: Path) -> str:
    return f"sqlite:///{path.resolve()}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="POISONAUDIT_", env_nested_delimiter="__", extra="ignore")

    # Where the embedded default keeps everything (SQLite files, local object store, caches).
    data_dir: Path = Path("var")

    # Database, broker, result backend. Empty: the embedded, serverless defaults under data_dir.
    database_url: str = ""
    broker_url: str = ""
    result_backend: str = ""
    migrate_on_start: bool = True

    # Object storage.
    storage_backend: Literal["local", "s3"] = "local"
    storage_dir: Path | None = None
    s3_bucket: str = "poisonaudit"
    s3_prefix: str = ""
    s3_endpoint_url: str | None = None
    s3_public_endpoint_url: str | None = None  # for presigned URLs, when clients reach the store by another name
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_create_bucket: bool = False
    presign_expires_s: int = Field(300, ge=1, le=7 * 24 * 3600)

    # Upload limits (HTTP 413 beyond them).
    max_encoder_bytes: int = Field(512 * 2**20, ge=1)
    max_dataset_bytes: int = Field(1024 * 2**20, ge=1)
    max_json_bytes: int = Field(2**20, ge=1, description="Largest request body other than an upload (JSON requests).")

    # Uploaded dataset contents (checked at upload, streaming, and again by the worker's loader; 422 beyond).
    max_dataset_decompressed_bytes: int = Field(2**30, ge=1, description="Most bytes an npz's members hold decompressed.")
    max_dataset_classes: int = Field(1000, ge=2, le=100_000, description="Labels must lie in [0, this).")
    max_dataset_image_side: int = Field(1024, ge=1, le=65_536, description="Largest image height or width.")
    max_dataset_compression_ratio: int = Field(200, ge=1, description="Decompressed:archive bytes, past 64 MiB.")

    # Server-side dataset roots: {"cifar10": {"loader": "cifar10", "path": "/data/cifar10"}}.
    dataset_roots: dict[str, DatasetRoot] = {}

    # Jobs and workers.
    auto_queue: Literal["gpu", "cpu"] = "gpu"
    # The hard limit: the worker kills a job's process past it. The soft one (default: the limit less
    # a tenth of it, at most 60 s) is where the engine's cooperative checks stop the job themselves.
    job_time_limit_s: int = Field(6 * 3600, ge=1)
    job_soft_time_limit_s: float | None = Field(None, gt=0)
    # Each job runs in a child process of the worker (where the platform can fork), which the worker
    # kills on the hard limit, or this long after a cancel that the engine did not act upon.
    job_isolation: bool = True
    job_kill_grace_s: float = Field(5.0, ge=0)
    visibility_timeout_s: int | None = None
    heartbeat_interval_s: float = Field(2.0, gt=0)
    heartbeat_timeout_s: float = Field(60.0, gt=0)
    # A job still queued this long after its message was sent is sent again (the message may have
    # been lost: an API process that died between commit and send, a broker restarted without
    # persistence). Workers claim conditionally, so a duplicate message is a no-op.
    queued_resend_s: float = Field(3600.0, gt=0)
    reaper_interval_s: float = Field(15.0, gt=0)
    # After the reaper lost the database (a failed pass, or a gap between passes), it re-queues no job
    # for this long once the database is back, so that live workers' heartbeats resume first
    # (default: the heartbeat timeout plus two heartbeats).
    reaper_outage_grace_s: float | None = Field(None, ge=0)
    # A queued job whose message was never sent (the API died between commit and send) is sent
    # after this long by the reaper, and at once by a retry with the same Idempotency-Key.
    unsent_resend_s: float = Field(30.0, gt=0)
    # How long a worker rides out a database outage (claiming a job, its final write) before it
    # gives the message back to the broker or the result up; retries back off to this interval.
    db_outage_s: float = Field(300.0, ge=0)
    db_retry_max_interval_s: float = Field(5.0, gt=0)
    reaper_enabled: bool = True
    max_attempts: int = Field(2, ge=1, le=20)
    max_audit_jobs: int = Field(200, ge=1, description="Largest fan-out of one audit (422 beyond).")
    cache_dir: Path | None = None
    cache_mirror: bool = True
    encoder_check_wait_s: float = Field(10.0, ge=0)

    # Web pages (/ui): a browser session lasts this long after sign-in (and ends at once when its key
    # is revoked or on sign-out); its cookie is Secure when the request came over https, or always
    # with web_cookie_secure.
    web_session_ttl_s: int = Field(8 * 3600, ge=1, le=30 * 24 * 3600)
    web_cookie_secure: bool = False

    @model_validator(mode="after")
    def _fill_defaults(self) -> "Settings":
        from attacks.catalogue import BUILTIN_DATASETS

        clash = sorted(set(self.dataset_roots) & set(BUILTIN_DATASETS))
        if clash:
            raise ValueError(f"dataset_roots may not reuse built-in dataset names: {clash}")
        d = self.data_dir
        if not self.database_url:
            self.database_url = _sqlite_url(d / "poisonaudit.sqlite")
        if not self.broker_url:
            self.broker_url = "sqla+" + _sqlite_url(d / "broker.sqlite")
        if not self.result_backend:
            self.result_backend = "db+" + _sqlite_url(d / "results.sqlite")
        if self.storage_dir is None:
            self.storage_dir = d / "objects"
        if self.cache_dir is None:
            self.cache_dir = d / "cache"
        if self.job_soft_time_limit_s is None:
            self.job_soft_time_limit_s = soft_time_limit(self.job_time_limit_s)
        self.job_soft_time_limit_s = min(self.job_soft_time_limit_s, float(self.job_time_limit_s))
        if self.reaper_outage_grace_s is None:
            self.reaper_outage_grace_s = self.heartbeat_timeout_s + 2 * self.heartbeat_interval_s
        if self.visibility_timeout_s is None:
            # Longer than the longest job, so the broker never redelivers a running one.
            self.visibility_timeout_s = self.job_time_limit_s + 3600
        return self

    @property
    def embedded(self) -> bool:
        """True when every backing service is a local file (no server to run)."""
        return self.database_url.startswith("sqlite") and self.broker_url.startswith("sqla+sqlite")

    def ensure_dirs(self) -> None:
        for p in (self.data_dir, self.storage_dir, self.cache_dir):
            Path(p).mkdir(parents=True, exist_ok=True)


def soft_time_limit(limit_s: float) -> float:
    """The default soft limit: ``limit_s`` less a tenth of it, at most 60 s less (never under half of it)."""
    return limit_s - min(60.0, limit_s / 10)


@lru_cache
def get_settings() -> Settings:
    return Settings()
