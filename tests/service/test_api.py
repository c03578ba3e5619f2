"""HTTP API at unit level: real database (rolled back per test), recording queue, local store."""

from __future__ import annotations

import io
import json
import uuid

import pytest

from attacks.catalogue import CATALOGUE


def _job_body(encoder_id, **kw):
    body = {"encoder": str(encoder_id), "dataset": "digits", "attack": "feature_matching", "epsilon": 0.03,
            "params": {"gc_steps": 50, "fm_steps": 20, "rounds": 1}, "head": {"epochs": 30}}
    body.update(kw)
    return body


def _problem(r, status):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


# ------------------------------------------------------------------ auth
def test_requests_without_a_valid_key_get_401(client):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"X-API-Key": "pa_000000000000_wrong"}):
        p = _problem(client.get("/v1/jobs", headers=headers), 401)
        assert "API key" in p["detail"]


def test_defences_option_is_stored_and_shown(client, session, team_a, ready_encoder):
    from app.models import Job

    _, h = team_a
    default = client.post("/v1/jobs", json=_job_body(ready_encoder.id), headers=h).json()
    off = client.post("/v1/jobs", json=_job_body(ready_encoder.id, defences=False), headers=h).json()
    assert default["defences"] is True and off["defences"] is False
    assert client.get(f"/v1/jobs/{off['id']}", headers=h).json()["defences"] is False
    assert session.get(Job, uuid.UUID(off["id"])).defences is False
    p = _problem(client.post("/v1/jobs", json=_job_body(ready_encoder.id, defences="maybe"), headers=h), 422)
    assert any(e["field"] == "defences" for e in p["errors"])


def test_precision_option_is_stored_and_shown(client, session, team_a, ready_encoder):
    from app.models import Job

    _, h = team_a
    default = client.post("/v1/jobs", json=_job_body(ready_encoder.id), headers=h).json()
    bf16 = client.post("/v1/jobs", json=_job_body(ready_encoder.id, precision="bf16"), headers=h).json()
    assert default["precision"] == "fp32" and bf16["precision"] == "bf16"
    assert client.get(f"/v1/jobs/{bf16['id']}", headers=h).json()["precision"] == "bf16"
    assert session.get(Job, uuid.UUID(bf16["id"])).precision == "bf16"
    p = _problem(client.post("/v1/jobs", json=_job_body(ready_encoder.id, precision="fp16"), headers=h), 422)
    assert any(e["field"] == "precision" for e in p["errors"])


def test_precision_default_keeps_the_idempotency_hash_of_earlier_requests(client, team_a, ready_encoder, queue):
    """A replay that leaves precision out and one that says fp32 are the same request; bf16 is another."""
    _, h = team_a
    key = {**h, "Idempotency-Key": "prec-1"}
    first = client.post("/v1/jobs", json=_job_body(ready_encoder.id), headers=key)
    again = client.post("/v1/jobs", json=_job_body(ready_encoder.id, precision="fp32"), headers=key)
    assert first.status_code == again.status_code == 202 and again.json()["id"] == first.json()["id"]
    p = _problem(client.post("/v1/jobs", json=_job_body(ready_encoder.id, precision="bf16"), headers=key), 422)
    assert "Idempotency-Key" in p["detail"]


