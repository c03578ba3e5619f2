"""Gradient Canceling in feature space (stage 2 of the feature-targeted attack).

Paper: Lu, Yang, Kamath, Yu (SaTML 2024), Eq. 14; Gradient Canceling of Lu,
Kamath, Yu (ICML 2023, watml/plim).

Parameters (:class:`attacks.catalogue.GCFeatureParams`, plus GradPC's):
    gc_steps (int, 2000, >= 1): plain gradient-descent steps on zeta.
    gc_lr (float, 0.05, > 0): relative step size; the step taken is
        gc_lr / L0, with L0 a power-iteration estimate of the objective's
        curvature at the start (finite differences of the closed-form
        gradient), cosine-decayed to 0 over gc_steps. This makes the step
        transferable across encoders whose feature scales differ [D].
    cancel_bias (bool, False): also cancel the bias gradient (plim: weights only).
    stop_loss (float, 1.0): stop once 1/2||residual||^2 < stop_loss (paper).
    subset ("random" | "first"): which eps_d*N clean points initialise zeta [D].

Shapes: zeta (n, d) with n = round(eps_d * N) >= 1, labels (n,) kept from the
clean points that initialised them (clean-label).

Divergence: a non-finite or exploding loss restores the best iterate and halves
the step; after 12 halvings the attack raises AttackDiverged. Never a silent NaN.
"""

from __future__ import annotations

import math

import torch

from attacks.catalogue import GCFeatureParams
from attacks.errors import AttackDiverged
from attacks.head import Head, gc_loss_and_grad, summed_gradient
from attacks.progress import ProgressFn


def n_poisons(epsilon: float, n_train: int) -> int:
    return max(1, int(round(epsilon * n_train)))


def choose_subset(n_train: int, n: int, how: str, seed: int) -> torch.Tensor:
    if how == "first":
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n_train, generator=gen)[:n].sort().values


def estimate_curvature(
    target: Head, G: Head, Z: torch.Tensor, y: torch.Tensor, cancel_bias: bool, iters: int = 15, seed: int = 0
) -> float:
    """Largest Hessian eigenvalue of the GC objective at Z, by power iteration on
    finite differences of the closed-form gradient (no autograd graph)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(Z.shape, generator=gen).to(Z)
    v /= v.norm()
    _, g0 = gc_loss_and_grad(target, G, Z, y, cancel_bias)
    h = 1e-3 * max(Z.norm().item(), 1.0) / math.sqrt(Z.numel())
    lam = 0.0
    for _ in range(iters):
        _, g1 = gc_loss_and_grad(target, G, Z + h * v, y, cancel_bias)
        Hv = (g1 - g0) / h
        lam = (v * Hv).sum().item()
        nrm = Hv.norm()
        if not torch.isfinite(nrm) or nrm == 0:
            break
        v = Hv / nrm
    return max(abs(lam), 1e-12)


def gradient_canceling(
    target: Head,
    G: Head,
    Z0: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float,
    cancel_bias: bool = False,
    stop_loss: float = 1.0,
    pull_to: torch.Tensor | None = None,
    pull_weight: float = 0.0,
    seed: int = 0,
    progress=None,
) -> tuple[torch.Tensor, dict]:
    """Minimise 1/2||G + sum_j grad l(z_j)||^2 over Z by cosine-decayed gradient descent.

    Z0 (n, d) is not modified. ``pull_to``/``pull_weight`` add Algorithm 1's optional
    proximal pull of zeta toward f(nu) after each step. Returns (Z, info).
    """
    Z = Z0.clone().double()
    if pull_to is not None:
        pull_to = pull_to.to(Z)
    y = y.to(Z.device)
    target64 = Head(target.W.double(), target.b.double())
    G64 = Head(G.W.double(), G.b.double())
    loss0, _ = gc_loss_and_grad(target64, G64, Z, y, cancel_bias)
    L0 = estimate_curvature(target64, G64, Z, y, cancel_bias, seed=seed)
    base = lr / L0
    best_loss, best_Z = loss0.item(), Z.clone()
    halvings, done = 0, 0
    loss = loss0
    for t in range(steps):
        eta = base * 0.5 * (1 + math.cos(math.pi * t / steps))
        loss, grad = gc_loss_and_grad(target64, G64, Z, y, cancel_bias)
        lv = loss.item()
        if not math.isfinite(lv) or lv > 10 * max(best_loss, loss0.item()):
            halvings += 1
            if halvings > 12:
                raise AttackDiverged(
                    f"Gradient Canceling diverged (loss {lv:.3g}) even with its step halved 12 times"
                )
            base /= 2
            Z = best_Z.clone()
            continue
        if lv < best_loss:
            best_loss, best_Z = lv, Z.clone()
        if lv < stop_loss:
            break
        Z = Z - eta * grad
        if pull_to is not None and pull_weight > 0:
            # proximal pull toward f(nu), in the same relative units as the step
            rho = pull_weight * lr * 0.5 * (1 + math.cos(math.pi * t / steps))
            Z = (Z + rho * pull_to) / (1 + rho)
        done = t + 1
        if progress and (t % 10 == 0 or t == steps - 1):
            progress((t + 1) / steps)
    final, _ = gc_loss_and_grad(target64, G64, Z, y, cancel_bias)
    if math.isfinite(final.item()) and final.item() <= best_loss:
        best_loss, best_Z = final.item(), Z
    if not torch.isfinite(best_Z).all():
        raise AttackDiverged("Gradient Canceling produced non-finite features")
    return best_Z.float(), {
        "gc_loss_initial": loss0.item(),
        "gc_loss_final": best_loss,
        "gc_steps_run": done,
        "gc_step_size": base,
        "gc_curvature": L0,
        "gc_step_halvings": halvings,
    }


def poisoned_features(ctx, params: GCFeatureParams, epsilon: float, seed: int, progress: ProgressFn | None = None):
    """Stages 1-2 for a context: (target head, zeta, labels, base indices, info)."""
    from attacks.gradpc import target_head

    report = progress or (lambda s, f: None)
    target, info = target_head(ctx, params)
    report("gradpc", 1.0)
    n = n_poisons(epsilon, ctx.Z_train.shape[0])
    idx = choose_subset(ctx.Z_train.shape[0], n, params.subset, seed)
    G = summed_gradient(target, ctx.Z_train, ctx.y_train)
    zeta, gc_info = gradient_canceling(
        target,
        G,
        ctx.Z_train[idx],
        ctx.y_train[idx],
        steps=params.gc_steps,
        lr=params.gc_lr,
        cancel_bias=params.cancel_bias,
        stop_loss=params.stop_loss,
        seed=seed,
        progress=lambda f: report("gc_feature", f),
    )
    clean_norm = ctx.Z_train.norm(dim=1).mean().item()
    info.update(gc_info)
    info["zeta_norm_ratio"] = zeta.norm(dim=1).mean().item() / max(clean_norm, 1e-12)
    return target, G, zeta, ctx.y_train[idx], idx, info


def run(ctx, params: GCFeatureParams, *, epsilon: float, beta: float | None, seed: int, progress=None):
    """Entry point: poisoned *features* zeta, evaluated by retraining on f(mu) + zeta."""
    from attacks.pipeline import AttackOutput

    target, _G, zeta, labels, idx, info = poisoned_features(ctx, params, epsilon, seed, progress)
    return AttackOutput(
        target=target, poison_features=zeta, poison_labels=labels, base_index=idx, zeta=zeta, extra=info
    )
