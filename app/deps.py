"""Dependencies, declared once as ``Annotated`` aliases. A dependency that loads a
resource checks ownership and answers 404 itself, so routes never repeat it."""

from __future__ import annotations

import inspect
import json
import uuid
from typing import Annotated

from fastapi import Depends, Path, Request, Response, Security, params
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import get_session
from app.datasets import DatasetRefError, ResolvedDataset, resolve
from app.models import Audit, Encoder, Job, Team
from app.problems import invalid, not_found
from app.queue import JobQueue, get_queue
from app.security import authenticate, require_team, unauthorized
from app.settings import Settings, get_settings
from app.storage import ObjectStore, get_store

SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The API key of your team")


async def presented_key(
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    api_key: Annotated[str | None, Security(_header)],
) -> str | None:
    """The API key the request presents, unchecked (no database work, so no thread hop)."""
    return api_key or (bearer.credentials if bearer else None)


KeyDep = Annotated[str | None, Depends(presented_key)]


def get_team(session: SessionDep, key: KeyDep) -> Team:
    return require_team(session, key)


TeamDep = Annotated[Team, Depends(get_team)]


# ------------------------------------------------------------------ the key before the body
_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS"})


def needs_key(route: APIRoute) -> bool:
    """Whether the route depends, at any depth, on the presented API key."""
    stack = [route.dependant]
    while stack:
        d = stack.pop()
        if d.call is presented_key:
            return True
        stack.extend(d.dependencies)
    return False


def key_of(request: Request) -> str | None:
    """The key as :func:`presented_key` reads it: ``X-API-Key``, else ``Authorization: Bearer``."""
    if key := request.headers.get("x-api-key"):
        return key
    scheme, credentials = get_authorization_scheme_param(request.headers.get("authorization"))
    return credentials if scheme.lower() == "bearer" and credentials else None


async def _key_is_valid(request: Request, key: str) -> bool:
    """Checks the key in a session from ``get_session`` (or what the app overrides it with)."""
    overrides = getattr(request.scope.get("app"), "dependency_overrides", {})
    made = overrides.get(get_session, get_session)()
    if inspect.isasyncgen(made):
        try:
            return await run_in_threadpool(authenticate, await made.__anext__(), key) is not None
        finally:
            await made.aclose()
    if inspect.isgenerator(made):
        try:
            return await run_in_threadpool(authenticate, next(made), key) is not None
        finally:
            made.close()
    return await run_in_threadpool(authenticate, made, key) is not None


def takes_json(route: APIRoute) -> bool:
    """Whether FastAPI parses the route's body as JSON (a body model that is not a form)."""
    return route.body_field is not None and not isinstance(route.body_field.field_info, params.Form)


def _json_content_type(value: str | None) -> bool:
    """The content types FastAPI reads as JSON: none, ``application/json`` and ``application/*+json``."""
    if not value:
        return True
    media = value.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _undecodable(body: bytes) -> bool:
    """Bytes that ``json.loads`` cannot even decode to text (it answers UnicodeDecodeError, not JSONDecodeError)."""
    try:
        body.decode(json.detect_encoding(body), "surrogatepass")
    except UnicodeDecodeError:
        return True
    return False


class KeyFirstRoute(APIRoute):
    """A route that needs a key checks it before its body is read: FastAPI reads and parses a body
    before it solves dependencies, so without this an anonymous 50 MB JSON body was parsed (and a
    multipart upload spooled) before its 401. Routing is FastAPI's own (unknown paths 404, wrong
    methods 405, whoever asks); the ``TeamDep`` dependency still resolves the team afterwards.

    A JSON body that is not text (invalid UTF-8) is a 422 like any other malformed JSON: FastAPI
    answered it with an undocumented 400 ("There was an error parsing the body")."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        if takes_json(self):
            parse = handler

            async def handler(request: Request) -> Response:
                if _json_content_type(request.headers.get("content-type")):
                    body = await request.body()  # cached on the request: FastAPI's handler reads it from there
                    if body and _undecodable(body):
                        raise invalid("body", "JSON decode error: the body is not UTF-8 text")
                return await parse(request)

        if not needs_key(self):
            return handler

        async def key_first(request: Request) -> Response:
            if request.method not in _BODYLESS:
                key = key_of(request)
                if key is None or not await _key_is_valid(request, key):
                    raise unauthorized()
            return await handler(request)

        return key_first


def get_job(job_id: Annotated[uuid.UUID, Path()], session: SessionDep, team: TeamDep) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.team_id == team.id))
    if job is None:
        raise not_found("job", job_id)
    return job


JobDep = Annotated[Job, Depends(get_job)]


def get_audit(audit_id: Annotated[uuid.UUID, Path()], session: SessionDep, team: TeamDep) -> Audit:
    audit = session.scalar(select(Audit).where(Audit.id == audit_id, Audit.team_id == team.id))
    if audit is None:
        raise not_found("audit", audit_id)
    return audit


AuditDep = Annotated[Audit, Depends(get_audit)]


def get_encoder(encoder_id: Annotated[uuid.UUID, Path()], session: SessionDep, team: TeamDep) -> Encoder:
    enc = session.scalar(select(Encoder).where(Encoder.id == encoder_id, Encoder.team_id == team.id))
    if enc is None:
        raise not_found("encoder", encoder_id)
    return enc


EncoderDep = Annotated[Encoder, Depends(get_encoder)]


def get_dataset_ref(dataset_id: Annotated[str, Path()], session: SessionDep, team: TeamDep,
                    settings: SettingsDep) -> ResolvedDataset:
    try:
        return resolve(dataset_id, team, session, settings)
    except DatasetRefError:
        raise not_found("dataset", dataset_id) from None


DatasetRefDep = Annotated[ResolvedDataset, Depends(get_dataset_ref)]
