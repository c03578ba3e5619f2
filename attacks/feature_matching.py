"""Feature matching: the feature-targeted attack (stages 1-3, Algorithm 1).

Paper: Lu, Yang, Kamath, Yu (SaTML 2024), Section 4.2.2, Algorithm 1, Eq. 15;
forward-backward splitting as in Feature Collision (Shafahi et al., 2018).

Parameters (:class:`attacks.catalogue.FeatureMatchingParams`, plus GC's and GradPC's):
    beta (job level, 0.25, >= 0): weight of 1/2||mu' - nu||^2 (also 0.1, 0.05 in the paper).
    gamma (1.0, > 0): weight of 1/2||f(nu) - zeta||^2.
    fm_steps (2000, >= 1): steps t per round; fm_lr (0.1): eta, cosine-decayed per round.
    rounds (1, >= 1): outer rounds k. Rounds after the first first run
        round_gc_steps GC steps on zeta (labels now those of the base images),
        with Algorithm 1's optional pull of zeta toward f(nu), of strength ``pull``.
    normalize_features (True): the matching term is measured in units of the mean
        clean feature norm s, i.e. gamma/2 ||(f(nu) - zeta)/s||^2, so that eta
        transfers across encoders [D]; False is the paper's raw form.
    pairing ("nearest"): base image of each zeta: nearest clean feature (paper),
        nearest among the clean images with zeta's GC label ("nearest_same_label": the
        poison then keeps the label GC computed zeta for), nearest not yet taken
        ("nearest_unique"), or the GC initialiser ("gc_init").
    feature_floor ("auto"): GC keeps zeta >= 0 for ReLU-pooled encoders, whose features
        are never negative (see :mod:`attacks.gc_feature`).
    feature_ceiling (1.0): GC keeps each coordinate of zeta at most this multiple of its
        largest clean value [D]. Unbounded, GC put most of its harm into a few poisons whose
        features are several times larger than any image's; feature matching could not reach
        them from nearby pixels and realised 1.5 of 18.5 points. Inside the clean range zeta
        carries less harm (2.6 points) but feature matching realises nearly all of it (2.4;
        SimCLR small_cnn on mnist5k, epsilon 0.1, beta 0.25, seed 0).
    batch_size (512): poisons optimised together (they are independent).

Each step, for a batch of poisons (n_b, C, H, W):
    nu <- nu - eta_t * gamma * J_f(nu)^T (f(nu) - zeta) / s^2     (forward)
    nu <- (nu + eta_t * beta * mu') / (1 + eta_t * beta)          (backward, proximal)
No clipping (the paper clips nothing; feature matching-r filters afterwards), unless
``projected``: then every step is projected onto the clean data range, which is what an
attacker does against a magnitude filter (the poisons pass feature matching-r's rule).

Returns poisons nu (n, C, H, W) float32, their labels (those of the base
images) and base indices into the training set.
"""

from __future__ import annotations

import math

import torch

from attacks.adam import AdamDirection
from attacks.catalogue import FeatureMatchingParams
from attacks.features import autocast_for, extract_features
from attacks.errors import AttackDiverged
from attacks.gc_feature import feature_ceiling, gradient_canceling, poisoned_features
from attacks.progress import ProgressFn, checkpoint


def nearest_clean(zeta: torch.Tensor, Z: torch.Tensor, unique: bool = False, chunk: int = 4096) -> torch.Tensor:
    """Index of the nearest clean feature for each row of zeta (chunked GEMM).

    unique: greedy one-to-one assignment, closest pairs first.
    """
    zn = (Z * Z).sum(1)
    if not unique:
        out = torch.empty(zeta.shape[0], dtype=torch.long)
        for i in range(0, zeta.shape[0], chunk):
            checkpoint()
            q = zeta[i : i + chunk]
            d = zn[None, :] - 2 * q @ Z.T  # |q|^2 is constant per row
            out[i : i + chunk] = d.argmin(1)
        return out
    k = min(Z.shape[0], 64)
    cand_d, cand_i = [], []
    for i in range(0, zeta.shape[0], chunk):
        checkpoint()
        q = zeta[i : i + chunk]
        d = zn[None, :] - 2 * q @ Z.T + (q * q).sum(1, keepdim=True)
        v, j = d.topk(k, dim=1, largest=False)
        cand_d.append(v)
        cand_i.append(j)
    D, I = torch.cat(cand_d), torch.cat(cand_i)
    out = torch.full((zeta.shape[0],), -1, dtype=torch.long)
    taken: set[int] = set()
    order = torch.argsort(D[:, 0])
    for r in order.tolist():
        checkpoint()
        for j in I[r].tolist():
            if j not in taken:
                out[r] = j
                taken.add(j)
                break
    missing = (out < 0).nonzero().flatten().tolist()
    if missing:  # all 64 candidates taken: fall back to the nearest untaken by full search
        free = torch.ones(Z.shape[0], dtype=torch.bool)
        free[list(taken)] = False
        for r in missing:
            d = ((Z - zeta[r]) ** 2).sum(1)
            d[~free] = float("inf")
            j = int(d.argmin())
            out[r] = j
            free[j] = False
    return out


