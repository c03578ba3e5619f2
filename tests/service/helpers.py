"""Starting and stopping the real processes the service tests need (bounded waits, no orphans)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
PG_ADMIN_URL = os.environ.get("POISONAUDIT_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("POISONAUDIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


def need(ok: bool, what: str) -> None:
    """Locally a missing service skips with the reason; with CI=true it fails."""
    if ok:
        return
    if CI:
        pytest.fail(f"{what} is required when CI=true", pytrace=False)
    pytest.skip(f"{what} not available")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POISONAUDIT_")}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update({k: str(v) for k, v in overrides.items()})
    return env


class Proc:
    """A child process in its own process group, its output in a log file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path, cwd: Path | None = None):
        self.name = name
        self.log_path = Path(log_dir) / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(cmd, env=env, cwd=str(cwd or REPO), stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.alive():
            os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            try:
                os.killpg(self.pid, signal.SIGTERM)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(10)
            except ProcessLookupError:
                pass
        self._log.close()


def wait_http(url: str, proc: Proc | None = None, timeout: float = 60.0, status: int = 200) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise AssertionError(f"{proc.name} exited early:\n{proc.output()[-4000:]}")
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code == status:
                return r
            last = f"{r.status_code} {r.text[:300]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.3)
    raise AssertionError(f"{url} not answering {status} after {timeout}s (last: {last})"
                         + (f"\n{proc.output()[-4000:]}" if proc else ""))


def wait_for(predicate, timeout: float, what: str, interval: float = 0.3, last=None):
    """``predicate()`` once true; else an AssertionError naming ``what`` and the last value seen
    (or, with ``last``, what ``last()`` says then: the state that did not come)."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    seen = last() if last is not None else value
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {seen!r})")


def start_worker(name: str, env: dict[str, str], log_dir: Path, queues: str = "gpu,cpu") -> Proc:
    cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", queues, "--pool=solo",
           "-n", f"{name}@%h", "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    proc = Proc(name, cmd, env, log_dir)
    wait_for(lambda: "ready." in proc.output() or not proc.alive(), 90, f"worker {name} to be ready")
    assert proc.alive(), proc.output()[-4000:]
    return proc


def start_api(env: dict[str, str], log_dir: Path, name: str = "api") -> tuple[Proc, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning"]
    proc = Proc(name, cmd, env, log_dir)
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/readyz", proc, timeout=60)
    return proc, base


def start_moto(log_dir: Path) -> tuple[Proc, str]:
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    proc = Proc("moto", cmd + ["-H", "127.0.0.1", "-p", str(port)], clean_env(), log_dir)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/moto-api/", proc, timeout=30)
    return proc, url


def postgres_ok() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL.replace("postgresql+psycopg", "postgresql"), connect_timeout=3):
            return True
    except Exception:
        return False


def redis_ok() -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping())
    except Exception:
        return False


def s3_stack_env(database_url: str, redis_url: str, s3_endpoint: str, data_dir: Path, bucket: str,
                 **overrides: str) -> dict[str, str]:
    """The environment of an API and its workers on the production-like stack: Postgres, Redis as
    broker and result backend, a moto S3 bucket, CPU jobs, a fast heartbeat."""
    return clean_env(
        POISONAUDIT_DATA_DIR=data_dir,
        POISONAUDIT_DATABASE_URL=database_url,
        POISONAUDIT_BROKER_URL=redis_url,
        POISONAUDIT_RESULT_BACKEND=redis_url,
        POISONAUDIT_STORAGE_BACKEND="s3",
        POISONAUDIT_S3_ENDPOINT_URL=s3_endpoint,
        POISONAUDIT_S3_BUCKET=bucket,
        POISONAUDIT_S3_CREATE_BUCKET="true",
        POISONAUDIT_S3_ACCESS_KEY_ID="test",
        POISONAUDIT_S3_SECRET_ACCESS_KEY="test",
        POISONAUDIT_HEARTBEAT_INTERVAL_S="0.5",
        POISONAUDIT_AUTO_QUEUE="cpu",
        **overrides,
    )
