"""Closed forms of the linear head against autograd, in float64."""

import pytest
import torch
import torch.nn.functional as F

from attacks.catalogue import HeadRecipe
from attacks.head import GCStep, Head, accuracy, gc_loss_and_grad, gc_loss_and_grad_autograd, hvp, summed_gradient, train_head


def _problem(n=40, d=7, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (n,), generator=g)
    head = Head(torch.randn(K, d, generator=g, dtype=torch.float64), torch.randn(K, generator=g, dtype=torch.float64))
    return Z, y, head


def test_summed_gradient_matches_autograd():
    Z, y, head = _problem()
    W = head.W.clone().requires_grad_(True)
    b = head.b.clone().requires_grad_(True)
    F.cross_entropy(Z @ W.T + b, y, reduction="sum").backward()
    G = summed_gradient(head, Z, y, chunk=13)
    torch.testing.assert_close(G.W, W.grad)
    torch.testing.assert_close(G.b, b.grad)


@pytest.mark.parametrize("cancel_bias", [False, True])
def test_gc_closed_form_matches_double_backprop(cancel_bias):
    Z, y, head = _problem()
    G = summed_gradient(head, Z, y)
    Zp, yp = Z[:9] * 3 + 1, y[:9]
    loss, grad = gc_loss_and_grad(head, G, Zp, yp, cancel_bias)
    loss_ref, grad_ref = gc_loss_and_grad_autograd(head, G, Zp, yp, cancel_bias)
    torch.testing.assert_close(loss, loss_ref)
    rel = (grad - grad_ref).norm() / grad_ref.norm()
    assert rel < 1e-10


def test_gc_step_is_the_closed_form_and_needs_cuda_for_a_graph():
    Z, y, head = _problem(seed=5)
    G = summed_gradient(head, Z, y)
    Zp, yp = Z[:9] * 2, y[:9]
    step = GCStep(head, G, yp, like=Zp, cancel_bias=True)
    assert step.graph is None  # eager on the CPU
    for Zi in (Zp, Zp + 0.5):
        loss, grad = step(Zi)
        ref_loss, ref_grad = gc_loss_and_grad(head, G, Zi, yp, cancel_bias=True)
        torch.testing.assert_close(loss, ref_loss)
        torch.testing.assert_close(grad, ref_grad)
    with pytest.raises(ValueError, match="CUDA graph needs CUDA tensors"):
        GCStep(head, G, yp, like=Zp, graph=True)


@pytest.mark.parametrize("cancel_bias", [False, True])
def test_gc_closed_form_matches_finite_differences(cancel_bias):
    Z, y, head = _problem(seed=3)
    G = summed_gradient(head, Z, y)
    Zp, yp = Z[:5].clone(), y[:5]
    _, grad = gc_loss_and_grad(head, G, Zp, yp, cancel_bias)
    h = 1e-6
    fd = torch.zeros_like(Zp)
    for i in range(Zp.shape[0]):
        for j in range(Zp.shape[1]):
            e = torch.zeros_like(Zp)
            e[i, j] = h
            lp, _ = gc_loss_and_grad(head, G, Zp + e, yp, cancel_bias)
            lm, _ = gc_loss_and_grad(head, G, Zp - e, yp, cancel_bias)
            fd[i, j] = (lp - lm) / (2 * h)
    assert (grad - fd).norm() / fd.norm() < 1e-6


def test_hvp_matches_autograd():
    Z, y, head = _problem()
    g = torch.Generator().manual_seed(1)
    V = Head(torch.randn(head.W.shape, generator=g, dtype=torch.float64), torch.randn(head.b.shape, generator=g, dtype=torch.float64))
    w = head.flat().clone().requires_grad_(True)
    K, d = head.W.shape

    def loss(w):
        return F.cross_entropy(Z @ w[: K * d].reshape(K, d).T + w[K * d :], y, reduction="sum")

    _, ref = torch.autograd.functional.hvp(loss, w, V.flat())
    torch.testing.assert_close(hvp(head, Z, V).flat(), ref)


def test_train_head_lbfgs_fits_separable_data_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 5, generator=g) * 4
    y = torch.arange(300) % 3
    Z = centers[y] + torch.randn(300, 5, generator=g)
    h1 = train_head(Z, y, 3)
    h2 = train_head(Z, y, 3)
    assert accuracy(h1, Z, y) > 0.95
    assert torch.equal(h1.W, h2.W) and torch.equal(h1.b, h2.b)