def test_job_status_read_checks_the_key_and_lists_artifacts(client, session, team_a, team_b, ready_encoder):
    """GET /v1/jobs/{id} (one joined query on its common path): every way a key can be wrong
    is a 401, another team's or a missing job a 404, artifacts listed by name."""
    from datetime import datetime, timezone

    from sqlalchemy import select

    from app.models import ApiKey, Artifact

    team, h = team_a
    job_id = client.post("/v1/jobs", json=_job_body(ready_encoder.id), headers=h).json()["id"]
    r = client.get(f"/v1/jobs/{job_id}", headers=h)
    assert r.status_code == 200 and r.json()["artifacts"] == []
    for name in ("result.json", "poisoned_set.npz"):
        session.add(Artifact(team_id=team.id, job_id=uuid.UUID(job_id), name=name, content_type="application/json",
                             key=f"jobs/{job_id}/{name}", sha256="0" * 64, size=3))
    session.commit()
    body = client.get(f"/v1/jobs/{job_id}", headers=h).json()
    assert [a["name"] for a in body["artifacts"]] == ["poisoned_set.npz", "result.json"]
    assert body["id"] == job_id and body["status"] == "queued"

    key = h["Authorization"].split()[1]
    assert client.get(f"/v1/jobs/{job_id}", headers={"X-API-Key": key}).status_code == 200
    wrong_secret = key[: key.rindex("_") + 1] + "x" * 43  # the right prefix, another secret
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Bearer {wrong_secret}"}):
        _problem(client.get(f"/v1/jobs/{job_id}", headers=headers), 401)
        _problem(client.get(f"/v1/jobs/{uuid.uuid4()}", headers=headers), 401)
    _, hb = team_b
    _problem(client.get(f"/v1/jobs/{job_id}", headers=hb), 404)
    _problem(client.get(f"/v1/jobs/{uuid.uuid4()}", headers=h), 404)
    _problem(client.get("/v1/jobs/not-a-uuid", headers=h), 422)

    row = session.scalar(select(ApiKey).where(ApiKey.team_id == team.id))
    row.revoked_at = datetime.now(timezone.utc)
    session.commit()
    _problem(client.get(f"/v1/jobs/{job_id}", headers=h), 401)


def test_x_api_key_header_works_too(client, team_a):
    _, headers = team_a
    key = headers["Authorization"].split()[1]
    assert client.get("/v1/jobs", headers={"X-API-Key": key}).status_code == 200


def test_keys_are_stored_hashed(session, team_a):
    from sqlalchemy import select

    from app.models import ApiKey

    team, headers = team_a
    key = headers["Authorization"].split()[1]
    row = session.scalar(select(ApiKey).where(ApiKey.team_id == team.id))
    assert key not in (row.key_hash, row.prefix) and len(row.key_hash) == 64


# ------------------------------------------------------------------ submission and validation
def test_submit_returns_202_location_and_enqueues_by_device(client, team_a, ready_encoder, queue):
    _, h = team_a
    r = client.post("/v1/jobs", json=_job_body(ready_encoder.id, device="cpu"), headers=h)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["beta"] == 0.25 and job["queue"] == "cpu"
    assert queue.sent == [(job["id"], "attack", "cpu")]
    r = client.post("/v1/jobs", json=_job_body(ready_encoder.id, device="cuda"), headers=h)
    assert queue.sent[-1] == (r.json()["id"], "attack", "gpu")


def test_idempotency_key_returns_the_same_job(client, team_a, ready_encoder, queue):
    _, h = team_a
    hk = {**h, "Idempotency-Key": "retry-1"}
    first = client.post("/v1/jobs", json=_job_body(ready_encoder.id), headers=hk)
    second = client.post("/v1/jobs", json=_job_body(ready_encoder.id), headers=hk)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"] and len(queue.sent) == 1
    p = _problem(client.post("/v1/jobs", json=_job_body(ready_encoder.id, epsilon=0.1), headers=hk), 422)
    assert "Idempotency-Key" in p["detail"]


def test_epsilon_outside_bounds_is_422_naming_the_field(client, team_a, ready_encoder):
    _, h = team_a
    for eps in (0, -0.1, 1.5):
        p = _problem(client.post("/v1/jobs", json=_job_body(ready_encoder.id, epsilon=eps), headers=h), 422)
        assert [e["field"] for e in p["errors"]] == ["epsilon"]
    assert client.post("/v1/jobs", json=_job_body(ready_encoder.id, epsilon=1.0), headers=h).status_code == 202


def test_unknown_attack_is_422_with_the_valid_ones(client, team_a, ready_encoder):
    _, h = team_a
    p = _problem(client.post("/v1/jobs", json=_job_body(ready_encoder.id, attack="nope"), headers=h), 422)
    assert p["errors"][0]["field"] == "attack"
    assert p["valid"] == sorted(CATALOGUE)
    for name in CATALOGUE:
        assert name in p["detail"]


