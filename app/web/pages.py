"""HTML of the web pages, as plain string builders (no template engine). Every value that comes from
a user or a job goes through :func:`app.report.e` (``html.escape``). The pages use the report
pages' CSS and one inline script (live progress on the list page), allowed by its hash."""

from __future__ import annotations

import base64
import hashlib
import math
from typing import Any
from urllib.parse import quote

from app.audits import eps_key
from app.report import _SCRIPT_HASH, e, page, pct, pts, stat

NAV_CSS = (".nav{display:flex;flex-wrap:wrap;gap:.6rem;align-items:center;border-bottom:1px solid #ddd;"
           "padding-bottom:.6rem;margin-bottom:1rem;font-size:.95rem}.nav .team{color:#555;margin-left:auto}"
           ".nav form{display:inline;margin:0}a.button,button{display:inline-block;padding:.25rem .7rem;"
           "border:1px solid #888;border-radius:4px;background:#f5f5f7;color:#1d1d1f;text-decoration:none;"
           "font:inherit;cursor:pointer}a.button:hover,button:hover{background:#e8e8ed}.downloads{display:flex;"
           "flex-wrap:wrap;gap:.5rem;margin:.6rem 0}.msg{background:#fdecea;border:1px solid #f5c2c0;"
           "padding:.5rem .8rem}label{display:block;margin:.6rem 0 .2rem}input[type=password],select{font:inherit;"
           "padding:.3rem;min-width:26rem;max-width:100%}progress{width:7rem;vertical-align:middle}"
           "td.pos{color:#c62828}td.neg{color:#1a7f37}")

# Live progress on the list page: polls the cookie-authenticated JSON route every 2 s while any
# audit or job is unfinished, and writes status, percentage and <progress> value in place (text
# only, never HTML). #poll carries the route and counts the polls (data-polls) for the tests.
POLL_SCRIPT = (
    "(function(){var t=document.getElementById('poll');if(!t)return;var n=0;"
    "function pct(f){return f==null?'\u2013':Math.round(100*f)+'%';}"
    "function tick(){fetch(t.getAttribute('data-url'),{credentials:'same-origin',headers:{'Accept':'application/json'}})"
    ".then(function(r){if(!r.ok)throw new Error('HTTP '+r.status);return r.json();}).then(function(d){var busy=0;"
    "['audits','jobs'].forEach(function(k){(d[k]||[]).forEach(function(o){"
    "var row=document.querySelector('tr[data-kind=\"'+k+'\"][data-id=\"'+o.id+'\"]');if(!row)return;"
    "var s=row.querySelector('.status');if(s){s.textContent=o.status;s.className='badge status '+o.status;}"
    "var p=row.querySelector('.pct');if(p)p.textContent=pct(o.fraction);"
    "var b=row.querySelector('progress');if(b&&o.fraction!=null)b.value=o.fraction;"
    "if(o.status=='queued'||o.status=='running')busy++;});});"
    "n++;t.setAttribute('data-polls',n);t.textContent=busy?('live: '+busy+' unfinished, updated every 2 s'):'all finished';"
    "if(busy)setTimeout(tick,2000);}).catch(function(err){t.textContent='live updates stopped ('+err.message+'); reload the page';});}"
    "tick();})();"
)
POLL_HASH = base64.b64encode(hashlib.sha256(POLL_SCRIPT.encode()).digest()).decode()

# The policy of every /ui page: nothing from another origin; the JSON route may be fetched; forms
# post to this origin only. (The HTTP header adds frame-ancestors, which a <meta> policy ignores.)
UI_CSP = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{_SCRIPT_HASH}' "
          f"'sha256-{POLL_HASH}'; connect-src 'self'; base-uri 'none'; form-action 'self'")
UI_CSP_HEADER = UI_CSP + "; frame-ancestors 'none'"

UNFINISHED = ("queued", "running")


def _q(v: Any) -> str:
    return quote(str(v), safe="")


def short(ident: Any) -> str:
    return str(ident)[:8]


def nav(team_name: str | None = None, csrf: str | None = None, extra: str = "") -> str:
    """The bar at the top of each page: the list, the comparison, and sign-out (a POST with the CSRF token)."""
    parts = [f"<style>{NAV_CSS}</style><nav class=\"nav\" id=\"nav\">",
             '<a href="/ui/" id="nav-list">Audits and jobs</a>', '<a href="/ui/compare" id="nav-compare">Compare audits</a>',
             '<a href="/docs">API docs</a>', extra]
    if team_name is not None and csrf is not None:
        parts.append(f'<span class="team">team <strong id="team">{e(team_name)}</strong></span>'
                     '<form method="post" action="/ui/logout" id="logout">'
                     f'<input type="hidden" name="csrf" value="{e(csrf)}"><button type="submit">Sign out</button></form>')
    parts.append("</nav>")
    return "".join(parts)


