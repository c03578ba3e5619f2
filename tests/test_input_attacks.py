"""Input-space attacks (GC input, TGDA input): closed forms, chunking, constraints (fast)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from attacks.catalogue import GCInputParams, HeadRecipe, TGDAParams, validate_job
from attacks.gc_input import (
    ChunkedEncoder,
    gc_input_grad,
    gc_input_grad_autograd,
    input_gradient_canceling,
)
from attacks.gradpc import gradpc_target
from attacks.head import Head, hvp, summed_gradient, train_head
from attacks.pipeline import run_job
from attacks.tgda_input import (
    conjugate_gradient,
    mixed_cotangent,
    total_derivative_features,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These are many small ops: one thread is as fast on an idle 2-core machine and is not
    slowed 10-50x by OpenMP spin-waiting when the machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _problem(n=40, d=5, K=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, K, (n,), generator=g)
    head = Head(torch.randn(K, d, generator=g, dtype=dtype), torch.randn(K, generator=g, dtype=dtype))
    U = Head(torch.randn(K, d, generator=g, dtype=dtype), torch.randn(K, generator=g, dtype=dtype))
    return Z, y, head, U


def _pairing(head, Z, y, U):
    """<sum_j grad_omega CE(z_j), U> by plain autograd (first order, for the references)."""
    W = head.W.detach().requires_grad_(True)
    b = head.b.detach().requires_grad_(True)
    loss = F.cross_entropy(torch.addmm(b, Z, W.T), y, reduction="sum")
    gW, gb = torch.autograd.grad(loss, (W, b), create_graph=True)
    return (gW * U.W).sum() + (gb * U.b).sum()


# ----------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("with_bias", [False, True])
def test_mixed_cotangent_matches_double_backprop(with_bias):
    Z, y, head, U = _problem()
    if not with_bias:
        U = Head(U.W, torch.zeros_like(U.b))
    Zg = Z.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(_pairing(head, Zg, y, U), Zg)
    got = mixed_cotangent(head, Z, y, U)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-8


def test_mixed_cotangent_matches_finite_differences():
    Z, y, head, U = _problem(n=6, seed=2)
    got = mixed_cotangent(head, Z, y, U)
    h = 1e-6
    fd = torch.zeros_like(Z)
    for i in range(Z.shape[0]):
        for j in range(Z.shape[1]):
            e = torch.zeros_like(Z)
            e[i, j] = h
            with torch.enable_grad():
                fd[i, j] = (_pairing(head, Z + e, y, U) - _pairing(head, Z - e, y, U)).item() / (2 * h)
    assert ((got - fd).norm() / fd.norm()).item() < 1e-6


def test_conjugate_gradient_solves_the_damped_head_system():
    Z, _, head, _ = _problem(n=60, d=4, K=3, seed=1)
    K, d = head.W.shape
    m = K * (d + 1)
    lam = 1e-2
    Hmat = torch.stack([hvp(head, Z, Head.from_flat(e, K, d)).flat() for e in torch.eye(m, dtype=Z.dtype)], 1)
    Hmat = Hmat + lam * torch.eye(m, dtype=Z.dtype)
    v = torch.randn(m, generator=torch.Generator().manual_seed(5), dtype=Z.dtype)
    ref = torch.linalg.solve(Hmat, v)
    got = conjugate_gradient(lambda x: hvp(head, Z, Head.from_flat(x, K, d)).flat() + lam * x, v, iters=4 * m)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-8
    few = conjugate_gradient(lambda x: hvp(head, Z, Head.from_flat(x, K, d)).flat() + lam * x, v, iters=2)
    assert ((few - ref).norm() / ref.norm()).item() > 1e-3  # 2 iterations is not a solve: the check can fail


def _hessian(head, Z):
    """The explicit Hessian of the summed CE in (W, b), flattened as Head.flat(): sum_i J_i (x) z~_i z~_i^T."""
    P = torch.softmax(head.logits(Z), 1)
    J = torch.diag_embed(P) - P[:, :, None] * P[:, None, :]
    Zt = torch.cat([Z, torch.ones(Z.shape[0], 1, dtype=Z.dtype)], 1)
    H4 = torch.einsum("nkl,na,nb->kalb", J, Zt, Zt)  # (K, d+1, K, d+1)
    K, d1 = H4.shape[0], H4.shape[1]
    # reorder (W entries, then b) to match Head.flat()
    order = [k * d1 + a for k in range(K) for a in range(d1 - 1)] + [k * d1 + d1 - 1 for k in range(K)]
    H = H4.reshape(K * d1, K * d1)
    return H[order][:, order]


def _argmin_damped(Z, y, K, lam, iters=12):
    """Newton's method on mean CE + lam/2 ||omega||^2 (strictly convex): the exact minimiser."""
    d = Z.shape[1]
    head = Head(torch.zeros(K, d, dtype=Z.dtype), torch.zeros(K, dtype=Z.dtype))
    eye = torch.eye(K * (d + 1), dtype=Z.dtype)
    for _ in range(iters):
        g = summed_gradient(head, Z, y).flat() / Z.shape[0] + lam * head.flat()
        head = Head.from_flat(head.flat() - torch.linalg.solve(_hessian(head, Z) / Z.shape[0] + lam * eye, g), K, d)
    return head


