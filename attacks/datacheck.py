"""Bounded-memory checks of ``.npz`` dataset archives (numpy and zipfile only: no torch).

Uploaded archives are untrusted: a member's ``.npy`` header may declare a shape
its data does not hold, a few hundred compressed bytes may inflate to gigabytes,
and the pixels and labels may be anything. Two users share this module:

* the API (:func:`check_npz`) validates an upload's *contents* before storing it,
  streaming every member in chunks of :data:`CHUNK_BYTES`, so its memory does
  not grow with the archive;
* the engine's loader (``attacks.data.load_npz``) opens members with
  :func:`npz_members` and reads them with :func:`read_member`, which allocates
  only what the member's (capped) declared size and its header agree on.

Decompressed bytes are capped twice: the sum of the sizes the zip declares for
its members must be within ``DatasetLimits.max_bytes`` before anything is read,
and every member is read counting the bytes that actually come out (zipfile
stops at the declared size and checks the CRC, so a size that lies is an error,
never more memory).

Error messages (:class:`NpzCheckError`) name the array and the problem, never a
file path; callers add where the file came from.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from os import PathLike
from typing import Any, Final

import numpy as np

__all__ = [
    "CHUNK_BYTES",
    "FLOAT_RANGE_TOLERANCE",
    "MAX_CLASSES",
    "MAX_COMPRESSION_RATIO",
    "MAX_DECOMPRESSED_BYTES",
    "MAX_ELEMENTS",
    "MAX_IMAGE_SIDE",
    "NPZ_KEYS",
    "DatasetLimits",
    "Member",
    "NpzCheckError",
    "check_npz",
    "image_layout",
    "iter_member",
    "npz_members",
    "read_member",
]

#: Most bytes an archive's members may hold once decompressed (1 GiB).
MAX_DECOMPRESSED_BYTES: Final[int] = 2**30
#: Most classes a dataset may have (labels 0 .. MAX_CLASSES - 1).
MAX_CLASSES: Final[int] = 1000
#: Largest image height or width.
MAX_IMAGE_SIDE: Final[int] = 1024
#: Most pixel values (N*C*H*W over train and test): 2**30 (4 GiB as float32).
MAX_ELEMENTS: Final[int] = 2**30
#: How far float images may stray outside ``[0, 1]`` (the loader keeps values as stored).
FLOAT_RANGE_TOLERANCE: Final[float] = 0.1
#: Longest class name in the ``classes`` array.
MAX_CLASS_NAME_CHARS: Final[int] = 256
#: Most bytes decompressed per byte of archive, for archives over RATIO_FLOOR_BYTES decompressed: real
#: image data compresses far less (MNIST about 7:1); 2**28 zeros in 262 KB is 1,000:1.
MAX_COMPRESSION_RATIO: Final[int] = 200
RATIO_FLOOR_BYTES: Final[int] = 64 * 2**20
#: Bytes read from a member at a time.
CHUNK_BYTES: Final[int] = 1 << 20
#: The keys an archive may hold (others are ignored, but count towards the byte cap).
NPZ_KEYS: Final[tuple[str, ...]] = ("x", "y", "x_test", "y_test", "classes")

_NPY_MAGIC: Final[bytes] = b"\x93NUMPY"
_MAX_HEADER: Final[int] = 10_000


class NpzCheckError(ValueError):
    """An archive is refused; the message names the array and the problem (no file paths)."""


@dataclass(frozen=True)
class DatasetLimits:
    """Bounds on a dataset's contents (the defaults are the module constants)."""

    max_bytes: int = MAX_DECOMPRESSED_BYTES
    max_classes: int = MAX_CLASSES
    max_side: int = MAX_IMAGE_SIDE
    max_elements: int = MAX_ELEMENTS
    max_ratio: int = MAX_COMPRESSION_RATIO

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_classes", "max_side", "max_elements", "max_ratio"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DatasetLimits.{name} must be a positive int, got {v!r}")
        if self.max_classes < 2:
            raise ValueError(f"DatasetLimits.max_classes must be >= 2, got {self.max_classes}")


