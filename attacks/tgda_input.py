"""Total Gradient Descent Ascent in input space, with a frozen encoder.

Paper: Lu, Yang, Kamath, Yu (SaTML 2024), Section 3.2, Eqs. 4-7 ("TGDA input
space attack"); TGDA of Lu, Kamath, Yu (ICML 2022, watml/TGDA-Attack).

Parameters (:class:`attacks.catalogue.TGDAParams`):
    constrained (bool, True): the paper's "constr.": the attacker's objective gets
        -penalty/2 ||nu - mu'||^2 (applied as a proximal step, as in gc_input) and
        nu is clipped to the clean data range after every step. False: neither.
    penalty (float, 1.0): weight of the proximity term.
    epochs (int, 200): attacker steps (paper: 200 epochs).
    leader_lr (float, 0.01): normalised ascent step [D]: each epoch moves the
        poisons by leader_lr * s in mean per-poison L2 norm, s the mean clean image
        L2 norm, along the total derivative (constant, no decay). The reference
        steps a generator's weights with lr 0.01; here nu is optimised directly
        ([D] in ATTACKS.md), so the step is expressed in image units instead.
    follower_steps (int, 20), follower_lr (float, 0.1): the defender's full-batch
        gradient-descent steps per epoch on the mean training loss. The step is
        follower_lr / m2 with m2 the mean of ||[z; 1]||^2 over the clean features
        [D]: the Hessian of the mean CE is at most m2 / 2, so the same value is
        stable and comparable for every encoder (0.1 is the reference's lr on
        unit-norm features).
    cg_iters (int, 16), cg_damping (float, 1e-3): conjugate gradient on
        (H + cg_damping * m2 * I) u = v, with the closed-form head HVP [D]. H is
        singular (softmax is invariant to adding one vector to every class row);
        v lies in its range, so a small damping suffices.
    val_fraction (float, 0.3): the attacker's validation set [D]. The reference
        takes 30% of every batch; here a seeded 30% of the clean training set is
        held out once as mu~ (the attacker's validation set) and the defender
        trains on the other 70% plus the poisons. The poisons' base images are
        drawn from the whole training set (the same seeded subset as gc_input, so
        the two attacks start from the same mu').
    batch_size (int, 256): poisons per encoder pass (bounds activation memory).
    subset ("random" | "first"): which clean images initialise nu.

One epoch (no double backprop, no ``create_graph``; one forward with grad and
one backward through the encoder when the poisons fit one chunk):
    Z_p = f(nu)                                         (chunked)
    omega <- omega - lr_f * grad l_train(omega)         (follower_steps times;
        l_train the mean CE over f(mu_train) (cached) and Z_p)
    v = grad_omega l_val(omega)                         (closed form)
    u ~= (H + lambda I)^-1 v                            (CG, H v by attacks.head.hvp)
    D_nu l_val = -(1/n_tr) J_f(nu)^T C,  C = d/dZ_p <sum_j grad_omega l(z_j), u>
    nu <- nu + eta * D_nu (normalised), then the proximal step and the clip.

Mixed-term closed form (derived here; checked in float64 against autograd and
finite differences in tests/test_input_attacks.py): for one point,
grad_W = (p - e_y) z^T, grad_b = p - e_y, so <grad, u> = (p - e_y)^T (U_W z + u_b)
and d/dz = U_W^T (p - e_y) + W^T J (U_W z + u_b), J = diag(p) - p p^T.
Vectorised: S = Z U_W^T + 1 u_b^T, T = P*S - P*rowsum(P*S), C = R U_W + T W.

Returns the last iterate nu (n, C, H, W) float32, labels (n,) of mu' (clean-label),
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """d l_val(omega*(Z_p)) / d Z_p by the implicit function theorem, and u = (H + damping I)^-1 v.

    l_train = mean CE over (Z_tr, y_tr) and (Z_p, y_p), optionally + damping/2 ||omega||^2;
    l_val = mean CE over (Z_val, y_val); H = Hessian of the mean CE part at ``head``. With
    v = grad_omega l_val: d l_val / d Z_p = -(1/n_tot) C(u), C the mixed cotangent. Exact
    (for the damped training loss at its minimiser) when CG converges.
    """
    K, d = head.W.shape
    n_tot = Z_tr.shape[0] + Zp.shape[0]
    v = summed_gradient(head, Z_val, y_val).flat() / Z_val.shape[0]

    def H(vec: torch.Tensor) -> torch.Tensor:
        V = Head.from_flat(vec, K, d)
        return (hvp(head, Z_tr, V).flat() + hvp(head, Zp, V).flat()) / n_tot + damping * vec

    u = conjugate_gradient(H, v, cg_iters)
    return -mixed_cotangent(head, Zp, yp, Head.from_flat(u, K, d)) / n_tot, u


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
                + ce(torch.addmm(b, Zp, Wm.T), yp, reduction="sum")) / n_tot

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
    follower_lr: float,
    cg_iters: int,
    cg_damping: float,
    constrained: bool = True,
    penalty: float = 1.0,
    clip: tuple[float, float] | None = None,
    image_scale: float | None = None,
    batch_size: int = 256,
    device="cpu",
    amp: bool = False,
    progress: Callable[[float], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Head, dict]:
    """The TGDA game between the poisons nu (leader) and a linear head (follower).

    Z_tr, y_tr: cached clean features the defender trains on (with f(nu));
    Z_val, y_val: the attacker's validation features; mu: (n, C, H, W) initial and
    anchor images (not modified); yp: their labels. Returns
    (nu float32 CPU, f(nu), final defender head, info).
    """
    enc = ChunkedEncoder(encoder, batch_size=batch_size, device=device, amp=amp)
    hd = Z_tr.device
    mu = mu.detach().to("cpu", torch.float32)
    n = mu.shape[0]
    yp_h = yp.to(hd)
    n_tot = Z_tr.shape[0] + n
    m2 = (Z_tr.float() ** 2).sum(1).mean().item() + 1.0  # mean ||[z; 1]||^2
    lr_f = follower_lr / m2
    damping = cg_damping * m2
    if image_scale is None:
        image_scale = mu.reshape(n, -1).norm(dim=1).mean().item()
    pen = penalty if constrained else 0.0
    lo, hi = clip if (constrained and clip is not None) else (-math.inf, math.inf)
    Z_tr = Z_tr.float()

    head = Head(head0.W.detach().clone().float().to(hd), head0.b.detach().clone().float().to(hd))
    nu = mu.clone()
    if constrained and clip is not None:
        nu.clamp_(lo, hi)
    step_scale, halvings = 1.0, 0
    good = (nu.clone(), head)
    val_losses: list[float] = []
    Zp = None
    for t in range(epochs):
        checkpoint()
        if progress:
            progress(t / epochs)
        Zp_cpu, vjp = enc.features_then_vjp(nu)
        Zp = Zp_cpu.to(hd)
        ok = bool(torch.isfinite(Zp).all())
        # defender: follower_steps of gradient descent on the mean training loss
        for _ in range(follower_steps if ok else 0):
            checkpoint()
            g1 = summed_gradient(head, Z_tr, y_tr)
            g2 = summed_gradient(head, Zp, yp_h)
            head = Head(head.W - (lr_f / n_tot) * (g1.W + g2.W), head.b - (lr_f / n_tot) * (g1.b + g2.b))
        ok = ok and bool(torch.isfinite(head.W).all() and torch.isfinite(head.b).all())
        if ok:
            # attacker: the total derivative of l_val w.r.t. Z_p, then one VJP through f
            val_losses.append(_mean_loss(head, Z_val, y_val))
            C, u = total_derivative_features(head, Z_tr, y_tr, Zp, yp_h, Z_val, y_val, cg_iters, damping)
            D = vjp(C.float())  # D_nu l_val = J_f(nu)^T dl_val/dZ_p
            ok = bool(torch.isfinite(D).all() and torch.isfinite(u).all())
        if not ok:
            halvings += 1
            if halvings > 12:
                raise AttackDiverged(
                    "TGDA diverged (non-finite features, gradients or defender weights) even with its "
                    "leader step halved 12 times; lower follower_lr or leader_lr"
                )
            step_scale /= 2
            nu, head = good[0].clone(), good[1]
            continue
        good = (nu.clone(), head)
        norms = D.reshape(n, -1).norm(dim=1)
        mean_norm = norms.mean().item()
        if mean_norm > 0:
            eta = step_scale * leader_lr * image_scale / mean_norm
            nu = nu + eta * D
            if constrained:
                nu = constrain(nu, mu, eta, pen, lo, hi)
    if progress:
        progress(1.0)
    Zp = enc.features(nu)
    if not (torch.isfinite(nu).all() and torch.isfinite(Zp).all()):
        nu = good[0]
        Zp = enc.features(nu)
        if not torch.isfinite(Zp).all():
            raise AttackDiverged("TGDA produced non-finite poisons or features")
    return nu, Zp, head, {
        "val_loss_initial": val_losses[0] if val_losses else float(_mean_loss(head0, Z_val, y_val)),
        "val_loss_final": val_losses[-1] if val_losses else float(_mean_loss(head0, Z_val, y_val)),
        "val_loss_max": max(val_losses) if val_losses else float(_mean_loss(head0, Z_val, y_val)),
        "tgda_epochs_run": len(val_losses),
        "tgda_step_halvings": halvings,
        "follower_step": lr_f,
        "cg_damping_absolute": damping,
        "image_scale": image_scale,
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
        cg_iters=params.cg_iters,
        cg_damping=params.cg_damping,
        constrained=params.constrained,
        penalty=params.penalty,
        clip=(float(x.min()), float(x.max())),
        image_scale=x.reshape(N, -1).norm(dim=1).mean().item(),
        batch_size=params.batch_size,
        device=ctx.device,
        amp=ctx.amp,
        progress=lambda f: report("tgda_input", f),
    )
    info["n_validation"] = int(val.numel())
    info["defender_val_accuracy"] = accuracy(defender, ctx.Z_train[val.to(dev)], ctx.y_train[val.to(dev)])
    return AttackOutput(target=None, poisons=nu, poison_labels=labels.clone(), base_index=idx, zeta=zeta, extra=info)
