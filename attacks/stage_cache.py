"""A content-keyed cache of the stages that jobs of one audit share.

Paper: Lu, Yang, Kamath, Yu (SaTML 2024). Its feature-targeted attacks are a
pipeline, and an audit (one encoder and dataset; several attacks, betas and
epsilons) runs the same early stages again and again:

* ``clean_head`` -- the head trained on f(mu) with the one recipe. Every job.
  Depends on (encoder fingerprint, dataset hash, head recipe, seed, device, amp).
* ``gradpc_target`` -- stage 1, omega_hat (:func:`attacks.gradpc.target_head`).
  Shared by ``gradpc`` (its row *is* this target), ``gc_feature``,
  ``feature_matching`` (every beta), ``feature_matching_r``, ``decoder_inversion``
  and ``gc_input``. Depends additionally on the GradPC parameters only
  (eps_w, corrupt, refit_bias, target_accuracy), not on epsilon or beta.
* ``gc_features`` -- stage 2, zeta from Gradient Canceling in feature space
  (:func:`attacks.gc_feature.poisoned_features`): the ``gc_feature`` row itself,
  and the starting point of ``feature_matching`` (every beta),
  ``feature_matching_r`` and ``decoder_inversion``. Depends additionally on the
  GC parameters (gc_steps, gc_lr, cancel_bias, stop_loss, subset), epsilon and
  the seed -- not on beta, nor on the stage-3 parameters.

So an audit of gradpc, gc_feature and feature_matching at two betas over E
epsilons computes the clean head once, the target once and Gradient Canceling
E times, instead of 4E, 3E and 3E times.

A key is the sha256 of a canonical JSON of everything the stage's output depends
on; entries hold tensors (safetensors) and a JSON ``info`` dict. Layers, fastest
first: a memory dict (pass one dict to several caches to share it across jobs of
a process), a directory (``<directory>/stages/<key>.safetensors``, written
atomically), and whatever a subclass adds in :meth:`StageCache._fetch_remote` /
:meth:`StageCache._push_remote` (the worker mirrors to the object store). A hit
returns copies: callers may not corrupt an entry. Corrupt files are recomputed,
never trusted. Two jobs computing the same missing entry at the same moment both
compute it (no lock); the results are identical, the last write wins.

Results are bit-identical with and without the cache: every stage here is
deterministic given its key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from attacks.catalogue import GCFeatureParams, GradPCParams

log = logging.getLogger("attacks.stage_cache")

VERSION = 1  # bump when a stage's algorithm changes what it returns for the same key

Entry = tuple[dict[str, torch.Tensor], dict[str, Any]]


def gradpc_parts(params) -> dict[str, Any]:
    """The parameters the stage-1 target depends on (whatever attack's model ``params`` is)."""
    return {k: getattr(params, k) for k in GradPCParams.model_fields}


def gc_parts(params) -> dict[str, Any]:
    """The parameters stage 2 depends on (GradPC's included)."""
    return {k: getattr(params, k) for k in GCFeatureParams.model_fields}


class StageCache:
    """Shared stage outputs by content key. ``memory``: a dict to share across instances
    (an :class:`collections.OrderedDict` is trimmed to ``max_memory_entries``)."""

    def __init__(self, directory: str | os.PathLike | None = None, memory: dict | None = None,
                 max_memory_entries: int = 256):
        self.directory = Path(directory) if directory else None
        self._memory: dict[str, tuple[dict[str, torch.Tensor], str]] = memory if memory is not None else OrderedDict()
        self.max_memory_entries = max_memory_entries
        self.hits = 0
        self.misses = 0
        self.seconds_saved = 0.0
        self.events: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- keys
    @staticmethod
    def identity(encoder_fingerprint: str, dataset_hash: str | None, recipe, seed: int,
                 device: torch.device | str, amp: bool) -> dict[str, Any] | None:
        """What every stage depends on; None when the inputs are not content-addressable."""
        if not encoder_fingerprint or not dataset_hash:
            return None
        return {"encoder": encoder_fingerprint, "dataset": dataset_hash,
                "head": recipe.model_dump(mode="json") if hasattr(recipe, "model_dump") else recipe,
                "seed": int(seed), "device": torch.device(device).type, "amp": bool(amp)}

    @staticmethod
    def identity_of(ctx) -> dict[str, Any] | None:
        return StageCache.identity(ctx.encoder_fingerprint, getattr(ctx.dataset, "content_hash", None), ctx.recipe,
                                   ctx.seed, ctx.device, ctx.amp)

    @staticmethod
    def key(stage: str, identity: dict[str, Any], parts: dict[str, Any]) -> str:
        raw = json.dumps({"v": VERSION, "stage": stage, **identity, "parts": parts}, sort_keys=True, default=str)
        return hashlib.sha256(raw.encode()).hexdigest()

    # ---------------------------------------------------------------- layers
    def path_for(self, key: str) -> Path | None:
        return self.directory / "stages" / f"{key}.safetensors" if self.directory else None

    def _fetch_remote(self, key: str, path: Path) -> bool:
        """Subclasses: bring the entry to ``path`` from a shared store; True if they did."""
        return False

    def _push_remote(self, key: str, path: Path) -> None:
        """Subclasses: copy a newly written entry to a shared store."""

    def _remember(self, key: str, tensors: dict[str, torch.Tensor], info_json: str) -> None:
        self._memory[key] = (tensors, info_json)
        if isinstance(self._memory, OrderedDict):
            self._memory.move_to_end(key)
            while len(self._memory) > self.max_memory_entries:
                self._memory.popitem(last=False)

    def _lookup(self, key: str) -> tuple[dict[str, torch.Tensor], str, str] | None:
        hit = self._memory.get(key)
        if hit is not None:
            if isinstance(self._memory, OrderedDict):
                self._memory.move_to_end(key)
            return hit[0], hit[1], "memory"
        path = self.path_for(key)
        if path is None:
            return None
        layer = "disk"
        if not path.exists():
            try:
                if not self._fetch_remote(key, path):
                    return None
            except Exception as exc:  # a shared store is an optimisation
                log.warning("stage cache: could not fetch %s: %s", key[:12], exc)
                return None
            layer = "remote"
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                info_json = (fh.metadata() or {}).get("info", "{}")
            tensors = load_file(str(path))
            json.loads(info_json)
        except Exception:  # corrupt: recomputed, never trusted
            path.unlink(missing_ok=True)
            return None
        self._remember(key, tensors, info_json)
        return tensors, info_json, layer

    def _write(self, key: str, tensors: dict[str, torch.Tensor], info_json: str) -> None:
        path = self.path_for(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata={"info": info_json})
            os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
        finally:
            Path(tmp).unlink(missing_ok=True)
        try:
            self._push_remote(key, path)
        except Exception as exc:
            log.warning("stage cache: could not mirror %s: %s", key[:12], exc)

    # ---------------------------------------------------------------- the one entry point
    def get_or_compute(self, stage: str, key: str | None, compute: Callable[[], Entry],
                       device: torch.device | str | None = None) -> Entry:
        """``compute()`` returns (tensors, info); info must be JSON-serialisable. A hit
        returns copies of the tensors (on ``device`` when given) and of the info."""
        if key is None:  # not content-addressable: compute, count nothing
            return compute()
        found = self._lookup(key)
        if found is not None:
            tensors, info_json, layer = found
            self.hits += 1
            info = json.loads(info_json)
            saved = float(info.pop("_seconds", 0.0))
            self.seconds_saved += saved
            self.events.append({"stage": stage, "hit": layer, "seconds_saved": saved})
            return {k: (v.to(device) if device is not None else v).clone() for k, v in tensors.items()}, info
        self.misses += 1
        t0 = time.perf_counter()
        tensors, info = compute()
        seconds = time.perf_counter() - t0
        info_json = json.dumps({**info, "_seconds": seconds}, sort_keys=True)
        stored = {k: v.detach().cpu().clone() for k, v in tensors.items()}  # never pin device memory
        self._remember(key, stored, info_json)
        self._write(key, stored, info_json)
        self.events.append({"stage": stage, "hit": None, "seconds": seconds})
        return tensors, info

    def stats(self) -> dict[str, Any]:
        """For a job's metrics: counts, the seconds the hits saved, and what happened per stage."""
        return {"hits": self.hits, "misses": self.misses, "seconds_saved": self.seconds_saved,
                "events": list(self.events)}


def cached_stage(ctx, stage: str, parts: dict[str, Any], compute: Callable[[], Entry]) -> Entry:
    """``compute()`` through ``ctx.stage_cache`` when the context carries one."""
    cache: StageCache | None = getattr(ctx, "stage_cache", None)
    if cache is None:
        return compute()
    ident = cache.identity_of(ctx)
    key = cache.key(stage, ident, parts) if ident is not None else None
    return cache.get_or_compute(stage, key, compute, device=ctx.Z_train.device)
