"""API keys: ``pa_<prefix>_<secret>``, stored as sha256 (the secret has 256 bits of entropy,
so a fast hash is the right one); ``prefix`` finds the row without scanning."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import utcnow
from app.models import ApiKey, Team
from app.problems import Problem

KEY_PREFIX = "pa_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> tuple[str, str]:
    """Returns (full key, lookup prefix)."""
    prefix = secrets.token_hex(6)
    return f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}", prefix


def parse_prefix(key: str) -> str | None:
    if not key.startswith(KEY_PREFIX):
        return None
    prefix, sep, secret = key[len(KEY_PREFIX):].partition("_")
    return prefix if sep and secret and len(prefix) == 12 else None


def create_team(session: Session, name: str) -> Team:
    team = Team(name=name)
    session.add(team)
    session.flush()
    return team


def create_key(session: Session, team: Team, name: str = "") -> str:
    """Adds a key to ``team`` and returns it: the only time the plaintext exists."""
    key, prefix = generate_key()
    session.add(ApiKey(team_id=team.id, name=name, prefix=prefix, key_hash=hash_key(key)))
    session.flush()
    return key


def revoke_key(session: Session, prefix: str, team_id=None) -> ApiKey | None:
    """Revokes the key with ``prefix`` (of ``team_id`` when given); None if there is none. Revoking
    a revoked key keeps its first revocation time. The caller commits."""
    query = select(ApiKey).where(ApiKey.prefix == prefix)
    if team_id is not None:
        query = query.where(ApiKey.team_id == team_id)
    key = session.scalar(query)
    if key is not None and key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


def key_matches(key: str, key_hash: str, revoked_at) -> bool:
    """Whether ``key`` is the live key stored as ``key_hash`` (constant-time comparison)."""
    return revoked_at is None and hmac.compare_digest(key_hash, hash_key(key))


def authenticate_key(session: Session, key: str) -> tuple[ApiKey, Team] | None:
    """The live key row ``key`` is, with its team; None for anything else (the same work either way)."""
    prefix = parse_prefix(key)
    if prefix is None:
        return None
    row = session.execute(
        select(ApiKey, Team).join(Team, Team.id == ApiKey.team_id).where(ApiKey.prefix == prefix)
    ).first()
    if row is None:
        hmac.compare_digest(hash_key(key), hash_key(key))  # same work either way
        return None
    api_key, team = row
    return (api_key, team) if key_matches(key, api_key.key_hash, api_key.revoked_at) else None


def authenticate(session: Session, key: str) -> Team | None:
    found = authenticate_key(session, key)
    return found[1] if found is not None else None


def unauthorized() -> Problem:
    return Problem(401, "a valid API key is required (Authorization: Bearer <key> or X-API-Key)",
                   headers={"WWW-Authenticate": "Bearer"})


def require_team(session: Session, key: str | None) -> Team:
    """The team of the presented key, or a 401 problem."""
    team = authenticate(session, key) if key else None
    if team is None:
        raise unauthorized()
    return team