def test_params_an_attack_does_not_take_are_named(client, team_a, ready_encoder):
    _, h = team_a
    body = _job_body(ready_encoder.id, epsilon=2, params={"warp_factor": 9, "gc_steps": 0})
    p = _problem(client.post("/v1/jobs", json=body, headers=h), 422)
    fields = {e["field"] for e in p["errors"]}
    assert fields == {"epsilon", "params.warp_factor", "params.gc_steps"}


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_each_attack_validates_its_own_params(client, team_a, ready_encoder, name):
    _, h = team_a
    info = CATALOGUE[name]
    beta = 0.25 if info.takes_beta else None
    ok = client.post("/v1/jobs", json=_job_body(ready_encoder.id, attack=name, params={}, beta=beta), headers=h)
    assert ok.status_code == 202, ok.text
    bad = client.post("/v1/jobs", json=_job_body(ready_encoder.id, attack=name, params={"eps_w": -1}, beta=beta), headers=h)
    assert _problem(bad, 422)["errors"][0]["field"] == "params.eps_w"


def test_beta_for_an_attack_without_one_is_422(client, team_a, ready_encoder):
    _, h = team_a
    p = _problem(client.post("/v1/jobs", json=_job_body(ready_encoder.id, attack="gradpc", params={}, beta=0.1), headers=h), 422)
    assert p["errors"][0]["field"] == "beta"


def test_unknown_fields_wrong_types_and_bad_references(client, team_a, team_b, ready_encoder):
    _, h = team_a
    p = _problem(client.post("/v1/jobs", json=_job_body(ready_encoder.id, colour="red"), headers=h), 422)
    assert p["errors"][0]["field"] == "colour"
    p = _problem(client.post("/v1/jobs", json=_job_body("not-a-uuid"), headers=h), 422)
    assert p["errors"][0]["field"] == "encoder"
    p = _problem(client.post("/v1/jobs", json=_job_body(ready_encoder.id, dataset="imagenet"), headers=h), 422)
    assert p["errors"][0]["field"] == "dataset" and "digits" in p["detail"]
    # another team's encoder does not exist for team B
    _, hb = team_b
    p = _problem(client.post("/v1/jobs", json=_job_body(ready_encoder.id), headers=hb), 422)
    assert p["errors"][0]["field"] == "encoder"


def test_encoder_not_ready_is_409(client, session, team_a, ready_encoder):
    ready_encoder.status = "validating"
    session.commit()
    _, h = team_a
    assert _problem(client.post("/v1/jobs", json=_job_body(ready_encoder.id), headers=h), 409)


def test_broker_down_is_503_and_leaves_no_job(client, team_a, ready_encoder, queue):
    _, h = team_a
    queue.down = True
    p = _problem(client.post("/v1/jobs", json=_job_body(ready_encoder.id), headers={**h, "Idempotency-Key": "k"}), 503)
    assert "unavailable" in p["detail"]
    assert client.get("/v1/jobs", headers=h).json()["count"] == 0
    queue.down = False
    assert client.post("/v1/jobs", json=_job_body(ready_encoder.id), headers={**h, "Idempotency-Key": "k"}).status_code == 202


# ------------------------------------------------------------------ reading, listing, cancelling
def test_read_list_filter_and_paginate(client, team_a, ready_encoder):
    _, h = team_a
    ids = [client.post("/v1/jobs", json=_job_body(ready_encoder.id, attack=a, params={}, beta=None), headers=h).json()["id"]
           for a in ("gradpc", "gc_feature", "gradpc", "gradpc", "gc_feature")]
    job = client.get(f"/v1/jobs/{ids[0]}", headers=h).json()
    assert job["status"] == "queued" and job["progress"] == {"stage": None, "fraction": None, "updated_at": None}
    assert job["artifacts"] == [] and job["created_at"]
    seen, cursor = [], None
    while True:
        r = client.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}, headers=h).json()
        assert r["count"] == 5
        seen += [j["id"] for j in r["data"]]
        cursor = r["next_cursor"]
        if not cursor:
            break
    assert seen == ids[::-1]
    r = client.get("/v1/jobs", params={"attack": "gradpc"}, headers=h).json()
    assert r["count"] == 3 and {j["attack"] for j in r["data"]} == {"gradpc"}
    assert client.get("/v1/jobs", params={"encoder": str(ready_encoder.id), "status": "queued"}, headers=h).json()["count"] == 5
    assert client.get("/v1/jobs", params={"status": "running"}, headers=h).json()["count"] == 0
    assert _problem(client.get("/v1/jobs", params={"status": "bogus"}, headers=h), 422)
    assert _problem(client.get("/v1/jobs", params={"cursor": "garbage"}, headers=h), 422)