def test_explicit_hessian_agrees_with_the_closed_form_hvp():
    Z, _, head, U = _problem()
    torch.testing.assert_close(_hessian(head, Z) @ U.flat(), hvp(head, Z, U).flat())


def test_total_derivative_matches_finite_differences_of_retraining():
    """d l_val(omega*(Z_p)) / d Z_p from the implicit function theorem equals a finite difference
    through an exact retraining (the damped loss, whose Hessian is H + lambda I): sign included."""
    g = torch.Generator().manual_seed(3)
    K, d, lam = 3, 4, 0.05
    Z_tr = torch.randn(30, d, generator=g, dtype=torch.float64)
    y_tr = torch.randint(0, K, (30,), generator=g)
    Zp = torch.randn(4, d, generator=g, dtype=torch.float64) * 2
    yp = torch.randint(0, K, (4,), generator=g)
    Z_val = torch.randn(20, d, generator=g, dtype=torch.float64)
    y_val = torch.randint(0, K, (20,), generator=g)

    def val_loss(Zp_):
        h = _argmin_damped(torch.cat([Z_tr, Zp_]), torch.cat([y_tr, yp]), K, lam)
        return F.cross_entropy(h.logits(Z_val), y_val).item()

    head = _argmin_damped(torch.cat([Z_tr, Zp]), torch.cat([y_tr, yp]), K, lam)
    got, _ = total_derivative_features(head, Z_tr, y_tr, Zp, yp, Z_val, y_val, cg_iters=200, damping=lam)
    h = 1e-5
    fd = torch.zeros_like(Zp)
    rows = [0, 3]  # two poisons keep it fast; every coordinate of each
    for i in rows:
        for j in range(d):
            e = torch.zeros_like(Zp)
            e[i, j] = h
            fd[i, j] = (val_loss(Zp + e) - val_loss(Zp - e)) / (2 * h)
    assert ((got[rows] - fd[rows]).norm() / fd[rows].norm()).item() < 1e-5
    # the sign matters: the negated form is far off
    assert ((-got[rows] - fd[rows]).norm() / fd[rows].norm()).item() > 1


# ----------------------------------------------------------------------------- GC input, on a real encoder


@pytest.fixture(scope="module")
def gc_setup(tiny_encoder, digits_small):
    from attacks.features import extract_features

    Z = extract_features(tiny_encoder, digits_small.x_train)
    y = digits_small.y_train
    clean = train_head(Z, y, digits_small.num_classes, HeadRecipe(epochs=30))
    target = gradpc_target(clean, Z, y, eps_w=2.0)
    G = summed_gradient(target, Z, y)
    return Z, y, target, G


def _t64(head):
    return Head(head.W.double(), head.b.double())


def test_gc_input_gradient_matches_double_backprop_through_the_encoder(tiny_encoder, digits_small, gc_setup):
    _, y, target, G = gc_setup
    nu, yp = digits_small.x_train[:12], y[:12]
    for bs in (5, 100):  # chunked and single-chunk paths
        loss, g = gc_input_grad(ChunkedEncoder(tiny_encoder, batch_size=bs, device="cpu"), _t64(target), _t64(G), nu, yp)
        loss_ref, g_ref = gc_input_grad_autograd(tiny_encoder, target, G, nu, yp)
        assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-4)
        assert ((g - g_ref).norm() / g_ref.norm()).item() < 1e-4


