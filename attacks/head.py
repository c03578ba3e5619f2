"""The linear head on frozen features: training recipe, accuracy and closed forms.

Every quantity here works on cached features Z (N, d) and labels y (N,).
The head is omega = (W in R^{K x d}, b in R^K) with softmax cross-entropy.

Closed forms (ATTACKS.md, "Closed forms for a softmax linear head"):

* summed gradients: R = P - onehot(y); grad_W = R^T Z; grad_b = 1^T R;
* Gradient Canceling residual for poisoned features Z_p at the target head:
  A = G_W + R_p^T Z_p, a = G_b + 1^T R_p, loss = 1/2 ||A||^2 (+ 1/2 ||a||^2);
  d loss / d Z_p = R_p A + V W with U = Z_p A^T + 1 a^T, V = P*U - P*rowsum(P*U);
* head Hessian-vector product with z~ = [z; 1]: S = Z~ V^T,
  T = P*S - P*rowsum(P*S), HV = T^T Z~.

None of these builds an autograd graph: no double backprop anywhere.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attacks.catalogue import HeadRecipe
from attacks.progress import checkpoint


@dataclass(frozen=True)
class Head:
    """A linear head. W: (K, d), b: (K,)."""

    W: torch.Tensor
    b: torch.Tensor

    @property
    def num_classes(self) -> int:
        return self.W.shape[0]

    def logits(self, Z: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b, Z, self.W.T)

    def flat(self) -> torch.Tensor:
        return torch.cat([self.W.reshape(-1), self.b])

    @staticmethod
    def from_flat(v: torch.Tensor, K: int, d: int) -> "Head":
        return Head(v[: K * d].reshape(K, d).clone(), v[K * d :].clone())

    def to(self, device: torch.device | str) -> "Head":
        return Head(self.W.to(device), self.b.to(device))


def accuracy(head: Head, Z: torch.Tensor, y: torch.Tensor, chunk: int = 65_536) -> float:
    correct = 0
    for i in range(0, Z.shape[0], chunk):
        checkpoint()
        correct += (head.logits(Z[i : i + chunk]).argmax(1) == y[i : i + chunk]).sum().item()
    return correct / max(Z.shape[0], 1)


def residuals(head: Head, Z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """P = softmax(WZ + b) and R = P - onehot(y), both (N, K)."""
    P = torch.softmax(head.logits(Z), dim=1)
    R = P.clone()
    R[torch.arange(Z.shape[0], device=Z.device), y] -= 1.0
    return P, R


def summed_gradient(head: Head, Z: torch.Tensor, y: torch.Tensor, chunk: int = 65_536) -> Head:
    """Summed (not mean) cross-entropy gradient over a set, as a Head-shaped pair (G_W, G_b)."""
    GW = torch.zeros_like(head.W)
    Gb = torch.zeros_like(head.b)
    for i in range(0, Z.shape[0], chunk):
        checkpoint()
        _, R = residuals(head, Z[i : i + chunk], y[i : i + chunk])
        GW += R.T @ Z[i : i + chunk]
        Gb += R.sum(0)
    return Head(GW, Gb)


def gc_loss_and_grad(
    head: Head, G: Head, Zp: torch.Tensor, yp: torch.Tensor, cancel_bias: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient Canceling objective and its closed-form gradient in the poisoned features.

    head: target omega_hat. G: summed clean gradient at omega_hat (constant).
    Zp: (n, d) poisoned features; yp: (n,) their labels.
    Returns (loss scalar, dloss/dZp (n, d)).
    """
    return _gc_closed_form(head, G, Zp, _one_hot(yp, head.num_classes, Zp), cancel_bias)


def _one_hot(y: torch.Tensor, K: int, like: torch.Tensor) -> torch.Tensor:
    """(n, K) one-hot rows of y in like's dtype and device."""
    Y = torch.zeros(y.shape[0], K, dtype=like.dtype, device=like.device)
    Y[torch.arange(y.shape[0], device=like.device), y.to(like.device)] = 1.0
    return Y


