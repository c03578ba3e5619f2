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


# ------------------------------------------------------------------ poisons, removals, encoder, links (#16)
ENCODER = {"id": "0b6c7c1e-0000-4000-8000-0000000000e1", "name": "my resnet", "architecture": "resnet18",
           "fingerprints": ["9" * 64], "weights_sha256": "5" * 64, "source": "upload", "spec": {"arch": "resnet18"}}


def _audit_public(**over) -> dict:
    """AuditPublic as app.audits builds it, with the per-cell poisons and removals."""
    s = lambda m, sd=0.0, n=2: {"mean": m, "std": sd, "n": n}
    cell = {"poisoned_accuracy": s(0.88), "drop": s(0.05, 0.01), "jobs": {"succeeded": 2, "failed": 0, "pending": 0},
            "defences": {"knn": s(0.9), "linf": s(0.92)}, "n_poisons": s(120),
            "removed": {"knn": {"poisons_removed": s(40, 2), "fraction": s(40 / 120, 2 / 120), "clean_removed": s(90, 5)},
                        "linf": {"poisons_removed": s(120), "fraction": s(1.0), "clean_removed": s(0)}}}
    bare = {"poisoned_accuracy": s(0.8, 0.0, 1), "drop": s(0.13, 0.0, 1),
            "jobs": {"succeeded": 1, "failed": 0, "pending": 0}, "defences": {}, "n_poisons": s(400, 0.0, 1),
            "removed": {}}
    audit = {"id": "a-3", "name": "removals", "status": "partial", "encoder": ENCODER["id"], "dataset": "digits",
             "epsilons": [0.03, 0.1], "seeds": [0, 1],
             "table": {"clean_accuracy": s(0.93), "epsilons": [0.03, 0.1],
                       "rows": [{"attack": "feature_matching", "beta": 0.25, "label": "feature_matching (beta=0.25)",
                                 "cells": {"0.03": cell, "0.1": bare}}],
                       "summary": [{"epsilon": 0.03, "worst_drop": 0.05, "attack": "feature_matching", "beta": 0.25}]},
             "jobs": [{"id": f"job-{e_}-{seed}", "attack": "feature_matching", "label": "feature_matching (beta=0.25)",
                       "beta": 0.25, "epsilon": e_, "seed": seed, "status": "succeeded", "error": None}
                      for e_ in (0.03, 0.1) for seed in (0, 1)]}
    audit.update(over)
    return audit


def _removals(page: str) -> dict[str, list[str]]:
    """removals-table rows by their label cell (the attack's header cell, on its first row, dropped)."""
    out = {}
    for r in parse(page).cells["removals-table"][1:]:
        r = r[1:] if r[0].startswith("feature_matching") else r
        out[r[0].split(" removed")[0]] = r[1:]
    return out


def test_audit_report_gives_poisons_and_what_each_defence_removed_per_cell():
    page = render_audit_report(_audit_public(), {})
    rows = _removals(page)
    assert parse(page).cells["removals-table"][0] == ["attack", "", "eps 0.03", "eps 0.1"]
    assert rows["poisons per job"] == ["120", "400"]
    knn, linf = rows["knn"], rows["linf"]
    assert knn[0] == "40 ± 2 / 120 (33.3 ± 1.7%) clean points removed 90 ± 5"
    assert linf[0] == "120 / 120 (100.0%) clean points removed 0"
    assert knn[1] == "–" and linf[1] == "–"  # defences not measured in that cell
    # a defence that did not apply says so; counts written inside ``defences`` are read too
    audit = _audit_public()
    c = audit["table"]["rows"][0]["cells"]["0.1"]
    c["defences"] = {"linf": {"applicable": False, "reason": "feature-space poisons"},
                     "knn": {"accuracy": {"mean": 0.9, "std": 0, "n": 1}, "poisons_removed": {"mean": 100, "std": 0, "n": 1}}}
    rows = _removals(render_audit_report(audit, {}))
    assert rows["linf"][1] == "n/a: feature-space poisons"
    assert rows["knn"][1] == "100 / 400 (25.0%)"


def test_audit_report_without_defence_data_still_renders():
    audit = _audit_public()
    for c in audit["table"]["rows"][0]["cells"].values():
        c.pop("removed"), c.pop("n_poisons")
        c["defences"] = {}
    page = render_audit_report(audit, {})
    p = parse(page)
    assert "removals-table" not in p.cells and 'id="removals-none"' in page
    assert p.cells["results-table"][1][0].startswith("feature_matching")
    # cells that are not even dicts, rows without cells: a page all the same
    odd = _audit_public()
    odd["table"]["rows"] = [{"attack": "x", "cells": {"0.03": None, "0.1": "?"}}, {"attack": "y"}, "garbage"]
    page = render_audit_report(odd, {})
    assert "results-table" in parse(page).cells and page.count("<script>") == 1


