"""Audits at unit level: validation before anything is created, fan-out, status, table, cancel, tenancy."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import func, select

FAST = {"gc_steps": 50}


def _body(encoder_id, **kw):
    body = {"encoder": str(encoder_id), "dataset": "digits", "name": "grid",
            "attacks": [{"name": "gradpc"}, {"name": "gc_feature", "params": FAST},
                        {"name": "feature_matching", "params": {**FAST, "fm_steps": 20}}],
            "epsilons": [0.1, 0.03], "betas": [0.25, 0.05], "seeds": [0, 1], "head": {"epochs": 30}}
    body.update(kw)
    return body


def _problem(r, status):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    return r.json()


def _fields(p):
    return {e["field"] for e in p["errors"]}


def test_submit_fans_out_in_stage_sharing_order(client, session, team_a, ready_encoder, queue):
    from app.models import Job

    _, h = team_a
    r = client.post("/v1/audits", json=_body(ready_encoder.id), headers=h)
    assert r.status_code == 202, r.text
    audit = r.json()
    assert r.headers["location"] == f"/v1/audits/{audit['id']}"
    # (gradpc + gc_feature + 2 betas of feature_matching) x 2 epsilons x 2 seeds
    assert len(audit["jobs"]) == 16 and len(queue.sent) == 16
    assert audit["status"] == "queued" and audit["progress"]["fraction"] == 0
    assert audit["progress"]["jobs"] == {"total": 16, "queued": 16, "running": 0, "succeeded": 0, "failed": 0,
                                         "cancelled": 0}
    order = [session.get(Job, uuid.UUID(jid)) for jid, _, _ in queue.sent]
    assert [(j.seed, j.epsilon, j.attack, j.beta) for j in order[:4]] == [
        (0, 0.1, "gradpc", None), (0, 0.1, "gc_feature", None), (0, 0.1, "feature_matching", 0.25),
        (0, 0.1, "feature_matching", 0.05)]
    assert all(str(j.audit_id) == audit["id"] and j.head == {"epochs": 30} for j in order)
    assert order[2].params == {**FAST, "fm_steps": 20}
    job = client.get(f"/v1/jobs/{queue.sent[0][0]}", headers=h).json()
    assert job["audit"] == audit["id"]
    assert client.get("/v1/jobs", params={"audit": audit["id"]}, headers=h).json()["count"] == 16

    t = audit["table"]
    assert t["epsilons"] == [0.03, 0.1] and t["clean_accuracy"] is None
    assert [(row["attack"], row["beta"], row["label"]) for row in t["rows"]] == [
        ("gradpc", None, "gradpc"), ("gc_feature", None, "gc_feature"),
        ("feature_matching", 0.25, "feature_matching (beta=0.25)"),
        ("feature_matching", 0.05, "feature_matching (beta=0.05)")]
    cell = t["rows"][2]["cells"]["0.03"]
    assert cell == {"poisoned_accuracy": None, "drop": None, "jobs": {"succeeded": 0, "failed": 0, "pending": 2},
                    "defences": {}, "n_poisons": None, "removed": {}}
    assert t["summary"] == [{"epsilon": 0.03, "worst_drop": None, "attack": None, "beta": None},
                            {"epsilon": 0.1, "worst_drop": None, "attack": None, "beta": None}]


def test_default_beta_and_attacks_without_one(client, team_a, ready_encoder):
    _, h = team_a
    body = _body(ready_encoder.id, betas=None, seeds=[3], epsilons=[0.05])
    a = client.post("/v1/audits", json=body, headers=h).json()
    assert a["betas"] == [0.25] and a["seeds"] == [3] and len(a["jobs"]) == 3
    only = client.post("/v1/audits", json=_body(ready_encoder.id, attacks=[{"name": "gradpc"}], betas=None),
                       headers=h).json()
    assert only["betas"] is None and [r["beta"] for r in only["table"]["rows"]] == [None]


def test_no_attacks_runs_the_papers_table_at_the_catalogues_defaults(client, session, team_a, ready_encoder, queue):
    """An audit with only an encoder and a dataset: the paper's table (attacks.catalogue.PAPER_TABLE),
    every row with empty params (the catalogue's defaults) but the constrained/projected switches,
    feature matching's three rows at beta 0.25, 0.1, 0.05, epsilons 0.03 and 0.1."""
    from app.models import Job

    _, h = team_a
    r = client.post("/v1/audits", json={"encoder": str(ready_encoder.id), "dataset": "digits"}, headers=h)
    assert r.status_code == 202, r.text
    a = r.json()
    assert a["betas"] == [0.25, 0.1, 0.05] and a["epsilons"] == [0.03, 0.1]
    labels = [row["label"] for row in a["table"]["rows"]]
    assert labels[:7] == ["gradpc", "gc_feature", "gc_input (no constraints)", "gc_input (constrained)",
                          "tgda_input (no constraints)", "tgda_input (constrained)", "decoder_inversion"]
    assert "feature_matching (projected) (beta=0.05)" in labels and "feature_matching_r (beta=0.1)" in labels
    # 7 rows without a beta + 3 beta-taking entries x 3 betas, x 2 epsilons x 1 seed
    assert len(a["jobs"]) == (7 + 3 * 3) * 2 == len(queue.sent)
    jobs = [session.get(Job, uuid.UUID(jid)) for jid, _, _ in queue.sent]
    assert {(j.attack, json.dumps(j.params, sort_keys=True)) for j in jobs} == {
        ("gradpc", "{}"), ("gc_feature", "{}"), ("gc_input", '{"constrained": false}'),
        ("gc_input", '{"constrained": true}'), ("tgda_input", '{"constrained": false}'),
        ("tgda_input", '{"constrained": true}'), ("decoder_inversion", "{}"), ("feature_matching", "{}"),
        ("feature_matching", '{"projected": true}'), ("feature_matching_r", "{}")}


def test_defences_option_reaches_every_job(client, session, team_a, ready_encoder):
    from app.models import Job

    _, h = team_a
    a = client.post("/v1/audits", json=_body(ready_encoder.id, defences=False), headers=h).json()
    assert a["defences"] is False
    jobs = [session.get(Job, uuid.UUID(j["id"])) for j in a["jobs"]]
    assert len(jobs) == 16 and not any(j.defences for j in jobs)  # gradpc, gc_feature 2 eps x 2 seeds; fm x 2 betas
    b = client.post("/v1/audits", json=_body(ready_encoder.id, seeds=[0]), headers=h).json()
    assert b["defences"] is True and all(session.get(Job, uuid.UUID(j["id"])).defences for j in b["jobs"])


def test_precision_option_reaches_every_job(client, session, team_a, ready_encoder):
    from app.models import Job

    _, h = team_a
    a = client.post("/v1/audits", json=_body(ready_encoder.id, precision="bf16", seeds=[0]), headers=h).json()
    assert a["precision"] == "bf16"
    assert a["jobs"] and all(session.get(Job, uuid.UUID(j["id"])).precision == "bf16" for j in a["jobs"])
    assert client.get(f"/v1/audits/{a['id']}", headers=h).json()["precision"] == "bf16"
    b = client.post("/v1/audits", json=_body(ready_encoder.id, seeds=[0]), headers=h).json()
    assert b["precision"] == "fp32"


def test_idempotency_key_returns_the_same_audit_and_fans_out_once(client, session, team_a, team_b, ready_encoder,
                                                                   queue):
    from app.models import Audit, Job

    _, h = team_a
    hk = {**h, "Idempotency-Key": "grid-1"}
    first = client.post("/v1/audits", json=_body(ready_encoder.id, seeds=[0]), headers=hk)
    again = client.post("/v1/audits", json=_body(ready_encoder.id, seeds=[0]), headers=hk)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["Location"] == first.headers["Location"]
    assert [j["id"] for j in again.json()["jobs"]] == [j["id"] for j in first.json()["jobs"]]
    n = len(first.json()["jobs"])
    assert n > 0 and len(queue.sent) == n  # the retry enqueued nothing
    assert session.scalar(select(func.count()).select_from(Audit)) == 1
    assert session.scalar(select(func.count()).select_from(Job)) == n
    # the key is bound to its body: another body with it is refused, and creates nothing
    p = _problem(client.post("/v1/audits", json=_body(ready_encoder.id, seeds=[1]), headers=hk), 422)
    assert "Idempotency-Key" in p["detail"] and len(queue.sent) == n
    # keys are per team (a global lookup would hand team A's audit to team B here: B is told that
    # A's encoder is not one it can use instead), and without a key every request is a new audit
    _, hb = team_b
    p = _problem(client.post("/v1/audits", json=_body(ready_encoder.id, seeds=[0]),
                             headers={**hb, "Idempotency-Key": "grid-1"}), 422)
    assert "encoder" in _fields(p)
    third = client.post("/v1/audits", json=_body(ready_encoder.id, seeds=[0]), headers=h)
    assert third.status_code == 202 and third.json()["id"] != first.json()["id"]


@pytest.mark.parametrize("change, field, extra", [
    ({"attacks": [{"name": "nope"}]}, "attacks.0.name", "valid"),
    ({"attacks": [{"name": "gradpc", "params": {"gc_steps": 5}}]}, "attacks.0.params.gc_steps", None),
    ({"attacks": [{"name": "gc_feature", "params": {"gc_steps": 0}}]}, "attacks.0.params.gc_steps", None),
    ({"epsilons": [0.03, 1.5]}, "epsilons.1", None),
    ({"epsilons": [0.03, 0.03]}, "epsilons.1", None),
    ({"epsilons": []}, "epsilons", None),
    ({"betas": [-1.0]}, "betas.0", None),
    ({"attacks": [{"name": "gradpc"}], "betas": [0.1]}, "betas", None),
    ({"seeds": [-1]}, "seeds.0", None),
    ({"head": {"optimizer": "adam"}}, "head.optimizer", None),
    ({"device": "tpu"}, "device", None),
    ({"attacks": [{"name": "gradpc"}, {"name": "gradpc"}]}, "attacks.1", None),
    ({"attacks": [{"name": "gradpc"}, {"name": "gradpc", "params": {"eps_w": 2}}]}, "attacks.1.label", None),
    ({"attacks": [{"name": "gradpc", "parms": {}}]}, "attacks.0.parms", None),
    ({"dataset": "nope"}, "dataset", None),
    ({"encoder": str(uuid.uuid4())}, "encoder", None),
])
def test_bad_input_is_a_422_naming_the_field_and_creates_nothing(client, team_a, ready_encoder, queue, change, field,
                                                                 extra):
    _, h = team_a
    p = _problem(client.post("/v1/audits", json=_body(ready_encoder.id, **change), headers=h), 422)
    assert field in _fields(p), p
    if extra:
        assert "gradpc" in p[extra]
    assert queue.sent == [] and client.get("/v1/audits", headers=h).json()["count"] == 0
    assert client.get("/v1/jobs", headers=h).json()["count"] == 0


def test_several_errors_are_reported_together(client, team_a, ready_encoder):
    _, h = team_a
    p = _problem(client.post("/v1/audits", json=_body(ready_encoder.id, epsilons=[2.0], seeds=[-1],
                                                          head={"epochs": 0}), headers=h), 422)
    assert {"epsilons.0", "seeds.0", "head.epochs"} <= _fields(p)


def test_labels_tell_entries_of_one_attack_apart(client, team_a, ready_encoder):
    _, h = team_a
    body = _body(ready_encoder.id, attacks=[{"name": "gradpc", "label": "GradPC w1"},
                                            {"name": "gradpc", "params": {"eps_w": 2}, "label": "GradPC w2"}], betas=None)
    a = client.post("/v1/audits", json=body, headers=h).json()
    assert [r["label"] for r in a["table"]["rows"]] == ["GradPC w1", "GradPC w2"]
    assert sorted({j["label"] for j in a["jobs"]}) == ["GradPC w1", "GradPC w2"]


def test_fan_out_is_capped(client, configure, team_a, ready_encoder, queue):
    _, h = team_a
    configure(max_audit_jobs=15)
    p = _problem(client.post("/v1/audits", json=_body(ready_encoder.id), headers=h), 422)
    assert p["title"] == "Audit too large" and p["jobs"] == 16 and p["limit"] == 15 and "16 jobs" in p["detail"]
    assert queue.sent == []
    assert client.post("/v1/audits", json=_body(ready_encoder.id, seeds=[0]), headers=h).status_code == 202


def test_encoder_not_ready_is_409_and_broker_down_503_leaves_nothing(client, session, team_a, ready_encoder, queue):
    _, h = team_a
    queue.down = True
    _problem(client.post("/v1/audits", json=_body(ready_encoder.id), headers=h), 503)
    assert client.get("/v1/audits", headers=h).json()["count"] == 0
    assert client.get("/v1/jobs", headers=h).json()["count"] == 0
    queue.down = False
    ready_encoder.status = "pending"
    session.commit()
    _problem(client.post("/v1/audits", json=_body(ready_encoder.id), headers=h), 409)


def _finish(session, job_id, status, **metrics):
    from app.models import Job

    job = session.get(Job, uuid.UUID(job_id))
    job.status = status
    job.metrics = metrics or None
    session.commit()


def test_status_progress_and_table_from_job_results(client, session, team_a, ready_encoder):
    _, h = team_a
    body = _body(ready_encoder.id, attacks=[{"name": "gradpc"}, {"name": "feature_matching", "params": FAST}],
                 betas=[0.25], epsilons=[0.03, 0.1], seeds=[0, 1])
    a = client.post("/v1/audits", json=body, headers=h).json()
    jobs = {(j["attack"], j["epsilon"], j["seed"]): j["id"] for j in a["jobs"]}
    defs = lambda acc: {"knn": {"applicable": True, "accuracy": acc}, "linf": {"applicable": False, "reason": "x"}}
    _finish(session, jobs[("gradpc", 0.03, 0)], "succeeded", clean_accuracy=0.9, poisoned_accuracy=0.5, drop=0.4)
    _finish(session, jobs[("gradpc", 0.03, 1)], "succeeded", clean_accuracy=0.8, poisoned_accuracy=0.6, drop=0.2)
    _finish(session, jobs[("feature_matching", 0.03, 0)], "succeeded", clean_accuracy=0.9, poisoned_accuracy=0.85,
            drop=0.05, defences=defs(0.88))
    _finish(session, jobs[("feature_matching", 0.03, 1)], "failed")
    _finish(session, jobs[("feature_matching", 0.1, 0)], "running")
    r = client.get(f"/v1/audits/{a['id']}", headers=h).json()
    assert r["status"] == "running"
    assert r["progress"]["jobs"]["succeeded"] == 3 and r["progress"]["fraction"] == pytest.approx(4 / 8)
    t = r["table"]
    assert t["clean_accuracy"] == {"mean": pytest.approx(0.85), "std": pytest.approx(0.0707107, rel=1e-4), "n": 2}
    g = t["rows"][0]["cells"]["0.03"]
    assert g["poisoned_accuracy"] == {"mean": pytest.approx(0.55), "std": pytest.approx(0.0707107, rel=1e-4), "n": 2}
    assert g["drop"]["mean"] == pytest.approx(0.3) and g["jobs"] == {"succeeded": 2, "failed": 0, "pending": 0}
    fm = t["rows"][1]["cells"]
    assert fm["0.03"]["drop"] == {"mean": 0.05, "std": 0.0, "n": 1}
    assert fm["0.03"]["jobs"] == {"succeeded": 1, "failed": 1, "pending": 0}
    assert fm["0.03"]["defences"] == {"knn": {"mean": 0.88, "std": 0.0, "n": 1}}
    assert fm["0.1"]["poisoned_accuracy"] is None and fm["0.1"]["jobs"]["pending"] == 2
    # GradPC (a target, not poisons) is left out of the worst-drop summary
    assert t["summary"][0] == {"epsilon": 0.03, "worst_drop": 0.05, "attack": "feature_matching", "beta": 0.25}
    assert t["summary"][1]["worst_drop"] is None
    for j in r["jobs"]:
        if j["status"] in ("queued", "running"):
            _finish(session, j["id"], "succeeded", clean_accuracy=0.9, poisoned_accuracy=0.7, drop=0.2)
    r = client.get(f"/v1/audits/{a['id']}", headers=h).json()
    assert r["status"] == "partial" and r["progress"]["fraction"] == 1.0


def test_derived_status():
    from types import SimpleNamespace as J

    from app.audits import derive_status

    def st(*s):
        return derive_status([J(status=x) for x in s])

    assert st("queued", "queued") == "queued"
    assert st("queued", "succeeded") == "running" and st("running") == "running"
    assert st("succeeded", "succeeded") == "succeeded"
    assert st("failed", "cancelled") == "failed" and st("cancelled", "cancelled") == "cancelled"
    assert st("succeeded", "failed") == "partial" and st("succeeded", "cancelled") == "partial"


def test_cancel_cancels_every_unfinished_job(client, session, team_a, ready_encoder):
    _, h = team_a
    a = client.post("/v1/audits", json=_body(ready_encoder.id, seeds=[0], epsilons=[0.03]), headers=h).json()
    _finish(session, a["jobs"][0]["id"], "succeeded", clean_accuracy=0.9, poisoned_accuracy=0.5, drop=0.4)
    _finish(session, a["jobs"][1]["id"], "running")
    r = client.post(f"/v1/audits/{a['id']}/cancel", headers=h)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["cancel_requested"] is True
    assert [j["status"] for j in body["jobs"]] == ["succeeded", "running", "cancelled", "cancelled"]
    assert client.get(f"/v1/jobs/{a['jobs'][1]['id']}", headers=h).json()["cancel_requested"] is True
    _finish(session, a["jobs"][1]["id"], "cancelled")
    r = client.get(f"/v1/audits/{a['id']}", headers=h).json()
    assert r["status"] == "partial" and r["finished_at"] is not None
    _problem(client.post(f"/v1/audits/{a['id']}/cancel", headers=h), 409)


def test_list_paginates_and_another_team_gets_404(client, team_a, team_b, ready_encoder):
    _, h = team_a
    _, hb = team_b
    ids = [client.post("/v1/audits", json=_body(ready_encoder.id, seeds=[s], attacks=[{"name": "gradpc"}], betas=None),
                       headers=h).json()["id"] for s in range(3)]
    seen, cursor = [], None
    while True:
        r = client.get("/v1/audits", params={"limit": 2, **({"cursor": cursor} if cursor else {})}, headers=h).json()
        assert r["count"] == 3 and all("table" not in x for x in r["data"])
        seen += [x["id"] for x in r["data"]]
        cursor = r["next_cursor"]
        if not cursor:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 3
    for path in (f"/v1/audits/{ids[0]}",):
        _problem(client.get(path, headers=hb), 404)
    _problem(client.post(f"/v1/audits/{ids[0]}/cancel", headers=hb), 404)
    _problem(client.get(f"/v1/audits/{uuid.uuid4()}", headers=h), 404)
    assert client.get("/v1/audits", headers=hb).json()["count"] == 0
    # team B cannot audit team A's encoder
    p = _problem(client.post("/v1/audits", json=_body(ready_encoder.id), headers=hb), 422)
    assert "encoder" in _fields(p)
    _problem(client.get("/v1/audits", params={"cursor": "garbage"}, headers=h), 422)


def test_report_is_a_self_contained_page(client, session, team_a, team_b, ready_encoder):
    _, h = team_a
    a = client.post("/v1/audits", json=_body(ready_encoder.id, seeds=[0]), headers=h).json()
    _finish(session, a["jobs"][0]["id"], "succeeded", clean_accuracy=0.9, poisoned_accuracy=0.5, drop=0.4)
    r = client.get(f"/v1/audits/{a['id']}/report", headers=h)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "Content-Security-Policy" in r.headers
    assert "results-table" in r.text and "feature_matching (beta=0.05)" in r.text and "data:image/png;base64," in r.text
    _problem(client.get(f"/v1/audits/{a['id']}/report", headers=team_b[1]), 404)


def test_openapi_operation_ids_are_the_handler_names(client):
    ops = [op for path in client.get("/openapi.json").json()["paths"].values() for op in path.values()]
    ids = [op["operationId"] for op in ops]
    assert len(ids) == len(set(ids)) and {"create_audit", "read_audit", "create_job", "read_job"} <= set(ids)
    create = next(op for op in ops if op["operationId"] == "create_audit")
    assert create["responses"]["422"]["content"]["application/problem+json"]["schema"]["$ref"].endswith("/ProblemDetail")


def test_cancel_never_overwrites_a_job_that_finished_after_it_was_read(client, session, team_a, ready_encoder,
                                                                        monkeypatch):
    """The cancel is conditional on the status in the database, not on what was read before."""
    from app import audits as service

    _, h = team_a
    a = client.post("/v1/audits", json=_body(ready_encoder.id, seeds=[0], epsilons=[0.03]), headers=h).json()
    real = service.jobs_of

    def stale_then_finish(sess, ids):
        from sqlalchemy import update

        from app.models import Job

        out = real(sess, ids)  # read: every job still queued ...
        # ... but a worker finishes the first one meanwhile (a write the loaded objects do not see)
        sess.execute(update(Job).where(Job.id == uuid.UUID(a["jobs"][0]["id"])).values(status="succeeded")
                     .execution_options(synchronize_session=False))
        sess.commit()
        return out

    monkeypatch.setattr(service, "jobs_of", stale_then_finish)
    r = client.post(f"/v1/audits/{a['id']}/cancel", headers=h)
    monkeypatch.setattr(service, "jobs_of", real)
    assert r.status_code == 202, r.text
    first = client.get(f"/v1/jobs/{a['jobs'][0]['id']}", headers=h).json()
    assert first["status"] == "succeeded" and first["error"] is None
    assert [j["status"] for j in client.get(f"/v1/audits/{a['id']}", headers=h).json()["jobs"][1:]] == ["cancelled"] * 3


def test_nul_in_the_audit_name_is_a_422(client, team_a, ready_encoder):
    _, h = team_a
    _problem(client.post("/v1/audits", json={**_body(ready_encoder.id), "name": "a\u0000b"}, headers=h), 422)


def test_infinite_parameter_is_a_422(client, team_a, ready_encoder):
    _, h = team_a
    body = _body(ready_encoder.id, attacks=[{"name": "gc_feature", "params": {"stop_loss": 1e999}}], betas=None)
    _problem(client.post("/v1/audits", content=json.dumps(body).replace('"stop_loss": Infinity', '"stop_loss": 1e999'),
                         headers={**h, "content-type": "application/json"}), 422)
