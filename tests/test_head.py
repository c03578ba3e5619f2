"""Closed forms of the linear head against autograd, in float64."""

import pytest
import torch
import torch.nn.functional as F

from attacks.catalogue import HeadRecipe
from attacks.head import Head, accuracy, gc_loss_and_grad, gc_loss_and_grad_autograd, hvp, summed_gradient, train_head


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
    h1 = train_head(Z, y, 3, HeadRecipe(epochs=50))
    h2 = train_head(Z, y, 3, HeadRecipe(epochs=50))
    assert accuracy(h1, Z, y) > 0.95
    assert torch.equal(h1.W, h2.W) and torch.equal(h1.b, h2.b)


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


def test_train_head_rejects_non_finite():
    Z = torch.full((10, 3), float("nan"))
    y = torch.zeros(10, dtype=torch.long)
    with pytest.raises(FloatingPointError):
        train_head(Z, y, 2, HeadRecipe(optimizer="sgd", epochs=1))