def test_one_gc_input_step_reduces_the_gc_loss(tiny_encoder, digits_small, gc_setup):
    _, y, target, G = gc_setup
    nu, yp = digits_small.x_train[:15], y[:15]
    enc = ChunkedEncoder(tiny_encoder, batch_size=64, device="cpu")
    loss0, g = gc_input_grad(enc, _t64(target), _t64(G), nu, yp)
    step = 0.05 * nu.reshape(15, -1).norm(dim=1).mean() / g.reshape(15, -1).norm(dim=1).mean()
    loss1, _ = gc_input_grad(enc, _t64(target), _t64(G), nu - step * g, yp)
    assert loss1.item() < loss0.item()
    loss_up, _ = gc_input_grad(enc, _t64(target), _t64(G), nu + step * g, yp)
    assert loss_up.item() > loss0.item()  # and the opposite direction increases it


def _gc(tiny_encoder, digits_small, gc_setup, n=60, **kw):
    """GC input on the first n images (random small_cnn: 25 steps at lr 0.1 take the residual
    from ~11 to ~2 unconstrained; constrained it stays near ~9.7)."""
    _, y, target, G = gc_setup
    x = digits_small.x_train
    args = {"steps": 25, "lr": 0.1, "stop_loss": 0.0, "clip": (float(x.min()), float(x.max())),
            "batch_size": 64, "device": "cpu"}
    args.update(kw)
    return input_gradient_canceling(tiny_encoder, target, G, x[:n], y[:n], **args)


def test_gc_input_optimises_the_residual(tiny_encoder, digits_small, gc_setup):
    _, _, info = _gc(tiny_encoder, digits_small, gc_setup, constrained=False)
    assert info["gc_loss_final"] < 0.5 * info["gc_loss_initial"]
    assert info["gc_steps_run"] == 25


def test_gc_input_with_a_huge_step_halves_it_and_still_makes_progress(tiny_encoder, digits_small, gc_setup):
    """A step 10^7 times too large used to end in AttackDiverged after 12 halvings; now the step halves
    and the run restarts from its best iterate until it makes progress: a finite answer, better
    than the clean images, and the result says how often the step was halved."""
    x = digits_small.x_train
    nu, zeta, info = _gc(tiny_encoder, digits_small, gc_setup, constrained=False, lr=1e6, steps=60)
    assert torch.isfinite(nu).all() and torch.isfinite(zeta).all()
    assert info["gc_step_halvings"] > 12 and info["gc_step_final_multiplier"] < 2.0 ** -12
    assert info["gc_loss_final"] < info["gc_loss_initial"] and not torch.equal(nu, x[:60])


def test_gc_input_adam_preconditions_the_step(tiny_encoder, digits_small, gc_setup):
    """optimizer "adam": a different path from GD's that also lowers the residual; constrained it
    keeps the clipping; an unknown optimizer name is refused by the parameter model."""
    from pydantic import ValidationError

    from attacks.catalogue import GCInputParams

    x = digits_small.x_train
    lo, hi = float(x.min()), float(x.max())
    gd, _, _ = _gc(tiny_encoder, digits_small, gc_setup, constrained=False)
    adam, _, info = _gc(tiny_encoder, digits_small, gc_setup, constrained=False, optimizer="adam")
    assert not torch.allclose(adam, gd)
    assert info["gc_loss_final"] < 0.5 * info["gc_loss_initial"]
    con, _, _ = _gc(tiny_encoder, digits_small, gc_setup, constrained=True, optimizer="adam", lr=0.01)
    assert con.min() >= lo and con.max() <= hi and not torch.equal(con, x[:60])
    assert GCInputParams(gc_optimizer="adam").gc_optimizer == "adam" and GCInputParams().gc_optimizer == "adam"
    with pytest.raises(ValidationError, match="gc_optimizer"):
        GCInputParams(gc_optimizer="lbfgs")


