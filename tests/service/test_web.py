"""The web pages under /ui at unit level (TestClient; session rolled back per test; SQLite and Postgres):
sign-in with a key, the session cookie's flags, CSRF, sign-out, revocation and expiry, tenancy,
the report pages' links and downloads, the comparison, and no 500 for junk."""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect, select

from app.models import Artifact, Job, WebSession

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def _key(headers) -> str:
    return headers["Authorization"].split()[1]


def _csrf(page: str) -> str:
    m = CSRF.search(page)
    assert m, page[:2000]
    return m.group(1)


def _login(c: TestClient, key: str):
    form = c.get("/ui/login")
    assert form.status_code == 200, form.text
    return c.post("/ui/login", data={"key": key, "csrf": _csrf(form.text)}, follow_redirects=False)


def _signed_in(api, key: str) -> TestClient:
    c = TestClient(api)
    r = _login(c, key)
    assert r.status_code == 303 and r.headers["location"] == "/ui/", r.text
    return c


def _audit(client, session, h, encoder_id, name, drops: dict, clean=0.9):
    """An audit of gradpc and gc_feature at eps .03 and .1 (one seed) whose jobs finished with ``drops``."""
    body = {"encoder": str(encoder_id), "dataset": "digits", "name": name,
            "attacks": [{"name": "gradpc"}, {"name": "gc_feature", "params": {"gc_steps": 50}}],
            "epsilons": [0.03, 0.1], "seeds": [0], "head": {"epochs": 30}}
    r = client.post("/v1/audits", json=body, headers=h)
    assert r.status_code == 202, r.text
    a = r.json()
    for j in a["jobs"]:
        drop = drops[(j["attack"], j["epsilon"])]
        job = session.get(Job, uuid.UUID(j["id"]))
        job.status = "succeeded"
        job.metrics = {"clean_accuracy": clean, "poisoned_accuracy": clean - drop, "drop": drop}
        session.commit()
    return a


def _artifact(session, store, job, name, data: bytes, content_type="application/octet-stream"):
    st = store.put_bytes(f"teams/{job.team_id}/jobs/{job.id}/{name}", data, content_type)
    session.add(Artifact(team_id=job.team_id, job_id=job.id, name=name, content_type=content_type, key=st.key,
                         sha256=st.sha256, size=st.size))
    session.commit()


def test_the_migration_makes_the_session_table(db_engine):
    cols = {c["name"] for c in inspect(db_engine).get_columns("web_session")}
    assert cols == {"id", "token_hash", "team_id", "api_key_id", "created_at", "expires_at"}


