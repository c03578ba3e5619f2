"""Report pages: pure rendering (always runs) and a real headless Chromium (integration).

The Chromium test needs the Debian package ``chromium`` (scripts/services.sh installs it).
With CI=true it fails when chromium is missing; locally it skips only then."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from app.report import CSP, render_audit_report, render_job_report

CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
EVIL = '<script>alert("x")</script>&"'


TABLE = {
    "clean_accuracy": {"mean": 0.93, "std": 0.004, "n": 3},
    "epsilons": [0.03, 0.1, 1.0],
    "rows": [
        {"attack": "feature_matching", "beta": 0.25, "label": "FM beta 0.25", "cells": {
            "0.03": {"poisoned_accuracy": {"mean": 0.91, "std": 0.01, "n": 3}, "drop": {"mean": 0.02, "std": 0.01, "n": 3}},
            "0.1": {"poisoned_accuracy": None, "drop": None}}},
        {"attack": "gc_feature", "beta": None, "cells": {
            "0.03": {"poisoned_accuracy": {"mean": 0.6, "std": 0.0, "n": 1}, "drop": {"mean": 0.33, "std": 0.0, "n": 1}}}},
    ],
    "summary": [],
}


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def pixels(data: bytes) -> np.ndarray:
    import matplotlib.image as mpimg

    return mpimg.imread(io.BytesIO(data), format="png")


@pytest.fixture(scope="module")
def figures():
    from attacks import figures as F

    g = torch.Generator().manual_seed(0)
    clean = torch.rand(6, 1, 16, 16, generator=g)
    poisons = clean + 0.4 * torch.randn(6, 1, 16, 16, generator=g)
    return {"figure-examples.png": F.examples_figure(clean, poisons, clean_range=(0.0, 1.0)),
            "figure-linf-histogram.png": F.linf_histogram(poisons, (0.0, 1.0), clean=clean)}


def _job(status="succeeded", **over) -> dict:
    metrics = {
        "clean_accuracy": 0.9325, "poisoned_accuracy": 0.8810, "drop": 0.0515, "target_accuracy": 0.71,
        "n_poisons": 120, "n_train": 4000, "n_test": 1000,
        "defences": {
            "linf": {"applicable": True, "accuracy": 0.9231, "poisons_removed": 37, "clean_removed": 0,
                     "n_poisons": 120, "n_clean": 4000, "n_kept": 4083, "params": {"margin": 0.0}},
            "knn": {"applicable": True, "accuracy": 0.9002, "poisons_removed": 58, "clean_removed": 91,
                    "n_poisons": 120, "n_clean": 4000, "n_kept": 3971, "params": {"k": 10}},
            "spectral": {"applicable": True, "accuracy": 0.8899, "poisons_removed": 12, "clean_removed": 168,
                         "n_poisons": 120, "n_clean": 4000, "n_kept": 3940, "params": {"budget": 1.5}},
        },
        "poison_stats": {"linf": {"mean": 1.21, "median": 1.1, "max": 2.0}, "clean_range": [0.0, 1.0]},
        "params": {"fm_steps": 40, "note": EVIL},
        "versions": {"torch": "2.14.1", "poisonaudit": "0.1.0"},
        "encoder_fingerprint": "f" * 64, "dataset_hash": "d" * 64, "device": "cpu", "device_name": "cpu",
        "stage_seconds": {"attack": 1.5},
    }
    job = {
        "id": "0b6c7c1e-0000-4000-8000-000000000001", "kind": "attack", "status": status,
        "attack": "feature_matching", "encoder": "0b6c7c1e-0000-4000-8000-0000000000e1", "dataset": EVIL,
        "epsilon": 0.03, "beta": 0.25, "params": {"fm_steps": 40}, "seed": 7, "device": "cpu", "head": None,
        "queue": "cpu", "progress": {"stage": "attack", "fraction": 0.4, "updated_at": None},
        "metrics": metrics if status == "succeeded" else None, "error": None, "artifacts": [],
        "created_at": "2024-05-01T10:00:00Z", "started_at": None, "finished_at": None,
    }
    job.update(over)
    return job


class _Collect(HTMLParser):
    """Tags, attributes and the text of every table cell."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.cells: dict[str, list[list[str]]] = {}
        self._table: list[str | None] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "table":
            self._table.append(a.get("id"))
            self.cells.setdefault(a.get("id") or "", [])
        elif tag == "tr" and self._table:
            self.cells[self._table[-1] or ""].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._table:
            rows = self.cells[self._table[-1] or ""]
            rows[-1].append(" ".join(" ".join(self._cell).split()))
            self._cell = None
        elif tag == "table" and self._table:
            self._table.pop()

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> _Collect:
    p = _Collect()
    p.feed(page)
    return p


