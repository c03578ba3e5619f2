"""Faults (#13, item 9): a database outage is not a dead worker, a result finished during one is
kept, a queued job outlives one, and a client's retry sends a job whose message was never sent.

The outage tests stop and restart a Postgres server of their own (initdb in a temporary folder,
on a free port; the shared server on 5432 is never touched), with a real API process, two real
Celery workers on Redis, and a heartbeat timeout of a few seconds. The rest are unit tests of the
pieces (the reaper's hold-off and conditional re-queue, the retried writes, the requeued message).
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app.db import new_session, retry_db, utcnow
from app.models import Job
from .helpers import clean_env, free_port, need, start_api, start_worker, wait_for
from .test_worker import _job as _job_row
from .test_worker import env  # noqa: F401  (the fixture: a migrated database, a team, a ready encoder)

# ------------------------------------------------------------------ pieces (no outage needed)


def _outage() -> OperationalError:
    return OperationalError("SELECT 1", {}, Exception("connection refused"))


def test_retry_db_rides_out_an_outage_and_gives_up_past_its_budget():
    calls, slept = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise _outage()
        return "ok"

    assert retry_db(flaky, what="t", budget_s=60, max_interval_s=5, sleep=slept.append) == "ok"
    assert len(calls) == 4 and slept == [0.5, 1.0, 2.0]

    def down():
        raise _outage()

    with pytest.raises(OperationalError):
        retry_db(down, what="t", budget_s=0.2, max_interval_s=5, sleep=lambda s: None)

    def bad_statement():
        calls.append(1)
        raise ValueError("not an outage")

    calls.clear()
    with pytest.raises(ValueError):
        retry_db(bad_statement, what="t", budget_s=60, sleep=slept.append)
    assert len(calls) == 1  # a bug is not retried


def _running(env, **kw) -> uuid.UUID:
    return _job_row(env, status="running", attempts=1, worker="w@h:1", started_at=utcnow() - timedelta(seconds=100),
                    heartbeat_at=utcnow() - timedelta(seconds=100), **kw)


def test_the_reaper_holds_off_after_losing_the_database(env, configure):
    from app.reaper import Reaper

    s = configure(heartbeat_timeout_s=5, heartbeat_interval_s=1, reaper_interval_s=1, reaper_outage_grace_s=20)
    stale = _running(env)
    sent = []
    queue = type("Q", (), {"enqueue_job": lambda self, jid, kind, q: sent.append(str(jid))})()
    clock = [1000.0]
    down = [True]

    def sessions():
        if down[0]:
            raise _outage()
        return new_session()

    reaper = Reaper(s, lambda: queue, sessions, clock=lambda: clock[0])
    assert reaper.tick() == {} and reaper.failed
    down[0] = False
    for _ in range(20):  # back, but the heartbeats may not have resumed yet: a pass a second, all held
        clock[0] += 1
        assert reaper.tick() == {}
    with new_session() as db:
        assert db.get(Job, stale).status == "running"
    clock[0] += 1
    assert reaper.tick() == {str(stale): "requeued"} and sent == [str(stale)]

    # a gap between passes (a stopped process, a hung connect) is taken for an outage too
    other = _running(env)
    clock[0] += 60
    assert reaper.tick() == {}
    with new_session() as db:
        assert db.get(Job, other).status == "running"


def test_the_reaper_spares_a_heartbeat_that_resumed_and_jobs_of_its_own_process(env, configure):
    from app import reaper

    s = configure(heartbeat_timeout_s=5)
    queue = type("Q", (), {"enqueue_job": lambda self, jid, kind, q: None})()
    resumed = _running(env)
    with new_session() as db:
        job = db.get(Job, resumed)  # what a reaper's SELECT saw: stale
    with new_session() as db:  # then the worker's heartbeat came back
        db.execute(update(Job).where(Job.id == resumed).values(heartbeat_at=utcnow()))
        db.commit()
    with new_session() as db:
        cutoff = utcnow() - timedelta(seconds=s.heartbeat_timeout_s)
        assert reaper._lost(db, job, "worker lost", queue, stale_before=cutoff) is None
        assert db.get(Job, resumed).status == "running"

    mine = _running(env)
    reaper.local_jobs.add(mine)
    try:
        with new_session() as db:
            out = reaper.reap_stale_jobs(db, queue, s)
        assert str(mine) not in out
        with new_session() as db:
            assert db.get(Job, mine).status == "running"
    finally:
        reaper.local_jobs.discard(mine)
    with new_session() as db:
        assert reaper.reap_stale_jobs(db, queue, s) == {str(mine): "requeued"}


def test_a_final_write_during_an_outage_is_retried_and_kept(env, configure, monkeypatch):
    from worker import runner

    configure(db_outage_s=30, db_retry_max_interval_s=0.01)
    job_id = _running(env)
    with new_session() as db:
        job = db.get(Job, job_id)
    run = runner.JobRun(job, "w@h:1")
    real, failures = runner.new_session, [0]

    def flaky_session():
        if failures[0] < 3:
            failures[0] += 1
            raise _outage()
        return real()

    monkeypatch.setattr(runner, "new_session", flaky_session)
    monkeypatch.setattr(run, "put_artifact", lambda *a, **k: (_ for _ in ()).throw(OSError("store down")))
    assert run.finish("succeeded", metrics={"drop": 0.1}) is True
    with new_session() as db:
        row = db.get(Job, job_id)
        assert row.status == "succeeded" and row.metrics == {"drop": 0.1} and failures[0] == 3


def test_a_claim_that_outlasts_the_outage_budget_goes_back_to_the_broker(configure, monkeypatch):
    from celery.exceptions import Reject

    from worker import tasks
    from worker.runner import JobRun

    configure(db_outage_s=0.3, db_retry_max_interval_s=0.05)
    tries = []

    def down(jid, me):
        tries.append(1)
        raise _outage()

    monkeypatch.setattr(JobRun, "_claim_once", staticmethod(down))
    with pytest.raises(Reject) as info:
        tasks.claim(str(uuid.uuid4()), "w@h")
    assert info.value.requeue is True and len(tries) >= 3


def test_a_retry_with_the_same_key_sends_a_job_that_was_never_sent(client, queue, team_a, ready_encoder, session):
    h = team_a[1]
    body = {"encoder": str(ready_encoder.id), "dataset": "digits", "attack": "gradpc", "epsilon": 0.03}
    first = client.post("/v1/jobs", json=body, headers={**h, "Idempotency-Key": "k1"})
    assert first.status_code == 202, first.text
    job_id = uuid.UUID(first.json()["id"])
    sent = lambda: [x[0] for x in queue.sent]  # noqa: E731
    assert sent().count(str(job_id)) == 1
    assert session.get(Job, job_id).enqueued_at is not None
    # as if the API had died between the commit and the send
    session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=None))
    session.commit()
    again = client.post("/v1/jobs", json=body, headers={**h, "Idempotency-Key": "k1"})
    assert again.status_code in (200, 202) and again.json()["id"] == str(job_id)
    assert sent().count(str(job_id)) == 2
    session.expire_all()
    assert session.get(Job, job_id).enqueued_at is not None
    third = client.post("/v1/jobs", json=body, headers={**h, "Idempotency-Key": "k1"})
    assert third.json()["id"] == str(job_id) and sent().count(str(job_id)) == 2  # sent: not again


def test_a_retried_audit_sends_its_jobs_that_were_never_sent(client, queue, team_a, ready_encoder, session):
    h = team_a[1]
    body = {"encoder": str(ready_encoder.id), "dataset": "digits", "attacks": [{"name": "gradpc"}],
            "epsilons": [0.03, 0.1]}
    first = client.post("/v1/audits", json=body, headers={**h, "Idempotency-Key": "a1"})
    assert first.status_code in (201, 202), first.text
    audit_id = uuid.UUID(first.json()["id"])
    jobs = list(session.scalars(select(Job).where(Job.audit_id == audit_id)))
    assert len(jobs) == 2 and all(j.enqueued_at is not None for j in jobs)
    session.execute(update(Job).where(Job.id == jobs[0].id).values(enqueued_at=None))
    session.commit()
    before = list(queue.sent)
    again = client.post("/v1/audits", json=body, headers={**h, "Idempotency-Key": "a1"})
    assert again.json()["id"] == str(audit_id)
    assert [x[0] for x in queue.sent[len(before):]] == [str(jobs[0].id)]


# ------------------------------------------------------------------ real outages of a Postgres of our own


def _pg_bin(name: str) -> str | None:
    """``name`` on the PATH, else Debian's newest ``/usr/lib/postgresql/N/bin/name``."""
    debian = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return shutil.which(name) or (debian[-1] if debian else None)


