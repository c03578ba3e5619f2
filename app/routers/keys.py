"""API keys: list your team's keys (prefixes and labels, never secrets) and revoke one.
New keys are made by an operator (``poisonaudit create-key``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response
from sqlalchemy import select

from app.deps import KeyFirstRoute, SessionDep, TeamDep
from app.models import ApiKey
from app.problems import not_found, problem_responses
from app.schemas import ApiKeyPublic, ApiKeysPublic
from app.security import revoke_key

router = APIRouter(prefix="/v1/keys", tags=["keys"], route_class=KeyFirstRoute, responses=problem_responses(401, 404, 422, 503))


def key_public(k: ApiKey) -> ApiKeyPublic:
    return ApiKeyPublic(prefix=k.prefix, name=k.name, created_at=k.created_at, revoked_at=k.revoked_at)


@router.get("", response_model=ApiKeysPublic)
def list_keys(session: SessionDep, team: TeamDep) -> ApiKeysPublic:
    """Your team's keys, newest first, revoked ones included."""
    rows = list(session.scalars(select(ApiKey).where(ApiKey.team_id == team.id).order_by(ApiKey.created_at.desc())))
    return ApiKeysPublic(data=[key_public(k) for k in rows], count=len(rows))


@router.delete("/{prefix}", status_code=204, response_class=Response)
def revoke_api_key(prefix: Annotated[str, Path(max_length=100)], session: SessionDep, team: TeamDep) -> Response:
    """Revoke one of your team's keys at once (the key making the request too, if it is that one).
    Another team's key, or none with that prefix, is a 404; revoking twice is harmless."""
    if revoke_key(session, prefix, team.id) is None:
        raise not_found("API key", prefix)
    session.commit()
    return Response(status_code=204)