def test_cancel_queued_then_finished_is_409(client, team_a, ready_encoder):
    _, h = team_a
    jid = client.post("/v1/jobs", json=_job_body(ready_encoder.id), headers=h).json()["id"]
    r = client.post(f"/v1/jobs/{jid}/cancel", headers=h)
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    assert _problem(client.post(f"/v1/jobs/{jid}/cancel", headers=h), 409)


def test_cancel_running_sets_the_flag(client, session, team_a, ready_encoder):
    from app.models import Job

    _, h = team_a
    jid = client.post("/v1/jobs", json=_job_body(ready_encoder.id), headers=h).json()["id"]
    job = session.get(Job, uuid.UUID(jid))
    job.status = "running"
    session.commit()
    r = client.post(f"/v1/jobs/{jid}/cancel", headers=h).json()
    assert r["status"] == "running" and r["cancel_requested"] is True


def test_unknown_job_is_404_problem(client, team_a):
    _, h = team_a
    _problem(client.get(f"/v1/jobs/{uuid.uuid4()}", headers=h), 404)


# ------------------------------------------------------------------ tenancy
def test_another_teams_resources_answer_404(client, session, store, team_a, team_b, ready_encoder, digits_npz):
    from app.models import Artifact, Job

    _, ha = team_a
    team_b_obj, hb = team_b
    jid = client.post("/v1/jobs", json=_job_body(ready_encoder.id), headers=ha).json()["id"]
    job = session.get(Job, uuid.UUID(jid))
    stored = store.put_bytes(f"teams/{job.team_id}/jobs/{jid}/poisoned_set.npz", b"npz")
    session.add(Artifact(team_id=job.team_id, job_id=job.id, name="poisoned_set.npz", content_type="application/octet-stream",
                         key=stored.key, sha256=stored.sha256, size=stored.size))
    job.status = "succeeded"
    session.commit()
    with open(digits_npz, "rb") as f:
        ds = client.post("/v1/datasets", files={"file": ("d.npz", f)}, headers=ha).json()["id"]

    assert client.get(f"/v1/jobs/{jid}/poisoned-set", headers=ha).content == b"npz"
    for path in (f"/v1/jobs/{jid}", f"/v1/jobs/{jid}/poisoned-set", f"/v1/jobs/{jid}/artifacts",
                 f"/v1/jobs/{jid}/artifacts/poisoned_set.npz", f"/v1/encoders/{ready_encoder.id}", f"/v1/datasets/{ds}"):
        _problem(client.get(path, headers=hb), 404)
    _problem(client.post(f"/v1/jobs/{jid}/cancel", headers=hb), 404)
    assert client.get("/v1/jobs", headers=hb).json()["count"] == 0
    assert client.get("/v1/encoders", headers=hb).json()["count"] == 0
    assert ds not in [d["id"] for d in client.get("/v1/datasets", headers=hb).json()["data"]]
    p = _problem(client.post("/v1/jobs", json={**_job_body(ready_encoder.id), "dataset": ds}, headers=hb), 422)
    assert p["errors"][0]["field"] in ("encoder", "dataset")


# ------------------------------------------------------------------ artifacts
def test_artifacts_listed_and_streamed_with_their_hash(client, session, store, team_a, ready_encoder):
    import hashlib

    from app.models import Artifact, Job

    _, h = team_a
    jid = client.post("/v1/jobs", json=_job_body(ready_encoder.id), headers=h).json()["id"]
    job = session.get(Job, uuid.UUID(jid))
    _problem(client.get(f"/v1/jobs/{jid}/poisoned-set", headers=h), 404)
    data = json.dumps({"ok": 1}).encode()
    st = store.put_bytes(f"teams/{job.team_id}/jobs/{jid}/result.json", data)
    session.add(Artifact(team_id=job.team_id, job_id=job.id, name="result.json", content_type="application/json",
                         key=st.key, sha256=st.sha256, size=st.size))
    session.commit()
    arts = client.get(f"/v1/jobs/{jid}/artifacts", headers=h).json()
    assert arts["count"] == 1 and arts["data"][0]["sha256"] == hashlib.sha256(data).hexdigest()
    r = client.get(arts["data"][0]["url"], headers=h)
    assert r.status_code == 200 and r.content == data and r.headers["x-content-sha256"] == st.sha256
    assert client.get(f"/v1/jobs/{jid}", headers=h).json()["artifacts"][0]["name"] == "result.json"


# ------------------------------------------------------------------ encoders
def test_upload_refuses_what_is_not_a_checkpoint(client, team_a):
    _, h = team_a
    files = {"file": ("x.bin", io.BytesIO(b"\x00" * 100))}
    p = _problem(client.post("/v1/encoders", data={"architecture": "small_cnn"}, files=files, headers=h), 422)
    assert p["errors"][0]["field"] == "file" and "safetensors" in p["detail"]


def test_upload_refuses_a_pickle_that_is_not_weights_only(client, team_a, tmp_path):
    import torch

    _, h = team_a
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # a whole module, not a state dict
    with open(path, "rb") as f:
        p = _problem(client.post("/v1/encoders", data={"architecture": "small_cnn"}, files={"file": ("m.pt", f)}, headers=h), 422)
    assert "weights-only" in p["detail"] and "torch.nn" in p["detail"]


def test_upload_unknown_architecture(client, team_a, tiny_encoder_dir):
    _, h = team_a
    with open(tiny_encoder_dir / "encoder.safetensors", "rb") as f:
        p = _problem(client.post("/v1/encoders", data={"architecture": "lenet"}, files={"file": ("e", f)}, headers=h), 422)
    assert p["errors"][0]["field"] == "architecture" and "small_cnn" in p["detail"]


def test_upload_stores_and_asks_a_worker_to_check(client, configure, team_a, tiny_encoder_dir, queue, store):
    configure(encoder_check_wait_s=0)
    _, h = team_a
    with open(tiny_encoder_dir / "encoder.safetensors", "rb") as f:
        r = client.post("/v1/encoders", data={"architecture": "small_cnn", "name": "../../etc/passwd",
                                               "spec": json.dumps({"in_channels": 1, "width": 8})},
                        files={"file": ("../../evil.safetensors", f)}, headers=h)
    assert r.status_code == 202, r.text
    enc = r.json()["encoder"]
    assert enc["status"] == "validating" and enc["spec"]["arch"] == "small_cnn" and len(enc["sha256"]) == 64
    assert queue.checks == [enc["id"]]
    keys = [k for k, _ in store.list("teams")]
    assert len(keys) == 1 and enc["id"] in keys[0] and "evil" not in keys[0] and "passwd" not in keys[0]
    assert client.get(f"/v1/encoders/{enc['id']}", headers=h).json()["name"] == "../../etc/passwd"


def test_upload_over_the_limit_is_413(client, configure, team_a):
    configure(max_encoder_bytes=1000)
    _, h = team_a
    files = {"file": ("big.safetensors", io.BytesIO(b"\x00" * 3_000_000))}
    _problem(client.post("/v1/encoders", data={"architecture": "small_cnn"}, files=files, headers=h), 413)
    files = {"file": ("big.safetensors", io.BytesIO(b"\x00" * 5000))}  # under the slack, over the limit
    _problem(client.post("/v1/encoders", data={"architecture": "small_cnn"}, files=files, headers=h), 413)


def test_pretrain_request_creates_an_encoder_and_a_job(client, team_a, queue):
    _, h = team_a
    body = {"name": "simclr", "architecture": "small_cnn", "dataset": "digits", "spec": {"in_channels": 1, "width": 8},
            "config": {"epochs": 1, "batch_size": 64}, "device": "cpu"}
    r = client.post("/v1/encoders", json=body, headers=h)
    assert r.status_code == 202, r.text
    out = r.json()
    assert out["encoder"]["status"] == "pending" and out["job"]["kind"] == "pretrain"
    assert out["encoder"]["job_id"] == out["job"]["id"]
    assert queue.sent == [(out["job"]["id"], "pretrain", "cpu")]
    assert client.get("/v1/jobs", params={"kind": "pretrain"}, headers=h).json()["count"] == 1
    p = _problem(client.post("/v1/encoders", json={**body, "config": {"seed": 3}}, headers=h), 422)
    assert p["errors"][0]["field"] == "config.seed"
    p = _problem(client.post("/v1/encoders", json={**body, "dataset": "nope"}, headers=h), 422)
    assert p["errors"][0]["field"] == "dataset"
    _problem(client.post("/v1/encoders", content=b"x", headers={**h, "content-type": "text/plain"}), 415)
    # its documented home: the same request, the same answer
    r = client.post("/v1/encoders/pretrain", json={**body, "name": "simclr-2"}, headers=h)
    assert r.status_code == 202 and r.json()["job"]["kind"] == "pretrain" and r.json()["encoder"]["name"] == "simclr-2"
    assert queue.sent[-1] == (r.json()["job"]["id"], "pretrain", "cpu") and len(queue.sent) == 2
    p = _problem(client.post("/v1/encoders/pretrain", json={**body, "config": {"seed": 3}}, headers=h), 422)
    assert p["errors"][0]["field"] == "config.seed"
    _problem(client.post("/v1/encoders/pretrain", data={"architecture": "small_cnn"},
                         files={"file": ("e.safetensors", io.BytesIO(b"x"))}, headers=h), 415)
    assert client.post("/v1/encoders/pretrain", json=body).status_code == 401


# ------------------------------------------------------------------ datasets and attacks
def test_datasets_builtin_listed_and_npz_upload(client, team_a, digits_npz, store):
    _, h = team_a
    listed = client.get("/v1/datasets", headers=h).json()
    assert {"digits", "mnist5k"} <= {d["id"] for d in listed["data"] if d["kind"] == "builtin"}
    with open(digits_npz, "rb") as f:
        r = client.post("/v1/datasets", files={"file": ("mine.npz", f)}, data={"name": "mine"}, headers=h)
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["kind"] == "upload" and ds["summary"]["n"] == 200 and ds["size"] == digits_npz.stat().st_size
    assert r.headers["location"] == f"/v1/datasets/{ds['id']}"
    assert client.get(f"/v1/datasets/{ds['id']}", headers=h).json()["sha256"] == ds["sha256"]
    assert client.get("/v1/datasets/digits", headers=h).json()["kind"] == "builtin"


def test_dataset_upload_refusals(client, configure, team_a, tmp_path):
    import numpy as np

    _, h = team_a
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((4, 8, 8)))
    p = _problem(client.post("/v1/datasets", files={"file": ("b.npz", bad.open("rb"))}, headers=h), 422)
    assert "missing" in p["detail"] and "'x'" in p["detail"]
    np.savez(bad, x=np.zeros((4, 8, 8)), y=np.zeros(3, dtype=np.int64))
    assert "labels" in _problem(client.post("/v1/datasets", files={"file": ("b.npz", bad.open("rb"))}, headers=h), 422)["detail"]
    _problem(client.post("/v1/datasets", files={"file": ("b.npz", io.BytesIO(b"nope"))}, headers=h), 422)
    configure(max_dataset_bytes=10)
    _problem(client.post("/v1/datasets", files={"file": ("b.npz", io.BytesIO(b"0" * 100))}, headers=h), 413)


def test_server_side_roots_come_from_configuration(client, configure, team_a):
    configure(dataset_roots=json.dumps({"cifar10": {"loader": "cifar10", "path": "/data/cifar", "description": "local"}}))
    _, h = team_a
    names = {d["id"]: d for d in client.get("/v1/datasets", headers=h).json()["data"]}
    assert names["cifar10"]["kind"] == "server" and "path" not in names["cifar10"]
    # clients cannot register a path: the only way in is an upload
    assert client.post("/v1/datasets", json={"path": "/etc"}, headers=h).status_code == 422


