"""Alembic migrations: the only way the schema changes, on SQLite and Postgres alike."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect

from app.migrate import alembic_config, downgrade_schema, upgrade_schema
from app.models import Base

TABLES = {"team", "api_key", "encoder", "dataset", "job", "artifact"}


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
