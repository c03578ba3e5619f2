"""Service load: job submission and status polling against Postgres, with the worker busy.

What runs, all on loopback and all torn down afterwards:

* a throwaway Postgres database ``pa_bench_<hex>`` on the local server
  (127.0.0.1:5432, trust auth; created from the ``postgres`` maintenance db,
  migrated, dropped at the end);
* one API process: ``uvicorn app.main:create_app --factory`` (one worker
  process, access log off as in production behind a proxy);
* one real Celery worker on Redis (db 12, flushed before and after), kept busy
  by a long SimCLR pre-training job submitted through the API (50 epochs on
  mnist5k, ``OMP_NUM_THREADS=1`` so it holds one core, as a worker would hold
  its device);
* wrk (C, epoll; Debian's ``wrk``), which drives a fixed number of
  connections for a fixed time and reports requests/s and the latency
  distribution. It is light enough not to steal the API's core, which a Python
  load generator on a 2-core machine would.

Two phases, one after the other, each ``duration`` seconds:

* submit: ``POST /v1/jobs`` (a gc_feature job on mnist5k for a ready encoder of
  the team), ``submit_connections`` connections; every request creates a job
  row and enqueues it on Redis;
* status: ``GET /v1/jobs/{id}`` of the running pre-training job (its progress
  is being written by the worker meanwhile), ``status_connections`` connections.

Targets (issue #6): submit p99 < 50 ms; >= 300 status reads/s on one API process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench.common import RESULTS as RESULTS_DIR, table, write

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("POISONAUDIT_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("POISONAUDIT_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")

SUBMIT_LUA = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""


def _wrk() -> str:
    exe = shutil.which("wrk")
    if exe is None and os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk not found: installing Debian's wrk", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, capture_output=True)
        exe = shutil.which("wrk")
    if exe is None:
        raise SystemExit("the load benchmark needs wrk: apt-get install -y wrk")
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process in its own process group, its output in ``log_dir/NAME.log``."""

    def __init__(self, name, cmd, env, log_dir: Path):
        self.name = name
        self.log = open(log_dir / f"{name}.log", "ab")
        self.p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def stop(self):
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(10)
        self.log.close()


