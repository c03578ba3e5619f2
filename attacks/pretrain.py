"""SimCLR pre-training of an encoder, and a linear-probe accuracy to check it.

Chen, Kornblith, Norouzi, Hinton. A Simple Framework for Contrastive Learning
of Visual Representations. ICML 2020.

Two augmented views of every image go through the encoder and a projection
MLP (Linear-BN-ReLU-Linear), and the NT-Xent loss pulls the views of one image
together against the other 2B - 2 views of the batch. The projection head is
discarded afterwards; the encoder comes back frozen.

Augmentations run in torch on whole batches, in the dataset's pixel space
(before the encoder's own resize and normalisation):

* random resized crop: area fraction in ``crop_scale``, aspect ratio in
  [3/4, 4/3], one affine sampling grid per image (``affine_grid`` +
  ``grid_sample``, bilinear), optional horizontal flip (off by default:
  mirrored digits are other glyphs);
* brightness and contrast jitter (factors in ``1 +- jitter``) on 80% of images;
* additive gaussian noise with a per-image std drawn from ``[0, noise_std]``;
* clamp to ``[0, 1]``.

Everything random draws from one ``torch.Generator`` seeded with
``config.seed``, and the weights are initialised under a forked, seeded global
RNG, so the same config and data give the same weights on the CPU and the
caller's RNG state is left untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor, nn

from attacks import specs
from attacks.encoders import Encoder, EncoderSpec, build_encoder, freeze
from attacks.progress import ProgressFn, checkpoint, scaled

__all__ = ["SimCLRConfig", "pretrain_simclr", "augment", "nt_xent", "encode", "linear_probe_accuracy"]


@dataclass(frozen=True)
class SimCLRConfig:
    """SimCLR hyper-parameters (ValueError on bad values; bounds from :class:`attacks.specs.SimCLRConfig`).

    epochs: passes over the data (>= 1). batch_size: images per step (>= 2; each
    gives two views). lr: Adam learning rate (> 0), cosine-decayed to 0.
    temperature: NT-Xent temperature (> 0). proj_dim: projection output (>= 1).
    crop_scale: area fraction range of the random crop, 0 < lo <= hi <= 1.
    flip: random horizontal flips. jitter: brightness/contrast strength in [0, 1).
    noise_std: largest per-image gaussian noise std (>= 0). seed: RNG seed.
    device: "auto" (cuda if available), "cpu", "cuda" or "cuda:N".
    """

    epochs: int = 3
    batch_size: int = 256
    lr: float = 1e-3
    temperature: float = 0.5
    proj_dim: int = 64
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip: bool = False
    jitter: float = 0.4
    noise_std: float = 0.1
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"SimCLRConfig: {msg}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        check(is_int(self.epochs) and self.epochs >= 1, f"epochs must be an int >= 1, got {self.epochs!r}")
        bs = self.batch_size
        check(is_int(bs) and bs >= 2, f"batch_size must be an int >= 2, got {bs!r}")
        check(is_real(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        check(is_real(self.temperature) and self.temperature > 0, f"temperature must be > 0, got {self.temperature!r}")
        check(is_int(self.proj_dim) and self.proj_dim >= 1, f"proj_dim must be an int >= 1, got {self.proj_dim!r}")
        lo_hi = tuple(self.crop_scale)
        check(
            len(lo_hi) == 2 and all(is_real(v) for v in lo_hi) and 0 < lo_hi[0] <= lo_hi[1] <= 1,
            f"crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {self.crop_scale!r}",
        )
        object.__setattr__(self, "crop_scale", (float(lo_hi[0]), float(lo_hi[1])))
        check(isinstance(self.flip, bool), f"flip must be a bool, got {self.flip!r}")
        check(is_real(self.jitter) and 0 <= self.jitter < 1, f"jitter must be in [0, 1), got {self.jitter!r}")
        check(
            is_real(self.noise_std) and 0 <= self.noise_std <= 1, f"noise_std must be in [0, 1], got {self.noise_std!r}"
        )
        check(is_int(self.seed), f"seed must be an int, got {self.seed!r}")
        device_ok = isinstance(self.device, str) and (
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:") and self.device[5:].isdigit()
        )
        check(device_ok, f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        # The bounds (epochs <= 1000, batch_size <= 8192, ...) are the torch-free model's, shared with the API.
        try:
            specs.SimCLRConfig.model_validate({f.name: getattr(self, f.name) for f in fields(self)})
        except ValidationError as exc:
            raise ValueError(f"SimCLRConfig: {specs.error_text(exc)}") from None


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def augment(x: Tensor, config: SimCLRConfig, generator: torch.Generator) -> Tensor:
    """One random view of every image of ``x`` (N, C, H, W) in [0, 1]; returns the same shape."""
    n, dev = x.shape[0], x.device

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator, device=dev)

    lo, hi = config.crop_scale
    area = lo + (hi - lo) * rand(n)
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * rand(n)
    ratio = torch.exp(log_ratio)
    sx = torch.sqrt(area * ratio).clamp(max=1.0)
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    tx = (1 - sx) * (2 * rand(n) - 1)
    ty = (1 - sy) * (2 * rand(n) - 1)
    flip = rand(n)
    if config.flip:
        sx = torch.where(flip < 0.5, -sx, sx)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    apply = (rand(n) < 0.8).to(x.dtype).view(n, 1, 1, 1)
    j = config.jitter
    brightness = (1 + j * (2 * rand(n) - 1)).view(n, 1, 1, 1)
    contrast = (1 + j * (2 * rand(n) - 1)).view(n, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    jittered = ((out - mean) * contrast + mean) * brightness
    out = apply * jittered + (1 - apply) * out

    sigma = (config.noise_std * rand(n)).view(n, 1, 1, 1)
    noise = torch.randn(out.shape, generator=generator, device=dev, dtype=out.dtype)
    return (out + sigma * noise).clamp_(0.0, 1.0)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """NT-Xent loss of paired projections z1, z2 (B, p): mean over the 2B anchors."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    b = z1.shape[0]
    sim = (z @ z.T) / temperature
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, targets)


