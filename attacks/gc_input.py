"""Gradient Canceling in input space: the GC objective with zeta = f(nu), optimised over pixels.

Paper: Lu, Yang, Kamath, Yu (SaTML 2024), Section 3.3, Eq. 9 ("GC input space
attack", with and without constraints); Gradient Canceling of Lu, Kamath, Yu
(ICML 2023, watml/plim).

Parameters (:class:`attacks.catalogue.GCInputParams`, plus GradPC's):
    constrained (bool, True): the paper's "with constraints": add
        penalty/2 ||nu - mu'||^2 to the objective and clip nu to the clean data
        range [min x_train, max x_train] after every step. False: neither.
    penalty (float, 1.0, >= 0): weight of the proximity term (paper: 1). It is
        applied as a proximal step, nu <- (nu' + eta*penalty*mu') / (1 + eta*penalty),
        which minimises the same objective as a gradient step but stays stable for
        any eta * penalty [D]. The weight is in raw units against the raw GC
        residual (as in the paper), so how much it restrains nu depends on the
        scale of the residual; the clipping is what keeps the poisons benign.
    gc_steps (int, 2000, >= 1): gradient steps on nu (paper: 2000).
    gc_lr (float, 0.1, > 0): relative step size [D]. The step is
        eta_t = gc_lr * s / g_0 * (1 + cos(pi t / T)) / 2, with s the mean clean
        image L2 norm and g_0 the mean per-poison L2 norm of the first gradient
        (the encoder's Jacobian included), so that a first step moves a poison
        by about gc_lr * s whatever the encoder, the pixel scale and the size of
        the residual.
    cancel_bias (bool, False): also cancel the bias gradient (plim: weights only).
    stop_loss (float, 1.0): stop once 1/2||residual||^2 < stop_loss (paper).
    subset ("random" | "first"): which eps_d*N clean images initialise nu (mu').
    batch_size (int, 256): poisons per encoder pass. Peak activation memory is
        bounded by it, not by the number of poisons (see below).

Each step (no double backprop, no ``create_graph``):
    1. Z_p = f(nu), a no-grad encoder pass in chunks of batch_size;
    2. the closed-form cotangent C = d(1/2||A||^2)/dZ_p at Z_p
       (:func:`attacks.head.gc_loss_and_grad`; A = G_W + R_p^T Z_p needs every
       poison's features, hence the separate pass 1);
    3. per chunk, one forward pass with grad and one vector-Jacobian product
       J_f(nu_c)^T C_c (``torch.autograd.grad(f(nu_c), nu_c, C_c)``);
    4. nu <- nu - eta_t * J^T C, then the proximal and clipping steps.
When all poisons fit in one chunk, pass 1 keeps its graph and step 3 reuses it
(one forward, one backward per step).

Shapes: nu and mu' (n, C, H, W) float32 in the dataset's pixel space, with
n = round(eps_d * N) >= 1; labels (n,) kept from mu' (clean-label); zeta = f(nu)
(n, d).

Step-size control (as gc_feature's, in the manner of APGD): a non-finite or
exploding objective or gradient restores the best iterate and halves the step, and
so does a window of max(10, steps/20) steps that lowered the best objective by
less than 1%; the run stops when the step has been halved below 2^-40 of its
start. The result is the iterate with the lowest objective (GC residual plus the
penalty when constrained); only clean images whose features are already
non-finite raise AttackDiverged. Never a silent NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from attacks.adam import AdamDirection
from attacks.catalogue import GCInputParams
from attacks.errors import AttackDiverged
from attacks.features import autocast_for
from attacks.gc_feature import choose_subset, n_poisons
from attacks.head import Head, gc_loss_and_grad, objective_gradient
from attacks.progress import ProgressFn, checkpoint

__all__ = ["ChunkedEncoder", "constrain", "gc_input_grad", "gc_input_grad_autograd", "input_gradient_canceling", "run"]


class ChunkedEncoder:
    """f(x) and vector-Jacobian products J_f(x)^T C over a set, chunk by chunk.

    x stays where it is (CPU); one chunk at a time goes to ``device``, so the
    autograd graph held at any moment covers at most ``batch_size`` images.
    """

    def __init__(self, encoder: torch.nn.Module, *, batch_size: int, device, amp: bool = False):
        self.encoder = encoder
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.amp = amp

    def _f(self, xb: torch.Tensor) -> torch.Tensor:
        with autocast_for(self.device, self.amp):
            return self.encoder(xb).float()

    def single_chunk(self, n: int) -> bool:
        return n <= self.batch_size

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, x.shape[0], self.batch_size):
            checkpoint()
            out.append(self._f(x[i : i + self.batch_size].to(self.device, torch.float32)).cpu())
        return torch.cat(out)

    def features_with_vjp(self, x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """Single-chunk path: f(x) and a function C -> J_f(x)^T C reusing the same graph (once)."""
        # a copy: .to() would return x itself on the CPU, and x would then carry a graph across steps
        xb = x.detach().to(self.device, torch.float32, copy=True).requires_grad_(True)
        f = self._f(xb)

        def vjp(cot: torch.Tensor) -> torch.Tensor:
            (g,) = torch.autograd.grad(f, xb, grad_outputs=cot.to(f.device, f.dtype))
            return g.cpu()

        return f.detach().cpu(), vjp

    def vjp(self, x: torch.Tensor, cot: torch.Tensor) -> torch.Tensor:
        """J_f(x)^T cot for the whole set, one forward pass with grad and one backward per chunk."""
        out = torch.empty(x.shape, dtype=torch.float32)
        for i in range(0, x.shape[0], self.batch_size):
            checkpoint()
            xb = x[i : i + self.batch_size].detach().to(self.device, torch.float32, copy=True).requires_grad_(True)
            f = self._f(xb)
            (g,) = torch.autograd.grad(f, xb, grad_outputs=cot[i : i + self.batch_size].to(f.device, f.dtype))
            out[i : i + self.batch_size] = g.cpu()
        return out

    def features_then_vjp(self, x: torch.Tensor):
        """(f(x), C -> J^T C): one graph reused when x fits one chunk, else a no-grad pass now
        and a chunked forward + VJP when the cotangent is known."""
        if self.single_chunk(x.shape[0]):
            return self.features_with_vjp(x)
        return self.features(x), lambda cot: self.vjp(x, cot)


def constrain(nu: torch.Tensor, mu: torch.Tensor, eta: float, penalty: float, lo: float, hi: float) -> torch.Tensor:
    """Proximal step of penalty/2 ||nu - mu||^2 with step eta, then clip to [lo, hi]."""
    if penalty > 0:
        nu = (nu + (eta * penalty) * mu) / (1 + eta * penalty)
    return nu.clamp_(lo, hi)


def gc_input_grad(
    enc: ChunkedEncoder, target: Head, G: Head, nu: torch.Tensor, y: torch.Tensor, cancel_bias: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """GC objective at f(nu) and its gradient in nu: closed-form cotangent, then one VJP per chunk."""
    Zp, vjp = enc.features_then_vjp(nu)
    loss, cot = gc_loss_and_grad(target, G, Zp.to(target.W), y.to(target.W.device), cancel_bias)
    return loss, vjp(cot.float())


def gc_input_grad_autograd(
    encoder: torch.nn.Module, target: Head, G: Head, nu: torch.Tensor, y: torch.Tensor, cancel_bias: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference formulation (plim, end to end): head gradients of the summed CE on f(nu)
    with ``create_graph=True``, then a second backward pass to nu, all poisons in one graph.
    Only for verification and benchmarks; use :func:`gc_input_grad`."""
    W = target.W.detach().requires_grad_(True)
    b = target.b.detach().requires_grad_(True)
    x = nu.detach().requires_grad_(True)
    Z = encoder(x)
    loss = torch.nn.functional.cross_entropy(torch.addmm(b, Z, W.T), y, reduction="sum")
    gW, gb = torch.autograd.grad(loss, (W, b), create_graph=True)
    obj = 0.5 * ((G.W + gW) ** 2).sum()
    if cancel_bias:
        obj = obj + 0.5 * ((G.b + gb) ** 2).sum()
    (g,) = torch.autograd.grad(obj, x)
    return obj.detach(), g


