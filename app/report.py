"""Self-contained HTML report pages for a job and for an audit.

One file each: inline CSS, figures as base64 ``data:`` URIs, and a
Content-Security-Policy that allows nothing else (no network requests at all;
the one inline script is allowed by its hash). Every value that comes from a
user or from a job (names, parameters, errors, metrics keys) goes through
:func:`html.escape`.

Links: the render functions take functions that give the address of another
report (``job_href`` for an audit's jobs, ``audit_href`` for a job's audit); the
API passes its own relative report paths, another front end its own. Without
them ids are shown as text.

The inline script only marks, after the page has loaded, each ``<img>`` with its
decoded size (``data-natural-width`` / ``data-natural-height``) and the body
with ``data-images-loaded``, so that a headless browser's DOM dump shows
whether the figures rendered.

This module imports no torch (the API renders the pages).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, Iterable

__all__ = ["render_audit_report", "render_job_report", "CSP"]

_SCRIPT = (
    "window.addEventListener('load',function(){var ok=0,imgs=document.images;"
    "for(var i=0;i<imgs.length;i++){var m=imgs[i];m.setAttribute('data-natural-width',m.naturalWidth);"
    "m.setAttribute('data-natural-height',m.naturalHeight);if(m.complete&&m.naturalWidth>0)ok++;}"
    "document.body.setAttribute('data-images-loaded',ok+'/'+imgs.length);});"
)
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
CSP = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{_SCRIPT_HASH}'; "
       "base-uri 'none'; form-action 'none'")

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#1d1d1f;padding:0 1rem;line-height:1.4}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;
margin-top:2rem}.sub{color:#555;margin-top:0}code{font-size:.9em;background:#f3f3f3;padding:0 .25em;border-radius:3px;
word-break:break-all}table{border-collapse:collapse;margin:.5rem 0;font-size:.92rem}th,td{border:1px solid #ccc;
padding:.3rem .6rem;text-align:left;vertical-align:top}th{background:#f5f5f7}td.num{text-align:right;
font-variant-numeric:tabular-nums}.badge{display:inline-block;padding:.1rem .5rem;border-radius:1rem;
font-size:.85rem;color:#fff;background:#888}.succeeded{background:#1a7f37}.failed{background:#c62828}
.running,.queued{background:#b26a00}.cancelled{background:#555}.na{color:#888}figure{margin:1rem 0}
figure img{max-width:100%;height:auto;border:1px solid #eee}figcaption{color:#555;font-size:.9rem}
.err{background:#fdecea;border:1px solid #f5c2c0;padding:.6rem;white-space:pre-wrap}.small{font-size:.85rem;
color:#555}.cell div{white-space:nowrap}
"""

JOB_FIGURES = {
    "figure-examples.png": "Clean images (top), their poisons (middle) and the perturbation between them "
                           "(bottom, diverging colours centred on 0, each panel on its own symmetric scale with "
                           "its max |δ| in its title; a poison identical to its base says so).",
    "figure-linf-histogram.png": "L_inf magnitude of the poisons against the clean data range (dashed lines).",
}

DEFENCE_TITLES = {
    "linf": "L_inf anomaly filter (poisons with a pixel outside the clean range)",
    "knn": "k-NN label consistency in feature space",
    "spectral": "spectral signatures (per class, top singular direction)",
}


# ------------------------------------------------------------------ formatting
def e(v: Any) -> str:
    """Escaped text of anything."""
    return html.escape("" if v is None else str(v), quote=True)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(float(v)) else None


def pct(v: Any) -> str:
    x = _num(v)
    return "–" if x is None else f"{100 * x:.2f}%"


def pts(v: Any) -> str:
    x = _num(v)
    return "–" if x is None else f"{100 * x:+.2f} pts"


def stat(v: Any, unit: str = "pct") -> str:
    """A {"mean", "std", "n"} summary (or a plain number) as 'mean ± std (n=...)'. Accuracies are fractions."""
    scale, suffix = (100, "%") if unit == "pct" else (100, " pts") if unit == "pts" else (1, "")
    if isinstance(v, dict):
        m, s, n = _num(v.get("mean")), _num(v.get("std")), v.get("n")
        if m is None:
            return "–"
        f = "{:.4g}" if unit == "n" else "{:.2f}"
        out = f.format(scale * m)
        if s is not None and (n is None or n > 1):
            out += " ± " + f.format(scale * s)
        out += suffix
        if isinstance(n, int):
            out += f" (n={n})"
        return out
    x = _num(v)
    if x is None:
        return "–"
    return f"{scale * x:.4g}" if unit == "n" else f"{scale * x:.2f}{suffix}"


