"""Pydantic request and response schemas (kept apart from the SQLAlchemy models)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from attacks.catalogue import JobOptions

_opts = JobOptions.model_fields


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobCreate(_In):
    """An audit job. Bounds are checked by the engine's own models (``attacks.catalogue``)."""

    encoder: uuid.UUID = Field(description="Id of one of your encoders (uploaded or pre-trained, status ready).")
    dataset: str = Field(
        min_length=1, max_length=200,
        description="A built-in dataset name, a server-side dataset name, or the id of one of your uploaded datasets.",
    )
    attack: str = Field(description="An attack name from GET /v1/attacks.")
    epsilon: float = Field(0.03, description=_opts["epsilon"].description + " In (0, 1].")
    beta: float | None = Field(None, description=_opts["beta"].description)
    params: dict[str, Any] = Field(default_factory=dict, description="Attack parameters; schema in GET /v1/attacks.")
    seed: int = Field(0, description="Seed of every random choice; in [0, 2^31 - 1].")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Routes the job to the gpu or cpu queue.")
    head: dict[str, Any] | None = Field(None, description="Linear-head recipe (HeadRecipe); defaults apply.")


class ProgressPublic(BaseModel):
    stage: str | None
    fraction: float | None
    updated_at: datetime | None


class ArtifactPublic(BaseModel):
    name: str
    content_type: str
    size: int
    sha256: str
    created_at: datetime
    url: str


class JobPublic(BaseModel):
    id: uuid.UUID
    kind: Literal["attack", "pretrain"]
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    attack: str | None
    encoder: uuid.UUID | None
    dataset: str
    epsilon: float | None
    beta: float | None
    params: dict[str, Any]
    seed: int
    device: str
    head: dict[str, Any] | None
    queue: str
    progress: ProgressPublic
    cancel_requested: bool
    attempts: int
    max_attempts: int
    worker: str | None
    device_used: str | None
    heartbeat_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None
    metrics: dict[str, Any] | None
    error: str | None
    artifacts: list[ArtifactPublic]


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int = Field(description="Jobs matching the filters, over all pages.")
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null on the last page.")


class ArtifactsPublic(BaseModel):
    data: list[ArtifactPublic]
    count: int


class EncoderPublic(BaseModel):
    id: uuid.UUID
    name: str
    architecture: str
    spec: dict[str, Any]
    source: Literal["upload", "pretrain"]
    status: Literal["validating", "pending", "ready", "failed"]
    error: str | None
    sha256: str | None
    size: int | None
    job_id: uuid.UUID | None
    created_at: datetime
    updated_at: datetime


class EncodersPublic(BaseModel):
    data: list[EncoderPublic]
    count: int


class PretrainCreate(_In):
    """Pre-train an encoder with SimCLR on a dataset: a job of kind ``pretrain``."""

    name: str = Field(min_length=1, max_length=200)
    architecture: str = Field(description="An encoder architecture (small_cnn, resnet18, ...).")
    dataset: str = Field(min_length=1, max_length=200, description="As for jobs: built-in, server-side or uploaded id.")
    spec: dict[str, Any] = Field(default_factory=dict, description="Further EncoderSpec fields (preprocessing, input size...).")
    config: dict[str, Any] = Field(default_factory=dict, description="SimCLRConfig fields (epochs, batch_size, ...).")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class EncoderCreated(BaseModel):
    encoder: EncoderPublic
    job: JobPublic | None = None


class DatasetPublic(BaseModel):
    id: str = Field(description="What to pass as a job's `dataset`.")
    name: str
    kind: Literal["builtin", "server", "upload"]
    loader: str
    description: str = ""
    sha256: str | None = None
    size: int | None = None
    summary: dict[str, Any] | None = None
    created_at: datetime | None = None


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int


class AttackPublic(BaseModel):
    name: str
    title: str
    description: str
    paper: str
    takes_beta: bool
    stage: str
    params_schema: dict[str, Any]


class AttacksPublic(BaseModel):
    data: list[AttackPublic]
    count: int


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = {}