@dataclass(frozen=True)
class Member:
    """One array of an archive, as its header and the zip's declared size agree."""

    key: str
    name: str  # the zip member's name
    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype
    offset: int  # bytes of .npy header before the data
    nbytes: int


# --------------------------------------------------------------------------- archives and members


def _open(path: str | PathLike[str]) -> zipfile.ZipFile:
    with open(path, "rb") as fh:
        magic = fh.read(len(_NPY_MAGIC))
    if magic == _NPY_MAGIC:
        raise NpzCheckError("holds a single array (.npy); expected an .npz archive with keys 'x' and 'y'")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise NpzCheckError(f"not a valid .npz archive (not a zip file: {exc})") from None


def _read_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    fmt = np.lib.format
    try:
        with zf.open(info) as fp:
            version = fmt.read_magic(fp)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(fp, max_header_size=_MAX_HEADER)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(fp, max_header_size=_MAX_HEADER)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = fp.tell()
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, RuntimeError, NotImplementedError, SyntaxError) as exc:
        raise NpzCheckError(f"array {key!r} has an invalid .npy header: {exc}") from None
    return tuple(int(d) for d in shape), bool(fortran), np.dtype(dtype), int(offset)


def _archive_size(zf: zipfile.ZipFile) -> int:
    fp = zf.fp
    if fp is None:  # pragma: no cover - only after close()
        return 0
    pos = fp.tell()
    try:
        return fp.seek(0, 2)
    finally:
        fp.seek(pos)


def npz_members(zf: zipfile.ZipFile, limits: DatasetLimits | None = None) -> dict[str, Member]:
    """The archive's :data:`NPZ_KEYS` members, from headers only (no data is read).

    Checks: the sum of the zip's declared uncompressed sizes against
    ``limits.max_bytes`` and, past :data:`RATIO_FLOOR_BYTES`, against ``limits.max_ratio``
    times the archive's own size (a zip bomb); ``x`` and ``y`` present; no encrypted member; every
    header readable, no object dtype, no negative dimension, and the bytes the
    header's shape and dtype need equal to the bytes the member holds.
    """
    limits = limits or DatasetLimits()
    infos = zf.infolist()
    declared = sum(i.file_size for i in infos)
    if declared > limits.max_bytes:
        raise NpzCheckError(
            f"the archive's members hold {declared:,} bytes once decompressed, over the limit of {limits.max_bytes:,}"
        )
    packed = _archive_size(zf)
    if declared > RATIO_FLOOR_BYTES and declared > limits.max_ratio * packed:
        raise NpzCheckError(
            f"the archive's members hold {declared:,} bytes once decompressed from {packed:,}: more than "
            f"{limits.max_ratio}:1 is refused as a zip bomb (real image data compresses far less)"
        )
    by_name = {i.filename: i for i in infos}
    keys = {n.removesuffix(".npy"): n for n in by_name}
    missing = [k for k in ("x", "y") if k not in keys]
    if missing:
        raise NpzCheckError(
            f"missing key(s) {missing}; found {sorted(keys)[:20]}; expected x, y[, x_test, y_test, classes]"
        )
    out: dict[str, Member] = {}
    for key in NPZ_KEYS:
        if key not in keys:
            continue
        info = by_name[keys[key]]
        if info.flag_bits & 0x1:
            raise NpzCheckError(f"array {key!r} is encrypted")
        shape, fortran, dtype, offset = _read_header(zf, info, key)
        if dtype.hasobject:
            raise NpzCheckError(
                f"array {key!r} holds Python objects (dtype {dtype}); refused because archives are "
                "read with allow_pickle=False. Store plain numeric arrays."
            )
        if any(d < 0 for d in shape):
            raise NpzCheckError(f"array {key!r} declares a negative dimension: shape {shape}")
        nbytes = math.prod(shape) * dtype.itemsize
        held = info.file_size - offset
        if nbytes != held:
            raise NpzCheckError(
                f"array {key!r} declares shape {shape} of {dtype} ({nbytes:,} bytes) but holds {max(held, 0):,} "
                "bytes of data"
            )
        out[key] = Member(key, info.filename, shape, fortran, dtype, offset, nbytes)
    return out