def test_constrained_poisons_stay_in_range_unconstrained_leave_it(tiny_encoder, digits_small, gc_setup):
    x = digits_small.x_train
    lo, hi = float(x.min()), float(x.max())
    con, _, ic = _gc(tiny_encoder, digits_small, gc_setup, constrained=True)
    free, _, iu = _gc(tiny_encoder, digits_small, gc_setup, constrained=False)
    assert con.min() >= lo and con.max() <= hi
    assert not torch.equal(con, x[:60])  # it did move
    assert free.min() < lo or free.max() > hi
    base = x[:60].reshape(60, -1)
    assert (free.reshape(60, -1) - base).norm(dim=1).mean() > (con.reshape(60, -1) - base).norm(dim=1).mean()
    assert free.abs().amax() > con.abs().amax()
    assert iu["gc_loss_final"] < ic["gc_loss_final"]  # and the constraint costs the attack


def test_chunked_equals_unchunked(tiny_encoder, digits_small, gc_setup):
    a, za, ia = _gc(tiny_encoder, digits_small, gc_setup, n=30, steps=6, batch_size=7)
    b, zb, ib = _gc(tiny_encoder, digits_small, gc_setup, n=30, steps=6, batch_size=1000)
    assert not torch.equal(a, digits_small.x_train[:30])
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(za, zb, rtol=1e-4, atol=1e-5)
    assert ia["gc_loss_final"] == pytest.approx(ib["gc_loss_final"], rel=1e-4)


def _counting(inner):
    """The same encoder (shared backbone) recording the largest batch it was given,
    overall and with a graph (a pass whose input requires grad)."""
    from attacks.encoders import Encoder

    class Counting(Encoder):
        def forward(self, x):
            self.largest = max(self.largest, x.shape[0])
            if x.requires_grad:
                self.largest_with_graph = max(self.largest_with_graph, x.shape[0])
            return super().forward(x)

    enc = Counting(inner.spec, inner.backbone)
    enc.largest = enc.largest_with_graph = 0
    return enc


@pytest.mark.parametrize("attack,params", [
    ("gc_input", {"gc_steps": 2, "batch_size": 32}),
    ("tgda_input", {"epochs": 2, "follower_steps": 1, "cg_iters": 2, "batch_size": 32}),
])
def test_epsilon_one_runs_with_bounded_encoder_batches(tiny_encoder, digits_small, attack, params):
    enc = _counting(tiny_encoder)
    r = run_job(encoder=enc, dataset=digits_small, attack=attack, epsilon=1.0, params=params, device="cpu")
    assert r.metrics["n_poisons"] == digits_small.n_train == len(r.poisons)
    assert 0 < enc.largest_with_graph <= 32  # every pass that builds a graph is one chunk
    lo, hi = r.metrics["poison_stats"]["clean_range"]
    assert r.poisons.x.min() >= lo and r.poisons.x.max() <= hi


def test_attack_chunks_never_exceed_batch_size(tiny_encoder, digits_small):
    x, y = digits_small.x_train[:50], digits_small.y_train[:50]
    enc = _counting(tiny_encoder)
    Z = torch.randn(50, tiny_encoder.feature_dim)
    head = Head(torch.randn(10, Z.shape[1]) * 0.1, torch.zeros(10))
    G = summed_gradient(head, Z, y)
    input_gradient_canceling(enc, head, G, x, y, steps=3, lr=0.1, batch_size=8, device="cpu")
    assert enc.largest == 8 and enc.largest_with_graph == 8


# ----------------------------------------------------------------------------- TGDA


def test_tgda_raises_the_validation_loss_and_keeps_constraints(tiny_encoder, digits_small):
    params = {"epochs": 8, "follower_steps": 5, "cg_iters": 8, "leader_lr": 0.05, "batch_size": 64}
    con = run_job(encoder=tiny_encoder, dataset=digits_small, attack="tgda_input", epsilon=0.1, params=params,
                  device="cpu")
    free = run_job(encoder=tiny_encoder, dataset=digits_small, attack="tgda_input", epsilon=0.1,
                   params={**params, "constrained": False}, device="cpu")
    m = free.metrics
    assert m["tgda_epochs_run"] == 8 and m["val_loss_max"] >= m["val_loss_initial"]
    assert m["val_loss_final"] > m["val_loss_initial"]  # the leader's ascent beats the follower's descent
    lo, hi = con.metrics["poison_stats"]["clean_range"]
    assert con.poisons.x.min() >= lo and con.poisons.x.max() <= hi
    assert free.poisons.x.min() < lo or free.poisons.x.max() > hi
    assert "target_accuracy" not in m  # TGDA has no target parameters


