"""What the engine finds at the catalogue's defaults, as a user who never tunes it runs it (issue #12).

Setting: a small_cnn (width 16) pre-trained with SimCLR on ``digits`` (2 epochs, seed 0), the
real 1,437 / 360 split; no attack parameter is set (only feature matching's projected switch,
which is a row of the default audit). Every claim is on the mean over seeds 0, 1, 2, and its
threshold is set well below what was measured and well above the test set's noise: two
standard errors of a difference of two accuracies near 92% on 360 images are about 3.9 points
(``attacks.pipeline.noise_level``). Measured on the commit that introduced these defaults
(CPU; run this file with -s to print them):

* gc_feature, epsilon 0.03: drops 32.5 / 31.4 / 29.2 points on one machine, 41.9 / 39.2 / 36.1
  on another (the SimCLR encoder differs in the last bits; the paper: 36.6 on CIFAR-10);
  asserted: mean >= 15, every seed above the noise.
* feature matching, epsilon 0.1: beta 0.25 drops 5.0 / 3.3 / 5.3 and 3.9 / 3.6 / 3.9 (means 4.5
  and 3.8), beta 0.05 drops 7.8 / 8.1 / 10.0 and 8.9 / 8.1 / 8.3 (means 8.6 and 8.4), with larger
  poisons (L_inf max 1.86 against 1.48 on average);
  asserted: beta 0.05 mean >= 5 points, beta 0.05 stronger than 0.25 by at least 1 point on
  the mean, and larger in L_inf at every seed.
Slow (minutes): run in CI.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from attacks.features import FeatureCache
from attacks.pipeline import noise_level, run_job
from attacks.stage_cache import StageCache

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def caches():
    return FeatureCache(), StageCache()  # in memory: betas of one seed share the target and the GC run


_RUNS: dict = {}  # one run per configuration and seed in this module: the tuned comparison reuses them


def _run(enc, ds, caches, attack, epsilon, seed, beta=None, params=None):
    key = (attack, epsilon, seed, beta, json.dumps(params or {}, sort_keys=True))
    if key not in _RUNS:
        _RUNS[key] = _run_once(enc, ds, caches, attack, epsilon, seed, beta, params)
    return _RUNS[key]


def _run_once(enc, ds, caches, attack, epsilon, seed, beta, params):
    cache, stages = caches
    m = run_job(encoder=enc, dataset=ds, attack=attack, epsilon=epsilon, beta=beta, params=params or {},
                device="cpu", seed=seed, cache=cache, stage_cache=stages, defences=False).metrics
    print(f"\n{attack} eps={epsilon} beta={beta} seed={seed} {params or ''}: clean {m['clean_accuracy']:.4f} "
          f"target {m.get('target_accuracy', float('nan')):.4f} poisoned {m['poisoned_accuracy']:.4f} "
          f"drop {m['drop']:.4f} linf_max {m['poison_stats'].get('linf', {}).get('max', float('nan')):.3f} "
          f"warnings {m['warnings']}")
    return m


def test_gc_feature_at_defaults_finds_the_harm(simclr_digits, digits, caches):
    runs = [_run(simclr_digits, digits, caches, "gc_feature", 0.03, s) for s in SEEDS]
    noise = noise_level(runs[0]["clean_accuracy"], runs[0]["n_test"])
    assert 0.03 < noise < 0.05  # the noise the thresholds are measured against
    for m in runs:
        assert m["gradpc_step"] == "auto" and len(m["gradpc_sweep"]) == 10
        # the chosen target is a real one, and nothing flags the result as unreliable
        assert m["target_accuracy"] < m["clean_accuracy"] - 0.05
        assert m["victim"]["clean"]["converged"] and m["victim"]["poisoned"]["converged"]
        assert m["warnings"] == []
        assert m["drop"] > noise
    assert statistics.mean(m["drop"] for m in runs) >= 0.15


def test_feature_matching_at_defaults_smaller_beta_is_stronger_and_larger(simclr_digits, digits, caches):
    weak = [_run(simclr_digits, digits, caches, "feature_matching", 0.1, s, beta=0.25) for s in SEEDS]
    strong = [_run(simclr_digits, digits, caches, "feature_matching", 0.1, s, beta=0.05) for s in SEEDS]
    for w, s in zip(weak, strong):
        assert w["labels_changed_by_pairing"] == 0 == s["labels_changed_by_pairing"]
        # the images realise part of zeta's harm: feature matching got closer than the base images
        assert s["poison_stats"]["feature_match_error"]["mean"] < 0.5 * s["base_feature_error_mean"]
        assert s["poison_stats"]["linf"]["max"] > w["poison_stats"]["linf"]["max"]
    mean_weak = statistics.mean(m["drop"] for m in weak)
    mean_strong = statistics.mean(m["drop"] for m in strong)
    assert mean_strong >= 0.05
    assert mean_strong >= mean_weak + 0.01


def test_the_evaluation_head_does_not_depend_on_its_budget(simclr_digits, digits, caches):
    """The victim solves its objective to a tolerance, not to an iteration count: refitted with 10x
    the iteration budget and a 100x tighter tolerance (the converged limit: tighter still changes
    nothing), the test accuracy of the clean head and of the head poisoned by each seed's default
    gc_feature poisons moves by less than half a point on the mean over seeds. Measured: clean 0 /
    0 / 0; poisoned 0.56 / 0 / 0 points (2 of 360 images at seed 0, a drop of ~40 points)."""
    from attacks import gc_feature
    from attacks.catalogue import HeadRecipe, validate_job
    from attacks.head import accuracy, fit_head
    from attacks.pipeline import prepare

    cache, stages = caches
    base = HeadRecipe()
    limit = HeadRecipe(max_iter=10 * base.max_iter, tol=base.tol / 100)
    moved = {"clean": [], "poisoned": []}
    for seed in SEEDS:
        _, params = validate_job("gc_feature", 0.03, None, {}, seed, "cpu", None)
        ctx = prepare(simclr_digits, digits, recipe=base, seed=seed, device="cpu", cache=cache, stage_cache=stages)
        out = gc_feature.run(ctx, params, epsilon=0.03, beta=None, seed=seed)
        sets = {"clean": (ctx.Z_train, ctx.y_train),
                "poisoned": (torch.cat([ctx.Z_train, out.poison_features]), torch.cat([ctx.y_train, out.poison_labels]))}
        for which, (Z, y) in sets.items():
            acc, iters = {}, {}
            for name, recipe in (("default", base), ("limit", limit)):
                head, info = fit_head(Z, y, digits.num_classes, recipe, seed, scale=ctx.feature_scale)
                assert info["converged"], (which, name, info)
                acc[name], iters[name] = accuracy(head, ctx.Z_test, ctx.y_test), info["iterations"]
            print(f"\nseed {seed} {which}: accuracy {acc['default']:.4f} ({iters['default']} iterations) "
                  f"{acc['limit']:.4f} ({iters['limit']} iterations, 10x budget, tol/100)")
            assert iters["limit"] > iters["default"]  # the tighter fit did go further
            moved[which].append(abs(acc["limit"] - acc["default"]))
            if which == "poisoned":  # two harmed heads compared, not two clean ones
                assert acc["default"] < 0.8
    for which, m in moved.items():
        assert max(m) < 0.01 and statistics.mean(m) < 0.005, (which, m)


def test_feature_matching_r_removes_some_poisons_and_still_does_harm(simclr_digits, digits, caches):
    """Feature matching-r (the paper's Table 3): the magnitude-anomaly rule removes a part of the
    poisons, not all (the old margin-0 rule removed 144 of 144), and what it keeps still harms.
    At epsilon 0.1, beta 0.1 (the paper's second FM-r row) measured: 43 / 42 / 38 of 144 removed
    (26-30%; the paper: 18% at beta 0.1), drops 5.8 / 4.7 / 5.3 points after removal (mean 5.3).
    At beta 0.25 it removes 1-3 (the poisons stay in range, as the paper saw in fine-tuning); at
    beta 0.05, 58-67%. Asserted: 5-50% removed at every seed, a drop at every seed, mean >= 2.5."""
    runs = [_run(simclr_digits, digits, caches, "feature_matching_r", 0.1, s, beta=0.1) for s in SEEDS]
    for m in runs:
        assert m["n_poisons_generated"] == 144 and m["n_poisons"] == 144 - m["anomalies_removed"]
        assert 0.05 <= m["anomaly_fraction"] <= 0.5, m["anomaly_fraction"]
        assert m["drop"] > 0
    assert statistics.mean(m["drop"] for m in runs) >= 0.025


def test_the_hand_set_configurations_are_no_stronger_than_the_defaults(simclr_digits, digits, caches):
    """The recipe the mnist5k claims tests hand-set for feature matching before the defaults were
    fixed (bench.strength.TUNED, from tests/test_paper_claims.py) does at most 0.5 points more harm
    than the defaults, on the seed mean, at epsilon 0.1 and the betas claimed above. Measured
    (python -m bench strength): tuned 0.9 / 0.8 points against defaults 3.8 / 8.4 at beta 0.25 / 0.05."""
    from bench.strength import TUNED

    for beta in (0.25, 0.05):
        default = [_run(simclr_digits, digits, caches, "feature_matching", 0.1, s, beta=beta) for s in SEEDS]
        tuned = [_run(simclr_digits, digits, caches, "feature_matching", 0.1, s, beta=beta,
                      params=TUNED["feature_matching"]) for s in SEEDS]
        mean_default = statistics.mean(m["drop"] for m in default)
        mean_tuned = statistics.mean(m["drop"] for m in tuned)
        print(f"\nbeta {beta}: defaults {100 * mean_default:.2f} points, tuned {100 * mean_tuned:.2f}")
        assert mean_tuned <= mean_default + 0.005
