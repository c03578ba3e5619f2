"""The web pages under ``/ui``: what a browser can open without an Authorization header.

``GET /ui/login`` and ``POST /ui/login`` (an API key in a form) open a session (:mod:`app.web.sessions`):
an HttpOnly, SameSite=Strict cookie on ``/ui``. Then ``/ui/`` lists the team's audits and jobs
(live progress from ``/ui/api/progress``), ``/ui/audits/{id}`` and ``/ui/jobs/{id}`` are the report
pages (:mod:`app.report`) with links between them and download buttons
(``/ui/jobs/{id}/poisoned-set``, ``/ui/jobs/{id}/artifacts/{name}``, the API's download code),
``/ui/compare?a=..&b=..`` compares two audits, ``POST /ui/logout`` signs out. Forms that post carry
a CSRF token (403 without it). Another team's objects are 404s, as in the API. None of these routes
is in the OpenAPI schema."""

from __future__ import annotations

import secrets
import uuid
from urllib.parse import quote
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlalchemy import select

from app import audits as audit_service
from app import jobs as job_service
from app.deps import SessionDep, SettingsDep, StoreDep
from app.downloads import download
from app.models import Audit, Job
from app.problems import Problem, problem_response
from app.report import render_audit_report, render_job_report
from app.web import pages
from app.web.sessions import COOKIE, LOGIN_COOKIE, PATH, WebAuth, close_session, csrf_ok, lookup, open_session

router = APIRouter(prefix=PATH, include_in_schema=False)

