"""Encoders: upload a checkpoint (multipart), or pre-train one with SimCLR (JSON; a job)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from sqlalchemy import select
from starlette.datastructures import UploadFile

from attacks import specs
from attacks.catalogue import ARCHITECTURES
from app import jobs as job_service
from app.checkpoints import CheckpointError, inspect_checkpoint
from app.db import new_session, utcnow
from app.deps import EncoderDep, KeyFirstRoute, QueueDep, SessionDep, SettingsDep, StoreDep, TeamDep
from app.models import Encoder, EncoderStatus, Job, JobKind, JobStatus
from app.problems import Problem, invalid, problem_responses, unavailable, validation_problem
from app.queue import queue_for_device
from app.schemas import (
    JSON_OBJECT, MAX_JSON_DEPTH, SAFE_STR, EncoderCreated, EncoderPublic, EncodersPublic, PretrainCreate,
)
from app.storage import encoder_key

router = APIRouter(prefix="/v1/encoders", tags=["encoders"], route_class=KeyFirstRoute, responses=problem_responses(401, 404, 409, 413, 415, 422, 503))

_UPLOAD_SCHEMA = {
    "type": "object",
    "required": ["file", "architecture"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "safetensors, or a torch.save'd state dict"},
        "architecture": {"type": "string", "enum": list(ARCHITECTURES)},
        "name": {"type": "string"},
        "spec": {"type": "string", "description": "JSON object of further EncoderSpec fields (preprocessing...)"},
    },
}


def encoder_public(e: Encoder) -> EncoderPublic:
    return EncoderPublic(id=e.id, name=e.name, architecture=e.architecture, spec=e.spec, source=e.source,
                         status=e.status, error=e.error, sha256=e.sha256, size=e.size, job_id=e.job_id,
                         created_at=e.created_at, updated_at=e.updated_at)


def _check_architecture(arch: Any) -> str:
    if arch not in ARCHITECTURES:
        raise invalid("architecture", f"unknown architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}",
                      valid=list(ARCHITECTURES))
    return arch


def _form_str(form, field: str) -> str:
    value = form.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise invalid(field, "must be a text field, not a file")
    return value


def _form_text(form, field: str) -> str:
    """A text field of the upload form, as a request body's ``SafeStr`` (no control characters)."""
    try:
        return SAFE_STR.validate_python(_form_str(form, field))
    except ValidationError as exc:
        raise validation_problem(list(exc.errors()), prefix=(field,)) from None


