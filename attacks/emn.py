"""Unlearnable examples: sample-wise error-minimising noise (EMN).

Paper: Lu, Yang, Kamath, Yu (SaTML 2024), Section 3.4, Eq. 10 and Table 4;
the attack of Huang, Ma, Erfani, Bailey, Wang, "Unlearnable Examples: Making
Personal Data Unexploitable" (ICLR 2021, HanxunH/Unlearnable-Examples).

    min_omega  min_{||delta_i||_inf <= radius}  sum_i CE(h_omega(f(x_i + delta_i)), y_i)

Parameters (:class:`attacks.catalogue.EMNParams`):
    epsilon (job level, (0, 1]): the fraction of training images perturbed *in
        place* [D]: a seeded random subset of round(epsilon * N) >= 1 images
        (all of them, in order, at 1: the paper's eps_d = infinity). The
        perturbed images replace their clean originals (labels kept), so the
        training set keeps its N points. beta: not taken.
    radius (8/255): L_inf radius of each delta_i (paper, reference).
    pgd_steps (20), pgd_step (0.8/255): one pass of sign-PGD *descent* on the CE
        loss per round over every perturbed image (reference). delta starts at 0 and
        persists across rounds; after each step delta is clamped to [-radius,
        radius] and x + delta to [0, 1].
    head_steps (10), lr (0.1), momentum (0.9), weight_decay (5e-4), batch_size (128):
        the model steps of each round: SGD on mini-batches of the current training
        set (perturbed images in place of their originals, the clean rest when
        epsilon < 1), drawn from a seeded stream of shuffles that continues across
        rounds, always full batches (reference: 10 steps, lr 0.1, momentum 0.9,
        wd 5e-4 on every parameter). The same batch_size chunks the PGD pass.
    stop_accuracy (0.99), max_rounds (10): after each PGD pass, stop when the
        model's accuracy on the perturbed images exceeds stop_accuracy (reference);
        at most max_rounds rounds [D], since a frozen encoder may never get there.
        The accuracy is measured on the perturbed images only [D] (all of them at
        epsilon 1, where this is the reference's criterion).
    end_to_end (False):
        False, the paper's "input space" row: the encoder is frozen (ctx.encoder,
            eval mode). The model is a linear head on its features; its steps read
            features of x + delta recorded at the end of each PGD pass (round 1:
            the cached clean features), so the only encoder work is the PGD pass.
            Evaluation is the pipeline's: the head retrained with ctx.recipe on the
            cached clean features with f(x + delta) replacing the perturbed rows.
        True, the paper's Table 4 "end-to-end" row: the model is a deep copy of the
            pre-trained encoder plus a new head, both trained (encoder at
            encoder_lr, head at lr). ctx.encoder is never modified. BatchNorm [D]:
            train mode (batch statistics, running averages updated) in the model
            steps and the fine-tuning, as in the reference and in ordinary
            fine-tuning; eval mode in the PGD pass, the stop check and testing, as
            in the reference. Evaluation, done here: fine-tune a fresh copy of the
            pre-trained encoder and a new head on the poisoned training set for
            finetune_epochs (SGD, lr / encoder_lr cosine-decayed to 0 over the
            epochs [D], momentum, weight_decay, batch_size, seeded shuffles), and
            identically (same init, same shuffles) on the clean training set for the
            end-to-end clean accuracy; both are test accuracies.
    Model initialisation [D]: a fresh head drawn from the seed (nn.Linear's
        default U(-1/sqrt(d), 1/sqrt(d))), not the clean head: the reference trains
        its model from scratch alongside the noise, and the paper's end-to-end row
        starts from the pre-trained encoder with a new head ("same initialization").
        The clean head has already fitted the clean data, so noise that lowers its
        loss would mostly reinforce features the images already have.

Shapes: x_train (N, C, H, W) in [0, 1]; poisons (n, C, H, W) float32 with
n = round(epsilon * N) >= 1; labels (n,) and base_index (n,) int64 (sorted).

Extra (reported with the result): rounds, stop_reached, train_accuracy_perturbed
(the model's accuracy on the perturbed images after the last pass), loss_clean and
loss_perturbed (that model's mean CE on the perturbed images' clean originals and on
the perturbed images: the error-minimising pass must make the second smaller).

Divergence: a non-finite model loss or delta raises AttackDiverged, never a NaN.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from attacks.catalogue import EMNParams
from attacks.errors import AttackDiverged
from attacks.features import autocast_for
from attacks.gc_feature import choose_subset, n_poisons
from attacks.progress import ProgressFn, checkpoint, no_progress

__all__ = ["run", "error_minimising_noise", "finetune_accuracy", "perturbed_subset"]


def perturbed_subset(epsilon: float, n_train: int, seed: int) -> torch.Tensor:
    """Sorted indices of the round(epsilon * N) >= 1 images to perturb (all of them at epsilon 1)."""
    if not 0 < epsilon <= 1:
        raise ValueError(f"epsilon is the fraction of training images perturbed, in (0, 1]; got {epsilon}")
    n = min(n_poisons(epsilon, n_train), n_train)
    if n == n_train:
        return torch.arange(n_train)
    return choose_subset(n_train, n, "random", seed)


def _new_head(d: int, k: int, gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    bound = 1.0 / math.sqrt(d)
    W = (torch.rand(k, d, generator=gen) * 2 - 1) * bound
    b = (torch.rand(k, generator=gen) * 2 - 1) * bound
    return W.to(device).requires_grad_(True), b.to(device).requires_grad_(True)


class _BatchStream:
    """Full mini-batches of indices from a seeded stream of shuffles (continues across rounds)."""

    def __init__(self, n: int, batch_size: int, gen: torch.Generator):
        self.n, self.bs, self.gen = n, min(batch_size, n), gen
        self.buf = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        while self.buf.numel() < self.bs:
            self.buf = torch.cat([self.buf, torch.randperm(self.n, generator=self.gen)])
        out, self.buf = self.buf[: self.bs], self.buf[self.bs :]
        return out


def _logits(z: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.addmm(b, z.float(), W.T)


def _pgd_pass(encoder, W, b, x, xp, y, params: EMNParams, device, amp, report) -> tuple[torch.Tensor, torch.Tensor]:
    """One error-minimising pass over the perturbed images, batch by batch.

    x: clean originals (n, ...) and xp: their current perturbed versions (CPU);
    returns (new xp on CPU, features f(new xp) (n, d) float32 on ``device``).
    The encoder must be in eval mode with no grad on its weights; W, b are read only.
    """
    r, step = params.radius, params.pgd_step
    W, b = W.detach(), b.detach()
    out_x = torch.empty_like(xp)
    feats = []
    n = x.shape[0]
    for i in range(0, n, params.batch_size):
        checkpoint()
        xb = x[i : i + params.batch_size].to(device, torch.float32)
        yb = y[i : i + params.batch_size].to(device)
        pb = xp[i : i + params.batch_size].to(device, torch.float32).clone()
        for _ in range(params.pgd_steps):
            checkpoint()
            pb.requires_grad_(True)
            with autocast_for(device, amp):
                z = encoder(pb)
            loss = F.cross_entropy(_logits(z, W, b), yb, reduction="sum")
            (g,) = torch.autograd.grad(loss, pb)
            with torch.no_grad():
                d = (pb - step * g.sign() - xb).clamp_(-r, r)  # descent: error-minimising
                pb = (xb + d).clamp_(0.0, 1.0)
        if not torch.isfinite(pb).all():
            raise AttackDiverged("error-minimising noise became non-finite (the encoder's input gradient is NaN/inf)")
        with torch.no_grad(), autocast_for(device, amp):
            feats.append(encoder(pb).float())
        out_x[i : i + params.batch_size] = pb.detach().to(out_x.device)
        report(min(i + params.batch_size, n) / n)
    return out_x, torch.cat(feats)


def _check_loss(loss: torch.Tensor, what: str, lr: float) -> None:
    if not torch.isfinite(loss):
        raise AttackDiverged(f"{what} diverged (non-finite loss) at learning rate {lr}; lower lr")


def error_minimising_noise(ctx, params: EMNParams, idx: torch.Tensor, seed: int, progress=None):
    """The min-min loop. Returns (perturbed images x[idx] + delta (n, C, H, W) on CPU, info dict)."""
    report = progress or no_progress
    dev, amp = ctx.device, ctx.amp
    x_all = ctx.dataset.x_train.float()
    y_all = ctx.y_train.long()
    N, K = x_all.shape[0], ctx.dataset.num_classes
    x_sub, y_sub = x_all[idx], y_all[idx]
    xp_sub = x_sub.clone()  # delta starts at 0
    gen = torch.Generator().manual_seed(seed)
    W, b = _new_head(ctx.Z_train.shape[1], K, gen, dev)
    stream = _BatchStream(N, params.batch_size, gen)
    y_dev = y_all.to(dev)

    if params.end_to_end:
        encoder = copy.deepcopy(ctx.encoder).to(dev)
        enc_params = [p for p in encoder.parameters() if p.is_floating_point()]
        groups = [{"params": enc_params, "lr": params.encoder_lr}, {"params": [W, b], "lr": params.lr}]
        xp_all = x_all.clone()  # the current training set, perturbed images in place
    else:
        encoder = ctx.encoder  # frozen by the pipeline; only read
        groups = [{"params": [W, b], "lr": params.lr}]
        Z_cur = ctx.Z_train.to(dev, torch.float32).clone()  # round 1: delta = 0, the cached clean features
    opt = torch.optim.SGD(groups, lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay)

    rounds, acc, stop = 0, 0.0, False
    feats = None
    for rnd in range(params.max_rounds):
        # model steps on the current training set
        if params.end_to_end:
            encoder.train()
            encoder.requires_grad_(True)
        for _ in range(params.head_steps):
            checkpoint()
            bi = stream.next()
            if params.end_to_end:
                with autocast_for(dev, amp):
                    z = encoder(xp_all[bi].to(dev))
            else:
                z = Z_cur[bi.to(dev)]
            loss = F.cross_entropy(_logits(z, W, b), y_dev[bi.to(dev)])
            opt.zero_grad(set_to_none=False)
            loss.backward()
            opt.step()
        _check_loss(loss.detach(), "the EMN model", params.lr)
        # one error-minimising pass over every perturbed image
        if params.end_to_end:
            encoder.eval()
            encoder.requires_grad_(False)
        xp_sub, feats = _pgd_pass(
            encoder, W, b, x_sub, xp_sub, y_sub, params, dev, amp,
            lambda f, rnd=rnd: report("emn", (rnd + f) / params.max_rounds),
        )
        if params.end_to_end:
            xp_all[idx] = xp_sub
        else:
            Z_cur[idx.to(dev)] = feats
        rounds = rnd + 1
        with torch.no_grad():
            acc = (_logits(feats, W, b).argmax(1) == y_sub.to(dev)).float().mean().item()
        if acc > params.stop_accuracy:
            stop = True
            break
    report("emn", 1.0)

    # the final model's loss on the clean originals and on the perturbed images
    with torch.no_grad():
        Wd, bd = W.detach(), b.detach()
        if params.end_to_end:
            zc = []
            for i in range(0, x_sub.shape[0], params.batch_size):
                checkpoint()
                with autocast_for(dev, amp):
                    zc.append(encoder(x_sub[i : i + params.batch_size].to(dev)).float())
            z_clean = torch.cat(zc)
        else:
            z_clean = ctx.Z_train[idx].to(dev, torch.float32)
        yd = y_sub.to(dev)
        loss_clean = F.cross_entropy(_logits(z_clean, Wd, bd), yd).item()
        loss_pert = F.cross_entropy(_logits(feats, Wd, bd), yd).item()
    if not (math.isfinite(loss_clean) and math.isfinite(loss_pert)):
        raise AttackDiverged("the EMN model's final loss is non-finite; lower lr")
    info = {
        "rounds": rounds,
        "stop_reached": stop,
        "train_accuracy_perturbed": acc,
        "loss_clean": loss_clean,
        "loss_perturbed": loss_pert,
        "n_perturbed": int(idx.numel()),
        "end_to_end": params.end_to_end,
    }
    return xp_sub, info


def finetune_accuracy(
    encoder0: torch.nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    num_classes: int,
    params: EMNParams,
    seed: int,
    device: torch.device,
    amp: bool = False,
    progress=None,
) -> float:
    """Test accuracy after fine-tuning a copy of ``encoder0`` and a new head end to end on (x_train, y_train).

    SGD (encoder at encoder_lr, head at lr, both cosine-decayed to 0 over the run),
    momentum and weight decay from ``params``, finetune_epochs epochs of seeded
    shuffles; a last batch of a single image is skipped (BatchNorm needs two).
    ``encoder0`` is not modified. The same seed gives the same init and shuffles.
    """
    report = progress or (lambda f: None)
    encoder = copy.deepcopy(encoder0).to(device)
    encoder.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    W, b = _new_head(encoder.feature_dim, num_classes, gen, device)
    enc_params = [p for p in encoder.parameters() if p.is_floating_point()]
    opt = torch.optim.SGD(
        [{"params": enc_params, "lr": params.encoder_lr}, {"params": [W, b], "lr": params.lr}],
        lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay,
    )
    n, bs = x_train.shape[0], params.batch_size
    steps_per_epoch = sum(1 for i in range(0, n, bs) if min(bs, n - i) > 1)
    total = max(1, params.finetune_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
    y_dev = y_train.to(device)
    encoder.train()
    done = 0
    for _ in range(params.finetune_epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, bs):
            checkpoint()
            bi = perm[i : i + bs]
            if bi.numel() < 2:
                continue
            with autocast_for(device, amp):
                z = encoder(x_train[bi].to(device))
            loss = F.cross_entropy(_logits(z, W, b), y_dev[bi.to(device)])
            opt.zero_grad(set_to_none=False)
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            report(done / total)
        _check_loss(loss.detach(), "end-to-end fine-tuning", params.lr)
    encoder.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, x_test.shape[0], 512):
            checkpoint()
            with autocast_for(device, amp):
                z = encoder(x_test[i : i + 512].to(device))
            correct += (_logits(z, W, b).argmax(1).cpu() == y_test[i : i + 512].cpu()).sum().item()
    return correct / max(1, x_test.shape[0])


def run(ctx, params: EMNParams, *, epsilon: float, beta: float | None = None, seed: int = 0,
        progress: ProgressFn | None = None):
    """Entry point: perturbed training images that replace their originals (AttackOutput.replaces_base)."""
    from attacks.pipeline import AttackOutput

    if beta is not None:
        raise ValueError("emn takes no beta")
    report = progress or no_progress
    idx = perturbed_subset(epsilon, ctx.dataset.x_train.shape[0], seed)
    poisons, info = error_minimising_noise(ctx, params, idx, seed, report)
    labels = ctx.y_train[idx].long()
    evaluation = None
    if params.end_to_end:
        x_pois = ctx.dataset.x_train.float().clone()
        x_pois[idx] = poisons
        ds = ctx.dataset
        kw = dict(num_classes=ds.num_classes, params=params, seed=seed, device=ctx.device, amp=ctx.amp)
        poisoned = finetune_accuracy(ctx.encoder, x_pois, ctx.y_train, ds.x_test, ctx.y_test,
                                     progress=lambda f: report("emn_finetune", f / 2), **kw)
        clean = finetune_accuracy(ctx.encoder, ds.x_train.float(), ctx.y_train, ds.x_test, ctx.y_test,
                                  progress=lambda f: report("emn_finetune", 0.5 + f / 2), **kw)
        evaluation = {"clean_accuracy": clean, "poisoned_accuracy": poisoned}
        info["finetune_epochs"] = params.finetune_epochs
    return AttackOutput(
        poisons=poisons.float(),
        poison_labels=labels,
        base_index=idx.long(),
        replaces_base=True,
        evaluation=evaluation,
        extra=info,
    )
