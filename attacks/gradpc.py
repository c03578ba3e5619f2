"""GradPC: target parameters by one normalised gradient-ascent step.

Paper: Lu, Yang, Kamath, Yu (SaTML 2024), stage 1 of the feature-targeted
attack; the parameter-corruption attack of Sun et al. (2020), as in
TobiasLee/ParamCorruption, run for one step.

Parameters (:class:`attacks.catalogue.GradPCParams`):
    eps_w (float, 1.0, > 0): L2 length of the step on (W, b) jointly.
    corrupt ("joint" | "weights", "joint"): which parameters the step moves.
    refit_bias (bool, False): re-fit b on the clean set after the step [D]. The
        step's damage can sit mostly in the bias, which bounded poisons cannot
        reproduce (each adds at most sqrt(2) to the bias gradient), so GC then
        cannot reach the target; with W-only steps and a re-fitted bias it can.
    target_accuracy (float | None): if set, eps_w is the smallest step (found by
        bisection on the *training* set, so no test label is used) whose head has
        a training accuracy at most this value.

Shapes: Z (N, d) cached clean features, y (N,), head W (K, d), b (K,).

omega_hat = omega + eps_w * g / ||g||_2, g the gradient of the mean training
loss at the clean head omega. With a frozen encoder and cached features the
"input space" and "feature space" versions coincide up to numerics. Its table
row is the accuracy of omega_hat itself: no retraining, no poisons.
"""

from __future__ import annotations

import torch

from attacks.catalogue import GradPCParams
from attacks.head import Head, accuracy, refit_bias, summed_gradient


def gradpc_target(
    clean: Head, Z: torch.Tensor, y: torch.Tensor, eps_w: float, corrupt: str = "joint", refit: bool = False
) -> Head:
    """One normalised ascent step of length eps_w on the training loss.

    corrupt: "joint" moves (W, b) along the normalised joint gradient (the paper);
    "weights" moves W only. refit: then re-fit b on (Z, y) with W fixed."""
    g = summed_gradient(clean, Z, y)
    if corrupt == "weights":
        g = Head(g.W, torch.zeros_like(g.b))
    g = g.flat()
    norm = g.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise FloatingPointError("GradPC: the clean head's gradient is zero or non-finite")
    K, d = clean.W.shape
    target = Head.from_flat(clean.flat() + eps_w * g / norm, K, d)
    return refit_bias(target, Z, y) if refit else target


def find_eps_w(
    clean: Head, Z: torch.Tensor, y: torch.Tensor, target_accuracy: float, iters: int = 30, **how
) -> float:
    """Smallest eps_w (bisection) with training accuracy <= target_accuracy."""
    lo, hi = 0.0, 1.0
    while accuracy(gradpc_target(clean, Z, y, hi, **how), Z, y) > target_accuracy:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            return 1e6
    for _ in range(iters):
        mid = (lo + hi) / 2
        if accuracy(gradpc_target(clean, Z, y, mid, **how), Z, y) > target_accuracy:
            lo = mid
        else:
            hi = mid
    return hi


def target_head(ctx, params: GradPCParams) -> tuple[Head, dict]:
    """The stage-1 target for a context (shared by GC, feature matching, GC input space, ...).

    Computed once per content key through ``ctx.stage_cache`` when the context carries one
    (:mod:`attacks.stage_cache`): it depends on the clean head and the GradPC parameters only."""
    from attacks.stage_cache import cached_stage, gradpc_parts

    def compute():
        target, info = _target_head(ctx, params)
        return {"W": target.W, "b": target.b}, info

    t, info = cached_stage(ctx, "gradpc_target", gradpc_parts(params), compute)
    return Head(t["W"], t["b"]), info


def _target_head(ctx, params: GradPCParams) -> tuple[Head, dict]:
    eps_w = params.eps_w
    how = {"corrupt": params.corrupt, "refit": params.refit_bias}
    if params.target_accuracy is not None:
        eps_w = find_eps_w(ctx.clean_head, ctx.Z_train, ctx.y_train, params.target_accuracy, **how)
    target = gradpc_target(ctx.clean_head, ctx.Z_train, ctx.y_train, eps_w, **how)
    return target, {
        "eps_w": eps_w,
        "target_accuracy": accuracy(target, ctx.Z_test, ctx.y_test),
        "target_train_accuracy": accuracy(target, ctx.Z_train, ctx.y_train),
    }


def run(ctx, params: GradPCParams, *, epsilon: float, beta: float | None, seed: int, progress=None):
    """Entry point: the target head itself is the attacked model."""
    from attacks.pipeline import AttackOutput

    target, info = target_head(ctx, params)
    return AttackOutput(target=target, extra=info)
