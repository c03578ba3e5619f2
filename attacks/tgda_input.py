"""Total Gradient Descent Ascent in input space, with a frozen encoder.

Paper: Lu, Yang, Kamath, Yu (SaTML 2024), Section 3.2, Eqs. 4-7 ("TGDA input
space attack"); TGDA of Lu, Kamath, Yu (ICML 2022, watml/TGDA-Attack).

Parameters (:class:`attacks.catalogue.TGDAParams`). Units [D]: the leader step and the
penalty are both in units of the clean pixel range r = hi - lo, so that neither depends on
the encoder, the feature scale or the size of the total derivative (issue #12: the former
normalised step made the proximal weight eta * penalty 30-58 per step, pinning the poisons
to their bases, mean L2 to base 0.0014, and the drop was nil):
    constrained (bool, True): the paper's "constr.": a proximity penalty and clipping of
        nu to the clean data range after every step. False: neither.
    penalty (float, 2.0): the proximal step of penalty/2 ||nu - mu'||^2 taken with the
        leader's own step eta (nu <- (nu + eta*penalty*mu') / (1 + eta*penalty)). Against
        an Adam direction of at most about 1 per pixel it settles a pixel at most
        r / penalty from its base, whatever eta: 2 is half the range.
    epochs (int, 200): leader epochs (paper: 200); one leader step per mini-batch of
        batch_size poisons per epoch (reference: a step per mini-batch), so the budget
        is epochs * ceil(n / batch_size) leader steps (600 for 144 poisons).
    leader_lr (float, 0.05): Adam on the pixels of each mini-batch (its own moments),
        a step of about leader_lr * r per pixel, cosine-decayed over the epochs. The
        reference steps a generator's weights with lr 0.01; here nu is optimised
        directly ([D] in ATTACKS.md).
    follower ("lbfgs"), follower_steps (int, 10): the defender is the victim: its
        objective mean CE + lambda/2 ||W||^2 (lambda = ctx.victim_lambda(), the same
        clean feature scale) over f(mu_train) and f(nu), re-solved by warm-started
        float64 L-BFGS for follower_steps iterations after every leader step, so the
        implicit-function total derivative is taken near the minimiser it assumes.
        "gd": the reference's follower_steps gradient steps of follower_lr / m2.
    warmup_steps (int, 200): L-BFGS iterations before the game (the defender's best
        response to mu'). Every epoch-end state, the last one included, is scored after
        follower_steps more, so all validation losses are measured alike.
    cg_iters (int, 16), cg_damping (float, 1e-3): conjugate gradient on
        (H + lambda P_W + cg_damping * m2 * I) u = v, H the mean-CE Hessian by the
        closed-form HVP, P_W the projection on W, m2 = mean ||[z; 1]||^2 [D].
    val_fraction (float, 0.3): the attacker's validation set [D]. The reference
        takes 30% of every batch; here a seeded 30% of the clean training set is
        held out once as mu~ (the attacker's validation set) and the defender
        trains on the other 70% plus the poisons. The poisons' base images are
        drawn from the whole training set (the same seeded subset as gc_input, so
        the two attacks start from the same mu').
    batch_size (int, 64): poisons per leader mini-batch and encoder pass.
    subset ("random" | "first"): which clean images initialise nu.

One leader step, mini-batch B (no double backprop, no ``create_graph``):
    Z_B = f(nu_B), kept in the poison feature table Z_p    (one forward with grad)
    omega <- L-BFGS(l_train, from omega)                  (follower_steps iterations)
    v = grad_omega l_val(omega)                           (closed form)
    u ~= (H + lambda P_W + damping I)^-1 v                (CG, H v by attacks.head.hvp)
    D_B = -(1/n_tot) J_f(nu_B)^T C_B,  C = d/dZ_p <sum_j grad_omega l(z_j), u>
    nu_B <- nu_B + eta_t r Adam_B(D_B), then the proximal step and the clip.
The result is the epoch-end iterate with the highest validation loss at the defender's
response (AutoAttack's best iterate); ``extra`` records the strength of the run: leader
steps, validation losses (initial, best, final), the follower's last gradient, and the
poisons' mean L_inf / L2 distance to their bases.

Mixed-term closed form (derived here; checked in float64 against autograd and
finite differences in tests/test_input_attacks.py): for one point,
grad_W = (p - e_y) z^T, grad_b = p - e_y, so <grad, u> = (p - e_y)^T (U_W z + u_b)
and d/dz = U_W^T (p - e_y) + W^T J (U_W z + u_b), J = diag(p) - p p^T.
Vectorised: S = Z U_W^T + 1 u_b^T, T = P*S - P*rowsum(P*S), C = R U_W + T W.

Returns nu (n, C, H, W) float32, labels (n,) of mu' (clean-label),
base indices, zeta = f(nu) (n, d), and target = None (TGDA has no target
parameters; the defender's final head is summarised in ``extra`` only).

Divergence: non-finite features, gradients or defender weights restore the last
finite state and halve the leader step; after 12 halvings the attack raises
AttackDiverged. Never a silent NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from attacks.adam import AdamDirection
from attacks.catalogue import TGDAParams
from attacks.errors import AttackDiverged
from attacks.gc_feature import choose_subset, n_poisons
from attacks.gc_input import ChunkedEncoder, constrain
from attacks.head import Head, accuracy, hvp, residuals, summed_gradient
from attacks.progress import ProgressFn, checkpoint

__all__ = ["attacker_grad_autograd", "conjugate_gradient", "mixed_cotangent", "run", "tgda", "total_derivative_features"]


def mixed_cotangent(head: Head, Z: torch.Tensor, y: torch.Tensor, U: Head) -> torch.Tensor:
    """d/dZ of <sum_j grad_omega CE(z_j, y_j), U> at ``head``: (n, d).

    The mixed second derivative grad^2_{omega z} of the summed loss, applied to U
    (one row per point): C = R U_W + T W with S = Z U_W^T + u_b, T = P*S - P*rowsum(P*S).
    """
    P, R = residuals(head, Z, y)
    S = Z @ U.W.T + U.b
    PS = P * S
    T = PS - P * PS.sum(1, keepdim=True)
    return R @ U.W + T @ head.W


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int,
                       tol: float = 1e-10) -> torch.Tensor:
    """Approximate A^-1 b for a symmetric positive (semi-)definite A, from x = 0."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum()
    b2 = rr.item()
    for _ in range(iters):
        checkpoint()
        if rr.item() <= tol * tol * max(b2, 1e-300):
            break
        Ap = matvec(p)
        pAp = (p * Ap).sum()
        if pAp.item() <= 0:
            break
        alpha = rr / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = (r * r).sum()
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def total_derivative_features(
    head: Head,
    Z_tr: torch.Tensor,
    y_tr: torch.Tensor,
    Zp: torch.Tensor,
    yp: torch.Tensor,
    Z_val: torch.Tensor,
    y_val: torch.Tensor,
    cg_iters: int,
    damping: float,
    lam: float = 0.0,
    rows: slice | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """d l_val(omega*(Z_p)) / d Z_p by the implicit function theorem, and u = (H + damping I)^-1 v.

    l_train = mean CE over (Z_tr, y_tr) and (Z_p, y_p) + lam/2 ||W||^2 (the victim's objective);
    l_val = mean CE over (Z_val, y_val); H = Hessian of l_train at ``head``. With
    v = grad_omega l_val: d l_val / d Z_p = -(1/n_tot) C(u), C the mixed cotangent (lam does not
    enter it). Exact at the minimiser of l_train when CG converges. ``rows``: only those poisons'
    rows of the derivative (H still covers every poison).
    """
    K, d = head.W.shape
    n_tot = Z_tr.shape[0] + Zp.shape[0]
    v = summed_gradient(head, Z_val, y_val).flat() / Z_val.shape[0]
    n_w = K * d

    def H(vec: torch.Tensor) -> torch.Tensor:
        V = Head.from_flat(vec, K, d)
        out = (hvp(head, Z_tr, V).flat() + hvp(head, Zp, V).flat()) / n_tot + damping * vec
        if lam:
            out[:n_w] += lam * vec[:n_w]
        return out

    u = conjugate_gradient(H, v, cg_iters)
    sel = slice(None) if rows is None else rows
    return -mixed_cotangent(head, Zp[sel], yp[sel], Head.from_flat(u, K, d)) / n_tot, u


def attacker_grad_autograd(
    encoder: torch.nn.Module,
    head: Head,
    Z_tr: torch.Tensor,
    y_tr: torch.Tensor,
    nu: torch.Tensor,
    yp: torch.Tensor,
    Z_val: torch.Tensor,
    y_val: torch.Tensor,
    cg_iters: int,
    damping: float,
    lam: float = 0.0,
) -> torch.Tensor:
    """D_nu l_val the reference way: every HVP by double backprop (``create_graph=True``) on
    the head, the mixed term by a gradient with ``create_graph=True`` through f(nu) and a
    second backward pass. Only for verification and benchmarks."""
    K, d = head.W.shape
    n_tot = Z_tr.shape[0] + nu.shape[0]
    w = head.flat().detach().requires_grad_(True)

    def train_loss(w, Zp):
        Wm, b = w[: K * d].reshape(K, d), w[K * d :]
        ce = torch.nn.functional.cross_entropy
        return (ce(torch.addmm(b, Z_tr, Wm.T), y_tr, reduction="sum")
                + ce(torch.addmm(b, Zp, Wm.T), yp, reduction="sum")) / n_tot + 0.5 * lam * (Wm * Wm).sum()

    with torch.no_grad():
        Zp0 = encoder(nu)
    (gtr,) = torch.autograd.grad(train_loss(w, Zp0), w, create_graph=True)
    Wm, b = w[: K * d].reshape(K, d), w[K * d :]
    (v,) = torch.autograd.grad(torch.nn.functional.cross_entropy(torch.addmm(b, Z_val, Wm.T), y_val), w)

    def H(vec):
        (hv,) = torch.autograd.grad(gtr, w, grad_outputs=vec, retain_graph=True)
        return hv + damping * vec

    u = conjugate_gradient(H, v.detach(), cg_iters)
    x = nu.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(train_loss(w, encoder(x)), w, create_graph=True)
    (D,) = torch.autograd.grad(-(g * u).sum(), x)
    return D


def _mean_loss(head: Head, Z: torch.Tensor, y: torch.Tensor) -> float:
    return torch.nn.functional.cross_entropy(head.logits(Z), y).item()


class _Follower:
    """The defender's best response: the victim's objective mean CE + lam/2 ||W||^2 over the
    clean training features it sees and the current poison features, warm-started each call.

    "lbfgs": ``steps`` full-batch L-BFGS iterations (float64, features in units of the clean
    feature scale, as :func:`attacks.head.fit_head`), so the head tracks the minimiser the
    implicit-function total derivative assumes; it stops at the victim's own tolerance ``tol``
    (the largest gradient entry in scaled units), where the victim's fit stops. "gd": ``steps`` plain gradient steps of
    lr / m2 (the reference's follower)."""

    def __init__(self, Z_tr: torch.Tensor, y_tr: torch.Tensor, lam: float, kind: str, lr: float, scale: float,
                 tol: float = 1e-4):
        self.kind, self.lam, self.scale, self.tol = kind, lam, scale, tol
        self.y_tr = y_tr
        self.Z_tr = Z_tr
        self.Zn_tr = Z_tr.double() / scale
        self.m2 = (Z_tr.float() ** 2).sum(1).mean().item() + 1.0  # mean ||[z; 1]||^2
        self.lr = lr / self.m2

    def grad_max(self, head: Head, Zp: torch.Tensor, yp: torch.Tensor) -> float:
        """Largest entry of the objective's gradient in scaled units (as the victim's fit measures it)."""
        n_tot = self.Z_tr.shape[0] + Zp.shape[0]
        g1 = summed_gradient(head, self.Z_tr, self.y_tr)
        g2 = summed_gradient(head, Zp, yp)
        gW = ((g1.W + g2.W) / n_tot + self.lam * head.W) / self.scale
        gb = (g1.b + g2.b) / n_tot
        return max(gW.abs().max().item(), gb.abs().max().item())

    def __call__(self, head: Head, Zp: torch.Tensor, yp: torch.Tensor, steps: int) -> tuple[Head, float]:
        """(new head, largest gradient entry of the objective in scaled units after the steps)."""
        if steps <= 0:
            return head, self.grad_max(head, Zp, yp)
        if self.kind == "gd":
            n_tot = self.Z_tr.shape[0] + Zp.shape[0]
            for _ in range(steps):
                checkpoint()
                g1 = summed_gradient(head, self.Z_tr, self.y_tr)
                g2 = summed_gradient(head, Zp, yp)
                gW = (g1.W + g2.W) / n_tot + self.lam * head.W
                head = Head(head.W - self.lr * gW, head.b - (self.lr / n_tot) * (g1.b + g2.b))
            return head, self.grad_max(head, Zp, yp)
        s = self.scale
        Zn = torch.cat([self.Zn_tr, Zp.double() / s])
        y = torch.cat([self.y_tr, yp])
        lam_n = self.lam / (s * s)  # the same objective in scaled features (W_n = s W)
        W = (head.W.double() * s).requires_grad_(True)
        b = head.b.double().clone().requires_grad_(True)
        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=steps, max_eval=steps + steps // 4 + 1, history_size=20,
                                tolerance_grad=self.tol, tolerance_change=1e-15, line_search_fn="strong_wolfe")

        def closure():
            checkpoint()
            opt.zero_grad(set_to_none=False)
            loss = torch.nn.functional.cross_entropy(torch.addmm(b, Zn, W.T), y)
            if lam_n:
                loss = loss + 0.5 * lam_n * (W * W).sum()
            loss.backward()
            return loss

        opt.step(closure)
        closure()
        gmax = max(W.grad.abs().max().item(), b.grad.abs().max().item())
        dt = head.W.dtype
        return Head((W.detach() / s).to(dt), b.detach().to(dt)), gmax