def wait_for(pred, timeout, what, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise RuntimeError(f"timed out waiting for {what}")


class Stack:
    """What :func:`service_stack` set up: the database, the processes' environment, their log folder."""

    def __init__(self, admin, dbname: str, db_url: str, env: dict[str, str], work: Path):
        self.admin, self.dbname, self.db_url, self.env, self.work = admin, dbname, db_url, env, work
        self.procs: list[Proc] = []

    def worker(self, name: str) -> Proc:
        """A real Celery worker (solo pool, both queues) named ``NAME@host``; returns once it is ready."""
        w = Proc(name, [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "gpu,cpu",
                        "--pool=solo", "-n", f"{name}@%h", "--loglevel=INFO", "--without-gossip",
                        "--without-mingle", "--without-heartbeat"], self.env, self.work)
        self.procs.append(w)
        wait_for(lambda: "ready." in w.text() or w.p.poll() is not None, 120, f"the worker {name}")
        if w.p.poll() is not None:
            raise RuntimeError(f"worker {name} exited:\n{w.text()[-3000:]}")
        return w

    def api(self) -> tuple[Proc, str]:
        """One uvicorn API process (access log off, as in production behind a proxy); returns it and
        its base URL once /readyz answers."""
        port = free_port()
        api = Proc("api", [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
                           "--port", str(port), "--workers", "1", "--log-level", "warning", "--no-access-log"],
                   self.env, self.work)
        self.procs.append(api)
        base = f"http://127.0.0.1:{port}"

        def ready():
            try:
                return httpx.get(base + "/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 60, "the API")
        return api, base

    def team(self, name: str) -> tuple[uuid.UUID, str]:
        """A new team and an API key of it: (team id, key)."""
        from sqlalchemy import create_engine
        from sqlalchemy.orm import Session

        from app.security import create_key, create_team

        eng = create_engine(self.db_url)
        with Session(eng) as s:
            team = create_team(s, name)
            key = create_key(s, team)
            team_id = team.id
            s.commit()
        eng.dispose()
        return team_id, key


@contextmanager
def service_stack(prefix: str, redis_url: str = REDIS):
    """Postgres and Redis up (``scripts/services.sh``), the Redis db flushed, a fresh database
    ``pa_bench_<hex>`` on the local server, migrated, and a work folder; on the way out every process
    started through the :class:`Stack` is stopped, the database dropped, the Redis db flushed again and
    the folder removed."""
    from sqlalchemy import create_engine, text

    import redis

    from app.migrate import upgrade_schema

    subprocess.run(["bash", str(REPO / "scripts/services.sh")], capture_output=True)
    redis.Redis.from_url(redis_url).flushdb()
    work = Path(tempfile.mkdtemp(prefix=prefix))
    dbname = f"pa_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{dbname}"'))
    db_url = PG_ADMIN.rsplit("/", 1)[0] + f"/{dbname}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("POISONAUDIT_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", POISONAUDIT_DATA_DIR=str(work / "var"),
               POISONAUDIT_DATABASE_URL=db_url, POISONAUDIT_BROKER_URL=redis_url, POISONAUDIT_RESULT_BACKEND=redis_url,
               POISONAUDIT_STORAGE_BACKEND="local", POISONAUDIT_MIGRATE_ON_START="false")
    stack = Stack(admin, dbname, db_url, env, work)
    try:
        upgrade_schema(db_url)
        yield stack
    finally:
        for p in reversed(stack.procs):
            p.stop()
        from app.db import dispose_engines

        dispose_engines()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
        admin.dispose()
        redis.Redis.from_url(redis_url).flushdb()
        shutil.rmtree(work, ignore_errors=True)


def _ms(v: str, unit: str) -> float:
    return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def parse_wrk(out: str) -> dict:
    """requests/s, p50/p90/p99 latency (ms), total requests, errors, non-2xx from wrk --latency output."""
    res = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        res[f"p{pct}_ms"] = _ms(*m.groups())
    res["requests"] = int(re.search(r"(\d+) requests in", out).group(1))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = sum(map(int, m.groups())) if m else 0
    return res


def _pg_sessions(admin, dbname: str) -> int:
    """Sessions (connections) ever opened to the database: shows connection churn in the API's pool."""
    from sqlalchemy import text

    time.sleep(1.5)  # backends report their statistics at most once a second
    with admin.connect() as c:
        return int(c.execute(text("SELECT sessions FROM pg_stat_database WHERE datname = :d"), {"d": dbname}).scalar())


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run(device: str = "cpu", quick: bool = False, duration: int | None = None,
        submit_connections: int = 4, status_connections: int = 16) -> list[dict]:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    wrk = _wrk()
    duration = duration or (5 if quick else 20)
    rows: list[dict] = []
    with service_stack("pa_load_") as st:
        admin, dbname, work = st.admin, st.dbname, st.work
        # A team, a key and a ready encoder row to submit against.
        from app.models import Encoder, EncoderStatus

        team_id, key = st.team("load")
        eng = create_engine(st.db_url)
        with Session(eng) as s:
            enc = Encoder(team_id=team_id, name="probe", architecture="small_cnn",
                          spec={"arch": "small_cnn", "in_channels": 1}, source="upload",
                          status=EncoderStatus.ready, sha256="0" * 64, size=1)
            s.add(enc)
            s.commit()
            enc_id = str(enc.id)
        eng.dispose()
        auth = {"Authorization": f"Bearer {key}"}

        st.worker("load")
        api, base = st.api()
        client = httpx.Client(base_url=base, headers=auth, timeout=30)
        r = client.post("/v1/encoders", json={"name": "busy", "architecture": "small_cnn", "dataset": "mnist5k",
                                              "spec": {"in_channels": 1}, "config": {"epochs": 50}, "device": "cpu"})
        r.raise_for_status()
        busy = r.json()["job"]["id"]
        wait_for(lambda: client.get(f"/v1/jobs/{busy}").json()["status"] == "running", 120, "the busy job to run")
        body = json.dumps({"encoder": enc_id, "dataset": "mnist5k", "attack": "gc_feature", "epsilon": 0.03,
                           "device": "cpu"})
        assert client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"}).status_code == 202
        lua = work / "submit.lua"
        lua.write_text(SUBMIT_LUA % (body, key))
        url_status = f"{base}/v1/jobs/{busy}"
        phases = [
            ("submit", "POST /v1/jobs", [wrk, "-t1", f"-c{submit_connections}", f"-d{duration}s", "--latency",
                                         "-s", str(lua), f"{base}/v1/jobs"], submit_connections),
            ("status", "GET /v1/jobs/{id}", [wrk, "-t1", f"-c{status_connections}", f"-d{duration}s", "--latency",
                                             "-H", f"Authorization: Bearer {key}", url_status], status_connections),
        ]
        for name, what, cmd, conns in phases:
            # warm-up: 2 s, not recorded
            subprocess.run(cmd[:3] + ["-d2s"] + cmd[4:], capture_output=True, timeout=60)
            load_before = loadavg()
            sessions0 = _pg_sessions(admin, dbname)
            spy = None
            if os.environ.get("BENCH_LOAD_PYSPY"):  # a py-spy binary: profile the API during the phase
                spy = subprocess.Popen([os.environ["BENCH_LOAD_PYSPY"], "record", "-p", str(api.p.pid), "-d",
                                        str(duration), "-f", "raw", "-o", str(RESULTS_DIR / f"load_{name}.pyspy.txt")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cpu0 = _cpu_s(api.p.pid)
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60).stdout
            cpu1 = _cpu_s(api.p.pid)
            if spy is not None:
                spy.wait(duration + 30)
            res = parse_wrk(out)
            # The API's own CPU per request: what one free core would sustain is 1000 / this.
            res["api_cpu_ms_per_req"] = 1e3 * (cpu1 - cpu0) / max(res["requests"], 1)
            res["api_cpu_share"] = (cpu1 - cpu0) / duration
            res["pg_connections_opened"] = _pg_sessions(admin, dbname) - sessions0
            res.update(phase=name, request=what, connections=conns, duration_s=duration, loadavg_before=load_before,
                       worker_busy=client.get(f"/v1/jobs/{busy}").json()["status"] == "running")
            rows.append(res)
        for r in rows:
            r["target"] = "p99 < 50 ms" if r["phase"] == "submit" else ">= 300 req/s"
            r["met"] = r["p99_ms"] < 50 if r["phase"] == "submit" else r["rps"] >= 300
        client.close()
    write("load", rows, {"machine": f"{os.cpu_count()} cores", "api_processes": 1, "tool": "wrk 4.1.0",
                         "database": "postgres (loopback)", "broker": "redis (loopback)"})
    print(table(rows, ["phase", "request", "connections", "requests", "rps", "p50_ms", "p90_ms", "p99_ms", "non_2xx",
                       "socket_errors", "pg_connections_opened", "api_cpu_ms_per_req", "api_cpu_share", "worker_busy", "loadavg_before", "met"]))
    return rows
