"""What every task shares: claim the job, heartbeat, progress and cancellation, artifacts, the end.

:class:`JobRun` is used as ``with JobRun.claim(job_id, worker) as run: ...``. The claim
is a conditional UPDATE (queued -> running), so a redelivered or duplicated message
is a no-op. A heartbeat thread writes the latest progress and the heartbeat every
``heartbeat_interval_s`` (progress writes are thus throttled) and reads the cancel
flag; the progress callback raises :class:`Cancelled` between steps once it is set.
Leaving the block stores the log (always), and marks the job cancelled or failed with
the message of whatever was raised. All final writes are conditional on this run
still owning the job, so a worker presumed dead never overwrites its successor.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

from sqlalchemy import select, update

from attacks.progress import Cancelled

from app.db import new_session, utcnow
from app.models import Artifact, Encoder, EncoderStatus, Job, JobKind, JobStatus
from app.settings import get_settings
from app.storage import artifact_key, get_store

log = logging.getLogger("worker")


class JobTimeLimit(Cancelled):
    """The job ran past the configured time limit (raised from the progress callback)."""


class LostOwnership(Cancelled):
    """The job was re-queued or finished elsewhere while this run was going."""


def worker_id(hostname: str | None) -> str:
    return f"{hostname or socket.gethostname()}:{os.getpid()}"


class JobRun:
    def __init__(self, job: Job, worker: str):
        self.settings = get_settings()
        self.store = get_store()
        self.job = job
        self.id = job.id
        self.attempt = job.attempts
        self.worker = worker
        self.status: str = JobStatus.running
        self.stage: str | None = None
        self.fraction: float | None = None
        self.progress_at = None
        self.cancel = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self.started = time.monotonic()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"job-{job.id}-"))
        self.log_path = self.tmp / "log.txt"
        self._handler: logging.Handler | None = None
        self._beat: threading.Thread | None = None

    # ---------------------------------------------------------------- claim
    @classmethod
    def claim(cls, job_id: str, hostname: str | None) -> "JobRun | None":
        """queued -> running for this worker, or None when the job is not ours to run."""
        me = worker_id(hostname)
        jid = uuid.UUID(job_id)
        now = utcnow()
        with new_session() as s:
            res = s.execute(
                update(Job)
                .where(Job.id == jid, Job.status == JobStatus.queued, Job.cancel_requested.is_(False))
                .values(status=JobStatus.running, worker=me, attempts=Job.attempts + 1, heartbeat_at=now,
                        started_at=now, finished_at=None, progress_stage="starting", progress_fraction=0.0,
                        progress_updated_at=now)
            )
            s.commit()
            if res.rowcount != 1:
                log.info("job %s not claimable (not queued, cancelled or unknown); skipping", job_id)
                return None
            job = s.get(Job, jid)
        return cls(job, me)

    # ---------------------------------------------------------------- context
    def __enter__(self) -> "JobRun":
        self._handler = logging.FileHandler(self.log_path)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._handler.setLevel(logging.INFO)
        root = logging.getLogger()
        root.addHandler(self._handler)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        log.info("job %s (%s) attempt %d on %s", self.id, self.job.kind, self.attempt, self.worker)
        self._beat = threading.Thread(target=self._heartbeat_loop, name=f"heartbeat-{self.id}", daemon=True)
        self._beat.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=10)
        if exc is None:
            outcome = None
        elif isinstance(exc, LostOwnership):
            log.warning("job %s: %s", self.id, exc)
            outcome = None
        elif isinstance(exc, JobTimeLimit) or type(exc).__name__ in ("SoftTimeLimitExceeded", "TimeLimitExceeded"):
            outcome = (JobStatus.failed, f"time limit exceeded ({self.settings.job_time_limit_s}s)")
        elif isinstance(exc, Cancelled):
            outcome = (JobStatus.cancelled, "cancelled on request")
        else:
            outcome = (JobStatus.failed, f"{type(exc).__name__}: {exc}")
            log.error("job %s failed", self.id, exc_info=(exc_type, exc, tb))
        if outcome is not None:
            self.finish(*outcome)
        self._close_log()
        return exc is not None and not isinstance(exc, (KeyboardInterrupt, SystemExit))

    def _close_log(self) -> None:
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler.close()
            self._handler = None
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---------------------------------------------------------------- progress, heartbeat, cancel
    def progress(self, stage: str, fraction: float) -> None:
        """The engine's callback, called between steps."""
        if stage != self.stage:
            log.info("stage %s", stage)
        self.stage, self.fraction, self.progress_at = stage, float(fraction), utcnow()
        if self.lost.is_set():
            raise LostOwnership("the job was taken over or finished elsewhere")
        if self.cancel.is_set():
            raise Cancelled("cancelled on request")
        if time.monotonic() - self.started > self.settings.job_time_limit_s:
            raise JobTimeLimit(f"time limit of {self.settings.job_time_limit_s}s exceeded")

    def _owned(self):
        return (Job.id == self.id, Job.status == JobStatus.running, Job.attempts == self.attempt, Job.worker == self.worker)

    def heartbeat(self) -> None:
        values = {"heartbeat_at": utcnow()}
        if self.progress_at is not None:
            values.update(progress_stage=self.stage, progress_fraction=self.fraction, progress_updated_at=self.progress_at)
        with new_session() as s:
            res = s.execute(update(Job).where(*self._owned()).values(**values))
            cancel = s.scalar(select(Job.cancel_requested).where(Job.id == self.id))
            s.commit()
        if res.rowcount != 1:
            self.lost.set()
        if cancel:
            self.cancel.set()

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval_s):
            try:
                self.heartbeat()
            except Exception as exc:  # the database may blip; the reaper judges by the timeout
                log.warning("heartbeat failed: %s", exc)

    # ---------------------------------------------------------------- artifacts and the end
    def put_artifact(self, name: str, path: str | os.PathLike, content_type: str) -> Artifact:
        stored = self.store.put_file(artifact_key(self.job.team_id, self.id, name), path, content_type)
        return Artifact(team_id=self.job.team_id, job_id=self.id, name=name, content_type=content_type,
                        key=stored.key, sha256=stored.sha256, size=stored.size)

    def write_json(self, name: str, data) -> Path:
        path = self.tmp / name
        path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
        return path

    def finish(self, status: str, error: str | None = None, metrics: dict | None = None,
               artifacts: list[Artifact] = (), device_used: str | None = None, also=None) -> bool:
        """Final state, artifacts (the log always), metrics and ``also(session)`` in one
        transaction, if this run still owns the job."""
        log.info("job %s -> %s%s", self.id, status, f": {error}" if error else "")
        if self._handler is not None:
            self._handler.flush()
        arts = list(artifacts)
        try:
            arts.append(self.put_artifact("log.txt", self.log_path, "text/plain; charset=utf-8"))
        except Exception as exc:
            log.warning("could not store the log: %s", exc)
        now = utcnow()
        values = dict(status=status, error=error, finished_at=now, heartbeat_at=now,
                      duration_s=time.monotonic() - self.started)
        if metrics is not None:
            values["metrics"] = metrics
        if device_used:
            values["device_used"] = device_used
        if status == JobStatus.succeeded:
            values.update(progress_stage="done", progress_fraction=1.0, progress_updated_at=now)
        with new_session() as s:
            if s.execute(update(Job).where(*self._owned()).values(**values)).rowcount != 1:
                s.rollback()
                log.warning("job %s no longer owned by this run; result discarded", self.id)
                return False
            names = [a.name for a in arts]
            for old in s.scalars(select(Artifact).where(Artifact.job_id == self.id, Artifact.name.in_(names))):
                s.delete(old)
            s.flush()
            s.add_all(arts)
            if self.job.kind == JobKind.pretrain and self.job.encoder_id and status != JobStatus.succeeded:
                s.execute(update(Encoder).where(Encoder.id == self.job.encoder_id)
                          .values(status=EncoderStatus.failed, error=error or status, updated_at=now))
            if also is not None:
                also(s)
            s.commit()
        self.status = status
        return True
