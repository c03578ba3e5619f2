"""Alembic migrations: the only way the schema changes, on SQLite and Postgres alike."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect

from app.migrate import alembic_config, downgrade_schema, upgrade_schema
from app.models import Base

TABLES = {"team", "api_key", "encoder", "dataset", "job", "artifact", "audit"}


def _roundtrip(url):
    upgrade_schema(url)
    eng = create_engine(url)
    try:
        assert TABLES <= set(inspect(eng).get_table_names())
        # what the models declare is what the migrations built
        from alembic.autogenerate import compare_metadata
        from alembic.migration import MigrationContext

        with eng.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
        downgrade_schema(url)
        assert not (TABLES & set(inspect(eng).get_table_names()))
        upgrade_schema(url)
        upgrade_schema(url)  # idempotent
    finally:
        eng.dispose()


def test_sqlite(tmp_path):
    _roundtrip(f"sqlite:///{tmp_path / 'm.sqlite'}")


@pytest.mark.integration
def test_postgres(pg_url):
    from app.db import dispose_engines

    dispose_engines()
    downgrade_schema(pg_url)  # the session's unit tests may have migrated it
    _roundtrip(pg_url)


def test_constraint_names_follow_the_convention():
    fk = {c.name for t in Base.metadata.tables.values() for c in t.foreign_key_constraints}
    assert "fk_job_encoder_id_encoder" in fk and all(n.startswith("fk_") for n in fk)
    assert all(t.name == t.name.lower() and not t.name.endswith("s") for t in Base.metadata.tables.values())


def test_single_head():
    from alembic.script import ScriptDirectory

    assert len(ScriptDirectory.from_config(alembic_config()).get_heads()) == 1


def _existing_jobs_survive_0002(url):
    """A database at 0001 with a job: 0002 adds the audit table and a null audit_id, 0004 defences on;
    down and up again."""
    import uuid as _uuid
    from datetime import datetime, timezone

    from sqlalchemy import text

    upgrade_schema(url, "0001")
    eng = create_engine(url)
    team, job = _uuid.uuid4(), _uuid.uuid4()
    now = datetime.now(timezone.utc)
    try:
        from sqlalchemy import JSON, Boolean, DateTime, Integer, String, Uuid, column, insert, table

        t_team = table("team", column("id", Uuid()), column("name", String()), column("created_at", DateTime(True)))
        t_job = table("job", *(column(n, ty) for n, ty in [
            ("id", Uuid()), ("team_id", Uuid()), ("kind", String()), ("status", String()), ("dataset", String()),
            ("seed", Integer()), ("device", String()), ("params", JSON()), ("queue", String()),
            ("cancel_requested", Boolean()), ("attempts", Integer()), ("max_attempts", Integer()),
            ("created_at", DateTime(True))]))
        with eng.begin() as c:
            c.execute(insert(t_team).values(id=team, name="m", created_at=now))
            c.execute(insert(t_job).values(id=job, team_id=team, kind="attack", status="succeeded", dataset="digits",
                                           seed=0, device="cpu", params={}, queue="cpu", cancel_requested=False,
                                           attempts=1, max_attempts=2, created_at=now))
        upgrade_schema(url)
        assert "audit" in inspect(eng).get_table_names()
        with eng.connect() as c:
            assert c.execute(text("SELECT audit_id FROM job")).scalar_one() is None
            # 0004: a job from before the option keeps what it did then, measuring the defences
            assert c.execute(text("SELECT defences FROM job")).scalar_one() in (True, 1)
            # 0005: and its precision, fp32
            assert c.execute(text("SELECT precision FROM job")).scalar_one() == "fp32"
        downgrade_schema(url, "0004")
        assert "precision" not in {col["name"] for col in inspect(eng).get_columns("job")}
        downgrade_schema(url, "0001")
        assert "audit" not in inspect(eng).get_table_names()
        assert "audit_id" not in {col["name"] for col in inspect(eng).get_columns("job")}
        upgrade_schema(url)
        with eng.connect() as c:
            assert c.execute(text("SELECT count(*) FROM job")).scalar_one() == 1
    finally:
        eng.dispose()


def test_0002_keeps_existing_jobs_sqlite(tmp_path):
    _existing_jobs_survive_0002(f"sqlite:///{tmp_path / 'm2.sqlite'}")


@pytest.mark.integration
def test_0002_keeps_existing_jobs_postgres(pg_databases):
    _existing_jobs_survive_0002(pg_databases())
