"""What the engine must show on real data (issue #2), with the project's own
SimCLR small_cnn pre-trained on mnist5k (seed 0). Slow: minutes, run in CI.

The measured numbers are printed (run with -s) and recorded in the closing notes.
"""

from __future__ import annotations

import pytest

from attacks.features import FeatureCache
from attacks.pipeline import run_job

pytestmark = pytest.mark.slow

# The strongest feature matching measured on this encoder (closing notes of #2): a W-only GradPC
# target with the bias re-fitted (the joint step's damage sits in the bias, which no bounded
# poison set cancels) and the bias gradient cancelled too; GC at gc_lr 0.3 kept inside the clean
# features' range: non-negative (the default feature_floor "auto") and below each coordinate's
# clean maximum (the default feature_ceiling 1.0); each poison paired with the nearest clean image
# of zeta's own GC label; Adam-preconditioned forward steps on the paper's raw objective, one
# round of 300 steps.
FM = {"corrupt": "weights", "refit_bias": True, "cancel_bias": True, "eps_w": 30.0, "gc_lr": 0.3,
      "feature_ceiling": 1.0, "pairing": "nearest_same_label", "normalize_features": False,
      "fm_optimizer": "adam", "fm_lr": 0.02, "fm_steps": 300}


@pytest.fixture(scope="module")
def cache():
    return FeatureCache()


def _run(enc, ds, cache, **kw):
    r = run_job(encoder=enc, dataset=ds, device="cpu", seed=0, cache=cache, **kw)
    m = r.metrics
    print(
        f"\n{kw['attack']} eps={kw['epsilon']} beta={kw.get('beta')}: clean {m['clean_accuracy']:.4f} "
        f"target {m.get('target_accuracy', float('nan')):.4f} poisoned {m['poisoned_accuracy']:.4f} "
        f"drop {m['drop']:.4f} linf_max {m['poison_stats'].get('linf', {}).get('max', float('nan')):.3f} "
        f"match {m['poison_stats'].get('feature_match_error', {}).get('mean', float('nan')):.3f} "
        f"seconds {m['stage_seconds']['total']:.0f}"
    )
    return r


def test_gc_feature_retrains_to_the_gradpc_target(simclr_mnist, mnist5k, cache):
    r = _run(simclr_mnist, mnist5k, cache, attack="gc_feature", epsilon=0.03)
    m = r.metrics
    assert m["n_poisons"] == 120
    print(f"gc loss {m['gc_loss_initial']:.4g} -> {m['gc_loss_final']:.4g}, halvings {m['gc_step_halvings']}")
    assert m["target_accuracy"] < m["clean_accuracy"] - 0.05  # the automatic target is a real drop
    # GC realises most of the target's drop with 120 poisons: measured 17.1 of 24.7 points (clean
    # 92.0, target 67.3) on one machine and within 3 points of the target on another (the encoder
    # differs in the last bits); asserted: at least half, and never past the target by more than noise
    target_drop = m["clean_accuracy"] - m["target_accuracy"]
    assert m["drop"] >= 0.5 * target_drop
    assert m["poisoned_accuracy"] >= m["target_accuracy"] - 0.05
    assert m["gc_loss_final"] < 0.02 * m["gc_loss_initial"]  # measured 0.0027


def test_feature_matching_smaller_beta_gives_larger_poisons_that_still_match(simclr_mnist, mnist5k, cache):
    """The mechanism on mnist5k with a hand-set recipe (FM above). How much harm the defaults do,
    and that a smaller beta does more, is claimed at the catalogue's defaults on the mean over
    seeds in tests/test_claims_defaults.py: one seed of 1,000 test images is not evidence of a
    1-point difference."""
    strong = _run(simclr_mnist, mnist5k, cache, attack="feature_matching", epsilon=0.1, beta=0.05, params=FM)
    weak = _run(simclr_mnist, mnist5k, cache, attack="feature_matching", epsilon=0.1, beta=0.25, params=FM)
    assert weak.metrics["n_poisons"] == strong.metrics["n_poisons"] == 400
    for r in (weak, strong):
        m, ps = r.metrics, r.metrics["poison_stats"]
        print(f"match {ps['feature_match_error']['mean']:.3f} at bases {m['base_feature_error_mean']:.3f} "
              f"zeta^2 {ps['zeta_norm']['mean'] ** 2:.3f} zeta acc {m['zeta_poisoned_accuracy']:.4f}")
        # stage 2 hands over features inside the clean range that would do harm (measured zeta
        # accuracy 0.911: 2.6 points), labels kept by the pairing; stage 3 reaches them (match error
        # 1.5 from 4.6 at the bases) and realises almost all of that harm
        assert m["gc_feature_floor"] == 0.0 and m["gc_feature_ceiling"] == 1.0
        assert m["labels_changed_by_pairing"] == 0
        assert m["zeta_poisoned_accuracy"] < m["clean_accuracy"] - 0.015
        assert ps["feature_match_error"]["mean"] < 0.5 * m["base_feature_error_mean"]
    # Measured (seed 0): beta .25 drop 2.4 points (L_inf 2.70), beta .05 drop 2.6 (L_inf 3.19).
    # Without the ceiling GC put its harm into features no nearby image has (zeta 0.752, 18.5 points,
    # but a match error of 185 from 248) and the realised drop was 1.5 (closing note of #2).
    assert strong.metrics["poison_stats"]["linf"]["max"] > weak.metrics["poison_stats"]["linf"]["max"]
    assert strong.metrics["poison_stats"]["linf_to_base"]["mean"] > weak.metrics["poison_stats"]["linf_to_base"]["mean"]


def test_feature_matching_at_three_percent_is_reported(simclr_mnist, mnist5k, cache):
    r = _run(simclr_mnist, mnist5k, cache, attack="feature_matching", epsilon=0.03, beta=0.25, params=FM)
    m = r.metrics
    assert m["n_poisons"] == 120 and len(r.poisons) == 120
    # measured: drop 0.9 points (the paper: 6.3 on CIFAR-10), match 1.3 from 4.2 at the bases
    # (0.4 points, match 946 from 1,180, before the feature ceiling)
    assert m["poison_stats"]["feature_match_error"]["mean"] < m["base_feature_error_mean"]
    assert -0.01 <= m["drop"] <= m["clean_accuracy"] - m["target_accuracy"] + 0.05
