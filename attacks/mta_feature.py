"""Model-targeted poisoning in feature space: stage 2's alternative to Gradient Canceling.

Paper: Suya, Mahloujifar, Suri, Evans, Tian (ICML 2021), "Model-Targeted Poisoning Attacks
with Provable Convergence", Algorithm 1, for a convex victim: our L2-regularised multinomial
logistic regression (:mod:`attacks.head`).

Selected by ``solver: "mta"`` on :class:`attacks.catalogue.GCFeatureParams` (gc_feature and
every attack that runs stage 2 through :func:`attacks.gc_feature.poisoned_features`).

Algorithm: with theta_t the GradPC target and n = round(eps * N) poisons to place, repeat
``mta_rounds`` times: train the victim on clean + the poisons so far (the job's recipe and
clean feature scale, L-BFGS warm-started from the previous head), giving theta_k; find
feasible (z, y) maximising CE(theta_k; z, y) - CE(theta_t; z, y); add the best ones. The
argmax of the paper is found approximately: projected sign-gradient ascent (cosine-decayed
steps, a fraction of the box width) from ``mta_starts`` clean features for every label, in
closed form (d CE / dz = W^T (softmax(Wz + b) - e_y)); a round adds the k = n / mta_rounds
best distinct end points (batching the paper's one point per retrain).

Feasible set [D]: the box of the clean training features' per-coordinate range, its upper end
(and its lower end where negative) scaled by ``mta_box``, intersected with the feature floor
and ceiling of the job. Unlike GC the poisons' labels are chosen (all classes are searched);
each poison's base index is the nearest clean point of its label, so pairings that keep the
label keep the poison's.

Shapes: Z (N, d) clean features, y (N,); returns zeta (n, d) float32, labels (n,), base
indices (n,), info.
"""

from __future__ import annotations

import math

import torch

from attacks.head import Head, fit_head
from attacks.progress import checkpoint


def feasible_box(Z: torch.Tensor, multiple: float = 1.0, floor: float | None = None,
                 ceiling: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi), each (d,): the clean per-coordinate range scaled by ``multiple``, within floor/ceiling."""
    lo, hi = Z.min(0).values, Z.max(0).values
    hi = torch.where(hi > 0, multiple * hi, hi)
    lo = torch.where(lo < 0, multiple * lo, lo)
    if floor is not None:
        lo = lo.clamp(min=floor)
    if ceiling is not None:
        hi = torch.minimum(hi, ceiling.to(hi))
    return lo, torch.maximum(hi, lo)


def loss_gap_ascent(current: Head, target: Head, starts: torch.Tensor, labels: torch.Tensor,
                    lo: torch.Tensor, hi: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected sign-gradient ascent on CE(current; z, y) - CE(target; z, y) over the box, from
    ``starts`` (m, d) with labels (m,). Returns (best z per start (m, d), its gap (m,))."""
    m = starts.shape[0]
    rows = torch.arange(m, device=starts.device)
    Z = torch.minimum(torch.maximum(starts.double(), lo), hi)
    width = hi - lo
    Wc, bc, Wt, bt = current.W.double(), current.b.double(), target.W.double(), target.b.double()

    def gap_and_grad(Z):
        lc, lt = torch.addmm(bc, Z, Wc.T), torch.addmm(bt, Z, Wt.T)
        gap = (torch.logsumexp(lc, 1) - lc[rows, labels]) - (torch.logsumexp(lt, 1) - lt[rows, labels])
        Pc, Pt = torch.softmax(lc, 1), torch.softmax(lt, 1)
        Pc[rows, labels] -= 1.0
        Pt[rows, labels] -= 1.0
        return gap, Pc @ Wc - Pt @ Wt

    best_gap, best_Z = None, Z.clone()
    for t in range(steps):
        checkpoint()
        gap, grad = gap_and_grad(Z)
        if best_gap is None:
            best_gap = gap.clone()
        better = gap > best_gap
        best_gap = torch.where(better, gap, best_gap)
        best_Z[better] = Z[better]
        alpha = 0.1 * 0.5 * (1 + math.cos(math.pi * t / steps))
        Z = torch.minimum(torch.maximum(Z + alpha * width * grad.sign(), lo), hi)
    gap, _ = gap_and_grad(Z)
    better = gap > best_gap
    best_gap = torch.where(better, gap, best_gap)
    best_Z[better] = Z[better]
    return best_Z, best_gap


def _nearest_same_label(zeta: torch.Tensor, labels: torch.Tensor, Z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = torch.empty(zeta.shape[0], dtype=torch.long)
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().flatten()
        pool = (y == c).nonzero().flatten()
        out[rows.cpu()] = pool[torch.cdist(zeta[rows].to(Z), Z[pool]).argmin(1)].cpu()
    return out


def model_targeted(ctx, target: Head, n: int, *, rounds: int, steps: int, starts: int, box: float = 1.0,
                   floor: float | None = None, ceiling: torch.Tensor | None = None, seed: int = 0,
                   progress=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Suya et al.'s model-targeted attack against the context's victim: (zeta, labels, base idx, info)."""
    Z, y = ctx.Z_train, ctx.y_train
    K = ctx.dataset.num_classes
    lo, hi = feasible_box(Z.double(), box, floor, ceiling.double() if ceiling is not None else None)
    gen = torch.Generator().manual_seed(seed)
    target = Head(target.W.to(Z), target.b.to(Z))
    recipe = ctx.recipe
    quick = recipe.model_copy(update={"tol": max(recipe.tol, 1e-3), "max_iter": min(recipe.max_iter, 300)}) \
        if recipe.optimizer == "lbfgs" else recipe
    head = ctx.clean_head
    Zp = torch.empty(0, Z.shape[1], dtype=torch.float64, device=Z.device)
    yp = torch.empty(0, dtype=torch.long, device=Z.device)
    dist0 = (head.flat().double() - target.flat().double()).norm().item()
    rounds = min(rounds, n)
    gaps = []
    for r in range(rounds):
        checkpoint()
        if progress:
            progress(r / rounds)
        if r > 0:  # theta_k: the victim on clean + the poisons so far (round 0: the clean head)
            head, _ = fit_head(torch.cat([Z, Zp.to(Z)]), torch.cat([y, yp]), K, quick, seed,
                               scale=ctx.feature_scale, init=head if recipe.optimizer == "lbfgs" else None)
        k = n * (r + 1) // rounds - n * r // rounds
        pick = torch.randint(Z.shape[0], (starts,), generator=gen).to(Z.device)
        S = Z[pick].double().repeat(K, 1)
        labels = torch.arange(K, device=Z.device).repeat_interleave(starts)
        cand, gap = loss_gap_ascent(head, target, S, labels, lo, hi, steps)
        order = gap.argsort(descending=True)
        # the k best end points, repeating the best ones when there are fewer than k candidates
        chosen = order[torch.arange(k, device=order.device) % len(order)]
        Zp = torch.cat([Zp, cand[chosen]])
        yp = torch.cat([yp, labels[chosen]])
        gaps.append(gap[order[0]].item())
    if progress:
        progress(1.0)
    if not torch.isfinite(Zp).all():
        from attacks.errors import AttackDiverged

        raise AttackDiverged("the model-targeted attack produced non-finite features")
    zeta = Zp.float()
    idx = _nearest_same_label(zeta, yp, Z, y)
    info = {"mta_rounds_run": rounds, "mta_loss_gap_first": gaps[0], "mta_loss_gap_last": gaps[-1],
            "mta_target_distance_clean": dist0,
            "mta_target_distance_last": (head.flat().double() - target.flat().double()).norm().item()}
    return zeta, yp.cpu(), idx, info
