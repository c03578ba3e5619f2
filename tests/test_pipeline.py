"""The engine end to end on a tiny real encoder and real data (fast)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.catalogue import CATALOGUE
from attacks.errors import AttackDiverged
from attacks.features import FeatureCache
from attacks.pipeline import PoisonSet, run_job
from attacks.progress import Cancelled

TINY = {
    "gradpc": {},
    "gc_feature": {"gc_steps": 30},
    "feature_matching": {"gc_steps": 30, "fm_steps": 4, "batch_size": 16},
    "feature_matching_r": {"gc_steps": 30, "fm_steps": 4, "batch_size": 16},
    "gc_input": {"gc_steps": 5, "batch_size": 16},
    "tgda_input": {"epochs": 2, "follower_steps": 2, "cg_iters": 4, "batch_size": 16},
    "emn": {"max_rounds": 1, "pgd_steps": 2, "head_steps": 2},
    "decoder_inversion": {"gc_steps": 30, "decoder_epochs": 1, "decoder_width": 8},
}


def _in_clean_range(p, m, ds):
    lo, hi = float(ds.x_train.min()), float(ds.x_train.max())
    return p.x.numel() == 0 or (p.x.min() >= lo and p.x.max() <= hi)


def _inside_anomaly_margin(p, m, ds):
    """feature matching-r keeps only poisons within anomaly_margin (0.5) of the clean range's width."""
    lo, hi = float(ds.x_train.min()), float(ds.x_train.max())
    pad = m["anomaly_margin"] * (hi - lo)
    return m["anomaly_margin"] == 0.5 and (p.x.numel() == 0 or (p.x.min() >= lo - pad and p.x.max() <= hi + pad))


def _emn_ball(p, m, ds):
    return m["poison_stats"]["linf_to_base"]["max"] <= 8 / 255 + 1e-6 and p.x.min() >= 0 and p.x.max() <= 1


# The constraint each attack promises about its poisons (with the TINY parameters).
CONSTRAINTS = {
    "feature_matching_r": _inside_anomaly_margin,
    "gc_input": _in_clean_range,  # constrained by default
    "tgda_input": _in_clean_range,  # constrained by default
    "emn": _emn_ball,
    "decoder_inversion": _in_clean_range,
}


def test_every_catalogue_attack_has_a_tiny_config():
    assert set(TINY) == set(CATALOGUE)


@pytest.mark.parametrize("attack", sorted(CATALOGUE))
def test_contract(attack, tiny_encoder, digits_small, tmp_path):
    """Every attack runs, returns the declared shapes and statistics, and keeps its constraints."""
    eps = 0.05
    stages = []
    r = run_job(
        encoder=tiny_encoder, dataset=digits_small, attack=attack, epsilon=eps, params=TINY[attack],
        device="cpu", progress=lambda s, f: stages.append((s, f)),
    )
    m = r.metrics
    n_expected = round(eps * digits_small.n_train)
    for key in ("clean_accuracy", "poisoned_accuracy", "drop", "n_poisons", "stage_seconds", "poison_stats"):
        assert key in m
    assert 0 <= m["poisoned_accuracy"] <= 1 and 0 <= m["clean_accuracy"] <= 1
    assert m["drop"] == pytest.approx(m["clean_accuracy"] - m["poisoned_accuracy"])
    assert all(0.0 <= f <= 1.0 for _, f in stages)
    assert {"features", "clean_head"} <= {s for s, _ in stages}
    info = CATALOGUE[attack]
    if info.stage == "parameters":
        assert r.poisons is None and m["n_poisons"] == 0
        assert m["poisoned_accuracy"] == m["target_accuracy"]
    elif info.stage == "features":
        assert r.poisons is None and m["n_poisons"] == n_expected
        assert m["poison_stats"]["zeta_norm"]["max"] > 0
    else:
        p = r.poisons
        assert p is not None
        assert len(p) == n_expected - m.get("anomalies_removed", 0)
        if attack in CONSTRAINTS:
            assert CONSTRAINTS[attack](p, m, digits_small), (attack, m["poison_stats"])
        assert p.x.shape[1:] == digits_small.x_train.shape[1:] and p.x.dtype == torch.float32
        assert p.y.dtype == torch.int64 and p.base_index.dtype == torch.int64
        # clean-label: each poison carries the label of its base image
        assert torch.equal(p.y, digits_small.y_train[p.base_index])
        path = p.save_npz(tmp_path / "poisoned.npz")
        with np.load(path, allow_pickle=False) as z:
            assert z["x"].dtype == np.float32 and z["x"].shape == tuple(p.x.shape)
            assert (z["y"] == p.y.numpy()).all()
        assert torch.equal(PoisonSet.load_npz(path).x, p.x)
        if len(p) and "feature_match_error" in m["poison_stats"]:
            assert m["poison_stats"]["feature_match_error"]["mean"] >= 0


def test_same_run_twice_gives_the_same_numbers(tiny_encoder, digits_small):
    kw = dict(encoder=tiny_encoder, dataset=digits_small, attack="feature_matching", epsilon=0.05,
              params=TINY["feature_matching"], device="cpu", seed=3)
    a, b = run_job(**kw), run_job(**kw)
    for key in ("clean_accuracy", "poisoned_accuracy", "target_accuracy", "gc_loss_final"):
        assert a.metrics[key] == b.metrics[key]
    assert torch.equal(a.poisons.x, b.poisons.x)


def test_inputs_are_not_modified(tiny_encoder, digits_small):
    before = digits_small.x_train.clone()
    w_before = {k: v.clone() for k, v in tiny_encoder.state_dict().items()}
    run_job(encoder=tiny_encoder, dataset=digits_small, attack="feature_matching", epsilon=0.05,
            params=TINY["feature_matching"], device="cpu")
    assert torch.equal(digits_small.x_train, before)
    for k, v in tiny_encoder.state_dict().items():
        assert torch.equal(v, w_before[k]), k


def test_feature_cache_is_reused_across_jobs(tiny_encoder, digits_small, tmp_path):
    kw = dict(encoder=tiny_encoder, dataset=digits_small, attack="gradpc", device="cpu", cache_dir=tmp_path)
    first = run_job(**kw).metrics["feature_cache"]
    second = run_job(**kw).metrics["feature_cache"]  # a new in-memory cache: reads the disk cache
    assert first == {"hits": 0, "misses": 2}
    assert second == {"hits": 2, "misses": 0}
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 2
    shared = FeatureCache()
    run_job(cache=shared, **{k: v for k, v in kw.items() if k != "cache_dir"})
    run_job(cache=shared, **{k: v for k, v in kw.items() if k != "cache_dir"})
    assert (shared.hits, shared.misses) == (2, 2)


def test_cancellation_stops_the_attack(tiny_encoder, digits_small):
    seen = []

    def cancel_in_gc(stage, fraction):
        seen.append(stage)
        if stage == "gc_feature":
            raise Cancelled()

    with pytest.raises(Cancelled):
        run_job(encoder=tiny_encoder, dataset=digits_small, attack="feature_matching", epsilon=0.05,
                params={"gc_steps": 500, "fm_steps": 500}, device="cpu", progress=cancel_in_gc)
    assert "feature_matching" not in seen