def tgda(
    encoder: torch.nn.Module,
    head0: Head,
    Z_tr: torch.Tensor,
    y_tr: torch.Tensor,
    Z_val: torch.Tensor,
    y_val: torch.Tensor,
    mu: torch.Tensor,
    yp: torch.Tensor,
    *,
    epochs: int,
    leader_lr: float,
    follower_steps: int,
    follower_lr: float = 0.1,
    follower: str = "lbfgs",
    warmup_steps: int = 200,
    cg_iters: int,
    cg_damping: float,
    lam: float = 0.0,
    feature_scale: float | None = None,
    follower_tol: float = 1e-4,
    constrained: bool = True,
    penalty: float = 1.0,
    clip: tuple[float, float] | None = None,
    pixel_range: float | None = None,
    batch_size: int = 64,
    device="cpu",
    amp: bool = False,
    progress: Callable[[float], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Head, dict]:
    """The TGDA game between the poisons nu (leader) and a linear head (follower).

    Z_tr, y_tr: cached clean features the defender trains on (with f(nu)); Z_val, y_val: the
    attacker's validation features; mu: (n, C, H, W) initial and anchor images (not modified);
    yp: their labels; lam: the victim's L2 strength (absolute units); pixel_range: the unit of
    the leader step and of the penalty (default: the clean range hi - lo, else mu's range).
    Returns (nu float32 CPU, f(nu), final defender head, info).
    """
    enc = ChunkedEncoder(encoder, batch_size=batch_size, device=device, amp=amp)
    hd = Z_tr.device
    mu = mu.detach().to("cpu", torch.float32)
    n = mu.shape[0]
    yp_h = yp.to(hd)
    Z_tr = Z_tr.float()
    scale = feature_scale if feature_scale is not None else max(math.sqrt((Z_tr ** 2).sum(1).mean().item()), 1e-12)
    fol = _Follower(Z_tr, y_tr, lam, follower, follower_lr, scale, follower_tol)
    damping = cg_damping * fol.m2
    pen = penalty if constrained else 0.0
    lo, hi = clip if (constrained and clip is not None) else (-math.inf, math.inf)
    if pixel_range is None:
        pixel_range = (clip[1] - clip[0]) if clip is not None else (mu.max() - mu.min()).item()
    pixel_range = max(float(pixel_range), 1e-12)

    nu = mu.clone()
    if constrained and clip is not None:
        nu.clamp_(lo, hi)
    Zp = enc.features(nu).to(hd)
    head = Head(head0.W.detach().clone().float().to(hd), head0.b.detach().clone().float().to(hd))
    gmax0 = fol.grad_max(head, Zp, yp_h)  # the clean head's gradient on the defender's set, for scale
    head, _ = fol(head, Zp, yp_h, warmup_steps)  # the defender starts at its best response to mu'
    batches = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    adams = [AdamDirection() for _ in batches]
    total = epochs  # leader steps per mini-batch: one per epoch
    step_scale, halvings, steps_run = 1.0, 0, 0
    val_losses: list[float] = []
    best = (-math.inf, nu.clone(), -1)  # (validation loss at the defender's response, nu, epoch)
    good = (nu.clone(), Zp.clone(), head)
    gmax = 0.0
    t = 0
    while t < epochs:
        checkpoint()
        if progress:
            progress(t / epochs)
        ok = True
        for bi, sl in enumerate(batches):
            checkpoint()
            Zb_cpu, vjp = enc.features_with_vjp(nu[sl])
            Zb = Zb_cpu.to(hd)
            ok = bool(torch.isfinite(Zb).all())
            if not ok:
                break
            Zp[sl] = Zb
            head, gmax = fol(head, Zp, yp_h, follower_steps)
            ok = bool(torch.isfinite(head.W).all() and torch.isfinite(head.b).all())
            if not ok:
                break
            if bi == 0:  # the state the last epoch left, scored at the defender's response to it
                v = _mean_loss(head, Z_val, y_val)
                val_losses.append(v)
                if v > best[0]:
                    best = (v, nu.clone(), t)
            C, u = total_derivative_features(head, Z_tr, y_tr, Zp, yp_h, Z_val, y_val, cg_iters, damping,
                                             lam=lam, rows=sl)
            D = vjp(C.float())  # D_nu l_val = J_f(nu_B)^T dl_val/dZ_B: the ascent direction
            ok = bool(torch.isfinite(D).all() and torch.isfinite(u).all())
            if not ok:
                break
            # the step and the penalty in the same unit: a fraction of the clean pixel range
            eta = step_scale * leader_lr * 0.5 * (1 + math.cos(math.pi * t / total))
            nu[sl] = nu[sl] + (eta * pixel_range) * adams[bi](D)
            if constrained:
                nu[sl] = constrain(nu[sl], mu[sl], eta, pen, lo, hi)
            steps_run += 1
        if not ok:
            halvings += 1
            if halvings > 12:
                raise AttackDiverged(
                    "TGDA diverged (non-finite features, gradients or defender weights) even with its "
                    "leader step halved 12 times; lower leader_lr"
                )
            step_scale /= 2
            nu, Zp, head = good[0].clone(), good[1].clone(), good[2]
            adams = [AdamDirection() for _ in batches]
            continue
        good = (nu.clone(), Zp.clone(), head)
        t += 1
    if progress:
        progress(1.0)
    Zp = enc.features(nu).to(hd)
    if torch.isfinite(Zp).all():  # the last state, scored like every epoch's (follower_steps more)
        head, gmax = fol(head, Zp, yp_h, follower_steps)
        v = _mean_loss(head, Z_val, y_val) if torch.isfinite(head.W).all() else -math.inf
        val_losses.append(v)
        if v >= best[0]:
            best = (v, nu.clone(), epochs)
    v_best, nu, best_epoch = best
    Zp = enc.features(nu)
    if not (torch.isfinite(nu).all() and torch.isfinite(Zp).all()):
        raise AttackDiverged("TGDA produced non-finite poisons or features")
    delta = (nu - mu).reshape(n, -1)
    return nu, Zp, head, {
        "val_loss_initial": val_losses[0],
        "val_loss_final": val_losses[-1],
        "val_loss_max": max(val_losses),
        "val_loss_best": v_best,
        "tgda_best_epoch": best_epoch,
        "tgda_epochs_run": epochs,
        "tgda_leader_steps": steps_run,
        "tgda_leader_steps_per_epoch": len(batches),
        "tgda_step_halvings": halvings,
        "tgda_follower_grad_max": gmax,
        "tgda_follower_grad_max_initial": gmax0,
        "tgda_linf_to_base_mean": delta.abs().amax(1).mean().item(),
        "tgda_l2_to_base_mean": delta.norm(dim=1).mean().item(),
        "tgda_penalty_effective": pen,
        "cg_damping_absolute": damping,
        "pixel_range": pixel_range,
    }


def split_validation(n_train: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded (train, validation) split of range(n_train); both parts non-empty."""
    gen = torch.Generator().manual_seed(seed + 1)  # not the poison-subset stream
    perm = torch.randperm(n_train, generator=gen)
    n_val = min(max(1, round(val_fraction * n_train)), n_train - 1)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def run(ctx, params: TGDAParams, *, epsilon: float, beta: float | None, seed: int,
        progress: ProgressFn | None = None):
    """Entry point: poisons nu from the TGDA game against a linear head on the frozen encoder."""
    from attacks.pipeline import AttackOutput

    report = progress or (lambda s, f: None)
    x = ctx.dataset.x_train
    N = ctx.Z_train.shape[0]
    if N < 2:
        raise ValueError("TGDA needs at least 2 clean training images (a training and a validation part)")
    tr, val = split_validation(N, params.val_fraction, seed)
    idx = choose_subset(N, n_poisons(epsilon, N), params.subset, seed)
    labels = ctx.y_train[idx]
    dev = ctx.Z_train.device
    nu, zeta, defender, info = tgda(
        ctx.encoder,
        ctx.clean_head,
        ctx.Z_train[tr.to(dev)],
        ctx.y_train[tr.to(dev)],
        ctx.Z_train[val.to(dev)],
        ctx.y_train[val.to(dev)],
        x[idx],
        labels,
        epochs=params.epochs,
        leader_lr=params.leader_lr,
        follower_steps=params.follower_steps,
        follower_lr=params.follower_lr,
        follower=params.follower,
        warmup_steps=params.warmup_steps,
        cg_iters=params.cg_iters,
        cg_damping=params.cg_damping,
        lam=ctx.victim_lambda(),
        feature_scale=ctx.feature_scale,
        follower_tol=ctx.recipe.tol,
        constrained=params.constrained,
        penalty=params.penalty,
        clip=(float(x.min()), float(x.max())),
        batch_size=params.batch_size,
        device=ctx.device,
        amp=ctx.amp,
        progress=lambda f: report("tgda_input", f),
    )
    info["n_validation"] = int(val.numel())
    info["defender_val_accuracy"] = accuracy(defender, ctx.Z_train[val.to(dev)], ctx.y_train[val.to(dev)])
    info["defender_test_accuracy"] = accuracy(defender, ctx.Z_test, ctx.y_test)
    return AttackOutput(target=None, poisons=nu, poison_labels=labels.clone(), base_index=idx, zeta=zeta, extra=info)