LIST_LIMIT = 100
LOGIN_FORM_TTL_S = 3600
HEADERS = {"Content-Security-Policy": pages.UI_CSP_HEADER, "Cache-Control": "no-store",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"}


class SignInRequired(Exception):
    """No live session: pages lead to the sign-in form, the JSON route answers 401."""


def web_auth(request: Request, session: SessionDep) -> WebAuth:
    auth = lookup(session, request.cookies.get(COOKIE))
    if auth is None:
        raise SignInRequired()
    return auth


WebAuthDep = Annotated[WebAuth, Depends(web_auth)]


def html(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers=HEADERS)


def not_found_page(what: str, ident: str) -> HTMLResponse:
    return html(pages.error_page(404, f"{what} {ident} not found"), 404)


def _uuid(value: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except (TypeError, ValueError):
        return None


def _job_of(session, auth: WebAuth, job_id: str) -> Job | None:
    ident = _uuid(job_id)
    return None if ident is None else session.scalar(select(Job).where(Job.id == ident, Job.team_id == auth.team.id))


def _audit_of(session, auth: WebAuth, audit_id: str | None) -> Audit | None:
    ident = _uuid(audit_id)
    return None if ident is None else session.scalar(select(Audit).where(Audit.id == ident, Audit.team_id == auth.team.id))


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a path of these pages only (never another host), else the list."""
    v = value or ""
    if (v.startswith(f"{PATH}/") and not v.startswith("//") and "\\" not in v and len(v) <= 500
            and v.isprintable() and not v.startswith(f"{PATH}/login") and not v.startswith(f"{PATH}/logout")):
        return v
    return f"{PATH}/"


def _secure(request: Request, settings) -> bool:
    return settings.web_cookie_secure or request.url.scheme == "https"


# ------------------------------------------------------------------ sign-in and sign-out
def _login_form(request: Request, settings, message: str | None = None, status: int = 200,
                next_: str | None = None) -> HTMLResponse:
    """The sign-in form with a fresh CSRF token, also set as a cookie of the form's own path (double submit)."""
    token = secrets.token_urlsafe(24)
    resp = html(pages.login_page(token, message, safe_next(next_)), status)
    resp.set_cookie(LOGIN_COOKIE, token, max_age=LOGIN_FORM_TTL_S, path=f"{PATH}/login", httponly=True,
                    samesite="strict", secure=_secure(request, settings))
    return resp


@router.get("/login")
def login_form(request: Request, session: SessionDep, settings: SettingsDep,
               next: Annotated[str | None, Query(max_length=500)] = None) -> Response:
    if lookup(session, request.cookies.get(COOKIE)) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return _login_form(request, settings, next_=next)


@router.post("/login")
def login(request: Request, session: SessionDep, settings: SettingsDep, key: Annotated[str, Form()] = "",
          csrf: Annotated[str, Form()] = "", next: Annotated[str, Form()] = "") -> Response:
    if not csrf_ok(request.cookies.get(LOGIN_COOKIE), csrf):
        return _login_form(request, settings, "The sign-in form had expired or was not this site's; try again.", 403,
                           next)
    opened = open_session(session, key.strip(), settings) if 0 < len(key.strip()) <= 200 else None
    if opened is None:
        return _login_form(request, settings, "That API key is not valid (or it was revoked).", 401, next)
    previous = lookup(session, request.cookies.get(COOKIE))
    if previous is not None:  # signing in again (another key?): the old session ends here
        close_session(session, previous.session_id)
    token, _ = opened
    resp = RedirectResponse(safe_next(next), status_code=303)
    resp.set_cookie(COOKIE, token, max_age=settings.web_session_ttl_s, path=PATH, httponly=True, samesite="strict",
                    secure=_secure(request, settings))
    resp.delete_cookie(LOGIN_COOKIE, path=f"{PATH}/login")
    return resp


@router.post("/logout")
def logout(auth: WebAuthDep, session: SessionDep, csrf: Annotated[str, Form()] = "") -> Response:
    if not csrf_ok(auth.csrf, csrf):
        return html(pages.error_page(403, "The sign-out form had no valid CSRF token; nothing was done."), 403)
    close_session(session, auth.session_id)
    resp = RedirectResponse(f"{PATH}/login", status_code=303)
    resp.delete_cookie(COOKIE, path=PATH)
    return resp


# ------------------------------------------------------------------ the list and its live progress
def _lists(session, auth: WebAuth):
    audits, audit_count, _ = audit_service.list_audits(session, auth.team, limit=LIST_LIMIT, cursor=None)
    audit_jobs = audit_service.jobs_of(session, [a.id for a in audits])
    summaries = [audit_service.audit_summary(a, audit_jobs[a.id]).model_dump(mode="json") for a in audits]
    jobs, job_count, _ = job_service.list_jobs(session, auth.team, status=None, attack=None, encoder=None, kind=None,
                                               limit=LIST_LIMIT, cursor=None)
    views = [job_service.job_public(j, []).model_dump(mode="json") for j in jobs]
    return summaries, audit_count, views, job_count


@router.get("/")
def list_page(auth: WebAuthDep, session: SessionDep) -> HTMLResponse:
    audits, audit_count, jobs, job_count = _lists(session, auth)
    return html(pages.list_page(auth.team.name, auth.csrf, audits, audit_count, jobs, job_count))


@router.get("")
def list_page_no_slash() -> RedirectResponse:
    return RedirectResponse(f"{PATH}/", status_code=307)


@router.get("/api/progress")
def progress(auth: WebAuthDep, session: SessionDep) -> JSONResponse:
    """Status and progress of the audits and jobs the list shows (what its script polls)."""
    audits, _, jobs, _ = _lists(session, auth)

    def item(x):
        return {"id": x["id"], "status": x["status"], "fraction": (x.get("progress") or {}).get("fraction")}

    return JSONResponse({"audits": [item(a) for a in audits], "jobs": [item(j) for j in jobs]},
                        headers={"Cache-Control": "no-store"})


# ------------------------------------------------------------------ report pages and downloads
@router.get("/jobs/{job_id}")
def job_page(job_id: str, auth: WebAuthDep, session: SessionDep, store: StoreDep) -> HTMLResponse:
    job = _job_of(session, auth, job_id)
    if job is None:
        return not_found_page("job", job_id)
    public, figures, encoder = job_service.report_inputs(session, store, job)
    return html(render_job_report(public, figures, nav=pages.job_nav(auth.team.name, auth.csrf, public),
                                  audit_href=lambda ident: f"{PATH}/audits/{ident}", encoder=encoder,
                                  csp=pages.UI_CSP))


@router.get("/jobs/{job_id}/poisoned-set")
def job_poisoned_set(job_id: str, auth: WebAuthDep, session: SessionDep, store: StoreDep) -> Response:
    job = _job_of(session, auth, job_id)
    if job is None:
        return not_found_page("job", job_id)
    return download(store, job_service.find_artifact(session, job, job_service.POISONED_SET))


@router.get("/jobs/{job_id}/artifacts/{name}")
def job_artifact(job_id: str, name: str, auth: WebAuthDep, session: SessionDep, store: StoreDep) -> Response:
    job = _job_of(session, auth, job_id)
    if job is None:
        return not_found_page("job", job_id)
    return download(store, job_service.find_artifact(session, job, name))


@router.get("/audits/{audit_id}")
def audit_page(audit_id: str, auth: WebAuthDep, session: SessionDep) -> HTMLResponse:
    audit = _audit_of(session, auth, audit_id)
    if audit is None:
        return not_found_page("audit", audit_id)
    public, figures, encoder = audit_service.report_inputs(session, audit)
    return html(render_audit_report(public, figures, nav=pages.audit_nav(auth.team.name, auth.csrf, public),
                                    job_href=lambda ident: f"{PATH}/jobs/{ident}", encoder=encoder,
                                    csp=pages.UI_CSP))


@router.get("/compare")
def compare_page(auth: WebAuthDep, session: SessionDep,
                 a: Annotated[str | None, Query(max_length=100)] = None,
                 b: Annotated[str | None, Query(max_length=100)] = None) -> HTMLResponse:
    audits, _, _ = audit_service.list_audits(session, auth.team, limit=LIST_LIMIT, cursor=None)
    audit_jobs = audit_service.jobs_of(session, [x.id for x in audits])
    choices = [audit_service.audit_summary(x, audit_jobs[x.id]).model_dump(mode="json") for x in audits]
    chosen_b = b
    if a and not b:  # "compare this audit with another": B defaults to the newest other audit
        chosen_b = next((c["id"] for c in choices if c["id"] != a), None)
    left = right = None
    if a and b:
        left, right = _audit_of(session, auth, a), _audit_of(session, auth, b)
        if left is None or right is None:
            return not_found_page("audit", a if left is None else b)
        left = audit_service.view(session, left).model_dump(mode="json")
        right = audit_service.view(session, right).model_dump(mode="json")
    return html(pages.compare_page(auth.team.name, auth.csrf, choices, left, right, a, chosen_b))


# ------------------------------------------------------------------ wiring
def install(app: FastAPI) -> None:
    """Mounts the pages and answers :class:`SignInRequired`: a redirect to the sign-in form for a
    page (with the stale cookie removed), a 401 problem for the JSON route."""
    app.include_router(router)

    @app.exception_handler(SignInRequired)
    async def _sign_in(request: Request, exc: SignInRequired) -> Response:
        if request.url.path.startswith(f"{PATH}/api/"):
            resp = problem_response(Problem(401, "sign in at /ui/login"), request)
        else:  # back here after signing in (a GET's address only: a POST's form is gone anyway)
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            login = f"{PATH}/login" + (f"?next={quote(target, safe='')}" if request.method == "GET"
                                       and safe_next(target) == target and target != f"{PATH}/" else "")
            resp = RedirectResponse(login, status_code=303)
        if COOKIE in request.cookies:
            resp.delete_cookie(COOKIE, path=PATH)
        return resp