def _no_external_references(page: str):
    p = parse(page)
    for tag, attrs in p.tags:
        for key in ("src", "href", "action", "srcset", "poster", "data"):
            if key in attrs:
                assert attrs[key].startswith("data:image/png;base64,"), (tag, key, attrs[key][:80])
    assert not re.search(r"url\(|@import|https?://", page.split("<body>", 1)[0]), "no external CSS"
    assert "http://" not in page and "https://" not in page


# ------------------------------------------------------------------ pure rendering
def test_job_report_has_the_results_defences_figures_parameters_and_provenance(figures):
    page = render_job_report(_job(), figures)
    p = parse(page)
    results = {r[0]: r[1] for r in p.cells["results-table"]}
    assert results["clean accuracy"] == "93.25%"
    assert results["poisoned accuracy"] == "88.10%"
    assert results["drop"] == "+5.15 pts"
    defences = {r[0].split()[0]: r[1:] for r in p.cells["defences-table"][1:]}
    assert defences["none"][0] == "88.10%"
    assert defences["linf"] == ["92.31%", "+0.94 pts", "37 / 120", "0 / 4000"]
    assert defences["knn"][2:] == ["58 / 120", "91 / 4000"]
    assert defences["spectral"][0] == "88.99%"
    imgs = [a for t, a in p.tags if t == "img"]
    assert [a["data-name"] for a in imgs] == ["figure-examples.png", "figure-linf-histogram.png"]
    for a in imgs:
        png = base64.b64decode(a["src"].split(",", 1)[1])
        assert png == figures[a["data-name"]]
    prov = {r[0]: r[1] for r in p.cells["provenance"]}
    assert prov["encoder fingerprint"] == "f" * 64 and prov["dataset hash"] == "d" * 64
    assert prov["torch (worker)"] == "2.14.1" and prov["seed"] == "7" and prov["device"] == "cpu"
    assert prov["poisonaudit (this page)"]
    params = {r[0]: r[1] for r in p.cells["parameters"]}
    assert params["epsilon"] == "0.03" and params["beta"] == "0.25" and params["params.fm_steps"] == "40"
    _no_external_references(page)


def test_everything_user_controlled_is_escaped(figures):
    page = render_job_report(_job(error=EVIL), {**figures, EVIL: b"not a png"})
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&quot;" in page
    # the only script element is the page's own
    assert page.count("<script>") == 1
    audit = render_audit_report({"id": EVIL, "name": EVIL, "table": {**TABLE, "rows": [
        {**TABLE["rows"][0], "label": EVIL, "attack": EVIL}]}, "provenance": {EVIL: EVIL}}, {})
    assert "<script>alert" not in audit and audit.count("<script>") == 1


def test_a_job_not_finished_renders_its_status(figures):
    page = render_job_report(_job(status="running"), {})
    p = parse(page)
    status = {r[0]: r[1] for r in p.cells["status-table"]}
    assert status["status"] == "running" and status["stage"] == "attack" and status["progress"] == "40%"
    assert "results-table" not in p.cells and "not produced results yet" in page
    failed = render_job_report(_job(status="failed", error="AttackDiverged: zeta became non-finite"), {})
    assert "AttackDiverged: zeta became non-finite" in failed and 'id="error"' in failed


def test_feature_space_job_marks_linf_not_applicable():
    job = _job()
    job["metrics"]["defences"]["linf"] = {"applicable": False, "reason": "feature-space poisons have no pixels"}
    rows = {r[0].split()[0]: r[1:] for r in parse(render_job_report(job, {})).cells["defences-table"][1:]}
    assert rows["linf"] == ["n/a: feature-space poisons have no pixels"]


def test_page_is_self_contained_with_a_csp_that_allows_its_script():
    import hashlib

    page = render_job_report(_job(), {})
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in CSP and "default-src 'none'" in CSP
    assert 'http-equiv="Content-Security-Policy"' in page


