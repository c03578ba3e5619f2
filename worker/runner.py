"""What every task shares: claim the job, heartbeat, progress and cancellation, artifacts, the end.

:class:`JobRun` is used as ``with JobRun.claim(job_id, worker) as run: ...``. The claim
is a conditional UPDATE (queued -> running), so a redelivered or duplicated message
is a no-op. A heartbeat thread writes the latest progress and the heartbeat every
``heartbeat_interval_s`` (progress writes are thus throttled) and reads the cancel
flag; the progress callback raises :class:`Cancelled` between steps once it is set.
Leaving the block stores the log (always), and marks the job cancelled or failed with
the message of whatever was raised. All final writes are conditional on this run
still owning the job, so a worker presumed dead never overwrites its successor.

The work itself runs in a child process (:meth:`JobRun.isolated`, forked where the platform
can): the engine's loops stop themselves at the soft time limit or on cancel
(:func:`attacks.progress.checkpoint`), and the worker kills the child on the hard limit or
when a cancel was not acted upon within ``job_kill_grace_s``, whatever code it is stuck in.

The job's log holds the lines of this job only (records logged in its context, see
:data:`current_job`), without tracebacks; its text and the job's ``error`` pass through
:func:`public_text`, so no server path or host name reaches the client. Tracebacks stay in
the server's log.
"""

from __future__ import annotations

import contextvars
import json
import logging
import multiprocessing
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select, update

from attacks.progress import JOB_STAGES, PRETRAIN_STAGES, Cancelled, OverallProgress, checks

from app import reaper
from app.db import new_session, retry_db, utcnow
from app.models import Artifact, Encoder, EncoderStatus, Job, JobKind, JobStatus
from app.settings import get_settings
from app.storage import artifact_key, get_store

log = logging.getLogger("worker")


class JobTimeLimit(Cancelled):
    """The job ran past the configured time limit (raised from the progress callback)."""


class LostOwnership(Cancelled):
    """The job was re-queued or finished elsewhere while this run was going."""


class JobFailed(Exception):
    """What the job's child process raised (or how it died), re-raised in the worker."""

    def __init__(self, type_name: str, message: str):
        super().__init__(message)
        self.type_name = type_name


# The job whose context a log record was made in: each job's log handler keeps that job's records only.
current_job: contextvars.ContextVar[uuid.UUID | None] = contextvars.ContextVar("poisonaudit_job", default=None)

_ABS_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^\s/'\"():,;=<>]+/)+([^\s/'\"():,;=<>]*)")


def public_text(text: str, *, secrets: tuple[str, ...] = ()) -> str:
    """``text`` without server details: every absolute path but its last component (``.../name.npz``),
    then ``secrets`` (this worker's name, ...) and this machine's host name, as whole words."""
    text = _ABS_PATH.sub(lambda m: ".../" + m.group(1), text)
    names = {x for x in (*secrets, socket.gethostname()) if x and len(x) >= 3}
    for name in sorted(names, key=len, reverse=True):
        text = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", "<server>", text)
    return text


class _JobLogFilter(logging.Filter):
    """Records made in this job's context only (not another job's, not the reaper's), and none
    marked ``server_only``."""

    def __init__(self, job_id: uuid.UUID):
        super().__init__()
        self.job_id = job_id

    def filter(self, record: logging.LogRecord) -> bool:
        return current_job.get() == self.job_id and not getattr(record, "server_only", False)


