"""Issue 13, items 5 and 6: bad datasets, pre-training configs and encoder specs get a 422 naming the
problem, and nothing is stored (no row, no object); the worker's loader refuses the same archives."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from .test_api import _problem

_Y = np.arange(40) % 4  # 4 classes of 10: the 80/20 split has a test set
_X = np.full((40, 8, 8), 128, np.uint8)


def _savez(path: Path, **arrays) -> bytes:
    with path.open("wb") as fh:
        np.savez(fh, **arrays)
    return path.read_bytes()


def _npy(shape, dtype, data: bytes) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


def _zip(members: dict[str, bytes], method=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _declared_huge(_: Path) -> bytes:
    """An x header declaring (2**40, 28, 28) uint8 with 1 KB of data."""
    return _zip({"x.npy": _npy((2**40, 28, 28), np.uint8, b"\0" * 1024), "y.npy": _npy((40,), np.int64, _Y.astype(np.int64).tobytes())})


def _bomb(_: Path) -> bytes:
    """4 MiB of zeros (about 4 KB compressed); the test sets the decompressed-bytes cap to 1 MB."""
    n = 1024
    return _zip({"x.npy": _npy((n, 64, 64), np.uint8, bytes(n * 64 * 64)),
                 "y.npy": _npy((n,), np.int64, (np.arange(n) % 2).astype(np.int64).tobytes())})


def _bomb_ratio(_: Path) -> bytes:
    """65 MiB of zeros in about 65 KB (1,000:1), under the default 1 GiB cap."""
    n = 1040
    return _zip({"x.npy": _npy((n, 256, 256), np.uint8, bytes(n * 256 * 256)),
                 "y.npy": _npy((n,), np.int64, (np.arange(n) % 2).astype(np.int64).tobytes())})


def patch_declared_size(data: bytes, member: str, size: int) -> bytes:
    """Rewrites the uncompressed size the central directory declares for ``member`` (a lie)."""
    name = member.encode()
    at = 0
    while True:
        at = data.index(b"PK\x01\x02", at)
        (name_len,) = struct.unpack_from("<H", data, at + 28)
        if data[at + 46 : at + 46 + name_len] == name:
            return data[: at + 24] + struct.pack("<I", size) + data[at + 28 :]
        at += 4


def _lying_sizes(_: Path) -> bytes:
    """x holds 10 MB of pixels but the zip declares (and the header says) 640 bytes: CRC and byte count disagree."""
    head = _npy((10, 8, 8), np.uint8, b"")
    data = _zip({"x.npy": head + bytes(10 * 2**20), "y.npy": _npy((10,), np.int64, (np.arange(10) % 2).tobytes())})
    return patch_declared_size(data, "x.npy", len(head) + 640)


def _arrays(**arrays):
    return lambda tmp: _savez(tmp / "a.npz", **arrays)


# (id, archive builder, words of the expected message, settings)
BAD = [
    ("nan", _arrays(x=np.full((40, 8, 8), np.nan, np.float32), y=_Y), "NaN or infinite", {}),
    ("inf", _arrays(x=np.where(np.eye(8) > 0, np.inf, 0.5).astype(np.float32)[None].repeat(40, 0), y=_Y), "NaN or infinite", {}),
    ("float_0_255", _arrays(x=np.full((40, 8, 8), 200.0, np.float32), y=_Y), "float images must lie in [0, 1]", {}),
    ("int_300", _arrays(x=np.full((40, 8, 8), 300, np.int16), y=_Y), "integer images must be 8-bit", {}),
    ("negative_labels", _arrays(x=_X, y=_Y - 1), "negative labels", {}),
    ("huge_labels", _arrays(x=_X, y=_Y * 10**9), "at most 1,000 classes", {}),
    ("label_1000", _arrays(x=_X, y=np.where(_Y == 3, 1000, _Y)), "at most 1,000 classes", {}),
    ("float_labels", _arrays(x=_X, y=_Y.astype(np.float32)), "labels must be integers", {}),
    ("one_class", _arrays(x=_X, y=np.zeros(40, np.int64)), "single class", {}),
    ("five_channels", _arrays(x=np.zeros((40, 5, 8, 8), np.uint8), y=_Y), "no channel axis", {}),
    ("zero_images", _arrays(x=np.zeros((0, 8, 8), np.uint8), y=np.zeros(0, np.int64)), "no images", {}),
    ("zero_width", _arrays(x=np.zeros((40, 8, 0), np.uint8), y=_Y), "zero height or width", {}),
    ("test_other_size", _arrays(x=_X, y=_Y, x_test=np.zeros((8, 6, 6), np.uint8), y_test=_Y[:8]), "'x_test' images are", {}),
    ("test_other_channels", _arrays(x=_X, y=_Y, x_test=np.zeros((8, 3, 8, 8), np.uint8), y_test=_Y[:8]),
     "'x_test' images are", {}),
    ("test_label_count", _arrays(x=_X, y=_Y, x_test=_X[:8], y_test=_Y[:7]), "'x_test' has 8 images but 'y_test' has 7", {}),
    ("too_few_for_split", _arrays(x=_X[:4], y=np.array([0, 0, 1, 1])), "too few for an 80/20 split", {}),
    ("declared_2_40", _declared_huge, "holds 1,024 bytes", {}),
    ("zip_bomb", _bomb, "over the limit of 1,000,000", {"max_dataset_decompressed_bytes": 1_000_000}),
    ("zip_bomb_ratio", _bomb_ratio, "more than 200:1 is refused as a zip bomb", {}),
    ("lying_sizes", _lying_sizes, "Bad CRC-32", {}),
    ("too_wide", _arrays(x=np.zeros((40, 8, 64), np.uint8), y=_Y), "at most 32 pixels a side", {"max_dataset_image_side": 32}),
    ("object_labels", _arrays(x=_X, y=np.array([object()] * 40, dtype=object)), "Python objects", {}),
    ("npy_not_npz", lambda tmp: (np.save(tmp / "a.npy", _X), (tmp / "a.npy").read_bytes())[1], "single array (.npy)", {}),
]


def _count_datasets(session) -> int:
    from app.models import Dataset

    return session.scalar(select(func.count()).select_from(Dataset))


@pytest.mark.parametrize(("build", "message", "settings"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_dataset_upload_is_422_and_stores_nothing(client, configure, session, store, team_a, tmp_path, build, message, settings):
    if settings:
        configure(**settings)
    _, h = team_a
    data = build(tmp_path)
    before = _count_datasets(session)
    r = client.post("/v1/datasets", files={"file": ("d.npz", io.BytesIO(data))}, data={"name": "bad"}, headers=h)
    p = _problem(r, 422)
    assert p["errors"][0]["field"] == "file" and message in p["detail"], p["detail"]
    assert str(tmp_path) not in p["detail"] and "/tmp" not in p["detail"]
    assert _count_datasets(session) == before
    assert list(store.list("teams")) == []


@pytest.mark.parametrize(("build", "message", "settings"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_the_workers_loader_refuses_the_same_archives(tmp_path, build, message, settings):
    """Defence in depth: attacks.data.load_npz refuses each of them too, with the same limits."""
    from app.datasets import dataset_limits
    from app.settings import Settings
    from attacks.data import DatasetError, load_npz

    path = tmp_path / "bad.npz"
    path.write_bytes(build(tmp_path))
    limits = dataset_limits(Settings(data_dir=tmp_path, **settings))
    with pytest.raises(DatasetError) as err:
        load_npz(path, limits=limits)
    assert message in str(err.value), str(err.value)


def test_a_good_upload_records_its_contents(client, team_a, tmp_path):
    _, h = team_a
    data = _savez(tmp_path / "ok.npz", x=np.random.default_rng(0).random((40, 3, 8, 8), np.float32), y=_Y,
                  classes=np.array(["a", "b", "c", "d"]))
    r = client.post("/v1/datasets", files={"file": ("ok.npz", io.BytesIO(data))}, headers=h)
    assert r.status_code == 201, r.text
    summary = r.json()["summary"]
    assert summary["image_shape"] == [3, 8, 8] and summary["num_classes"] == 4 and summary["n"] == 40


# ------------------------------------------------------------------ item 6: pre-training config and spec
_PRETRAIN = {"name": "simclr", "architecture": "small_cnn", "dataset": "digits", "spec": {"in_channels": 1, "width": 8},
             "config": {"epochs": 1, "batch_size": 64}, "device": "cpu"}
_JUNK = "x" * 900_000  # under POISONAUDIT_MAX_JSON_BYTES (1 MiB): a larger body is a 413 before validation

BAD_PRETRAIN = [
    ("epochs_1e12", {"config": {"epochs": 1e12}}, "config.epochs"),
    ("epochs_int_huge", {"config": {"epochs": 10**12}}, "config.epochs"),
    ("batch_size", {"config": {"batch_size": 10**9}}, "config.batch_size"),
    ("lr", {"config": {"lr": 1e9}}, "config.lr"),
    ("crop_scale", {"config": {"crop_scale": [0.9, 0.1]}}, "config.crop_scale"),
    ("junk_string_config", {"config": {"proj_dim": _JUNK}}, "config.proj_dim"),
    ("junk_key_config", {"config": {_JUNK: 1}}, "config." + "x" * 64),
    ("width_1e9", {"spec": {"width": 1e9}}, "spec.width"),
    ("in_channels_1e6", {"spec": {"in_channels": 1e6}}, "spec.in_channels"),
    ("input_size", {"spec": {"in_channels": 1, "input_size": 10**6}}, "spec.input_size"),
    ("junk_string_spec", {"spec": {"in_channels": 1, "note": _JUNK}}, "spec.note"),
    ("mean_long", {"spec": {"in_channels": 1, "mean": [0.5] * 100_000}}, "spec.mean"),
]


def _counts(session):
    from app.models import Encoder, Job

    return (session.scalar(select(func.count()).select_from(Encoder)), session.scalar(select(func.count()).select_from(Job)))


@pytest.mark.parametrize(("change", "field"), [b[1:] for b in BAD_PRETRAIN], ids=[b[0] for b in BAD_PRETRAIN])
def test_bad_pretrain_config_or_spec_is_422_naming_the_field(client, session, team_a, queue, change, field):
    _, h = team_a
    before = _counts(session)
    r = client.post("/v1/encoders", json={**_PRETRAIN, **change}, headers=h)
    p = _problem(r, 422)
    assert p["errors"][0]["field"] == field, p["errors"]
    assert len(r.content) < 10_000  # the junk is not echoed back
    assert _counts(session) == before and queue.sent == []


BAD_UPLOAD_SPEC = [
    ("width_1e9", {"width": 1e9}, "spec.width"),
    ("in_channels_1e6", {"in_channels": 1e6}, "spec.in_channels"),
    ("unknown", {"depth": 50}, "spec.depth"),
    ("junk_string", {"in_channels": 1, "note": "x" * 900_000}, "spec.note"),
    ("preset_for_rgb", {"in_channels": 1, "preprocessing": "imagenet"}, "spec.preprocessing"),
    ("preset_unknown", {"in_channels": 1, "preprocessing": "places365"}, "spec.preprocessing"),
    ("key_map_regex", {"in_channels": 1, "key_map": [["(a+)+$", ""]]}, "spec.key_map"),
    ("key_map_long", {"in_channels": 1, "key_map": [["a.", "b."]] * 17}, "spec.key_map"),
]


@pytest.mark.parametrize(("spec", "field"), [b[1:] for b in BAD_UPLOAD_SPEC], ids=[b[0] for b in BAD_UPLOAD_SPEC])
def test_bad_upload_spec_is_422_naming_the_field(client, session, store, team_a, queue, tiny_encoder_dir, spec, field):
    _, h = team_a
    before = _counts(session)
    with open(tiny_encoder_dir / "encoder.safetensors", "rb") as f:
        r = client.post("/v1/encoders", data={"architecture": "small_cnn", "spec": json.dumps(spec)},
                        files={"file": ("e.safetensors", f)}, headers=h)
    p = _problem(r, 422)
    assert p["errors"][0]["field"] == field, p["errors"]
    assert len(r.content) < 10_000
    assert _counts(session) == before and queue.checks == [] and list(store.list("teams")) == []
