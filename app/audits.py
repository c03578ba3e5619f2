"""Audits: a grid of attack jobs on one encoder and dataset, and the table made of their results.

``POST /v1/audits`` validates everything (every attack's parameters, every epsilon,
beta and seed, the head recipe, the fan-out size, the encoder and the dataset)
before it creates anything, then creates the audit and one job per
attack x beta x epsilon x seed in one transaction, and enqueues the jobs seed by
seed, epsilon by epsilon, attack by attack. That order lets the worker's stage cache
(:mod:`attacks.stage_cache`) compute the clean head, the GradPC target and the GC
features once and reuse them in the jobs that follow.

Nothing about an audit's progress is stored: its status, progress and table are
derived from its jobs each time they are read.

Status: ``queued`` (no job started), ``running`` (some job queued or running and
some started or finished), ``succeeded`` (all), ``cancelled`` (all cancelled),
``failed`` (all finished, none succeeded, some failed), ``partial`` (all finished,
some succeeded and some failed or were cancelled).

Table: one row per attack entry and beta (attacks without a beta: one row, beta
null), one cell per epsilon keyed ``str(float(epsilon))``. A cell aggregates its
succeeded jobs over seeds: mean, sample std (0 when n = 1) and n of the poisoned
accuracy, the drop and the number of poisons (``n_poisons``); per-defence accuracy
when the jobs report ``metrics["defences"]`` ({name: {"accuracy": ...}}), and per
defence that applied the poisons it removed, that count over the job's poisons, and
the clean points it removed (``removed``: {name: {"poisons_removed", "fraction",
"clean_removed"}}). The clean accuracy is taken
per seed (the mean over that seed's succeeded jobs, which share one clean head),
then aggregated over seeds. GradPC's "poisoned accuracy" is its target's accuracy.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import uuid
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from attacks.catalogue import CATALOGUE, HeadRecipe, JobOptions, UnknownAttackError, get_attack, validate_job
from app import jobs as job_service
from app.db import utcnow
from app.models import FINISHED, Audit, Job, JobKind, JobStatus, Team
from app.problems import Problem, invalid, unavailable, validation_problem
from app.queue import JobQueue, queue_for_device
from app.schemas import (
    AuditAttackPublic, AuditCell, AuditCreate, AuditJob, AuditJobCounts, AuditProgress, AuditPublic, AuditRow,
    AuditSummary, AuditTable, AuditWorst, CellJobs, DefenceRemoval, Stat,
)
from app.settings import Settings


def _beta_label(beta: float | None) -> str:
    return "" if beta is None else f" (beta={beta:g})"


def eps_key(epsilon: float) -> str:
    """How an epsilon names a table cell: ``str(float(epsilon))``, e.g. '0.03', '1.0'."""
    return str(float(epsilon))


def _params_key(name: str, params: dict) -> tuple[str, str]:
    return name, json.dumps(params or {}, sort_keys=True)


# ------------------------------------------------------------------ validation and fan-out
def _check_values(errors: list[dict], field: str, values: list, check) -> None:
    seen = set()
    for i, v in enumerate(values):
        msg = check(v)
        if msg:
            errors.append({"loc": (field, i), "msg": msg})
        if v in seen:
            errors.append({"loc": (field, i), "msg": f"duplicate value {v!r}"})
        seen.add(v)


def _field_error(exc: ValidationError, field: str) -> str | None:
    for e in exc.errors():
        if e["loc"] and e["loc"][0] == field:
            return e["msg"]
    return None


def plan(body: AuditCreate, settings: Settings) -> tuple[list[dict], list[float] | None]:
    """Validates an audit request without touching the database. Returns the jobs to create,
    in enqueue order, as dicts (attack, params, beta, epsilon, seed, label), and the betas in
    effect (the request's, or the catalogue default when an attack takes one; else None)."""
    errors: list[dict] = []
    infos = []
    labels: dict[str, int] = {}
    entries: dict[tuple[str, str], int] = {}
    for i, spec in enumerate(body.attacks):
        try:
            info = get_attack(spec.name)
        except UnknownAttackError as exc:
            raise invalid(f"attacks.{i}.name", str(exc), valid=exc.valid) from None
        infos.append(info)
        try:
            info.params_model.model_validate(spec.params, strict=True)
        except ValidationError as exc:
            errors += [{"loc": ("attacks", i, "params", *e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        key = _params_key(spec.name, spec.params)
        if key in entries:
            errors.append({"loc": ("attacks", i), "msg": f"same attack and parameters as attacks.{entries[key]}"})
        entries.setdefault(key, i)
        label = spec.label or spec.name
        if label in labels:
            errors.append({"loc": ("attacks", i, "label"),
                           "msg": f"label {label!r} already names attacks.{labels[label]}; give each entry a distinct label"})
        labels.setdefault(label, i)

    def eps_ok(e):
        try:
            JobOptions(attack="x", epsilon=e)
        except ValidationError as exc:
            return _field_error(exc, "epsilon")

    def beta_ok(b):
        try:
            JobOptions(attack="x", beta=b)
        except ValidationError as exc:
            return _field_error(exc, "beta")

    def seed_ok(s):
        try:
            JobOptions(attack="x", seed=s)
        except ValidationError as exc:
            return _field_error(exc, "seed")

    _check_values(errors, "epsilons", body.epsilons, eps_ok)
    _check_values(errors, "seeds", body.seeds, seed_ok)
    takes_beta = [a.name for a in CATALOGUE.values() if a.takes_beta]
    if body.betas is not None:
        _check_values(errors, "betas", body.betas, beta_ok)
        if not any(info.takes_beta for info in infos):
            errors.append({"loc": ("betas",), "msg": f"none of the attacks takes a beta (those that do: {', '.join(takes_beta)})"})
    try:
        HeadRecipe.model_validate(body.head or {}, strict=True)
    except ValidationError as exc:
        errors += [{"loc": ("head", *e["loc"]), "msg": e["msg"]} for e in exc.errors()]
    if errors:
        raise validation_problem(errors)

    betas: list[float] | None = list(body.betas) if body.betas is not None else None
    if betas is None and any(info.takes_beta for info in infos):
        betas = [validate_job(next(i.name for i in infos if i.takes_beta))[0].beta]
    n_jobs = sum(len(betas) if info.takes_beta else 1 for info in infos) * len(body.epsilons) * len(body.seeds)
    if n_jobs > settings.max_audit_jobs:
        detail = (f"the audit would create {n_jobs} jobs (attack rows x {len(body.epsilons)} epsilons x "
                  f"{len(body.seeds)} seeds); the limit is {settings.max_audit_jobs}: ask for fewer attacks, "
                  f"betas, epsilons or seeds, or split the audit")
        raise Problem(422, detail, title="Audit too large", jobs=n_jobs, limit=settings.max_audit_jobs,
                      errors=[{"field": f, "message": detail} for f in ("attacks", "betas", "epsilons", "seeds")])

    out = []
    for seed in body.seeds:
        for eps in body.epsilons:
            for spec, info in zip(body.attacks, infos):
                for beta in (betas if info.takes_beta else [None]):
                    try:
                        opts, _ = validate_job(spec.name, eps, beta, spec.params, seed, body.device, body.head)
                    except (ValidationError, ValueError) as exc:  # all checked above; kept as a safety net
                        raise invalid(f"attacks.{spec.name}", str(exc)) from None
                    out.append({"attack": spec.name, "params": spec.params, "beta": opts.beta, "epsilon": eps,
                                "seed": seed, "label": (spec.label or spec.name) + _beta_label(opts.beta)})
    return out, betas


def create_audit(session: Session, queue: JobQueue, team: Team, settings: Settings, body: AuditCreate,
                 idempotency_key: str | None = None) -> tuple[Audit, bool]:
    """Validates, then creates the audit and its jobs in one transaction and enqueues them;
    returns (audit, created). If the broker refuses a job, the audit and all its jobs are removed
    and the client gets 503 (jobs already enqueued find no row and are skipped by the worker).
    A retried request with the same Idempotency-Key returns the audit it made (a different body
    with that key is a 422), so a retry never fans out a second grid of jobs."""
    req_hash = job_service.request_hash(body)
    if idempotency_key and (existing := job_service.by_idempotency_key(session, Audit, team, idempotency_key)) is not None:
        job_service.replay(existing, req_hash)
        job_service.send_unsent(session, queue, Job.audit_id == existing.id)
        return existing, False
    planned, betas = plan(body, settings)
    job_service.check_encoder_usable(session, team, body.encoder)
    ds = job_service.resolve_dataset(session, team, settings, body.dataset)
    now = utcnow()
    audit = Audit(id=uuid.uuid4(), team_id=team.id, name=body.name, encoder_id=body.encoder, dataset=ds.ref,
                  dataset_id=ds.row.id if ds.row is not None else None,
                  attacks=[a.model_dump(mode="json") for a in body.attacks], epsilons=list(body.epsilons),
                  betas=betas, seeds=list(body.seeds), device=body.device, head=body.head, defences=body.defences,
                  precision=body.precision, idempotency_key=idempotency_key, request_hash=req_hash, created_at=now)
    session.add(audit)
    q = queue_for_device(body.device, settings)
    jobs = [Job(id=uuid.uuid4(), team_id=team.id, kind=JobKind.attack, status=JobStatus.queued, audit_id=audit.id,
                attack=p["attack"], encoder_id=body.encoder, dataset=ds.ref, dataset_id=audit.dataset_id,
                epsilon=p["epsilon"], beta=p["beta"], params=p["params"], seed=p["seed"], device=body.device,
                head=body.head, defences=body.defences, precision=body.precision, queue=q,
                max_attempts=settings.max_attempts, created_at=now)
            for p in planned]
    session.add_all(jobs)
    try:
        session.commit()
    except IntegrityError:  # a concurrent retry with the same key won the race
        session.rollback()
        existing = job_service.by_idempotency_key(session, Audit, team, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return job_service.replay(existing, req_hash), False
    try:
        for job in jobs:
            queue.enqueue_job(job.id, job.kind, job.queue)
    except Exception as exc:
        session.rollback()
        session.execute(delete(Job).where(Job.audit_id == audit.id))
        session.execute(delete(Audit).where(Audit.id == audit.id))
        session.commit()
        raise unavailable() from exc
    job_service.mark_sent(session, [job.id for job in jobs])
    return audit, True


# ------------------------------------------------------------------ reading
def jobs_of(session: Session, audit_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[Job]]:
    out: dict[uuid.UUID, list[Job]] = {i: [] for i in audit_ids}
    if audit_ids:
        q = select(Job).where(Job.audit_id.in_(audit_ids)).order_by(Job.created_at, Job.seed, Job.epsilon, Job.id)
        for j in session.scalars(q):
            out[j.audit_id].append(j)
    return out


def _counts(jobs: list[Job]) -> AuditJobCounts:
    c = {s: 0 for s in JobStatus}
    for j in jobs:
        c[JobStatus(j.status)] += 1
    return AuditJobCounts(total=len(jobs), **{str(k): v for k, v in c.items()})


def derive_status(jobs: list[Job]) -> str:
    c = _counts(jobs)
    if c.queued or c.running:
        return "running" if (c.running or c.succeeded or c.failed or c.cancelled) else "queued"
    if c.succeeded == c.total:
        return "succeeded"
    if c.succeeded == 0:
        return "cancelled" if c.cancelled == c.total else "failed"
    return "partial"


def _progress(jobs: list[Job]) -> AuditProgress:
    done = sum(1.0 if j.status in FINISHED else float(j.progress_fraction or 0.0) if j.status == JobStatus.running
               else 0.0 for j in jobs)
    return AuditProgress(fraction=done / len(jobs) if jobs else 1.0, jobs=_counts(jobs))


def _stat(values: list[float]) -> Stat | None:
    values = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Stat(mean=statistics.fmean(values), std=std, n=len(values))


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _add_removal(out: dict[str, dict[str, list[float]]], name: str, result: Any, n_poisons: Any) -> None:
    """One job's removal counts for one defence, when it applied and reported them (older jobs,
    or defences that did not apply, add nothing)."""
    if not isinstance(result, dict) or result.get("applicable") is False or not _is_num(result.get("poisons_removed")):
        return
    n = result.get("n_poisons") if _is_num(result.get("n_poisons")) else n_poisons
    if not _is_num(n):
        return
    r = out.setdefault(name, {"poisons": [], "fraction": [], "clean": []})
    r["poisons"].append(result["poisons_removed"])
    r["fraction"].append(result["poisons_removed"] / n if n > 0 else 0.0)
    if _is_num(result.get("clean_removed")):
        r["clean"].append(result["clean_removed"])


def _entry_index(audit: Audit) -> dict[tuple[str, str], int]:
    return {_params_key(a["name"], a.get("params") or {}): i for i, a in enumerate(audit.attacks)}


def _row_betas(audit: Audit, name: str) -> list[float | None]:
    info = CATALOGUE.get(name)
    return list(audit.betas or []) if info is not None and info.takes_beta else [None]


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a == b  # floats round-trip exactly through JSON and double precision columns


def build_table(audit: Audit, jobs: list[Job]) -> AuditTable:
    index = _entry_index(audit)
    epsilons = sorted(float(e) for e in audit.epsilons)
    # (entry, beta, epsilon) -> jobs
    grouped: dict[tuple[int, float | None, str], list[Job]] = {}
    for j in jobs:
        i = index.get(_params_key(j.attack or "", j.params or {}))
        if i is None:
            continue
        beta = next((b for b in _row_betas(audit, j.attack) if _same(b, j.beta)), j.beta)
        grouped.setdefault((i, beta, eps_key(j.epsilon)), []).append(j)

    rows: list[AuditRow] = []
    stages: list[str] = []
    for i, spec in enumerate(audit.attacks):
        for beta in _row_betas(audit, spec["name"]):
            cells = {}
            for eps in epsilons:
                cj = grouped.get((i, beta, eps_key(eps)), [])
                ok = [j for j in cj if j.status == JobStatus.succeeded and j.metrics]
                defs: dict[str, list[float]] = {}
                removed: dict[str, dict[str, list[float]]] = {}
                for j in ok:
                    d = j.metrics.get("defences")
                    if isinstance(d, dict):
                        for name, v in d.items():
                            if isinstance(v, dict) and _is_num(v.get("accuracy")):
                                defs.setdefault(name, []).append(v["accuracy"])
                            _add_removal(removed, name, v, j.metrics.get("n_poisons"))
                cells[eps_key(eps)] = AuditCell(
                    poisoned_accuracy=_stat([j.metrics.get("poisoned_accuracy") for j in ok]),
                    drop=_stat([j.metrics.get("drop") for j in ok]),
                    jobs=CellJobs(succeeded=len(ok),
                                  failed=sum(j.status in (JobStatus.failed, JobStatus.cancelled) for j in cj),
                                  pending=sum(j.status in (JobStatus.queued, JobStatus.running) for j in cj)),
                    defences={k: s for k, s in ((k, _stat(v)) for k, v in sorted(defs.items())) if s is not None},
                    n_poisons=_stat([j.metrics.get("n_poisons") for j in ok]),
                    removed={k: DefenceRemoval(poisons_removed=_stat(v["poisons"]), fraction=_stat(v["fraction"]),
                                               clean_removed=_stat(v["clean"]))
                             for k, v in sorted(removed.items())},
                )
            rows.append(AuditRow(attack=spec["name"], beta=beta, label=(spec.get("label") or spec["name"]) + _beta_label(beta),
                                 cells=cells))
            stages.append(CATALOGUE[spec["name"]].stage if spec["name"] in CATALOGUE else "")

    per_seed: dict[int, list[float]] = {}
    for j in jobs:
        if j.status == JobStatus.succeeded and j.metrics and isinstance(j.metrics.get("clean_accuracy"), (int, float)):
            per_seed.setdefault(j.seed, []).append(j.metrics["clean_accuracy"])
    clean = _stat([statistics.fmean(v) for v in per_seed.values()])

    summary = []
    for eps in epsilons:
        best: tuple[float, AuditRow] | None = None
        for row, stage in zip(rows, stages):
            cell = row.cells[eps_key(eps)]
            if stage == "parameters" or cell.drop is None:
                continue
            if best is None or cell.drop.mean > best[0]:
                best = (cell.drop.mean, row)
        summary.append(AuditWorst(epsilon=eps, worst_drop=best[0] if best else None,
                                  attack=best[1].attack if best else None, beta=best[1].beta if best else None))
    return AuditTable(clean_accuracy=clean, epsilons=epsilons, rows=rows, summary=summary)


def _label_of(audit: Audit, job: Job) -> str:
    i = _entry_index(audit).get(_params_key(job.attack or "", job.params or {}))
    base = (audit.attacks[i].get("label") or audit.attacks[i]["name"]) if i is not None else (job.attack or "")
    return base + _beta_label(job.beta)


def _summary_fields(audit: Audit, jobs: list[Job]) -> dict[str, Any]:
    status = derive_status(jobs)
    finished: datetime | None = None
    if jobs and all(j.status in FINISHED for j in jobs):
        finished = max((j.finished_at for j in jobs if j.finished_at is not None), default=None)
    return dict(id=audit.id, name=audit.name, status=status, encoder=audit.encoder_id, dataset=audit.dataset,
                attacks=[AuditAttackPublic(**a) for a in audit.attacks], epsilons=audit.epsilons, betas=audit.betas,
                seeds=audit.seeds, device=audit.device, head=audit.head, defences=audit.defences,
                precision=audit.precision, cancel_requested=audit.cancel_requested,
                created_at=audit.created_at, finished_at=finished, progress=_progress(jobs))


def audit_summary(audit: Audit, jobs: list[Job]) -> AuditSummary:
    return AuditSummary(**_summary_fields(audit, jobs))


def audit_public(audit: Audit, jobs: list[Job]) -> AuditPublic:
    return AuditPublic(
        **_summary_fields(audit, jobs), table=build_table(audit, jobs),
        jobs=[AuditJob(id=j.id, attack=j.attack, label=_label_of(audit, j), beta=j.beta, epsilon=j.epsilon,
                       seed=j.seed, status=j.status, error=j.error) for j in jobs],
    )


def view(session: Session, audit: Audit) -> AuditPublic:
    return audit_public(audit, jobs_of(session, [audit.id])[audit.id])


def report_inputs(session: Session, audit: Audit) -> tuple[dict, dict[str, bytes], dict]:
    """What :func:`app.report.render_audit_report` takes for ``audit``: its public view as JSON-ready
    dict, the drop-vs-epsilon figure (left out if it fails: a figure must never cost the page) and
    the encoder's identity (:func:`app.jobs.encoder_identity`, from the same jobs)."""
    from attacks.figures import drop_vs_epsilon

    jobs = jobs_of(session, [audit.id])[audit.id]
    public = audit_public(audit, jobs).model_dump(mode="json")
    try:
        figures = {"figure-drop-vs-epsilon.png": drop_vs_epsilon(public["table"])}
    except Exception:
        logging.getLogger("app").exception("audit %s: drop-vs-epsilon figure failed", audit.id)
        figures = {}
    return public, figures, job_service.encoder_identity(session, audit.team_id, audit.encoder_id, jobs)


def cancel(session: Session, audit: Audit) -> Audit:
    """Cancels every unfinished job of the audit (as ``POST /v1/jobs/{id}/cancel`` would); 409
    when all have finished already."""
    pending = [j for j in jobs_of(session, [audit.id])[audit.id] if j.status not in FINISHED]
    if not pending:
        raise Problem(409, f"audit {audit.id} has no unfinished job to cancel")
    audit.cancel_requested = True
    job_service.cancel_where(session, Job.audit_id == audit.id)
    session.commit()
    session.expire_all()
    return audit


def list_audits(session: Session, team: Team, *, limit: int, cursor: str | None) -> tuple[list[Audit], int, str | None]:
    conds = [Audit.team_id == team.id]
    count = session.scalar(select(func.count()).select_from(Audit).where(*conds)) or 0
    q = select(Audit).where(*conds)
    if cursor:
        ts, ident = job_service._decode_cursor(cursor)
        q = q.where(or_(Audit.created_at < ts, and_(Audit.created_at == ts, Audit.id < ident)))
    rows = list(session.scalars(q.order_by(Audit.created_at.desc(), Audit.id.desc()).limit(limit + 1)))
    next_cursor = job_service._encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], count, next_cursor
