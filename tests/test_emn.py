"""Unlearnable examples (attacks/emn.py) on a tiny real encoder and real data (fast)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import attacks.pipeline as pipeline
from attacks.catalogue import EMNParams, validate_job
from attacks.emn import perturbed_subset, run
from attacks.pipeline import prepare, run_job

FAST = {"max_rounds": 2, "pgd_steps": 3, "pgd_step": 4 / 255, "head_steps": 5, "batch_size": 64}
E2E = {**FAST, "end_to_end": True, "finetune_epochs": 1}
JOB = {"device": "cpu", "head": {"epochs": 20}}  # a short L-BFGS head keeps the pipeline runs fast


@pytest.fixture(scope="module")
def ctx(tiny_encoder, digits_small):
    return prepare(tiny_encoder, digits_small, device="cpu")


def test_poisons_stay_in_the_ball_and_the_unit_range(ctx, digits_small):
    radius = 4 / 255
    out = run(ctx, EMNParams(**FAST, radius=radius), epsilon=0.5, seed=0)
    base = digits_small.x_train[out.base_index]
    delta = out.poisons - base
    assert out.poisons.shape == base.shape and out.poisons.dtype == torch.float32
    assert delta.abs().max().item() <= radius + 1e-6
    assert out.poisons.min().item() >= 0 and out.poisons.max().item() <= 1
    # the noise is not empty: most perturbed images moved, many pixels to the full radius
    moved = delta.reshape(delta.shape[0], -1).abs().amax(1) > 0
    assert moved.float().mean().item() > 0.9
    assert (delta.abs() > radius - 1e-6).float().mean().item() > 0.1
    assert torch.equal(out.poison_labels, digits_small.y_train[out.base_index])
    assert out.replaces_base and out.evaluation is None


def test_error_minimising_pass_lowers_the_training_loss(ctx):
    out = run(ctx, EMNParams(**{**FAST, "head_steps": 20, "lr": 1.0}), epsilon=1.0, seed=0)
    # the attacker's final model: CE on x + delta below CE on the clean originals (a sign error
    # in the PGD step, i.e. error-maximising noise, would make it higher)
    assert out.extra["loss_perturbed"] < out.extra["loss_clean"], out.extra


def test_replaced_bases_keep_the_training_set_size(tiny_encoder, digits_small, monkeypatch):
    sizes = []
    real = pipeline.fit_head

    def spy(Z, y, *a, **k):
        sizes.append((Z.shape[0], y.shape[0]))
        return real(Z, y, *a, **k)

    monkeypatch.setattr(pipeline, "fit_head", spy)
    r = run_job(encoder=tiny_encoder, dataset=digits_small, attack="emn", epsilon=0.3, params=FAST, **JOB)
    N = digits_small.n_train
    # clean head, then the poisoned head: both on exactly N points
    assert sizes[:2] == [(N, N), (N, N)]
    assert r.metrics["n_poisons"] == round(0.3 * N) == len(r.poisons)
    assert len(set(r.poisons.base_index.tolist())) == len(r.poisons)
    assert "evaluated_by" not in r.metrics  # the frozen variant is evaluated by the pipeline's head retraining


def test_epsilon_one_perturbs_every_image(tiny_encoder, digits_small, monkeypatch):
    sizes = []
    real = pipeline.fit_head
    monkeypatch.setattr(pipeline, "fit_head", lambda Z, y, *a, **k: sizes.append(Z.shape[0]) or real(Z, y, *a, **k))
    r = run_job(encoder=tiny_encoder, dataset=digits_small, attack="emn", epsilon=1.0, params=FAST, **JOB)
    N = digits_small.n_train
    assert r.metrics["n_poisons"] == N and sizes[:2] == [N, N]
    assert torch.equal(r.poisons.base_index, torch.arange(N))
    assert r.metrics["poison_stats"]["linf_to_base"]["max"] <= 8 / 255 + 1e-6
    assert r.metrics["rounds"] >= 1 and 0 <= r.metrics["train_accuracy_perturbed"] <= 1


def test_end_to_end_leaves_the_encoder_alone_and_evaluates_itself(tiny_encoder, digits_small):
    before = {k: v.clone() for k, v in tiny_encoder.state_dict().items()}
    grads = [p.requires_grad for p in tiny_encoder.parameters()]
    r = run_job(encoder=tiny_encoder, dataset=digits_small, attack="emn", epsilon=1.0, params=E2E, **JOB)
    for k, v in tiny_encoder.state_dict().items():  # weights and BatchNorm running statistics
        assert torch.equal(v, before[k]), k
    assert [p.requires_grad for p in tiny_encoder.parameters()] == grads and not tiny_encoder.training
    m = r.metrics
    assert m["evaluated_by"] == "attack" and m["end_to_end"] is True
    assert 0 <= m["clean_accuracy"] <= 1 and 0 <= m["poisoned_accuracy"] <= 1
    assert m["drop"] == pytest.approx(m["clean_accuracy"] - m["poisoned_accuracy"])
    assert m["finetune_epochs"] == 1 and isinstance(m["stop_reached"], bool)
    assert m["loss_perturbed"] < m["loss_clean"]


def test_same_seed_same_poisons_other_seed_other_subset(ctx):
    p = EMNParams(**FAST)
    a = run(ctx, p, epsilon=0.2, seed=3)
    b = run(ctx, p, epsilon=0.2, seed=3)
    c = run(ctx, p, epsilon=0.2, seed=4)
    assert torch.equal(a.poisons, b.poisons) and torch.equal(a.base_index, b.base_index)
    assert a.extra == b.extra
    assert not torch.equal(a.base_index, c.base_index)


def test_end_to_end_is_deterministic(ctx):
    p = EMNParams(**{**E2E, "max_rounds": 1})
    a = run(ctx, p, epsilon=0.2, seed=1)
    b = run(ctx, p, epsilon=0.2, seed=1)
    assert torch.equal(a.poisons, b.poisons) and a.evaluation == b.evaluation


def test_subset_sizes():
    assert torch.equal(perturbed_subset(1.0, 10, 0), torch.arange(10))
    idx = perturbed_subset(0.3, 10, 0)
    assert idx.numel() == 3 and torch.equal(idx, idx.sort().values)
    assert perturbed_subset(0.001, 10, 0).numel() == 1
    with pytest.raises(ValueError):
        perturbed_subset(0.0, 10, 0)


@pytest.mark.parametrize(
    "bad",
    [
        {"radius": 0},
        {"radius": 1.5},
        {"pgd_steps": 0},
        {"pgd_step": 0},
        {"head_steps": 0},
        {"lr": 0},
        {"momentum": 1.0},
        {"weight_decay": -1e-3},
        {"stop_accuracy": 0},
        {"stop_accuracy": 1.01},
        {"max_rounds": 0},
        {"finetune_epochs": 0},
        {"encoder_lr": 0},
        {"batch_size": 0},
        {"end_to_end": "sometimes"},
        {"eps_d": 1.0},
    ],
)
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(ValidationError):
        validate_job("emn", epsilon=1.0, params=bad)


def test_invalid_job_options_are_refused(ctx):
    with pytest.raises(ValidationError):
        validate_job("emn", epsilon=0.0)
    with pytest.raises(ValidationError):
        validate_job("emn", epsilon=1.5)
    with pytest.raises(ValueError, match="takes no beta"):
        validate_job("emn", epsilon=1.0, beta=0.25)
    with pytest.raises(ValueError, match="takes no beta"):
        run(ctx, EMNParams(**FAST), epsilon=1.0, beta=0.25, seed=0)
    with pytest.raises(ValueError, match="fraction"):
        run(ctx, EMNParams(**FAST), epsilon=1.5, seed=0)