@pytest.mark.parametrize("lam", [0.0, 1e-2])
def test_tgda_attacker_gradient_matches_autograd(tiny_encoder, digits_small, gc_setup, lam):
    """The closed-form total derivative, the victim's L2 term in the Hessian included."""
    from attacks.tgda_input import attacker_grad_autograd

    Z, y, target, _ = gc_setup
    nu, yp = digits_small.x_train[:10], y[:10]
    enc = ChunkedEncoder(tiny_encoder, batch_size=4, device="cpu")
    Zp, vjp = enc.features_then_vjp(nu)
    C, _ = total_derivative_features(target, Z[100:], y[100:], Zp, yp, Z[:100], y[:100], cg_iters=10, damping=1e-2,
                                     lam=lam)
    got = vjp(C)
    ref = attacker_grad_autograd(tiny_encoder, target, Z[100:], y[100:], nu, yp, Z[:100], y[:100], 10, 1e-2, lam=lam)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-3
    # one mini-batch's rows are those rows of the whole derivative (the Hessian still covers every poison)
    C_rows, _ = total_derivative_features(target, Z[100:], y[100:], Zp, yp, Z[:100], y[:100], cg_iters=10,
                                          damping=1e-2, lam=lam, rows=slice(3, 7))
    assert torch.allclose(C_rows, C[3:7], rtol=1e-5, atol=1e-7)


def _tgda_run(tiny_encoder, digits_small, **params):
    base = {"epochs": 10, "follower_steps": 5, "cg_iters": 8, "batch_size": 16}
    return run_job(encoder=tiny_encoder, dataset=digits_small, attack="tgda_input", epsilon=0.1,
                   params={**base, **params}, device="cpu", defences=False)


def test_tgda_penalty_and_step_share_the_pixel_unit(tiny_encoder, digits_small):
    """Issue #12: the proximal weight was eta * penalty with eta in units of the (tiny) total
    derivative, 30-58 per step, and constrained poisons stayed 1e-4 from their bases. Now the
    step and the penalty are fractions of the clean pixel range r: a pixel settles at most about
    r / penalty from its base (Adam's direction is at most ~3.2 per pixel), whatever the size of
    the gradient, and a weaker penalty moves the poisons further."""
    strong = _tgda_run(tiny_encoder, digits_small, penalty=16.0)
    weak = _tgda_run(tiny_encoder, digits_small, penalty=0.5)
    lo, hi = strong.metrics["poison_stats"]["clean_range"]
    r = hi - lo
    for res in (strong, weak):
        assert res.poisons.x.min() >= lo and res.poisons.x.max() <= hi
    ms, mw = strong.metrics, weak.metrics
    assert ms["poison_stats"]["linf_to_base"]["max"] <= 3.2 * r / 16
    assert ms["poison_stats"]["linf_to_base"]["mean"] > 0.01 * r  # moved, not pinned
    assert mw["poison_stats"]["linf_to_base"]["mean"] > 0.1 * r
    assert mw["poison_stats"]["l2_to_base"]["mean"] > 2 * ms["poison_stats"]["l2_to_base"]["mean"]
    # the strength of the run is recorded with the result
    assert ms["tgda_penalty_effective"] == 16.0 and ms["pixel_range"] == pytest.approx(r)
    assert ms["tgda_linf_to_base_mean"] == pytest.approx(ms["poison_stats"]["linf_to_base"]["mean"], rel=1e-5)


