"""The model-targeted solver of stage 2 (Suya et al., ICML 2021; ``solver: "mta"``): it stays in
its feasible box, keeps each poison's label on its base point, and moves the retrained victim
toward the GradPC target."""

from __future__ import annotations

import pytest
import torch

from attacks.catalogue import GCFeatureParams
from attacks.gradpc import gradpc_target
from attacks.mta_feature import feasible_box, model_targeted
from attacks.pipeline import prepare, run_job

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ctx(simclr_digits, digits):
    # a trained encoder: on random features the clean head is nearly unregularised and its
    # parameter distance to any target is dominated by directions no poison constrains
    return prepare(simclr_digits, digits, device="cpu")


def _distance(a, b) -> float:
    return (a.flat().double() - b.flat().double()).norm().item()


def test_mta_stays_feasible_and_moves_the_victim_toward_the_target(ctx):
    Z, y = ctx.Z_train, ctx.y_train
    target = gradpc_target(ctx.clean_head, Z, y, 0.5 * ctx.clean_head.flat().norm().item(), "weights", True)
    n = 70
    ceiling = 0.8 * Z.max(0).values
    zeta, labels, idx, info = model_targeted(ctx, target, n, rounds=10, steps=30, starts=8, floor=0.0,
                                             ceiling=ceiling, seed=0)
    assert zeta.shape == (n, Z.shape[1]) and labels.shape == (n,) and idx.shape == (n,)
    lo, hi = feasible_box(Z, 1.0, 0.0, ceiling)
    assert bool((zeta >= lo - 1e-6).all()) and bool((zeta <= hi + 1e-6).all())
    assert bool((zeta <= ceiling + 1e-6).all())
    assert torch.equal(y[idx], labels.to(y.device))  # paired with a clean point of its own label
    assert int(labels.min()) >= 0 and int(labels.max()) < ctx.dataset.num_classes
    # the victim, retrained to convergence on clean + poisons, is closer to the target than the clean head
    poisoned, fit = ctx.fit_victim(torch.cat([Z, zeta.to(Z)]), torch.cat([y, labels.to(y)]))
    assert fit["converged"]
    d_clean, d_poisoned = _distance(ctx.clean_head, target), _distance(poisoned, target)
    assert d_poisoned < 0.95 * d_clean
    assert info["mta_target_distance_clean"] == pytest.approx(d_clean, rel=1e-4)


def test_mta_solver_runs_through_the_pipeline(tiny_encoder, digits_small):
    assert GCFeatureParams().solver == "gc"  # the default stays Gradient Canceling
    m = run_job(encoder=tiny_encoder, dataset=digits_small, attack="gc_feature", epsilon=0.05, beta=None,
                params={"solver": "mta", "step": "relative", "eps_w_rel": 0.5, "mta_rounds": 5, "mta_steps": 20},
                device="cpu", seed=0, defences=False).metrics
    assert m["stage2_solver"] == "mta"
    assert m["n_poisons"] == round(0.05 * digits_small.x_train.shape[0])
    assert m["mta_rounds_run"] == 5 and m["victim"]["poisoned"]["converged"]
