"""Gradient Canceling in feature space (stage 2 of the feature-targeted attack).

Paper: Lu, Yang, Kamath, Yu (SaTML 2024), Eq. 14; Gradient Canceling of Lu,
Kamath, Yu (ICML 2023, watml/plim).

Parameters (:class:`attacks.catalogue.GCFeatureParams`, plus GradPC's):
    gc_steps (int, 2000, >= 1): plain gradient-descent steps on zeta.
    gc_lr (float, 0.1, > 0): relative step size. The step taken is
        eta_t = gc_lr * s / ||residual_0|| * (1 + cos(pi t / T)) / 2, with s the
        mean clean feature norm and residual_0 the initial gradient residual, so
        that a first step moves a poison by about gc_lr * s: the same value
        transfers across encoders, feature scales and dataset sizes [D]. On the
        project's SimCLR mnist5k encoder (eps_w 1, eps 0.03), 0.1 reached the
        target within 1 point with zeta ~3.5x the clean norm (the paper: ~4x);
        0.3 overshot.
    cancel_bias (bool, False): also cancel the bias gradient (plim: weights only).
    stop_loss (float, 1.0): stop once 1/2||residual||^2 < stop_loss (paper).
    subset ("random" | "first"): which eps_d*N clean points initialise zeta [D].
    feature_floor ("none" | "zero" | "auto", "none" here, "auto" for the attacks that
        invert zeta into images) [D]: project every step onto zeta >= 0. Features of
        ReLU-pooled encoders (small_cnn, ResNets) are never negative, so a negative
        coordinate of zeta is reachable by no image. Measured on the project's SimCLR
        mnist5k encoder (eps 0.1, W-only eps_w 30 target): unconstrained, 18% of zeta's
        coordinates were negative and carried 49% of its norm, and clamping them to zero
        undid most of the harm (retrained accuracy 0.872 -> 0.928); GC with the floor
        found zeta as harmful that an encoder can produce (0.752 at gc_lr 0.3).

Solver: ``solver: "mta"`` replaces Gradient Canceling by the model-targeted attack of Suya et
al. (ICML 2021, :mod:`attacks.mta_feature`), with the same output (zeta, labels, base indices);
the GC-only knobs (gc_steps, gc_lr, stop_loss, subset, cancel_bias) are then unused.

Shapes: zeta (n, d) with n = round(eps_d * N) >= 1, labels (n,) kept from the
clean points that initialised them (clean-label).

Step-size control (APGD-style, no tuning): a non-finite or exploding loss, or a window of
steps (5% of the budget) that lowers the best loss by less than 1%, halves the step and
restarts from the best iterate. The answer is the best iterate; it is finite by construction
(a non-finite result raises AttackDiverged, never a silent NaN).
"""

from __future__ import annotations

import math

import torch

from attacks.catalogue import GCFeatureParams
from attacks.errors import AttackDiverged
from attacks.head import GCStep, Head, gc_loss_and_grad, objective_gradient
from attacks.progress import ProgressFn, checkpoint


def n_poisons(epsilon: float, n_train: int) -> int:
    return max(1, int(round(epsilon * n_train)))


def choose_subset(n_train: int, n: int, how: str, seed: int) -> torch.Tensor:
    if how == "first":
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n_train, generator=gen)[:n].sort().values


def feature_floor(how: str, Z: torch.Tensor) -> float | None:
    """The lower bound GC keeps zeta above: 0 for "zero", and for "auto" when every clean
    feature is >= 0 (ReLU-pooled encoders); None (unbounded) otherwise."""
    if how == "zero" or (how == "auto" and bool((Z >= 0).all())):
        return 0.0
    return None