def _gc_closed_form(head: Head, G: Head, Zp: torch.Tensor, Y: torch.Tensor, cancel_bias: bool):
    """gc_loss_and_grad with the labels given one-hot (Y: (n, K)): no indexing, no host sync,
    so one call can be captured in a CUDA graph."""
    P = torch.softmax(head.logits(Zp), dim=1)
    R = P - Y
    A = G.W + R.T @ Zp  # (K, d)
    loss = 0.5 * (A * A).sum()
    if cancel_bias:
        a = G.b + R.sum(0)
        loss = loss + 0.5 * (a * a).sum()
        U = Zp @ A.T + a  # (n, K)
    else:
        U = Zp @ A.T
    PU = P * U
    V = PU - P * PU.sum(1, keepdim=True)
    grad = R @ A + V @ head.W
    return loss, grad


class GCStep:
    """The closed-form GC loss and gradient at a fixed target, clean gradient and labels,
    as the GC loop calls it once per step: ``loss, grad = step(Z)``.

    On CUDA (``graph`` None or True) the step is captured once in a CUDA graph and each call
    replays it: a few microseconds of launch instead of a dozen eager kernel launches, which
    is what a GC step at these sizes costs on a GPU. The returned tensors are the graph's
    static outputs, overwritten by the next call: use them (or clone them) before calling
    again. On the CPU, or with ``graph=False``, it is :func:`gc_loss_and_grad`, eager.
    """

    def __init__(self, head: Head, G: Head, yp: torch.Tensor, like: torch.Tensor, cancel_bias: bool = False,
                 graph: bool | None = None):
        self.head, self.G, self.cancel_bias = head, G, cancel_bias
        self.Y = _one_hot(yp, head.num_classes, like)
        use_graph = like.is_cuda if graph is None else graph
        if use_graph and not like.is_cuda:
            raise ValueError("a CUDA graph needs CUDA tensors")
        self.graph = None
        if use_graph:
            try:
                self._capture(like)
            except RuntimeError as exc:  # e.g. a capture refused by the driver: the eager step is the same math
                warnings.warn(f"GC step: CUDA graph capture failed ({exc}); running eagerly", RuntimeWarning)
                self.graph = None

    def _capture(self, like: torch.Tensor) -> None:
        self.Z = like.detach().clone()
        side = torch.cuda.Stream(device=like.device)
        side.wait_stream(torch.cuda.current_stream(like.device))
        with torch.cuda.stream(side):  # warm-up outside the capture (cuBLAS workspaces, handles)
            for _ in range(2):
                _gc_closed_form(self.head, self.G, self.Z, self.Y, self.cancel_bias)
        torch.cuda.current_stream(like.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work of other threads in the process (a threaded worker) does not break the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.loss, self.grad = _gc_closed_form(self.head, self.G, self.Z, self.Y, self.cancel_bias)
        self.graph = graph

    def __call__(self, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph is None:
            return _gc_closed_form(self.head, self.G, Z, self.Y, self.cancel_bias)
        self.Z.copy_(Z)
        self.graph.replay()
        return self.loss, self.grad


def gc_loss_and_grad_autograd(
    head: Head, G: Head, Zp: torch.Tensor, yp: torch.Tensor, cancel_bias: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference formulation (plim): head gradients with ``create_graph=True`` and a
    second backward pass. Only for verification and benchmarks; use gc_loss_and_grad."""
    W = head.W.detach().requires_grad_(True)
    b = head.b.detach().requires_grad_(True)
    Zp = Zp.detach().requires_grad_(True)
    loss = F.cross_entropy(torch.addmm(b, Zp, W.T), yp, reduction="sum")
    gW, gb = torch.autograd.grad(loss, (W, b), create_graph=True)
    obj = 0.5 * ((G.W + gW) ** 2).sum()
    if cancel_bias:
        obj = obj + 0.5 * ((G.b + gb) ** 2).sum()
    (dz,) = torch.autograd.grad(obj, Zp)
    return obj.detach(), dz


def hvp(head: Head, Z: torch.Tensor, V: Head, weights: float = 1.0) -> Head:
    """Hessian of the summed CE over (Z, any labels) w.r.t. (W, b), times V. Labels do not enter."""
    P = torch.softmax(head.logits(Z), dim=1)
    S = Z @ V.W.T + V.b  # (N, K)
    PS = P * S
    T = PS - P * PS.sum(1, keepdim=True)
    return Head(weights * (T.T @ Z), weights * T.sum(0))


def refit_bias(head: Head, Z: torch.Tensor, y: torch.Tensor, iters: int = 200) -> Head:
    """The same W with b re-optimised on (Z, y): full-batch L-BFGS on the summed CE,
    convex in b. At the result the set's bias gradient is ~0."""
    logits = Z.float() @ head.W.T.float()
    b = head.b.detach().clone().float().requires_grad_(True)
    opt = torch.optim.LBFGS([b], lr=1.0, max_iter=iters, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        checkpoint()
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(logits + b, y, reduction="sum")
        loss.backward()
        return loss

    opt.step(closure)
    return Head(head.W.clone(), b.detach().to(head.b.dtype))


def feature_scale(Z: torch.Tensor) -> float:
    """s = sqrt(mean ||z||^2) over a set of features: the unit the head's L2 strength is measured in."""
    return max(math.sqrt(float((Z.float() ** 2).sum(1).mean())), 1e-12)


def l2_strength(recipe: HeadRecipe, scale: float) -> float:
    """lambda of the objective mean CE + lambda/2 ||W||^2 that the recipe minimises (absolute units)."""
    return recipe.l2 * scale * scale if recipe.optimizer == "lbfgs" else recipe.weight_decay


def objective_gradient(head: Head, Z: torch.Tensor, y: torch.Tensor, lam: float, n_total: int) -> Head:
    """Gradient of the *summed* objective sum CE + n_total * lam/2 ||W||^2 over (Z, y) at ``head``:
    what Gradient Canceling must cancel (n_total: clean points plus poisons)."""
    G = summed_gradient(head, Z, y)
    return Head(G.W + (n_total * lam) * head.W, G.b) if lam else G


def _lbfgs(Z, y, K, recipe: HeadRecipe, scale: float, init: Head | None, progress) -> tuple[Head, dict]:
    """Full-batch L-BFGS on mean CE + l2/2 ||W s||^2 in the scaled features Z / s, from zero (or
    ``init``), until the largest gradient entry is below ``recipe.tol`` (``recipe.max_iter`` caps it)."""
    # float64: in float32 the objective's changes vanish below its rounding (~1e-8 relative) before the
    # gradient does, and L-BFGS stops unconverged on a poisoned set of large features.
    Zn = Z.double() / scale
    lam = recipe.l2
    W = (torch.zeros(K, Z.shape[1], device=Z.device, dtype=torch.float64) if init is None
         else init.W.double() * scale).requires_grad_(True)
    b = (torch.zeros(K, device=Z.device, dtype=torch.float64) if init is None
         else init.b.double().clone()).requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=recipe.max_iter, max_eval=recipe.max_iter + recipe.max_iter // 4,
                            history_size=20, tolerance_grad=recipe.tol, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")
    evals = [0]

    def closure():
        checkpoint()
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(torch.addmm(b, Zn, W.T), y)
        if lam:
            loss = loss + 0.5 * lam * (W * W).sum()
        loss.backward()
        evals[0] += 1
        if progress is not None and evals[0] % 25 == 0:
            progress(min(evals[0] / recipe.max_iter, 1.0))
        return loss

    opt.step(closure)
    loss = closure()  # the gradient at the returned point
    gmax = max(W.grad.abs().max().item(), b.grad.abs().max().item())
    iters = int(opt.state[opt._params[0]].get("n_iter", 0))
    info = {"optimizer": "lbfgs", "iterations": iters, "grad_max": gmax, "objective": loss.item(),
            "converged": bool(gmax <= 2 * recipe.tol), "l2": lam * scale * scale}
    return Head((W.detach() / scale).float(), b.detach().float()), info


def _sgd(Z: torch.Tensor, y: torch.Tensor, K: int, recipe: HeadRecipe, seed: int, progress=None) -> Head:
    """Mini-batch SGD on the mean cross-entropy with its closed-form gradient, (P - Y)^T Z / B,
    rather than an autograd graph per step: on cached features a step is three small GEMMs, and
    the graph and optimizer bookkeeping would cost more than the arithmetic. The update is
    torch.optim.SGD's (momentum buffer started at the first gradient, no dampening, no Nesterov;
    weight decay on W only, as the L2 term of the objective); tests check it against that."""
    W = torch.zeros(K, Z.shape[1], device=Z.device)
    b = torch.zeros(K, device=Z.device)
    vW = vb = None
    lr, mom, wd = recipe.lr, recipe.momentum, recipe.weight_decay
    gen = torch.Generator().manual_seed(seed)
    n = Z.shape[0]
    for epoch in range(recipe.epochs):
        if progress is not None:
            progress(epoch / recipe.epochs)
        perm = torch.randperm(n, generator=gen).to(Z.device)
        for i in range(0, n, recipe.batch_size):
            checkpoint()
            idx = perm[i : i + recipe.batch_size]
            Zb = Z[idx]
            _, R = residuals(Head(W, b), Zb, y[idx])
            R /= len(idx)
            gW, gb = R.T @ Zb, R.sum(0)
            if wd:
                gW += wd * W
            if mom:
                if vW is None:
                    vW, vb = gW, gb
                else:
                    vW.mul_(mom).add_(gW)
                    vb.mul_(mom).add_(gb)
                gW, gb = vW, vb
            W -= lr * gW
            b -= lr * gb
    return Head(W, b)


def fit_head(
    Z: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    recipe: HeadRecipe | None = None,
    seed: int = 0,
    *,
    scale: float | None = None,
    init: Head | None = None,
    progress: Callable[[float], None] | None = None,
) -> tuple[Head, dict]:
    """Train the linear head with the one recipe used everywhere; returns (head, convergence info).

    lbfgs (default): the regularised objective (see :class:`attacks.catalogue.HeadRecipe`) to
    convergence; ``scale`` is the clean feature scale s that fixes lambda = l2 s^2 (default: that
    of ``Z``; evaluations on poisoned sets pass the clean one, so poisons cannot move lambda).
    Strongly convex, so the answer does not depend on ``init`` (a warm start) or the budget.
    sgd: the reference protocol (plim): zero init, mini-batch SGD on mean CE, ``recipe.epochs``.
    ``progress(fraction)`` is called between iterations and may raise to stop the fit; every
    iteration (each SGD batch, each L-BFGS evaluation) also reaches :func:`attacks.progress.checkpoint`.
    Non-finite weights raise FloatingPointError: never a silent NaN head.
    """
    recipe = recipe or HeadRecipe()
    Z = Z.float()
    s = scale if scale is not None else feature_scale(Z)
    if recipe.optimizer == "lbfgs":
        head, info = _lbfgs(Z, y, num_classes, recipe, s, init, progress)
    else:
        head = _sgd(Z, y, num_classes, recipe, seed, progress)
        info = {"optimizer": "sgd", "epochs": recipe.epochs, "l2": recipe.weight_decay}
    if not (torch.isfinite(head.W).all() and torch.isfinite(head.b).all()):
        raise FloatingPointError("linear head training diverged (non-finite weights)")
    return head, info


def train_head(Z: torch.Tensor, y: torch.Tensor, num_classes: int, recipe: HeadRecipe | None = None,
               seed: int = 0, **kw) -> Head:
    """:func:`fit_head` without the convergence info."""
    return fit_head(Z, y, num_classes, recipe, seed, **kw)[0]
