"""Browser sessions of the web pages, kept in the database (``web_session``).

Signing in with an API key makes a random token (256 bits); the browser keeps it in an HttpOnly,
SameSite=Strict cookie and the row keeps only its sha256, the team and the key that opened it.
Each request looks the row up joined to its key: a session ends when it expires, when its key is
revoked (``DELETE /v1/keys/{prefix}``, ``poisonaudit revoke-key``) and at sign-out. The CSRF token
of the session's forms is an HMAC of the cookie token, so it needs no storage and a page from
another site can neither read nor guess it."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.db import utcnow
from app.models import ApiKey, Team, WebSession
from app.security import authenticate_key
from app.settings import Settings

COOKIE = "pa_session"
LOGIN_COOKIE = "pa_login"  # the sign-in form's own CSRF token (double submit), before any session
PATH = "/ui"
MAX_TOKEN_CHARS = 100


@dataclass(frozen=True)
class WebAuth:
    team: Team
    session_id: uuid.UUID
    key_prefix: str
    csrf: str


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_of(token: str) -> str:
    return hmac.new(token.encode(), b"poisonaudit web csrf", hashlib.sha256).hexdigest()


def csrf_ok(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected).encode(), str(given).encode())


def open_session(session: Session, key: str, settings: Settings) -> tuple[str, WebAuth] | None:
    """A new session for the live API key ``key`` (and its token, for the cookie); None for a bad key.
    Expired sessions (anyone's) are deleted on the way. Commits."""
    found = authenticate_key(session, key)
    if found is None:
        return None
    api_key, team = found
    now = utcnow()
    session.execute(delete(WebSession).where(WebSession.expires_at <= now))
    token = secrets.token_urlsafe(32)
    row = WebSession(token_hash=token_hash(token), team_id=team.id, api_key_id=api_key.id, created_at=now,
                     expires_at=now + timedelta(seconds=settings.web_session_ttl_s))
    session.add(row)
    session.commit()
    return token, WebAuth(team=team, session_id=row.id, key_prefix=api_key.prefix, csrf=csrf_of(token))


def lookup(session: Session, token: str | None) -> WebAuth | None:
    """The live session of the cookie ``token``: not expired, its key not revoked; else None."""
    if not token or len(token) > MAX_TOKEN_CHARS:
        return None
    row = session.execute(
        select(WebSession, ApiKey.prefix, ApiKey.revoked_at, Team)
        .join(ApiKey, ApiKey.id == WebSession.api_key_id)
        .join(Team, Team.id == WebSession.team_id)
        .where(WebSession.token_hash == token_hash(token))
    ).first()
    if row is None or row.revoked_at is not None or row.WebSession.expires_at <= utcnow():
        return None
    return WebAuth(team=row.Team, session_id=row.WebSession.id, key_prefix=row.prefix, csrf=csrf_of(token))


def close_session(session: Session, session_id: uuid.UUID) -> None:
    """Sign-out: the session's row is deleted (its cookie works nowhere after this). Commits."""
    session.execute(delete(WebSession).where(WebSession.id == session_id))
    session.commit()
