"""The FastAPI application. Build it with :func:`create_app` (nothing runs at import).

    uvicorn app.main:create_app --factory
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from app import problems
from app.limits import BodyLimitMiddleware
from app.routers import attacks, audits, datasets, encoders, health, jobs, keys, web
from app.settings import get_settings

log = logging.getLogger("app")

DESCRIPTION = """\
Indiscriminate data-poisoning audits of linear heads on frozen pre-trained encoders.

**Quick start.** Every `/v1` call needs a team's API key, as `Authorization: Bearer <key>`
(`poisonaudit create-team NAME --with-key` prints one; `poisonaudit create-key TEAM` makes another).

1. An encoder: upload a checkpoint (`POST /v1/encoders`, multipart, safetensors or a torch.save
   state dict) or pre-train one with SimCLR (`POST /v1/encoders/pretrain`, JSON), then wait until it is `ready`.
2. An audit with no knobs set runs the paper's table at epsilon 0.03 and 0.1:
   `POST /v1/audits {"encoder": ID, "dataset": "digits"}`; or one attack: `POST /v1/jobs`.
3. Poll `GET /v1/audits/{id}` (or `/v1/jobs/{id}`) until it is finished; read the clean and poisoned
   accuracy and the drop, and download the poisoned set (`GET /v1/jobs/{id}/poisoned-set`).

Errors are RFC 9457 problem details (`application/problem+json`). This page's files are served
by the API itself: it works offline.
"""
SWAGGER_STATIC = "/static/swagger-ui"


@asynccontextmanager
async def lifespan(app: FastAPI):
    from app.db import new_session
    from app.queue import get_queue
    from app.reaper import Reaper

    settings = get_settings()
    settings.ensure_dirs()
    if settings.migrate_on_start:
        from app.migrate import upgrade_schema

        upgrade_schema(settings.database_url)
    reaper = None
    if settings.reaper_enabled:
        reaper = Reaper(settings, get_queue, new_session)
        reaper.start()
    try:
        yield
    finally:
        if reaper is not None:
            reaper.stop()


def create_app() -> FastAPI:
    app = FastAPI(
        title="poisonaudit",
        version="1.0.0",
        summary="Indiscriminate data-poisoning audits of linear heads on frozen pre-trained encoders.",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served below from local files, not a CDN
        redoc_url=None,
        # operation ids are the handlers' verb_noun names (create_job, read_audit...): readable generated clients
        generate_unique_id_function=lambda route: route.name,
    )
    problems.install(app)
    for r in (jobs.router, audits.router, encoders.router, datasets.router, keys.router, attacks.router, health.router):
        app.include_router(r)
    web.install(app)  # the browser pages under /ui (not in the OpenAPI schema)

    _install_docs(app)

    def uploads():
        s = get_settings()
        return {"/v1/encoders": s.max_encoder_bytes, "/v1/datasets": s.max_dataset_bytes}

    app.add_middleware(BodyLimitMiddleware, uploads=uploads, json_limit=lambda: get_settings().max_json_bytes)
    return app


def _install_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI from the files the ``fastapi-offline`` package ships (no CDN, so it
    works on an air-gapped machine); ``/`` leads there. Swagger UI 5: the 4.15 of ``swagger-ui-bundle``
    (its last release) cannot read OpenAPI 3.1, which FastAPI writes, and showed only "Unable to
    render this definition" in a browser (tests/service/test_web_browser.py loads the page)."""
    from pathlib import Path

    import fastapi_offline

    static = Path(fastapi_offline.__file__).parent / "static"
    app.mount(SWAGGER_STATIC, StaticFiles(directory=str(static)), name="swagger-ui")
    oauth2 = app.swagger_ui_oauth2_redirect_url

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - API docs",
                                   oauth2_redirect_url=oauth2, swagger_js_url=f"{SWAGGER_STATIC}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{SWAGGER_STATIC}/swagger-ui.css",
                                   swagger_favicon_url=f"{SWAGGER_STATIC}/favicon.png")

    @app.get(oauth2, include_in_schema=False)
    def docs_oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/docs")