def test_tgda_takes_one_leader_step_per_mini_batch(tiny_encoder, digits_small):
    m = _tgda_run(tiny_encoder, digits_small, epochs=3, constrained=False).metrics
    n = m["n_poisons"]
    assert n == 30
    assert m["tgda_leader_steps_per_epoch"] == 2 and m["tgda_leader_steps"] == 3 * 2  # batches of 16
    assert m["tgda_epochs_run"] == 3 and 0 <= m["tgda_best_epoch"] <= 3
    assert m["val_loss_best"] == m["val_loss_max"] >= m["val_loss_initial"]
    # the follower tracks the minimiser of the victim's objective: its gradient at the end is below
    # that of the clean head on the defender's set (poisons included) where it started. (It lags:
    # 5 L-BFGS iterations after each leader step leave ~1e-2 here, against 1e-4 after the warm-up.)
    assert m["tgda_follower_grad_max"] < m["tgda_follower_grad_max_initial"]


# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("attack,bad", [
    ("gc_input", {"gc_lr": 0}),
    ("gc_input", {"gc_steps": 0}),
    ("gc_input", {"batch_size": 0}),
    ("gc_input", {"penalty": -1.0}),
    ("gc_input", {"constrained": "sometimes"}),
    ("gc_input", {"leader_lr": 0.1}),  # a TGDA parameter: extra="forbid"
    ("tgda_input", {"val_fraction": 1.0}),
    ("tgda_input", {"val_fraction": 0.0}),
    ("tgda_input", {"cg_iters": 0}),
    ("tgda_input", {"cg_damping": -1e-3}),
    ("tgda_input", {"leader_lr": 0}),
    ("tgda_input", {"gc_steps": 10}),
])
def test_invalid_parameters_are_refused(attack, bad):
    with pytest.raises(ValidationError):
        validate_job(attack, params=bad)


def test_defaults_validate():
    assert validate_job("gc_input")[1] == GCInputParams()
    assert validate_job("tgda_input")[1] == TGDAParams()
    with pytest.raises(ValueError, match="takes no beta"):
        validate_job("gc_input", beta=0.25)


def test_poisons_never_carry_a_graph_and_the_caller_tensor_stays_a_leaf():
    """Single-chunk CPU path: .to() would return the caller's tensor itself; it must be copied."""
    from attacks.gc_input import ChunkedEncoder

    torch.manual_seed(0)
    from attacks.encoders import EncoderSpec, build_encoder, freeze

    enc = freeze(build_encoder(EncoderSpec(arch="small_cnn", in_channels=1, width=4)))
    x = torch.rand(5, 1, 8, 8)
    ce = ChunkedEncoder(enc, batch_size=64, device="cpu")
    f, vjp = ce.features_with_vjp(x)
    g = vjp(torch.ones_like(f))
    assert not x.requires_grad and x.grad_fn is None
    assert g.shape == x.shape and not g.requires_grad


def test_tgda_follower_solves_the_victims_objective(gc_setup):
    """The L-BFGS follower's minimiser is the victim's (fit_head with the same lambda and feature
    scale), at a feature scale far from 1 so that a mis-scaled regulariser shows."""
    from attacks.head import fit_head, l2_strength
    from attacks.tgda_input import _Follower

    Z, y, _, _ = gc_setup
    Z = 7.0 * Z
    recipe = HeadRecipe(l2=1e-2, tol=1e-6, max_iter=5000)
    s = (Z ** 2).sum(1).mean().sqrt().item()
    lam = l2_strength(recipe, s)
    victim, info = fit_head(Z, y, 10, recipe, scale=s)
    assert info["converged"]
    fol = _Follower(Z[40:], y[40:], lam, "lbfgs", 0.1, s, tol=1e-6)
    start = Head(torch.zeros_like(victim.W), torch.zeros_like(victim.b))
    head, gmax = fol(start, Z[:40], y[:40], 2000)  # poisons = the first 40 points: the same set in all
    assert gmax < 1e-5
    assert ((head.W - victim.W).norm() / victim.W.norm()).item() < 1e-3
    assert fol.grad_max(victim, Z[:40], y[:40]) < 1e-5


@pytest.mark.parametrize("params", [{"follower": "gd"}, {"follower_steps": 0}])
def test_tgda_other_followers_run_and_record_a_finite_gradient(tiny_encoder, digits_small, params):
    m = _tgda_run(tiny_encoder, digits_small, epochs=2, **params).metrics
    assert m["tgda_leader_steps"] == 4
    assert 0 <= m["tgda_follower_grad_max"] < float("inf")
