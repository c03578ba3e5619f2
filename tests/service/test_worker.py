"""The worker glue, tasks called directly (no broker): the real engine on tiny data, a
SQLite database and a local object store under tmp."""

from __future__ import annotations

import os
import threading
import time
import uuid

import numpy as np
import pytest
from sqlalchemy import select

from app.db import dispose_engines, new_session, utcnow
from app.models import Artifact, Dataset, Encoder, Job

from .helpers import REPO


@pytest.fixture
def env(configure, tiny_encoder_dir):
    """A migrated SQLite database, a team, and a ready tiny encoder in the local store."""
    from app.migrate import upgrade_schema
    from app.security import create_team
    from app.storage import encoder_key, get_store

    s = configure(heartbeat_interval_s=0.1, heartbeat_timeout_s=30, max_attempts=2)
    upgrade_schema(s.database_url)
    store = get_store()
    with new_session() as db:
        team = create_team(db, "t")
        enc = Encoder(team_id=team.id, name="tiny", architecture="small_cnn",
                      spec={"arch": "small_cnn", "in_channels": 1, "width": 8}, source="upload",
                      status="ready", sha256=uuid.uuid4().hex, size=1)
        db.add(enc)
        db.commit()
    for name in ("encoder.safetensors", "encoder.json"):
        store.put_file(encoder_key(team.id, enc.id, name), tiny_encoder_dir / name)
    yield {"settings": s, "store": store, "team": team, "encoder": enc}
    dispose_engines()


def _stored_dataset(db, store, team, name: str, path) -> Dataset:
    """A dataset row of ``team`` whose file ``path`` is in the store (flushed, not committed)."""
    from app.storage import dataset_key

    ds = Dataset(team_id=team.id, name=name, key="", sha256="", size=0, summary={})
    db.add(ds)
    db.flush()
    st = store.put_file(dataset_key(team.id, ds.id), path)
    ds.key, ds.sha256, ds.size = st.key, st.sha256, st.size
    return ds


def _job(env, **kw) -> uuid.UUID:
    fields = dict(team_id=env["team"].id, kind="attack", status="queued", attack="feature_matching",
                  encoder_id=env["encoder"].id, dataset="digits", epsilon=0.03, beta=0.25, seed=0, device="cpu",
                  params={"gc_steps": 50, "fm_steps": 20, "rounds": 1}, head={"epochs": 30}, queue="cpu",
                  max_attempts=2)
    fields.update(kw)
    with new_session() as db:
        job = Job(**fields)
        db.add(job)
        db.commit()
        return job.id


def _get(job_id) -> Job:
    with new_session() as db:
        return db.get(Job, job_id)


def _artifacts(job_id) -> dict[str, Artifact]:
    with new_session() as db:
        return {a.name: a for a in db.scalars(select(Artifact).where(Artifact.job_id == job_id))}


def test_run_job_succeeds_and_stores_artifacts(env):
    from worker.tasks import run_job

    jid = _job(env)
    assert run_job(str(jid)) == "succeeded"
    job = _get(jid)
    assert job.status == "succeeded" and job.error is None and job.attempts == 1
    assert job.metrics["n_poisons"] > 0 and job.device_used == "cpu" and job.progress_fraction == 1.0
    assert job.started_at <= job.finished_at and job.duration_s > 0
    arts = _artifacts(jid)
    assert set(arts) == {"poisoned_set.npz", "result.json", "log.txt", "figure-examples.png",
                         "figure-linf-histogram.png"}
    store = env["store"]
    for name in ("figure-examples.png", "figure-linf-histogram.png"):
        assert arts[name].content_type == "image/png"
        assert store.local_path(arts[name].key).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(job.metrics["defences"]) == {"linf", "knn", "spectral"}
    path = store.local_path(arts["poisoned_set.npz"].key)
    with np.load(path) as z:
        assert z["x"].shape == (job.metrics["n_poisons"], 1, 8, 8) and z["x"].dtype == np.float32
        assert z["y"].dtype == np.int64 and z["base_index"].shape == z["y"].shape
    assert b"stage" in path.with_name("log.txt").read_bytes()
    from app.storage import file_digest

    assert file_digest(path) == (arts["poisoned_set.npz"].sha256, arts["poisoned_set.npz"].size)
    # a redelivered message is a no-op
    assert run_job(str(jid)) == "skipped"
    assert _get(jid).attempts == 1