def ui_page(title: str, body: str) -> str:
    return page(title, body, csp=UI_CSP)


def badge(status: Any) -> str:
    return f'<span class="badge status {e(status)}">{e(status)}</span>'


def progress_cells(fraction: Any) -> str:
    f = fraction if isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and math.isfinite(fraction) else None
    value = f'value="{f:.4f}"' if f is not None else ""
    text = "–" if f is None else f"{round(100 * f)}%"
    return f'<td class="num"><progress max="1" {value}></progress> <span class="pct">{e(text)}</span></td>'


# ------------------------------------------------------------------ sign-in
def login_page(csrf: str, message: str | None = None, next_: str = "/ui/") -> str:
    msg = f'<p class="msg" id="login-error" role="alert">{e(message)}</p>' if message else ""
    body = (f"{nav()}<h1>Sign in</h1>"
            '<p class="sub">Sign in with your team\'s API key (<code>pa_…</code>) to read its audits and jobs in the '
            "browser. The key is checked and then forgotten: the browser keeps a session cookie, which ends when "
            "you sign out, when it expires, or when the key is revoked.</p>"
            f"{msg}<form method=\"post\" action=\"/ui/login\" id=\"login\">"
            f'<input type="hidden" name="csrf" value="{e(csrf)}"><input type="hidden" name="next" value="{e(next_)}">'
            '<label for="key">API key</label><input type="password" id="key" name="key" autocomplete="off" required '
            'autofocus> <button type="submit">Sign in</button></form>'
            '<p class="small">Already signed in? <a href="/ui/">Go to the list</a>.</p>')
    return ui_page("poisonaudit: sign in", body)


def error_page(status: int, message: str, signed_in: bool = True) -> str:
    back = '<p><a href="/ui/">Back to the list</a></p>' if signed_in else '<p><a href="/ui/login">Sign in</a></p>'
    return ui_page(f"poisonaudit: {status}", f"{nav()}<h1>{status}</h1><p id=\"error\">{e(message)}</p>{back}")


# ------------------------------------------------------------------ the list
def list_page(team_name: str, csrf: str, audits: list[dict], audit_count: int, jobs: list[dict], job_count: int) -> str:
    out = [nav(team_name, csrf), "<h1>Audits and jobs</h1>"]
    busy = any(a.get("status") in UNFINISHED for a in audits) or any(j.get("status") in UNFINISHED for j in jobs)
    out.append(f'<p class="small" id="poll" data-url="/ui/api/progress" data-polls="0">'
               f'{"live progress: loading…" if busy else "all finished"}</p>')
    out.append(f'<h2>Audits</h2><p class="small">{len(audits)} newest of {audit_count}.</p>')
    if audits:
        rows = []
        for a in audits:
            jobs_c = (a.get("progress") or {}).get("jobs") or {}
            rows.append(
                f'<tr data-kind="audits" data-id="{e(a["id"])}"><td><a href="/ui/audits/{_q(a["id"])}" class="audit-link">'
                f'{e(a.get("name") or short(a["id"]))}</a><div class="small"><code>{e(a["id"])}</code></div></td>'
                f'<td>{badge(a.get("status"))}</td>{progress_cells((a.get("progress") or {}).get("fraction"))}'
                f'<td class="num">{e(jobs_c.get("succeeded", 0))} / {e(jobs_c.get("total", 0))}</td>'
                f'<td>{e(a.get("dataset"))}</td><td><code>{e(short(a.get("encoder") or "–"))}</code></td>'
                f'<td class="small">{e(_when(a.get("created_at")))}</td>'
                f'<td><a href="/ui/compare?a={_q(a["id"])}">compare…</a></td></tr>')
        out.append('<table id="audits-table"><tr><th>audit</th><th>status</th><th>progress</th><th>jobs done</th>'
                   '<th>dataset</th><th>encoder</th><th>created</th><th></th></tr>' + "".join(rows) + "</table>")
    else:
        out.append('<p class="na" id="no-audits">No audits yet: <code>POST /v1/audits</code> makes one.</p>')
    out.append(f'<h2>Jobs</h2><p class="small">{len(jobs)} newest of {job_count}.</p>')
    if jobs:
        rows = []
        for j in jobs:
            audit = (f'<a href="/ui/audits/{_q(j["audit"])}"><code>{e(short(j["audit"]))}</code></a>'
                     if j.get("audit") else '<span class="na">–</span>')
            rows.append(
                f'<tr data-kind="jobs" data-id="{e(j["id"])}"><td><a href="/ui/jobs/{_q(j["id"])}" class="job-link">'
                f'<code>{e(short(j["id"]))}</code></a></td><td>{e(j.get("attack") or j.get("kind"))}</td>'
                f'<td class="num">{e(_g(j.get("epsilon")))}</td><td class="num">{e(_g(j.get("beta")))}</td>'
                f'<td class="num">{e(j.get("seed"))}</td><td>{audit}</td><td>{badge(j.get("status"))}</td>'
                f'{progress_cells((j.get("progress") or {}).get("fraction"))}'
                f'<td class="num">{pts((j.get("metrics") or {}).get("drop"))}</td>'
                f'<td class="small">{e(_when(j.get("created_at")))}</td></tr>')
        out.append('<table id="jobs-table"><tr><th>job</th><th>attack</th><th>epsilon</th><th>beta</th><th>seed</th>'
                   '<th>audit</th><th>status</th><th>progress</th><th>drop</th><th>created</th></tr>'
                   + "".join(rows) + "</table>")
    else:
        out.append('<p class="na" id="no-jobs">No jobs yet.</p>')
    out.append(f"<script>{POLL_SCRIPT}</script>")
    return ui_page(f"poisonaudit: {team_name}", "\n".join(out))


