"""SQLAlchemy 2.0 models: singular snake_case tables, ``*_at`` timestamps, a naming convention.

Kept apart from the pydantic schemas in :mod:`app.schemas`. Every tenant-owned row
carries ``team_id``; ownership is checked once, in :mod:`app.deps`.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, MetaData, String, Text, UniqueConstraint, Uuid, true
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.db import UTCDateTime, utcnow

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), uuid.UUID: Uuid()}


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


FINISHED = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class JobKind(StrEnum):
    attack = "attack"
    pretrain = "pretrain"


class EncoderStatus(StrEnum):
    validating = "validating"  # uploaded, a worker checks the keys against the architecture
    pending = "pending"  # being pre-trained by a job
    ready = "ready"
    failed = "failed"


class Team(Base):
    __tablename__ = "team"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """An API key, stored as the sha256 of its secret; ``prefix`` finds the row."""

    __tablename__ = "api_key"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("team.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class Encoder(Base):
    __tablename__ = "encoder"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("team.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    architecture: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict[str, Any]]
    source: Mapped[str] = mapped_column(String(16))  # upload | pretrain
    status: Mapped[str] = mapped_column(String(16), default=EncoderStatus.validating)
    error: Mapped[str | None] = mapped_column(Text)
    weights_key: Mapped[str | None] = mapped_column(String(400))
    weights_format: Mapped[str | None] = mapped_column(String(32))
    sha256: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int | None] = mapped_column(BigInteger)
    job_id: Mapped[uuid.UUID | None]  # the pre-training job (no FK: job references encoder)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Dataset(Base):
    """An uploaded npz. Built-in and server-side datasets are not rows (see app.datasets)."""

    __tablename__ = "dataset"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("team.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    key: Mapped[str] = mapped_column(String(400))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    summary: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Audit(Base):
    """A grid of attack jobs (attacks x betas x epsilons x seeds) on one encoder and dataset.
    Its status, progress and table are derived from its jobs (see :mod:`app.audits`)."""

    __tablename__ = "audit"
    __table_args__ = (
        Index("ix_audit_team_id_created_at", "team_id", "created_at"),
        UniqueConstraint("team_id", "idempotency_key"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("team.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    encoder_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("encoder.id", ondelete="SET NULL"))
    dataset: Mapped[str] = mapped_column(String(200))
    dataset_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("dataset.id", ondelete="SET NULL"))
    attacks: Mapped[list[Any]] = mapped_column(JSON)  # [{"name", "params", "label"}], as requested
    epsilons: Mapped[list[Any]] = mapped_column(JSON)
    betas: Mapped[list[Any] | None] = mapped_column(JSON)
    seeds: Mapped[list[Any]] = mapped_column(JSON)
    device: Mapped[str] = mapped_column(String(8), default="auto")
    head: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    defences: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())  # run attacks.defences
    precision: Mapped[str] = mapped_column(String(8), default="fp32", server_default="fp32")  # "fp32" | "bf16"
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "job"
    __table_args__ = (
        UniqueConstraint("team_id", "idempotency_key"),
        Index("ix_job_team_id_created_at", "team_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("team.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16), default=JobKind.attack)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued, index=True)
    attack: Mapped[str | None] = mapped_column(String(64), index=True)
    encoder_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("encoder.id", ondelete="SET NULL"), index=True)
    dataset: Mapped[str] = mapped_column(String(200))  # built-in name, server root name, or uploaded dataset id
    dataset_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("dataset.id", ondelete="SET NULL"))
    audit_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("audit.id", ondelete="CASCADE"), index=True)
    epsilon: Mapped[float | None] = mapped_column(Float)
    beta: Mapped[float | None] = mapped_column(Float)
    seed: Mapped[int] = mapped_column(Integer, default=0)
    device: Mapped[str] = mapped_column(String(8), default="auto")
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    head: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    defences: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())  # run attacks.defences
    precision: Mapped[str] = mapped_column(String(8), default="fp32", server_default="fp32")  # "fp32" | "bf16"
    queue: Mapped[str] = mapped_column(String(16))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))

    progress_stage: Mapped[str | None] = mapped_column(String(64))
    progress_fraction: Mapped[float | None] = mapped_column(Float)
    progress_updated_at: Mapped[datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)

    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=1)
    worker: Mapped[str | None] = mapped_column(String(200))
    device_used: Mapped[str | None] = mapped_column(String(32))
    heartbeat_at: Mapped[datetime | None]
    # When the job's message was last re-sent to the broker by the reaper (None: only at creation).
    enqueued_at: Mapped[datetime | None]

    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    duration_s: Mapped[float | None] = mapped_column(Float)


class Artifact(Base):
    """A file in the object store. Keys are generated by the service, never from user file names."""

    __tablename__ = "artifact"
    __table_args__ = (UniqueConstraint("job_id", "name"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("team.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    content_type: Mapped[str] = mapped_column(String(100))
    key: Mapped[str] = mapped_column(String(400))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebSession(Base):
    """A browser session of the web pages (``/ui``), opened by signing in with an API key. The cookie
    holds a random token; the row keeps only its sha256. It works while its key is live (a revoked
    key ends it: checked on every request) and until ``expires_at``."""

    __tablename__ = "web_session"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("team.id", ondelete="CASCADE"), index=True)
    api_key_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_key.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