def test_a_job_without_defences_skips_them(env):
    from worker.tasks import run_job

    jid = _job(env, defences=False)
    assert run_job(str(jid)) == "succeeded"
    job = _get(jid)
    assert job.metrics["n_poisons"] > 0 and "defences" not in job.metrics


def test_the_worker_passes_the_precision_to_the_engine(env, configure, monkeypatch):
    """bf16 reaches run_job as amp=True (fp32 as False); on the CPU autocast is a no-op, and the
    result says what ran (metrics["bf16"] False). In-process, so that the spy sees the calls."""
    import attacks.pipeline
    from worker.tasks import run_job

    configure(job_isolation=False)

    seen = []
    real = attacks.pipeline.run_job

    def spy(**kw):
        seen.append(kw["amp"])
        return real(**kw)

    monkeypatch.setattr(attacks.pipeline, "run_job", spy)
    for precision in ("bf16", "fp32"):
        jid = _job(env, precision=precision, defences=False)
        assert run_job(str(jid)) == "succeeded"
        assert _get(jid).metrics["bf16"] is False
    assert seen == [True, False]


def test_features_are_cached_in_the_object_store_across_workers(env):
    import shutil

    from worker.tasks import run_job

    first = _job(env)
    run_job(str(first))
    keys = [k for k, _ in env["store"].list("cache/features")]
    assert len(keys) == 2  # f(train), f(test), by content hash
    # the engine's other cached files (a pre-trained decoder, say) are shared the same way
    engine_dir = env["settings"].cache_dir / "engine"
    (engine_dir / "decoders").mkdir()
    (engine_dir / "decoders" / "abc123.safetensors").write_bytes(b"decoder")
    from worker.resources import push_engine_cache

    push_engine_cache(env["store"], env["settings"], {p.relative_to(engine_dir).as_posix()
                                                      for p in engine_dir.rglob("*") if "features" in p.parts})
    assert env["store"].exists("cache/decoders/abc123.safetensors")
    shutil.rmtree(env["settings"].cache_dir)  # another worker: empty local cache
    second = _job(env, seed=1)
    run_job(str(second))
    assert _get(second).metrics["feature_cache"] == {"hits": 2, "misses": 0}
    assert (engine_dir / "decoders" / "abc123.safetensors").read_bytes() == b"decoder"


def test_engine_error_fails_the_job_with_its_message_and_keeps_the_log(env, configure, monkeypatch):
    from attacks.errors import AttackDiverged
    from worker import steps
    from worker.tasks import run_job

    configure(job_isolation=False)  # in-process: the patched step is this process's

    def diverge(run, encoder, dataset):
        run.progress("attack", 0.5)
        raise AttackDiverged("zeta became non-finite at step 7")

    monkeypatch.setattr(steps, "run_engine", diverge)
    jid = _job(env)
    assert run_job(str(jid)) == "failed"
    job = _get(jid)
    assert job.status == "failed" and "AttackDiverged: zeta became non-finite at step 7" in job.error
    assert set(_artifacts(jid)) == {"log.txt"}


def test_bad_dataset_fails_with_the_reason(env):
    from worker.tasks import run_job

    jid = _job(env, dataset="not-a-dataset")
    run_job(str(jid))
    job = _get(jid)
    assert job.status == "failed" and "not-a-dataset" in job.error


def _cancel_when_running(jid, after=0.5):
    def go():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            job = _get(jid)
            if job.status == "running" and job.progress_stage not in (None, "starting", "loading"):
                time.sleep(after)
                with new_session() as db:
                    db.get(Job, jid).cancel_requested = True
                    db.commit()
                return
            time.sleep(0.05)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def test_cancel_flag_stops_a_running_attack_within_seconds(env):
    from worker.tasks import run_job

    jid = _job(env, params={"gc_steps": 100000, "stop_loss": 0, "fm_steps": 100000, "rounds": 1})
    t = _cancel_when_running(jid)
    t0 = time.monotonic()
    assert run_job(str(jid)) == "cancelled"
    t.join(5)
    job = _get(jid)
    assert job.status == "cancelled" and job.error == "cancelled on request"
    assert time.monotonic() - t0 < 60 and job.progress_stage is not None


def test_time_limit_fails_the_job(env, configure):
    from worker.tasks import run_job

    configure(job_time_limit_s=2)
    jid = _job(env, params={"gc_steps": 100000, "stop_loss": 0, "rounds": 1})
    run_job(str(jid))
    job = _get(jid)
    assert job.status == "failed" and "time limit" in job.error