def test_sign_in_sets_a_strict_httponly_cookie_and_keeps_only_its_hash(api, session, team_a):
    team, h = team_a
    c = TestClient(api)
    r = c.get("/ui/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    form = c.get("/ui/login")
    assert form.status_code == 200 and 'type="password"' in form.text
    assert "frame-ancestors 'none'" in form.headers["content-security-policy"]
    login_cookie = form.headers["set-cookie"].lower()
    assert "pa_login=" in login_cookie and "httponly" in login_cookie and "samesite=strict" in login_cookie

    r = c.post("/ui/login", data={"key": _key(h), "csrf": _csrf(form.text)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/"
    cookies = r.headers.get_list("set-cookie")
    session_cookie = next(x for x in cookies if x.startswith("pa_session="))
    flags = [p.strip().lower() for p in session_cookie.split(";")]
    token = session_cookie.split(";")[0].split("=", 1)[1]
    assert "httponly" in flags and "samesite=strict" in flags and "path=/ui" in flags
    assert "max-age=28800" in flags and "secure" not in flags  # plain http here; https adds Secure
    assert len(token) >= 40 and token not in _key(h)

    rows = list(session.scalars(select(WebSession).where(WebSession.team_id == team.id)))
    assert len(rows) == 1 and rows[0].token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token not in repr([(r.id, r.token_hash, r.api_key_id) for r in rows])
    ttl = rows[0].expires_at - rows[0].created_at
    assert timedelta(hours=8) - timedelta(seconds=2) <= ttl <= timedelta(hours=8)

    page = c.get("/ui/")
    assert page.status_code == 200 and team.name in page.text and 'id="logout"' in page.text
    assert c.get("/ui/login", follow_redirects=False).headers["location"] == "/ui/"  # signed in already


@pytest.mark.parametrize("secure_setting", [None, "true"])
def test_cookies_are_secure_over_https(api, configure, team_a, secure_setting):
    if secure_setting:
        configure(web_cookie_secure=secure_setting)
    c = TestClient(api, base_url="https://testserver")
    form = c.get("/ui/login")
    assert "secure" in [p.strip().lower() for p in form.headers["set-cookie"].split(";")]
    r = c.post("/ui/login", data={"key": _key(team_a[1]), "csrf": _csrf(form.text)}, follow_redirects=False)
    cookie = next(x for x in r.headers.get_list("set-cookie") if x.startswith("pa_session="))
    assert "secure" in [p.strip().lower() for p in cookie.split(";")]
    assert c.get("/ui/").status_code == 200


@pytest.mark.parametrize("key", ["", "   ", "wrong", "pa_", "pa_000000000000_nope", "pa_" + "x" * 5000, "\x00"])
def test_a_bad_key_reshows_the_form_with_a_401(api, session, team_a, key):
    c = TestClient(api)
    r = _login(c, key)
    assert r.status_code == 401, r.text
    assert 'id="login-error"' in r.text and "not valid" in r.text and 'id="login"' in r.text
    assert not [x for x in r.headers.get_list("set-cookie") if x.startswith("pa_session=")]
    assert c.get("/ui/", follow_redirects=False).status_code == 303
    assert session.scalar(select(WebSession).where(WebSession.team_id == team_a[0].id)) is None


def test_sign_in_without_the_forms_csrf_token_is_a_403(api, session, team_a):
    key = _key(team_a[1])
    c = TestClient(api)
    token = _csrf(c.get("/ui/login").text)
    assert c.post("/ui/login", data={"key": key}, follow_redirects=False).status_code == 403
    assert c.post("/ui/login", data={"key": key, "csrf": token + "x"}, follow_redirects=False).status_code == 403
    fresh = TestClient(api)  # a cross-site post: a token, but not this browser's form cookie
    r = fresh.post("/ui/login", data={"key": key, "csrf": token}, follow_redirects=False)
    assert r.status_code == 403 and 'id="login"' in r.text
    assert session.scalar(select(WebSession).where(WebSession.team_id == team_a[0].id)) is None


def test_sign_in_leads_back_to_the_page_asked_for_and_never_off_site(api, session, team_a, ready_encoder):
    key = _key(team_a[1])
    c = TestClient(api)
    path = f"/ui/compare?a={uuid.uuid4()}"
    r = c.get(path, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login?next=%2Fui%2Fcompare%3Fa%3D")
    form = c.get(r.headers["location"])
    assert 'name="next" value="/ui/compare?a=' in form.text
    r = c.post("/ui/login", data={"key": key, "csrf": _csrf(form.text), "next": path}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == path
    for evil in ("https://evil.example/", "//evil.example/ui/", "/ui/\\evil", "/v1/keys", "/ui/logout", "javascript:x"):
        d = TestClient(api)
        form = d.get("/ui/login", params={"next": evil})
        assert form.status_code == 200 and "evil" not in form.text.split('name="next"')[1][:40]
        r = d.post("/ui/login", data={"key": key, "csrf": _csrf(form.text), "next": evil}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/ui/", evil
    # signing in again ends the session it replaces
    before = {w.id for w in session.scalars(select(WebSession).where(WebSession.team_id == team_a[0].id))}
    old = c.cookies.get("pa_session")
    c.cookies.delete("pa_session")
    form = c.get("/ui/login")  # a form from before (another tab), posted while signed in
    c.cookies.set("pa_session", old, path="/ui")
    r = c.post("/ui/login", data={"key": key, "csrf": _csrf(form.text)}, follow_redirects=False)
    assert r.status_code == 303
    after = {w.id for w in session.scalars(select(WebSession).where(WebSession.team_id == team_a[0].id))}
    assert len(after) == len(before) and after != before
    assert TestClient(api, cookies={"pa_session": old}).get("/ui/", follow_redirects=False).status_code == 303


def test_sign_out_needs_the_csrf_token_and_ends_the_session(api, session, team_a):
    c = _signed_in(api, _key(team_a[1]))
    page = c.get("/ui/")
    csrf = _csrf(page.text)
    token = c.cookies.get("pa_session")
    assert c.post("/ui/logout", follow_redirects=False).status_code == 403
    assert c.post("/ui/logout", data={"csrf": "nope"}, follow_redirects=False).status_code == 403
    assert c.get("/ui/").status_code == 200  # still signed in
    r = c.post("/ui/logout", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    assert any(x.startswith('pa_session=""') or "max-age=0" in x.lower() for x in r.headers.get_list("set-cookie"))
    assert session.scalar(select(WebSession).where(WebSession.team_id == team_a[0].id)) is None
    replay = TestClient(api, cookies={"pa_session": token})  # the old cookie, kept by someone
    assert replay.get("/ui/", follow_redirects=False).status_code == 303
    assert replay.get("/ui/api/progress").status_code == 401


def test_a_revoked_key_ends_its_sessions(api, client, team_a):
    _, h = team_a
    c = _signed_in(api, _key(h))
    assert c.get("/ui/api/progress").status_code == 200
    prefix = client.get("/v1/keys", headers=h).json()["data"][0]["prefix"]
    assert client.delete(f"/v1/keys/{prefix}", headers=h).status_code == 204
    r = c.get("/ui/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    p = c.get("/ui/api/progress")
    assert p.status_code == 401 and p.headers["content-type"].startswith("application/problem+json")
    assert _login(TestClient(api), _key(h)).status_code == 401


def test_a_session_expires(api, session, team_a):
    c = _signed_in(api, _key(team_a[1]))
    row = session.scalar(select(WebSession).where(WebSession.team_id == team_a[0].id))
    row.expires_at = row.created_at - timedelta(seconds=1)
    session.commit()
    assert c.get("/ui/", follow_redirects=False).status_code == 303
    assert c.get("/ui/api/progress").status_code == 401


def test_list_pages_and_progress_show_only_the_teams_objects(api, client, session, team_a, team_b, ready_encoder):
    _, ha = team_a
    a = _audit(client, session, ha, ready_encoder.id, "enc-1", {("gradpc", 0.03): 0.3, ("gradpc", 0.1): 0.4,
                                                               ("gc_feature", 0.03): 0.1, ("gc_feature", 0.1): 0.2})
    job = session.get(Job, uuid.UUID(a["jobs"][0]["id"]))
    job.status, job.progress_fraction = "running", 0.25
    session.commit()
    ca = _signed_in(api, _key(ha))
    page = ca.get("/ui/")
    assert page.status_code == 200
    assert f'href="/ui/audits/{a["id"]}"' in page.text and "enc-1" in page.text
    for j in a["jobs"]:
        assert f'href="/ui/jobs/{j["id"]}"' in page.text
    assert "<script src" not in page.text and "http://" not in page.text and "https://" not in page.text
    prog = ca.get("/ui/api/progress").json()
    assert [x["id"] for x in prog["audits"]] == [a["id"]] and prog["audits"][0]["status"] == "running"
    assert prog["audits"][0]["fraction"] == pytest.approx(3.25 / 4)
    running = next(x for x in prog["jobs"] if x["id"] == str(job.id))
    assert running == {"id": str(job.id), "status": "running", "fraction": 0.25}

    cb = _signed_in(api, _key(team_b[1]))
    page_b = cb.get("/ui/")
    assert page_b.status_code == 200 and a["id"] not in page_b.text and 'id="no-audits"' in page_b.text
    assert cb.get("/ui/api/progress").json() == {"audits": [], "jobs": []}


def test_report_pages_link_each_other_and_downloads_work(api, client, session, store, team_a, team_b, ready_encoder):
    _, ha = team_a
    a = _audit(client, session, ha, ready_encoder.id, "linked", {("gradpc", 0.03): 0.3, ("gradpc", 0.1): 0.4,
                                                               ("gc_feature", 0.03): 0.1, ("gc_feature", 0.1): 0.2})
    job = session.get(Job, uuid.UUID(next(j["id"] for j in a["jobs"] if j["attack"] == "gc_feature")))
    _artifact(session, store, job, "poisoned_set.npz", b"npz bytes")
    _artifact(session, store, job, "log.txt", b"the log", "text/plain; charset=utf-8")
    c = _signed_in(api, _key(ha))

    ap = c.get(f"/ui/audits/{a['id']}")
    assert ap.status_code == 200 and ap.headers["content-type"].startswith("text/html")
    assert ap.headers["cache-control"] == "no-store" and "form-action 'self'" in ap.headers["content-security-policy"]
    assert 'id="results-table"' in ap.text and 'id="logout"' in ap.text
    for j in a["jobs"]:
        assert f'<a href="/ui/jobs/{j["id"]}"' in ap.text  # the jobs table links each job (class job-link)
    assert f'href="/ui/compare?a={a["id"]}"' in ap.text

    jp = c.get(f"/ui/jobs/{job.id}")
    assert jp.status_code == 200 and f'href="/ui/audits/{a["id"]}"' in jp.text and 'id="results-table"' in jp.text
    assert f'href="/ui/jobs/{job.id}/poisoned-set"' in jp.text and f'href="/ui/jobs/{job.id}/artifacts/log.txt"' in jp.text
    d = c.get(f"/ui/jobs/{job.id}/poisoned-set")
    assert d.status_code == 200 and d.content == b"npz bytes" and "attachment" in d.headers["content-disposition"]
    assert c.get(f"/ui/jobs/{job.id}/artifacts/log.txt").content == b"the log"
    missing = c.get(f"/ui/jobs/{job.id}/artifacts/nope.bin")
    assert missing.status_code == 404
    other = session.get(Job, uuid.UUID(next(j["id"] for j in a["jobs"] if j["attack"] == "gradpc")))
    assert 'id="download-poisoned-set"' not in c.get(f"/ui/jobs/{other.id}").text
    assert c.get(f"/ui/jobs/{other.id}/poisoned-set").status_code == 404

    # another team: 404 for every one of them, as in the API
    cb = _signed_in(api, _key(team_b[1]))
    for path in (f"/ui/audits/{a['id']}", f"/ui/jobs/{job.id}", f"/ui/jobs/{job.id}/poisoned-set",
                 f"/ui/jobs/{job.id}/artifacts/log.txt", f"/ui/compare?a={a['id']}&b={a['id']}"):
        r = cb.get(path)
        assert r.status_code == 404, (path, r.status_code)
        assert b"npz bytes" not in r.content and "linked" not in r.text


def test_compare_page_shows_both_drops_and_their_difference(api, client, session, team_a, ready_encoder):
    from app.models import Encoder

    _, h = team_a
    enc2 = Encoder(team_id=ready_encoder.team_id, name="tiny-2", architecture="small_cnn",
                   spec={"arch": "small_cnn", "in_channels": 1, "width": 8}, source="upload", status="ready",
                   sha256="1" * 64, size=1)
    session.add(enc2)
    session.commit()
    a = _audit(client, session, h, ready_encoder.id, "encoder one", {("gradpc", 0.03): 0.30, ("gradpc", 0.1): 0.40,
                                                                    ("gc_feature", 0.03): 0.10, ("gc_feature", 0.1): 0.20})
    b = _audit(client, session, h, enc2.id, "encoder two", {("gradpc", 0.03): 0.25, ("gradpc", 0.1): 0.45,
                                                           ("gc_feature", 0.03): 0.15, ("gc_feature", 0.1): 0.05},
               clean=0.8)
    c = _signed_in(api, _key(h))
    form = c.get("/ui/compare")
    assert form.status_code == 200 and 'id="compare-form"' in form.text and 'id="compare-table"' not in form.text
    assert form.text.count(f'value="{a["id"]}"') == 2 and form.text.count(f'value="{b["id"]}"') == 2
    pre = c.get(f"/ui/compare?a={a['id']}")  # from an audit's page: B is preselected, nothing compared yet
    assert f'<option value="{b["id"]}" selected>' in pre.text and 'id="compare-table"' not in pre.text

    r = c.get(f"/ui/compare?a={a['id']}&b={b['id']}")
    assert r.status_code == 200
    cells = {}
    rows = re.findall(r'<tr data-label="([^"]+)">(.*?)</tr>', r.text)
    assert [label for label, _ in rows] == ["gradpc", "gc_feature"]
    for label, tr in rows:
        for eps, side, value in re.findall(r'data-eps="([^"]+)" data-side="([^"]+)" data-value="([^"]*)"', tr):
            cells[(label, eps, side)] = float(value)
    assert cells[("gradpc", "0.03", "a")] == pytest.approx(0.30) and cells[("gradpc", "0.03", "b")] == pytest.approx(0.25)
    assert cells[("gradpc", "0.03", "diff")] == pytest.approx(-0.05)
    assert cells[("gc_feature", "0.1", "diff")] == pytest.approx(-0.15)
    assert cells[("gradpc", "0.1", "diff")] == pytest.approx(0.05)
    assert len(cells) == 2 * 2 * 3
    assert "+5.00 pts" in r.text and "-15.00 pts" in r.text
    assert 'id="clean-diff">-10.00 pts' in r.text
    assert f'href="/ui/audits/{a["id"]}" id="link-a"' in r.text and f'href="/ui/audits/{b["id"]}" id="link-b"' in r.text


def test_compare_rows_matches_rows_by_label_and_leaves_gaps():
    from app.web.pages import compare_rows

    cell = lambda d: {"drop": {"mean": d, "std": 0.0, "n": 1}}
    a = {"table": {"epsilons": [0.03], "rows": [{"attack": "gradpc", "beta": None, "label": "gradpc",
                                                 "cells": {"0.03": cell(0.2)}}]}}
    b = {"table": {"epsilons": [0.03, 0.1], "rows": [
        {"attack": "feature_matching", "beta": 0.25, "label": "feature_matching (beta=0.25)",
         "cells": {"0.03": cell(0.1), "0.1": cell(0.3)}},
        {"attack": "gradpc", "beta": None, "label": "gradpc", "cells": {"0.03": cell(0.5), "0.1": {"drop": None}}}]}}
    eps, rows = compare_rows(a, b)
    assert eps == [0.03, 0.1] and [r["label"] for r in rows] == ["gradpc", "feature_matching (beta=0.25)"]
    assert rows[0]["cells"]["0.03"] == {"a": 0.2, "b": 0.5, "diff": pytest.approx(0.3)}
    assert rows[0]["cells"]["0.1"] == {"a": None, "b": None, "diff": None}
    assert rows[1]["cells"]["0.1"] == {"a": None, "b": 0.3, "diff": None}


def test_names_are_escaped(api, client, session, team_a, ready_encoder):
    _, h = team_a
    _audit(client, session, h, ready_encoder.id, "<script>alert(1)</script>", {
        ("gradpc", 0.03): 0.3, ("gradpc", 0.1): 0.4, ("gc_feature", 0.03): 0.1, ("gc_feature", 0.1): 0.2})
    c = _signed_in(api, _key(h))
    for path in ("/ui/", "/ui/compare"):
        text = c.get(path).text
        assert "<script>alert(1)</script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_junk_is_never_a_500(api, team_a):
    c = _signed_in(api, _key(team_a[1]))
    anon = TestClient(api)
    junk = ["/ui/jobs/not-a-uuid", f"/ui/jobs/{uuid.uuid4()}", "/ui/audits/%00", f"/ui/audits/{uuid.uuid4()}",
            "/ui/audits/" + "9" * 500, "/ui/compare?a=junk&b=junk", f"/ui/compare?a={uuid.uuid4()}&b={uuid.uuid4()}",
            "/ui/compare?a=" + "x" * 300, "/ui/compare?b=only-b", f"/ui/jobs/{uuid.uuid4()}/poisoned-set",
            "/ui/jobs/x/artifacts/..%2f..%2fetc", "/ui/nope", "/ui/api/nope", "/ui"]
    for path in junk:
        for who in (c, anon):
            r = who.get(path, follow_redirects=False)
            assert r.status_code < 500, (path, r.status_code, r.text[:300])
    for path in ("/ui/jobs/not-a-uuid", f"/ui/audits/{uuid.uuid4()}", "/ui/compare?a=junk&b=junk"):
        assert c.get(path).status_code == 404
    posts = [("/ui/login", {"content": b"\xff\xfe\x00", "headers": {"content-type": "application/x-www-form-urlencoded"}}),
             ("/ui/login", {"json": {"key": "x"}}), ("/ui/login", {"data": {"key": ["a", "b"]}}),
             ("/ui/logout", {"content": b"csrf=%ff%00"}), ("/ui/logout", {"json": [1, 2]}),
             ("/ui/", {"data": {}}), ("/ui/compare", {"data": {}})]
    for path, kw in posts:
        for who in (c, anon):
            r = who.post(path, follow_redirects=False, **kw)
            assert r.status_code < 500, (path, kw, r.status_code, r.text[:300])
    assert c.get("/ui/").status_code == 200  # none of that signed it out


def test_the_pages_are_not_in_the_openapi_schema(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert paths and not [p for p in paths if p.startswith("/ui")]
