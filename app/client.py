"""A small typed client of the poisonaudit API (httpx; no torch).

    from app.client import Client
    with Client("http://127.0.0.1:8000", api_key) as c:
        job = c.submit_job(encoder=enc_id, dataset="digits", attack="gradpc")
        job = c.wait_job(job.id, on_progress=lambda j: print(j.progress.fraction))
        c.download_poisoned_set(job.id, "poisoned.npz")
        enc = c.upload_encoder("encoder.safetensors", architecture="resnet18")  # or c.pretrain_encoder(...)
        audit = c.wait_audit(c.submit_audit(encoder=enc_id, dataset="digits", attacks=[{"name": "gradpc"}],
                                            epsilons=[0.03, 0.1]).id)
        print(audit.table.summary)

Responses are the server's own pydantic schemas (:mod:`app.schemas`). Every HTTP error
raises :class:`ApiError` carrying the problem details.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import httpx
from pydantic import ValidationError

from app.schemas import (
    AuditCreate, AuditPublic, AuditsPublic, DatasetPublic, DatasetsPublic, EncoderCreated, EncoderPublic, EncodersPublic,
    JobCreate, JobPublic, JobsPublic, PretrainCreate,
)

FINISHED = ("succeeded", "failed", "cancelled")
ENCODER_SETTLED = ("ready", "failed")
AUDIT_FINISHED = ("succeeded", "failed", "cancelled", "partial")


class ApiError(Exception):
    """An HTTP error answer; ``problem`` is its RFC 7807 body (or a stand-in built from the text)."""

    def __init__(self, status: int, problem: dict[str, Any], retry_after: float | None = None):
        self.status = status
        self.problem = problem
        self.retry_after = retry_after  # seconds, from a Retry-After header
        super().__init__(self.message())

    def message(self) -> str:
        p = self.problem
        lines = [f"HTTP {self.status} {p.get('title', '')}: {p.get('detail', '')}".rstrip(": ")]
        for err in p.get("errors") or []:
            lines.append(f"  {err.get('field')}: {err.get('message')}")
        if p.get("valid"):
            lines.append(f"  valid: {', '.join(map(str, p['valid']))}")
        return "\n".join(lines)


class WaitTimeout(TimeoutError):
    pass


class BadResponse(Exception):
    """A success status whose body is not what the API documents (a server fault, or not a
    poisonaudit server at that URL)."""


def _parse(model, r: httpx.Response):
    try:
        return model.model_validate(r.json())
    except (ValueError, ValidationError) as exc:  # JSONDecodeError is a ValueError
        raise BadResponse(f"{r.request.method} {r.request.url.path} answered HTTP {r.status_code} with a body "
                          f"that is not a {model.__name__}: {str(exc).splitlines()[0]}") from None


class Client:
    """``base_url`` and ``api_key`` default to POISONAUDIT_URL and POISONAUDIT_API_KEY."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None):
        base_url = base_url or os.environ.get("POISONAUDIT_URL") or "http://127.0.0.1:8000"
        api_key = api_key or os.environ.get("POISONAUDIT_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        r = self.http.request(method, path, **kw)
        if r.status_code >= 400:
            try:
                problem = r.json()
                if not isinstance(problem, dict):
                    raise ValueError
            except ValueError:
                problem = {"title": r.reason_phrase, "detail": r.text[:500]}
            try:
                retry_after = float(r.headers["retry-after"])
            except (KeyError, ValueError):
                retry_after = None
            raise ApiError(r.status_code, problem, retry_after)
        return r

    # ---------------------------------------------------------------- jobs
    def submit_job(self, *, idempotency_key: str | None = None, **body: Any) -> JobPublic:
        """Fields of :class:`app.schemas.JobCreate` (encoder, dataset, attack, epsilon, beta, params, ...)."""
        payload = JobCreate(**body).model_dump(mode="json", exclude_unset=True)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return _parse(JobPublic, self._request("POST", "/v1/jobs", json=payload, headers=headers))

    def get_job(self, job_id: uuid.UUID | str) -> JobPublic:
        return _parse(JobPublic, self._request("GET", f"/v1/jobs/{job_id}"))

    def list_jobs(self, **filters: Any) -> JobsPublic:
        return _parse(JobsPublic, self._request("GET", "/v1/jobs", params=filters))

    def cancel_job(self, job_id: uuid.UUID | str) -> JobPublic:
        return _parse(JobPublic, self._request("POST", f"/v1/jobs/{job_id}/cancel"))

    def wait_job(self, job_id: uuid.UUID | str, *, on_progress: Callable[[JobPublic], None] | None = None,
                 poll_s: float = 1.0, timeout_s: float | None = None) -> JobPublic:
        """Polls until the job has finished (succeeded, failed or cancelled); returns it."""
        return self._wait(lambda: self.get_job(job_id), FINISHED, on_progress, poll_s, timeout_s, f"job {job_id}")

    def download_poisoned_set(self, job_id: uuid.UUID | str, path: str | os.PathLike) -> Path:
        """Saves the poisoned set (npz). A presigned-URL redirect is followed without the API key."""
        r = self._request("GET", f"/v1/jobs/{job_id}/poisoned-set", follow_redirects=False)
        path = Path(path)
        if r.is_redirect:
            with httpx.stream("GET", r.headers["location"], timeout=self.http.timeout) as s:
                if s.status_code >= 400:
                    raise ApiError(s.status_code, {"title": "download failed", "detail": s.read().decode(errors="replace")[:500]})
                with open(path, "wb") as fh:
                    for chunk in s.iter_bytes():
                        fh.write(chunk)
        else:
            path.write_bytes(r.content)
        return path

    def job_report(self, job_id: uuid.UUID | str) -> str:
        """The job's HTML report (self-contained: figures inline)."""
        return self._request("GET", f"/v1/jobs/{job_id}/report").text

    # ---------------------------------------------------------------- encoders
    def upload_encoder(self, path: str | os.PathLike, *, architecture: str, name: str | None = None,
                       spec: dict[str, Any] | None = None) -> EncoderCreated:
        """Uploads a checkpoint (safetensors, or a torch.save'd state dict). ``spec``: further
        EncoderSpec fields (in_channels, width, preprocessing...). The answer's encoder is ``ready``
        once checked, ``validating`` while the check runs (see :meth:`wait_encoder`)."""
        data = {"architecture": architecture, **({"name": name} if name else {}),
                **({"spec": json.dumps(spec)} if spec else {})}
        with open(path, "rb") as fh:
            r = self._request("POST", "/v1/encoders", data=data, files={"file": (Path(path).name, fh)})
        return _parse(EncoderCreated, r)

    def pretrain_encoder(self, **body: Any) -> EncoderCreated:
        """Fields of :class:`app.schemas.PretrainCreate` (name, architecture, dataset, spec, config,
        seed, device): SimCLR pre-training as a job; the encoder is ``ready`` when it has succeeded."""
        payload = PretrainCreate(**body).model_dump(mode="json", exclude_unset=True)
        return _parse(EncoderCreated, self._request("POST", "/v1/encoders/pretrain", json=payload))

    def get_encoder(self, encoder_id: uuid.UUID | str) -> EncoderPublic:
        return _parse(EncoderPublic, self._request("GET", f"/v1/encoders/{encoder_id}"))

    def list_encoders(self) -> EncodersPublic:
        return _parse(EncodersPublic, self._request("GET", "/v1/encoders"))

    def wait_encoder(self, encoder_id: uuid.UUID | str, *, on_progress: Callable[[EncoderPublic], None] | None = None,
                     poll_s: float = 1.0, timeout_s: float | None = None) -> EncoderPublic:
        """Polls until the encoder is ``ready`` or ``failed`` (checked, or its pre-training ended)."""
        return self._wait(lambda: self.get_encoder(encoder_id), ENCODER_SETTLED, on_progress, poll_s, timeout_s,
                          f"encoder {encoder_id}")

    # ---------------------------------------------------------------- datasets
    def upload_dataset(self, path: str | os.PathLike, *, name: str | None = None) -> DatasetPublic:
        """Uploads an .npz (x, y[, x_test, y_test, classes]); pass the answer's ``id`` as a job's dataset."""
        with open(path, "rb") as fh:
            r = self._request("POST", "/v1/datasets", data={"name": name} if name else {},
                              files={"file": (Path(path).name, fh)})
        return _parse(DatasetPublic, r)

    def get_dataset(self, dataset_id: str) -> DatasetPublic:
        return _parse(DatasetPublic, self._request("GET", f"/v1/datasets/{dataset_id}"))

    def list_datasets(self) -> DatasetsPublic:
        return _parse(DatasetsPublic, self._request("GET", "/v1/datasets"))

    # ---------------------------------------------------------------- audits
    def submit_audit(self, *, idempotency_key: str | None = None, **body: Any) -> AuditPublic:
        """Fields of :class:`app.schemas.AuditCreate` (encoder, dataset, attacks, epsilons, betas, seeds, ...)."""
        payload = AuditCreate(**body).model_dump(mode="json", exclude_unset=True)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return _parse(AuditPublic, self._request("POST", "/v1/audits", json=payload, headers=headers))

    def get_audit(self, audit_id: uuid.UUID | str) -> AuditPublic:
        return _parse(AuditPublic, self._request("GET", f"/v1/audits/{audit_id}"))

    def list_audits(self, **params: Any) -> AuditsPublic:
        return _parse(AuditsPublic, self._request("GET", "/v1/audits", params=params))

    def cancel_audit(self, audit_id: uuid.UUID | str) -> AuditPublic:
        return _parse(AuditPublic, self._request("POST", f"/v1/audits/{audit_id}/cancel"))

    def wait_audit(self, audit_id: uuid.UUID | str, *, on_progress: Callable[[AuditPublic], None] | None = None,
                   poll_s: float = 2.0, timeout_s: float | None = None) -> AuditPublic:
        """Polls until every job of the audit has finished; returns the audit with its table."""
        return self._wait(lambda: self.get_audit(audit_id), AUDIT_FINISHED, on_progress, poll_s, timeout_s,
                          f"audit {audit_id}")

    def audit_report(self, audit_id: uuid.UUID | str) -> str:
        """The audit's HTML report (self-contained)."""
        return self._request("GET", f"/v1/audits/{audit_id}/report").text

    @staticmethod
    def _wait(get, done, on_progress, poll_s, timeout_s, what, max_transient: int = 30):
        """Polls ``get``; a transient answer (502/503/504, or the server unreachable for a moment)
        is retried after its Retry-After (or poll_s), up to ``max_transient`` times in a row."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        transient = 0
        while True:
            try:
                obj = get()
            except (ApiError, httpx.TransportError) as exc:
                status = getattr(exc, "status", None)
                if (isinstance(exc, ApiError) and status not in (502, 503, 504)) or transient >= max_transient:
                    raise
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                transient += 1
                delay = poll_s
                retry_after = getattr(exc, "retry_after", None)
                if retry_after is not None and 0 < retry_after <= 60:
                    delay = float(retry_after)
                time.sleep(delay)
                continue
            transient = 0
            if on_progress is not None:
                on_progress(obj)
            if obj.status in done:
                return obj
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"{what} still {obj.status} after {timeout_s}s")
            time.sleep(poll_s)