def nearest_clean_same_label(zeta: torch.Tensor, labels: torch.Tensor, Z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """For each row of zeta, the index of the nearest clean feature among those with its label."""
    out = torch.empty(zeta.shape[0], dtype=torch.long)
    labels, y = labels.to(Z.device), y.to(Z.device)
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().flatten()
        pool = (y == c).nonzero().flatten()
        if len(pool) == 0:
            raise ValueError(f"no clean image with label {c} to pair with")
        out[rows.cpu()] = pool[nearest_clean(zeta[rows], Z[pool])].cpu()
    return out


def match_features(
    encoder: torch.nn.Module,
    base: torch.Tensor,
    zeta: torch.Tensor,
    *,
    beta: float,
    gamma: float = 1.0,
    steps: int = 2000,
    lr: float = 0.1,
    scale: float = 1.0,
    init: torch.Tensor | None = None,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    amp: bool = False,
    optimizer: str = "gd",
    clip: tuple[float, float] | None = None,
    progress=None,
) -> torch.Tensor:
    """Algorithm 1's inner loop (lines 9-11) for all poisons, batch by batch.

    base: mu' (n, C, H, W); zeta: (n, d); init: starting nu (default base).
    scale: features are compared in units of ``scale`` (s above). Inputs are not
    modified. Returns nu (n, C, H, W) float32 on CPU.
    optimizer: "gd", the paper's plain forward step; "adam", the forward step
    preconditioned per pixel by Adam's moment estimates (beta1 0.9, beta2 0.999),
    the proximal step unchanged. Each poison's pixels have their own moments, so
    the result does not depend on the batching. clip: (lo, hi) projects every step onto the
    box [lo, hi] (the projected variant: poisons stay inside the clean data range).
    """
    device = torch.device(device)
    n = base.shape[0]
    out = torch.empty_like(base, dtype=torch.float32)
    start = base if init is None else init
    inv_s2 = 1.0 / (scale * scale)
    total = steps * math.ceil(n / batch_size)
    done = 0
    for i in range(0, n, batch_size):
        mu = base[i : i + batch_size].to(device, torch.float32)
        nu = start[i : i + batch_size].to(device, torch.float32).clone()
        zt = zeta[i : i + batch_size].to(device, torch.float32)
        adam = AdamDirection() if optimizer in ("adam", "eq15") else None
        if optimizer == "eq15":
            nu = _match_eq15(encoder, mu, nu, zt, beta=beta, gamma=gamma, steps=steps, lr=lr, adam=adam,
                             device=device, amp=amp, clip=clip,
                             tick=(lambda t: progress and (t % 5 == 0 or t == steps - 1) and progress((done + t + 1) / total)))
            done += steps
        else:
            for t in range(steps):
                checkpoint()
                eta = lr * 0.5 * (1 + math.cos(math.pi * t / steps))
                nu.requires_grad_(True)
                with autocast_for(device, amp):
                    f = encoder(nu)
                err = f.float() - zt
                # d/dnu of gamma/2 ||err||^2 / s^2 : one VJP with cotangent gamma * err / s^2
                (g,) = torch.autograd.grad(f, nu, grad_outputs=(gamma * inv_s2) * err.to(f.dtype))
                with torch.no_grad():
                    if adam is not None:
                        g = adam(g)
                    nu = nu.detach() - eta * g
                    nu = (nu + (eta * beta) * mu) / (1 + eta * beta)
                    if clip is not None:
                        nu.clamp_(clip[0], clip[1])
                done += 1
                if progress and (t % 5 == 0 or t == steps - 1):
                    progress(done / total)
        if not torch.isfinite(nu).all():
            raise AttackDiverged(
                f"feature matching diverged (non-finite poisons) at step size {lr}; lower fm_lr"
            )
        out[i : i + batch_size] = nu.detach().cpu()
    return out


def _match_eq15(encoder, mu, nu, zt, *, beta, gamma, steps, lr, adam, device, amp, clip, tick):
    """Eq. 15 exactly, gamma/2 ||f(nu) - zeta||^2 + beta/2 ||nu - mu'||^2 per poison, minimised by
    Adam on its full gradient: the step, not the objective, is normalised (each pixel moves about
    eta per step, eta = lr cosine-decayed, whatever the encoder's Jacobian scale), so beta is the
    paper's beta. Each poison keeps its best iterate (lowest objective), and a poison whose
    objective has not improved for 10% of the budget stops moving (early stop)."""
    best = nu.detach().clone()
    best_obj = torch.full((nu.shape[0],), math.inf, device=nu.device)
    stale = torch.zeros(nu.shape[0], dtype=torch.long, device=nu.device)
    patience = max(20, steps // 10)
    for t in range(steps):
        checkpoint()
        eta = lr * 0.5 * (1 + math.cos(math.pi * t / steps))
        nu = nu.detach().requires_grad_(True)
        with autocast_for(device, amp):
            f = encoder(nu)
        err = f.float() - zt
        (g,) = torch.autograd.grad(f, nu, grad_outputs=gamma * err.to(f.dtype))
        with torch.no_grad():
            prox = nu - mu
            obj = 0.5 * gamma * (err * err).sum(1) + 0.5 * beta * (prox * prox).flatten(1).sum(1)
            better = obj < best_obj
            best[better] = nu[better]
            best_obj = torch.where(better, obj, best_obj)
            stale = torch.where(better, torch.zeros_like(stale), stale + 1)
            active = (stale < patience).view(-1, *([1] * (nu.dim() - 1))).to(nu.dtype)
            if not bool(active.any()):
                break
            step = adam(g + beta * prox)
            nu = nu - eta * active * step
            if clip is not None:
                nu.clamp_(clip[0], clip[1])
        tick(t)
    # the last iterate was never scored: score it once
    with torch.no_grad():
        with autocast_for(device, amp):
            f = encoder(nu)
        err = f.float() - zt
        prox = nu - mu
        obj = 0.5 * gamma * (err * err).sum(1) + 0.5 * beta * (prox * prox).flatten(1).sum(1)
        better = obj < best_obj
        best[better] = nu[better]
    return best


def feature_matching(ctx, params: FeatureMatchingParams, *, epsilon: float, beta: float, seed: int, progress=None):
    """Stages 1-3; returns (AttackOutput fields as a dict)."""
    report = progress or (lambda s, f: None)
    target, G, zeta, gc_labels, gc_idx, info = poisoned_features(ctx, params, epsilon, seed, progress)
    if params.pairing == "gc_init":
        base_idx = gc_idx
    elif params.pairing == "nearest_same_label":
        base_idx = nearest_clean_same_label(zeta, gc_labels, ctx.Z_train, ctx.y_train)
    else:
        base_idx = nearest_clean(zeta, ctx.Z_train, unique=params.pairing == "nearest_unique")
    labels = ctx.y_train[base_idx]
    info["labels_changed_by_pairing"] = int((labels != gc_labels).sum())
    mu = ctx.dataset.x_train[base_idx]
    clean_norm = ctx.Z_train.norm(dim=1).mean().item()
    scale = clean_norm if params.normalize_features else 1.0
    ceiling = feature_ceiling(params.feature_ceiling, ctx.Z_train)  # for the GC of rounds after the first
    nu = mu
    for k in range(params.rounds):
        if k > 0 and params.round_gc_steps > 0:
            fz = extract_features(ctx.encoder, nu, batch_size=params.batch_size, device=ctx.device, amp=ctx.amp)
            zeta, _ = gradient_canceling(
                target,
                G,
                zeta,
                labels,
                steps=params.round_gc_steps,
                lr=params.gc_lr,
                cancel_bias=params.cancel_bias,
                stop_loss=params.stop_loss,
                pull_to=fz if params.pull > 0 else None,
                pull_weight=params.pull * params.gamma,
                feature_scale=clean_norm,
                floor=info["gc_feature_floor"],
                ceiling=ceiling,
            )
        nu = match_features(
            ctx.encoder,
            mu,
            zeta,
            beta=beta,
            gamma=params.gamma,
            steps=params.fm_steps,
            lr=params.eq15_lr if params.fm_optimizer == "eq15" else params.fm_lr,
            optimizer=params.fm_optimizer,
            clip=(float(ctx.dataset.x_train.min()), float(ctx.dataset.x_train.max())) if params.projected else None,
            scale=scale,
            init=nu,
            batch_size=params.batch_size,
            device=ctx.device,
            amp=ctx.amp,
            progress=lambda f, k=k: report("feature_matching", (k + f) / params.rounds),
        )
    # What the features feature matching chased would do if reached exactly: the gap between this
    # and the poisoned accuracy is what the inversion to pixels loses (one extra head fit on the cache).
    from attacks.head import accuracy

    zeta_head, _ = ctx.fit_victim(
        torch.cat([ctx.Z_train, zeta.float().to(ctx.Z_train.device)]),
        torch.cat([ctx.y_train, labels.to(ctx.y_train.device)]),
        seed,
    )
    info["zeta_poisoned_accuracy"] = accuracy(zeta_head, ctx.Z_test, ctx.y_test)
    # ||f(mu') - zeta||^2 at the base images (cached features): where feature matching started from.
    info["base_feature_error_mean"] = ((ctx.Z_train[base_idx].to(zeta) - zeta) ** 2).sum(1).mean().item()
    return dict(
        target=target,
        poisons=nu,
        poison_labels=labels,
        base_index=base_idx,
        zeta=zeta,
        extra=info | {"feature_scale": scale},
    )


def run(ctx, params: FeatureMatchingParams, *, epsilon: float, beta: float, seed: int, progress: ProgressFn | None = None):
    """Entry point: poisoned images nu whose features match the GC features zeta."""
    from attacks.pipeline import AttackOutput

    return AttackOutput(**feature_matching(ctx, params, epsilon=epsilon, beta=beta, seed=seed, progress=progress))
