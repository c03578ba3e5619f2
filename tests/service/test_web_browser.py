"""The web pages and /docs in a real headless Chromium (Debian's /usr/bin/chromium driven by
Playwright; no `playwright install`), on the production-like stack of test_e2e_audit.py (Postgres,
Redis, moto S3, uvicorn, a Celery worker): sign in with a key, the list with live progress, an
audit's report, one of its jobs' report and download, the comparison of two audits (two
encoders), sign-out; and Swagger UI offline. Every request the browser makes is checked to stay on
this machine. The values the pages show are checked against the API's JSON.

POISONAUDIT_UI_SCREENSHOTS=docs writes the screenshots (ui-list.png, ui-audit.png, ui-compare.png)
there as well as under the test's tmp dir."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from app.report import pct, pts, stat

from .helpers import CI, s3_stack_env, start_api, start_worker, wait_for
from .test_e2e import create_team

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("POISONAUDIT_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
GC = {"corrupt": "weights", "refit_bias": True, "target_accuracy": 0.5, "gc_steps": 300}
ATTACKS = [{"name": "gradpc", "params": {"corrupt": "weights", "refit_bias": True, "target_accuracy": 0.5}},
           {"name": "gc_feature", "params": GC}, {"name": "feature_matching", "params": {**GC, "fm_steps": 100}}]
EPSILONS = [0.03, 0.1]
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


def _playwright():
    """Playwright and the system Chromium, or a skip (a failure with CI=true), as tests/test_report.py does."""
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright package (pip install -e '.[test]')")
        sync_playwright = None
    if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        missing.append("chromium (scripts/services.sh installs it)")
    if missing:
        if CI:
            pytest.fail(f"{' and '.join(missing)} required when CI=true", pytrace=False)
        pytest.skip(f"{' and '.join(missing)} not installed")
    return sync_playwright


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _playwright()
    exe = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=FLAGS)  # a fresh temporary profile
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def stack(pg_databases, redis_url, s3_endpoint, tmp_path_factory, tiny_encoder_dir):
    """The stack, a team with two uploaded encoders (different random inits) and one finished audit
    of each, and a second team."""
    import torch

    from attacks.encoders import EncoderSpec, build_encoder, freeze, save_encoder

    logs = tmp_path_factory.mktemp("web-logs")
    env = s3_stack_env(pg_databases(), redis_url, s3_endpoint, tmp_path_factory.mktemp("web-var"), "web-ui",
                       POISONAUDIT_ENCODER_CHECK_WAIT_S="60")
    procs = []
    try:
        api, base = start_api(env, logs)
        procs.append(api)
        h = create_team(env, "web-a")
        other = create_team(env, "web-b")
        procs.append(start_worker("ww", env, logs))
        torch.manual_seed(1)
        second = save_encoder(freeze(build_encoder(EncoderSpec(arch="small_cnn", in_channels=1, width=8))),
                              tmp_path_factory.mktemp("tiny_encoder_2"))
        spec = json.dumps({"in_channels": 1, "width": 8})
        with httpx.Client(base_url=base, headers=h, timeout=60) as c:
            encoders = []
            for name, d in (("tiny seed 0", tiny_encoder_dir), ("tiny seed 1", second)):
                with open(Path(d) / "encoder.safetensors", "rb") as f:
                    r = c.post("/v1/encoders", data={"architecture": "small_cnn", "spec": spec, "name": name},
                               files={"file": ("w.safetensors", f)})
                assert r.status_code == 201 and r.json()["encoder"]["status"] == "ready", r.text
                encoders.append(r.json()["encoder"]["id"])
            audits = []
            for name, enc in zip(("digits, encoder seed 0", "digits, encoder seed 1"), encoders):
                r = c.post("/v1/audits", json={"name": name, "encoder": enc, "dataset": "digits", "attacks": ATTACKS,
                                               "epsilons": EPSILONS, "betas": [0.25], "seeds": [0],
                                               "head": {"epochs": 20}})
                assert r.status_code == 202, r.text
                audits.append(r.json()["id"])
            done = [wait_for(lambda a=a: (x := c.get(f"/v1/audits/{a}").json())["status"]
                             in ("succeeded", "failed", "partial", "cancelled") and x, 300, f"audit {a}")
                    for a in audits]
            assert [d["status"] for d in done] == ["succeeded", "succeeded"], [
                j["error"] for d in done for j in d["jobs"] if j["error"]]
        yield {"base": base, "key": h["Authorization"].split()[1], "headers": h,
               "other_key": other["Authorization"].split()[1], "audits": audits, "encoders": encoders, "env": env}
    finally:
        for p in reversed(procs):
            p.stop()


@pytest.fixture
def context(browser, stack):
    """A browser context (own cookies) whose requests must stay on this machine; ``off_host`` lists any
    that tried not to (aborted)."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    ctx.off_host = []

    def gate(route):
        url = route.request.url
        if url.startswith(("data:", "blob:")) or urlsplit(url).hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            ctx.off_host.append(url)
            route.abort()

    ctx.route("**/*", gate)
    yield ctx
    ctx.close()


