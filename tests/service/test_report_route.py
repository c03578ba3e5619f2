"""GET /v1/jobs/{id}/report through the API (session rolled back per test, local store)."""

from __future__ import annotations

import base64
import uuid

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
