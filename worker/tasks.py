"""Thin Celery tasks: take an id, load the row, call ``attacks``, store what came out.

Enqueued by name from the API (``app.queue.TASK_*``). Transient database errors at
the start are retried with backoff; everything the engine raises ends the job
``failed`` with its message (see :class:`worker.runner.JobRun`). The work of a job runs in a
child process that the worker kills on the time limit or an unheeded cancel
(:meth:`worker.runner.JobRun.isolated`).
"""

from __future__ import annotations

from sqlalchemy.exc import OperationalError

from app.queue import TASK_CHECK_ENCODER, TASK_PRETRAIN, TASK_RUN_JOB
from worker.celery_app import celery_app
from worker.runner import JobRun
from worker import steps

_retry = dict(bind=True, autoretry_for=(OperationalError,), retry_backoff=2, retry_backoff_max=60, max_retries=5)


@celery_app.task(name=TASK_RUN_JOB, **_retry)
def run_job(self, job_id: str) -> str:
    """Run one audit job end to end and record its metrics and poisoned set."""
    run = JobRun.claim(job_id, self.request.hostname)
    if run is None:
        return "skipped"
    with run:
        run.isolated(attack_body)
    return run.status


def attack_body(run: JobRun) -> None:
    """What an attack job does (in its own process)."""
    encoder, dataset = steps.load_inputs(run)
    result = steps.run_engine(run, encoder, dataset)
    steps.store_result(run, result)


@celery_app.task(name=TASK_PRETRAIN, **_retry)
def pretrain_encoder(self, job_id: str) -> str:
    """Pre-train an encoder with SimCLR (a job of kind ``pretrain``) and store it."""
    run = JobRun.claim(job_id, self.request.hostname)
    if run is None:
        return "skipped"
    with run:
        run.isolated(pretrain_body)
    return run.status


def pretrain_body(run: JobRun) -> None:
    """What a pre-training job does (in its own process)."""
    encoder, seconds = steps.pretrain(run)
    steps.store_pretrained(run, encoder, seconds)


@celery_app.task(name=TASK_CHECK_ENCODER, **_retry)
def check_encoder(self, encoder_id: str) -> str:
    """Load an uploaded checkpoint against its architecture; ready, or failed with the reason."""
    return steps.check_encoder(encoder_id)
