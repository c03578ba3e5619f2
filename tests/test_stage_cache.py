"""The stage cache: an audit's jobs share the clean head, the GradPC target and the GC features."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from attacks.pipeline import run_job
from attacks.stage_cache import StageCache

GC = {"gc_steps": 30, "eps_w": 2.0}
FM = {**GC, "fm_steps": 3}


def _run(enc, data, attack, cache, *, epsilon=0.05, beta=None, params=GC, seed=0):
    return run_job(encoder=enc, dataset=data, attack=attack, epsilon=epsilon, beta=beta, params=params, seed=seed,
                   device="cpu", head={"epochs": 20}, stage_cache=cache, defences=False).metrics


def _hits(m):
    return {e["stage"]: e["hit"] for e in m["stage_cache"]["events"]}


def test_second_job_of_an_audit_reuses_the_shared_stages(tiny_encoder, digits_small):
    memory = OrderedDict()
    first = _run(tiny_encoder, digits_small, "gc_feature", StageCache(memory=memory))
    assert first["stage_cache"]["hits"] == 0 and first["stage_cache"]["misses"] == 3
    assert _hits(first) == {"clean_head": None, "gradpc_target": None, "gc_features": None}
    # feature matching with GC unconstrained, at two betas: both start from gc_feature's target and zeta
    for beta in (0.25, 0.05):
        m = _run(tiny_encoder, digits_small, "feature_matching", StageCache(memory=memory), beta=beta,
                 params={**FM, "feature_floor": "none", "feature_ceiling": None})
        assert _hits(m) == {"clean_head": "memory", "gradpc_target": "memory", "gc_features": "memory"}
        assert m["stage_cache"]["hits"] == 3 and m["stage_cache"]["misses"] == 0
        assert m["stage_cache"]["seconds_saved"] > 0
        assert m["gc_loss_final"] == first["gc_loss_final"] and m["target_accuracy"] == first["target_accuracy"]
    # feature matching's default keeps zeta in the encoder's (non-negative) range: its own GC run,
    # shared by its betas; "zero" resolves to the same floor and shares it too
    for beta, floor in ((0.25, "auto"), (0.05, "auto"), (0.25, "zero")):
        m = _run(tiny_encoder, digits_small, "feature_matching", StageCache(memory=memory), beta=beta,
                 params={**FM, "feature_floor": floor})
        assert _hits(m)["gc_features"] == (None if (beta, floor) == (0.25, "auto") else "memory")
        assert m["gc_feature_floor"] == 0.0 and m["gc_feature_ceiling"] == 1.0
    # another ceiling is another GC run
    m = _run(tiny_encoder, digits_small, "feature_matching", StageCache(memory=memory), beta=0.25,
             params={**FM, "feature_ceiling": 2.0})
    assert _hits(m)["gc_features"] is None and m["gc_feature_ceiling"] == 2.0
    # gradpc needs the clean head and the target only
    g = _run(tiny_encoder, digits_small, "gradpc", StageCache(memory=memory), params={"eps_w": 2.0})
    assert _hits(g) == {"clean_head": "memory", "gradpc_target": "memory"}
    assert g["poisoned_accuracy"] == first["target_accuracy"]


def test_cached_results_equal_uncached_ones(tiny_encoder, digits_small):
    plain = _run(tiny_encoder, digits_small, "gc_feature", None)
    assert "stage_cache" not in plain
    cache = StageCache()
    _run(tiny_encoder, digits_small, "gc_feature", cache)
    again = _run(tiny_encoder, digits_small, "gc_feature", StageCache(memory=cache._memory))
    for k in ("clean_accuracy", "poisoned_accuracy", "target_accuracy", "gc_loss_final", "zeta_norm_ratio"):
        assert again[k] == plain[k], k


def test_what_the_keys_separate(tiny_encoder, digits_small):
    memory = OrderedDict()
    _run(tiny_encoder, digits_small, "gc_feature", StageCache(memory=memory))
    other_eps = _run(tiny_encoder, digits_small, "gc_feature", StageCache(memory=memory), epsilon=0.1)
    assert _hits(other_eps) == {"clean_head": "memory", "gradpc_target": "memory", "gc_features": None}
    other_steps = _run(tiny_encoder, digits_small, "gc_feature", StageCache(memory=memory), params={**GC, "gc_steps": 31})
    assert _hits(other_steps)["gc_features"] is None and _hits(other_steps)["gradpc_target"] == "memory"
    other_w = _run(tiny_encoder, digits_small, "gc_feature", StageCache(memory=memory), params={**GC, "eps_w": 3.0})
    assert _hits(other_w) == {"clean_head": "memory", "gradpc_target": None, "gc_features": None}
    other_seed = _run(tiny_encoder, digits_small, "gradpc", StageCache(memory=memory), params={"eps_w": 2.0}, seed=1)
    assert _hits(other_seed) == {"clean_head": None, "gradpc_target": None}


def test_disk_layer_survives_the_process_and_corrupt_files_are_recomputed(tiny_encoder, digits_small, tmp_path):
    first = _run(tiny_encoder, digits_small, "gc_feature", StageCache(tmp_path))
    files = sorted((tmp_path / "stages").glob("*.safetensors"))
    assert len(files) == 3
    fresh = _run(tiny_encoder, digits_small, "gc_feature", StageCache(tmp_path))  # empty memory: from disk
    assert set(_hits(fresh).values()) == {"disk"} and fresh["poisoned_accuracy"] == first["poisoned_accuracy"]
    for f in files:
        f.write_bytes(b"not safetensors")
    again = _run(tiny_encoder, digits_small, "gc_feature", StageCache(tmp_path))
    assert set(_hits(again).values()) == {None} and again["poisoned_accuracy"] == first["poisoned_accuracy"]


def test_hits_are_copies(tiny_encoder, digits_small):
    cache = StageCache()
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.zeros(3)}, {"a": 1}

    t, info = cache.get_or_compute("s", "k", compute)
    t2, _ = cache.get_or_compute("s", "k", compute)
    t2["x"].add_(5)
    t3, info3 = cache.get_or_compute("s", "k", compute)
    assert len(calls) == 1 and torch.equal(t3["x"], torch.zeros(3)) and info3 == {"a": 1}
    assert cache.get_or_compute("s", None, compute) and len(calls) == 2  # no key: computed, not counted
    assert (cache.hits, cache.misses) == (2, 1)


def test_not_content_addressable_inputs_are_not_cached():
    from attacks.catalogue import HeadRecipe

    assert StageCache.identity("", "h", HeadRecipe(), 0, "cpu", False) is None
    assert StageCache.identity("fp", None, HeadRecipe(), 0, "cpu", False) is None
    with pytest.raises(TypeError):
        StageCache.key("s", None, {})