def test_a_run_that_lost_its_job_does_not_overwrite_it(env):
    from worker.tasks import run_job

    jid = _job(env, params={"gc_steps": 100000, "stop_loss": 0, "rounds": 1})

    def take_over():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if _get(jid).progress_stage not in (None, "starting", "loading", "features", "clean_head"):
                with new_session() as db:  # what the reaper does when it presumes the worker dead
                    job = db.get(Job, jid)
                    job.status, job.worker, job.error = "queued", None, "re-queued (test)"
                    db.commit()
                return
            time.sleep(0.05)

    t = threading.Thread(target=take_over, daemon=True)
    t.start()
    run_job(str(jid))
    t.join(5)
    job = _get(jid)
    assert job.status == "queued" and job.error == "re-queued (test)"


def test_check_encoder_accepts_fitting_weights_and_refuses_others_with_the_reason(env, tiny_encoder_dir):
    from app.storage import encoder_key
    from worker.tasks import check_encoder

    store, team = env["store"], env["team"]
    ids = {}
    for label, spec in (("fits", {"in_channels": 1, "width": 8}), ("wrong", {"in_channels": 1, "width": 16})):
        with new_session() as db:
            enc = Encoder(team_id=team.id, name=label, architecture="small_cnn", spec={"arch": "small_cnn", **spec},
                          source="upload", status="validating", weights_format="safetensors")
            db.add(enc)
            db.flush()
            enc.weights_key = store.put_file(encoder_key(team.id, enc.id, "upload.safetensors"),
                                             tiny_encoder_dir / "encoder.safetensors").key
            db.commit()
            ids[label] = enc.id
    assert check_encoder(str(ids["fits"])) == "ready"
    assert check_encoder(str(ids["wrong"])) == "failed"
    with new_session() as db:
        ok, bad = db.get(Encoder, ids["fits"]), db.get(Encoder, ids["wrong"])
    assert ok.error is None and ok.spec["feature_dim"] == 16
    assert store.exists(encoder_key(team.id, ok.id, "encoder.safetensors"))
    assert bad.status == "failed" and "shape" in bad.error.lower()
    assert check_encoder(str(ids["fits"])) == "skipped"


def test_pretrain_task_produces_a_ready_encoder(env, digits_npz):
    from app.storage import encoder_key
    from worker.tasks import pretrain_encoder

    store, team = env["store"], env["team"]
    with new_session() as db:
        ds = _stored_dataset(db, store, team, "d", digits_npz)
        enc = Encoder(team_id=team.id, name="p", architecture="small_cnn",
                      spec={"arch": "small_cnn", "in_channels": 1, "width": 4}, source="pretrain", status="pending")
        db.add(enc)
        db.commit()
    jid = _job(env, kind="pretrain", attack=None, encoder_id=enc.id, dataset=str(ds.id), dataset_id=ds.id,
               epsilon=None, beta=None, params={"epochs": 1, "batch_size": 64})
    assert pretrain_encoder(str(jid)) == "succeeded"
    job = _get(jid)
    with new_session() as db:
        enc = db.get(Encoder, enc.id)
    assert enc.status == "ready" and enc.sha256 and job.metrics["fingerprint"]
    assert store.exists(encoder_key(team.id, enc.id, "encoder.json"))
    # and it can be attacked with
    from worker.tasks import run_job

    assert run_job(str(_job(env, encoder_id=enc.id))) == "succeeded"


def test_pretrain_with_bad_config_fails_the_job_and_the_encoder(env):
    from worker.tasks import pretrain_encoder

    with new_session() as db:
        enc = Encoder(team_id=env["team"].id, name="p", architecture="small_cnn", spec={"arch": "small_cnn"},
                      source="pretrain", status="pending")
        db.add(enc)
        db.commit()
    jid = _job(env, kind="pretrain", attack=None, encoder_id=enc.id, params={"epochs": 0})
    pretrain_encoder(str(jid))
    with new_session() as db:
        enc = db.get(Encoder, enc.id)
    assert _get(jid).status == "failed" and "epochs" in _get(jid).error
    assert enc.status == "failed" and "epochs" in enc.error


# ------------------------------------------------------------------ the reaper
class _Q:
    def __init__(self):
        self.sent = []

    def enqueue_job(self, job_id, kind, queue):
        self.sent.append(str(job_id))


