"""The FastAPI application. Build it with :func:`create_app` (nothing runs at import).

    uvicorn app.main:create_app --factory
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import problems
from app.limits import BodyLimitMiddleware
from app.routers import attacks, audits, datasets, encoders, health, jobs, keys
from app.settings import get_settings

log = logging.getLogger("app")


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
        lifespan=lifespan,
        # operation ids are the handlers' verb_noun names (create_job, read_audit...): readable generated clients
        generate_unique_id_function=lambda route: route.name,
    )
    problems.install(app)
    for r in (jobs.router, audits.router, encoders.router, datasets.router, keys.router, attacks.router, health.router):
        app.include_router(r)

    def uploads():
        s = get_settings()
        return {"/v1/encoders": s.max_encoder_bytes, "/v1/datasets": s.max_dataset_bytes}

    app.add_middleware(BodyLimitMiddleware, uploads=uploads, json_limit=lambda: get_settings().max_json_bytes)
    return app