def _form_json(form, field: str) -> dict:
    """A JSON-object field of the upload form, bounded as a request body's ``JsonObject``: 422 naming
    the field for bad JSON, for nesting past ``MAX_JSON_DEPTH`` (also where the parser would recurse out)."""
    try:
        value = json.loads(_form_str(form, field) or "{}")
    except json.JSONDecodeError as exc:
        raise invalid(field, f"not JSON: {exc}") from None
    except RecursionError:
        raise invalid(field, f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(value, dict):
        raise invalid(field, "must be a JSON object")
    try:
        return JSON_OBJECT.validate_python(value)
    except ValidationError as exc:
        raise invalid(field, exc.errors()[0]["msg"]) from None


def _check_spec(extra: dict, arch: str) -> None:
    """The spec's fields, bounded, by the engine's torch-free model (``attacks.specs.EncoderSpec``),
    and its agreement with ``architecture``; 422 naming the field (``spec.width``...)."""
    if extra.get("arch", arch) != arch:
        raise invalid("spec.arch", f"disagrees with architecture {arch!r}")
    _validate(specs.EncoderSpec, {**extra, "arch": arch}, "spec")  # strict (its model_config)


def _check_config(config: dict) -> None:
    """SimCLR ``config`` by ``attacks.specs.SimCLRConfig`` (seed and device are the request's own)."""
    for k in ("seed", "device"):
        if k in config:
            raise invalid(f"config.{k}", f"set the request's top-level {k!r} instead")
    _validate(specs.SimCLRConfig, config, "config")


def _validate(model: type, data: dict, prefix: str) -> None:
    try:
        model.model_validate(data)
    except ValidationError as exc:
        errors = [{**e, "loc": tuple(str(p)[:64] for p in e.get("loc", ()))} for e in exc.errors()[:20]]
        raise validation_problem(errors, prefix=(prefix,)) from None


@router.post(
    "", status_code=202, response_model=EncoderCreated,
    responses={201: {"model": EncoderCreated, "description": "Uploaded and checked"}, **problem_responses(descriptions={
        400: "A multipart body that cannot be parsed: more than one file, more than 8 fields, a field over 1 MiB",
        413: "A checkpoint over POISONAUDIT_MAX_ENCODER_BYTES, or a JSON body over POISONAUDIT_MAX_JSON_BYTES",
        415: "Neither multipart/form-data (checkpoint upload) nor application/json (pre-training request)",
        422: "Refused, with the reason (named field)",
    })},
    # One content type per operation in the schema: generated clients mishandle two in one request
    # body (openapi-python-client 0.29 emits an unimportable module). The JSON form of this path is
    # still accepted, as it always was; POST /v1/encoders/pretrain is its documented home.
    openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _UPLOAD_SCHEMA}}}},
)
async def create_encoder(request: Request, response: Response, session: SessionDep, team: TeamDep,
                         queue: QueueDep, store: StoreDep, settings: SettingsDep) -> EncoderCreated:
    """Upload a checkpoint (multipart: safetensors or a torch.save'd state dict); 201 once checked,
    202 while the check runs. A JSON body here is the pre-training request of
    ``POST /v1/encoders/pretrain``."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=8, max_part_size=1 << 20)
        try:
            return await run_in_threadpool(_upload, form, response, session, team, queue, store, settings)
        finally:
            await form.close()
    if ctype.startswith("application/json"):
        return await _pretrain_json(request, response, session, team, queue, settings)
    raise Problem(415, "send multipart/form-data (checkpoint upload) or application/json (pre-training request)",
                  title="Unsupported Media Type")


@router.post(
    "/pretrain", status_code=202, response_model=EncoderCreated,
    responses=problem_responses(descriptions={
        413: "A JSON body over POISONAUDIT_MAX_JSON_BYTES",
        415: "Not application/json",
        422: "Refused, with the reason (named field)",
    }),
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": PretrainCreate.model_json_schema(ref_template="#/components/schemas/{model}")},
    }}},
)
async def pretrain_encoder(request: Request, response: Response, session: SessionDep, team: TeamDep,
                           queue: QueueDep, settings: SettingsDep) -> EncoderCreated:
    """Pre-train an encoder with SimCLR on a dataset, as a job (the ``job`` of the answer); the
    encoder is ``ready`` when the job has succeeded."""
    if not request.headers.get("content-type", "").startswith("application/json"):
        raise Problem(415, "send application/json (a pre-training request)", title="Unsupported Media Type")
    return await _pretrain_json(request, response, session, team, queue, settings)


async def _pretrain_json(request, response, session, team, queue, settings) -> EncoderCreated:
    try:
        body = PretrainCreate.model_validate_json(await request.body())
    except ValidationError as exc:
        raise validation_problem(list(exc.errors())) from None
    return await run_in_threadpool(_pretrain, body, response, session, team, queue, settings)


def _upload(form, response, session, team, queue, store, settings) -> EncoderCreated:
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise invalid("file", "a checkpoint file is required")
    arch = _check_architecture(form.get("architecture"))
    extra = _form_json(form, "spec")
    _check_spec(extra, arch)
    name = _form_text(form, "name")[:200] or f"{arch} upload"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "checkpoint")
        with open(path, "wb") as out:
            upload.file.seek(0)
            shutil.copyfileobj(upload.file, out, 1 << 20)
        size = os.path.getsize(path)
        if size > settings.max_encoder_bytes:
            raise Problem(413, f"checkpoint of {size} bytes exceeds the limit of {settings.max_encoder_bytes}")
        try:
            info = inspect_checkpoint(path)
        except CheckpointError as exc:
            raise invalid("file", str(exc)) from None
        enc = Encoder(team_id=team.id, name=name, architecture=arch, spec={**extra, "arch": arch},
                      source="upload", status=EncoderStatus.validating, weights_format=info.format)
        session.add(enc)
        session.flush()
        ext = "safetensors" if info.format == "safetensors" else "pt"
        stored = store.put_file(encoder_key(team.id, enc.id, f"upload.{ext}"), path)
    enc.weights_key, enc.sha256, enc.size = stored.key, stored.sha256, stored.size
    session.commit()
    try:
        queue.check_encoder(enc.id)
    except Exception as exc:
        session.delete(enc)
        session.commit()
        store.delete(stored.key)
        raise unavailable() from exc
    enc = _wait_checked(enc.id, settings.encoder_check_wait_s) or enc
    if enc.status == EncoderStatus.failed:
        session.delete(session.merge(enc))
        session.commit()
        store.delete(stored.key)
        raise invalid("file", enc.error or "the checkpoint does not fit the architecture")
    response.headers["Location"] = f"/v1/encoders/{enc.id}"
    response.status_code = 201 if enc.status == EncoderStatus.ready else 202
    return EncoderCreated(encoder=encoder_public(enc))


def _wait_checked(encoder_id: uuid.UUID, wait_s: float) -> Encoder | None:
    """Waits a little for the worker's verdict, so that a bad checkpoint is refused in the same request."""
    deadline = time.monotonic() + wait_s
    enc = None
    while True:
        with new_session() as s:
            enc = s.get(Encoder, encoder_id)
            if enc is None or enc.status != EncoderStatus.validating:
                return enc
        if time.monotonic() >= deadline:
            return enc
        time.sleep(0.2)


