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
from attacks.progress import checkpoint


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
        checkpoint()
        lo, hi = hi, hi * 2
        if hi > 1e6:
            return 1e6
    for _ in range(iters):
        checkpoint()
        mid = (lo + hi) / 2
        if accuracy(gradpc_target(clean, Z, y, mid, **how), Z, y) > target_accuracy:
            lo = mid
        else:
            hi = mid
    return hi


def target_head(ctx, params: GradPCParams, *, epsilon: float = 0.03, seed: int = 0) -> tuple[Head, dict]:
    """The stage-1 target for a context (shared by GC, feature matching, GC input space, ...).

    Computed once per content key through ``ctx.stage_cache`` when the context carries one
    (:mod:`attacks.stage_cache`): it depends on the clean head and the GradPC parameters, and
    under ``step: "auto"`` on the epsilon, the seed and the GC parameters its sweep runs with."""
    from attacks.stage_cache import cached_stage, gc_parts, gradpc_parts

    def compute():
        target, info = _target_head(ctx, params, epsilon, seed)
        return {"W": target.W, "b": target.b}, info

    parts = gradpc_parts(params)
    if _mode(params) == "auto":
        parts |= {**_sweep_gc_params(params).model_dump(), "epsilon": epsilon, "seed": seed}
    t, info = cached_stage(ctx, "gradpc_target", parts, compute)
    return Head(t["W"], t["b"]), info


def _mode(params: GradPCParams) -> str:
    return "bisection" if params.target_accuracy is not None else params.step


def _sweep_gc_params(params: GradPCParams):
    """The GC settings the auto sweep scores candidates with: the attack's own when it runs GC in
    feature space (its floor and ceiling included), the catalogue's otherwise."""
    from attacks.catalogue import GCFeatureParams

    if isinstance(params, GCFeatureParams):
        return GCFeatureParams(**{k: getattr(params, k) for k in GCFeatureParams.model_fields})
    return GCFeatureParams()


def _target_head(ctx, params: GradPCParams, epsilon: float, seed: int) -> tuple[Head, dict]:
    how = {"corrupt": params.corrupt, "refit": params.refit_bias}
    mode = _mode(params)
    extra: dict = {}
    norm = ctx.clean_head.flat().norm().item()
    if mode == "bisection":
        eps_w = find_eps_w(ctx.clean_head, ctx.Z_train, ctx.y_train, params.target_accuracy, **how)
    elif mode == "relative":
        eps_w = params.eps_w_rel * norm
    elif mode == "absolute":
        eps_w = params.eps_w
    else:
        eps_w, how, extra = _auto_target(ctx, params, epsilon, seed, norm)
    target = gradpc_target(ctx.clean_head, ctx.Z_train, ctx.y_train, eps_w, **how)
    clean_train = accuracy(ctx.clean_head, ctx.Z_train, ctx.y_train)
    info = {
        "gradpc_step": mode,
        "eps_w": eps_w,
        "eps_w_relative": eps_w / max(norm, 1e-30),
        "gradpc_corrupt": how["corrupt"],
        "gradpc_refit_bias": how["refit"],
        "clean_head_norm": norm,
        "target_accuracy": accuracy(target, ctx.Z_test, ctx.y_test),
        "target_train_accuracy": accuracy(target, ctx.Z_train, ctx.y_train),
        **extra,
    }
    if info["target_train_accuracy"] > clean_train - 0.05:
        info.setdefault("warnings", []).append(
            f"GradPC target is only {100 * (clean_train - info['target_train_accuracy']):.1f} points below the clean "
            f"head on the training set (step {mode}, eps_w {eps_w:.3g}): an attack aimed at it can do little harm"
            + ("; no stronger target was reachable in the sweep" if mode == "auto" else "")
        )
    return target, info


def _auto_target(ctx, params: GradPCParams, epsilon: float, seed: int, norm: float):
    """Sweep the fixed grid of relative steps and corruptions; keep the candidate whose victim, retrained
    on clean + a short GC run's poisons, has the lowest training accuracy (ties: the smaller step)."""
    from attacks.catalogue import AUTO_CORRUPTIONS, AUTO_RELATIVE_STEPS
    from attacks.gc_feature import choose_subset, feature_ceiling, feature_floor, gradient_canceling, n_poisons
    from attacks.head import objective_gradient

    gcp = _sweep_gc_params(params)
    explicit = {"corrupt", "refit_bias"} & params.model_fields_set
    modes = [(params.corrupt, params.refit_bias)] if explicit else list(AUTO_CORRUPTIONS)
    Z, y = ctx.Z_train, ctx.y_train
    N = Z.shape[0]
    n = n_poisons(epsilon, N)
    idx = choose_subset(N, n, gcp.subset, seed).to(Z.device)
    floor, ceiling = feature_floor(gcp.feature_floor, Z), feature_ceiling(gcp.feature_ceiling, Z)
    scale = Z.norm(dim=1).mean().item()
    lam = ctx.victim_lambda()
    rows = []
    for corrupt, refit in modes:
        for r in AUTO_RELATIVE_STEPS:
            checkpoint()
            t = gradpc_target(ctx.clean_head, Z, y, r * norm, corrupt, refit)
            G = objective_gradient(t, Z, y, lam, N + n)
            zeta, _ = gradient_canceling(
                t, G, Z[idx], y[idx], steps=params.auto_gc_steps, lr=gcp.gc_lr, cancel_bias=gcp.cancel_bias,
                stop_loss=gcp.stop_loss, feature_scale=scale, floor=floor, ceiling=ceiling,
            )
            h, _ = ctx.fit_victim(torch.cat([Z, zeta.to(Z)]), torch.cat([y, y[idx]]), seed, quick=True)
            rows.append({"relative_step": r, "corrupt": corrupt, "refit_bias": refit,
                         "target_train_accuracy": accuracy(t, Z, y),
                         "retrained_train_accuracy": accuracy(h, Z, y)})
    best = min(rows, key=lambda row: (row["retrained_train_accuracy"], row["relative_step"]))
    how = {"corrupt": best["corrupt"], "refit": best["refit_bias"]}
    return best["relative_step"] * norm, how, {"gradpc_sweep": rows}


def run(ctx, params: GradPCParams, *, epsilon: float, beta: float | None, seed: int, progress=None):
    """Entry point: the target head itself is the attacked model."""
    from attacks.pipeline import AttackOutput

    target, info = target_head(ctx, params, epsilon=epsilon, seed=seed)
    return AttackOutput(target=target, extra=info)
