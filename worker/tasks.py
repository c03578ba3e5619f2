"""Thin Celery tasks: take an id, load the row, call ``attacks``, store what came out.

Enqueued by name from the API (``app.queue.TASK_*``). A database outage at the start is
ridden out for ``db_outage_s`` (:func:`app.db.retry_db`, backoff to ``db_retry_max_interval_s``),
after which the message goes back to the broker (``Reject(requeue=True)``), so a queued job
is never stranded by an outage; everything the engine raises ends the job
``failed`` with its message (see :class:`worker.runner.JobRun`). The work of a job runs in a
child process that the worker kills on the time limit or an unheeded cancel
(:meth:`worker.runner.JobRun.isolated`).
"""

from __future__ import annotations

from contextlib import contextmanager

from celery.exceptions import Reject

from app.db import is_outage, retry_db
from app.queue import TASK_CHECK_ENCODER, TASK_PRETRAIN, TASK_RUN_JOB
from worker.celery_app import celery_app
from worker.runner import JobRun
from worker import steps

@contextmanager
def _requeue_on_outage():
    """A database outage that outlasted ``db_outage_s`` gives the message back to the broker."""
    try:
        yield
    except Exception as exc:
        if is_outage(exc):
            raise Reject(f"database unreachable: {type(exc).__name__}", requeue=True) from exc
        raise


def claim(job_id: str, hostname: str | None) -> JobRun | None:
    """:meth:`JobRun.claim` (which rides out an outage itself), or the message back to the broker."""
    with _requeue_on_outage():
        return JobRun.claim(job_id, hostname)


@celery_app.task(name=TASK_RUN_JOB, bind=True)
def run_job(self, job_id: str) -> str:
    """Run one audit job end to end and record its metrics and poisoned set."""
    run = claim(job_id, self.request.hostname)
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


@celery_app.task(name=TASK_PRETRAIN, bind=True)
def pretrain_encoder(self, job_id: str) -> str:
    """Pre-train an encoder with SimCLR (a job of kind ``pretrain``) and store it."""
    run = claim(job_id, self.request.hostname)
    if run is None:
        return "skipped"
    with run:
        run.isolated(pretrain_body)
    return run.status


def pretrain_body(run: JobRun) -> None:
    """What a pre-training job does (in its own process)."""
    encoder, seconds = steps.pretrain(run)
    steps.store_pretrained(run, encoder, seconds)


@celery_app.task(name=TASK_CHECK_ENCODER, bind=True)
def check_encoder(self, encoder_id: str) -> str:
    """Load an uploaded checkpoint against its architecture; ready, or failed with the reason."""
    with _requeue_on_outage():
        return retry_db(lambda: steps.check_encoder(encoder_id), what=f"checking encoder {encoder_id}")