def test_lbfgs_victim_reaches_a_stationary_point_of_its_objective_at_any_feature_scale():
    """The default victim solves mean CE + lambda/2 ||W||^2, lambda = l2 s^2, to its tolerance: the
    gradient of that objective (objective_gradient / n) vanishes, the info says so, a warm start
    lands on the same minimiser, and scaling the features by 1000 scales W by 1/1000 (same l2)."""
    from attacks.head import feature_scale, fit_head, l2_strength, objective_gradient

    g = torch.Generator().manual_seed(1)
    centers = torch.randn(4, 8, generator=g) * 3
    y = torch.arange(400) % 4
    Z = centers[y] + torch.randn(400, 8, generator=g)
    r = HeadRecipe()
    head, info = fit_head(Z, y, 4, r)
    assert info["optimizer"] == "lbfgs" and info["converged"] and info["grad_max"] <= 2 * r.tol
    s = feature_scale(Z)
    lam = l2_strength(r, s)
    assert lam == pytest.approx(r.l2 * float((Z ** 2).sum(1).mean()))
    G = objective_gradient(head, Z, y, lam, Z.shape[0])
    # in the scaled units the tolerance is measured in: grad wrt W*s is grad_W / s
    assert (G.W / Z.shape[0] / s).abs().max() < 5 * r.tol and (G.b / Z.shape[0]).abs().max() < 5 * r.tol
    # lambda is small (the problem is badly conditioned), so a gradient tolerance pins the objective's
    # value, not W to the last digit: a warm start and 1000x features reach the same minimum value
    # and the same predictions
    def objective(h, Zs, lam_):
        return float(torch.nn.functional.cross_entropy(Zs @ h.W.T + h.b, y) + 0.5 * lam_ * (h.W ** 2).sum())

    f_star = objective(head, Z, lam)
    warm, _ = fit_head(Z, y, 4, r, init=Head(head.W * 0.5, head.b))
    assert objective(warm, Z, lam) == pytest.approx(f_star, abs=r.tol)
    assert (Z @ warm.W.T + warm.b).argmax(1).tolist() == (Z @ head.W.T + head.b).argmax(1).tolist()
    big, big_info = fit_head(Z * 1000, y, 4, r)
    assert big_info["converged"]
    assert objective(big, Z * 1000, l2_strength(r, feature_scale(Z * 1000))) == pytest.approx(f_star, abs=r.tol)
    assert (Z @ head.W.T + head.b).argmax(1).tolist() == ((Z * 1000) @ big.W.T + big.b).argmax(1).tolist()
    # unregularised and capped at 3 iterations: not converged, and the info says so
    _, capped = fit_head(Z, y, 4, HeadRecipe(l2=0, max_iter=3))
    assert not capped["converged"]


def test_train_head_sgd_seeded():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 5, generator=g) * 4
    y = torch.arange(300) % 3
    Z = centers[y] + torch.randn(300, 5, generator=g)
    r = HeadRecipe(optimizer="sgd", epochs=5, lr=0.1, batch_size=32)
    h1, h2, h3 = train_head(Z, y, 3, r, seed=1), train_head(Z, y, 3, r, seed=1), train_head(Z, y, 3, r, seed=2)
    assert accuracy(h1, Z, y) > 0.9
    assert torch.equal(h1.W, h2.W)
    assert not torch.equal(h1.W, h3.W)


@pytest.mark.parametrize("momentum, wd, batch", [(0.0, 0.0, 32), (0.9, 0.0, 64), (0.9, 1e-3, 300), (0.5, 5e-4, 7)])
def test_sgd_head_equals_torch_sgd_on_autograd(momentum, wd, batch):
    """The closed-form SGD path is torch.optim.SGD on the autograd loss, step for step."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 6, generator=g) * 2
    y = torch.arange(300) % 4
    Z = centers[y] + torch.randn(300, 6, generator=g)
    r = HeadRecipe(optimizer="sgd", epochs=4, lr=0.3, momentum=momentum, weight_decay=wd, batch_size=batch)
    got = train_head(Z, y, 4, r, seed=3)

    W = torch.zeros(4, 6, requires_grad=True)
    b = torch.zeros(4, requires_grad=True)
    opt = torch.optim.SGD([W, b], lr=0.3, momentum=momentum)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        perm = torch.randperm(300, generator=gen)
        for i in range(0, 300, batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            loss = F.cross_entropy(torch.addmm(b, Z[idx], W.T), y[idx]) + 0.5 * wd * (W * W).sum()
            loss.backward()
            opt.step()
    torch.testing.assert_close(got.W, W.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.b, b.detach(), rtol=1e-5, atol=1e-6)


def test_train_head_rejects_non_finite():
    Z = torch.full((10, 3), float("nan"))
    y = torch.zeros(10, dtype=torch.long)
    with pytest.raises(FloatingPointError):
        train_head(Z, y, 2, HeadRecipe(optimizer="sgd", epochs=1))


# ------------------------------------------------------------------ the cancel check (#13)
@pytest.mark.parametrize("recipe", [HeadRecipe(optimizer="sgd", epochs=1000, batch_size=1), HeadRecipe(tol=1e-12)],
                         ids=["sgd", "lbfgs"])
def test_head_fits_reach_the_cancel_check_within_an_epoch_or_iteration(recipe):
    """A head fit stops at the installed check, mid-epoch for SGD (batch size 1) and mid-run for L-BFGS:
    no progress callback is needed (a victim fit in a sweep has none)."""
    from attacks.head import fit_head
    from attacks.progress import Cancelled, checks

    Z, y, _ = _problem(n=200, d=8, K=5)
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 5:
            raise Cancelled("stop")

    with checks(check, interval=0), pytest.raises(Cancelled):
        fit_head(Z.float(), y, 5, recipe)
    assert len(calls) == 5


def test_bias_refit_and_accuracy_reach_the_cancel_check():
    from attacks.head import refit_bias
    from attacks.progress import Cancelled, checks

    Z, y, head = _problem()

    def stop():
        raise Cancelled("stop")

    with checks(stop, interval=0):
        with pytest.raises(Cancelled):
            refit_bias(head, Z.float(), y)
        with pytest.raises(Cancelled):
            accuracy(head, Z, y)
    assert 0 <= accuracy(head, Z, y) <= 1  # no check installed: nothing happens
