"""Checkpoint inspection without torch: the API refuses what is neither safetensors nor a
weights-only ``torch.save`` state dict before storing it. Whether the keys fit the
architecture is checked by a worker (``worker.tasks.check_encoder``), which has torch.

Safetensors: an 8-byte little-endian header length, a JSON header of tensor names,
dtypes, shapes and byte ranges, then the data. ``torch.save`` (zip format): a zip
holding ``<name>/data.pkl``; its pickle may reference only the globals torch's
``weights_only`` loader allows, and it is walked with stubs, never executed.
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
    if head[:2] == b"\x80\x02" or head[:1] == b"\x80":
        raise CheckpointError(
            "legacy (non-zip) torch pickle: re-save it with torch.save (zip format) as a state dict, or as safetensors")
    return CheckpointInfo("safetensors", _inspect_safetensors(path))


def _inspect_safetensors(path: Path) -> dict[str, tuple[int, ...]]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n < 2 or n > MAX_HEADER or n > size - 8:
            raise CheckpointError("neither safetensors (bad header length) nor a torch.save zip archive")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError("not safetensors: its header is not JSON") from None
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
        if dtype not in _ST_DTYPES or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointError(f"not safetensors: bad dtype or shape for {name!r}")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_len):
            raise CheckpointError(f"truncated safetensors: tensor {name!r} lies outside the file")
        out[name] = tuple(shape)
    return out


# ------------------------------------------------------------------ torch.save, without torch
class _Tensor:
    def __init__(self, shape):
        self.shape = tuple(int(d) for d in shape)


class _StorageType:
    def __init__(self, name: str):
        self.name = name


def _rebuild_tensor(storage, offset, size, stride, *args, **kwargs):
    return _Tensor(size)


def _rebuild_parameter(data, *args, **kwargs):
    return data


def _opaque(*args, **kwargs):
    return None


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
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
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if module == "torch" and name in _DTYPE_NAMES:
            return name
        raise CheckpointError(
            f"not a weights-only state dict: the pickle references {module}.{name} "
            "(save model.state_dict(), or use safetensors)")

    def persistent_load(self, pid):
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
    try:
        obj = _StubUnpickler(io.BytesIO(raw)).load()
    except CheckpointError:
        raise
    except Exception as exc:  # malformed pickles raise anything
        raise CheckpointError(f"unreadable torch.save pickle: {exc}") from None
    tensors: dict[str, tuple[int, ...]] = {}
    _collect(obj, "", tensors)
    if not tensors:
        raise CheckpointError("the checkpoint holds no tensors (expected a state dict)")
    return tensors


def _collect(obj, prefix: str, out: dict) -> None:
    if isinstance(obj, _Tensor):
        out[prefix] = obj.shape
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _collect(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _collect(v, f"{prefix}.{i}" if prefix else str(i), out)