class _PublicFormatter(logging.Formatter):
    """One line a record, no traceback, no server paths or host names."""

    def __init__(self, secrets: tuple[str, ...]):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record)} {record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            line += f" ({type(exc).__name__}: {exc})"
        return public_text(line.replace("\n", " "), secrets=self.secrets)


def worker_id(hostname: str | None) -> str:
    return f"{hostname or socket.gethostname()}:{os.getpid()}"


class JobRun:
    def __init__(self, job: Job, worker: str, tmp: Path | None = None):
        self.settings = get_settings()
        self.store = get_store()
        self.job = job
        self.id = job.id
        self.attempt = job.attempts
        self.worker = worker
        self.status: str = JobStatus.running
        self.stage: str | None = None
        self.fraction: float | None = None  # overall, monotone (stage weights), what the API shows
        self._overall = OverallProgress(PRETRAIN_STAGES if job.kind == JobKind.pretrain else JOB_STAGES)
        self.progress_at = None
        self.cancel = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self.started = time.monotonic()
        self.tmp = tmp or Path(tempfile.mkdtemp(prefix=f"job-{job.id}-"))
        self.log_path = self.tmp / "log.txt"
        self._handler: logging.Handler | None = None
        self._beat: threading.Thread | None = None
        self._job_token = None
        self._child: _ChildLink | None = None  # set in the job's child process

    # ---------------------------------------------------------------- claim
    @classmethod
    def claim(cls, job_id: str, hostname: str | None) -> "JobRun | None":
        """queued -> running for this worker, or None when the job is not ours to run."""
        me = worker_id(hostname)
        jid = uuid.UUID(job_id)

        def attempt():
            return cls._claim_once(jid, me)

        job = retry_db(attempt, what=f"claiming job {job_id}")
        return None if job is None else cls(job, me)

    @staticmethod
    def _claim_once(jid: uuid.UUID, me: str) -> Job | None:
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
                log.info("job %s not claimable (not queued, cancelled or unknown); skipping", jid)
                return None
            return s.get(Job, jid)

    # ---------------------------------------------------------------- context
    def secrets(self) -> tuple[str, ...]:
        """Names the job's log and error must not show: this worker's (name@host:pid), its host's."""
        name = self.worker.rsplit(":", 1)[0]
        return (self.worker, name, name.rpartition("@")[2])

    def _open_log(self) -> None:
        """The job's log file: this job's records (its context), one public line each."""
        self._handler = logging.FileHandler(self.log_path)
        self._handler.setFormatter(_PublicFormatter(self.secrets()))
        self._handler.addFilter(_JobLogFilter(self.id))
        self._handler.setLevel(logging.INFO)
        root = logging.getLogger()
        root.addHandler(self._handler)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)

    def __enter__(self) -> "JobRun":
        self._job_token = current_job.set(self.id)
        reaper.local_jobs.add(self.id)
        self._open_log()
        log.info("job %s (%s) attempt %d", self.id, self.job.kind, self.attempt)
        log.info("job %s runs on %s", self.id, self.worker, extra={"server_only": True})
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
        elif isinstance(exc, JobFailed):  # the child logged its traceback to the server log
            outcome = (JobStatus.failed, public_text(f"{exc.type_name}: {exc}", secrets=self.secrets()))
        else:
            outcome = (JobStatus.failed, public_text(f"{type(exc).__name__}: {exc}", secrets=self.secrets()))
            log.error("job %s failed", self.id, exc_info=(exc_type, exc, tb))
        try:
            if outcome is not None:
                self.finish(*outcome)
        finally:
            reaper.local_jobs.discard(self.id)
            self._close_log()
        return exc is not None and not isinstance(exc, (KeyboardInterrupt, SystemExit))

    def _close_log(self) -> None:
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler.close()
            self._handler = None
        if self._job_token is not None:
            current_job.reset(self._job_token)
            self._job_token = None
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---------------------------------------------------------------- progress, heartbeat, cancel
    def progress(self, stage: str, fraction: float) -> None:
        """The engine's callback, called between steps."""
        if stage != self.stage:
            log.info("stage %s", stage)
        self.stage, self.fraction, self.progress_at = stage, self._overall(stage, fraction), utcnow()
        if self._child is not None:
            self._child.report(stage, float(fraction))
        self.check()

    def check(self) -> None:
        """Raises when the job must stop: lost, cancelled, or past the soft time limit (the engine
        reaches this through its progress callback and :func:`attacks.progress.checkpoint`)."""
        lost, cancel = (self.lost, self.cancel) if self._child is None else (self._child.lost, self._child.cancel)
        if lost.is_set():
            raise LostOwnership("the job was taken over or finished elsewhere")
        if cancel.is_set():
            raise Cancelled("cancelled on request")
        if time.monotonic() - self.started > self.settings.job_soft_time_limit_s:
            raise JobTimeLimit(f"time limit of {self.settings.job_time_limit_s}s exceeded")

    # ---------------------------------------------------------------- the job's process
    def isolated(self, body: Callable[["JobRun"], None]) -> None:
        """``body(run)`` (a module-level function) in a child process, killed on the hard time limit, or
        ``job_kill_grace_s`` after a cancel (or a loss of the job) that it did not act upon. What the child
        raised is raised here (:class:`JobFailed` for an error, with its type's name). The child is forked
        from a clean server process (multiprocessing's forkserver, modules preloaded): never from this
        one, whose OpenMP and CUDA state a fork would inherit broken. Without forkserver (or with
        ``job_isolation`` off) ``body(self)`` runs here, with the cooperative checks only."""
        if not self.settings.job_isolation or "forkserver" not in multiprocessing.get_all_start_methods():
            with checks(self.check):
                body(self)
            return
        mp = _job_context()
        parent_end, child_end = mp.Pipe(duplex=False)
        link = _ChildLink(child_end, mp.Event(), mp.Event())
        spec = {"job_id": self.id, "attempt": self.attempt, "worker": self.worker, "tmp": str(self.tmp),
                "started": self.started, "env": {k: v for k, v in os.environ.items() if k.startswith("POISONAUDIT_")}}
        if self._handler is not None:
            self._handler.flush()
        proc = mp.Process(target=_child_main, args=(spec, body, link), name=f"job-{self.id}", daemon=True)
        proc.start()
        child_end.close()
        log.info("job %s: process %s started", self.id, proc.pid, extra={"server_only": True})
        outcome, killed, asked_at = None, None, None
        try:
            while True:
                if parent_end.poll(0.1):
                    try:
                        msg = parent_end.recv()
                    except EOFError:
                        break
                    if msg[0] != "progress":
                        outcome = msg
                        break
                    self.stage, self.fraction, self.progress_at = msg[1], self._overall(msg[1], msg[2]), utcnow()
                elif not proc.is_alive():
                    break
                now = time.monotonic()
                if self.lost.is_set() or self.cancel.is_set():
                    (link.lost if self.lost.is_set() else link.cancel).set()
                    asked_at = asked_at or now
                    if now - asked_at > self.settings.job_kill_grace_s:
                        killed = "lost" if self.lost.is_set() else "cancelled"
                        break
                if now - self.started > self.settings.job_time_limit_s:
                    killed = "time"
                    break
        finally:
            proc.join(0 if killed else 10 if outcome is not None else 5)  # an EOF may precede the exit a little
            if proc.is_alive():
                proc.kill()
                proc.join(30)
            parent_end.close()
        if killed:
            log.warning("job %s: killed its process (%s)", self.id, killed)
            _raise_outcome(("raised", killed, "", ""))
        if outcome is None:
            code = proc.exitcode
            how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
            log.error("job %s: its process %s without a result", self.id, how)
            raise JobFailed("WorkerError", f"the job's process {how} without a result"
                                           + (" (out of memory?)" if code == -signal.SIGKILL else ""))
        if outcome[0] == "done":
            self.status = outcome[1]
            return
        _raise_outcome(outcome)

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

    def _heartbeat_loop(self) -> None:  # a thread of its own (no job context: its lines stay in the server log)
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
        transaction, if this run still owns the job. The transaction is retried while the database
        is unreachable (:func:`app.db.retry_db`), so a result finished during an outage is kept."""
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

        def write() -> bool:
            with new_session() as s:
                if s.execute(update(Job).where(*self._owned()).values(**values)).rowcount != 1:
                    s.rollback()
                    return False
                names = [a.name for a in arts]
                for old in s.scalars(select(Artifact).where(Artifact.job_id == self.id, Artifact.name.in_(names))):
                    s.delete(old)
                s.flush()
                # fresh rows each try: a failed try's session may have attached the others
                s.add_all([Artifact(**{c: getattr(a, c) for c in _ARTIFACT_FIELDS}) for a in arts])
                if self.job.kind == JobKind.pretrain and self.job.encoder_id and status != JobStatus.succeeded:
                    s.execute(update(Encoder).where(Encoder.id == self.job.encoder_id)
                              .values(status=EncoderStatus.failed, error=error or status, updated_at=now))
                if also is not None:
                    also(s)
                s.commit()
                return True

        if not retry_db(write, what=f"job {self.id}: final write"):
            log.warning("job %s no longer owned by this run; result discarded", self.id)
            return False
        self.status = status
        return True


_ARTIFACT_FIELDS = ("team_id", "job_id", "name", "content_type", "key", "sha256", "size")



_ctx = None


def _job_context():
    """The forkserver context the jobs' processes come from. Its server preloads the engine and what
    a job would otherwise import afresh in every process on first use: the pipeline, scikit-learn's
    datasets (``digits``) and ``torch._dynamo`` (which torch.optim imports when the first optimizer is
    built), so that a small job is not mostly imports (bench/README.md, soak)."""
    global _ctx
    if _ctx is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["worker.tasks", "attacks.pipeline", "sklearn.datasets", "torch._dynamo"])
        _ctx = ctx
    return _ctx


def start_job_server() -> None:
    """Starts the jobs' forkserver now (the worker calls this when it is ready), so that the first job
    does not wait for the server's preload; a no-op where jobs do not run in their own process."""
    if get_settings().job_isolation and "forkserver" in multiprocessing.get_all_start_methods():
        _job_context()
        from multiprocessing import forkserver

        forkserver.ensure_running()