def feature_ceiling(multiple: float | None, Z: torch.Tensor) -> torch.Tensor | None:
    """Per-coordinate upper bound for zeta: ``multiple`` times each coordinate's clean maximum."""
    return None if multiple is None else multiple * Z.max(0).values


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
    feature_scale: float | None = None,
    floor: float | None = None,
    ceiling: torch.Tensor | None = None,
    progress=None,
) -> tuple[torch.Tensor, dict]:
    """Minimise 1/2||G + sum_j grad l(z_j)||^2 over Z by cosine-decayed gradient descent.

    Returns the iterate with the lowest objective (GC's own criterion).

    Z0 (n, d) is not modified. ``pull_to``/``pull_weight`` add Algorithm 1's optional
    proximal pull of zeta toward f(nu) after each step; ``floor`` projects each step onto
    Z >= floor (projected gradient descent). Returns (Z, info).
    """
    Z = Z0.clone().double()
    if ceiling is not None:
        ceiling = ceiling.to(Z)
        Z = torch.minimum(Z, ceiling)
    if pull_to is not None:
        pull_to = pull_to.to(Z)
    y = y.to(Z.device)
    target64 = Head(target.W.double(), target.b.double())
    G64 = Head(G.W.double(), G.b.double())
    # One step, replayed from a CUDA graph on a GPU (the eager closed form on the CPU).
    step = GCStep(target64, G64, y, like=Z, cancel_bias=cancel_bias)
    loss0 = step(Z)[0].clone()
    # Scale-free step: the first steps move a poison by about lr * (its feature norm
    # scale), whatever the encoder's feature scale or the size of the clean set.
    scale = feature_scale if feature_scale is not None else Z.norm(dim=1).mean().item()
    residual = math.sqrt(2 * max(loss0.item(), 1e-30))
    base = lr * scale / residual
    pulling = pull_to is not None and pull_weight > 0
    # With the pull the GC loss may rise on purpose (toward f(nu)'s loss): that is not divergence,
    # and the result is the last iterate, not the one with the lowest GC loss.
    ref = loss0.item()
    if pulling:
        ref = max(ref, gc_loss_and_grad(target64, G64, pull_to, y, cancel_bias)[0].item())
    best_loss, best_Z = loss0.item(), Z.clone()
    halvings, done = 0, 0
    # Step-size control in the manner of APGD (Croce & Hein 2020): every ``window`` steps, a run that
    # has not lowered its best loss by 1% halves its step and restarts from its best iterate; an
    # exploding or non-finite loss does the same at once. No exception: the best iterate is the answer.
    window = max(10, steps // 20)
    mult, mark = 1.0, best_loss
    loss = loss0
    for t in range(steps):
        checkpoint()
        if progress and t % 10 == 0:
            progress(t / steps)
        eta = mult * base * 0.5 * (1 + math.cos(math.pi * t / steps))
        loss, grad = step(Z)
        lv = loss.item()
        if not math.isfinite(lv) or lv > 10 * max(best_loss, ref) or not bool(torch.isfinite(grad).all()):
            halvings += 1
            mult /= 2
            Z = best_Z.clone()
            if mult < 2.0 ** -40:
                break
            continue
        if lv < best_loss:
            best_loss, best_Z = lv, Z.clone()
        if lv < stop_loss:
            break
        if not pulling and t > 0 and t % window == 0:
            if best_loss > 0.99 * mark:
                halvings += 1
                mult /= 2
                Z = best_Z.clone()
            mark = best_loss
        Z = Z - eta * grad
        if pulling:
            # proximal pull toward f(nu), in the same relative units as the step
            rho = pull_weight * lr * 0.5 * (1 + math.cos(math.pi * t / steps))
            Z = (Z + rho * pull_to) / (1 + rho)
        if floor is not None:
            Z = Z.clamp_(min=floor)
        if ceiling is not None:
            Z = torch.minimum(Z, ceiling)
        done = t + 1
    if progress:
        progress(1.0)
    final = step(Z)[0].clone()
    if math.isfinite(final.item()) and (pulling or final.item() <= best_loss):
        best_loss, best_Z = final.item(), Z
    if not torch.isfinite(best_Z).all():
        raise AttackDiverged("Gradient Canceling produced non-finite features")
    return best_Z.float(), {
        "gc_loss_initial": loss0.item(),
        "gc_loss_final": best_loss,
        "gc_steps_run": done,
        "gc_step_size": base,
        "gc_step_final_multiplier": mult,
        "gc_step_halvings": halvings,
    }


def poisoned_features(ctx, params: GCFeatureParams, epsilon: float, seed: int, progress: ProgressFn | None = None):
    """Stages 1-2 for a context: (target head, zeta, labels, base indices, info).

    Both stages go through ``ctx.stage_cache`` when the context carries one
    (:mod:`attacks.stage_cache`): zeta depends on the target, the GC parameters,
    epsilon and the seed, so every beta of feature matching and the gc_feature row
    of an audit share one Gradient Canceling run."""
    from attacks.gradpc import target_head
    from attacks.stage_cache import cached_stage, gc_parts

    report = progress or (lambda s, f: None)
    target, info = target_head(ctx, params, epsilon=epsilon, seed=seed)
    report("gradpc", 1.0)
    N = ctx.Z_train.shape[0]
    n = n_poisons(epsilon, N)
    # the victim's objective (its L2 term included) over clean + poisons: what GC must cancel
    G = objective_gradient(target, ctx.Z_train, ctx.y_train, ctx.victim_lambda(), N + n)

    floor = feature_floor(params.feature_floor, ctx.Z_train)
    ceiling = feature_ceiling(params.feature_ceiling, ctx.Z_train)

    def compute_mta():
        from attacks.mta_feature import model_targeted

        zeta, labels, idx, mta_info = model_targeted(
            ctx, target, n, rounds=params.mta_rounds, steps=params.mta_steps, starts=params.mta_starts,
            box=params.mta_box, floor=floor, ceiling=ceiling, seed=seed,
            progress=lambda f: report("gc_feature", f),
        )
        clean_norm = ctx.Z_train.norm(dim=1).mean().item()
        mta_info["zeta_norm_ratio"] = zeta.norm(dim=1).mean().item() / max(clean_norm, 1e-12)
        return {"zeta": zeta, "idx": idx, "labels": labels}, mta_info

    def compute():
        idx = choose_subset(N, n, params.subset, seed)
        zeta, gc_info = gradient_canceling(
            target,
            G,
            ctx.Z_train[idx],
            ctx.y_train[idx],
            steps=params.gc_steps,
            lr=params.gc_lr,
            cancel_bias=params.cancel_bias,
            stop_loss=params.stop_loss,
            feature_scale=ctx.Z_train.norm(dim=1).mean().item(),
            floor=floor,
            ceiling=ceiling,
            progress=lambda f: report("gc_feature", f),
        )
        clean_norm = ctx.Z_train.norm(dim=1).mean().item()
        gc_info["zeta_norm_ratio"] = zeta.norm(dim=1).mean().item() / max(clean_norm, 1e-12)
        return {"zeta": zeta, "idx": idx}, gc_info

    # keyed by the floor itself, so "auto" and "zero" (or "none") share a run when they agree
    parts = {**gc_parts(params), "feature_floor": floor, "epsilon": epsilon, "seed": seed}
    out, gc_info = cached_stage(ctx, "gc_features", parts, compute_mta if params.solver == "mta" else compute)
    report("gc_feature", 1.0)
    zeta, idx = out["zeta"], out["idx"].cpu()
    # GC keeps its base points' labels; mta chooses them (its base points share them)
    labels = out["labels"].to(ctx.y_train.device) if "labels" in out else ctx.y_train[idx]
    info.update(gc_info)
    info["gc_feature_floor"] = floor
    info["gc_feature_ceiling"] = params.feature_ceiling
    info["stage2_solver"] = params.solver
    return target, G, zeta, labels, idx, info


def run(ctx, params: GCFeatureParams, *, epsilon: float, beta: float | None, seed: int, progress=None):
    """Entry point: poisoned *features* zeta, evaluated by retraining on f(mu) + zeta."""
    from attacks.pipeline import AttackOutput

    target, _G, zeta, labels, idx, info = poisoned_features(ctx, params, epsilon, seed, progress)
    return AttackOutput(
        target=target, poison_features=zeta, poison_labels=labels, base_index=idx, zeta=zeta, extra=info
    )