def test_job_ids_are_links_when_the_caller_says_where():
    page = render_audit_report(_audit_public(), {}, job_href=lambda i: f"/ui/jobs/{i}")
    p = parse(page)
    hrefs = [a["href"] for t, a in p.tags if t == "a"]
    jobs = [f"job-{e_}-{s}" for e_ in (0.03, 0.1) for s in (0, 1)]
    # each job twice: its row of the jobs table, and its cell of the results table (by seed)
    assert sorted(hrefs) == sorted([f"/ui/jobs/{j}" for j in jobs] * 2)
    links = [a for t, a in p.tags if t == "a" and a.get("class") == "job-link"]
    assert [a["href"] for a in links] == [f"/ui/jobs/{j}" for j in jobs]
    first_cell = p.cells["results-table"][1][1]
    assert "job reports: seed 0 · seed 1" in first_cell
    assert '<a href="/ui/jobs/job-0.03-0" class="cell-job-link">seed 0</a>' in page
    # without a function: ids as text, no links at all
    assert not [t for t, _ in parse(render_audit_report(_audit_public(), {})).tags if t == "a"]
    # an id is escaped in the address; a function giving another scheme, or failing, gives no link
    evil = _audit_public(jobs=[{"id": EVIL, "label": "l", "epsilon": 0.03, "seed": 0, "status": "failed"}])
    page = render_audit_report(evil, {}, job_href=lambda i: f"/v1/jobs/{i}/report")
    assert "<script>alert" not in page and 'href="/v1/jobs/&lt;script&gt;' in page
    assert "<a " not in render_audit_report(_audit_public(), {}, job_href=lambda i: f"javascript:alert('{i}')")

    def boom(i):
        raise RuntimeError(i)

    assert "<a " not in render_audit_report(_audit_public(), {}, job_href=boom)


def test_job_report_links_its_audit_and_names_its_encoder():
    job = _job(audit="a-77")
    page = render_job_report(job, {}, audit_href=lambda i: f"/v1/audits/{i}/report", encoder=ENCODER)
    p = parse(page)
    assert [a["href"] for t, a in p.tags if t == "a"] == ["/v1/audits/a-77/report"]
    assert "part of audit" in page
    enc = {r[0]: r[1] for r in p.cells["encoder-table"]}
    assert enc["name"] == "my resnet" and enc["architecture"] == "resnet18" and enc["fingerprint"] == "9" * 64
    assert enc["weights file sha256"] == "5" * 64 and enc["id"] == ENCODER["id"]
    assert "encoder my resnet (resnet18)" in re.sub(r"<[^>]+>", "", page)
    # no audit_href: the audit's id as text; no audit: nothing about one
    assert "a-77" in render_job_report(job, {}) and "<a " not in render_job_report(job, {})
    assert "part of audit" not in render_job_report(_job(), {})
    # no encoder record: the id and the fingerprint the job reported, and a note
    page = render_job_report(_job(), {})
    enc = {r[0]: r[1] for r in parse(page).cells["encoder-table"]}
    assert enc == {"fingerprint": "f" * 64, "id": "0b6c7c1e-0000-4000-8000-0000000000e1"}
    assert "record is not available" in page


def test_audit_report_names_its_encoder():
    page = render_audit_report(_audit_public(), {}, encoder=ENCODER)
    enc = {r[0]: r[1] for r in parse(page).cells["encoder-table"]}
    assert enc["name"] == "my resnet" and enc["architecture"] == "resnet18" and enc["fingerprint"] == "9" * 64
    assert "encoder my resnet (resnet18)" in re.sub(r"<[^>]+>", "", page)
    two = render_audit_report(_audit_public(), {}, encoder={**ENCODER, "fingerprints": ["a1", "b2"]})
    enc = {r[0]: r[1] for r in parse(two).cells["encoder-table"]}
    assert enc["fingerprints (2 different: the jobs disagree)"] == "a1, b2"
    bare = {r[0]: r[1] for r in parse(render_audit_report(_audit_public(), {})).cells["encoder-table"]}
    assert bare == {"id": ENCODER["id"]}


def test_every_drop_is_in_points():
    """Drops (differences of accuracies) are shown in points, never as a percentage."""
    audit = render_audit_report(_audit_public(), {})
    text = re.sub(r"<[^>]+>", " ", audit)
    drops = re.findall(r"drop ([-+]?[0-9.]+(?: ± [0-9.]+)?) ?(pts|%)", " ".join(text.split()))
    assert drops == [("5.00 ± 1.00", "pts"), ("13.00", "pts")], drops
    assert parse(audit).cells["summary-table"][1][1] == "5.00 pts"
    job = parse(render_job_report(_job(), {}))
    assert {r[0]: r[1] for r in job.cells["results-table"]}["drop"] == "+5.15 pts"
    assert all(r[2].endswith(" pts") for r in job.cells["defences-table"][1:])