def plain(v: Any) -> str:
    """A parameter value as escaped text: numbers compact, containers as JSON."""
    if isinstance(v, float):
        return e(f"{v:.6g}")
    if isinstance(v, (dict, list, tuple)):
        return e(json.dumps(v, sort_keys=True, default=str))
    return e(v)


def kv_table(rows: Iterable[tuple[str, Any]], table_id: str | None = None, raw: bool = False) -> str:
    """Two-column table; values escaped (``raw``: values are already HTML)."""
    body = "".join(f"<tr><th>{e(k)}</th><td>{v if raw else plain(v)}</td></tr>" for k, v in rows)
    ident = f' id="{e(table_id)}"' if table_id else ""
    return f"<table{ident}>{body}</table>"


def _renderer_versions() -> dict:
    try:
        own = version("poisonaudit")
    except PackageNotFoundError:
        own = None
    return {"poisonaudit": own}


def _png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figures_html(figures: dict[str, bytes], captions: dict[str, str]) -> str:
    if not figures:
        return '<p class="na">No figures for this report.</p>'
    order = [n for n in captions if n in figures] + sorted(n for n in figures if n not in captions)
    parts = []
    for name in order:
        png = figures[name]
        if not isinstance(png, (bytes, bytearray)) or not bytes(png).startswith(b"\x89PNG\r\n\x1a\n"):
            parts.append(f'<p class="na">Figure {e(name)} is not a PNG; left out.</p>')
            continue
        cap = captions.get(name, "")
        parts.append(f'<figure><img alt="{e(name)}" data-name="{e(name)}" src="{_png_data_uri(bytes(png))}">'
                     f"<figcaption><code>{e(name)}</code> {e(cap)}</figcaption></figure>")
    return "".join(parts)