def _projection_head(d: int, p: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(inplace=True), nn.Linear(d, p))


def pretrain_simclr(
    spec: EncoderSpec, x: Tensor, config: SimCLRConfig, progress: ProgressFn | None = None
) -> Encoder:
    """Pre-train a fresh encoder of ``spec`` on images ``x`` (N, C, H, W) in [0, 1] with SimCLR.

    Adam at ``config.lr`` with a cosine decay over all steps; batches of
    ``batch_size`` images from a seeded shuffle each epoch (the remainder is
    dropped unless the data is smaller than one batch). bf16 autocast on CUDA
    only. Calls ``progress("pretrain", fraction)`` between steps; a
    :class:`attacks.progress.Cancelled` it raises propagates. Returns the
    encoder frozen, on the CPU. ``x`` is not modified.
    """
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float (N, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"SimCLR needs at least 2 images, got {n}")
    device = _resolve_device(config.device)
    report = scaled(progress, "pretrain")
    report(0.0)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        encoder = build_encoder(spec)
        head = _projection_head(encoder.feature_dim, config.proj_dim)
    encoder.to(device).train()
    head.to(device).train()
    data = x.detach().to(device=device, dtype=torch.float32)
    generator = torch.Generator(device=device).manual_seed(config.seed)

    batch = min(config.batch_size, n)
    steps_per_epoch = n // batch
    total = steps_per_epoch * config.epochs
    params = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    use_amp = device.type == "cuda"

    step = 0
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=generator, device=device)
        for i in range(steps_per_epoch):
            checkpoint()
            xb = data[order[i * batch : (i + 1) * batch]]
            views = torch.cat([augment(xb, config, generator), augment(xb, config, generator)])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                z = head(encoder(views))
            loss = nt_xent(z[: len(xb)], z[len(xb) :], config.temperature)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"SimCLR loss is {loss.item()} at step {step}; lower lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            report(step / total)
    return freeze(encoder.cpu())


@torch.no_grad()
def encode(encoder: Encoder, x: Tensor, *, device: str | torch.device = "cpu", batch_size: int = 512) -> Tensor:
    """Features (N, d) float32 on the CPU, in eval mode; the encoder's mode is restored after."""
    was_training = encoder.training
    encoder.eval()
    try:
        out = [encoder(x[i : i + batch_size].to(device)).cpu() for i in range(0, x.shape[0], batch_size)]
    finally:
        encoder.train(was_training)
    return torch.cat(out) if out else torch.empty(0, encoder.feature_dim)


def linear_probe_accuracy(
    encoder: Encoder,
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    *,
    device: str | torch.device = "cpu",
    l2: float = 1e-3,
    max_iter: int = 200,
) -> float:
    """Test accuracy of a multinomial logistic regression on standardised frozen features.

    Features from :func:`encode` on ``device``; standardised with the training
    mean and std; full-batch L-BFGS (strong Wolfe) on mean cross-entropy plus
    ``l2/2 ||W||^2`` from zero weights, so the result is deterministic.
    """
    z_train = encode(encoder, x_train, device=device).to(device)
    z_test = encode(encoder, x_test, device=device).to(device)
    mu, sd = z_train.mean(0), z_train.std(0).clamp_min(1e-6)
    z_train, z_test = (z_train - mu) / sd, (z_test - mu) / sd
    y_train, y_test = y_train.long().to(device), y_test.long().to(device)
    k = int(max(y_train.max().item(), y_test.max().item())) + 1
    w = torch.zeros(k, z_train.shape[1], device=device, requires_grad=True)
    b = torch.zeros(k, device=device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z_train @ w.T + b, y_train) + 0.5 * l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return (z_test @ w.T + b).argmax(1).eq(y_test).float().mean().item()