def _pretrain(body: PretrainCreate, response, session, team, queue, settings) -> EncoderCreated:
    arch = _check_architecture(body.architecture)
    _check_spec(body.spec, arch)
    _check_config(body.config)
    ds = job_service.resolve_dataset(session, team, settings, body.dataset)
    enc = Encoder(team_id=team.id, name=body.name, architecture=arch, spec={**body.spec, "arch": arch},
                  source="pretrain", status=EncoderStatus.pending)
    session.add(enc)
    session.flush()
    job = Job(team_id=team.id, kind=JobKind.pretrain, status=JobStatus.queued, encoder_id=enc.id, dataset=ds.ref,
              dataset_id=ds.row.id if ds.row is not None else None, params=body.config, seed=body.seed,
              device=body.device, queue=queue_for_device(body.device, settings), max_attempts=settings.max_attempts,
              created_at=utcnow())
    enc.job_id = job.id = uuid.uuid4()
    try:
        job_service.submit(session, queue, job)
    except Problem:
        session.delete(session.get(Encoder, enc.id))
        session.commit()
        raise
    response.headers["Location"] = f"/v1/encoders/{enc.id}"
    return EncoderCreated(encoder=encoder_public(enc), job=job_service.view(session, job))


@router.get("", response_model=EncodersPublic)
def list_encoders(session: SessionDep, team: TeamDep) -> EncodersPublic:
    """Your encoders, newest first."""
    rows = list(session.scalars(select(Encoder).where(Encoder.team_id == team.id).order_by(Encoder.created_at.desc())))
    return EncodersPublic(data=[encoder_public(e) for e in rows], count=len(rows))


@router.get("/{encoder_id}", response_model=EncoderPublic)
def read_encoder(encoder: EncoderDep) -> EncoderPublic:
    """One encoder, with its status (validating, pending, ready, failed) and the reason if it failed."""
    return encoder_public(encoder)