def _g(v: Any) -> str:
    return "–" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def _when(v: Any) -> str:
    return str(v or "")[:19].replace("T", " ")


# ------------------------------------------------------------------ report pages' bars
def job_nav(team_name: str, csrf: str, job: dict) -> str:
    """The bar of a job's page: its audit (if any), and a download button per artifact."""
    extra = (f'<a href="/ui/audits/{_q(job["audit"])}" id="audit-link">Audit <code>{e(short(job["audit"]))}</code></a>'
             if job.get("audit") else "")
    arts = job.get("artifacts") or []
    buttons = []
    if any(a.get("name") == "poisoned_set.npz" for a in arts):
        buttons.append(f'<a class="button" id="download-poisoned-set" href="/ui/jobs/{_q(job["id"])}/poisoned-set" '
                       'download>Download the poisoned set (npz)</a>')
    for a in arts:
        buttons.append(f'<a class="button artifact" href="/ui/jobs/{_q(job["id"])}/artifacts/{_q(a["name"])}" download '
                       f'data-name="{e(a["name"])}">{e(a["name"])} <span class="small">({e(_size(a.get("size")))})</span></a>')
    downloads = f'<div class="downloads" id="downloads">{"".join(buttons)}</div>' if buttons else ""
    return nav(team_name, csrf, extra) + downloads


def audit_nav(team_name: str, csrf: str, audit: dict) -> str:
    extra = f'<a href="/ui/compare?a={_q(audit["id"])}" id="compare-link">Compare this audit with another</a>'
    return nav(team_name, csrf, extra)


def _size(n: Any) -> str:
    if not isinstance(n, int):
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ------------------------------------------------------------------ comparison
def compare_rows(a: dict, b: dict) -> tuple[list[float], list[dict]]:
    """The epsilons of either audit, and per attack row (matched by label, A's order then B's extra
    rows) the mean drop of each audit at each epsilon and the difference B - A (None where missing)."""
    ta, tb = a.get("table") or {}, b.get("table") or {}
    eps = sorted({float(x) for x in (ta.get("epsilons") or []) + (tb.get("epsilons") or [])})
    by_label: dict[str, dict] = {}
    order: list[str] = []
    for side, t in (("a", ta), ("b", tb)):
        for r in t.get("rows") or []:
            label = r.get("label") or r.get("attack") or "?"
            if label not in by_label:
                by_label[label] = {"label": label, "attack": r.get("attack"), "beta": r.get("beta")}
                order.append(label)
            by_label[label][side] = r.get("cells") or {}
    rows = []
    for label in order:
        r = by_label[label]
        cells = {}
        for x in eps:
            da = _mean(((r.get("a") or {}).get(eps_key(x)) or {}).get("drop"))
            db = _mean(((r.get("b") or {}).get(eps_key(x)) or {}).get("drop"))
            cells[eps_key(x)] = {"a": da, "b": db, "diff": db - da if da is not None and db is not None else None}
        rows.append({"label": label, "attack": r["attack"], "beta": r["beta"], "cells": cells})
    return eps, rows


def _mean(s: Any) -> float | None:
    if isinstance(s, dict):
        s = s.get("mean")
    return float(s) if isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) else None


