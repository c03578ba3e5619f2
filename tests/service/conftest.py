"""Fixtures of the service tests.

Unit level: a database in a transaction rolled back per test (savepoints), services
swapped with ``app.dependency_overrides`` (a recording queue, a local store), on
SQLite and on the real Postgres. Integration level (``-m integration``): the real
Postgres, Redis, a moto S3 server, and Celery worker / API processes started here.
With CI=true a missing service fails instead of skipping.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.orm import Session

from .helpers import PG_ADMIN_URL, REDIS_URL, need, postgres_ok, redis_ok, start_moto


# ------------------------------------------------------------------ settings
@pytest.fixture
def configure(monkeypatch, tmp_path):
    """Sets POISONAUDIT_* for this test (tmp data dir) and returns a function to set more."""
    from app.settings import get_settings

    monkeypatch.setenv("POISONAUDIT_DATA_DIR", str(tmp_path / "var"))
    for k in ("DATABASE_URL", "BROKER_URL", "RESULT_BACKEND", "STORAGE_BACKEND"):
        monkeypatch.delenv(f"POISONAUDIT_{k}", raising=False)

    def set_(**values):
        for k, v in values.items():
            monkeypatch.setenv(f"POISONAUDIT_{k.upper()}", str(v))
        get_settings.cache_clear()
        s = get_settings()
        s.ensure_dirs()
        return s

    set_()
    yield set_
    get_settings.cache_clear()


# ------------------------------------------------------------------ real services
@pytest.fixture(scope="session")
def pg_databases():
    """Creates fresh Postgres databases on demand; drops them all at the end of the session."""
    need(postgres_ok(), f"Postgres at {PG_ADMIN_URL}")
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    names = []

    def create() -> str:
        name = f"pa_test_{uuid.uuid4().hex[:10]}"
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        names.append(name)
        return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"

    yield create
    from app.db import dispose_engines

    dispose_engines()
    with admin.connect() as c:
        for name in names:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def pg_url(pg_databases):
    """One fresh Postgres database for this session's unit tests."""
    return pg_databases()


@pytest.fixture(scope="session")
def redis_url():
    need(redis_ok(), f"Redis at {REDIS_URL}")
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    r.flushdb()
    yield REDIS_URL
    r.flushdb()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3-compatible server process (moto's standalone server) on a free port."""
    proc, url = start_moto(tmp_path_factory.mktemp("moto"))
    yield url
    proc.stop()


# ------------------------------------------------------------------ unit-level database
def _sqlite_savepoint_engine(url: str):
    """pysqlite needs its own transaction handling off for SAVEPOINT (SQLAlchemy's recipe)."""
    eng = create_engine(url, connect_args={"check_same_thread": False})

    @event.listens_for(eng, "connect")
    def _connect(dbapi_conn, _rec):
        dbapi_conn.isolation_level = None
        dbapi_conn.execute("PRAGMA foreign_keys=ON")

    @event.listens_for(eng, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN")

    return eng


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def db_engine(request, tmp_path_factory):
    """A migrated database (SQLite file, or the real Postgres), once per session."""
    from app.migrate import upgrade_schema

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'unit.sqlite'}"
        upgrade_schema(url)
        eng = _sqlite_savepoint_engine(url)
    else:
        url = request.getfixturevalue("pg_url")
        upgrade_schema(url)
        eng = create_engine(url)
    yield eng
    eng.dispose()


@pytest.fixture
def session(db_engine, configure):
    """A session in a transaction that is rolled back after the test; commits become savepoints."""
    configure(database_url=db_engine.url.render_as_string(hide_password=False))
    conn = db_engine.connect()
    trans = conn.begin()
    s = Session(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False)
    yield s
    s.close()
    trans.rollback()
    conn.close()


class FakeQueue:
    """Records what the API enqueues; ``down`` makes the broker unreachable."""

    def __init__(self):
        self.sent: list[tuple[str, str, str]] = []
        self.checks: list[str] = []
        self.down = False
        self.celery = None

    def _up(self):
        if self.down:
            from kombu.exceptions import OperationalError

            raise OperationalError("broker down (test)")

    def enqueue_job(self, job_id, kind, queue):
        self._up()
        self.sent.append((str(job_id), kind, queue))

    def check_encoder(self, encoder_id):
        self._up()
        self.checks.append(str(encoder_id))

    def ping(self, timeout: float = 3.0):
        self._up()


@pytest.fixture
def queue():
    return FakeQueue()


@pytest.fixture
def store(configure):
    from app.settings import get_settings
    from app.storage import LocalStore

    return LocalStore(get_settings().storage_dir)


@pytest.fixture
def api(session, queue, store):
    """The FastAPI app with the session, queue and store swapped in (no lifespan: no reaper)."""
    from app.db import get_session
    from app.main import create_app
    from app.queue import get_queue
    from app.storage import get_store

    app = create_app()
    app.dependency_overrides[get_session] = lambda: session
    app.dependency_overrides[get_queue] = lambda: queue
    app.dependency_overrides[get_store] = lambda: store
    return app


@pytest.fixture
def client(api):
    from fastapi.testclient import TestClient

    return TestClient(api)


def _team(session, name):
    from app.security import create_key, create_team

    team = create_team(session, f"{name}-{uuid.uuid4().hex[:6]}")
    key = create_key(session, team)
    session.commit()
    return team, {"Authorization": f"Bearer {key}"}


@pytest.fixture
def team_a(session):
    return _team(session, "a")


@pytest.fixture
def team_b(session):
    return _team(session, "b")


@pytest.fixture
def ready_encoder(session, team_a, store):
    """A ready encoder row of team A with its files in the store (a tiny real small_cnn)."""
    from app.models import Encoder, EncoderStatus

    team, _ = team_a
    enc = Encoder(team_id=team.id, name="tiny", architecture="small_cnn",
                  spec={"arch": "small_cnn", "in_channels": 1, "width": 8}, source="upload",
                  status=EncoderStatus.ready, sha256="0" * 64, size=1)
    session.add(enc)
    session.commit()
    return enc


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory) -> Path:
    """A small uploadable dataset: 200 digits as uint8 (N, H, W) with labels."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images[:200] * 255 / 16).astype(np.uint8)
    y = d.target[:200].astype(np.int64)
    path = tmp_path_factory.mktemp("npz") / "digits200.npz"
    np.savez(path, x=x, y=y)
    return path