def _shot(page, tmp_path, name: str, full_page: bool = False) -> Path:
    from PIL import Image

    path = tmp_path / name
    page.screenshot(path=str(path), full_page=full_page)
    img = np.asarray(Image.open(path).convert("L"), dtype=float) / 255
    assert img.std() > 0.05, f"{name}: a blank page"
    dark = (img < 0.5).mean()
    assert 0.003 < dark < 0.6, f"{name}: text on a background (dark fraction {dark:.3f})"
    out = os.environ.get("POISONAUDIT_UI_SCREENSHOTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(out) / name)
    return path


def _sign_in(page, base: str, key: str) -> None:
    page.goto(base + "/ui/")
    assert urlsplit(page.url).path == "/ui/login"  # no session: the form
    page.fill("#key", key)
    with page.expect_navigation():
        page.click("#login button[type=submit]")
    assert urlsplit(page.url).path == "/ui/", page.content()[:2000]


def _table(page, selector: str) -> list[list[str]]:
    return page.eval_on_selector_all(f"{selector} tr", "rows => rows.map(r => Array.from(r.children).map(c => c.innerText.trim()))")


def test_sign_in_list_audit_job_compare_and_sign_out(context, stack, tmp_path):
    base, api = stack["base"], httpx.Client(base_url=stack["base"], headers=stack["headers"], timeout=30)
    a_id, b_id = stack["audits"]
    audit = api.get(f"/v1/audits/{a_id}").json()
    # a job still queued or running when the list opens, to see its row change in place
    live = api.post("/v1/jobs", json={"encoder": stack["encoders"][0], "dataset": "digits", "attack": "gradpc",
                                      "params": {"eps_w": 2.0}, "head": {"epochs": 20}}).json()
    page = context.new_page()
    _sign_in(page, base, stack["key"])

    cookie = next(c for c in context.cookies() if c["name"] == "pa_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    assert "pa_session" not in page.evaluate("document.cookie")  # HttpOnly: no script reads it

    # the list: both audits linked, and the live job's row updated by the polling script, no reload
    assert page.locator("#audits-table a.audit-link").count() == 2
    row = page.locator(f'tr[data-kind="jobs"][data-id="{live["id"]}"]')
    first = row.locator(".status").inner_text()
    page.wait_for_function(
        f"""() => {{const r = document.querySelector('tr[data-kind="jobs"][data-id="{live["id"]}"]');
                  return r && r.querySelector('.status').textContent === 'succeeded'
                         && r.querySelector('.pct').textContent === '100%'; }}""", timeout=120_000, polling=500)
    polls = int(page.get_attribute("#poll", "data-polls"))
    assert polls >= 1 and page.inner_text("#poll") == "all finished"
    if first != "succeeded":  # seen queued or running at load: the script changed it
        assert polls >= 2, (first, polls)
    print(f"\nlive job: {first!r} at load, succeeded after {polls} polls")
    _shot(page, tmp_path, "ui-list.png")

    # list -> audit report
    with page.expect_navigation():
        page.click(f'#audits-table a[href="/ui/audits/{a_id}"]')
    assert urlsplit(page.url).path == f"/ui/audits/{a_id}"
    t = audit["table"]
    assert stat(t["clean_accuracy"]) in page.inner_text("#clean-accuracy")
    shown = _table(page, "#results-table")
    assert shown[0] == ["attack"] + [f"eps {e:g}" for e in EPSILONS]
    assert len(shown) == 1 + len(t["rows"])
    for tr, row_json in zip(shown[1:], t["rows"]):
        assert tr[0].split("\n")[0] == row_json["label"]
        for text, e in zip(tr[1:], EPSILONS):
            cell = row_json["cells"][str(e)]
            assert f"acc {stat(cell['poisoned_accuracy'])}" in text and f"drop {stat(cell['drop'], 'pts')}" in text, text
    assert page.get_attribute("body", "data-images-loaded") == "1/1"  # the drop-vs-epsilon figure decoded
    _shot(page, tmp_path, "ui-audit.png", full_page=True)

    # audit report -> one of its jobs (feature matching: poisons in input space, a poisoned set)
    job_ref = next(j for j in audit["jobs"] if j["attack"] == "feature_matching" and j["epsilon"] == 0.1)
    with page.expect_navigation():
        page.click(f'#jobs-table a[href="/ui/jobs/{job_ref["id"]}"]')
    assert urlsplit(page.url).path == f"/ui/jobs/{job_ref['id']}"
    job = api.get(f"/v1/jobs/{job_ref['id']}").json()
    m = job["metrics"]
    results = {r[0]: r[1] for r in _table(page, "#results-table")}
    assert results["clean accuracy"] == pct(m["clean_accuracy"])
    assert results["poisoned accuracy"] == pct(m["poisoned_accuracy"]) and results["drop"] == pts(m["drop"])
    assert results["poisons"] == str(m["n_poisons"])
    assert page.inner_text("#status") == job["status"] == "succeeded"
    assert page.get_attribute("#audit-link", "href") == f"/ui/audits/{a_id}"
    with page.expect_download() as dl:
        page.click("#download-poisoned-set")  # a cookie-authenticated route, then the store's presigned URL
    with np.load(dl.value.path()) as z:
        assert len(z["y"]) == z["x"].shape[0] == m["n_poisons"] and z["x"].shape[1:] == (1, 8, 8)
    with page.expect_navigation():
        page.click("#audit-link")  # and back to its audit
    assert urlsplit(page.url).path == f"/ui/audits/{a_id}"

    # the comparison: chosen in the form
    with page.expect_navigation():
        page.click("#compare-link")
    page.select_option("#a", a_id)
    page.select_option("#b", b_id)
    with page.expect_navigation():
        page.click("#compare-form button[type=submit]")
    assert urlsplit(page.url).query == f"a={a_id}&b={b_id}"
    ta, tb = t, api.get(f"/v1/audits/{b_id}").json()["table"]
    shown = _table(page, "#compare-table")
    assert shown[0] == ["attack"] + [f"eps {e:g}" for e in EPSILONS]
    assert shown[1] == ["drop A", "drop B", "B − A"] * len(EPSILONS)
    for tr, ra, rb in zip(shown[2:], ta["rows"], tb["rows"]):
        assert tr[0] == ra["label"] == rb["label"]
        for k, e in enumerate(EPSILONS):
            da, db = ra["cells"][str(e)]["drop"]["mean"], rb["cells"][str(e)]["drop"]["mean"]
            assert tr[1 + 3 * k: 4 + 3 * k] == [pts(da), pts(db), pts(db - da)], (tr, da, db)
    assert len(shown) == 2 + len(ta["rows"])
    _shot(page, tmp_path, "ui-compare.png", full_page=True)

    # another team's browser: the same addresses are 404s
    other = context.browser.new_context()
    p2 = other.new_page()
    _sign_in(p2, base, stack["other_key"])
    for path in (f"/ui/audits/{a_id}", f"/ui/jobs/{job_ref['id']}"):
        assert p2.goto(base + path).status == 404
    other.close()

    # sign-out: back to the form, and the pages lead there again
    with page.expect_navigation():
        page.click("#logout button")
    assert urlsplit(page.url).path == "/ui/login"
    page.goto(base + f"/ui/audits/{a_id}")
    assert urlsplit(page.url).path == "/ui/login"
    assert context.off_host == []


def test_swagger_ui_lists_the_operations_offline(context, stack):
    """/docs in a browser that may reach nothing but the API: Swagger UI loads from the API's own
    files and lists every operation of /openapi.json."""
    spec = httpx.get(stack["base"] + "/openapi.json").json()
    ops = {(m.upper(), p) for p, item in spec["paths"].items() for m in item if m in ("get", "post", "put", "delete", "patch")}
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(stack["base"] + "/docs")
    page.wait_for_selector(".opblock", timeout=30_000)
    shown = {tuple(x) for x in page.eval_on_selector_all(
        ".opblock", "els => els.map(e => [e.querySelector('.opblock-summary-method').innerText.trim(), "
                    "e.querySelector('.opblock-summary-path').getAttribute('data-path')])")}
    assert shown == ops and ("POST", "/v1/audits") in shown and ("GET", "/v1/jobs/{job_id}") in shown
    assert "poisonaudit" in page.inner_text(".info .title")
    assert not errors and context.off_host == []