class OwnPostgres:
    """A throwaway Postgres cluster (trust auth) that a test may stop and start at will."""

    def __init__(self):
        self.initdb, self.pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        self.root = Path(tempfile.mkdtemp(prefix="pa-faults-pg-"))
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self.user = None
        if os.geteuid() == 0:  # the server refuses to run as root
            self.user = pwd.getpwnam("postgres")
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)

    def _run(self, *cmd: str, timeout: float = 120) -> None:
        full = (["runuser", "-u", "postgres", "--"] if self.user else []) + list(cmd)
        r = subprocess.run(full, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"{' '.join(cmd)}: {r.stdout}\n{r.stderr}"

    def init(self) -> None:
        self._run(self.initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start")

    def stop(self) -> None:
        """As a crash would: no checkpoint, every connection cut."""
        self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def close(self) -> None:
        try:
            self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop", timeout=30)
        except AssertionError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


def _pg_available() -> bool:
    if not (_pg_bin("initdb") and _pg_bin("pg_ctl")):
        return False
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return False
        return shutil.which("runuser") is not None
    return True


HEARTBEAT_TIMEOUT_S = 4.0
MEDIUM = {"gc_steps": 2500, "stop_loss": 0, "fm_steps": 8000, "rounds": 1}  # seconds of FM steps
ENDLESS = {"attack": "gradpc", "head": {"optimizer": "sgd", "epochs": 10000, "batch_size": 1}}  # hours of SGD


@pytest.fixture(scope="module")
def fault_stack(redis_url, tmp_path_factory, tiny_encoder_dir):
    need(_pg_available(), "initdb and pg_ctl (a Postgres server of the test's own)")
    pg = OwnPostgres()
    logs = tmp_path_factory.mktemp("fault-logs")
    procs = []
    try:
        pg.init()
        env = clean_env(
            POISONAUDIT_DATA_DIR=tmp_path_factory.mktemp("fault-var"),
            POISONAUDIT_DATABASE_URL=pg.url,
            POISONAUDIT_BROKER_URL=redis_url,
            POISONAUDIT_RESULT_BACKEND=redis_url,
            POISONAUDIT_HEARTBEAT_INTERVAL_S="0.5",
            POISONAUDIT_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_TIMEOUT_S),
            POISONAUDIT_REAPER_INTERVAL_S="1",
            POISONAUDIT_MAX_ATTEMPTS="1",  # a job taken for lost would fail: visible
            POISONAUDIT_DB_RETRY_MAX_INTERVAL_S="2",
            POISONAUDIT_ENCODER_CHECK_WAIT_S="60",
            POISONAUDIT_AUTO_QUEUE="cpu",
        )
        api, base = start_api(env, logs)
        procs.append(api)
        from .test_e2e import create_team

        headers = create_team(env, "faults")
        workers = {n: start_worker(n, env, logs) for n in ("f1", "f2")}
        procs.extend(workers.values())
        client = httpx.Client(base_url=base, headers=headers, timeout=30)
        with open(tiny_encoder_dir / "encoder.safetensors", "rb") as f:
            r = client.post("/v1/encoders", data={"architecture": "small_cnn", "spec": json.dumps(
                {"in_channels": 1, "width": 8})}, files={"file": ("w.safetensors", f)})
        assert r.status_code == 201 and r.json()["encoder"]["status"] == "ready", r.text
        yield {"pg": pg, "client": client, "encoder": r.json()["encoder"]["id"], "workers": workers, "env": env}
        client.close()
    finally:
        for p in reversed(procs):
            p.stop()
        pg.close()


def _submit(stack, params, **kw) -> str:
    body = {"encoder": stack["encoder"], "dataset": "digits", "attack": "feature_matching", "epsilon": 0.03,
            "params": params, "head": {"epochs": 30}, "defences": False, "seed": 0, **kw}
    r = stack["client"].post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _job(stack, job_id) -> dict:
    return stack["client"].get(f"/v1/jobs/{job_id}").json()


def _state(stack, job_id) -> tuple[str, str | None]:
    j = _job(stack, job_id)
    return j["status"], (j.get("progress") or {}).get("stage")


def _logs(stack) -> str:
    return "".join(w.output() for w in stack["workers"].values())


@pytest.mark.integration
def test_an_outage_longer_than_the_heartbeat_timeout_reruns_no_job_and_keeps_a_result(fault_stack):
    st = fault_stack
    # one after the other: the long job takes one worker (past its start-up, which may wait for the
    # worker's preload), then the short one the other; waiting for both states at one instant raced
    long_ = _submit(st, {}, **ENDLESS)
    wait_for(lambda: _state(st, long_)[1] not in (None, "starting", "loading"), 120, "the long job making progress",
             last=lambda: _state(st, long_))
    short = _submit(st, MEDIUM)
    in_attack = ("gradpc", "gc_feature", "feature_matching")
    wait_for(lambda: _state(st, short) in {("running", s) for s in in_attack}, 120, "the short job in its attack stage",
             last=lambda: {"short": _state(st, short), "long": _state(st, long_)})
    st["pg"].stop()
    down_at = time.monotonic()
    # down until the short job has finished (its final write failing) and well past the heartbeat timeout
    wait_for(lambda: "final write: database unreachable" in _logs(st), 120, "the short job's result during the outage")
    time.sleep(max(0.0, 3 * HEARTBEAT_TIMEOUT_S - (time.monotonic() - down_at)))
    st["pg"].start()
    up_at = time.monotonic()

    done = wait_for(lambda: (j := _job(st, short))["status"] != "running" and j, 120, "the short job's end")
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    # the long job lived through the outage and past the reapers' hold-off: still the same attempt
    time.sleep(max(0.0, 2 * HEARTBEAT_TIMEOUT_S + 6 - (time.monotonic() - up_at)))
    j = _job(st, long_)
    assert j["status"] == "running" and j["attempts"] == 1, j
    assert st["client"].post(f"/v1/jobs/{long_}/cancel").status_code in (200, 202)
    ended = wait_for(lambda: (x := _job(st, long_))["status"] != "running" and x, 60, "the long job's cancel")
    assert ended["status"] == "cancelled" and ended["attempts"] == 1, ended


@pytest.mark.integration
def test_a_queued_job_survives_a_45s_outage_and_runs_soon_after(fault_stack):
    from app.queue import JobQueue, create_celery
    from app.settings import Settings

    st = fault_stack
    seed = _submit(st, {"gc_steps": 50, "fm_steps": 20, "rounds": 1})
    wait_for(lambda: _job(st, seed)["status"] == "succeeded", 120, "a first small job")
    eng = create_engine(st["env"]["POISONAUDIT_DATABASE_URL"])
    try:
        with Session(eng) as db:  # a queued copy of it, whose message goes out while the database is down
            row = db.get(Job, uuid.UUID(seed))
            copy = Job(**{c.key: getattr(row, c.key) for c in Job.__table__.columns if c.key not in (
                "id", "idempotency_key", "request_hash", "metrics", "error", "worker", "heartbeat_at", "started_at",
                "finished_at", "duration_s", "progress_stage", "progress_fraction", "progress_updated_at",
                "device_used")})
            copy.id, copy.status, copy.attempts, copy.created_at = uuid.uuid4(), "queued", 0, utcnow()
            copy.enqueued_at = utcnow()
            db.add(copy)
            db.commit()
            job_id = copy.id
    finally:
        eng.dispose()
    st["pg"].stop()
    settings = Settings(database_url=st["env"]["POISONAUDIT_DATABASE_URL"], broker_url=st["env"]["POISONAUDIT_BROKER_URL"],
                        result_backend=st["env"]["POISONAUDIT_RESULT_BACKEND"])
    JobQueue(create_celery(settings)).enqueue_job(job_id, "attack", "cpu")
    time.sleep(45)
    st["pg"].start()
    up_at = time.monotonic()
    done = wait_for(lambda: (j := _job(st, str(job_id)))["status"] in ("succeeded", "failed") and j, 90,
                    "the queued job to run after the outage")
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    assert time.monotonic() - up_at < 60
