"""Pydantic request and response schemas (kept apart from the SQLAlchemy models)."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from attacks.catalogue import JobOptions

_opts = JobOptions.model_fields

# ------------------------------------------------------------------ request field types
MAX_JSON_DEPTH = 16  # of a free-form JSON object (params, head, spec, config); the valid ones nest 2 deep
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")  # C0, DEL, C1, lone surrogates
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")  # what no database text (or UTF-8) can hold


def _no_control(v: str) -> str:
    if m := _CONTROL.search(v):
        raise ValueError(f"must not contain control characters (U+{ord(m.group()):04X} at position {m.start()})")
    return v


def check_json_value(value: Any, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A decoded JSON value nested at most ``max_depth`` deep, whose strings (keys too) hold no NUL
    and no lone surrogate; iterative, so that no depth costs a RecursionError. Raises ValueError."""
    stack: list[tuple[Any, tuple]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, (dict, list)):
            if len(path) >= max_depth:
                raise ValueError(f"nested deeper than {max_depth} levels")
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for k, child in items:
                if isinstance(k, str) and (m := _UNSTORABLE.search(k)):
                    raise ValueError(f"a key holds U+{ord(m.group()):04X}, which cannot be stored")
                stack.append((child, (*path, k)))
        elif isinstance(node, str) and (m := _UNSTORABLE.search(node)):
            where = ".".join(str(p)[:40] for p in path) or "value"
            raise ValueError(f"{where} holds U+{ord(m.group()):04X}, which cannot be stored")
    return value


# Every string the API stores or looks up by: no NUL (Postgres text cannot hold it), no other
# control character, no lone surrogate (not UTF-8). A 422 naming the field.
SafeStr = Annotated[str, AfterValidator(_no_control)]
# A free-form JSON object of a request (attack params, head recipe, encoder spec, SimCLR config):
# bounded in depth before anything hashes, stores or validates it further.
JsonObject = Annotated[dict[str, Any], AfterValidator(check_json_value)]
SAFE_STR: TypeAdapter[str] = TypeAdapter(SafeStr)
JSON_OBJECT: TypeAdapter[dict[str, Any]] = TypeAdapter(JsonObject)


class _In(BaseModel):
    """Request bodies. Strict: a number is not a boolean (``"epsilon": true`` is refused, not 1.0), a string
    is not a number nor a boolean (``"seed": "7"``, ``"defences": "no"``); a JSON int still fills a float."""

    model_config = ConfigDict(extra="forbid", strict=True)


class JobCreate(_In):
    """An audit job. Bounds are checked by the engine's own models (``attacks.catalogue``)."""

    encoder: uuid.UUID = Field(strict=False, description="Id of one of your encoders (uploaded or pre-trained, status ready).")
    dataset: SafeStr = Field(
        min_length=1, max_length=200,
        description="A built-in dataset name, a server-side dataset name, or the id of one of your uploaded datasets.",
    )
    attack: SafeStr = Field(max_length=200, description="An attack name from GET /v1/attacks.")
    epsilon: float = Field(0.03, description=_opts["epsilon"].description + " In (0, 1].")
    beta: float | None = Field(None, description=_opts["beta"].description)
    params: JsonObject = Field(default_factory=dict, description="Attack parameters; schema in GET /v1/attacks.")
    seed: int = Field(0, description="Seed of every random choice; in [0, 2^31 - 1].")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Routes the job to the gpu or cpu queue.")
    head: JsonObject | None = Field(None, description="Linear-head recipe (HeadRecipe); defaults apply.")
    defences: bool = Field(True, description="Also measure the defences (L_inf filter, k-NN, spectral "
                           "signatures) against the poisons, each by one more head fit; false skips them.")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description='"fp32", or "bf16": bf16 autocast for the encoder passes (feature extraction, feature '
        "matching, the other input-space attacks) on a GPU, about 1.4-1.6x faster on a ResNet-50 at 224 px "
        "(features within 5e-3 of fp32); no effect on the CPU. The feature cache keeps bf16 features apart.")


