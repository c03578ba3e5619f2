"""Checkpoint inspection without torch: the API refuses what is neither safetensors nor a
weights-only ``torch.save`` state dict before storing it. Whether the keys fit the
architecture is checked by a worker (``worker.tasks.check_encoder``), which has torch.

Safetensors: an 8-byte little-endian header length, a JSON header of tensor names,
dtypes, shapes and byte ranges, then the data. ``torch.save`` (zip format): a zip
holding ``<name>/data.pkl``; its pickle may reference only the globals torch's
``weights_only`` loader allows, and it is walked with stubs, never executed.

The walk is iterative and linear in the pickle's size: every container is visited once (a
pickle's memo can share one list between many places, or make it contain itself), every
object built or visited is charged to a budget of ``MAX_PICKLE_NODES``, and tensor names are
at most ``MAX_NAME_CHARS`` long (which also bounds nesting). Whatever goes wrong is a
:class:`CheckpointError` (a 422 in the API), never a ``RecursionError``.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

MAX_HEADER = 100 * 2**20
MAX_PICKLE_NODES = 1_000_000  # objects built by stubs + container entries walked (a ResNet-50 state dict: 3,735)
MAX_NAME_CHARS = 1024  # a tensor's dotted name (state-dict keys are tens of characters)
MAX_TENSOR_DIMS = 64
_ST_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
              "U16", "U32", "U64", "C64"}


class CheckpointError(ValueError):
    """The file is not a checkpoint the service accepts; the message says why."""


@dataclass(frozen=True)
class CheckpointInfo:
    format: str  # safetensors | torch
    tensors: dict[str, tuple[int, ...]]


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise CheckpointError("file too short to be a checkpoint")
    if head[:4] == b"PK\x03\x04":
        return CheckpointInfo("torch", _inspect_torch_zip(path))
    # Safetensors first: its header length is little-endian, so its first byte may well be 0x80
    # (a ResNet-50's is 0x7080), the byte a legacy pickle starts with too.
    if not _looks_like_safetensors(path, head) and head[:1] == b"\x80":
        raise CheckpointError(
            "legacy (non-zip) torch pickle: re-save it with torch.save (zip format) as a state dict, or as safetensors")
    return CheckpointInfo("safetensors", _inspect_safetensors(path))


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
    """An 8-byte little-endian header length that fits the file, then a JSON header opening with '{'."""
    (n,) = struct.unpack("<Q", head)
    if n < 2 or n > MAX_HEADER or n > path.stat().st_size - 8:
        return False
    with open(path, "rb") as f:
        f.seek(8)
        return f.read(1) == b"{"


def _inspect_safetensors(path: Path) -> dict[str, tuple[int, ...]]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n < 2 or n > MAX_HEADER or n > size - 8:
            raise CheckpointError("neither safetensors (bad header length) nor a torch.save zip archive")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError("not safetensors: its header is not JSON (or is nested too deeply)") from None
    if not isinstance(header, dict):
        raise CheckpointError("not safetensors: its header is not a JSON object")
    header.pop("__metadata__", None)
    if not header:
        raise CheckpointError("the safetensors file holds no tensors")
    data_len = size - 8 - n
    out: dict[str, tuple[int, ...]] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"not safetensors: bad header entry for {name!r}") from None
        if not (isinstance(dtype, str) and dtype in _ST_DTYPES and isinstance(shape, list)
                and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise CheckpointError(f"not safetensors: bad dtype or shape for {name!r}")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_len):
            raise CheckpointError(f"truncated safetensors: tensor {name!r} lies outside the file")
        out[name] = tuple(shape)
    return out


# ------------------------------------------------------------------ torch.save, without torch
class _Budget:
    """Work done for one pickle: objects the stubs build (with the size of their arguments,
    since the memo lets one large list be passed to many calls) and container entries walked."""

    def __init__(self, limit: int | None = None):
        self.limit = MAX_PICKLE_NODES if limit is None else limit
        self.left = self.limit

    def charge(self, n: int = 1) -> None:
        self.left -= n
        if self.left < 0:
            raise CheckpointError(
                f"the checkpoint's pickle is too large or too intricate for a state dict (over {self.limit} objects)")


def _size(x) -> int:
    try:
        return 1 + len(x)
    except TypeError:
        return 1


class _Tensor:
    def __init__(self, shape):
        if len(shape) > MAX_TENSOR_DIMS:
            raise CheckpointError(f"a tensor with more than {MAX_TENSOR_DIMS} dimensions")
        self.shape = tuple(int(d) for d in shape)

    def __setstate__(self, state):  # BUILD on a stub: ignored (it must not copy a shared state again and again)
        pass


class _StorageType:
    def __init__(self, name: str):
        self.name = name

    def __setstate__(self, state):
        pass


class _OrderedDict(OrderedDict):
    def __setstate__(self, state):  # a state dict's _metadata: not needed here
        pass


def _rebuild_tensor(storage, offset, size, stride, *args, **kwargs):
    return _Tensor(size)


def _rebuild_parameter(data, *args, **kwargs):
    return data


def _opaque(*args, **kwargs):
    return None


_ALLOWED = {
    ("collections", "OrderedDict"): _OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("torch", "device"): _opaque,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}
_DTYPE_NAMES = {"float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
                "float", "double", "half", "long", "int", "short", "complex64", "complex128"}


class _StubUnpickler(pickle.Unpickler):
    def __init__(self, file, budget: _Budget):
        super().__init__(file)
        self.budget = budget

    def find_class(self, module: str, name: str):
        if module == "__builtin__":  # protocol 2 (torch.save's) names builtins the Python 2 way
            module = "builtins"
        if (module, name) in _ALLOWED:
            return self._charged(_ALLOWED[(module, name)])
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if module == "torch" and name in _DTYPE_NAMES:
            return name
        raise CheckpointError(
            f"not a weights-only state dict: the pickle references {module}.{name} "
            "(save model.state_dict(), or use safetensors)")

    def _charged(self, fn):
        def call(*args, **kwargs):
            self.budget.charge(sum(_size(a) for a in args) + len(kwargs))
            return fn(*args, **kwargs)

        return call

    def persistent_load(self, pid):
        self.budget.charge()
        return ("storage",)


def _inspect_torch_zip(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pkl) != 1:
                raise CheckpointError("a zip archive, but not one written by torch.save (no single data.pkl)")
            info = zf.getinfo(pkl[0])
            if info.file_size > MAX_HEADER:
                raise CheckpointError("the checkpoint's pickle is implausibly large for a state dict")
            raw = zf.read(pkl[0])
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"not a readable torch.save archive: {exc}") from None
    budget = _Budget()
    try:
        obj = _StubUnpickler(io.BytesIO(raw), budget).load()
        tensors = _collect(obj, budget)
    except CheckpointError:
        raise
    except Exception as exc:  # malformed pickles raise anything (RecursionError, MemoryError, ...)
        raise CheckpointError(f"unreadable torch.save pickle: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not tensors:
        raise CheckpointError("the checkpoint holds no tensors (expected a state dict)")
    return tensors


def _key(k) -> str:
    if isinstance(k, str):
        return k
    if isinstance(k, bool) or k is None or (isinstance(k, int) and k.bit_length() <= 64):
        return str(k)
    raise CheckpointError(f"not a state dict: a key of type {type(k).__name__}")


def _collect(root, budget: _Budget) -> dict[str, tuple[int, ...]]:
    """Tensor shapes by dotted name, depth first in the containers' order. Iterative; a container
    reached twice (shared through the memo, or containing itself) is walked the first time only."""
    out: dict[str, tuple[int, ...]] = {}
    seen: set[int] = set()
    stack: list[tuple[str, object]] = [("", root)]
    while stack:
        prefix, obj = stack.pop()
        if isinstance(obj, _Tensor):
            out[prefix] = obj.shape
            continue
        if isinstance(obj, dict):
            items = obj.items()
        elif isinstance(obj, (list, tuple)):
            items = enumerate(obj)
        else:
            continue
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        budget.charge(1 + len(obj))
        children = []
        for k, v in items:
            k = _key(k)
            if len(prefix) + 1 + len(k) > MAX_NAME_CHARS:
                raise CheckpointError(f"a tensor name over {MAX_NAME_CHARS} characters (or nesting too deep): "
                                      "not a state dict")
            children.append((f"{prefix}.{k}" if prefix else k, v))
        stack.extend(reversed(children))
    return out
