"""Issue 13, items 2, 3 and 8 (and issue 15's safetensors detection): checkpoints are walked in time
linear in their pickle, with a budget, and every failure is a 422; the API key is checked before a
body is read and JSON bodies are capped (413); over-limit chunked uploads are 413; keys can be
listed and revoked (API and CLI); the OpenAPI declares the error responses."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import pytest

from .test_api import _job_body, _problem


# ------------------------------------------------------------------ checkpoints (item 2)
def _torch_zip(raw_pickle: bytes) -> bytes:
    """A zip laid out like torch.save's, around a hand-made pickle."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", raw_pickle)
        zf.writestr("archive/version", "3\n")
    return buf.getvalue()


def _upload(client, h, data: bytes):
    return client.post("/v1/encoders", data={"architecture": "small_cnn"},
                       files={"file": ("ckpt.pt", io.BytesIO(data))}, headers=h)


def _doubling_lists(k: int) -> bytes:
    """L_0 = [], L_i = [L_{i-1}, L_{i-1}] (shared through the memo): 2**k paths in about 5k bytes."""
    import pickle

    x: list = []
    for _ in range(k):
        x = [x, x]
    return pickle.dumps({"w": x}, protocol=2)


def test_hostile_pickles_are_422_not_500_nor_exponential(client, team_a):
    _, h = team_a
    self_ref = b"\x80\x02]q\x00h\x00a."  # a list that contains itself
    n = 200_000
    deep = b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b"."  # 200,000 nested lists
    for raw, words in ((self_ref, "no tensors"), (deep, "nesting too deep"), (_doubling_lists(60), "no tensors")):
        p = _problem(_upload(client, h, _torch_zip(raw)), 422)
        assert p["errors"][0]["field"] == "file" and words in p["detail"], p["detail"]
    for raw in (b"\x80\x02}q\x00(X\x01\x00\x00\x00a", b"\x80\x02c__builtin__\neval\n"):  # truncated; a forbidden global
        _problem(_upload(client, h, _torch_zip(raw)), 422)


def test_shared_containers_are_walked_once(tmp_path):
    """Each container is visited once: a tensor under 2**16 paths of shared lists is named by the first."""
    import torch

    from app.checkpoints import inspect_checkpoint

    x = torch.zeros(3)
    for _ in range(16):
        x = [x, x]
    torch.save({"w": x, "b": torch.zeros(2)}, tmp_path / "shared.pt")
    info = inspect_checkpoint(tmp_path / "shared.pt")
    assert info.format == "torch"
    assert info.tensors == {"w" + ".0" * 16: (3,), "w" + ".0" * 15 + ".1": (3,), "b": (2,)}


def test_the_node_budget_refuses_large_pickles(tmp_path, monkeypatch):
    import torch

    from app import checkpoints
    from app.checkpoints import CheckpointError, inspect_checkpoint

    torch.save({f"w{i}": torch.zeros(1) for i in range(200)}, tmp_path / "many.pt")
    assert len(inspect_checkpoint(tmp_path / "many.pt").tensors) == 200
    monkeypatch.setattr(checkpoints, "MAX_PICKLE_NODES", 100)
    with pytest.raises(CheckpointError, match="too large or too intricate"):
        inspect_checkpoint(tmp_path / "many.pt")


class _SharedSet:
    """Pickles as set(L) with one list L shared through the memo: each set costs a few bytes."""

    items = list(range(1000))

    def __reduce__(self):
        return set, (self.items,)


def test_the_budget_counts_what_the_stubs_build(tmp_path):
    """2,000 sets built from one shared 1,000-item list: 2 million items from a pickle of about 10 KB."""
    import torch

    from app.checkpoints import CheckpointError, inspect_checkpoint

    torch.save({"w": torch.zeros(1), "junk": [_SharedSet() for _ in range(2000)]}, tmp_path / "sets.pt")
    assert (tmp_path / "sets.pt").stat().st_size < 100_000
    with pytest.raises(CheckpointError, match="too large or too intricate"):
        inspect_checkpoint(tmp_path / "sets.pt")


def _safetensors(header: dict, data: bytes, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    if length is not None:
        raw = raw.ljust(length, b" ")  # safetensors pads its header with spaces
    return struct.pack("<Q", len(raw)) + raw + data


def test_safetensors_whose_header_length_starts_with_0x80_is_accepted(client, configure, team_a, tmp_path):
    """Issue 15: a ResNet-50's safetensors header is 0x7080 bytes long; its first byte is the 0x80 of a
    legacy pickle. The crafted file here has a 0x180-byte header."""
    import torch

    from app.checkpoints import CheckpointError, inspect_checkpoint

    data = _safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), length=0x180)
    assert data[0] == 0x80
    path = tmp_path / "enc.safetensors"
    path.write_bytes(data)
    info = inspect_checkpoint(path)
    assert info.format == "safetensors" and info.tensors == {"w": (2,)}
    configure(encoder_check_wait_s=0)
    _, h = team_a
    r = client.post("/v1/encoders", data={"architecture": "small_cnn"},
                    files={"file": ("enc.safetensors", io.BytesIO(data))}, headers=h)
    assert r.status_code == 202, r.text
    # a real legacy pickle is still refused as one
    torch.save({"w": torch.zeros(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy"):
        inspect_checkpoint(tmp_path / "legacy.pt")


@pytest.mark.parametrize("header", [
    {"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}},  # unhashable dtype
    {"w": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}},  # shape not a list
    {"w": "F32"},
])
def test_malformed_safetensors_headers_are_refused(tmp_path, header):
    from app.checkpoints import CheckpointError, inspect_checkpoint

    path = tmp_path / "bad.safetensors"
    path.write_bytes(_safetensors(header, bytes(8)))
    with pytest.raises(CheckpointError):
        inspect_checkpoint(path)


def test_deeply_nested_safetensors_header_is_refused(tmp_path):
    from app.checkpoints import CheckpointError, inspect_checkpoint

    raw = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="JSON"):
        inspect_checkpoint(path)
