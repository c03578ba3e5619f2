"""What the input-space attacks must show on real data (issue #4). Slow: run in CI.

Setting [D]: a small_cnn (width 16) pre-trained with SimCLR on ``digits`` (1,437 train /
360 test 8x8 images, 2 epochs, seed 0) in a module fixture: ~4 s to build, against ~80 s
for the session's mnist5k encoder, and an input-space step on 43 poisons of 8x8 pixels
costs ~10 ms where 120 poisons of 28x28 through a width-64 encoder cost ~100 ms. Linear
probe (L-BFGS head): 91.9% test accuracy.

Target: GradPC W-only with the bias re-fitted (``corrupt="weights", refit_bias=True``) and
eps_w by bisection to 60% training accuracy. The joint step's damage sits mostly in the
bias, which no bounded set of poisons can cancel (see GradPCParams.refit_bias).

Step counts: 1,000 GC steps at gc_lr 0.3 per GC run and 100 TGDA epochs. Measured on this
setting (CPU, one thread) before they were fixed: the unconstrained residual falls from
4.4e3 to ~3.2e3 by 300 steps and barely further by 1,000, so 1,000 is where more steps
stop paying; gc_lr 1 and 3 needed step halvings and ended higher. Each GC run takes
~10 s, the TGDA run ~10 s, the whole module well under the 3-minute budget on an idle
2-core machine.

Measured (seed 0): clean 91.9%, target 58.3%; GC input unconstrained 88.9% (drop 3.1 points,
L_inf up to ~14, half the pixels outside the clean range), constrained 90.0% (drop 1.9
points, inside the range). Plain gradient descent on the pixels stalls: over seeds 0-3 it is
1.9 vs 1.1 points on average. With the Adam-preconditioned step (gc_optimizer "adam", 3,000
steps, ~4 s a run) the unconstrained attack drops 5.1 points on average against 1.6
constrained, larger at every seed: that is the "far more" asserted, with poisons far larger
(>= 5x L_inf, >= 3x distance to base) and constrained poisons of both attacks inside the
clean range. Still far below the paper's 29.5 vs 2.5 points on CIFAR-10: feature-space GC
itself reaches only 79-82% against the 58% target with 43 poisons. The numbers are printed
(run with -s).
"""

from __future__ import annotations

import pytest
import torch

from attacks.features import FeatureCache
from attacks.pipeline import run_job

pytestmark = pytest.mark.slow

TARGET = {"target_accuracy": 0.6, "corrupt": "weights", "refit_bias": True}
GC = {**TARGET, "gc_steps": 1000, "gc_lr": 0.3}
TGDA = {"epochs": 100, "leader_lr": 0.05}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small ops: one thread is as fast on an idle machine, and immune to OpenMP spin-waits on a shared one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    from attacks.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="module")
def simclr_digits(digits, _one_thread):
    from attacks.encoders import EncoderSpec
    from attacks.pretrain import SimCLRConfig, pretrain_simclr

    spec = EncoderSpec(arch="small_cnn", in_channels=1, width=16)
    return pretrain_simclr(spec, digits.x_train, SimCLRConfig(epochs=2, batch_size=128, seed=0, device="cpu"))


@pytest.fixture(scope="module")
def cache():
    return FeatureCache()


def _run(enc, ds, cache, attack, params, seed=0):
    r = run_job(encoder=enc, dataset=ds, attack=attack, epsilon=0.03, params=params, device="cpu", seed=seed,
                cache=cache)
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


def test_gc_input_unconstrained_is_far_stronger_and_far_larger(simclr_digits, digits, cache):
    """The paper's plain gradient descent on the pixels (seed 0), then the Adam-preconditioned step
    over four seeds: "far more" is a statement about the attack at its strength, and a single
    360-image test set moves in steps of 0.28 points, so the drops are averaged."""
    free = _run(simclr_digits, digits, cache, "gc_input", {**GC, "constrained": False})
    con = _run(simclr_digits, digits, cache, "gc_input", {**GC, "constrained": True})
    mf, mc = free.metrics, con.metrics
    assert mf["n_poisons"] == mc["n_poisons"] == 43
    assert mf["target_accuracy"] < mf["clean_accuracy"] - 0.2  # the target is a real drop
    # the residual really moved, more without the constraints
    assert mf["gc_loss_final"] < 0.8 * mf["gc_loss_initial"]
    assert mf["gc_loss_final"] < mc["gc_loss_final"]
    # Plain GD: stronger, not far stronger (measured 3.1 vs 1.9 points at seed 0; over seeds 0-3
    # 1.9 vs 1.1 on average, and seed 3 the other way round: 0.3 vs 1.1).
    assert mf["drop"] >= 0.02
    assert mf["drop"] > mc["drop"]
    # Adam on the pixels, 3,000 steps (gc_optimizer "adam"), seeds 0-3. Measured: unconstrained 6.9,
    # 5.8, 3.1, 4.4 points (mean 5.1), constrained 1.9, 0.3, 1.9, 2.2 (mean 1.6): 3.2x on average and
    # larger at every seed.
    adam = {**GC, "gc_optimizer": "adam", "gc_steps": 3000}
    drops = {c: [_run(simclr_digits, digits, cache, "gc_input", {**adam, "constrained": c}, seed=s).metrics["drop"]
                 for s in range(4)] for c in (False, True)}
    mean_free, mean_con = sum(drops[False]) / 4, sum(drops[True]) / 4
    print(f"adam drops: unconstrained {drops[False]} (mean {mean_free:.4f}), constrained {drops[True]} "
          f"(mean {mean_con:.4f})")
    assert mean_free >= 0.04 and mean_free >= 2.5 * mean_con
    assert all(f > c for f, c in zip(drops[False], drops[True]))
    # The poisons' magnitude: far larger.
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
