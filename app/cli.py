"""The service's commands: ``serve``, ``create-team``, ``create-key``, ``revoke-key``, ``migrate``, and the client's
(``submit``, ``status``, ``wait``, ``download``, ``audit``; see :mod:`app.client_cli`).

Registered on the ``poisonaudit`` console script by :func:`add_subcommands`, and
runnable alone as ``python -m app.cli ...``. Imports no torch (the worker that
``serve`` starts is a separate process).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def _apply_data_dir(args) -> None:
    if getattr(args, "data_dir", None):
        os.environ["POISONAUDIT_DATA_DIR"] = args.data_dir
    from app.settings import get_settings

    get_settings.cache_clear()


def cmd_serve(args) -> int:
    _apply_data_dir(args)
    from app.serve import serve

    return serve(host=args.host, port=args.port, worker=not args.no_worker, log_level=args.log_level)


def cmd_migrate(args) -> int:
    _apply_data_dir(args)
    from app.migrate import upgrade_schema
    from app.settings import get_settings

    s = get_settings()
    s.ensure_dirs()
    upgrade_schema(s.database_url)
    print("schema at head", flush=True)
    return 0


def cmd_create_team(args) -> int:
    _apply_data_dir(args)
    from sqlalchemy.exc import IntegrityError

    from app.db import session_scope
    from app.security import create_key, create_team

    _migrate_if_configured()
    try:
        with session_scope() as s:
            team = create_team(s, args.name)
            key = create_key(s, team, "initial") if args.with_key else None
            team_id = team.id
    except IntegrityError:
        print(f"poisonaudit: error: team {args.name!r} already exists", file=sys.stderr)
        return 2
    print(f"team {args.name} {team_id}")
    if key:
        print(f"api key (shown once): {key}")
    return 0


def cmd_create_key(args) -> int:
    _apply_data_dir(args)
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import Team
    from app.security import create_key

    _migrate_if_configured()
    with session_scope() as s:
        team = s.scalar(select(Team).where(Team.name == args.team))
        if team is None:
            print(f"poisonaudit: error: no team {args.team!r} (create it with create-team)", file=sys.stderr)
            return 2
        key = create_key(s, team, args.name or "")
    print(key)
    return 0


def cmd_revoke_key(args) -> int:
    _apply_data_dir(args)
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import Team
    from app.security import parse_prefix, revoke_key

    _migrate_if_configured()
    prefix = parse_prefix(args.prefix) or args.prefix  # a whole key works too
    with session_scope() as s:
        team_id = None
        if args.team:
            team = s.scalar(select(Team).where(Team.name == args.team))
            if team is None:
                print(f"poisonaudit: error: no team {args.team!r}", file=sys.stderr)
                return 2
            team_id = team.id
        key = revoke_key(s, prefix, team_id)
        if key is None:
            print(f"poisonaudit: error: no API key with prefix {prefix!r}" + (f" in team {args.team!r}" if args.team else ""),
                  file=sys.stderr)
            return 2
        team_name = s.get(Team, key.team_id).name
    print(f"revoked key {prefix} of team {team_name}")
    return 0


def _migrate_if_configured() -> None:
    from app.settings import get_settings

    s = get_settings()
    if s.migrate_on_start:
        from app.migrate import upgrade_schema

        s.ensure_dirs()
        upgrade_schema(s.database_url)


def add_subcommands(subparsers) -> None:
    """Registers the service's commands on an argparse subparsers object (``func=handler``)."""

    def data_dir(p):
        p.add_argument("--data-dir", help="embedded default's directory (env POISONAUDIT_DATA_DIR; default ./var)")

    p = subparsers.add_parser("serve", help="run the HTTP API and one worker (embedded default: no other process)")
    data_dir(p)
    p.add_argument("--host", default=os.environ.get("POISONAUDIT_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("POISONAUDIT_PORT", "8000")))
    p.add_argument("--no-worker", action="store_true", help="API only (workers run elsewhere)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("create-team", help="create a team (and with --with-key, its first API key)")
    data_dir(p)
    p.add_argument("name")
    p.add_argument("--with-key", action="store_true")
    p.set_defaults(func=cmd_create_team)

    p = subparsers.add_parser("create-key", help="create an API key for a team; printed once")
    data_dir(p)
    p.add_argument("--team", required=True)
    p.add_argument("--name", help="a label for the key")
    p.set_defaults(func=cmd_create_key)

    p = subparsers.add_parser("revoke-key", help="revoke an API key at once (by its prefix, pa_<prefix>_..., or the whole key)")
    data_dir(p)
    p.add_argument("prefix")
    p.add_argument("--team", help="only if the key belongs to this team")
    p.set_defaults(func=cmd_revoke_key)

    p = subparsers.add_parser("migrate", help="upgrade the database schema to the latest revision")
    data_dir(p)
    p.set_defaults(func=cmd_migrate)

    from app.client_cli import add_subcommands as add_client_subcommands

    add_client_subcommands(subparsers)  # submit, status, wait, download, audit: a client of a running server


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="poisonaudit", description="poisonaudit service commands")
    add_subcommands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