def test_reaper_requeues_then_fails_with_the_reason(env, configure):
    from datetime import timedelta

    from app.reaper import reap_stale_jobs, reap_worker_orphans

    s = configure(heartbeat_timeout_s=5)
    old = utcnow() - timedelta(seconds=60)
    fresh = _job(env, status="running", attempts=1, heartbeat_at=utcnow(), started_at=old, worker="w@h:1")
    retry = _job(env, status="running", attempts=1, heartbeat_at=old, started_at=old, worker="w@h:2")
    spent = _job(env, status="running", attempts=2, heartbeat_at=old, started_at=old, worker="w@h:3")
    cancelled = _job(env, status="running", attempts=1, heartbeat_at=old, started_at=old, worker="w@h:4",
                     cancel_requested=True)
    q = _Q()
    with new_session() as db:
        out = reap_stale_jobs(db, q, s)
    assert out == {str(retry): "requeued", str(spent): "failed", str(cancelled): "cancelled"}
    assert q.sent == [str(retry)]
    assert _get(fresh).status == "running"
    assert _get(retry).status == "queued" and "lost" in _get(retry).error and "attempt 2 of 2" in _get(retry).error
    assert _get(spent).status == "failed" and "no heartbeat" in _get(spent).error and "2 attempt" in _get(spent).error
    assert _get(cancelled).status == "cancelled"
    assert all("w@h" not in _get(j).error for j in (retry, spent, cancelled))  # the worker stays in the server log
    with new_session() as db:
        assert reap_stale_jobs(db, q, s) == {}
        assert reap_worker_orphans(db, q, "w@h") == {str(fresh): "requeued"}


def test_encoders_sharing_weights_keep_their_own_spec_in_the_worker_cache(configure, store, tmp_path):
    """Same checkpoint bytes (same sha256), different preprocessing: each job gets its own encoder."""
    import uuid as _uuid
    from types import SimpleNamespace

    import torch

    from app.settings import get_settings
    from attacks.encoders import EncoderSpec, build_encoder, save_encoder
    from worker.resources import load_job_encoder, store_encoder_dir

    torch.manual_seed(0)
    plain = build_encoder(EncoderSpec(arch="small_cnn", in_channels=1, width=4))
    resized = build_encoder(EncoderSpec(arch="small_cnn", in_channels=1, width=4, input_size=28))
    resized.load_state_dict(plain.state_dict())
    team = _uuid.uuid4()
    rows = []
    for i, enc in enumerate((plain, resized)):
        row = SimpleNamespace(id=_uuid.uuid4(), team_id=team, sha256="a" * 64)
        store_encoder_dir(row, save_encoder(enc, tmp_path / f"e{i}"), store)
        rows.append(row)
    a, b = (load_job_encoder(r, store, get_settings()) for r in rows)
    assert a.spec.input_size is None and b.spec.input_size == 28


def test_a_queued_job_whose_message_was_lost_is_sent_again(env, configure):
    from datetime import timedelta

    from app.reaper import resend_stale_queued

    s = configure(queued_resend_s=600, unsent_resend_s=30)
    hour_ago, minute_ago = utcnow() - timedelta(seconds=3600), utcnow() - timedelta(seconds=60)
    lost = _job(env, status="queued", created_at=hour_ago, enqueued_at=hour_ago)
    recent = _job(env, status="queued", created_at=minute_ago, enqueued_at=minute_ago)
    unsent = _job(env, status="queued", created_at=minute_ago)  # the API died between commit and send
    just_made = _job(env, status="queued", created_at=utcnow())  # its API may be sending it right now
    cancelled = _job(env, status="queued", created_at=hour_ago, cancel_requested=True)
    done = _job(env, status="succeeded", created_at=hour_ago)
    q = _Q()
    with new_session() as db:
        assert resend_stale_queued(db, q, s) == {str(lost): "resent", str(unsent): "resent"}
    assert sorted(q.sent) == sorted([str(lost), str(unsent)])
    assert _get(lost).enqueued_at > minute_ago and _get(unsent).enqueued_at is not None
    assert _get(just_made).enqueued_at is None
    with new_session() as db:  # just re-sent: not again until queued_resend_s has passed
        assert resend_stale_queued(db, q, s) == {}
    assert {_get(j).status for j in (recent, cancelled, done)} == {"queued", "succeeded"}


# ------------------------------------------------------------------ limits the engine does not see (#13)
def _sleep_body(run):
    """A job stuck where no check reaches (a C call): only the worker can end it."""
    run.progress("stuck", 0.0)
    time.sleep(30)


def _claimed(env, **kw):
    from worker.runner import JobRun

    jid = _job(env, **kw)
    return jid, JobRun.claim(str(jid), "w@test")