def _child_main(spec: dict, body: Callable[[JobRun], None], link: "_ChildLink") -> None:
    """In the job's process: this job's settings, log handlers and context; ``body``; one message back."""
    _die_with_parent()
    for k in [k for k in os.environ if k.startswith("POISONAUDIT_")]:
        del os.environ[k]
    os.environ.update(spec["env"])
    get_settings.cache_clear()
    root = logging.getLogger()
    if not root.handlers:  # the server log: this process's stderr is the worker's
        server = logging.StreamHandler(sys.stderr)
        server.setFormatter(logging.Formatter("[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s"))
        root.addHandler(server)
    try:
        with new_session() as s:
            job = s.get(Job, spec["job_id"])
        run = JobRun(job, spec["worker"], tmp=Path(spec["tmp"]))
        run.attempt, run.started, run._child = spec["attempt"], spec["started"], link
        current_job.set(run.id)
        run._open_log()
    except BaseException as exc:
        log.error("job %s: could not start its process", spec["job_id"], exc_info=True)
        link.send(("raised", "error", type(exc).__name__, str(exc)))
        return
    try:
        with checks(run.check):
            body(run)
        link.send(("done", run.status))
    except BaseException as exc:
        kind = ("lost" if isinstance(exc, LostOwnership) else "time" if isinstance(exc, JobTimeLimit)
                else "cancelled" if isinstance(exc, Cancelled) else "error")
        if kind == "error":
            log.error("job %s failed", run.id, exc_info=True)
        link.send(("raised", kind, type(exc).__name__, str(exc)))
    finally:
        if run._handler is not None:
            run._handler.close()

class _ChildLink:
    """The child's side: progress up a pipe (throttled), cancel and loss down as events."""

    def __init__(self, conn, cancel, lost):
        self.conn, self.cancel, self.lost = conn, cancel, lost
        self._sent: tuple[str | None, float] = (None, 0.0)

    def report(self, stage: str, fraction: float) -> None:
        now = time.monotonic()
        if stage != self._sent[0] or now - self._sent[1] >= 0.25:
            self._sent = (stage, now)
            self.send(("progress", stage, fraction))

    def send(self, msg) -> None:
        try:
            self.conn.send(msg)
        except (BrokenPipeError, OSError):
            pass


def _raise_outcome(msg) -> None:
    _, kind, type_name, text = msg
    if kind == "time":
        raise JobTimeLimit(text or "time limit exceeded")
    if kind == "cancelled":
        raise Cancelled(text or "cancelled on request")
    if kind == "lost":
        raise LostOwnership(text or "the job was taken over or finished elsewhere")
    raise JobFailed(type_name, text)


def _die_with_parent() -> None:
    """Linux: SIGKILL when the worker dies, even by SIGKILL (no orphan keeps computing)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass
