"""The three defences: planted poisons are caught, counts add up, retraining uses what is kept,
and the pipeline reports them for poisoning attacks only."""

from __future__ import annotations

import pytest
import torch

from attacks.catalogue import HeadRecipe
from attacks.defences import (
    DefenceConfig, knn_flags, linf_flags, run_defences, spectral_flags, spectral_quota, spectral_scores,
)
from attacks.head import accuracy, feature_scale, train_head

RECIPE = HeadRecipe(epochs=50)


def _clusters(n_per_class=100, K=3, d=16, spread=0.5, seed=0):
    """K well-separated Gaussian clusters: centres 4 apart along distinct axes."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.zeros(K, d)
    centres[torch.arange(K), torch.arange(K)] = 4.0
    y = torch.arange(K).repeat_interleave(n_per_class)
    Z = centres[y] + spread * torch.randn(len(y), d, generator=g)
    return Z, y, centres


def _counts_add_up(r):
    assert r["poisons_removed"] + r["clean_removed"] + r["n_kept"] == r["n_poisons"] + r["n_clean"]
    assert 0 <= r["poisons_removed"] <= r["n_poisons"] and 0 <= r["clean_removed"] <= r["n_clean"]


# ------------------------------------------------------------------ k-NN
def test_knn_catches_mislabelled_points_planted_inside_another_class():
    Z, y, centres = _clusters()
    g = torch.Generator().manual_seed(1)
    Zp = centres[0] + 0.5 * torch.randn(15, Z.shape[1], generator=g)  # in class 0's cluster...
    yp = torch.full((15,), 1)  # ...labelled 1
    flags = knn_flags(torch.cat([Z, Zp]), torch.cat([y, yp]), k=10)
    assert flags[len(y):].all(), "every planted point is outvoted by its neighbours"
    assert flags[: len(y)].sum() <= 3, "clean points in their own cluster are kept"


def test_knn_matches_brute_force_and_does_not_depend_on_the_chunk():
    Z, y, _ = _clusters(n_per_class=40, spread=2.5, seed=3)  # overlapping: many points flagged
    k = 7
    D = torch.cdist(Z.double(), Z.double())
    D.fill_diagonal_(float("inf"))
    idx = D.topk(k, largest=False).indices
    counts = torch.zeros(len(y), 3).scatter_add_(1, y[idx], torch.ones(len(y), k))
    expected = counts.amax(1) > counts.gather(1, y[:, None]).squeeze(1)
    assert 0 < expected.sum() < len(y)
    for chunk in (1, 37 * len(y), 1 << 24):  # one row, a ragged chunk, everything at once
        assert torch.equal(knn_flags(Z, y, k=k, chunk_elements=chunk), expected)


def test_knn_tie_including_own_label_keeps_the_point():
    # Points on a line. Point 0 (label 0) has neighbours 1 (label 0) and 2 (label 1): a tie.
    Z = torch.tensor([[0.0], [1.0], [-1.1], [10.0], [11.0]])
    y = torch.tensor([0, 0, 1, 1, 1])
    flags = knn_flags(Z, y, k=2)
    assert not flags[0]
    assert flags[2], "point 2 (label 1): neighbours 0 and 1 are both label 0"


# ------------------------------------------------------------------ spectral
def test_spectral_scores_are_squared_projections_on_the_top_singular_vector():
    g = torch.Generator().manual_seed(0)
    for n, d in ((30, 8), (6, 20)):  # both Gram branches
        Z = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(3, 0.5, d, dtype=torch.float64)
        X = Z - Z.mean(0)
        v = torch.linalg.svd(X, full_matrices=False).Vh[0]
        torch.testing.assert_close(spectral_scores(Z), (X @ v) ** 2, rtol=1e-8, atol=1e-10)


def test_spectral_removes_a_shifted_subpopulation_within_the_budget():
    Z, y, _ = _clusters(n_per_class=200, d=16, spread=1.0)
    g = torch.Generator().manual_seed(2)
    # 10 poisons per class: copies of that class's points shifted by 6 along an axis no class uses
    Zp = torch.cat([Z[y == c][:10] for c in range(3)])
    yp = torch.arange(3).repeat_interleave(10)
    Zp[torch.arange(30), 10 + yp] += 6.0
    Zp += 0.3 * torch.randn(30, 16, generator=g)
    Zall, yall = torch.cat([Z, Zp]), torch.cat([y, yp])
    fraction = 30 / len(yall)  # 10 of 210 per class: the quota is round(1.5 * 30/630 * 210) = 15
    flags = spectral_flags(Zall, yall, fraction, budget=1.5)
    assert flags[len(y):].all(), "the shifted poisons carry the top singular direction of their class"
    assert flags[: len(y)].sum() == 3 * (15 - 10)
    # With half the budget (quota 8 < 10 poisons) the filter cannot get them all.
    assert not spectral_flags(Zall, yall, fraction, budget=0.75)[len(y):].all()
    for c in range(3):
        n_c = int((yall == c).sum())
        assert int(flags[yall == c].sum()) == spectral_quota(n_c, fraction, 1.5) > 0


def test_spectral_quota_rule():
    assert spectral_quota(400, 0.03, 1.5) == 18  # round(1.5 * 0.03 * 400)
    assert spectral_quota(400, 0.03, 3.0) == 36
    assert spectral_quota(10, 0.9, 1.5, max_remove_fraction=0.5) == 5  # capped
    assert spectral_quota(10, 0.0) == 0


# ------------------------------------------------------------------ L_inf
def test_linf_filter_catches_out_of_range_poisons_only():
    lo, hi = 0.0, 1.0
    poisons = torch.rand(6, 1, 5, 5, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    poisons[1, 0, 2, 2] = 1.2
    poisons[3, 0, 0, 0] = -0.01
    poisons[4, 0, 4, 4] = 1.0  # on the boundary: inside
    assert linf_flags(poisons, lo, hi, margin=0.0).tolist() == [False, True, False, True, False, False]
    # the default: a magnitude anomaly, more than half the clean range beyond it
    assert linf_flags(poisons, lo, hi).tolist() == [False] * 6
    poisons[2, 0, 1, 1] = 1.51
    poisons[5, 0, 3, 3] = -0.51
    assert linf_flags(poisons, lo, hi).tolist() == [False, False, True, False, False, True]
    assert linf_flags(poisons, lo, hi, margin=0.5).tolist() == linf_flags(poisons, lo, hi).tolist()
    assert linf_flags(poisons[:0], lo, hi).numel() == 0


# ------------------------------------------------------------------ run_defences
def _poisoned_set():
    """Clean clusters; 20 poisons: mislabelled inside class 0's cluster, with images whose first
    12 have a pixel at 2.0, a magnitude anomaly (more than half the range beyond [0, 1]); the
    rest inside."""
    Z, y, centres = _clusters(n_per_class=100)
    Zt, yt, _ = _clusters(n_per_class=50, seed=9)
    g = torch.Generator().manual_seed(5)
    Zp = centres[0] + 0.5 * torch.randn(20, Z.shape[1], generator=g)
    yp = torch.full((20,), 2)
    images = torch.rand(20, 3, 4, 4, generator=g)
    images[:12, 1, 0, 0] = 2.0
    return Z, y, Zp, yp, Zt, yt, images


def test_run_defences_counts_add_up_and_retrain_on_what_is_kept():
    Z, y, Zp, yp, Zt, yt, images = _poisoned_set()
    res = run_defences(Z, y, Zp, yp, Zt, yt, 3, RECIPE, seed=0, poisons=images, clean_range=(0.0, 1.0))
    assert set(res) == {"linf", "knn", "spectral"}
    for r in res.values():
        assert r["applicable"] and r["n_poisons"] == 20 and r["n_clean"] == 300
        _counts_add_up(r)
        assert 0 <= r["accuracy"] <= 1
    assert (res["linf"]["poisons_removed"], res["linf"]["clean_removed"]) == (12, 0)
    assert res["knn"]["poisons_removed"] == 20
    # The L_inf head is the head trained on the clean set plus the 8 in-range poisons.
    keep = torch.cat([Z, Zp[12:]]), torch.cat([y, yp[12:]])
    victim = train_head(*keep, 3, RECIPE, 0, scale=feature_scale(Z))  # the clean set fixes lambda
    assert res["linf"]["accuracy"] == accuracy(victim, Zt, yt)
    assert res["linf"]["removed_fraction"] == 12 / 20
    # The spectral filter removes exactly its per-class budget.
    frac = 20 / 320
    assert res["spectral"]["params"]["expected_fraction"] == pytest.approx(frac)
    total = sum(spectral_quota(n, frac, 1.5) for n in (100, 100, 120))
    assert res["spectral"]["poisons_removed"] + res["spectral"]["clean_removed"] == total


def test_a_defence_that_removes_every_poison_recovers_the_clean_accuracy():
    Z, y, Zp, yp, Zt, yt, images = _poisoned_set()
    images[:, 0, 0, 0] = 2.0  # every poison out of range
    undefended = accuracy(train_head(torch.cat([Z, Zp]), torch.cat([y, yp]), 3, RECIPE, 0), Zt, yt)
    clean = accuracy(train_head(Z, y, 3, RECIPE, 0), Zt, yt)
    res = run_defences(Z, y, Zp, yp, Zt, yt, 3, RECIPE, seed=0, poisons=images, clean_range=(0.0, 1.0),
                       undefended_accuracy=undefended)
    assert res["linf"]["poisons_removed"] == 20 and res["linf"]["accuracy"] == clean


def test_feature_space_poisons_mark_linf_not_applicable():
    Z, y, Zp, yp, Zt, yt, _ = _poisoned_set()
    res = run_defences(Z, y, Zp, yp, Zt, yt, 3, RECIPE, seed=0, poisons=None)
    assert res["linf"]["applicable"] is False and "pixels" in res["linf"]["reason"]
    assert "accuracy" not in res["linf"]
    assert res["knn"]["applicable"] and res["spectral"]["applicable"]


def test_defence_config_is_validated():
    for bad in ({"knn_k": 0}, {"spectral_budget": 0}, {"spectral_fraction": 1.5}, {"max_remove_fraction": 1.0},
                {"linf_margin": -1}, {"chunk_elements": 0}):
        with pytest.raises(ValueError):
            DefenceConfig(**bad)


# ------------------------------------------------------------------ the pipeline
TINY = {
    "gradpc": {},
    "gc_feature": {"gc_steps": 30},
    "feature_matching": {"gc_steps": 30, "fm_steps": 4, "batch_size": 16},
}


@pytest.mark.parametrize("attack", sorted(TINY))
def test_pipeline_reports_defences_for_poisoning_attacks(attack, tiny_encoder, digits_small):
    from attacks.pipeline import run_job

    r = run_job(encoder=tiny_encoder, dataset=digits_small, attack=attack, epsilon=0.05, params=TINY[attack],
                device="cpu")
    m = r.metrics
    if attack == "gradpc":
        assert "defences" not in m
        return
    d = m["defences"]
    assert set(d) == {"linf", "knn", "spectral"}
    for name in ("knn", "spectral"):
        assert d[name]["n_poisons"] == m["n_poisons"] and d[name]["n_clean"] == m["n_train"]
        _counts_add_up(d[name])
        assert 0 <= d[name]["accuracy"] <= 1
    assert d["linf"]["applicable"] is (attack == "feature_matching")
    if attack == "feature_matching":
        _counts_add_up(d["linf"])
        assert d["linf"]["clean_removed"] == 0
        lo, hi = m["poison_stats"]["clean_range"]
        # exactly the returned poisons that are magnitude anomalies (the default relative margin)
        assert d["linf"]["poisons_removed"] == int(linf_flags(r.poisons.x, lo, hi).sum())
        assert d["linf"]["params"]["margin"] == 0.5
    assert m["stage_seconds"]["defences"] >= 0
    assert m["versions"]["torch"] == torch.__version__


def test_pipeline_defences_can_be_turned_off(tiny_encoder, digits_small):
    from attacks.pipeline import run_job

    m = run_job(encoder=tiny_encoder, dataset=digits_small, attack="gc_feature", epsilon=0.05,
                params=TINY["gc_feature"], device="cpu", defences=False).metrics
    assert "defences" not in m and "defences" not in m["stage_seconds"]
