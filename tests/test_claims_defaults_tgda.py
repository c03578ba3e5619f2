"""TGDA at the catalogue's defaults, as a user who never tunes it runs it (issue #12, "TGDA that moves").

Setting (that of tests/test_claims_defaults.py): a small_cnn (width 16) pre-trained with SimCLR on
``digits`` (2 epochs, seed 0), the real 1,437 / 360 split, epsilon 0.1 (144 poisons); no attack
parameter is set but ``constrained``, the two rows of the default audit. Every claim is on the mean
over seeds 0, 1, 2. Two standard errors of a difference of two accuracies near 92% on 360 images
are about 3.9 points (``attacks.pipeline.noise_level``).

Before (commit 760e1fb: normalised leader step, proximal weight 30-58 per step, 200 full-batch
steps, gradient-descent follower on the mean CE): constrained drops 0.0 / -0.3 / -0.3 points, mean
L_inf to base 0.0001 (L2 0.0002); unconstrained 1.4 / 2.2 / 1.1 (mean 1.6), L_inf to base 1.66.
After (Adam leader step per mini-batch of 64 poisons in pixel units, penalty in the same unit,
warm-started L-BFGS follower on the victim's objective; 600 leader steps, ~30 s a run on one CPU
thread, idle machine), measured on the commit that introduced these defaults (run with -s to print them):

* constrained: drops 7.5 / 6.7 / 6.9 points (mean 7.0), mean L_inf to base 0.59 (L2 2.0), every
  poison inside the clean range; asserted: mean drop >= 4 points (above the noise, about half of
  what was measured), every seed > 2 points, mean L_inf to base > 0.3.
* unconstrained: drops 28.3 / 20.6 / 36.9 (mean 28.6), L_inf to base 3.0; asserted: mean >= 14
  points and at least 10 more than constrained.
Slow (minutes): run in CI.
"""

from __future__ import annotations

import statistics

import pytest

from attacks.features import FeatureCache
from attacks.pipeline import noise_level, run_job
from attacks.stage_cache import StageCache

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def caches():
    return FeatureCache(), StageCache()  # in memory: the seeds share the features and the clean head


_RUNS: dict = {}  # the tuned comparison reuses the defaults' runs


def _run(enc, ds, caches, constrained, seed, tuned=False):
    if (constrained, seed, tuned) not in _RUNS:
        _RUNS[constrained, seed, tuned] = _run_once(enc, ds, caches, constrained, seed, tuned)
    return _RUNS[constrained, seed, tuned]


def _run_once(enc, ds, caches, constrained, seed, tuned):
    from bench.strength import TUNED

    cache, stages = caches
    params = {"constrained": constrained, **(TUNED["tgda_input"] if tuned else {})}
    r = run_job(encoder=enc, dataset=ds, attack="tgda_input", epsilon=0.1, params=params,
                device="cpu", seed=seed, cache=cache, stage_cache=stages, defences=False)
    m, ps = r.metrics, r.metrics["poison_stats"]
    print(f"\ntgda_input constrained={constrained} tuned={tuned} seed={seed}: clean {m['clean_accuracy']:.4f} poisoned "
          f"{m['poisoned_accuracy']:.4f} drop {m['drop']:.4f} linf_to_base {ps['linf_to_base']['mean']:.4f} "
          f"l2_to_base {ps['l2_to_base']['mean']:.4f} val {m['val_loss_initial']:.3f}->{m['val_loss_best']:.3f} "
          f"leader_steps {m['tgda_leader_steps']} attack_s {m['stage_seconds']['attack']:.1f}")
    return r


def test_tgda_at_defaults_moves_poisons_and_drops_accuracy(simclr_digits, digits, caches):
    con = [_run(simclr_digits, digits, caches, True, s) for s in SEEDS]
    free = [_run(simclr_digits, digits, caches, False, s) for s in SEEDS]
    noise = noise_level(con[0].metrics["clean_accuracy"], con[0].metrics["n_test"])
    assert 0.03 < noise < 0.05  # the noise the thresholds are measured against
    for r in con + free:
        m = r.metrics
        assert m["n_poisons"] == 144 and m["tgda_leader_steps"] == 200 * 3  # a real budget, a step per mini-batch
        assert m["victim"]["poisoned"]["converged"]
        assert m["val_loss_best"] > m["val_loss_initial"]  # the game raised the attacker's objective
    for r in con:  # constrained poisons stay in the clean data range
        lo, hi = r.metrics["poison_stats"]["clean_range"]
        assert r.poisons.x.min() >= lo and r.poisons.x.max() <= hi
        assert r.metrics["drop"] > 0.02
    mean_con = statistics.mean(r.metrics["drop"] for r in con)
    mean_free = statistics.mean(r.metrics["drop"] for r in free)
    print(f"\nmean drops: constrained {mean_con:.4f}, unconstrained {mean_free:.4f} (noise {noise:.4f})")
    assert mean_con >= max(0.04, noise)
    assert statistics.mean(r.metrics["poison_stats"]["linf_to_base"]["mean"] for r in con) > 0.3
    assert mean_free >= 0.14 and mean_free >= mean_con + 0.1


def test_the_hand_set_tgda_is_no_stronger_than_the_defaults(simclr_digits, digits, caches):
    """The TGDA knobs tests/test_paper_claims_input.py hand-set (bench.strength.TUNED: 100 epochs,
    leader_lr 0.05) do at most 0.5 points more harm than the defaults on the seed mean, unconstrained
    at epsilon 0.1. Measured (python -m bench strength): tuned 16.1 against defaults 28.6 points
    (constrained: 5.9 against 7.0, too close to the noise to claim)."""
    default = [_run(simclr_digits, digits, caches, False, s).metrics["drop"] for s in SEEDS]
    tuned = [_run(simclr_digits, digits, caches, False, s, tuned=True).metrics["drop"] for s in SEEDS]
    print(f"\nunconstrained: defaults {100 * statistics.mean(default):.2f}, tuned {100 * statistics.mean(tuned):.2f}")
    assert statistics.mean(tuned) <= statistics.mean(default) + 0.005
