"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from app.deps import QueueDep, SessionDep
from app.metrics import render
from app.problems import PROBLEM_JSON, unavailable
from app.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def read_health() -> Health:
    """The process is up."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"description": "Database or broker unreachable"}})
def read_readiness(session: SessionDep, queue: QueueDep):
    """The database and the broker are reachable."""
    checks = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        queue.ping()
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    if all(v == "ok" for v in checks.values()):
        return Health(status="ok", checks=checks)
    p = unavailable()
    body = p.body("/readyz") | {"checks": checks, "detail": "not ready: " + ", ".join(f"{k} {v}" for k, v in checks.items())}
    return JSONResponse(body, status_code=503, media_type=PROBLEM_JSON, headers=p.headers)


@router.get("/metrics", response_class=Response)
def read_metrics(session: SessionDep, queue: QueueDep) -> Response:
    """Prometheus metrics: jobs by status, job durations, queue depth."""
    try:
        data = render(session, queue)
    except Exception as exc:
        from app.problems import _is_unavailable

        if _is_unavailable(exc):
            raise unavailable() from exc
        raise
    return Response(data, media_type=CONTENT_TYPE_LATEST)