def test_overall_progress_never_goes_backwards_across_stages(tiny_encoder, digits_small):
    """A job's stages each report 0..1 (so the raw fraction falls at every new stage: issue #16);
    the overall fraction the worker stores, by stage weights, only rises and stops short of 1
    (the worker sets 1.0 when the job has succeeded)."""
    from attacks.progress import JOB_STAGES, PRETRAIN_STAGES, OverallProgress

    seen = []
    run_job(encoder=tiny_encoder, dataset=digits_small, attack="feature_matching", epsilon=0.05,
            params={"gc_steps": 40, "fm_steps": 20}, device="cpu", progress=lambda s, f: seen.append((s, f)))
    stages = list(dict.fromkeys(s for s, _ in seen))
    assert {"features", "clean_head", "gradpc", "gc_feature", "feature_matching", "evaluation"} <= set(stages)
    assert all(s in dict(JOB_STAGES) for s in stages), stages  # every stage the engine reports has a weight
    raw = [f for _, f in seen]
    assert any(b < a for a, b in zip(raw, raw[1:])), "the raw per-stage fraction should fall somewhere"
    overall = OverallProgress()
    values = [overall(s, f) for s, f in seen]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert 0.9 < values[-1] < 1.0 and values[0] < 0.1
    # a stage met again (the sweep's short GCs, a re-reported stage) keeps the value; unknown ones too
    v = overall.value
    assert overall("features", 0.0) == v and overall("starting", 0.5) == v and overall(None, None) == v
    pre = OverallProgress(PRETRAIN_STAGES)
    assert pre("loading", 1.0) == pytest.approx(0.05) and pre("pretrain", 0.5) == pytest.approx(0.525)


def test_feature_matching_divergence_is_an_error_not_a_nan(tiny_encoder, digits_small):
    from attacks.feature_matching import match_features

    base = digits_small.x_train[:8]
    with torch.no_grad():
        zeta = tiny_encoder(base) + 1e4
    with pytest.raises(AttackDiverged, match="lower fm_lr"):
        match_features(tiny_encoder, base, zeta, beta=0.0, gamma=1e8, steps=30, lr=100.0)


def test_gradient_canceling_never_returns_non_finite_features():
    from attacks.gc_feature import gradient_canceling
    from attacks.head import Head, summed_gradient

    g = torch.Generator().manual_seed(0)
    Z = torch.randn(50, 6, generator=g)
    y = torch.arange(50) % 3
    head = Head(torch.randn(3, 6, generator=g), torch.zeros(3))
    G = summed_gradient(head, Z, y)
    Z0 = Z[:5].clone()
    Z0[0, 0] = float("inf")
    with pytest.raises(AttackDiverged):
        gradient_canceling(head, G, Z0, y[:5], steps=20, lr=0.5)


def test_gradient_canceling_with_a_huge_step_halves_it_and_still_makes_progress():
    """A step far too large used to end in AttackDiverged; now the step halves and the run restarts
    from its best iterate until it makes progress (APGD-style), and the answer is finite."""
    from attacks.gc_feature import gradient_canceling
    from attacks.head import Head, summed_gradient

    g = torch.Generator().manual_seed(0)
    Z = torch.randn(60, 6, generator=g)
    y = torch.arange(60) % 3
    head = Head(torch.randn(3, 6, generator=g) * 2, torch.zeros(3))
    G = summed_gradient(head, Z, y)
    zeta, info = gradient_canceling(head, G, Z[:6].clone(), y[:6], steps=200, lr=1e4, stop_loss=0.0)
    assert torch.isfinite(zeta).all()
    assert info["gc_step_halvings"] >= 5 and info["gc_step_final_multiplier"] < 1
    assert info["gc_loss_final"] < info["gc_loss_initial"]


def test_gradient_canceling_reduces_the_residual():
    from attacks.gc_feature import gradient_canceling
    from attacks.gradpc import gradpc_target
    from attacks.head import summed_gradient, train_head

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 6, generator=g)
    y = torch.arange(300) % 3
    Z = centers[y] + torch.randn(300, 6, generator=g)  # overlapping classes: a real loss surface
    clean = train_head(Z, y, 3)
    target = gradpc_target(clean, Z, y, eps_w=2.0)
    G = summed_gradient(target, Z, y)
    zeta, info = gradient_canceling(target, G, Z[:30], y[:30], steps=300, lr=0.5, stop_loss=0.0)
    assert info["gc_loss_final"] < 0.1 * info["gc_loss_initial"]
    assert torch.isfinite(zeta).all()


def test_unique_pairing_gives_distinct_bases(tiny_encoder, digits_small):
    r = run_job(encoder=tiny_encoder, dataset=digits_small, attack="feature_matching", epsilon=0.2,
                params={**TINY["feature_matching"], "pairing": "nearest_unique"}, device="cpu")
    idx = r.poisons.base_index
    assert len(set(idx.tolist())) == len(idx)


