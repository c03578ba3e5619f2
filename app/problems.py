"""RFC 7807 problem details: one exception type, one set of handlers, never a bare 500 for bad input."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("app")

PROBLEM_JSON = "application/problem+json"
_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class Problem(Exception):
    """Raise anywhere in a request to answer with ``application/problem+json``."""

    def __init__(self, status: int, detail: str, *, title: str | None = None, type_: str = "about:blank",
                 headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title or _TITLES.get(status, "Error")
        self.type = type_
        self.headers = headers
        self.extra = extra

    def body(self, instance: str | None = None) -> dict[str, Any]:
        out = {"type": self.type, "title": self.title, "status": self.status, "detail": self.detail}
        if instance:
            out["instance"] = instance
        out.update(self.extra)
        return out


def problem_responses(*codes: int, descriptions: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for routes: the problem-details schema under its media type. A route's
    entry replaces its router's whole entry for that code, so routes declare theirs with this too
    (``descriptions`` says when and why, in place of the bare title)."""
    from app.schemas import ProblemDetail

    descriptions = descriptions or {}
    return {c: {"model": ProblemDetail, "description": descriptions.get(c, _TITLES.get(c, "Error")),
                "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/ProblemDetail"}}}}
            for c in (*codes, *(d for d in descriptions if d not in codes))}


def not_found(what: str, ident: Any) -> Problem:
    return Problem(404, f"{what} {ident} not found")


def invalid(field: str, message: str, **extra: Any) -> Problem:
    """422 naming the offending field, shaped like the request-validation errors."""
    return Problem(422, f"{field}: {message}", title="Invalid request",
                   errors=[{"field": field, "message": message}], **extra)


def problem_response(p: Problem, request: Request | None = None) -> JSONResponse:
    return JSONResponse(p.body(str(request.url.path) if request else None), status_code=p.status,
                        media_type=PROBLEM_JSON, headers=p.headers)


def _field(loc: tuple | list) -> str:
    parts = [str(x) for x in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "form"):
        parts = parts[1:] if parts[0] == "body" else parts
    return ".".join(parts) or "body"


def validation_problem(errors: list[dict], prefix: tuple = ()) -> Problem:
    items = [{"field": _field(tuple(prefix) + tuple(e.get("loc", ()))), "message": e.get("msg", "invalid")} for e in errors]
    detail = "; ".join(f"{i['field']}: {i['message']}" for i in items)
    return Problem(422, detail, title="Invalid request", errors=items)


def _is_unavailable(exc: BaseException) -> bool:
    """Connection-level failures of the database or the broker."""
    from sqlalchemy.exc import DBAPIError, OperationalError, TimeoutError as PoolTimeout

    if isinstance(exc, (OperationalError, PoolTimeout)):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    try:
        from kombu.exceptions import OperationalError as KombuOperationalError

        if isinstance(exc, KombuOperationalError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, (ConnectionError, TimeoutError))


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem):
        return problem_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return problem_response(validation_problem(list(exc.errors())), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else _TITLES.get(exc.status_code, "Error")
        return problem_response(Problem(exc.status_code, detail, headers=getattr(exc, "headers", None)), request)

    async def _backing(request: Request, exc: Exception):
        if _is_unavailable(exc):
            log.warning("backing service unavailable: %s", exc)
            return problem_response(unavailable(), request)
        log.error("unhandled error", exc_info=exc)
        return problem_response(Problem(500, "internal error"), request)

    from kombu.exceptions import OperationalError as KombuOperationalError
    from sqlalchemy.exc import DBAPIError, TimeoutError as PoolTimeout

    for exc_type in (DBAPIError, PoolTimeout, KombuOperationalError, ConnectionError, TimeoutError):
        app.add_exception_handler(exc_type, _backing)
    app.add_exception_handler(Exception, _backing)


def unavailable() -> Problem:
    return Problem(503, "a backing service (database or broker) is unavailable; retry later",
                   title="Service Unavailable", headers={"Retry-After": "5"})