def iter_member(zf: zipfile.ZipFile, m: Member, chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    """The member's data as 1-D arrays of ``m.dtype``, in file order, at most ``chunk_bytes`` each.

    Counts the bytes that come out of the decompressor: fewer or more than the
    header declares is an error, as is a CRC mismatch.
    """
    itemsize = max(1, m.dtype.itemsize)
    step = max(1, chunk_bytes // itemsize) * itemsize
    total = 0
    try:
        with zf.open(m.name) as fp:
            if len(fp.read(m.offset)) != m.offset:
                raise NpzCheckError(f"array {m.key!r} ends inside its header")
            while total < m.nbytes:
                want = min(step, m.nbytes - total)
                data = fp.read(want)
                if len(data) != want:
                    raise NpzCheckError(f"array {m.key!r} ends after {total + len(data):,} of {m.nbytes:,} bytes")
                total += len(data)
                yield np.frombuffer(data, dtype=m.dtype)
            if fp.read(1):
                raise NpzCheckError(f"array {m.key!r} holds more than the {m.nbytes:,} bytes its header declares")
    except NpzCheckError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, RuntimeError, NotImplementedError) as exc:
        raise NpzCheckError(f"cannot read array {m.key!r}: {exc}") from None


def read_member(zf: zipfile.ZipFile, m: Member) -> np.ndarray:
    """The whole array. Allocates ``m.nbytes`` (which :func:`npz_members` checked against the byte cap)."""
    out = np.empty(m.nbytes, dtype=np.uint8)
    pos = 0
    for chunk in iter_member(zf, m):
        raw = chunk.view(np.uint8)
        out[pos : pos + len(raw)] = raw
        pos += len(raw)
    return out.view(m.dtype).reshape(m.shape, order="F" if m.fortran_order else "C")


# --------------------------------------------------------------------------- contents


def image_layout(key: str, shape: tuple[int, ...], dtype: np.dtype, limits: DatasetLimits) -> tuple[int, int, int, int]:
    """``(N, C, H, W)`` of an image array laid out (N, H, W), (N, C, H, W) or (N, H, W, C), C in {1, 3}."""
    if dtype.kind not in "uif":
        raise NpzCheckError(f"{key!r} has dtype {dtype}; expected uint8 (0..255) or float ([0, 1])")
    if len(shape) == 3:
        n, c, h, w = shape[0], 1, shape[1], shape[2]
    elif len(shape) == 4:
        at = [axis for axis in (1, 3) if shape[axis] in (1, 3)]
        if not at:
            raise NpzCheckError(
                f"{key!r} has shape {shape}; no channel axis: expected 1 or 3 channels at axis 1 "
                "(N, C, H, W) or axis 3 (N, H, W, C)"
            )
        if len(at) == 2:
            raise NpzCheckError(
                f"{key!r} has shape {shape}; ambiguous layout: both axis 1 and axis 3 could be channels. "
                "Store (N, H, W) for greyscale or use images wider than 3 pixels"
            )
        n, c, h, w = (shape[0], shape[1], shape[2], shape[3]) if at == [1] else (shape[0], shape[3], shape[1], shape[2])
    else:
        raise NpzCheckError(f"{key!r} must be (N, H, W), (N, C, H, W) or (N, H, W, C); got shape {shape}")
    if n == 0:
        raise NpzCheckError(f"{key!r} has shape {shape}: no images")
    if h == 0 or w == 0:
        raise NpzCheckError(f"{key!r} has shape {shape}: images of zero height or width")
    if h > limits.max_side or w > limits.max_side:
        raise NpzCheckError(f"{key!r} holds {h}x{w} images; at most {limits.max_side} pixels a side are supported")
    return n, c, h, w


def _check_pixels(zf: zipfile.ZipFile, m: Member, image_size: int) -> None:
    """Integers in 0..255, floats finite and in [0, 1] (+- FLOAT_RANGE_TOLERANCE), chunk by chunk."""
    seen = 0
    kind = m.dtype.kind
    where = (lambda i: f"; first in image {(seen + i) // image_size}") if not m.fortran_order else (lambda i: "")
    for chunk in iter_member(zf, m):
        if m.dtype == np.uint8 or len(chunk) == 0:
            pass
        elif kind in "ui":
            lo, hi = int(chunk.min()), int(chunk.max())
            if lo < 0 or hi > 255:
                bad = int(np.flatnonzero((chunk < 0) | (chunk > 255))[0])
                raise NpzCheckError(
                    f"{m.key!r} is {m.dtype} with values outside 0..255 (e.g. {int(chunk[bad])}{where(bad)}); "
                    "integer images must be 8-bit 0..255"
                )
        else:
            finite = np.isfinite(chunk)
            if not finite.all():
                bad = int(np.flatnonzero(~finite)[0])
                raise NpzCheckError(f"{m.key!r} holds NaN or infinite values{where(bad)}")
            lo, hi = float(chunk.min()), float(chunk.max())
            if lo < -FLOAT_RANGE_TOLERANCE or hi > 1 + FLOAT_RANGE_TOLERANCE:
                tol = FLOAT_RANGE_TOLERANCE
                bad = int(np.flatnonzero((chunk < -tol) | (chunk > 1 + tol))[0])
                raise NpzCheckError(
                    f"{m.key!r} is float with values outside [0, 1] (e.g. {float(chunk[bad]):g}{where(bad)}); "
                    "float images must lie in [0, 1] (store uint8 0..255, or divide by 255)"
                )
        seen += len(chunk)


def _label_counts(zf: zipfile.ZipFile, m: Member, n: int, x_key: str, limits: DatasetLimits) -> np.ndarray:
    """Per-class counts (length ``limits.max_classes``) of integer labels in [0, max_classes)."""
    if len(m.shape) != 1:
        raise NpzCheckError(f"{m.key!r} must be 1-D (N,); got shape {m.shape}")
    if m.dtype.kind not in "ui":
        raise NpzCheckError(f"{m.key!r} has dtype {m.dtype}; labels must be integers")
    if m.shape[0] != n:
        raise NpzCheckError(f"{x_key!r} has {n} images but {m.key!r} has {m.shape[0]} labels")
    counts = np.zeros(limits.max_classes, dtype=np.int64)
    for chunk in iter_member(zf, m):
        if len(chunk) == 0:
            continue
        lo, hi = int(chunk.min()), int(chunk.max())
        if lo < 0:
            raise NpzCheckError(f"{m.key!r} holds negative labels (min {lo}); labels must be 0, 1, ...")
        if hi >= limits.max_classes:
            raise NpzCheckError(
                f"{m.key!r} holds label {hi}; at most {limits.max_classes:,} classes are supported "
                f"(labels 0..{limits.max_classes - 1})"
            )
        counts += np.bincount(chunk.astype(np.int64, copy=False), minlength=limits.max_classes)
    return counts


def _class_names(zf: zipfile.ZipFile, m: Member, num_classes: int, limits: DatasetLimits) -> list[str]:
    if len(m.shape) != 1 or m.dtype.kind != "U":
        raise NpzCheckError(f"'classes' must be a 1-D string array; got {m.dtype} of shape {m.shape}")
    if m.shape[0] > limits.max_classes:
        raise NpzCheckError(f"'classes' names {m.shape[0]:,} classes; at most {limits.max_classes:,} are supported")
    if m.dtype.itemsize > 4 * MAX_CLASS_NAME_CHARS:
        raise NpzCheckError(f"'classes' holds names of up to {m.dtype.itemsize // 4:,} characters; "
                            f"at most {MAX_CLASS_NAME_CHARS} are supported")
    if m.shape[0] < num_classes:
        raise NpzCheckError(f"'classes' names {m.shape[0]} classes but the labels go up to {num_classes - 1}")
    return [str(c) for c in read_member(zf, m)]


def check_npz(path: str | PathLike[str], limits: DatasetLimits | None = None) -> dict[str, Any]:
    """Validate an ``.npz`` dataset's layout *and contents* with bounded memory; returns a summary.

    What ``attacks.data.load_npz`` accepts, it accepts: ``x`` (N, H, W) /
    (N, C, H, W) / (N, H, W, C) with C in {1, 3}, N >= 1, 1 <= H, W <= max_side,
    uint8 (or integers in 0..255) or finite floats in [0, 1]; ``y`` (N,) integer
    labels in [0, max_classes) with at least 2 classes; optional ``x_test`` /
    ``y_test`` (same image shape) and ``classes``. Without a test split, the
    seeded 80/20 split must put at least one image in the test set.

    Raises:
        NpzCheckError: naming the array and the problem.
    """
    limits = limits or DatasetLimits()
    with _open(path) as zf:
        ms = npz_members(zf, limits)
        if ("x_test" in ms) != ("y_test" in ms):
            raise NpzCheckError(
                f"'x_test' and 'y_test' come together; found only {sorted(set(ms) & {'x_test', 'y_test'})}"
            )
        n, c, h, w = image_layout("x", ms["x"].shape, ms["x"].dtype, limits)
        total = n * c * h * w
        n_test = 0
        if "x_test" in ms:
            n_test, ct, ht, wt = image_layout("x_test", ms["x_test"].shape, ms["x_test"].dtype, limits)
            if (ct, ht, wt) != (c, h, w):
                raise NpzCheckError(
                    f"'x' images are (C, H, W) = {(c, h, w)} but 'x_test' images are {(ct, ht, wt)}"
                )
            total += n_test * c * h * w
        if total > limits.max_elements:
            raise NpzCheckError(f"{total:,} pixel values exceed the limit of {limits.max_elements:,}")
        # Labels first: they are small, and most bad uploads fail there.
        counts = _label_counts(zf, ms["y"], n, "x", limits)
        test_counts = _label_counts(zf, ms["y_test"], n_test, "x_test", limits) if "y_test" in ms else None
        _check_pixels(zf, ms["x"], c * h * w)
        if "x_test" in ms:
            _check_pixels(zf, ms["x_test"], c * h * w)
        present = np.flatnonzero(counts)
        if len(present) < 2:
            raise NpzCheckError(f"'y' holds a single class ({int(present[0])}); a classifier needs at least 2")
        top = int(present[-1])
        if test_counts is not None:
            top = max(top, int(np.flatnonzero(test_counts)[-1]))
        elif int(np.floor(counts * 0.2 + 0.5).sum()) == 0:
            raise NpzCheckError(
                f"only {n} images: too few for an 80/20 split (a class needs 3 images to put one in the test set); "
                "add images or provide an explicit test set"
            )
        num_classes = top + 1
        classes = _class_names(zf, ms["classes"], num_classes, limits) if "classes" in ms else None
        if classes is not None:
            num_classes = len(classes)
        decompressed = sum(i.file_size for i in zf.infolist())
    return {
        "arrays": {k: {"shape": list(m.shape), "dtype": str(m.dtype)} for k, m in ms.items()},
        "n": n + n_test,
        "has_test_split": "x_test" in ms,
        "image_shape": [c, h, w],
        "num_classes": num_classes,
        "decompressed_bytes": decompressed,
    }