def _audit_option(x: dict, chosen: str | None) -> str:
    sel = " selected" if chosen and str(x["id"]) == chosen else ""
    label = f'{x.get("name") or short(x["id"])} · {x.get("dataset")} · encoder {short(x.get("encoder") or "–")} · {x.get("status")}'
    return f'<option value="{e(x["id"])}"{sel}>{e(label)} ({e(short(x["id"]))})</option>'


def compare_page(team_name: str, csrf: str, choices: list[dict], a: dict | None, b: dict | None,
                 chosen_a: str | None, chosen_b: str | None) -> str:
    out = [nav(team_name, csrf), "<h1>Compare two audits</h1>",
           '<p class="sub">Drop (clean minus poisoned accuracy, mean over seeds) per attack row and epsilon, side by '
           "side, and the difference B − A: e.g. the same audit on two encoders.</p>"]
    if choices:
        opts_a = "".join(_audit_option(x, chosen_a) for x in choices)
        opts_b = "".join(_audit_option(x, chosen_b) for x in choices)
        out.append('<form method="get" action="/ui/compare" id="compare-form">'
                   f'<label for="a">Audit A</label><select name="a" id="a">{opts_a}</select>'
                   f'<label for="b">Audit B</label><select name="b" id="b">{opts_b}</select> '
                   '<button type="submit">Compare</button></form>')
    else:
        out.append('<p class="na">No audits to compare yet.</p>')
    if a is not None and b is not None:
        out.append(_comparison(a, b))
    return ui_page("poisonaudit: compare audits", "\n".join(out))


def _comparison(a: dict, b: dict) -> str:
    eps, rows = compare_rows(a, b)

    def who(x: dict, side: str) -> str:
        return (f'<a href="/ui/audits/{_q(x["id"])}" id="link-{side}">{e(x.get("name") or short(x["id"]))}</a> '
                f'<span class="small">encoder <code>{e(short(x.get("encoder") or "–"))}</code>, {e(x.get("dataset"))}, '
                f'{badge(x.get("status"))}</span>')

    ca = (a.get("table") or {}).get("clean_accuracy")
    cb = (b.get("table") or {}).get("clean_accuracy")
    ma, mb = _mean(ca), _mean(cb)
    head = ("<h2>Audits</h2>" + f'<table id="compare-audits"><tr><th></th><th>audit</th><th>clean accuracy</th></tr>'
            f'<tr><th>A</th><td>{who(a, "a")}</td><td class="num" id="clean-a">{stat(ca)}</td></tr>'
            f'<tr><th>B</th><td>{who(b, "b")}</td><td class="num" id="clean-b">{stat(cb)}</td></tr>'
            f'<tr><th>B − A</th><td></td><td class="num" id="clean-diff">'
            f'{pts(mb - ma) if ma is not None and mb is not None else "–"}</td></tr></table>')
    top = "<tr><th rowspan=\"2\">attack</th>" + "".join(
        f'<th colspan="3">eps {e(f"{x:g}")}</th>' for x in eps) + "</tr>"
    sub = "<tr>" + "<th>drop A</th><th>drop B</th><th>B − A</th>" * len(eps) + "</tr>"
    body = []
    for r in rows:
        tds = []
        for x in eps:
            c = r["cells"][eps_key(x)]
            diff = c["diff"]
            cls = "num" + ("" if diff is None or abs(diff) < 5e-5 else " pos" if diff > 0 else " neg")
            tds.append(f'<td class="num" data-eps="{e(eps_key(x))}" data-side="a" data-value="{e(_raw(c["a"]))}">{pts(c["a"])}</td>'
                       f'<td class="num" data-eps="{e(eps_key(x))}" data-side="b" data-value="{e(_raw(c["b"]))}">{pts(c["b"])}</td>'
                       f'<td class="{cls}" data-eps="{e(eps_key(x))}" data-side="diff" data-value="{e(_raw(diff))}">'
                       f'{pts(diff)}</td>')
        body.append(f'<tr data-label="{e(r["label"])}"><th>{e(r["label"])}</th>{"".join(tds)}</tr>')
    table = (f'<h2>Drop per attack and epsilon</h2><table id="compare-table">{top}{sub}{"".join(body)}</table>'
             '<p class="small">A positive difference: the attack hurts audit B more. Rows are matched by their label '
             "(attack, and beta where it has one); – where an audit has no result.</p>")
    return head + table


def _raw(v: float | None) -> str:
    return "" if v is None else repr(v)


__all__ = ["UI_CSP", "UI_CSP_HEADER", "POLL_SCRIPT", "compare_page", "compare_rows", "error_page", "job_nav",
           "audit_nav", "list_page", "login_page", "nav", "pct"]
