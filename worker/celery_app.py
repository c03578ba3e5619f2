"""The one Celery app of the workers: ``celery -A worker.celery_app worker -Q gpu,cpu``.

Its configuration comes from :func:`app.queue.celery_config` (shared with the API,
which enqueues by task name) and is read lazily on first use, not at import.
"""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_ready

from app.queue import celery_config
from app.settings import get_settings

celery_app = Celery("poisonaudit", include=["worker.tasks"])
celery_app.add_defaults(lambda: celery_config(get_settings()))
app = celery_app  # what `celery -A worker.celery_app` looks for


@worker_ready.connect
def _on_ready(sender=None, **_kwargs) -> None:
    """Jobs left 'running' by a previous incarnation of this worker are handled at once, and
    the worker reaps stale jobs too (so nothing hangs while no API process runs; several
    reapers are safe: every transition is a conditional update). The jobs' forkserver starts now,
    not on the first job."""
    from app.db import new_session
    from app.queue import get_queue
    from app.reaper import Reaper, reap_worker_orphans
    from worker.runner import start_job_server

    settings = get_settings()
    hostname = getattr(sender, "hostname", None)
    if hostname:
        with new_session() as session:
            reap_worker_orphans(session, get_queue(), hostname)
    if settings.reaper_enabled:
        Reaper(settings, get_queue, new_session).start()
    start_job_server()