def test_invalid_parameters_fail_before_any_work(tiny_encoder, digits_small):
    from pydantic import ValidationError

    calls = []
    with pytest.raises(ValidationError):
        run_job(encoder=tiny_encoder, dataset=digits_small, attack="feature_matching", epsilon=1.5,
                device="cpu", progress=lambda s, f: calls.append(s))
    assert calls == []


def test_gradpc_steps_and_the_weak_target_warning(tiny_encoder, digits_small):
    """step 'auto' (default) sweeps relative steps x corruptions and keeps the lowest retrained training
    accuracy; an explicit eps_w is the paper's absolute step; a target barely below clean is flagged."""
    from attacks.catalogue import AUTO_CORRUPTIONS, AUTO_RELATIVE_STEPS, GradPCParams

    assert GradPCParams().step == "auto" and GradPCParams(eps_w=2).step == "absolute"
    assert GradPCParams(eps_w=2, step="relative").step == "relative"
    auto = run_job(encoder=tiny_encoder, dataset=digits_small, attack="gradpc", epsilon=0.05, device="cpu",
                   defences=False).metrics
    sweep = auto["gradpc_sweep"]
    assert len(sweep) == len(AUTO_RELATIVE_STEPS) * len(AUTO_CORRUPTIONS)
    best = min(sweep, key=lambda r: (r["retrained_train_accuracy"], r["relative_step"]))
    assert auto["eps_w_relative"] == pytest.approx(best["relative_step"], rel=1e-6)
    assert (auto["gradpc_corrupt"], auto["gradpc_refit_bias"]) == (best["corrupt"], best["refit_bias"])
    weak = run_job(encoder=tiny_encoder, dataset=digits_small, attack="gradpc", epsilon=0.05, device="cpu",
                   params={"eps_w": 1e-4}, defences=False).metrics
    assert weak["gradpc_step"] == "absolute" and weak["eps_w"] == 1e-4
    assert any(w.startswith("GradPC target is only") for w in weak["warnings"])
    assert not any(w.startswith("GradPC target is only") for w in auto["warnings"])
    only = run_job(encoder=tiny_encoder, dataset=digits_small, attack="gradpc", epsilon=0.05, device="cpu",
                   params={"corrupt": "weights", "refit_bias": True}, defences=False).metrics
    assert {(r["corrupt"], r["refit_bias"]) for r in only["gradpc_sweep"]} == {("weights", True)}


def test_gradpc_weights_only_and_bias_refit():
    from attacks.gradpc import gradpc_target
    from attacks.head import summed_gradient, train_head

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 6, generator=g)
    y = torch.arange(300) % 3
    Z = centers[y] + torch.randn(300, 6, generator=g)
    clean = train_head(Z, y, 3)
    joint = gradpc_target(clean, Z, y, 2.0)
    weights = gradpc_target(clean, Z, y, 2.0, corrupt="weights")
    refit = gradpc_target(clean, Z, y, 2.0, corrupt="weights", refit=True)
    assert not torch.equal(joint.b, clean.b)
    assert torch.equal(weights.b, clean.b)
    assert (weights.W - clean.W).norm().item() == pytest.approx(2.0, rel=1e-4)
    assert torch.equal(refit.W, weights.W)
    # after the refit the clean bias gradient vanishes; before it, it does not
    assert summed_gradient(refit, Z, y).b.norm() < 1e-3
    assert summed_gradient(weights, Z, y).b.norm() > 1e-2