def test_audit_report_table_summary_and_defences():
    cells03 = TABLE["rows"][0]["cells"]["0.03"]
    table = {**TABLE, "rows": [
        {**TABLE["rows"][0], "cells": {**TABLE["rows"][0]["cells"], "0.03": {
            **cells03, "jobs": {"succeeded": 3, "failed": 0},
            "defences": {"knn": {"accuracy": {"mean": 0.925, "std": 0.002, "n": 3},
                                 "poisons_removed": {"mean": 40, "std": 2, "n": 3},
                                 "clean_removed": {"mean": 90, "std": 5, "n": 3}},
                         "linf": {"applicable": False, "reason": "no pixels"}}}}},
        TABLE["rows"][1]],
        "summary": [{"attack": "gc_feature", "epsilon": 0.03, "drop": {"mean": 0.33, "std": 0.0, "n": 1}}]}
    audit = {"id": "a-1", "name": "mnist audit", "status": "succeeded", "encoder": "enc-1", "seeds": [0, 1, 2],
             "table": table, "provenance": {"encoder fingerprint": "f" * 8, "torch": "2.14.1"}}
    png = b"\x89PNG\r\n\x1a\n" + b"rest"
    page = render_audit_report(audit, {"figure-drop-vs-epsilon.png": png})
    p = parse(page)
    res = p.cells["results-table"]
    assert res[0] == ["attack", "eps 0.03", "eps 0.1", "eps 1"]
    fm = res[1]
    assert fm[0].startswith("FM beta 0.25")
    assert "acc 91.00 ± 1.00% (n=3)" in fm[1] and "drop 2.00 ± 1.00 pts (n=3)" in fm[1]
    assert "jobs: succeeded 3, failed 0" in fm[1]
    assert fm[2] == "acc – drop –"  # null cell
    assert res[2][0].startswith("gc_feature") and "beta" not in res[2][0] and res[2][2] == "–"
    assert "Clean accuracy: 93.00 ± 0.40% (n=3)" in re.sub(r"<[^>]+>", "", page)
    assert p.cells["summary-table"][1] == ["gc_feature", "0.03", "33.00 pts (n=1)"]
    none_row = p.cells["defences-table"][1]
    assert none_row[1] == "none (no defence)" and none_row[2] == "91.00 ± 1.00% (n=3)"
    knn = [r for r in p.cells["defences-table"] if "knn" in r][0]
    assert knn[1].startswith("92.50 ± 0.20% (n=3)") and "poisons 40 ± 2 (n=3)" in knn[1]
    linf = [r for r in p.cells["defences-table"] if "linf" in r][0]
    assert linf[1] == "n/a"
    params = {r[0]: r[1] for r in p.cells["parameters"]}
    assert params["encoder"] == "enc-1" and params["seeds"] == "[0, 1, 2]"
    prov = {r[0]: r[1] for r in p.cells["provenance"]}
    assert prov["encoder fingerprint"] == "ffffffff" and prov["torch"] == "2.14.1"
    assert [a["data-name"] for t, a in p.tags if t == "img"] == ["figure-drop-vs-epsilon.png"]
    _no_external_references(page)


# ------------------------------------------------------------------ real Chromium
def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if CI:
            pytest.fail("chromium is required when CI=true (scripts/services.sh installs it)", pytrace=False)
        pytest.skip("chromium not installed")
    return exe


