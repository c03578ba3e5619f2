"""What the input-space attacks must show on real data (issue #4). Slow: run in CI.

Setting [D]: a small_cnn (width 16) pre-trained with SimCLR on ``digits`` (1,437 train /
360 test 8x8 images, 2 epochs, seed 0) in a module fixture: ~4 s to build, against ~80 s
for the session's mnist5k encoder, and an input-space step on 43 poisons of 8x8 pixels
costs ~10 ms where 120 poisons of 28x28 through a width-64 encoder cost ~100 ms. Linear
probe (L-BFGS head): 91.9% test accuracy.

GC input runs at the catalogue's defaults (only ``constrained`` is set: both variants are rows
of the default audit): the automatic GradPC target, 2,000 steps of Adam-preconditioned descent
on the pixels with the step halved on stalls. Measured at epsilon 0.03, seeds 0-2 (run with -s
to print): clean 92.2%, target 11.7%; unconstrained drops 18.1 / 16.4 / 20.6 points (mean
18.3; L_inf to base ~15, 90% of the pixels outside the clean range), constrained 3.9 / 3.6 /
4.4 (mean 4.0, inside the range). The paper's plain descent (``gc_optimizer: "gd"``) drops 10.8
unconstrained and 4.4 constrained on the mean: weaker where it matters, which is why Adam is
the default. The paper: 29.5 vs 2.5 points on CIFAR-10.

TGDA: 100 epochs at leader_lr 0.05 (hand-set; see its test).
"""

from __future__ import annotations

import pytest

from attacks.features import FeatureCache
from attacks.pipeline import run_job
from attacks.stage_cache import StageCache

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TGDA = {"epochs": 100, "leader_lr": 0.05}


@pytest.fixture(scope="module")
def cache():
    return FeatureCache()


@pytest.fixture(scope="module")
def stages():
    return StageCache()


def _run(enc, ds, cache, attack, params, seed=0, **kw):
    r = run_job(encoder=enc, dataset=ds, attack=attack, epsilon=0.03, params=params, device="cpu", seed=seed,
                cache=cache, **kw)
    m, ps = r.metrics, r.metrics["poison_stats"]
    print(
        f"\n{attack} constrained={params.get('constrained', True)}: clean {m['clean_accuracy']:.4f} "
        f"target {m.get('target_accuracy', float('nan')):.4f} poisoned {m['poisoned_accuracy']:.4f} "
        f"drop {m['drop']:.4f} linf_max {ps['linf']['max']:.3f} l2_mean {ps['l2']['mean']:.3f} "
        f"outside {ps['fraction_outside_clean_range']:.3f} gc {m.get('gc_loss_initial', 0):.4g}->"
        f"{m.get('gc_loss_final', 0):.4g} val {m.get('val_loss_initial', 0):.4f}->{m.get('val_loss_final', 0):.4f} "
        f"attack_s {m['stage_seconds']['attack']:.1f}"
    )
    return r


def test_gc_input_unconstrained_is_far_stronger_and_far_larger(simclr_digits, digits, cache, stages):
    """At the catalogue's defaults, seeds 0-2: "far more" harm without the constraints, on the mean
    (the test set moves in steps of 0.28 points; two standard errors of a difference are ~4), and
    poisons far larger; constrained poisons stay inside the clean range."""
    runs = {c: [_run(simclr_digits, digits, cache, "gc_input", {"constrained": c}, seed=s, stage_cache=stages,
                     defences=False) for s in range(3)] for c in (False, True)}
    drops = {c: [r.metrics["drop"] for r in rs] for c, rs in runs.items()}
    mean_free, mean_con = sum(drops[False]) / 3, sum(drops[True]) / 3
    print(f"gc_input drops: unconstrained {drops[False]} (mean {mean_free:.4f}), constrained {drops[True]} "
          f"(mean {mean_con:.4f})")
    for rs in runs.values():
        for r in rs:
            m = r.metrics
            assert m["n_poisons"] == 43 and m["params"]["gc_optimizer"] == "adam"
            assert m["target_accuracy"] < m["clean_accuracy"] - 0.2  # the target is a real drop
            assert m["gc_loss_final"] < m["gc_loss_initial"]
    # measured 18.3 vs 4.0 points: asserted at about half the gap, far above the noise
    assert mean_free >= 0.09 and mean_free >= mean_con + 0.07 and mean_free >= 2 * mean_con
    assert min(drops[False]) > 0.04  # every seed above the test set's noise
    for free, con in zip(runs[False], runs[True]):
        mf, mc = free.metrics, con.metrics
        assert mf["gc_loss_final"] < mc["gc_loss_final"]
        # the poisons' magnitude: far larger (measured L_inf to base ~15 vs ~1)
        assert mf["poison_stats"]["linf"]["max"] >= 5 * mc["poison_stats"]["linf"]["max"]
        assert mf["poison_stats"]["l2_to_base"]["mean"] >= 3 * mc["poison_stats"]["l2_to_base"]["mean"]
        assert mf["poison_stats"]["fraction_outside_clean_range"] > 0.1
        # constrained poisons stay inside the clean data range
        lo, hi = mc["poison_stats"]["clean_range"]
        assert con.poisons.x.min() >= lo and con.poisons.x.max() <= hi
        assert mc["poison_stats"]["fraction_outside_clean_range"] == 0.0


def test_tgda_input_constrained_stays_in_range(simclr_digits, digits, cache):
    r = _run(simclr_digits, digits, cache, "tgda_input", TGDA)
    m = r.metrics
    assert m["n_poisons"] == 43 and m["tgda_epochs_run"] == 100
    lo, hi = m["poison_stats"]["clean_range"]
    assert r.poisons.x.min() >= lo and r.poisons.x.max() <= hi
    assert m["poison_stats"]["l2_to_base"]["mean"] > 0  # the poisons moved
    assert m["val_loss_max"] >= m["val_loss_initial"]