def page(title: str, body: str, *, csp: str = CSP) -> str:
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{e(csp)}\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{e(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n"
        f"<script>{_SCRIPT}</script>\n</body></html>\n"
    )


Href = Callable[[str], str]


def _href(fn: Href | None, ident: Any) -> str | None:
    """``fn(ident)`` when both are given and the result is a plain address (relative, or http(s));
    None otherwise (no function, no id, a scheme such as ``javascript:``, or a function that raised)."""
    if fn is None or ident is None or str(ident) == "":
        return None
    try:
        url = str(fn(str(ident)))
    except Exception:  # noqa: BLE001 -- a caller's function must not cost the page
        return None
    scheme = url.split(":", 1)[0].lower() if ":" in url.split("/", 1)[0] else ""
    return url if scheme in ("", "http", "https") else None


def link(fn: Href | None, ident: Any, text: str | None = None, cls: str | None = None) -> str:
    """``<a href=fn(ident)>`` around the (escaped) text, or the text alone when there is no address."""
    label = f"<code>{e(ident)}</code>" if text is None else text
    url = _href(fn, ident)
    if url is None:
        return label
    return f'<a href="{e(url)}"' + (f' class="{e(cls)}"' if cls else "") + f">{label}</a>"


def _encoder_rows(encoder: dict | None, fallback_id: Any, fallback_fps: list) -> list[tuple[str, Any]]:
    enc = encoder if isinstance(encoder, dict) else {}
    fps = enc.get("fingerprints")
    if not isinstance(fps, list) or not fps:
        fps = [f for f in fallback_fps if f]
    fps = [str(f) for f in dict.fromkeys(fps)]
    rows: list[tuple[str, Any]] = [
        ("name", enc.get("name")), ("architecture", enc.get("architecture")),
        ("fingerprint" if len(fps) <= 1 else f"fingerprints ({len(fps)} different: the jobs disagree)",
         ", ".join(fps) if fps else None),
        ("weights file sha256", enc.get("weights_sha256")), ("id", enc.get("id") or fallback_id),
        ("source", enc.get("source")), ("spec", enc.get("spec")),
    ]
    return [(k, v) for k, v in rows if v not in (None, "", {})]


def encoder_section(encoder: dict | None, fallback_id: Any = None, fallback_fps: Iterable = ()) -> str:
    """The encoder's identity: name, architecture, the fingerprint of its weights as the jobs
    loaded them, the sha256 of its weights file, id and spec (what is known of them)."""
    rows = _encoder_rows(encoder, fallback_id, list(fallback_fps))
    known = {k for k, _ in rows}
    note = ""
    if "name" not in known and (encoder is not None or fallback_id is not None):
        note = '<p class="small na">The encoder\'s record is not available (deleted, or not given to this page).</p>'
    if "fingerprint" not in known and not any(k.startswith("fingerprints") for k in known):
        note += '<p class="small na">No job has reported the fingerprint of the encoder\'s weights yet.</p>'
    if not rows:
        return ('<h2>Encoder</h2><p class="na" id="encoder-none">No encoder information: the encoder\'s record is '
                "not available (deleted, or not given to this page) and no job has reported its fingerprint.</p>")
    return "<h2>Encoder</h2>" + kv_table(rows, "encoder-table") + note


def _encoder_brief(encoder: dict | None) -> str:
    enc = encoder if isinstance(encoder, dict) else {}
    if not enc.get("name") and not enc.get("architecture"):
        return ""
    arch = f" ({e(enc.get('architecture'))})" if enc.get("architecture") else ""
    return f' · encoder <span id="encoder-name">{e(enc.get("name") or enc.get("id"))}</span>{arch}'


# ------------------------------------------------------------------ job
def render_job_report(job_public: dict, figures: dict[str, bytes], *, audit_href: Href | None = None,
                      encoder: dict | None = None, nav: str = "", csp: str = CSP) -> str:
    """The report page of one job (``JobPublic`` as JSON-ready dict) with its PNG figures.

    audit_href: gives the address of an audit's report from its id; the job's audit (when it
    belongs to one) is then a link. encoder: what is known of the job's encoder
    (:func:`app.jobs.encoder_identity`: name, architecture, fingerprints, weights_sha256, id,
    source, spec); without it the page shows the id and the fingerprint from the job's metrics.
    nav: HTML put first in the body, as is (the web pages' links and buttons); csp: the page's policy."""
    j = job_public
    m = j.get("metrics") or {}
    if not isinstance(m, dict):
        m = {}
    status = str(j.get("status", "unknown"))
    title = f"poisonaudit report: {j.get('attack') or j.get('kind', 'job')} (job {j.get('id')})"
    in_audit = (f' · part of audit <span id="job-audit">{link(audit_href, j.get("audit"))}</span>'
                if j.get("audit") else "")
    out = [nav] if nav else []
    out += [f"<h1>{e(j.get('attack') or j.get('kind'))} audit job</h1>",
           f'<p class="sub">Job <code>{e(j.get("id"))}</code> · dataset <code>{e(j.get("dataset"))}</code>'
           f'{_encoder_brief(encoder)}{in_audit} · '
           f'<span class="badge {e(status)}" id="status">{e(status)}</span></p>']
    if status != "succeeded":
        prog = j.get("progress") or {}
        rows = [("status", status), ("stage", prog.get("stage")),
                ("progress", None if _num(prog.get("fraction")) is None else f"{100 * prog['fraction']:.0f}%"),
                ("created at", j.get("created_at")), ("started at", j.get("started_at")),
                ("finished at", j.get("finished_at"))]
        out.append('<h2>Status</h2><p>This job has not produced results' +
                   (" yet." if status in ("queued", "running") else ".") + "</p>")
        out.append(kv_table([(k, v) for k, v in rows if v is not None], "status-table"))
        if j.get("error"):
            out.append(f'<div class="err" id="error">{e(j["error"])}</div>')
    if m:
        out.append(_job_results(m))
        out.append(_job_defences(m))
        out.append(_poison_stats(m.get("poison_stats") or {}))
    out.append("<h2>Figures</h2>" + figures_html(figures, JOB_FIGURES))
    out.append(encoder_section(encoder, j.get("encoder"),
                               [m.get("encoder_fingerprint") or (m.get("fingerprint") if j.get("kind") == "pretrain"
                                                                 else None)]))
    out.append(_job_parameters(j, m))
    out.append(_job_provenance(j, m))
    return page(title, "\n".join(out), csp=csp)


def _job_results(m: dict) -> str:
    rows = [
        ("clean accuracy", pct(m.get("clean_accuracy"))),
        ("poisoned accuracy", pct(m.get("poisoned_accuracy"))),
        ("drop", pts(m.get("drop"))),
    ]
    if "target_accuracy" in m:
        rows.append(("target accuracy (attack's target head)", pct(m.get("target_accuracy"))))
    if "poisoned_train_accuracy" in m:
        rows.append(("poisoned head, training accuracy", pct(m.get("poisoned_train_accuracy"))))
    for key, label in (("n_poisons", "poisons"), ("n_train", "clean training points"), ("n_test", "test points"),
                       ("anomalies_removed", "anomalies removed by the attack (feature matching-r)")):
        if key in m:
            rows.append((label, e(m[key])))
    body = "".join(f'<tr><th>{e(k)}</th><td class="num">{v}</td></tr>' for k, v in rows)
    return f'<h2>Results</h2><table id="results-table">{body}</table>'


def _job_defences(m: dict) -> str:
    d = m.get("defences")
    if not isinstance(d, dict):
        return ('<h2>Defences</h2><p class="na">No defences were measured for this job '
                "(parameter attack, self-evaluated attack, or turned off).</p>")
    clean = _num(m.get("clean_accuracy"))
    head = ("<tr><th>defence</th><th>test accuracy</th><th>drop vs clean</th><th>poisons removed</th>"
            "<th>clean points removed</th></tr>")
    rows = [f'<tr data-defence="none"><td>none (poisoned set as is)</td><td class="num">{pct(m.get("poisoned_accuracy"))}</td>'
            f'<td class="num">{pts(m.get("drop"))}</td><td class="num">0</td><td class="num">0</td></tr>']
    for name, r in d.items():
        label = f"{e(name)}<div class=\"small\">{e(DEFENCE_TITLES.get(name, ''))}</div>"
        if not isinstance(r, dict) or r.get("applicable") is False:
            reason = r.get("reason", "not applicable") if isinstance(r, dict) else "not applicable"
            rows.append(f'<tr data-defence="{e(name)}"><td>{label}</td><td class="na" colspan="4">n/a: {e(reason)}</td></tr>')
            continue
        acc = _num(r.get("accuracy"))
        drop = pts(clean - acc) if clean is not None and acc is not None else "–"
        rows.append(
            f'<tr data-defence="{e(name)}"><td>{label}</td><td class="num">{pct(acc)}</td><td class="num">{drop}</td>'
            f'<td class="num">{e(r.get("poisons_removed"))} / {e(r.get("n_poisons"))}</td>'
            f'<td class="num">{e(r.get("clean_removed"))} / {e(r.get("n_clean"))}</td></tr>')
    params = [(f"{name}", r.get("params")) for name, r in d.items() if isinstance(r, dict) and r.get("params")]
    note = ('<p class="small">Each defence removes what it flags from the poisoned training set and the head is '
            "retrained with the same recipe and seed on what remains.</p>")
    return (f'<h2>Defences</h2><table id="defences-table">{head}{"".join(rows)}</table>{note}'
            + (kv_table(params, "defence-params") if params else ""))


def _poison_stats(ps: dict) -> str:
    if not ps:
        return ""
    rows = []
    for k, v in ps.items():
        if isinstance(v, dict) and {"mean", "max"} <= set(v):
            val = f"mean {plain(v.get('mean'))}, median {plain(v.get('median'))}, max {plain(v.get('max'))}"
            rows.append((k, val))
        else:
            rows.append((k, plain(v)))
    return "<h2>Poison statistics</h2>" + kv_table(rows, "poison-stats", raw=True)


def _job_parameters(j: dict, m: dict) -> str:
    rows = [("attack", j.get("attack")), ("epsilon", j.get("epsilon")), ("beta", j.get("beta")),
            ("seed", j.get("seed")), ("device requested", j.get("device")), ("queue", j.get("queue"))]
    params = m.get("params") if isinstance(m.get("params"), dict) else j.get("params") or {}
    rows += [(f"params.{k}", v) for k, v in sorted(params.items())]
    head = m.get("head_recipe") or j.get("head")
    if head:
        rows.append(("head recipe", head))
    return "<h2>Parameters</h2>" + kv_table(rows, "parameters")


def _job_provenance(j: dict, m: dict) -> str:
    versions = m.get("versions") or {}
    rows = [("encoder id", j.get("encoder")), ("encoder fingerprint", m.get("encoder_fingerprint")),
            ("dataset", m.get("dataset") or j.get("dataset")), ("dataset hash", m.get("dataset_hash")),
            ("scenario", m.get("scenario")), ("encoder pre-trained on", m.get("pretrained_on")),
            ("seed", j.get("seed")), ("torch (worker)", versions.get("torch")),
            ("poisonaudit (worker)", versions.get("poisonaudit")),
            ("poisonaudit (this page)", _renderer_versions()["poisonaudit"]),
            ("device", m.get("device") or j.get("device_used")), ("device name", m.get("device_name")),
            ("worker", j.get("worker")), ("attempts", j.get("attempts")),
            ("created at", j.get("created_at")), ("started at", j.get("started_at")),
            ("finished at", j.get("finished_at")), ("duration (s)", j.get("duration_s")),
            ("stage seconds", m.get("stage_seconds")), ("feature cache", m.get("feature_cache"))]
    return "<h2>Provenance</h2>" + kv_table([(k, v) for k, v in rows if v is not None], "provenance")


# ------------------------------------------------------------------ audit
def _audit_table(audit: dict) -> dict:
    t = audit.get("table")
    if isinstance(t, dict):
        return t
    return audit if "rows" in audit else {}


def _eps_key(e_: Any) -> str:
    return f"{float(e_):g}" if _num(e_) is not None else str(e_)


def _cells(row: dict) -> dict:
    cells = row.get("cells")
    return cells if isinstance(cells, dict) else {}


def _cell_of(cells: dict, eps: Any) -> dict | None:
    """The cell of ``eps`` (whatever string its key is), when it is a dict."""
    if str(eps) in cells:
        c = cells[str(eps)]
        return c if isinstance(c, dict) else None
    for k, c in cells.items():
        try:
            if math.isclose(float(k), float(eps), rel_tol=1e-9, abs_tol=1e-12):
                return c if isinstance(c, dict) else None
        except (TypeError, ValueError):
            continue
    return None


def _row_label(row: dict) -> str:
    label = row.get("label") or row.get("attack") or "?"
    beta = _num(row.get("beta"))
    extra = f' <span class="small">beta {beta:g}</span>' if beta is not None and not row.get("label") else ""
    attack = f'<div class="small">{e(row.get("attack"))}</div>' if row.get("label") else ""
    return f"{e(label)}{extra}{attack}"


def _jobs_text(jobs: Any) -> str:
    if isinstance(jobs, dict):
        parts = [f"{e(k)} {e(v)}" for k, v in jobs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return f'<div class="small">jobs: {", ".join(parts)}</div>' if parts else ""
    if isinstance(jobs, list):
        return f'<div class="small">jobs: {len(jobs)}</div>'
    return ""


def _cell_jobs(jobs: Any, row: dict, x: Any) -> list[dict]:
    """The audit's jobs of one cell (same row label and epsilon), by seed."""
    if not isinstance(jobs, list):
        return []
    label = row.get("label")
    out = []
    for j in jobs:
        if not isinstance(j, dict) or j.get("id") is None or (label is not None and j.get("label") != label):
            continue
        if label is None and (j.get("attack") != row.get("attack") or not _same_beta(j.get("beta"), row.get("beta"))):
            continue
        try:
            if not math.isclose(float(j.get("epsilon")), float(x), rel_tol=1e-9, abs_tol=1e-12):
                continue
        except (TypeError, ValueError):
            continue
        out.append(j)
    return sorted(out, key=lambda j: (str(j.get("seed")), str(j.get("id"))))


def _same_beta(a: Any, b: Any) -> bool:
    if _num(a) is None or _num(b) is None:
        return a is None and b is None
    return math.isclose(float(a), float(b), rel_tol=1e-9)


def _cell_job_links(job_href: Href | None, jobs: list[dict]) -> str:
    if job_href is None or not jobs:
        return ""
    parts = [link(job_href, j.get("id"), f"seed {e(j.get('seed'))}", cls="cell-job-link")
             + ("" if j.get("status") in ("succeeded", None) else f" ({e(j.get('status'))})") for j in jobs]
    return f'<div class="small">job reports: {" · ".join(parts)}</div>'


def render_audit_report(audit_public: dict, figures: dict[str, bytes], *, job_href: Href | None = None,
                        encoder: dict | None = None, nav: str = "", csp: str = CSP) -> str:
    """The report page of an audit. ``audit_public`` carries the audit table (under ``table``, or
    at the top level): {"clean_accuracy": {"mean", "std", "n"}, "epsilons": [...], "rows": [{"attack",
    "beta", "label", "cells": {"<eps>": {"poisoned_accuracy", "drop", "jobs", "defences", "n_poisons",
    "removed"}}}], "summary": [...]}; every other top-level field is shown as a parameter, and ``provenance``
    (a dict) in its own section. Accuracies are fractions in [0, 1], drops are shown in points.

    job_href: gives the address of a job's report from its id; the jobs table's ids and each cell's
    jobs are then links. encoder: what is known of the audit's encoder (:func:`app.jobs.encoder_identity`);
    without it the page shows the encoder's id. nav: HTML put first in the body, as is; csp: the
    page's policy."""
    a = audit_public
    t = _audit_table(a)
    eps = list(t.get("epsilons") or [])
    rows = [r for r in (t.get("rows") or []) if isinstance(r, dict)]
    status = a.get("status")
    title = f"poisonaudit audit report {a.get('name') or a.get('id') or ''}".strip()
    out = [nav] if nav else []
    out += [f"<h1>Audit {e(a.get('name') or a.get('id') or '')}</h1>",
           f'<p class="sub">Audit <code>{e(a.get("id"))}</code>' + _encoder_brief(encoder)
           + (f' · <span class="badge {e(status)}" id="status">{e(status)}</span>' if status else "") + "</p>",
           f'<p id="clean-accuracy">Clean accuracy: <strong>{stat(t.get("clean_accuracy"))}</strong></p>']
    # results: rows = attacks, columns = epsilons
    head = "<tr><th>attack</th>" + "".join(f"<th>eps {e(_eps_key(x))}</th>" for x in eps) + "</tr>"
    body = []
    for r in rows:
        cells = _cells(r)
        tds = []
        for x in eps:
            c = _cell_of(cells, x)
            if not c:
                tds.append('<td class="na">–</td>')
                continue
            tds.append('<td class="cell num">'
                       f'<div>acc {stat(c.get("poisoned_accuracy"))}</div>'
                       f'<div>drop {stat(c.get("drop"), "pts")}</div>{_jobs_text(c.get("jobs"))}'
                       f'{_cell_job_links(job_href, _cell_jobs(a.get("jobs"), r, x))}</td>')
        body.append(f"<tr><th>{_row_label(r)}</th>{''.join(tds)}</tr>")
    out.append('<h2>Results</h2><p class="small">Poisoned accuracy and drop (clean minus poisoned), mean ± '
               "standard deviation over seeds.</p>"
               f'<table id="results-table">{head}{"".join(body)}</table>')
    out.append(_audit_summary(t.get("summary")))
    out.append(_audit_defences(rows, eps))
    out.append(_audit_removals(rows, eps))
    out.append("<h2>Figures</h2>" + figures_html(figures, {"figure-drop-vs-epsilon.png":
                                                          "Accuracy drop against epsilon, one line per attack."}))
    out.append(encoder_section(encoder, a.get("encoder")))
    params = [(k, v) for k, v in a.items() if k not in ("table", "provenance", "jobs", "rows", "summary",
                                                        "clean_accuracy")]
    out.append("<h2>Parameters</h2>" + kv_table(params, "parameters"))
    out.append(_audit_jobs(a.get("jobs"), job_href))
    prov = a.get("provenance") if isinstance(a.get("provenance"), dict) else {}
    prov_rows = list(prov.items()) + [("poisonaudit (this page)", _renderer_versions()["poisonaudit"])]
    out.append("<h2>Provenance</h2>" + kv_table(prov_rows, "provenance"))
    return page(title, "\n".join(out), csp=csp)


def _audit_summary(summary: Any) -> str:
    if not summary:
        return ""
    if isinstance(summary, dict):
        summary = [summary]
    if not isinstance(summary, list):
        return "<h2>Worst drops</h2>" + f"<p>{plain(summary)}</p>"
    keys: list[str] = []
    for s in summary:
        if isinstance(s, dict):
            keys += [k for k in s if k not in keys]
    head = "<tr>" + "".join(f"<th>{e(k)}</th>" for k in keys) + "</tr>"
    body = []
    for s in summary:
        if not isinstance(s, dict):
            body.append(f'<tr><td colspan="{max(len(keys), 1)}">{plain(s)}</td></tr>')
            continue
        tds = []
        for k in keys:
            v = s.get(k)
            unit = "pts" if "drop" in k else "pct" if "accuracy" in k else None
            if unit and (isinstance(v, dict) and "mean" in v or _num(v) is not None):
                tds.append(f'<td class="num">{stat(v, unit)}</td>')
            else:
                tds.append(f"<td>{plain(v)}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return f'<h2>Worst drops</h2><table id="summary-table">{head}{"".join(body)}</table>'


def _audit_jobs(jobs: Any, job_href: Href | None = None) -> str:
    if not isinstance(jobs, list) or not jobs:
        return ""
    cols = [c for c in ("label", "epsilon", "seed", "status", "id", "error") if any(isinstance(j, dict) and c in j
                                                                                 for j in jobs)]
    head = "<tr>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>"

    def td(j: dict, c: str) -> str:
        if c == "id" and j.get("id") is not None:
            return f"<td>{link(job_href, j.get('id'), e(j.get('id')), cls='job-link')}</td>"
        return f"<td>{plain(j.get(c))}</td>"

    body = "".join("<tr>" + "".join(td(j, c) for c in cols) + "</tr>" for j in jobs if isinstance(j, dict))
    return f'<h2>Jobs</h2><table id="jobs-table">{head}{body}</table>'


def _mean_std(v: Any) -> tuple[float | None, float | None]:
    """(mean, std) of a {"mean", "std", "n"}, or (v, None) of a plain number."""
    if isinstance(v, dict):
        return _num(v.get("mean")), _num(v.get("std"))
    return _num(v), None


def _count(v: Any) -> str:
    """A count, or a {"mean", "std", "n"} of counts over seeds, as '40' or '40 ± 2' (means to 1 decimal)."""
    m, s_ = _mean_std(v)
    if m is None:
        return "–"
    out = f"{m:.0f}" if float(m).is_integer() else f"{m:.1f}"
    if s_ is not None and s_ > 0:
        out += f" ± {s_:.0f}" if float(s_).is_integer() else f" ± {s_:.1f}"
    return out


def _fraction(v: Any) -> str:
    m, s_ = _mean_std(v)
    if m is None:
        return "–"
    return f"{100 * m:.1f}" + (f" ± {100 * s_:.1f}" if s_ is not None and s_ > 0 else "") + "%"


def _removals_of(c: dict) -> dict[str, dict]:
    """A cell's {defence: {"poisons_removed", "fraction", "clean_removed"}}: AuditCell's ``removed``, or
    counts written inside ``defences`` (a richer producer), or {} (defences off, older jobs)."""
    removed = c.get("removed")
    out: dict[str, dict] = {}
    if isinstance(removed, dict):
        out.update({k: v for k, v in removed.items() if isinstance(v, dict)})
    defences = c.get("defences")
    if isinstance(defences, dict):
        for name, d in defences.items():
            if name in out or not isinstance(d, dict):
                continue
            if d.get("applicable") is False:
                out[name] = {"applicable": False, "reason": d.get("reason")}
            elif d.get("poisons_removed") is not None:
                out[name] = {"poisons_removed": d.get("poisons_removed"), "fraction": d.get("fraction"),
                             "clean_removed": d.get("clean_removed")}
    return out


def _removal_td(r: dict | None, n_poisons: Any) -> str:
    if not isinstance(r, dict):
        return '<td class="na">–</td>'
    if r.get("applicable") is False:
        return f'<td class="na">n/a{": " + e(r.get("reason")) if r.get("reason") else ""}</td>'
    frac = r.get("fraction")
    if frac is None:  # derive it from the means when the producer gave only counts
        pm = _num(r["poisons_removed"].get("mean")) if isinstance(r.get("poisons_removed"), dict) \
            else _num(r.get("poisons_removed"))
        nm = _num(n_poisons.get("mean")) if isinstance(n_poisons, dict) else _num(n_poisons)
        frac = pm / nm if pm is not None and nm else None
    of = f" / {_count(n_poisons)}" if _count(n_poisons) != "–" else ""
    clean = (f'<div class="small">clean points removed {_count(r.get("clean_removed"))}</div>'
             if r.get("clean_removed") is not None else "")
    return (f'<td class="cell num"><div class="removed">{_count(r.get("poisons_removed"))}{of} '
            f'<span class="frac">({_fraction(frac)})</span></div>{clean}</td>')


def _audit_removals(rows: list, eps: list) -> str:
    """Per cell, the poisons per job and, for each defence, how many (and what fraction) it removed."""
    names: list[str] = []
    any_poisons = False
    for r in rows:
        for c in _cells(r).values():
            if not isinstance(c, dict):
                continue
            any_poisons = any_poisons or c.get("n_poisons") is not None
            for n in _removals_of(c):
                if n not in names:
                    names.append(n)
    if not rows or not eps:
        return ""
    head = "<tr><th>attack</th><th></th>" + "".join(f"<th>eps {e(_eps_key(x))}</th>" for x in eps) + "</tr>"
    body = []
    for r in rows:
        cells = _cells(r)
        for i, name in enumerate(["poisons", *names]):
            tds = []
            for x in eps:
                c = _cell_of(cells, x)
                c = c if isinstance(c, dict) else {}
                if name == "poisons":
                    n = c.get("n_poisons")
                    tds.append(f'<td class="num">{_count(n)}</td>' if n is not None else '<td class="na">–</td>')
                else:
                    tds.append(_removal_td(_removals_of(c).get(name), c.get("n_poisons")))
            first = f'<th rowspan="{len(names) + 1}">{_row_label(r)}</th>' if i == 0 else ""
            label = ("poisons per job" if name == "poisons"
                     else f"{e(name)} removed<div class=\"small\">{e(DEFENCE_TITLES.get(name, ''))}</div>")
            body.append(f'<tr data-removal="{e(name)}">{first}<td>{label}</td>{"".join(tds)}</tr>')
    note = ""
    if not names:
        note = ('<p class="na" id="removals-none">No job of this audit reported what the defences removed '
                "(defences turned off, no finished job yet, parameter attacks, or jobs that predate it).</p>")
    if not names and not any_poisons:
        return "<h2>Poisons removed by each defence</h2>" + note
    return ('<h2>Poisons removed by each defence</h2><p class="small">Per cell, the poisons in each job\'s '
            "training set, and for each defence the poisons it removed of them (mean ± standard deviation over "
            "seeds, the fraction in brackets) and the clean points it removed with them; – where a cell has no "
            f'finished job or a defence was not measured.</p>{note}<table id="removals-table">{head}'
            f'{"".join(body)}</table>')


def _audit_defences(rows: list, eps: list) -> str:
    names: list[str] = []
    for r in rows:
        for c in _cells(r).values():
            defs = c.get("defences") if isinstance(c, dict) else None
            for n in defs if isinstance(defs, dict) else {}:
                if n not in names:
                    names.append(n)
    if not names:
        return ""
    head = "<tr><th>attack</th><th>defence</th>" + "".join(f"<th>eps {e(_eps_key(x))}</th>" for x in eps) + "</tr>"
    body = []
    for r in rows:
        cells = _cells(r)
        for i, name in enumerate(["none", *names]):
            tds = []
            for x in eps:
                c = _cell_of(cells, x) or {}
                if name == "none":
                    tds.append(f'<td class="num">{stat(c.get("poisoned_accuracy"))}</td>' if c else '<td class="na">–</td>')
                    continue
                defs = c.get("defences")
                d = defs.get(name) if isinstance(defs, dict) else None
                if isinstance(d, dict) and "mean" in d:  # the accuracy summary itself
                    d = {"accuracy": d}
                if not isinstance(d, dict):
                    tds.append('<td class="na">–</td>')
                elif d.get("applicable") is False:
                    tds.append('<td class="na">n/a</td>')
                else:
                    removed = ""
                    if d.get("poisons_removed") is not None:
                        removed = (f'<div class="small">removed: poisons {stat(d.get("poisons_removed"), "n")}'
                                   f', clean {stat(d.get("clean_removed"), "n")}</div>')
                    tds.append(f'<td class="cell num"><div>{stat(d.get("accuracy"))}</div>{removed}</td>')
            first = f'<th rowspan="{len(names) + 1}">{_row_label(r)}</th>' if i == 0 else ""
            label = "none (no defence)" if name == "none" else name
            body.append(f'<tr data-defence="{e(name)}">{first}<td>{e(label)}</td>{"".join(tds)}</tr>')
    return ('<h2>Accuracy with each defence</h2><p class="small">Test accuracy of the head retrained on what '
            f'each defence keeps, beside the undefended poisoned accuracy.</p><table id="defences-table">{head}'
            f'{"".join(body)}</table>')