def input_gradient_canceling(
    encoder: torch.nn.Module,
    target: Head,
    G: Head,
    mu: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float,
    cancel_bias: bool = False,
    stop_loss: float = 1.0,
    constrained: bool = True,
    penalty: float = 1.0,
    clip: tuple[float, float] | None = None,
    image_scale: float | None = None,
    batch_size: int = 256,
    device="cpu",
    amp: bool = False,
    optimizer: str = "gd",
    progress: Callable[[float], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Minimise 1/2||G + sum_j grad_omega l(f(nu_j), y_j)||^2 (+ penalty/2 ||nu - mu||^2) over nu.

    target: the head omega_hat the gradients are taken at; G: the summed clean
    gradient there (constant). mu: (n, C, H, W) initial and anchor images (not
    modified). clip: the clean data range, used when ``constrained``.
    Returns (nu (n, C, H, W) float32 CPU, f(nu) (n, d) float32, info).
    """
    enc = ChunkedEncoder(encoder, batch_size=batch_size, device=device, amp=amp)
    mu = mu.detach().to("cpu", torch.float32)
    y = y.to("cpu")
    n = mu.shape[0]
    target64 = Head(target.W.detach().cpu().double(), target.b.detach().cpu().double())
    G64 = Head(G.W.detach().cpu().double(), G.b.detach().cpu().double())
    if image_scale is None:
        image_scale = mu.reshape(n, -1).norm(dim=1).mean().item()
    pen = penalty if constrained else 0.0
    lo, hi = clip if (constrained and clip is not None) else (-math.inf, math.inf)

    def objective(nu: torch.Tensor, Zp: torch.Tensor) -> tuple[float, float, torch.Tensor]:
        loss, cot = gc_loss_and_grad(target64, G64, Zp.double(), y, cancel_bias)
        gc = loss.item()
        total = gc + (0.5 * pen * ((nu - mu) ** 2).sum().item() if pen else 0.0)
        return gc, total, cot

    nu = mu.clone()
    if constrained and clip is not None:
        nu.clamp_(lo, hi)
    base: float | None = None
    best = None  # (total, gc, nu, Zp)
    ref = None
    gc0 = None
    halvings, done = 0, 0
    adam = AdamDirection() if optimizer == "adam" else None
    window = max(10, steps // 20)
    mult, mark = 1.0, math.inf

    def back_off() -> bool:
        """Halve the step and restart from the best iterate; False once the step is negligible."""
        nonlocal halvings, mult, nu, adam
        halvings += 1
        mult /= 2
        nu = best[2].clone()
        if adam is not None:  # its moments belong to the abandoned path
            adam = AdamDirection()
        return mult >= 2.0 ** -40

    for t in range(steps):
        checkpoint()
        if progress and t % 10 == 0:
            progress(t / steps)
        Zp, vjp = enc.features_then_vjp(nu)
        gc, total, cot = objective(nu, Zp)
        if gc0 is None:
            if not (math.isfinite(total) and bool(torch.isfinite(Zp).all())):
                raise AttackDiverged("input-space Gradient Canceling: the encoder's features of the clean "
                                     "images are not finite")
            gc0, ref = gc, total
        if not math.isfinite(total) or not torch.isfinite(Zp).all() or total > 10 * max(best[0] if best else ref, ref):
            if not back_off():
                break
            continue
        if best is None or total < best[0]:
            best = (total, gc, nu.clone(), Zp)
        if gc < stop_loss:
            break
        if t > 0 and t % window == 0:
            stalled = best[0] > 0.99 * mark
            mark = best[0]
            if stalled:
                if not back_off():
                    break
                continue
        g = vjp(cot.float())
        if not torch.isfinite(g).all():
            if not back_off():
                break
            continue
        if adam is not None:
            g = adam(g)
        if base is None:
            # Scale-free step: the first step moves a poison by about lr * image_scale.
            g0 = g.reshape(n, -1).norm(dim=1).mean().item()
            base = lr * image_scale / max(g0, 1e-30)
        eta = mult * base * 0.5 * (1 + math.cos(math.pi * t / steps))
        nu = nu - eta * g
        if constrained:
            nu = constrain(nu, mu, eta, pen, lo, hi)
        done = t + 1
    if progress:
        progress(1.0)
    if done == steps:  # the last step's result has not been scored yet
        Zp = enc.features(nu)
        gc, total, _ = objective(nu, Zp)
        if math.isfinite(total) and torch.isfinite(Zp).all() and total <= best[0]:
            best = (total, gc, nu, Zp)
    total, gc, nu_best, Z_best = best
    if not torch.isfinite(nu_best).all():
        raise AttackDiverged("input-space Gradient Canceling produced non-finite poisons")
    return nu_best.float(), Z_best.float(), {
        "gc_loss_initial": gc0,
        "gc_loss_final": gc,
        "gc_objective_final": total,
        "gc_steps_run": done,
        "gc_step_size": base if base is not None else 0.0,
        "gc_step_final_multiplier": mult,
        "gc_step_halvings": halvings,
        "image_scale": image_scale,
    }


def run(ctx, params: GCInputParams, *, epsilon: float, beta: float | None, seed: int,
        progress: ProgressFn | None = None):
    """Entry point: poisoned images nu whose head gradients cancel the clean gradient at the target."""
    from attacks.gradpc import target_head
    from attacks.pipeline import AttackOutput

    report = progress or (lambda s, f: None)
    target, info = target_head(ctx, params, epsilon=epsilon, seed=seed)
    report("gradpc", 1.0)
    x = ctx.dataset.x_train
    N = ctx.Z_train.shape[0]
    idx = choose_subset(N, n_poisons(epsilon, N), params.subset, seed)
    labels = ctx.y_train[idx]
    # the victim's objective (its L2 term included) over clean + poisons: what GC must cancel
    G = objective_gradient(target, ctx.Z_train, ctx.y_train, ctx.victim_lambda(), N + idx.numel())
    nu, zeta, gc_info = input_gradient_canceling(
        ctx.encoder,
        target,
        G,
        x[idx],
        labels,
        steps=params.gc_steps,
        lr=params.gc_lr,
        cancel_bias=params.cancel_bias,
        stop_loss=params.stop_loss,
        constrained=params.constrained,
        penalty=params.penalty,
        clip=(float(x.min()), float(x.max())),
        image_scale=x.reshape(N, -1).norm(dim=1).mean().item(),
        batch_size=params.batch_size,
        device=ctx.device,
        amp=ctx.amp,
        optimizer=params.gc_optimizer,
        progress=lambda f: report("gc_input", f),
    )
    info.update(gc_info)
    clean_norm = ctx.Z_train.norm(dim=1).mean().item()
    info["zeta_norm_ratio"] = zeta.norm(dim=1).mean().item() / max(clean_norm, 1e-12)
    return AttackOutput(target=target, poisons=nu, poison_labels=labels.clone(), base_index=idx, zeta=zeta, extra=info)
