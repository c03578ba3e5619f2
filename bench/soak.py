"""Soak: a burst of tiny jobs drains on two workers, every job run once and succeeded.

The service stack of :mod:`bench.load` (a throwaway Postgres database, migrated; the Redis db
flushed before and after; one uvicorn API process), with two real Celery worker processes
(``soak1@host`` and ``soak2@host``, solo pool, ``OMP_NUM_THREADS=1``) instead of one busy one.

* The team's encoder: a random-init small_cnn (width 8) uploaded as a checkpoint, which a worker
  checks and marks ready; the jobs run on ``digits`` (built in).
* The burst: ``jobs`` gc_feature jobs (relative GradPC step, 20 GC steps, no defences; seed i, so
  no two requests are alike), each with its own Idempotency-Key, posted as fast as a pool of
  ``clients`` threads over keep-alive HTTP connections can; each submit's latency is recorded.
  The workers start on the queue while it fills. Before it, not in the latencies: one warm-up job
  (the API's first submission pays lazy imports), then one from each client at once (connections,
  the API's threads and pools filled to the burst's concurrency), run before the burst starts (the
  workers' job processes up); these are checked with the others.
* Idempotency under the burst: every request is replayed with its key while the queue drains;
  each replay must return the job the first request made.
* Drain: wait (bounded) until no job is queued or running, then verify from the database and the
  workers' logs: every job succeeded; ``attempts == 1`` for every job; each job's claim ("job ID
  runs on WORKER") appears exactly once over both workers' logs (none ran twice, none on two
  workers); both workers took jobs; every submit answered 202, every replay 202 with the same job.

Reports p50/p95/p99/max submit latency, the drain time (first submit to the last job's end),
jobs/s, per-worker counts; ``bench/results/soak.json``. Any failed check raises SystemExit (a
non-zero exit of ``python -m bench soak``) after the results are written.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import httpx

from bench.common import table, write
from bench.load import loadavg, service_stack, wait_for

TINY = {"step": "relative", "gc_steps": 20}
CLAIM = re.compile(r"job ([0-9a-f-]{36}) runs on (\S+)")
SKIP = re.compile(r"job ([0-9a-f-]{36}) not claimable")


def _pct(xs: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of xs."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


def _upload_encoder(client: httpx.Client, work) -> str:
    """A random-init small_cnn (width 8) uploaded as a checkpoint; its id once a worker marked it ready."""
    import torch

    from attacks.encoders import EncoderSpec, build_encoder, freeze, save_encoder

    torch.manual_seed(0)
    d = save_encoder(freeze(build_encoder(EncoderSpec(arch="small_cnn", in_channels=1, width=8))), work / "encoder")
    with open(d / "encoder.safetensors", "rb") as f:
        r = client.post("/v1/encoders", data={"name": "soak", "architecture": "small_cnn",
                                              "spec": json.dumps({"in_channels": 1, "width": 8})},
                        files={"file": ("encoder.safetensors", f)})
    r.raise_for_status()
    enc = r.json()["encoder"]["id"]
    wait_for(lambda: client.get(f"/v1/encoders/{enc}").json()["status"] == "ready", 120, "the encoder check")
    return enc


def run(device: str = "cpu", quick: bool = False, jobs: int | None = None, clients: int = 8,
        drain_timeout: float | None = None) -> list[dict]:
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    from app.models import Job, JobKind

    n = jobs or (20 if quick else 200)
    drain_timeout = drain_timeout or max(300.0, 10.0 * n)
    with service_stack("pa_soak_") as st:
        _, key = st.team("soak")
        workers = {name: st.worker(name) for name in ("soak1", "soak2")}
        api, base = st.api()
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base, headers=headers, timeout=60) as c:
            enc = _upload_encoder(c, st.work)
        bodies = [{"encoder": enc, "dataset": "digits", "attack": "gc_feature", "epsilon": 0.03, "params": TINY,
                   "seed": i, "device": "cpu", "defences": False} for i in range(n + 1 + clients)]
        keys = [f"soak-{uuid.uuid4().hex}" for _ in range(n + 1 + clients)]
        local = threading.local()
        opened: list[httpx.Client] = []

        def client() -> httpx.Client:
            if not hasattr(local, "c"):
                local.c = httpx.Client(base_url=base, headers=headers, timeout=60)
                opened.append(local.c)
            return local.c

        def post(i: int) -> tuple[int, float, str | None]:
            c = client()  # made once per thread, outside the timing (an httpx.Client is costly to make)
            t0 = time.perf_counter()
            sent_at[i] = t0
            try:
                r = c.post("/v1/jobs", json=bodies[i], headers={"Idempotency-Key": keys[i]})
            except httpx.HTTPError as exc:
                return -1, time.perf_counter() - t0, repr(exc)
            return r.status_code, time.perf_counter() - t0, r.json().get("id") if r.status_code < 300 else r.text[:300]

        sent_at = [0.0] * (n + 1 + clients)

        # Warm-up, not in the latencies: one job, the API's first submission (lazy imports), then one
        # job from each of the pool's threads at once (each its client and connection, the API's
        # threads, its database pool and the broker's producer pool filled to the burst's concurrency).
        # The same threads (and connections) then make the burst and the replays.
        pool = ThreadPoolExecutor(clients)
        cold = post(n)
        barrier = threading.Barrier(clients)

        def warm_post(i):
            barrier.wait(30)
            return post(n + 1 + i)

        warm = [cold, *pool.map(warm_post, range(clients))]
        eng = create_engine(st.db_url)

        def pending() -> int:
            with Session(eng) as s:
                rows = s.scalars(select(Job.status).where(Job.kind == JobKind.attack)).all()
            return sum(x in ("queued", "running") for x in rows)

        # ... and ran, so that both workers' job processes are up (steady state) when the burst comes.
        wait_for(lambda: pending() == 0, 300, "the warm-up jobs", interval=0.5)
        load_before = loadavg()
        started = datetime.now(timezone.utc)
        t0 = time.perf_counter()
        first = list(pool.map(post, range(n)))
        burst_s = time.perf_counter() - t0
        offsets = [x - t0 for x in sent_at[:n]]
        # Replays of every request with its key, while the queue drains: the same job, no second one.
        again = list(pool.map(post, range(n)))
        pool.shutdown()
        for x in opened:
            x.close()

        try:
            wait_for(lambda: pending() == 0, drain_timeout, f"{n} jobs to drain", interval=1.0)
            drained = True
        except RuntimeError:
            drained = False
        polled_s = time.perf_counter() - t0
        with Session(eng) as s:
            rows = s.execute(select(Job.id, Job.status, Job.attempts, Job.worker, Job.error, Job.created_at,
                                    Job.started_at, Job.finished_at).where(Job.kind == JobKind.attack)).all()
        eng.dispose()
        logs = {name: w.text() for name, w in workers.items()}
        alive = {name: w.p.poll() is None for name, w in workers.items()}
        api_log = api.text()

    total = n + 1 + clients
    lat_ms = [1e3 * t for code, t, _ in first]
    ids = [x for code, _, x in [*first, *warm] if code == 202]
    runs: dict[str, list[str]] = {}
    skipped = 0
    for name, text in logs.items():
        for m in CLAIM.finditer(text):
            runs.setdefault(m.group(1), []).append(name)
        skipped += len(SKIP.findall(text))
    by_status: dict[str, int] = {}
    for r in rows:
        by_status[r.status] = by_status.get(r.status, 0) + 1
    per_worker = {name: sum(1 for r in rows if (r.worker or "").startswith(name + "@")) for name in workers}
    ends = [r.finished_at for r in rows if r.finished_at is not None]
    drain_s = (max(ends) - started).total_seconds() if ends else float("nan")
    exec_s = [(r.finished_at - r.started_at).total_seconds() for r in rows if r.finished_at and r.started_at]
    wait_s = [(r.started_at - r.created_at).total_seconds() for r in rows if r.started_at]
    first_exec = {}  # each worker's first job: it starts the worker's forkserver (the preload's imports)
    for r in sorted((r for r in rows if r.started_at and r.finished_at), key=lambda r: r.started_at):
        first_exec.setdefault((r.worker or "").split("@")[0], (r.finished_at - r.started_at).total_seconds())
    slowest = sorted(range(n), key=lambda i: -lat_ms[i])[:5]
    errors = sorted({(r.error or "")[:200] for r in rows if r.status != "succeeded"})
    checks = {
        "every submit answered 202": all(code == 202 for code, _, _ in [*first, *warm]),
        "every replay returned its job (202, same id)": all(b[0] == 202 and b[2] == a[2] for a, b in zip(first, again)),
        f"{total} jobs in the database (burst + warm-up)": len(rows) == total and {str(r.id) for r in rows} == set(ids),
        "drained within the timeout": drained,
        "every job succeeded": by_status.get("succeeded", 0) == total,
        "attempts == 1 for every job": all(r.attempts == 1 for r in rows),
        "each job claimed exactly once over both workers' logs": len(runs) == total
        and all(len(v) == 1 for v in runs.values()),
        "log claims agree with the database's worker": all(
            runs.get(str(r.id), ["?"])[0] == (r.worker or "").split("@")[0] for r in rows),
        "both workers took jobs": all(v > 0 for v in per_worker.values()),
        "both workers alive at the end": all(alive.values()),
        "no traceback in the API log": "Traceback" not in api_log,
    }
    row = {
        "jobs": n, "clients": clients, "attack": "gc_feature", "params": TINY, "dataset": "digits",
        "submit_p50_ms": statistics.median(lat_ms), "submit_p95_ms": _pct(lat_ms, 0.95),
        "submit_p99_ms": _pct(lat_ms, 0.99), "submit_max_ms": max(lat_ms), "burst_s": burst_s,
        "submits_per_s": n / burst_s, "drain_s": drain_s, "jobs_per_s": total / drain_s if ends else 0.0,
        "cold_submit_ms": 1e3 * cold[1], "warmup_max_ms": max(1e3 * t for _, t, _ in warm[1:]),
        "polled_until_drained_s": polled_s, "job_exec_p50_s": statistics.median(exec_s) if exec_s else None,
        "job_exec_max_s": max(exec_s) if exec_s else None, "first_job_exec_s": first_exec,
        "slowest_submits": [{"sent_at_s": round(offsets[i], 3), "ms": round(lat_ms[i], 1)} for i in slowest],
        "queue_wait_max_s": max(wait_s) if wait_s else None,
        "per_worker": per_worker, "statuses": by_status, "non_202": [c for c, _, _ in first if c != 202][:20],
        "duplicate_deliveries_skipped": skipped, "errors": errors[:10], "loadavg_before": load_before,
        "loadavg_after": loadavg(), "checks": checks, "ok": all(checks.values()),
    }
    write("soak", [row], {"machine": f"{os.cpu_count()} cores", "api_processes": 1, "workers": 2,
                          "worker_pool": "solo, OMP_NUM_THREADS=1", "database": "postgres (loopback)",
                          "broker": "redis (loopback)", "client": f"httpx, {clients} threads, keep-alive"})
    print(table([row], ["jobs", "clients", "cold_submit_ms", "warmup_max_ms", "submit_p50_ms", "submit_p95_ms",
                        "submit_p99_ms", "submit_max_ms", "submits_per_s", "drain_s", "jobs_per_s", "job_exec_p50_s",
                        "duplicate_deliveries_skipped"]))
    print("per worker:", per_worker, " statuses:", by_status)
    for what, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {what}")
    if not row["ok"]:
        raise SystemExit(f"soak: {sum(not v for v in checks.values())} check(s) failed (bench/results/soak.json)")
    return [row]
