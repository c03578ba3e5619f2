"""A job never stays ``running`` forever: a running job whose heartbeat is older than
``heartbeat_timeout_s`` lost its worker. It is re-queued while attempts remain, and
failed with the reason otherwise. Nor ``queued`` forever: a queued job whose message
was sent over ``queued_resend_s`` ago, or never sent (``unsent_resend_s``), is sent again
(:func:`resend_stale_queued`). Every transition is a conditional UPDATE, so several API
replicas (or workers) may reap concurrently without double work.

A database outage stops every heartbeat at once, and is not a dead worker: the re-queue
re-checks in its UPDATE that the heartbeat is still stale, a reaper never reaps a job its own
process runs (:data:`local_jobs`), and after the reaper itself lost the database it holds off
for ``reaper_outage_grace_s`` (:class:`Reaper`), so live workers' heartbeats resume first.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from app.db import utcnow
from app.models import Encoder, EncoderStatus, Job, JobKind, JobStatus
from app.queue import JobQueue
from app.settings import Settings

log = logging.getLogger("app.reaper")

# The jobs this process is running now (a worker's JobRun adds and removes its own): alive by
# definition, whatever their heartbeat says, so this process's reaper leaves them alone.
local_jobs: set[uuid.UUID] = set()


def _lost(session: Session, job: Job, reason: str, queue: JobQueue, requeue_allowed: bool = True,
          worker: str | None = None, stale_before: datetime | None = None) -> str | None:
    now = utcnow()
    base = update(Job).where(Job.id == job.id, Job.status == JobStatus.running, Job.attempts == job.attempts)
    if stale_before is not None:  # a heartbeat that resumed since the SELECT saves the job
        base = base.where(or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before))
    if job.cancel_requested:
        values, action = dict(status=JobStatus.cancelled, error=f"cancelled ({reason})", finished_at=now), "cancelled"
    elif requeue_allowed and job.attempts < job.max_attempts:
        values = dict(status=JobStatus.queued, worker=None, heartbeat_at=None, enqueued_at=now,
                      error=f"{reason}; re-queued (attempt {job.attempts + 1} of {job.max_attempts})")
        action = "requeued"
    else:
        values = dict(status=JobStatus.failed, finished_at=now,
                      error=f"{reason}; gave up after {job.attempts} attempt(s)")
        action = "failed"
    if "finished_at" in values and job.started_at is not None:
        values["duration_s"] = (now - job.started_at).total_seconds()
    if session.execute(base.values(**values)).rowcount != 1:
        session.rollback()
        return None
    if action != "requeued" and job.kind == JobKind.pretrain and job.encoder_id:
        session.execute(update(Encoder).where(Encoder.id == job.encoder_id, Encoder.status == EncoderStatus.pending)
                        .values(status=EncoderStatus.failed, error=values["error"], updated_at=now))
    session.commit()
    if action == "requeued":
        try:
            queue.enqueue_job(job.id, job.kind, job.queue)
        except Exception as exc:  # broker down: leave it queued; a later pass will not see it, so say so
            log.error("job %s re-queued in the database but the broker refused it: %s", job.id, exc)
            session.execute(update(Job).where(Job.id == job.id, Job.status == JobStatus.queued).values(
                status=JobStatus.running, heartbeat_at=None, worker="(re-queue pending)"))
            session.commit()
            return None
    log.warning("job %s: %s -> %s%s", job.id, reason, action, f" (worker {worker})" if worker else "")
    return action


def resend_stale_queued(session: Session, queue: JobQueue, settings: Settings) -> dict[str, str]:
    """Queued jobs whose message was sent over ``queued_resend_s`` ago, or never sent and created
    over ``unsent_resend_s`` ago, are sent again, so a lost message never leaves a job queued
    forever. Returns {job id: "resent"}."""
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.queued_resend_s)
    unsent_cutoff = now - timedelta(seconds=settings.unsent_resend_s)
    due = or_(Job.enqueued_at < cutoff, Job.enqueued_at.is_(None) & (Job.created_at < unsent_cutoff))
    rows = list(session.scalars(select(Job).where(
        Job.status == JobStatus.queued, Job.cancel_requested.is_(False), due).limit(500)))
    session.rollback()
    out = {}
    for job in rows:
        # claim the resend (several API replicas may run this pass at once)
        claim = update(Job).where(Job.id == job.id, Job.status == JobStatus.queued, due).values(enqueued_at=now)
        if session.execute(claim).rowcount != 1:
            session.rollback()
            continue
        session.commit()
        try:
            queue.enqueue_job(job.id, job.kind, job.queue)
        except Exception as exc:  # broker down: the next pass after queued_resend_s tries again
            log.error("job %s: re-sending its queued message failed: %s", job.id, exc)
            continue
        log.warning("job %s queued since %s without being picked up: message re-sent", job.id,
                    (job.enqueued_at or job.created_at).isoformat(timespec="seconds"))
        out[str(job.id)] = "resent"
    return out


def reap_stale_jobs(session: Session, queue: JobQueue, settings: Settings) -> dict[str, str]:
    """One pass; returns {job id: action}. Jobs of :data:`local_jobs` are skipped."""
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.heartbeat_timeout_s)
    stale = list(session.scalars(select(Job).where(
        Job.status == JobStatus.running,
        or_(Job.heartbeat_at < cutoff, Job.heartbeat_at.is_(None) & ((Job.started_at < cutoff) | Job.started_at.is_(None))),
    )))
    session.rollback()
    out = {}
    for job in stale:
        if job.id in local_jobs:
            continue
        last = job.heartbeat_at.isoformat(timespec="seconds") if job.heartbeat_at else "never"
        # The job's error is the client's: it does not name the worker (host:pid); the server log does.
        reason = f"worker lost: no heartbeat for over {settings.heartbeat_timeout_s:g}s (last {last})"
        action = _lost(session, job, reason, queue, worker=job.worker, stale_before=cutoff)
        if action:
            out[str(job.id)] = action
    return out


def reap_worker_orphans(session: Session, queue: JobQueue, hostname: str) -> dict[str, str]:
    """At worker start: jobs still 'running' under this worker's name belong to a previous,
    dead incarnation of it; they are handled at once instead of after the timeout."""
    rows = list(session.scalars(select(Job).where(Job.status == JobStatus.running, Job.worker.like(f"{hostname}:%"))))
    session.rollback()
    out = {}
    for job in rows:
        action = _lost(session, job, "the worker restarted while the job ran", queue, worker=job.worker)
        if action:
            out[str(job.id)] = action
    return out


class Reaper(threading.Thread):
    """Runs :meth:`tick` every ``reaper_interval_s`` in a daemon thread.

    A failed pass, or a gap between two passes of over twice the interval (the process was
    stopped, a connect hung), means this reaper may have missed an outage that stopped every
    heartbeat; it then re-queues nothing for ``reaper_outage_grace_s`` from the first pass that
    reaches the database again (re-sending queued messages goes on)."""

    def __init__(self, settings: Settings, queue_getter, session_factory, clock=time.monotonic):
        super().__init__(name="poisonaudit-reaper", daemon=True)
        self.settings, self.queue_getter, self.session_factory = settings, queue_getter, session_factory
        self.stopped = threading.Event()
        self.clock = clock
        self.last_ok = clock()
        self.failed = False
        self.hold_until = float("-inf")

    def run(self) -> None:
        while not self.stopped.wait(self.settings.reaper_interval_s):
            self.tick()

    def tick(self) -> dict[str, str]:
        """One pass: {job id: action}, {} when it failed or held off."""
        try:
            with self.session_factory() as session:
                session.execute(select(1))
                now = self.clock()
                if self.failed or now - self.last_ok > 2 * self.settings.reaper_interval_s + 5:
                    self.hold_until = now + self.settings.reaper_outage_grace_s
                    log.warning("reaper: the database is back after an outage; no job is re-queued "
                                "for %gs", self.settings.reaper_outage_grace_s)
                self.failed = False
                out = {}
                if now >= self.hold_until:
                    out = reap_stale_jobs(session, self.queue_getter(), self.settings)
                out.update(resend_stale_queued(session, self.queue_getter(), self.settings))
            self.last_ok = self.clock()
            return out
        except Exception as exc:  # keep reaping after a database hiccup
            self.failed = True
            log.warning("reaper pass failed: %s", exc)
            return {}

    def stop(self) -> None:
        self.stopped.set()
