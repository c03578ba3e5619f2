"""Engines and sessions. Engines are created on first use, one per URL, never at import."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from sqlalchemy import DateTime, Engine, create_engine, event
from sqlalchemy.orm import Session
from sqlalchemy.types import TypeDecorator
from starlette.concurrency import run_in_threadpool

from app.settings import get_settings


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


_engines: dict[str, Engine] = {}
POOL_SIZE = 20
POOL_MAX_OVERFLOW = 20


def engine_for(url: str) -> Engine:
    """One engine per URL, created on first use."""
    eng = _engines.get(url)
    if eng is None:
        if url.startswith("sqlite"):
            eng = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            event.listen(eng, "connect", _sqlite_pragmas)
        else:
            connect_args = {"connect_timeout": 5} if url.startswith("postgresql") else {}
            # The API runs its sync routes on anyio's thread pool (40 threads): with SQLAlchemy's
            # default pool (5 kept + 10 overflow, overflow closed on return) any concurrency above
            # 5 opened and closed a server connection per request (bench/load.py counts them).
            # 20 kept + 20 overflow covers the thread pool; a worker process uses one or two.
            eng = create_engine(url, pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=POOL_MAX_OVERFLOW,
                                connect_args=connect_args)
        eng = _engines.setdefault(url, eng)
    return eng


def dispose_engines() -> None:
    for eng in _engines.values():
        eng.dispose()
    _engines.clear()


def get_engine() -> Engine:
    return engine_for(get_settings().database_url)


def new_session() -> Session:
    return Session(bind=get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on error (workers, CLI)."""
    session = new_session()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


async def get_session() -> AsyncIterator[Session]:
    """FastAPI dependency: one session per request.

    Async so that opening it (no I/O: the connection is checked out on first use) costs
    no thread-pool hop; closing it may talk to the database (rollback, return to the
    pool), so that runs on the thread pool."""
    session = new_session()
    try:
        yield session
    finally:
        await run_in_threadpool(session.close)
