"""Audits: a grid of attack jobs (attacks x betas x epsilons x seeds) and the table of their results."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import HTMLResponse

from app import audits as service
from app.deps import AuditDep, KeyFirstRoute, QueueDep, SessionDep, SettingsDep, TeamDep
from app.problems import problem_responses
from app.schemas import AuditCreate, AuditPublic, AuditsPublic

router = APIRouter(prefix="/v1/audits", tags=["audits"], route_class=KeyFirstRoute, responses=problem_responses(401, 404, 409, 422, 503))


@router.post("", status_code=202, response_model=AuditPublic,
             responses=problem_responses(descriptions={413: "The JSON body is over POISONAUDIT_MAX_JSON_BYTES (1 MiB by default)"}))
def create_audit(body: AuditCreate, response: Response, session: SessionDep, team: TeamDep, queue: QueueDep,
                 settings: SettingsDep,
                 idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> AuditPublic:
    """Submit an audit: validated as a whole, then one queued job per attack x beta x epsilon x seed.
    An Idempotency-Key makes a retry return the audit the first request made."""
    audit, _ = service.create_audit(session, queue, team, settings, body, idempotency_key)
    response.headers["Location"] = f"/v1/audits/{audit.id}"
    return service.view(session, audit)


@router.get("", response_model=AuditsPublic)
def list_audits(
    session: SessionDep, team: TeamDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
) -> AuditsPublic:
    """List your audits, newest first, with status and progress (cursor pagination)."""
    rows, count, next_cursor = service.list_audits(session, team, limit=limit, cursor=cursor)
    jobs = service.jobs_of(session, [a.id for a in rows])
    return AuditsPublic(data=[service.audit_summary(a, jobs[a.id]) for a in rows], count=count, next_cursor=next_cursor)


@router.get("/{audit_id}", response_model=AuditPublic)
def read_audit(audit: AuditDep, session: SessionDep) -> AuditPublic:
    """Status and progress derived from the audit's jobs, its jobs, and the results table."""
    return service.view(session, audit)


@router.post("/{audit_id}/cancel", status_code=202, response_model=AuditPublic)
def cancel_audit(audit: AuditDep, session: SessionDep) -> AuditPublic:
    """Cancel every unfinished job of the audit (queued ones at once, running ones within seconds)."""
    return service.view(session, service.cancel(session, audit))


@router.get("/{audit_id}/report", response_class=HTMLResponse, responses={200: {"content": {"text/html": {}}}})
def read_audit_report(audit: AuditDep, session: SessionDep) -> HTMLResponse:
    """The audit as one self-contained HTML page: the table, the worst drops, defences, a figure."""
    from app.report import CSP, render_audit_report

    public, figures, encoder = service.report_inputs(session, audit)
    page = render_audit_report(public, figures, job_href=job_report_path, encoder=encoder)
    return HTMLResponse(page, headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"})


def job_report_path(job_id: str) -> str:
    """The API's report page of a job (what the audit report links its jobs to)."""
    return f"/v1/jobs/{job_id}/report"