class FieldError(BaseModel):
    field: str = Field(description="The offending field, dotted (e.g. 'params.gc_steps', 'epsilons.1').")
    message: str


class ProblemDetail(BaseModel):
    """RFC 7807 problem details, the body of every error response (application/problem+json)."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[FieldError] | None = Field(None, description="Per-field reasons of a 422.")
    valid: list[str] | None = Field(None, description="The valid choices, when a name was unknown.")


class ProgressPublic(BaseModel):
    stage: str | None = Field(description="The stage running now (features, clean_head, gradpc, gc_feature, ...).")
    fraction: float | None = Field(description="Overall fraction of the job done, by stage weights: it never goes "
                                               "backwards; 1.0 when the job has succeeded.")
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
    audit: uuid.UUID | None = Field(None, description="The audit this job belongs to, if any.")
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
    defences: bool
    precision: str = "fp32"  # absent from servers before 0005
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

    name: SafeStr = Field(min_length=1, max_length=200)
    architecture: SafeStr = Field(max_length=64, description="An encoder architecture (small_cnn, resnet18, ...).")
    dataset: SafeStr = Field(min_length=1, max_length=200, description="As for jobs: built-in, server-side or uploaded id.")
    spec: JsonObject = Field(default_factory=dict, description="Further EncoderSpec fields (preprocessing, input size...).")
    config: JsonObject = Field(default_factory=dict, description="SimCLRConfig fields (epochs, batch_size, ...).")
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


# ------------------------------------------------------------------ audits
JobStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class AuditAttack(_In):
    """One attack of an audit, with its parameters (the same for every beta, epsilon and seed)."""

    name: SafeStr = Field(max_length=200, description="An attack name from GET /v1/attacks.")
    params: JsonObject = Field(default_factory=dict, description="Attack parameters; schema in GET /v1/attacks.")
    label: SafeStr | None = Field(None, min_length=1, max_length=100,
                                  description="Row label in the table (default: the name); needed to tell apart two "
                                              "entries of the same attack with different parameters.")


class AuditAttackPublic(BaseModel):
    """An attack of an audit as stored (read back as it is: the request's checks are AuditAttack's)."""

    name: str
    params: dict[str, Any] = {}
    label: str | None = None


class AuditCreate(_In):
    """An audit: one job per attack x beta x epsilon x seed on one encoder and dataset."""

    name: SafeStr = Field("", max_length=200, description="Free text (no control characters).")
    encoder: uuid.UUID = Field(strict=False, description="Id of one of your encoders (status ready).")
    dataset: SafeStr = Field(min_length=1, max_length=200, description="As for jobs: built-in, server-side or uploaded id.")
    attacks: list[AuditAttack] | None = Field(
        None, min_length=1, max_length=50,
        description="Default (omitted or null): the paper's table, every row at the catalogue's defaults: gradpc, "
                    "gc_feature, gc_input and tgda_input with and without constraints, decoder_inversion, "
                    "feature_matching, its projected variant and feature_matching_r (GET /v1/attacks lists them); "
                    "betas then default to 0.25, 0.1, 0.05 and epsilons to 0.03, 0.1.")
    epsilons: list[float] | None = Field(
        None, min_length=1, max_length=50,
        description="Poisoning fractions, each in (0, 1]. Default: 0.03 and 0.1 (the paper's table has 0.03-1).")
    betas: list[float] | None = Field(
        None, min_length=1, max_length=50,
        description="Constraint strengths, applied to the attacks that take a beta (feature matching); the other "
                    "attacks get one row. Default: the catalogue's default beta, or 0.25, 0.1, 0.05 for the "
                    "default attacks.")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, max_length=50,
                             description="Seeds; the table reports mean and std over them.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    head: JsonObject | None = Field(None, description="Linear-head recipe (HeadRecipe) for every job.")
    defences: bool = Field(True, description="Measure the defences in every job (see JobCreate.defences).")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="For every job (see JobCreate.precision).")


    @model_validator(mode="after")
    def _paper_table_by_default(self):
        from attacks.catalogue import PAPER_TABLE, PAPER_TABLE_BETAS, PAPER_TABLE_EPSILONS

        if self.attacks is None:
            self.attacks = [AuditAttack(name=n, params=dict(p), label=label) for n, p, label in PAPER_TABLE]
            if self.betas is None:
                self.betas = list(PAPER_TABLE_BETAS)
        if self.epsilons is None:
            self.epsilons = list(PAPER_TABLE_EPSILONS)
        return self


class Stat(BaseModel):
    """Mean and sample standard deviation (0 when n = 1) over n values (seeds)."""

    mean: float
    std: float
    n: int


class CellJobs(BaseModel):
    succeeded: int
    failed: int = Field(description="Failed or cancelled.")
    pending: int = Field(description="Queued or running.")


class DefenceRemoval(BaseModel):
    """What one defence removed from a cell's poisoned training sets, over the cell's succeeded jobs (seeds)."""

    poisons_removed: Stat = Field(description="Poisons the defence removed (a count per job).")
    fraction: Stat = Field(description="Poisons removed / poisons, per job, in [0, 1].")
    clean_removed: Stat | None = Field(None, description="Clean training points the defence removed (a count per job).")


class AuditCell(BaseModel):
    poisoned_accuracy: Stat | None
    drop: Stat | None
    jobs: CellJobs
    defences: dict[str, Stat] = Field(description="Accuracy after each defence, when the jobs report defences.")
    n_poisons: Stat | None = Field(None, description="Poisons per job (a count), over the succeeded jobs.")
    removed: dict[str, DefenceRemoval] = Field(
        default_factory=dict,
        description="Per defence that applied, the poisons (and clean points) it removed, when the jobs report them.")


class AuditRow(BaseModel):
    attack: str
    beta: float | None
    label: str
    cells: dict[str, AuditCell] = Field(description="By epsilon, written as str(float(epsilon)), e.g. '0.03'.")


class AuditWorst(BaseModel):
    epsilon: float
    worst_drop: float | None
    attack: str | None
    beta: float | None


class AuditTable(BaseModel):
    clean_accuracy: Stat | None = Field(description="Over seeds; null until a job has succeeded.")
    epsilons: list[float]
    rows: list[AuditRow]
    summary: list[AuditWorst] = Field(description="Per epsilon, the poisoning attack with the largest mean drop "
                                                  "(GradPC, a target and not a poisoning attack, is left out).")


class AuditJobCounts(BaseModel):
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int


class AuditProgress(BaseModel):
    fraction: float = Field(description="Finished jobs count 1, running ones their own fraction.")
    jobs: AuditJobCounts


class AuditJob(BaseModel):
    id: uuid.UUID
    attack: str | None
    label: str
    beta: float | None
    epsilon: float | None
    seed: int
    status: JobStatusName
    error: str | None


class AuditSummary(BaseModel):
    id: uuid.UUID
    name: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled", "partial"]
    encoder: uuid.UUID | None
    dataset: str
    attacks: list[AuditAttackPublic]
    epsilons: list[float]
    betas: list[float] | None
    seeds: list[int]
    device: str
    head: dict[str, Any] | None
    defences: bool
    precision: str = "fp32"  # absent from servers before 0005
    cancel_requested: bool
    created_at: datetime
    finished_at: datetime | None
    progress: AuditProgress


class AuditPublic(AuditSummary):
    table: AuditTable
    jobs: list[AuditJob]


class AuditsPublic(BaseModel):
    data: list[AuditSummary]
    count: int
    next_cursor: str | None


class ApiKeyPublic(BaseModel):
    """One of your team's API keys: its lookup prefix and label, never the secret or its hash."""

    prefix: str = Field(description="The 12 hex characters after `pa_` in the key; DELETE /v1/keys/{prefix} revokes it.")
    name: str
    created_at: datetime
    revoked_at: datetime | None


class ApiKeysPublic(BaseModel):
    data: list[ApiKeyPublic]
    count: int
