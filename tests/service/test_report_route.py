"""GET /v1/jobs/{id}/report through the API (session rolled back per test, local store)."""

from __future__ import annotations

import base64
import uuid

import pytest

from app.models import Artifact, Job

PNG = base64.b64decode(  # a 1x1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def _job(session, team, encoder, **kw) -> Job:
    fields = dict(team_id=team.id, kind="attack", status="succeeded", attack="feature_matching", encoder_id=encoder.id,
                  dataset="digits", epsilon=0.03, beta=0.25, seed=4, device="cpu", params={"fm_steps": 20}, queue="cpu",
                  metrics={"clean_accuracy": 0.95, "poisoned_accuracy": 0.9, "drop": 0.05, "n_poisons": 43,
                           "defences": {"knn": {"applicable": True, "accuracy": 0.93, "poisons_removed": 10,
                                                "clean_removed": 5, "n_poisons": 43, "n_clean": 1437}},
                           "encoder_fingerprint": "abc123", "dataset_hash": "def456",
                           "versions": {"torch": "2.14.1", "poisonaudit": "0.1.0"}})
    fields.update(kw)
    job = Job(**fields)
    session.add(job)
    session.commit()
    return job


def _figure(session, store, job, name, data=PNG, content_type="image/png"):
    st = store.put_bytes(f"teams/{job.team_id}/jobs/{job.id}/{name}", data, content_type)
    session.add(Artifact(team_id=job.team_id, job_id=job.id, name=name, content_type=content_type, key=st.key,
                         sha256=st.sha256, size=st.size))
    session.commit()


def test_job_report_page(client, session, store, team_a, team_b, ready_encoder):
    team, h = team_a
    job = _job(session, team, ready_encoder)
    _figure(session, store, job, "figure-examples.png")
    _figure(session, store, job, "figure-linf-histogram.png")
    _figure(session, store, job, "result.json", b"{}", "application/json")  # not a figure
    r = client.get(f"/v1/jobs/{job.id}/report", headers=h)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    page = r.text
    data_uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert page.count(f'src="{data_uri}"') == 2
    assert "95.00%" in page and "90.00%" in page and "10 / 43" in page
    assert "abc123" in page and "def456" in page and "2.14.1" in page

    _, hb = team_b
    other = client.get(f"/v1/jobs/{job.id}/report", headers=hb)
    assert other.status_code == 404 and other.headers["content-type"].startswith("application/problem+json")
    assert client.get(f"/v1/jobs/{uuid.uuid4()}/report", headers=h).status_code == 404
    assert client.get(f"/v1/jobs/{job.id}/report").status_code == 401


def test_report_of_a_queued_job_shows_its_status(client, session, team_a, ready_encoder):
    team, h = team_a
    job = _job(session, team, ready_encoder, status="queued", metrics=None)
    r = client.get(f"/v1/jobs/{job.id}/report", headers=h)
    assert r.status_code == 200
    assert 'id="status-table"' in r.text and "queued" in r.text and 'id="results-table"' not in r.text


def test_a_figure_missing_from_the_store_is_left_out(client, session, store, team_a, ready_encoder):
    team, h = team_a
    job = _job(session, team, ready_encoder)
    _figure(session, store, job, "figure-examples.png")
    art = session.query(Artifact).filter_by(job_id=job.id).one()
    store.delete(art.key)
    r = client.get(f"/v1/jobs/{job.id}/report", headers=h)
    assert r.status_code == 200 and "data:image/png" not in r.text and "No figures" in r.text


# ------------------------------------------------------------------ encoder identity and links (#16)
def _cells(page: str, table_id: str) -> list[list[str]]:
    from tests.test_report import parse

    return parse(page).cells[table_id]


def test_job_report_names_its_encoder_and_links_its_audit(client, session, team_a, ready_encoder):
    team, h = team_a
    a = client.post("/v1/audits", json=_audit_body(ready_encoder.id), headers=h).json()
    job = session.get(Job, uuid.UUID(a["jobs"][0]["id"]))
    page = client.get(f"/v1/jobs/{job.id}/report", headers=h).text
    assert f'<a href="/v1/audits/{a["id"]}/report">' in page  # the job's audit, as the API's report path
    enc = {r[0]: r[1] for r in _cells(page, "encoder-table")}
    assert enc["name"] == "tiny" and enc["architecture"] == "small_cnn" and enc["weights file sha256"] == "0" * 64
    assert enc["id"] == str(ready_encoder.id) and "fingerprint" not in enc  # a queued job has not loaded it yet
    assert "No job has reported the fingerprint" in page

    alone = _job(session, team, ready_encoder)  # a job of no audit: no audit link; its fingerprint shown
    page = client.get(f"/v1/jobs/{alone.id}/report", headers=h).text
    assert "/v1/audits/" not in page and "part of audit" not in page
    assert {r[0]: r[1] for r in _cells(page, "encoder-table")}["fingerprint"] == "abc123"


def _audit_body(encoder_id, **kw):
    body = {"encoder": str(encoder_id), "dataset": "digits", "name": "grid",
            "attacks": [{"name": "feature_matching", "params": {"gc_steps": 50, "fm_steps": 20}}],
            "epsilons": [0.03, 0.1], "betas": [0.25], "seeds": [0, 1], "head": {"epochs": 30}}
    body.update(kw)
    return body


def _finish(session, job_id, **metrics):
    job = session.get(Job, uuid.UUID(job_id))
    job.status, job.metrics = "succeeded", metrics
    session.commit()


def _defences(n, linf, knn, clean_knn):
    return {"linf": {"applicable": True, "accuracy": 0.9, "poisons_removed": linf, "clean_removed": 0,
                     "n_poisons": n, "n_clean": 1000},
            "knn": {"applicable": True, "accuracy": 0.88, "poisons_removed": knn, "clean_removed": clean_knn,
                    "n_poisons": n, "n_clean": 1000},
            "spectral": {"applicable": False, "reason": "not measured"}}


def test_audit_table_and_report_give_poisons_and_removals_per_cell(client, session, team_a, ready_encoder):
    _, h = team_a
    a = client.post("/v1/audits", json=_audit_body(ready_encoder.id), headers=h).json()
    jobs = {(j["epsilon"], j["seed"]): j["id"] for j in a["jobs"]}
    base = dict(clean_accuracy=0.95, poisoned_accuracy=0.9, drop=0.05, encoder_fingerprint="fp-1")
    _finish(session, jobs[(0.03, 0)], **base, n_poisons=30, defences=_defences(30, 30, 6, 10))
    _finish(session, jobs[(0.03, 1)], **base, n_poisons=30, defences=_defences(30, 30, 12, 20))
    _finish(session, jobs[(0.1, 0)], **base, n_poisons=100)  # defences turned off: no counts
    cell = client.get(f"/v1/audits/{a['id']}", headers=h).json()["table"]["rows"][0]["cells"]
    c = cell["0.03"]
    assert c["n_poisons"] == {"mean": 30.0, "std": 0.0, "n": 2}
    assert c["removed"]["knn"]["poisons_removed"]["mean"] == 9.0
    assert c["removed"]["knn"]["fraction"]["mean"] == pytest.approx(0.3)
    assert c["removed"]["knn"]["clean_removed"]["mean"] == 15.0
    assert c["removed"]["linf"]["fraction"] == {"mean": 1.0, "std": 0.0, "n": 2}
    assert "spectral" not in c["removed"]  # did not apply: no counts
    assert cell["0.1"]["n_poisons"]["mean"] == 100 and cell["0.1"]["removed"] == {}

    r = client.get(f"/v1/audits/{a['id']}/report", headers=h)
    assert r.status_code == 200
    # removals-table rows: [attack (first row of the attack only), what, eps 0.03, eps 0.1]
    rows = {row[-3].split(" removed")[0]: row[-2:] for row in _cells(r.text, "removals-table")[1:]}
    assert rows["poisons per job"] == ["30", "100"]
    assert rows["knn"][0].startswith("9 ± 4.2 / 30 (30.0 ± 14.1%)") and "clean points removed 15 ± 7.1" in rows["knn"][0]
    assert rows["linf"][0].startswith("30 / 30 (100.0%)") and rows["knn"][1] == "–"
    # every job id is a link to the API's report of that job; each cell links its jobs by seed
    for jid in jobs.values():
        assert f'href="/v1/jobs/{jid}/report"' in r.text
    jobs_table = _cells(r.text, "jobs-table")
    assert jobs_table[0] == ["label", "epsilon", "seed", "status", "id", "error"]
    assert {row[4] for row in jobs_table[1:]} == set(jobs.values())
    assert "job reports: seed 0 · seed 1" in " ".join(_cells(r.text, "results-table")[1])
    enc = {row[0]: row[1] for row in _cells(r.text, "encoder-table")}
    assert enc["name"] == "tiny" and enc["architecture"] == "small_cnn" and enc["fingerprint"] == "fp-1"


def test_audit_report_of_jobs_without_defence_data_renders(client, session, team_a, ready_encoder):
    """Jobs that reported no defences, no n_poisons and odd defence entries: still a page, no 500."""
    _, h = team_a
    a = client.post("/v1/audits", json=_audit_body(ready_encoder.id, seeds=[0]), headers=h).json()
    first, second = (j["id"] for j in a["jobs"])
    _finish(session, first, clean_accuracy=0.95, poisoned_accuracy=0.9, drop=0.05)
    _finish(session, second, clean_accuracy=0.95, poisoned_accuracy=0.9, drop=0.05,
            defences={"knn": "garbage", "linf": {"applicable": True, "poisons_removed": 3}, "x": None})
    r = client.get(f"/v1/audits/{a['id']}/report", headers=h)
    assert r.status_code == 200 and "results-table" in r.text
    assert 'id="removals-none"' in r.text and "No job of this audit reported what the defences removed" in r.text
    session.delete(ready_encoder)  # an encoder deleted since: the page still renders and says so
    session.commit()
    r = client.get(f"/v1/audits/{a['id']}/report", headers=h)
    assert r.status_code == 200 and "record is not available" in r.text
