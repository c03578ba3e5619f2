"""The embedded default: one command runs the API and one worker.

Migrates the schema, creates a ``default`` team with an API key on first start
(printed once), starts ``celery -A worker.celery_app worker`` as a child process
(restarted if it dies) and serves the API with uvicorn in this process. With no
configuration everything lives under ``./var``: SQLite for the records, kombu's
SQLAlchemy transport on SQLite for the broker, a local directory for objects.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger("app.serve")


def bootstrap_default_team() -> str | None:
    """Creates team ``default`` and a key if there is no team yet; returns the key (once)."""
    from sqlalchemy import func, select

    from app.db import session_scope
    from app.models import Team
    from app.security import create_key, create_team

    with session_scope() as s:
        if (s.scalar(select(func.count()).select_from(Team)) or 0) > 0:
            return None
        team = create_team(s, "default")
        return create_key(s, team, "first start")


def worker_command(name: str = "embedded", queues: str = "gpu,cpu") -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", queues, "--pool=solo",
            "-n", f"{name}@%h", "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]


def _die_with_parent() -> None:
    """Linux: the worker gets SIGTERM if serve dies, even by SIGKILL (no orphans)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class WorkerSupervisor(threading.Thread):
    """Keeps one worker process alive; restarts it (with backoff) if it exits."""

    def __init__(self, env: dict[str, str]):
        super().__init__(name="worker-supervisor", daemon=True)
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        delay = 1.0
        while not self.stopping.is_set():
            started = time.monotonic()
            self.proc = subprocess.Popen(worker_command(), env=self.env, preexec_fn=_die_with_parent)
            code = self.proc.wait()
            if self.stopping.is_set():
                return
            log.warning("worker exited with status %s; restarting in %.0fs", code, delay)
            delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2, 30.0)
            self.stopping.wait(delay)

    def stop(self, timeout: float = 15.0) -> None:
        self.stopping.set()
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def serve(host: str = "127.0.0.1", port: int = 8000, worker: bool = True, log_level: str = "info") -> int:
    import uvicorn

    from app.migrate import upgrade_schema
    from app.settings import get_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    settings.ensure_dirs()
    upgrade_schema(settings.database_url)
    key = bootstrap_default_team()
    if key:
        bar = "=" * 72
        print(f"{bar}\nCreated team 'default'. Its API key, shown only this once:\n\n    {key}\n\n"
              f"Use it as: Authorization: Bearer <key>\n{bar}", flush=True)
    supervisor = None
    if worker:
        env = dict(os.environ)
        env["POISONAUDIT_DATA_DIR"] = str(settings.data_dir)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        supervisor = WorkerSupervisor(env)
        supervisor.start()
    os.environ["POISONAUDIT_MIGRATE_ON_START"] = "false"  # done above
    get_settings.cache_clear()
    try:
        uvicorn.run("app.main:create_app", factory=True, host=host, port=port, log_level=log_level)
    finally:
        if supervisor is not None:
            supervisor.stop()
    return 0