def test_the_worker_kills_a_job_past_its_hard_time_limit(env, configure):
    configure(job_time_limit_s=2)
    jid, run = _claimed(env)
    t0 = time.monotonic()
    with run:
        run.isolated(_sleep_body)
    job = _get(jid)
    assert job.status == "failed" and job.error == "time limit exceeded (2s)"
    assert time.monotonic() - t0 < 20  # not the 30 s the body sleeps
    assert "log.txt" in _artifacts(jid)


def test_the_worker_kills_a_job_that_ignores_its_cancel(env, configure):
    configure(job_kill_grace_s=1)
    jid, run = _claimed(env)
    t = _cancel_when_running(jid, after=0.2)
    t0 = time.monotonic()
    with run:
        run.isolated(_sleep_body)
    t.join(5)
    job = _get(jid)
    assert job.status == "cancelled" and job.error == "cancelled on request"
    assert time.monotonic() - t0 < 20


def test_a_long_sgd_head_fit_is_stopped_by_the_time_limit(env, configure):
    """The issue's job: an SGD recipe with batch size 1 and 10000 epochs (hours), under a 15 s limit."""
    from worker.tasks import run_job

    configure(job_time_limit_s=15)
    jid = _job(env, attack="gradpc", params={}, beta=None, defences=False,
               head={"optimizer": "sgd", "epochs": 10000, "batch_size": 1})
    t0 = time.monotonic()
    assert run_job(str(jid)) == "failed"
    job = _get(jid)
    assert job.error == "time limit exceeded (15s)" and time.monotonic() - t0 < 45
    assert job.progress_stage == "clean_head"  # stopped inside the head fit


def test_the_default_soft_limit_leaves_most_of_the_limit():
    from app.settings import Settings

    assert Settings(job_time_limit_s=20).job_soft_time_limit_s == 18
    assert Settings(job_time_limit_s=61).job_soft_time_limit_s == pytest.approx(54.9)
    assert Settings(job_time_limit_s=6 * 3600).job_soft_time_limit_s == 6 * 3600 - 60
    for limit in (1, 2, 10, 60, 61, 120, 600, 3600):
        assert 0.5 * limit <= Settings(job_time_limit_s=limit).job_soft_time_limit_s < limit


# ------------------------------------------------------------------ the job's log is the job's (#13)
@pytest.mark.parametrize("isolation", [True, False])
def test_a_jobs_log_holds_its_own_lines_only(env, configure, isolation):
    import logging

    from worker.tasks import run_job

    configure(job_isolation=isolation)
    other = uuid.uuid4()
    stop = threading.Event()

    def reaper_like():  # another thread of the worker logging about another team's job meanwhile
        while not stop.is_set():
            logging.getLogger("app.reaper").warning("job %s: worker lost -> requeued", other)
            time.sleep(0.05)

    t = threading.Thread(target=reaper_like, daemon=True)
    t.start()
    try:
        jid = _job(env, defences=False)
        assert run_job(str(jid)) == "succeeded"
    finally:
        stop.set()
        t.join(5)
    text = env["store"].local_path(_artifacts(jid)["log.txt"].key).read_text()
    assert f"job {jid}" in text and "stage" in text
    assert str(other) not in text and "app.reaper" not in text


def test_errors_and_logs_carry_no_server_paths_or_host_names(env):
    """A dataset that is no npz fails the job with the loader's reason, which names the worker's
    cache file: the job's error and log show its name only; the traceback stays in the server log."""
    import socket

    from worker.tasks import run_job

    store, team = env["store"], env["team"]
    bad = env["settings"].data_dir / "bad.npz"
    bad.write_bytes(b"not a zip archive at all")
    with new_session() as db:
        ds = _stored_dataset(db, store, team, "bad", bad)
        sha = ds.sha256
        db.commit()
    jid = _job(env, dataset=str(ds.id), dataset_id=ds.id)
    assert run_job(str(jid)) == "failed"
    job = _get(jid)
    log_text = store.local_path(_artifacts(jid)["log.txt"].key).read_text()
    assert f"{sha}.npz" in job.error  # the reason still says which file
    for text in (job.error, log_text):
        assert str(env["settings"].data_dir) not in text and "/tmp" not in text and "/work" not in text
        assert f"{socket.gethostname()}:{os.getpid()}" not in text and str(REPO) not in text  # the worker's id
        assert "Traceback" not in text and ".py" not in text
    assert "failed" in log_text
