"""Engines and sessions. Engines are created on first use, one per URL, never at import."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TypeVar

from sqlalchemy import DateTime, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.types import TypeDecorator
from starlette.concurrency import run_in_threadpool

from app.settings import get_settings


log = logging.getLogger("app.db")
T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def is_outage(exc: BaseException) -> bool:
    """True for an error that says the database is unreachable (not for a bad statement)."""
    return isinstance(exc, (OperationalError, InterfaceError)) or (
        isinstance(exc, DBAPIError) and bool(exc.connection_invalidated))


def retry_db(fn: Callable[[], T], *, what: str, budget_s: float | None = None,
             max_interval_s: float | None = None, sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, tried again with exponential backoff (0.5 s doubling, at most ``max_interval_s``)
    while the database is unreachable, for up to ``budget_s`` (the settings' ``db_outage_s`` and
    ``db_retry_max_interval_s`` by default); the last outage error is raised past it. ``fn`` must be
    safe to repeat: one transaction that either committed or did not."""
    s = get_settings()
    budget = s.db_outage_s if budget_s is None else budget_s
    cap = s.db_retry_max_interval_s if max_interval_s is None else max_interval_s
    start, delay, tries = time.monotonic(), 0.5, 0
    while True:
        try:
            out = fn()
        except Exception as exc:
            tries += 1
            waited = time.monotonic() - start
            if not is_outage(exc) or waited + min(delay, cap) > budget:
                raise
            if tries == 1:
                log.warning("%s: database unreachable (%s); retrying for up to %gs", what,
                            type(exc).__name__, budget)
            sleep(min(delay, cap))
            delay *= 2
            continue
        if tries:
            log.warning("%s: database back after %d failed tries (%.1fs)", what, tries, time.monotonic() - start)
        return out


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
