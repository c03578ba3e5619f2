"""Job services shared by the routes: submission (with idempotency), views, cancellation."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import uuid
from datetime import datetime

from pydantic import ValidationError
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from attacks.catalogue import UnknownAttackError, get_attack, validate_job
from app import datasets
from app.db import utcnow
from app.models import FINISHED, ApiKey, Artifact, Encoder, EncoderStatus, Job, JobKind, JobStatus, Team
from app.problems import Problem, invalid, not_found, unavailable, validation_problem
from app.security import key_matches, parse_prefix, require_team
from app.queue import JobQueue, queue_for_device
from app.schemas import ArtifactPublic, AuditCreate, JobCreate, JobPublic, ProgressPublic
from app.settings import Settings

log = logging.getLogger("app.jobs")


def artifact_public(a: Artifact) -> ArtifactPublic:
    return ArtifactPublic(name=a.name, content_type=a.content_type, size=a.size, sha256=a.sha256,
                          created_at=a.created_at, url=f"/v1/jobs/{a.job_id}/artifacts/{a.name}")


def job_public(job: Job, artifacts: list[Artifact]) -> JobPublic:
    return JobPublic(
        id=job.id, kind=job.kind, audit=job.audit_id, status=job.status, attack=job.attack, encoder=job.encoder_id, dataset=job.dataset,
        epsilon=job.epsilon, beta=job.beta, params=job.params or {}, seed=job.seed, device=job.device, head=job.head, defences=job.defences,
        precision=job.precision, queue=job.queue,
        progress=ProgressPublic(stage=job.progress_stage, fraction=job.progress_fraction, updated_at=job.progress_updated_at),
        cancel_requested=job.cancel_requested, attempts=job.attempts, max_attempts=job.max_attempts, worker=job.worker,
        device_used=job.device_used, heartbeat_at=job.heartbeat_at, created_at=job.created_at, started_at=job.started_at,
        finished_at=job.finished_at, duration_s=job.duration_s, metrics=job.metrics, error=job.error,
        artifacts=[artifact_public(a) for a in artifacts],
    )


def encoder_identity(session: Session, team_id: uuid.UUID, encoder_id: uuid.UUID | None, jobs: list[Job]) -> dict:
    """What a report says about the encoder of a job or an audit: its row (name, architecture, spec,
    source, the sha256 of its weights file), when it still exists and belongs to ``team_id``, and the
    fingerprint(s) of the loaded weights that ``jobs`` reported (``metrics["encoder_fingerprint"]``;
    a pre-training job's ``metrics["fingerprint"]``). Never raises for missing data."""
    enc = session.get(Encoder, encoder_id) if encoder_id is not None else None
    if enc is not None and enc.team_id != team_id:
        enc = None
    fingerprints: list[str] = []
    for j in jobs:
        m = j.metrics if isinstance(j.metrics, dict) else {}
        fp = m.get("encoder_fingerprint") or (m.get("fingerprint") if j.kind == JobKind.pretrain else None)
        if isinstance(fp, str) and fp and fp not in fingerprints:
            fingerprints.append(fp)
    out: dict = {"id": str(encoder_id) if encoder_id is not None else None, "fingerprints": fingerprints}
    if enc is not None:
        out.update(name=enc.name, architecture=enc.architecture, spec=enc.spec, source=enc.source,
                   status=enc.status, weights_sha256=enc.sha256)
    return out


def artifacts_of(session: Session, job_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[Artifact]]:
    out: dict[uuid.UUID, list[Artifact]] = {i: [] for i in job_ids}
    if job_ids:
        for a in session.scalars(select(Artifact).where(Artifact.job_id.in_(job_ids)).order_by(Artifact.name)):
            out[a.job_id].append(a)
    return out


def view(session: Session, job: Job) -> JobPublic:
    return job_public(job, artifacts_of(session, [job.id])[job.id])


POISONED_SET = "poisoned_set.npz"
FIGURE_MAX_BYTES = 16 << 20


def find_artifact(session: Session, job: Job, name: str) -> Artifact:
    """The job's artifact called ``name``, or a 404 problem (saying the job's status if it has not succeeded)."""
    art = session.scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.name == name))
    if art is None:
        raise Problem(404, f"job {job.id} has no artifact {name!r}" + ("" if job.status == "succeeded" else f" (job is {job.status})"))
    return art


def report_inputs(session: Session, store, job: Job) -> tuple[dict, dict[str, bytes], dict]:
    """What :func:`app.report.render_job_report` takes for ``job``: its public view as JSON-ready
    dict, its PNG figures read from the store (those gone from it are left out) and its encoder's
    identity (:func:`encoder_identity`)."""
    from app.storage import ObjectNotFound

    arts = artifacts_of(session, [job.id])[job.id]
    figures = {}
    for a in arts:
        if a.name.startswith("figure-") and a.content_type == "image/png" and a.size <= FIGURE_MAX_BYTES:
            try:
                figures[a.name] = b"".join(store.open(a.key))
            except ObjectNotFound:
                pass  # listed but gone from the store: the page says which figures it has
    return (job_public(job, arts).model_dump(mode="json"), figures,
            encoder_identity(session, job.team_id, job.encoder_id, [job]))


