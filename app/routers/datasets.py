"""Datasets: built-in ones, server-side roots registered by configuration, and uploaded npz archives."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile
from sqlalchemy import select

from app import datasets as service
from app.deps import DatasetRefDep, KeyFirstRoute, SessionDep, SettingsDep, StoreDep, TeamDep
from app.models import Dataset
from app.problems import Problem, invalid, problem_responses
from app.schemas import DatasetPublic, DatasetsPublic, SafeStr
from app.storage import dataset_key

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], route_class=KeyFirstRoute, responses=problem_responses(401, 404, 413, 422, 503))


def dataset_public(r: service.ResolvedDataset) -> DatasetPublic:
    out = DatasetPublic(id=r.ref, name=r.name, kind=r.kind, loader=r.loader, description=r.description)
    if r.row is not None:
        out.sha256, out.size, out.summary, out.created_at = r.row.sha256, r.row.size, r.row.summary, r.row.created_at
    return out


def _uploaded(row: Dataset) -> service.ResolvedDataset:
    return service.ResolvedDataset(str(row.id), "upload", "npz", row.name, row=row)


@router.post("", status_code=201, response_model=DatasetPublic, responses=problem_responses(descriptions={
    400: "A multipart body that cannot be parsed",
    413: "The upload is over POISONAUDIT_MAX_DATASET_BYTES (by Content-Length, or while it streams in)",
    422: "Not a dataset the service accepts, with the reason (named field)",
}))
def create_dataset(
    file: Annotated[UploadFile, File(description="An .npz with x, y[, x_test, y_test, classes]")],
    response: Response, session: SessionDep, team: TeamDep, store: StoreDep, settings: SettingsDep,
    name: Annotated[SafeStr | None, Form(max_length=200)] = None,
) -> DatasetPublic:
    """Upload a dataset as an npz archive."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "upload.npz")
        with open(path, "wb") as out:
            shutil.copyfileobj(file.file, out, 1 << 20)
        size = os.path.getsize(path)
        if size > settings.max_dataset_bytes:
            raise Problem(413, f"dataset of {size} bytes exceeds the limit of {settings.max_dataset_bytes}")
        try:
            summary = service.inspect_npz(path, settings)
        except service.DatasetRefError as exc:
            raise invalid("file", str(exc)) from None
        row = Dataset(team_id=team.id, name=name or "upload", key="", sha256="", size=0, summary=summary)
        session.add(row)
        session.flush()
        stored = store.put_file(dataset_key(team.id, row.id), path)
    row.key, row.sha256, row.size = stored.key, stored.sha256, stored.size
    session.commit()
    response.headers["Location"] = f"/v1/datasets/{row.id}"
    return dataset_public(_uploaded(row))


@router.get("", response_model=DatasetsPublic)
def list_datasets(session: SessionDep, team: TeamDep, settings: SettingsDep) -> DatasetsPublic:
    """Built-in and server-side datasets, then yours (newest first)."""
    shared = [dataset_public(r) for r in service.list_shared(settings)]
    rows = session.scalars(select(Dataset).where(Dataset.team_id == team.id).order_by(Dataset.created_at.desc()))
    data = shared + [dataset_public(_uploaded(r)) for r in rows]
    return DatasetsPublic(data=data, count=len(data))


@router.get("/{dataset_id}", response_model=DatasetPublic)
def read_dataset(dataset: DatasetRefDep) -> DatasetPublic:
    """One dataset, by id or by built-in / server-side name."""
    return dataset_public(dataset)