def test_gradient_canceling_with_pull_returns_the_pulled_iterate():
    from attacks.gc_feature import gradient_canceling
    from attacks.gradpc import gradpc_target
    from attacks.head import summed_gradient, train_head

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 6, generator=g)
    y = torch.arange(300) % 3
    Z = centers[y] + torch.randn(300, 6, generator=g)
    target = gradpc_target(train_head(Z, y, 3), Z, y, eps_w=2.0)
    G = summed_gradient(target, Z, y)
    free, _ = gradient_canceling(target, G, Z[:30], y[:30], steps=200, lr=0.5, stop_loss=0.0)
    pulled, _ = gradient_canceling(target, G, Z[:30], y[:30], steps=200, lr=0.5, stop_loss=0.0,
                                   pull_to=Z[:30], pull_weight=5.0)
    # the pull keeps zeta nearer the reachable features it is pulled to
    assert (pulled - Z[:30]).norm() < (free - Z[:30]).norm()


@pytest.mark.parametrize("optimizer", ["gd", "adam"])
def test_feature_matching_moves_features_toward_zeta_independently_of_batching(tiny_encoder, digits_small, optimizer):
    from attacks.feature_matching import match_features

    base = digits_small.x_train[:12]
    with torch.no_grad():
        f0 = tiny_encoder(base)
        zeta = tiny_encoder(digits_small.x_train[12:24])  # features of other images: reachable
    kw = dict(beta=0.01, steps=25, lr=0.05 if optimizer == "adam" else 200.0, optimizer=optimizer)
    nu = match_features(tiny_encoder, base, zeta, batch_size=12, **kw)
    nu_b = match_features(tiny_encoder, base, zeta, batch_size=5, **kw)
    torch.testing.assert_close(nu, nu_b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        before = ((f0 - zeta) ** 2).sum(1).mean()
        after = ((tiny_encoder(nu) - zeta) ** 2).sum(1).mean()
    assert after < 0.8 * before, (optimizer, before.item(), after.item())


def test_poison_statistics_do_not_depend_on_the_chunk():
    from attacks.pipeline import poison_statistics

    g = torch.Generator().manual_seed(0)
    x = torch.rand(37, 1, 5, 5, generator=g) * 1.4 - 0.2
    base = torch.rand(37, 1, 5, 5, generator=g)
    a = poison_statistics(x, base, None, None, 0.0, 1.0, chunk=4096)
    b = poison_statistics(x, base, None, None, 0.0, 1.0, chunk=5)
    assert a.keys() == b.keys() and {"linf", "l2", "linf_to_base", "fraction_outside_unit_range"} <= set(a)
    for k in a:
        if isinstance(a[k], dict):
            for s in a[k]:
                assert a[k][s] == pytest.approx(b[k][s], rel=1e-6), (k, s)
        else:
            assert a[k] == pytest.approx(b[k])
    assert a["linf"]["max"] == pytest.approx(x.abs().max().item())
    assert a["fraction_outside_unit_range"] == pytest.approx(((x < 0) | (x > 1)).double().mean().item())


def test_gradient_canceling_floor_keeps_zeta_in_a_relu_encoders_range():
    """GC's zeta wanders below zero when unconstrained, where no ReLU-pooled feature can be;
    with the floor every coordinate stays >= 0 and the residual still falls."""
    from attacks.gc_feature import feature_floor, gradient_canceling
    from attacks.gradpc import gradpc_target
    from attacks.head import summed_gradient, train_head

    g = torch.Generator().manual_seed(0)
    centers = torch.rand(3, 6, generator=g) * 2
    y = torch.arange(300) % 3
    Z = (centers[y] + 0.5 * torch.randn(300, 6, generator=g)).clamp(min=0)  # non-negative, like ReLU features
    target = gradpc_target(train_head(Z, y, 3), Z, y, eps_w=3.0, corrupt="weights", refit=True)
    G = summed_gradient(target, Z, y)
    free, _ = gradient_canceling(target, G, Z[:30], y[:30], steps=300, lr=0.5, stop_loss=0.0)
    floored, info = gradient_canceling(target, G, Z[:30], y[:30], steps=300, lr=0.5, stop_loss=0.0, floor=0.0)
    assert free.min() < 0  # the setting does push zeta negative: the floor has work to do
    assert floored.min() >= 0
    assert info["gc_loss_final"] < 0.5 * info["gc_loss_initial"]
    assert feature_floor("auto", Z) == 0.0 and feature_floor("zero", Z - 1) == 0.0
    assert feature_floor("auto", Z - 1) is None and feature_floor("none", Z) is None


def test_gradient_canceling_ceiling_keeps_zeta_in_the_clean_features_range():
    """Unbounded, GC grows some poisons' features past anything an image gives; with the ceiling
    (a multiple of each coordinate's clean maximum) every coordinate stays below it, with the floor."""
    from attacks.gc_feature import feature_ceiling, gradient_canceling
    from attacks.gradpc import gradpc_target
    from attacks.head import summed_gradient, train_head

    g = torch.Generator().manual_seed(0)
    centers = torch.rand(3, 6, generator=g) * 2
    y = torch.arange(300) % 3
    Z = (centers[y] + 0.5 * torch.randn(300, 6, generator=g)).clamp(min=0)
    target = gradpc_target(train_head(Z, y, 3), Z, y, eps_w=10.0, corrupt="weights", refit=True)
    G = summed_gradient(target, Z, y)
    cap = feature_ceiling(1.0, Z)
    assert cap.shape == (6,) and torch.equal(cap, Z.max(0).values) and feature_ceiling(None, Z) is None
    kw = dict(steps=300, lr=0.5, stop_loss=0.0, floor=0.0)
    free, _ = gradient_canceling(target, G, Z[:30], y[:30], **kw)
    boxed, info = gradient_canceling(target, G, Z[:30], y[:30], ceiling=cap, **kw)
    assert (free > 2 * cap).any()  # the setting does push zeta past the clean range (measured 2.3x)
    assert (boxed <= cap + 1e-6).all() and boxed.min() >= 0
    # the box binds: against the regularised victim's target GC inside it ends at 0.60 of its start
    # (torch 2.14.1; paths differ across torch versions), so the bound is progress, not a path
    assert info["gc_loss_final"] < 0.8 * info["gc_loss_initial"]
    half, _ = gradient_canceling(target, G, Z[:30], y[:30], ceiling=feature_ceiling(0.5, Z), **kw)
    assert (half <= 0.5 * cap + 1e-6).all()  # also when the start is above it: clipped at once


def test_same_label_pairing_keeps_the_labels_gc_computed_zeta_for(tiny_encoder, digits_small):
    from attacks.feature_matching import nearest_clean_same_label

    g = torch.Generator().manual_seed(0)
    Z = torch.rand(40, 5, generator=g)
    y = torch.arange(40) % 4
    zeta = torch.rand(9, 5, generator=g) * 3
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 3])
    idx = nearest_clean_same_label(zeta, labels, Z, y)
    assert torch.equal(y[idx], labels)
    for i in range(9):  # the nearest within the class, by brute force
        pool = (y == labels[i]).nonzero().flatten()
        assert idx[i] == pool[((Z[pool] - zeta[i]) ** 2).sum(1).argmin()]

    r = run_job(encoder=tiny_encoder, dataset=digits_small, attack="feature_matching", epsilon=0.1,
                params={**TINY["feature_matching"], "pairing": "nearest_same_label"}, device="cpu")
    assert r.metrics["labels_changed_by_pairing"] == 0


def test_a_gradpc_sweep_without_progress_of_its_own_reaches_the_callback(tiny_encoder, digits_small):
    """GradPC's step sweep (short GC runs and victim fits, none with a callback) still reaches the
    caller's callback, re-reporting the latest stage, so a cancel stops it there (#13)."""
    seen = []

    def cancel_in_the_sweep(stage, fraction):
        seen.append((stage, fraction))
        if seen.count(("clean_head", 1.0)) > 3:
            raise Cancelled()

    with pytest.raises(Cancelled):
        run_job(encoder=tiny_encoder, dataset=digits_small, attack="gradpc", beta=None, defences=False,
                head={"optimizer": "sgd", "epochs": 200, "batch_size": 1}, device="cpu", progress=cancel_in_the_sweep)
    assert ("evaluation", 1.0) not in seen
