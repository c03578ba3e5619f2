"""The README's serve command, run from a fresh copy of the source tree with no other
process installed: it migrates, prints the first key once, answers /readyz and completes
a submitted job with its own worker (SQLite, kombu's SQLAlchemy transport, local store)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from .helpers import REPO, Proc, clean_env, free_port, wait_for, wait_http

pytestmark = pytest.mark.integration

TREE = ("app", "worker", "attacks", "migrations", "alembic.ini", "pyproject.toml")


def _children_in(cwd: Path) -> list[int]:
    """Processes whose working directory is ``cwd`` (the copy's own workers)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.readlink(p / "cwd") == str(cwd):
                    out.append(int(p.name))
            except OSError:
                pass
    return out


def test_serve_from_a_fresh_tree(tmp_path, tiny_encoder_dir):
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in TREE:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, clone / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, clone / name)
    port = free_port()
    env = clean_env(PYTHONPATH=str(clone))
    # what `poisonaudit serve` runs (the console script is attacks.cli:main)
    proc = Proc("serve", [sys.executable, "-m", "attacks.cli", "serve", "--port", str(port)], env, tmp_path, cwd=clone)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/readyz", proc, timeout=90)
        key = re.search(r"^\s+(pa_\S+)$", proc.output(), re.M).group(1)
        assert proc.output().count(key) == 1  # printed once
        assert (clone / "var" / "poisonaudit.sqlite").exists() and (clone / "var" / "broker.sqlite").exists()
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
            assert c.get("/readyz").json()["checks"] == {"database": "ok", "broker": "ok"}
            with open(tiny_encoder_dir / "encoder.safetensors", "rb") as f:
                r = c.post("/v1/encoders", files={"file": ("enc.safetensors", f)},
                           data={"architecture": "small_cnn", "spec": json.dumps({"in_channels": 1, "width": 8})})
            assert r.status_code in (201, 202), r.text
            enc = r.json()["encoder"]["id"]
            wait_for(lambda: c.get(f"/v1/encoders/{enc}").json()["status"] == "ready", 90, "the encoder check")
            job = c.post("/v1/jobs", json={"encoder": enc, "dataset": "digits", "attack": "feature_matching",
                                           "params": {"gc_steps": 50, "fm_steps": 20, "rounds": 1},
                                           "head": {"epochs": 30}}).json()
            done = wait_for(lambda: (j := c.get(f"/v1/jobs/{job['id']}").json())["status"] in
                            ("succeeded", "failed", "cancelled") and j, 180, "the job")
            assert done["status"] == "succeeded", done["error"]
            r = c.get(f"/v1/jobs/{job['id']}/poisoned-set")
            assert r.status_code == 200
            (tmp_path / "p.npz").write_bytes(r.content)
            with np.load(tmp_path / "p.npz") as z:
                assert z["x"].shape == (43, 1, 8, 8)
            assert [j["id"] for j in c.get("/v1/jobs").json()["data"]] == [job["id"]]
        workers = _children_in(clone)
        assert len(workers) >= 2  # serve and its worker
    finally:
        proc.stop(timeout=30)
    # no orphans: the worker went with serve
    wait_for(lambda: not _children_in(clone), 20, "the embedded worker to exit")
    # a second start prints no new key and keeps the data
    proc = Proc("serve2", [sys.executable, "-m", "attacks.cli", "serve", "--port", str(port), "--no-worker"], env,
                tmp_path, cwd=clone)
    try:
        wait_http(base + "/readyz", proc, timeout=60)
        assert "pa_" not in proc.output()
    finally:
        proc.stop(timeout=30)