def view_for_key(session: Session, key: str | None, job_id: uuid.UUID) -> JobPublic:
    """A job as its owner sees it: 401 for a bad key, 404 for a job the key's team does not own.

    The status route clients poll, so the common case is one query: the key's row joined to
    the job of its team and the job's artifacts. Anything else falls back to the full key
    check, which decides between 401 and 404."""
    prefix = parse_prefix(key) if key else None
    if prefix is not None:
        rows = session.execute(
            select(ApiKey.key_hash, ApiKey.revoked_at, Job, Artifact)
            .join(Job, and_(Job.team_id == ApiKey.team_id, Job.id == job_id))
            .outerjoin(Artifact, Artifact.job_id == Job.id)
            .where(ApiKey.prefix == prefix)
            .order_by(Artifact.name)
        ).all()
        if rows and key_matches(key, rows[0].key_hash, rows[0].revoked_at):
            return job_public(rows[0].Job, [r.Artifact for r in rows if r.Artifact is not None])
    require_team(session, key)  # 401 unless the key is good
    raise not_found("job", job_id)


def request_hash(body: JobCreate | AuditCreate) -> str:
    """What an Idempotency-Key is bound to: the request body with its defaults filled in."""
    fields = body.model_dump(mode="json")
    if fields.get("precision") == "fp32":  # added later: a request that leaves it out hashes as it did before
        del fields["precision"]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def validate_attack_request(body: JobCreate) -> tuple[float | None, dict]:
    """Validates with the engine's models, reporting the shared options' and the attack's
    own parameters' errors together; returns (beta with its default, params as given)."""
    try:
        info = get_attack(body.attack)
    except UnknownAttackError as exc:
        raise invalid("attack", str(exc), valid=exc.valid) from None
    errors: list[dict] = []
    try:
        info.params_model.model_validate(body.params, strict=True)
    except ValidationError as exc:
        errors += [{**e, "loc": ("params", *e["loc"])} for e in exc.errors()]
    try:
        opts, _ = validate_job(body.attack, body.epsilon, body.beta, {}, body.seed, body.device, body.head, strict=True)
    except ValidationError as exc:
        errors = list(exc.errors()) + errors
    except ValueError as exc:  # e.g. beta given to an attack that takes none
        errors.insert(0, {"loc": ("beta",), "msg": str(exc)})
    if errors:
        raise validation_problem(errors)
    return opts.beta, body.params


def check_encoder_usable(session: Session, team: Team, encoder_id: uuid.UUID) -> Encoder:
    enc = session.scalar(select(Encoder).where(Encoder.id == encoder_id, Encoder.team_id == team.id))
    if enc is None:
        raise invalid("encoder", f"no encoder {encoder_id} in your team")
    if enc.status != EncoderStatus.ready:
        detail = f"encoder {encoder_id} is {enc.status}" + (f": {enc.error}" if enc.error else "")
        raise Problem(409, detail, errors=[{"field": "encoder", "message": detail}])
    return enc


def resolve_dataset(session: Session, team: Team, settings: Settings, ref: str) -> datasets.ResolvedDataset:
    try:
        return datasets.resolve(ref, team, session, settings)
    except datasets.DatasetRefError as exc:
        raise invalid("dataset", str(exc)) from None


def submit(session: Session, queue: JobQueue, job: Job) -> Job:
    """Commits the job, then enqueues it by name and records when (``enqueued_at``); if the broker
    is down the job is removed again and the client gets 503 (so a retry with the same key starts
    afresh). A job left with no ``enqueued_at`` was never sent (this process died in between):
    a retry with its Idempotency-Key sends it (:func:`send_unsent`), and so does the reaper."""
    session.add(job)
    session.commit()
    try:
        queue.enqueue_job(job.id, job.kind, job.queue)
    except Exception as exc:
        log.warning("could not enqueue job %s: %s", job.id, exc)
        session.delete(job)
        session.commit()
        raise unavailable() from exc
    mark_sent(session, [job.id])
    return job


def mark_sent(session: Session, job_ids: list[uuid.UUID]) -> None:
    """Records that these jobs' messages went to the broker (those still without a time)."""
    if job_ids:
        session.execute(update(Job).where(Job.id.in_(job_ids), Job.enqueued_at.is_(None))
                        .values(enqueued_at=utcnow()).execution_options(synchronize_session=False))
        session.commit()


def send_unsent(session: Session, queue: JobQueue, *criteria) -> int:
    """Sends the queued jobs matching ``criteria`` whose message was never sent; each is claimed by
    a conditional UPDATE first, so concurrent retries send it once. Returns how many were sent."""
    ids = list(session.scalars(select(Job.id).where(*criteria, Job.status == JobStatus.queued,
                                                    Job.enqueued_at.is_(None))))
    sent = 0
    for job_id in ids:
        claim = update(Job).where(Job.id == job_id, Job.status == JobStatus.queued, Job.enqueued_at.is_(None))
        if session.execute(claim.values(enqueued_at=utcnow())).rowcount != 1:
            session.rollback()
            continue
        session.commit()
        job = session.get(Job, job_id)
        try:
            queue.enqueue_job(job.id, job.kind, job.queue)
        except Exception as exc:  # broker down: unmark it, the client may retry (the reaper will too)
            session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=None))
            session.commit()
            raise unavailable() from exc
        log.warning("job %s was committed but never sent (an earlier request died); sent now", job_id)
        sent += 1
    return sent


