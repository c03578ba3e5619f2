"""The steps the tasks are made of, each small enough to test alone."""

from __future__ import annotations

import logging
import time
import uuid
from typing import NamedTuple

from sqlalchemy import update

from app.db import new_session, utcnow
from app.models import Dataset, Encoder, EncoderStatus, JobStatus
from worker.resources import (
    check_uploaded_encoder, engine_cache_dir, feature_cache, load_job_dataset, load_job_encoder, pull_engine_cache,
    push_engine_cache, stage_cache, store_encoder_dir,
)
from worker.runner import JobRun

log = logging.getLogger("worker")


def load_inputs(run: JobRun):
    with new_session() as s:
        enc = s.get(Encoder, run.job.encoder_id) if run.job.encoder_id else None
        row = s.get(Dataset, run.job.dataset_id) if run.job.dataset_id else None
    if enc is None or enc.status != EncoderStatus.ready:
        raise ValueError(f"encoder {run.job.encoder_id} is missing or not ready")
    run.progress("loading", 0.0)
    encoder = load_job_encoder(enc, run.store, run.settings)
    dataset = load_job_dataset(run.job.dataset, row, run.store, run.settings)
    log.info("encoder %s, dataset %s", enc.spec.get("arch"), getattr(dataset, "name", run.job.dataset))
    run.progress("loading", 1.0)
    return encoder, dataset


class EngineOutput(NamedTuple):
    """What run_engine hands to store_result: the engine's JobResult and the PNG figures drawn from it."""

    result: object
    figures: dict[str, bytes]


def run_engine(run: JobRun, encoder, dataset) -> EngineOutput:
    from attacks.pipeline import run_job

    job = run.job
    before = pull_engine_cache(run.store, run.settings)
    result = run_job(
        encoder=encoder, dataset=dataset, attack=job.attack, epsilon=job.epsilon, beta=job.beta,
        params=job.params or {}, seed=job.seed, device=job.device, head=job.head,
        cache=feature_cache(run.store, run.settings), cache_dir=engine_cache_dir(run.settings),
        stage_cache=stage_cache(run.store, run.settings), progress=run.progress, defences=job.defences,
        amp=job.precision == "bf16",
    )
    push_engine_cache(run.store, run.settings, before)
    return EngineOutput(result, job_figures(result, dataset))


def job_figures(result, dataset) -> dict[str, bytes]:
    """For a job with poisons in pixel space: the examples figure and the L_inf histogram.
    A figure that cannot be drawn is logged and left out; the job's result stands."""
    if result.poisons is None or len(result.poisons) == 0:
        return {}
    try:
        from attacks import figures

        x = dataset.x_train
        lo, hi = float(x.min()), float(x.max())
        p = result.poisons
        return {
            "figure-examples.png": figures.examples_figure(x[p.base_index], p.x, clean_range=(lo, hi)),
            "figure-linf-histogram.png": figures.linf_histogram(p.x, (lo, hi), clean=x[p.base_index]),
        }
    except Exception:
        log.exception("could not draw the figures")
        return {}


def store_result(run: JobRun, out: EngineOutput) -> None:
    result, figures = out
    arts = []
    if result.poisons is not None:
        path = result.poisons.save_npz(run.tmp / "poisoned_set.npz")
        arts.append(run.put_artifact("poisoned_set.npz", path, "application/octet-stream"))
    for name, png in figures.items():
        path = run.tmp / name
        path.write_bytes(png)
        arts.append(run.put_artifact(name, path, "image/png"))
    arts.append(run.put_artifact("result.json", run.write_json("result.json", result.metrics), "application/json"))
    run.finish(JobStatus.succeeded, metrics=result.metrics, artifacts=arts, device_used=str(result.metrics.get("device")))


def pretrain(run: JobRun):
    from attacks.encoders import EncoderSpec
    from attacks.pretrain import SimCLRConfig, pretrain_simclr

    with new_session() as s:
        enc = s.get(Encoder, run.job.encoder_id)
        row = s.get(Dataset, run.job.dataset_id) if run.job.dataset_id else None
    spec = EncoderSpec.from_json(enc.spec)
    config = SimCLRConfig(**{**(run.job.params or {}), "seed": run.job.seed, "device": run.job.device})
    dataset = load_job_dataset(run.job.dataset, row, run.store, run.settings)
    t0 = time.perf_counter()
    encoder = pretrain_simclr(spec, dataset.x_train, config, run.progress)
    from attacks.encoders import mark_pretrained_on

    mark_pretrained_on(encoder, dataset)
    return encoder, time.perf_counter() - t0


def store_pretrained(run: JobRun, encoder, seconds: float) -> None:
    import torch
    from attacks.encoders import save_encoder

    with new_session() as s:
        enc = s.get(Encoder, run.job.encoder_id)
    meta = store_encoder_dir(enc, save_encoder(encoder, run.tmp / "encoder"), run.store)
    weights = run.tmp / "encoder" / "encoder.safetensors"
    from app.storage import file_digest

    sha, size = file_digest(weights)
    device = run.job.device if run.job.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    metrics = {"encoder_id": str(enc.id), "spec": meta["spec"], "fingerprint": meta["fingerprint"],
               "pretrain_seconds": seconds, "config": run.job.params, "device": device}
    arts = [run.put_artifact("result.json", run.write_json("result.json", metrics), "application/json")]

    def mark_ready(s):
        s.execute(update(Encoder).where(Encoder.id == enc.id).values(
            status=EncoderStatus.ready, error=None, spec=meta["spec"], sha256=sha, size=size,
            weights_format="safetensors", updated_at=utcnow()))

    run.finish(JobStatus.succeeded, metrics=metrics, artifacts=arts, device_used=device, also=mark_ready)


def check_encoder(encoder_id: str) -> str:
    from app.storage import get_store
    from app.settings import get_settings

    with new_session() as s:
        enc = s.get(Encoder, uuid.UUID(encoder_id))
    if enc is None or enc.status != EncoderStatus.validating:
        return "skipped"
    try:
        meta = check_uploaded_encoder(enc, get_store(), get_settings())
        values = dict(status=EncoderStatus.ready, error=None, spec=meta["spec"])
    except Exception as exc:  # EncoderError, safetensors/torch load errors: the reason goes to the client
        log.info("encoder %s refused: %s", encoder_id, exc)
        values = dict(status=EncoderStatus.failed, error=str(exc) or type(exc).__name__)
    with new_session() as s:
        s.execute(update(Encoder).where(Encoder.id == enc.id, Encoder.status == EncoderStatus.validating)
                  .values(**values, updated_at=utcnow()))
        s.commit()
    return str(values["status"])