def test_attacks_catalogue_publishes_the_validating_schemas(client):
    r = client.get("/v1/attacks").json()
    assert r["count"] == len(CATALOGUE)
    for a in r["data"]:
        info = CATALOGUE[a["name"]]
        assert a["params_schema"] == info.params_model.model_json_schema()
        assert a["paper"] and a["description"]
    assert client.get("/v1/attacks/feature_matching").json()["takes_beta"] is True
    _problem(client.get("/v1/attacks/nope"), 404)


def test_openapi_is_published(client):
    spec = client.get("/openapi.json").json()
    assert "/v1/jobs" in spec["paths"] and "/v1/jobs/{job_id}/poisoned-set" in spec["paths"]
    # one content type per request body (a generated client cannot import an operation with two: issue #16)
    assert set(spec["paths"]["/v1/encoders"]["post"]["requestBody"]["content"]) == {"multipart/form-data"}
    assert set(spec["paths"]["/v1/encoders/pretrain"]["post"]["requestBody"]["content"]) == {"application/json"}


# ------------------------------------------------------------------ health
def test_health_ready_and_metrics(client, queue, team_a, ready_encoder):
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/readyz").json()["checks"] == {"database": "ok", "broker": "ok"}
    _, h = team_a
    client.post("/v1/jobs", json=_job_body(ready_encoder.id, device="cpu"), headers=h)
    text = client.get("/metrics").text
    assert 'poisonaudit_jobs{kind="attack",status="queued"} 1.0' in text
    assert 'poisonaudit_queue_depth{queue="cpu"} 1.0' in text
    assert "poisonaudit_job_duration_seconds_bucket" in text
    queue.down = True
    p = _problem(client.get("/readyz"), 503)
    assert p["checks"]["broker"].startswith("unreachable")


def test_database_down_is_503_not_500(configure, queue, store):
    from fastapi.testclient import TestClient

    from app.db import dispose_engines
    from app.main import create_app
    from app.queue import get_queue
    from app.storage import get_store

    configure(database_url="postgresql+psycopg://nobody@127.0.0.1:1/none")
    app = create_app()
    app.dependency_overrides[get_queue] = lambda: queue
    app.dependency_overrides[get_store] = lambda: store
    client = TestClient(app)
    try:
        p = _problem(client.get("/v1/jobs", headers={"Authorization": "Bearer pa_000000000000_x"}), 503)
        assert r"retry" in p["detail"]
        assert _problem(client.get("/readyz"), 503)["checks"]["database"].startswith("unreachable")
    finally:
        dispose_engines()


def test_unreachable_real_broker_is_503(session, configure, store, team_a, ready_encoder):
    """The real Celery client (no fake) pointed at a closed port: 503 quickly, no job left behind."""
    from fastapi.testclient import TestClient

    from app.db import get_session
    from app.main import create_app
    from app.storage import get_store

    configure(broker_url="redis://127.0.0.1:1/0")
    app = create_app()
    app.dependency_overrides[get_session] = lambda: session
    app.dependency_overrides[get_store] = lambda: store
    client = TestClient(app)
    _, h = team_a
    _problem(client.post("/v1/jobs", json=_job_body(ready_encoder.id), headers=h), 503)
    assert client.get("/v1/jobs", headers=h).json()["count"] == 0
    assert _problem(client.get("/readyz"), 503)["checks"]["broker"].startswith("unreachable")


def test_docs_work_offline_from_files_the_api_serves(client):
    """#16: /docs loads Swagger UI from the API itself (an air-gapped browser has no CDN); / leads there."""
    import re

    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
    assert assets and not [a for a in assets if "//" in a], assets  # nothing from another host
    js = [a for a in assets if a.endswith("swagger-ui-bundle.js")]
    css = [a for a in assets if a.endswith("swagger-ui.css")]
    assert js and css
    r = client.get(js[0])
    assert r.status_code == 200 and "SwaggerUIBundle" in r.text
    assert client.get(css[0]).status_code == 200
    assert "'/openapi.json'" in page.text or '"/openapi.json"' in page.text
    assert client.get("/docs/oauth2-redirect").status_code == 200
    root = client.get("/", follow_redirects=False)
    assert root.status_code in (302, 307) and root.headers["location"] == "/docs"
    assert "Quick start" in client.get("/openapi.json").json()["info"]["description"]