def create_attack_job(session: Session, queue: JobQueue, team: Team, settings: Settings, body: JobCreate,
                      idempotency_key: str | None) -> tuple[Job, bool]:
    """Returns (job, created). A retried submission with the same key returns the same job."""
    req_hash = request_hash(body)
    if idempotency_key and (existing := by_idempotency_key(session, Job, team, idempotency_key)) is not None:
        replay(existing, req_hash)
        if send_unsent(session, queue, Job.id == existing.id):
            session.refresh(existing)
        return existing, False
    beta, params = validate_attack_request(body)
    check_encoder_usable(session, team, body.encoder)
    ds = resolve_dataset(session, team, settings, body.dataset)
    job = Job(
        team_id=team.id, kind=JobKind.attack, status=JobStatus.queued, attack=body.attack, encoder_id=body.encoder,
        dataset=ds.ref, dataset_id=ds.row.id if ds.row is not None else None, epsilon=body.epsilon, beta=beta,
        params=params, seed=body.seed, device=body.device, head=body.head, defences=body.defences, precision=body.precision,
        queue=queue_for_device(body.device, settings),
        idempotency_key=idempotency_key, request_hash=req_hash, max_attempts=settings.max_attempts,
        created_at=utcnow(),
    )
    try:
        return submit(session, queue, job), True
    except IntegrityError:  # a concurrent retry with the same key won the race
        session.rollback()
        existing = by_idempotency_key(session, Job, team, idempotency_key)
        if existing is None:
            raise
        return replay(existing, req_hash), False


def by_idempotency_key(session: Session, model, team: Team, idempotency_key: str):
    """The team's job or audit (``model``) made with this Idempotency-Key, or None."""
    return session.scalar(select(model).where(model.team_id == team.id, model.idempotency_key == idempotency_key))


def replay(row, req_hash: str):
    """The job or audit an Idempotency-Key already made, if the request is the same; else 422."""
    if row.request_hash != req_hash:
        raise Problem(422, "this Idempotency-Key was already used with a different request",
                      title="Idempotency-Key reused", errors=[{"field": "Idempotency-Key", "message": "reused with a different body"}])
    return row


def cancel_where(session: Session, *criteria) -> None:
    """Cancels the jobs matching ``criteria`` (not committed): queued ones at once, running ones
    flagged for their worker. Both UPDATEs are conditional on the status in the database, not
    on one read earlier: a job a worker has claimed or finished meanwhile is never overwritten."""
    session.execute(
        update(Job).where(*criteria, Job.status == JobStatus.queued)
        .values(status=JobStatus.cancelled, finished_at=utcnow(), error="cancelled before it started",
                cancel_requested=True)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Job).where(*criteria, Job.status == JobStatus.running).values(cancel_requested=True)
        .execution_options(synchronize_session=False)
    )


def cancel(session: Session, job: Job) -> Job:
    """Queued: cancelled at once (the task skips it). Running: flagged; the worker stops
    at its next check and marks it cancelled. Finished: 409."""
    if job.status in FINISHED:
        raise Problem(409, f"job {job.id} already {job.status}")
    cancel_where(session, Job.id == job.id)
    session.commit()
    session.refresh(job)
    if job.kind == JobKind.pretrain and job.status == JobStatus.cancelled and job.encoder_id:
        enc = session.get(Encoder, job.encoder_id)
        if enc is not None and enc.status == EncoderStatus.pending:
            enc.status, enc.error = EncoderStatus.failed, "pre-training cancelled"
            session.commit()
    return job


# ------------------------------------------------------------------ listing with a cursor
def _encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, ident = raw.split("|")
        return datetime.fromisoformat(ts), uuid.UUID(ident)
    except Exception:
        raise invalid("cursor", "not a cursor returned by this API") from None


def list_jobs(session: Session, team: Team, *, status: str | None, attack: str | None, encoder: uuid.UUID | None,
              kind: str | None, limit: int, cursor: str | None,
              audit: uuid.UUID | None = None) -> tuple[list[Job], int, str | None]:
    conds = [Job.team_id == team.id]
    if audit:
        conds.append(Job.audit_id == audit)
    if status:
        conds.append(Job.status == status)
    if attack:
        conds.append(Job.attack == attack)
    if encoder:
        conds.append(Job.encoder_id == encoder)
    if kind:
        conds.append(Job.kind == kind)
    count = session.scalar(select(func.count()).select_from(Job).where(*conds)) or 0
    q = select(Job).where(*conds)
    if cursor:
        ts, ident = _decode_cursor(cursor)
        q = q.where(or_(Job.created_at < ts, and_(Job.created_at == ts, Job.id < ident)))
    rows = list(session.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    next_cursor = _encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], count, next_cursor