def _run_chromium(exe: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.integration
def test_job_report_renders_in_headless_chromium(figures, tmp_path):
    exe = _chromium()
    path = tmp_path / "report.html"
    path.write_text(render_job_report(_job(), figures), encoding="utf-8")
    url = path.as_uri()

    dom = _run_chromium(exe, tmp_path, "--virtual-time-budget=5000", "--dump-dom", url).stdout
    p = parse(dom)
    body = [a for t, a in p.tags if t == "body"][0]
    assert body.get("data-images-loaded") == "2/2", "the load handler ran and both figures decoded"
    imgs = {a["data-name"]: a for t, a in p.tags if t == "img"}
    for name, png in figures.items():
        w, h = png_size(png)
        assert int(imgs[name]["data-natural-width"]) == w and int(imgs[name]["data-natural-height"]) == h
    results = {r[0]: r[1] for r in p.cells["results-table"]}
    assert results["poisoned accuracy"] == "88.10%" and results["drop"] == "+5.15 pts"
    defences = {r[0].split()[0]: r[1] for r in p.cells["defences-table"][1:]}
    assert defences == {"none": "88.10%", "linf": "92.31%", "knn": "90.02%", "spectral": "88.99%"}
    assert not [a for t, a in p.tags if t == "script" and a.get("src")]

    shot = tmp_path / "shot.png"
    _run_chromium(exe, tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", url)
    data = shot.read_bytes()
    assert png_size(data) == (1200, 1600)
    img = pixels(data)[..., :3]
    assert img.std() > 0.05, "not a blank page"
    dark = (img.mean(2) < 0.3).mean()
    assert 0.005 < dark < 0.5, f"text and figures but mostly background (dark fraction {dark:.3f})"
    # The figures are in the screenshot: rows with many distinct colours (the diverging colormap).
    reddish = ((img[..., 0] > 0.6) & (img[..., 2] < 0.45)).sum()
    bluish = ((img[..., 2] > 0.6) & (img[..., 0] < 0.45)).sum()
    assert reddish > 200 and bluish > 200, (reddish, bluish)
    if os.environ.get("POISONAUDIT_KEEP_SCREENSHOT"):  # to look at it
        shutil.copy(shot, os.environ["POISONAUDIT_KEEP_SCREENSHOT"])


def test_audit_report_in_the_shape_of_audit_public():
    """AuditPublic as app.audits builds it: per-defence accuracy summaries, worst_drop as a number, a jobs list."""
    stat = {"mean": 0.88, "std": 0.01, "n": 2}
    cell = {"poisoned_accuracy": stat, "drop": {"mean": 0.05, "std": 0.01, "n": 2},
            "jobs": {"succeeded": 2, "failed": 0, "pending": 0},
            "defences": {"knn": {"mean": 0.9, "std": 0.0, "n": 2}, "spectral": {"mean": 0.91, "std": 0.02, "n": 2}}}
    audit = {"id": "a-2", "name": "digits", "status": "succeeded", "encoder": "enc", "dataset": "digits",
             "attacks": [{"name": "feature_matching"}], "epsilons": [0.03], "betas": [0.25], "seeds": [0, 1],
             "device": "cpu", "head": None,
             "table": {"clean_accuracy": {"mean": 0.93, "std": 0.0, "n": 2}, "epsilons": [0.03],
                       "rows": [{"attack": "feature_matching", "beta": 0.25, "label": "feature_matching (beta=0.25)",
                                 "cells": {"0.03": cell}}],
                       "summary": [{"epsilon": 0.03, "worst_drop": 0.05, "attack": "feature_matching", "beta": 0.25}]},
             "jobs": [{"id": "j1", "attack": "feature_matching", "label": "feature_matching (beta=0.25)", "beta": 0.25,
                       "epsilon": 0.03, "seed": 0, "status": "succeeded", "error": None}]}
    p = parse(render_audit_report(audit, {}))
    assert p.cells["summary-table"][1] == ["0.03", "5.00 pts", "feature_matching", "0.25"]
    defs = {r[-2] if len(r) == 3 else r[0]: r[-1] for r in p.cells["defences-table"][1:]}
    assert defs["knn"] == "90.00 ± 0.00% (n=2)" and defs["spectral"] == "91.00 ± 2.00% (n=2)"
    assert p.cells["jobs-table"][1][:4] == ["feature_matching (beta=0.25)", "0.03", "0", "succeeded"]
    params = {r[0]: r[1] for r in p.cells["parameters"]}
    assert params["epsilons"] == "[0.03]" and params["seeds"] == "[0, 1]" and "jobs" not in params


@pytest.mark.integration
def test_audit_report_renders_in_headless_chromium(tmp_path):
    """The audit page: the attack x epsilon table and the drop-vs-epsilon figure, in a real browser."""
    from attacks.figures import drop_vs_epsilon

    exe = _chromium()
    png = drop_vs_epsilon(TABLE)
    audit = {"id": "a-9", "name": "digits audit", "status": "succeeded", "encoder": "enc-9", "seeds": [0],
             "table": TABLE, "provenance": {"torch": "2.14.1"}}
    path = tmp_path / "audit.html"
    path.write_text(render_audit_report(audit, {"figure-drop-vs-epsilon.png": png}), encoding="utf-8")
    dom = _run_chromium(exe, tmp_path, "--virtual-time-budget=5000", "--dump-dom", path.as_uri()).stdout
    p = parse(dom)
    body = [a for t, a in p.tags if t == "body"][0]
    assert body.get("data-images-loaded") == "1/1", "the figure decoded in the browser"
    img = [a for t, a in p.tags if t == "img"][0]
    assert (int(img["data-natural-width"]), int(img["data-natural-height"])) == png_size(png)
    res = p.cells["results-table"]
    assert res[0][0] == "attack" and len(res) == 1 + len(TABLE["rows"])
    assert [r[0].split()[0] for r in res[1:]] == [(r.get("label") or r["attack"]).split()[0] for r in TABLE["rows"]]
    shot = tmp_path / "audit.png"
    _run_chromium(exe, tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", path.as_uri())
    pix = pixels(shot.read_bytes())[..., :3]
    assert pix.std() > 0.05, "not a blank page"
