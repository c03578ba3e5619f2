"""Schema upgrades through Alembic (the service runs them at start)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(url: str | None = None) -> Config:
    ini = ROOT / "alembic.ini"
    if not (ROOT / "migrations" / "env.py").exists():
        raise RuntimeError(f"migrations not found under {ROOT}; run from a checkout or the service image")
    cfg = Config(str(ini))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["configure_logging"] = False
    if url:
        cfg.attributes["url"] = url
    return cfg


def upgrade_schema(url: str | None = None, revision: str = "head") -> None:
    """Bring the database at ``url`` (default: the configured one) to ``revision``."""
    command.upgrade(alembic_config(url), revision)


def downgrade_schema(url: str | None = None, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)
