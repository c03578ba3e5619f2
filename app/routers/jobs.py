"""Audit jobs: submit, read, list, cancel, download artifacts."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Path, Query, Response
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from app import jobs as service
from app.deps import JobDep, KeyDep, KeyFirstRoute, QueueDep, SessionDep, SettingsDep, StoreDep, TeamDep
from app.downloads import download
from app.problems import problem_responses
from app.report import CSP, render_job_report
from app.schemas import ArtifactsPublic, JobCreate, JobPublic, JobsPublic, SafeStr

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=KeyFirstRoute, responses=problem_responses(401, 404, 409, 422, 503))

POISONED_SET = service.POISONED_SET
FIGURE_MAX_BYTES = service.FIGURE_MAX_BYTES


@router.post("", status_code=202, response_model=JobPublic,
             responses=problem_responses(descriptions={413: "The JSON body is over POISONAUDIT_MAX_JSON_BYTES (1 MiB by default)"}))
def create_job(
    body: JobCreate, response: Response, session: SessionDep, team: TeamDep, queue: QueueDep, settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobPublic:
    """Submit an audit job; it is queued and runs on a worker."""
    job, created = service.create_attack_job(session, queue, team, settings, body, idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    # A job just created has no artifacts: no second query (and pool checkout) after the commit.
    return service.job_public(job, []) if created else service.view(session, job)


@router.get("", response_model=JobsPublic)
def list_jobs(
    session: SessionDep, team: TeamDep,
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
    attack: Annotated[SafeStr | None, Query(max_length=200)] = None,
    encoder: uuid.UUID | None = None,
    kind: Literal["attack", "pretrain"] | None = None,
    audit: uuid.UUID | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> JobsPublic:
    """List your jobs, newest first, with filters and cursor pagination."""
    rows, count, next_cursor = service.list_jobs(session, team, status=status, attack=attack, encoder=encoder,
                                                 kind=kind, audit=audit, limit=limit, cursor=cursor)
    arts = service.artifacts_of(session, [j.id for j in rows])
    return JobsPublic(data=[service.job_public(j, arts[j.id]) for j in rows], count=count, next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic)
async def read_job(job_id: Annotated[uuid.UUID, Path()], session: SessionDep, key: KeyDep) -> JobPublic:
    """Status, progress, timestamps, metrics, error and artifacts of one job."""
    # The route clients poll: its database work runs in one thread-pool hop (not one per sync
    # dependency) and, in the common case, one query (bench/README.md, service load).
    return await run_in_threadpool(service.view_for_key, session, key, job_id)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic)
def cancel_job(job: JobDep, session: SessionDep) -> JobPublic:
    """Cancel a job: a queued one at once, a running one within seconds."""
    return service.view(session, service.cancel(session, job))


@router.get("/{job_id}/artifacts", response_model=ArtifactsPublic)
def list_artifacts(job: JobDep, session: SessionDep) -> ArtifactsPublic:
    """The files a job produced (poisoned set, result JSON, log)."""
    arts = service.artifacts_of(session, [job.id])[job.id]
    return ArtifactsPublic(data=[service.artifact_public(a) for a in arts], count=len(arts))


@router.get("/{job_id}/artifacts/{name}", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}}, 307: {"description": "Presigned URL"}})
def download_artifact(job: JobDep, name: str, session: SessionDep, store: StoreDep) -> Response:
    """Download one artifact: streamed, or a redirect to a short-lived presigned URL."""
    return download(store, service.find_artifact(session, job, name))


@router.get("/{job_id}/poisoned-set", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}}, 307: {"description": "Presigned URL"}})
def download_poisoned_set(job: JobDep, session: SessionDep, store: StoreDep) -> Response:
    """The poisoned set as npz (x float32 NCHW, y int64, base_index int64)."""
    return download(store, service.find_artifact(session, job, POISONED_SET))


@router.get("/{job_id}/report", response_class=HTMLResponse, responses={200: {"content": {"text/html": {}}}})
def read_job_report(job: JobDep, session: SessionDep, store: StoreDep) -> HTMLResponse:
    """The job as one self-contained HTML page: results, defences, figures, parameters, provenance."""
    public, figures, encoder = service.report_inputs(session, store, job)
    page = render_job_report(public, figures, audit_href=audit_report_path, encoder=encoder)
    return HTMLResponse(page, headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"})


def audit_report_path(audit_id: str) -> str:
    """The API's report page of an audit (what a job's report links its audit to)."""
    return f"/v1/audits/{audit_id}/report"
