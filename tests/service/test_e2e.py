"""End to end through HTTP only, on the production-like stack: the real Postgres and Redis
of this machine, a moto S3 server, an API process (uvicorn) and Celery worker processes
started here. Runs in file order: each test builds on the previous ones."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from .helpers import clean_env, start_api, start_worker, wait_for

pytestmark = pytest.mark.integration

FAST = {"gc_steps": 50, "fm_steps": 20, "rounds": 1}
LONG = {"gc_steps": 100000, "stop_loss": 0, "fm_steps": 100000, "rounds": 1}
# Long enough to be caught in its attack stage and killed there: GC on digits' 43 poisons is ~50 us a
# step and shared through the stage cache, so the feature-matching steps carry the duration (~1 ms
# each on an idle 2-core machine: ~8 s; 400 steps, 0.4 s, finished before a poll could see them).
MEDIUM = {"gc_steps": 2500, "stop_loss": 0, "fm_steps": 8000, "rounds": 1}


def create_team(env, name) -> dict[str, str]:
    r = subprocess.run([sys.executable, "-m", "app.cli", "create-team", name, "--with-key"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    key = re.search(r"api key \(shown once\): (\S+)", r.stdout).group(1)
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def stack(pg_databases, redis_url, s3_endpoint, tmp_path_factory):
    logs = tmp_path_factory.mktemp("e2e-logs")
    env = clean_env(
        POISONAUDIT_DATA_DIR=tmp_path_factory.mktemp("e2e-var"),
        POISONAUDIT_DATABASE_URL=pg_databases(),
        POISONAUDIT_BROKER_URL=redis_url,
        POISONAUDIT_RESULT_BACKEND=redis_url,
        POISONAUDIT_STORAGE_BACKEND="s3",
        POISONAUDIT_S3_ENDPOINT_URL=s3_endpoint,
        POISONAUDIT_S3_BUCKET="e2e",
        POISONAUDIT_S3_CREATE_BUCKET="true",
        POISONAUDIT_S3_ACCESS_KEY_ID="test",
        POISONAUDIT_S3_SECRET_ACCESS_KEY="test",
        POISONAUDIT_HEARTBEAT_INTERVAL_S="0.5",
        POISONAUDIT_HEARTBEAT_TIMEOUT_S="5",
        POISONAUDIT_REAPER_INTERVAL_S="1",
        POISONAUDIT_MAX_ATTEMPTS="2",
        POISONAUDIT_ENCODER_CHECK_WAIT_S="60",
        POISONAUDIT_AUTO_QUEUE="cpu",
    )
    procs = []
    try:
        api, base = start_api(env, logs)
        procs.append(api)
        teams = {"a": create_team(env, "e2e-a"), "b": create_team(env, "e2e-b")}
        w1 = start_worker("w1", env, logs)
        procs.append(w1)
        state = {"env": env, "logs": logs, "base": base, "teams": teams, "workers": {"w1": w1}, "procs": procs}
        yield state
    finally:
        for p in reversed(procs):
            p.stop()


@pytest.fixture
def a(stack):
    with httpx.Client(base_url=stack["base"], headers=stack["teams"]["a"], timeout=30) as c:
        yield c


@pytest.fixture
def b(stack):
    with httpx.Client(base_url=stack["base"], headers=stack["teams"]["b"], timeout=30) as c:
        yield c


def wait_job(client, job_id, statuses=("succeeded", "failed", "cancelled"), timeout=120.0) -> dict:
    def done():
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_for(done, timeout, f"job {job_id} to reach {statuses}")


def submit(client, stack, params, **kw) -> dict:
    body = {"encoder": stack["encoder"], "dataset": "digits", "attack": "feature_matching", "epsilon": 0.03,
            "params": params, "head": {"epochs": 30}, "seed": 0, **kw}
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return r.json()


def test_ready(a, stack):
    assert a.get("/readyz").json()["checks"] == {"database": "ok", "broker": "ok"}


def test_upload_dataset_and_pretrain_an_encoder(a, stack, digits_npz):
    with open(digits_npz, "rb") as f:
        ds = a.post("/v1/datasets", files={"file": ("d.npz", f)}, data={"name": "digits200"}).json()
    r = a.post("/v1/encoders/pretrain", json={"name": "simclr", "architecture": "small_cnn", "dataset": ds["id"],
                                     "spec": {"in_channels": 1, "width": 8}, "config": {"epochs": 1, "batch_size": 64}})
    assert r.status_code == 202, r.text
    job = wait_job(a, r.json()["job"]["id"])
    assert job["status"] == "succeeded", job["error"]
    enc = a.get(f"/v1/encoders/{r.json()['encoder']['id']}").json()
    assert enc["status"] == "ready" and enc["spec"]["feature_dim"] == 16
    stack["encoder"] = enc["id"]


def test_upload_a_checkpoint_checked_by_a_worker(a, stack, tiny_encoder_dir):
    spec = json.dumps({"in_channels": 1, "width": 8})
    with open(tiny_encoder_dir / "encoder.safetensors", "rb") as f:
        r = a.post("/v1/encoders", data={"architecture": "small_cnn", "spec": spec}, files={"file": ("w.safetensors", f)})
    assert r.status_code == 201, r.text
    assert r.json()["encoder"]["status"] == "ready"
    with open(tiny_encoder_dir / "encoder.safetensors", "rb") as f:
        r = a.post("/v1/encoders", data={"architecture": "small_cnn", "spec": json.dumps({"in_channels": 1, "width": 32})},
                   files={"file": ("w.safetensors", f)})
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
    assert "shape" in r.json()["detail"].lower()


def test_feature_matching_end_to_end(a, stack):
    from attacks.data import load_dataset

    job = submit(a, stack, FAST)
    again = a.post("/v1/jobs", json={"encoder": stack["encoder"], "dataset": "digits", "attack": "feature_matching",
                                     "params": FAST, "head": {"epochs": 30}},
                   headers={"Idempotency-Key": "same"})
    replay = a.post("/v1/jobs", json={"encoder": stack["encoder"], "dataset": "digits", "attack": "feature_matching",
                                      "params": FAST, "head": {"epochs": 30}},
                    headers={"Idempotency-Key": "same"})
    assert again.json()["id"] == replay.json()["id"]
    job = wait_job(a, job["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["worker"].startswith("w1@") and job["device_used"] == "cpu" and job["progress"]["fraction"] == 1.0
    assert job["metrics"]["n_poisons"] == 43 and 0 <= job["metrics"]["poisoned_accuracy"] <= 1
    assert {x["name"] for x in job["artifacts"]} == {"poisoned_set.npz", "result.json", "log.txt",
                                                     "figure-examples.png", "figure-linf-histogram.png"}
    report = a.get(f"/v1/jobs/{job['id']}/report")
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    assert report.text.count('src="data:image/png;base64,') == 2 and 'id="defences-table"' in report.text
    from tests.test_report import parse

    enc = {r[0]: r[1] for r in parse(report.text).cells["encoder-table"]}  # the encoder, by name and weights
    assert enc["id"] == stack["encoder"] and enc["architecture"] == "small_cnn" and enc["name"]
    assert enc["fingerprint"] == job["metrics"]["encoder_fingerprint"] and len(enc["fingerprint"]) >= 16

    r = a.get(f"/v1/jobs/{job['id']}/poisoned-set")
    assert r.status_code == 307  # a short-lived presigned URL on S3
    data = httpx.get(r.headers["location"]).content  # no API key needed
    path = stack["logs"] / "poisoned.npz"
    path.write_bytes(data)
    digits = load_dataset("digits")
    with np.load(path) as z:
        assert z["x"].shape == (43, 1, 8, 8) and z["x"].dtype == np.float32
        assert np.array_equal(z["y"], digits.y_train.numpy()[z["base_index"]])
    assert a.get(f"/v1/jobs/{job['id']}/artifacts/result.json", follow_redirects=True).json()["n_poisons"] == 43

    listed = a.get("/v1/jobs", params={"attack": "feature_matching", "status": "succeeded"}).json()
    assert job["id"] in [j["id"] for j in listed["data"]]
    stack["job"] = job["id"]
    wait_job(a, again.json()["id"])


def test_cancel_a_long_job(a, stack):
    job = submit(a, stack, LONG)
    wait_for(lambda: a.get(f"/v1/jobs/{job['id']}").json()["progress"]["stage"] not in (None, "starting", "loading"),
             90, "the long job to make progress")
    t0 = time.monotonic()
    r = a.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"]
    done = wait_job(a, job["id"], timeout=30)
    assert done["status"] == "cancelled" and time.monotonic() - t0 < 15
    assert "log.txt" in {x["name"] for x in done["artifacts"]}


def test_tenancy(a, b, stack):
    jid = stack["job"]
    for path in (f"/v1/jobs/{jid}", f"/v1/jobs/{jid}/poisoned-set", f"/v1/jobs/{jid}/artifacts", f"/v1/jobs/{jid}/report",
                 f"/v1/encoders/{stack['encoder']}"):
        r = b.get(path)
        assert r.status_code == 404, path
    assert b.post(f"/v1/jobs/{jid}/cancel").status_code == 404
    assert b.get("/v1/jobs").json()["count"] == 0 and b.get("/v1/encoders").json()["count"] == 0
    assert b.post("/v1/jobs", json={"encoder": stack["encoder"], "dataset": "digits", "attack": "gradpc"}).status_code == 422


def test_killed_worker_job_is_requeued_and_finishes(a, stack):
    job = submit(a, stack, MEDIUM)
    wait_for(lambda: a.get(f"/v1/jobs/{job['id']}").json()["progress"]["stage"]
             in ("gradpc", "gc_feature", "feature_matching"), 90, "the job to be in its attack stage")
    stack["workers"]["w1"].kill()  # SIGKILL mid-job: no chance to clean up
    assert a.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
    w2 = start_worker("w2", stack["env"], stack["logs"])
    stack["procs"].append(w2)
    done = wait_job(a, job["id"], timeout=300)
    assert done["status"] in ("succeeded", "failed"), done
    if done["status"] == "failed":
        assert "lost" in done["error"]
    else:
        assert done["attempts"] == 2 and done["worker"].startswith("w2@")


ENDLESS = {"attack": "gradpc", "defences": False,
           "head": {"optimizer": "sgd", "epochs": 10000, "batch_size": 1}}  # valid, and hours of SGD steps


def test_a_job_past_its_time_limit_fails_and_the_next_one_runs(a, stack):
    """#13: a worker with a 20 s limit ends the issue's job failed on time (its head fit stopped at
    the limit or its process killed), then runs the next job; a cancel ends such a job at once."""
    for p in stack["procs"]:
        if p.name.startswith("w") and p.alive():  # w2 (w1 was killed): this worker alone takes jobs now
            p.stop()
    env = {**stack["env"], "POISONAUDIT_JOB_TIME_LIMIT_S": "20", "POISONAUDIT_JOB_KILL_GRACE_S": "3"}
    w3 = start_worker("w3", env, stack["logs"])
    stack["procs"].append(w3)
    stack["workers"]["w3"] = w3
    job = submit(a, stack, {}, **ENDLESS)
    wait_for(lambda: a.get(f"/v1/jobs/{job['id']}").json()["status"] != "queued", 90, "the long job to start")
    t0 = time.monotonic()
    done = wait_job(a, job["id"], timeout=120)
    assert done["status"] == "failed" and done["error"] == "time limit exceeded (20s)", done
    assert time.monotonic() - t0 < 20 + 30 and done["duration_s"] < 20 + 15
    assert "log.txt" in {x["name"] for x in done["artifacts"]}
    # GC in feature space whose step sweep (short GC runs and victim fits, no progress of their own)
    # runs ~10 x 100000 GC steps: stopped inside the sweep, not after it
    sweep = submit(a, stack, {"auto_gc_steps": 100000, "gc_steps": 100000, "stop_loss": 0}, attack="gc_feature")
    done = wait_job(a, sweep["id"], timeout=120)
    assert done["status"] == "failed" and done["error"] == "time limit exceeded (20s)", done
    assert done["duration_s"] < 20 + 15
    nxt = wait_job(a, submit(a, stack, FAST)["id"], timeout=120)
    assert nxt["status"] == "succeeded" and nxt["worker"].startswith("w3@"), nxt

    job = submit(a, stack, {}, **{**ENDLESS, "seed": 1})
    wait_for(lambda: a.get(f"/v1/jobs/{job['id']}").json()["progress"]["stage"] not in (None, "starting", "loading"),
             90, "the long job to make progress")
    t0 = time.monotonic()
    assert a.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    done = wait_job(a, job["id"], timeout=30)
    assert done["status"] == "cancelled" and time.monotonic() - t0 < 15


def test_metrics(a, stack):
    text = httpx.get(stack["base"] + "/metrics").text
    assert re.search(r'poisonaudit_jobs\{kind="attack",status="succeeded"\} [1-9]', text)
    assert re.search(r'poisonaudit_jobs\{kind="attack",status="cancelled"\} [1-9]', text)
    assert re.search(r'poisonaudit_job_duration_seconds_count\{status="succeeded"\} [1-9]', text)
    assert 'poisonaudit_broker_messages{queue="gpu"}' in text
