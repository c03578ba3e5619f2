"""Dependencies, declared once as ``Annotated`` aliases. A dependency that loads a
resource checks ownership and answers 404 itself, so routes never repeat it."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, Path, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import get_session
from app.datasets import DatasetRefError, ResolvedDataset, resolve
from app.models import Audit, Encoder, Job, Team
from app.problems import not_found
from app.queue import JobQueue, get_queue
from app.security import require_team
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
