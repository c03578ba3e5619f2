"""Decoder inversion: the feature-targeted attack with a learned inverse of the encoder.

Paper: Lu, Yang, Kamath, Yu (SaTML 2024), Section 4.2.1 and Figure 4: a U-Net
decoder over the frozen encoder f (skip connections from f's intermediate maps),
trained to reconstruct the clean images with MS-SSIM + L1 (Zhao, Gallo, Frosio,
Kautz 2017, "Loss functions for image restoration with neural networks"); the
poisons are the decoder's images of the GC poisoned features zeta, with no
optimisation of nu. The paper saw ||f(nu) - zeta||^2 stay large (~150).

Parameters (:class:`attacks.catalogue.DecoderInversionParams`, plus GC's and GradPC's):
    decoder_epochs (30, >= 1): epochs of decoder training on the clean training set.
    decoder_lr (1e-3): Adam learning rate. decoder_batch_size (128): mini-batch size.
    decoder_loss ("auto" | "ms_ssim_l1" | "ssim_l1"): ssim_weight * (1 - S) + (1 - ssim_weight) * L1,
        S = MS-SSIM (five scales, 11-px gaussian window, sigma 1.5) or single-scale SSIM.
        "auto" takes MS-SSIM when five scales fit the image (side >= 176 px with the
        11-px window and 2x average-pool downsampling), else SSIM [D]. SSIM uses a
        gaussian window fitted to the image: the largest odd size <= 11 and
        <= side // 2 + 1, with sigma = 1.5 * size / 11 (8x8 digits: 5 px, sigma 0.68) [D].
        "ms_ssim_l1" on an image too small for five scales uses as many scales as fit
        (the first weights of the five, renormalised) [D].
    ssim_weight (0.84): alpha above (Zhao et al.).
    decoder_width (64, >= 4): channels of the deepest up-block; each shallower
        block halves it, down to min(decoder_width, 8).
    skip_swap (0.5, in [0, 1]): the fraction of each training batch decoded from its own bottleneck
        with the skip maps of another image of the batch [D]. Trained on reconstruction alone
        (0), the decoder rebuilds the base image from its skips and ignores the bottleneck,
        so the poisons are their bases and do no harm; with the swap it must take content from
        the bottleneck, where zeta is injected.
    batch_size (256): poisons decoded per batch.

Decoder [D]. The encoder's intermediate maps come from ``Encoder.forward_with_skips``,
shallow to deep; the deepest one is the bottleneck, whose global average pool is
f(x). One up-block per remaining map, deep to shallow: bilinear upsampling to the
skip's size, concatenation with the skip, two conv3x3-BN-ReLU. Then a conv3x3-ReLU,
a bilinear resize to the dataset's own (H, W) (antialiased when shrinking) -- the
encoder may resize internally, e.g. 8x8 digits into a 28x28 input -- and a conv3x3
to the dataset's C channels, mapped into the clean data range [lo, hi] (min and
max of the training pixels) by lo + (hi - lo) * sigmoid, its bias initialised at the
mean clean pixel. The architecture is read off one probing forward pass, so it fits
small_cnn and the resnets alike (vit_b_16 has no skip maps: EncoderError).

Injection of zeta [D]: zeta (n, d) is pooled while the bottleneck is a map (n, d, h, w).
The decoder sees map - mean_hw(map) + zeta: the map's spatial pattern from the base
image mu', shifted per channel so that its global average pool is exactly zeta (up
to float rounding). For the clean feature (zeta = f(x)) this is the identity, so the
decoder is trained on the true maps. The shallower skips are f's maps of mu'.

Caching: a trained decoder depends only on (encoder fingerprint, dataset content hash,
decoder hyper-parameters, seed, precision); it is kept in memory per process (the
last few) and, when the job has a cache directory (``AttackContext.cache_dir``),
on disk as ``decoders/<key>.safetensors``. A second job with the same key reuses it.

Shapes: base images mu' (n, C, H, W) -- the clean points that initialised zeta in
GC, labels kept (clean-label) -- zeta (n, d); poisons nu (n, C, H, W) float32 in
[lo, hi]. Extra results: the decoder's SSIM and L1 on held-out clean test images,
its training seconds and whether it came from the cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.catalogue import DecoderInversionParams
from attacks.features import autocast_for
from attacks.gc_feature import poisoned_features
from attacks.progress import ProgressFn, checkpoint

__all__ = [
    "MS_SSIM_WEIGHTS",
    "UNetDecoder",
    "build_decoder",
    "decode",
    "fitted_window",
    "inject",
    "ms_ssim",
    "ms_ssim_scales",
    "run",
    "ssim",
    "trained_decoder",
]

# Bump when the architecture or the training recipe changes: cached decoders are then retrained.
DECODER_VERSION = 3
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang, Simoncelli, Bovik 2003
_EVAL_IMAGES = 1000  # held-out test images used to report the reconstruction quality

# --------------------------------------------------------------------------- SSIM / MS-SSIM


def fitted_window(height: int, width: int, max_size: int = 11) -> tuple[int, float]:
    """Gaussian window for single-scale SSIM on an image: (size, sigma).

    The largest odd size <= max_size and <= min(height, width) // 2 + 1 (so that the
    valid SSIM map keeps about half the image), sigma = 1.5 * size / 11.
    """
    side = min(height, width)
    size = min(max_size, side // 2 + 1)
    if size % 2 == 0:
        size -= 1
    size = max(size, 1)
    return size, 1.5 * size / 11


def _gaussian(size: int, sigma: float, like: Tensor) -> Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return (g / g.sum()).to(like.device, like.dtype)


def _blur(x: Tensor, g: Tensor) -> Tensor:
    """Depthwise separable gaussian filter, 'valid' (no padding)."""
    c, k = x.shape[1], g.numel()
    x = F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def _ssim_maps(x: Tensor, y: Tensor, data_range: float, size: int, sigma: float) -> tuple[Tensor, Tensor]:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"SSIM needs two (N, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < size:
        raise ValueError(f"SSIM window {size} is larger than the image {tuple(x.shape[-2:])}")
    g = _gaussian(size, sigma, x)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = _blur(x, g), _blur(y, g)
    sxx = _blur(x * x, g) - mx * mx
    syy = _blur(y * y, g) - my * my
    sxy = _blur(x * y, g) - mx * my
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    lum = (2 * mx * my + c1) / (mx * mx + my * my + c1)
    return lum * cs, cs


def ssim(x: Tensor, y: Tensor, *, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-image SSIM (Wang et al. 2004), (N,): gaussian window, C1 = (0.01 L)^2,
    C2 = (0.03 L)^2, L = data_range, mean of the valid SSIM map over C, H, W."""
    s, _ = _ssim_maps(x, y, data_range, win_size, sigma)
    return s.mean(dim=(1, 2, 3))


def ms_ssim_scales(height: int, width: int, win_size: int = 11, max_scales: int = 5) -> int:
    """How many MS-SSIM scales (2x average-pool each) keep the image at least win_size wide."""
    side, n = min(height, width), 0
    while n < max_scales and side >= win_size:
        n += 1
        side //= 2
    return n


def ms_ssim(
    x: Tensor,
    y: Tensor,
    *,
    data_range: float = 1.0,
    win_size: int = 11,
    sigma: float = 1.5,
    weights: tuple[float, ...] = MS_SSIM_WEIGHTS,
) -> Tensor:
    """Per-image MS-SSIM (Wang, Simoncelli, Bovik 2003), (N,).

    prod_j cs_j^w_j over the first scales times the SSIM of the coarsest, each the mean
    of its map over C, H, W, with 2x2 average pooling between scales. Terms are clamped
    to >= 1e-6 before the fractional powers (a negative contrast-structure term has no
    real power). Fewer weights than five means fewer scales; they are renormalised.
    """
    levels = len(weights)
    if ms_ssim_scales(*x.shape[-2:], win_size=win_size, max_scales=levels) < levels:
        raise ValueError(f"an image of {tuple(x.shape[-2:])} is too small for {levels} MS-SSIM scales "
                         f"with a {win_size}-px window")
    w = torch.tensor(weights, dtype=x.dtype, device=x.device)
    w = w / w.sum()
    terms = []
    for j in range(levels):
        s, cs = _ssim_maps(x, y, data_range, win_size, sigma)
        if j < levels - 1:
            terms.append(cs.mean(dim=(1, 2, 3)))
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        else:
            terms.append(s.mean(dim=(1, 2, 3)))
    t = torch.stack(terms, dim=1).clamp_min(1e-6)
    return torch.prod(t ** w, dim=1)


class _Similarity:
    """The S of the reconstruction loss, chosen once per image size."""

    def __init__(self, kind: str, height: int, width: int, data_range: float):
        self.data_range = data_range
        scales = ms_ssim_scales(height, width, 11)
        if kind == "auto":
            kind = "ms_ssim_l1" if scales >= 5 else "ssim_l1"
        if kind == "ms_ssim_l1" and scales >= 2:
            self.kind, self.size, self.sigma = "ms_ssim", 11, 1.5
            self.weights = MS_SSIM_WEIGHTS[: min(scales, 5)]
            self.describe = f"ms_ssim_l1 ({len(self.weights)} scales, window 11, sigma 1.5)"
        else:  # ssim_l1, or an image too small for two MS-SSIM scales
            self.kind = "ssim"
            self.size, self.sigma = fitted_window(height, width)
            self.describe = f"ssim_l1 (window {self.size}, sigma {self.sigma:.3g})"

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        if self.kind == "ms_ssim":
            return ms_ssim(x, y, data_range=self.data_range, win_size=self.size, sigma=self.sigma, weights=self.weights)
        return ssim(x, y, data_range=self.data_range, win_size=self.size, sigma=self.sigma)


# --------------------------------------------------------------------------- the decoder


def inject(bottleneck: Tensor, zeta: Tensor) -> Tensor:
    """The bottleneck map (n, d, h, w) shifted per channel so that its global average pool is zeta (n, d).

    map - mean_hw(map) + zeta: the identity when zeta = f(x), the map's own pool."""
    if zeta.shape != bottleneck.shape[:2]:
        raise ValueError(f"zeta {tuple(zeta.shape)} does not fit the bottleneck {tuple(bottleneck.shape)}")
    zeta = zeta.to(bottleneck.dtype)
    return bottleneck - bottleneck.mean(dim=(2, 3), keepdim=True) + zeta[:, :, None, None]


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class _UpBlock(nn.Module):
    def __init__(self, c_in: int, c_skip: int, c_out: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn_relu(c_in + c_skip, c_out), _conv_bn_relu(c_out, c_out))

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.body(torch.cat([x, skip.to(x.dtype)], dim=1))


class UNetDecoder(nn.Module):
    """Bottleneck (n, d, h, w) + skips (shallow to deep, without the bottleneck) -> images (n, C, H, W) in [lo, hi]."""

    def __init__(
        self,
        bottleneck_channels: int,
        skip_channels: list[int],
        out_shape: tuple[int, int, int],
        width: int,
        lo: float,
        hi: float,
        mean: float | None = None,
    ):
        super().__init__()
        if not hi > lo:
            raise ValueError(f"the clean data range is empty: [{lo}, {hi}]")
        self.out_shape = tuple(int(v) for v in out_shape)
        floor = min(width, 8)
        blocks, c = [], bottleneck_channels
        for i, c_skip in enumerate(reversed(skip_channels)):  # deep to shallow
            c_out = max(width >> i, floor)
            blocks.append(_UpBlock(c, c_skip, c_out))
            c = c_out
        self.blocks = nn.ModuleList(blocks)
        self.pre = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True))
        self.out = nn.Conv2d(c, self.out_shape[0], 3, padding=1)
        if mean is not None:  # start from the mean image level rather than mid-range: faster early training
            level = min(max((float(mean) - lo) / (hi - lo), 0.01), 0.99)
            nn.init.constant_(self.out.bias, math.log(level / (1 - level)))
        self.register_buffer("lo", torch.tensor(float(lo)))
        self.register_buffer("hi", torch.tensor(float(hi)))

    def forward(self, bottleneck: Tensor, skips: list[Tensor]) -> Tensor:
        if len(skips) != len(self.blocks):
            raise ValueError(f"decoder takes {len(self.blocks)} skip maps, got {len(skips)}")
        x = bottleneck
        for block, skip in zip(self.blocks, reversed(skips)):
            x = block(x, skip)
        x = self.pre(x)
        h, w = self.out_shape[1:]
        if tuple(x.shape[-2:]) != (h, w):
            shrink = x.shape[-2] > h or x.shape[-1] > w
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)
        logits = self.out(x).float()
        return (self.lo + (self.hi - self.lo) * torch.sigmoid(logits)).clamp(self.lo, self.hi)


def _skips(encoder, x: Tensor, amp: bool) -> tuple[Tensor, list[Tensor]]:
    with torch.no_grad(), autocast_for(x.device, amp):
        _, maps = encoder.forward_with_skips(x)
    return maps[-1], maps[:-1]


def build_decoder(
    encoder, sample: Tensor, width: int, lo: float, hi: float, seed: int, mean: float | None = None
) -> UNetDecoder:
    """A decoder fitted to the encoder's maps, probed with one forward pass on ``sample`` (1+, C, H, W).

    Initialised from ``seed`` without touching the global RNG (output bias at ``mean``, the
    mean clean pixel, when given); returned on the CPU."""
    with torch.no_grad():
        _, maps = encoder.forward_with_skips(sample[:1].to(next(encoder.parameters()).device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNetDecoder(
            maps[-1].shape[1], [m.shape[1] for m in maps[:-1]], tuple(sample.shape[1:]), width, lo, hi, mean
        )


def decode(
    encoder,
    decoder: UNetDecoder,
    base: Tensor,
    zeta: Tensor | None = None,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    amp: bool = False,
) -> Tensor:
    """decoder(inject(bottleneck(base), zeta), skips(base)) batch by batch; zeta None reconstructs base.

    base (n, C, H, W), zeta (n, d); returns (n, C, H, W) float32 on the CPU. Inputs are not modified."""
    device = torch.device(device)
    was_training = decoder.training
    decoder.eval()
    out = torch.empty(base.shape, dtype=torch.float32)
    try:
        with torch.no_grad():
            for i in range(0, base.shape[0], batch_size):
                checkpoint()
                xb = base[i : i + batch_size].to(device, torch.float32)
                bott, skips = _skips(encoder, xb, amp)
                if zeta is not None:
                    bott = inject(bott.float(), zeta[i : i + batch_size].to(device))
                with autocast_for(device, amp):
                    out[i : i + batch_size] = decoder(bott, skips).float().cpu()
    finally:
        decoder.train(was_training)
    return out


def _train(encoder, decoder: UNetDecoder, x: Tensor, params: DecoderInversionParams, similarity: _Similarity,
           *, seed: int, device: torch.device, amp: bool, progress) -> float:
    """Adam on alpha * (1 - S) + (1 - alpha) * L1 over the clean set; returns the last epoch's mean loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(decoder.parameters(), lr=params.decoder_lr)
    alpha, n, bs = params.ssim_weight, x.shape[0], params.decoder_batch_size
    steps_per_epoch = max(1, math.ceil(n / bs))
    total, done, last = params.decoder_epochs * steps_per_epoch, 0, float("nan")
    decoder.train()
    for _epoch in range(params.decoder_epochs):
        perm = torch.randperm(n, generator=gen)
        running, batches = 0.0, 0
        for i in range(0, n, bs):
            checkpoint()
            idx = perm[i : i + bs]
            done += 1
            if idx.numel() < 2 and n > 1:  # BatchNorm needs two samples; the leftover image waits an epoch
                continue
            xb = x[idx].to(device, torch.float32)
            bott, skips = _skips(encoder, xb, amp)
            if params.skip_swap > 0:
                # a fraction of the batch gets its neighbour's skips: content must come from the bottleneck
                swap = (torch.rand(xb.shape[0], generator=gen) < params.skip_swap).to(device)
                other = torch.roll(torch.arange(xb.shape[0], device=device), 1)
                skips = [torch.where(swap.view(-1, *([1] * (s.dim() - 1))), s[other], s) for s in skips]
            with autocast_for(device, amp):
                rec = decoder(bott, skips)
            rec = rec.float()
            loss = alpha * (1 - similarity(rec, xb).mean()) + (1 - alpha) * (rec - xb).abs().mean()
            if not torch.isfinite(loss):
                from attacks.errors import AttackDiverged

                raise AttackDiverged(f"decoder training diverged (loss {loss.item()}); lower decoder_lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item()
            batches += 1
            if progress:
                progress(done / total)
        last = running / max(batches, 1)
    decoder.eval()
    return last


# --------------------------------------------------------------------------- the cache

_MEMORY: OrderedDict[str, tuple[dict[str, Tensor], dict]] = OrderedDict()
_MEMORY_SLOTS = 4
_LOCK = threading.Lock()


def _cache_key(fingerprint: str, dataset_hash: str, params: DecoderInversionParams, seed: int, precision: str) -> str:
    spec = {
        "version": DECODER_VERSION,
        "encoder": fingerprint,
        "dataset": dataset_hash,
        "epochs": params.decoder_epochs,
        "lr": params.decoder_lr,
        "batch_size": params.decoder_batch_size,
        "loss": params.decoder_loss,
        "ssim_weight": params.ssim_weight,
        "width": params.decoder_width,
        "skip_swap": params.skip_swap,
        "seed": seed,
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _disk_path(cache_dir, key: str) -> Path | None:
    return Path(cache_dir) / "decoders" / f"{key}.safetensors" if cache_dir else None


def _load(key: str, cache_dir) -> tuple[dict[str, Tensor], dict] | None:
    from safetensors.torch import load_file, safe_open

    with _LOCK:
        if key in _MEMORY:
            _MEMORY.move_to_end(key)
            return _MEMORY[key]
    path = _disk_path(cache_dir, key)
    if path is None or not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads(fh.metadata()["meta"])
        state = load_file(str(path))
    except Exception:  # a corrupt cache entry is retrained, never trusted
        path.unlink(missing_ok=True)
        return None
    _remember(key, state, meta)
    return state, meta


def _remember(key: str, state: dict[str, Tensor], meta: dict) -> None:
    with _LOCK:
        _MEMORY[key] = (state, meta)
        _MEMORY.move_to_end(key)
        while len(_MEMORY) > _MEMORY_SLOTS:
            _MEMORY.popitem(last=False)


def _store(key: str, state: dict[str, Tensor], meta: dict, cache_dir) -> None:
    from safetensors.torch import save_file

    _remember(key, state, meta)
    path = _disk_path(cache_dir, key)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"meta": json.dumps(meta)})
        os.replace(tmp, path)  # atomic: concurrent workers never read half a file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def clear_memory_cache() -> None:
    """Forget the decoders kept in this process (tests; memory pressure)."""
    with _LOCK:
        _MEMORY.clear()


def trained_decoder(
    encoder,
    dataset,
    params: DecoderInversionParams,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    amp: bool = False,
    fingerprint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress=None,
) -> tuple[UNetDecoder, dict]:
    """The decoder for (encoder, dataset, params, seed): from the cache, or trained and cached.

    Returns the decoder (eval mode, on ``device``) and a report: its SSIM/L1 on held-out
    test images, training seconds, the loss used, and whether it came from the cache."""
    device = torch.device(device)
    x = dataset.x_train
    lo, hi = float(x.min()), float(x.max())
    precision = ("bf16" if (amp and device.type == "cuda") else "fp32") + ("" if device.type == "cpu" else f"-{device.type}")
    key = _cache_key(fingerprint or encoder.fingerprint(), dataset.content_hash, params, seed, precision)
    decoder = build_decoder(encoder, x[:1], params.decoder_width, lo, hi, seed, mean=float(x.mean()))
    cached = _load(key, cache_dir)
    if cached is not None:
        state, meta = cached
        try:
            decoder.load_state_dict(state, strict=True)
        except RuntimeError:  # the architecture changed without a version bump: retrain
            cached = None
    if cached is not None:
        if progress:
            progress(1.0)
        return decoder.to(device).eval(), dict(meta, decoder_from_cache=True, decoder_cache_key=key)

    similarity = _Similarity(params.decoder_loss, x.shape[-2], x.shape[-1], hi - lo)
    decoder = decoder.to(device)
    t0 = time.perf_counter()
    final_loss = _train(encoder, decoder, x, params, similarity, seed=seed, device=device, amp=amp, progress=progress)
    seconds = time.perf_counter() - t0
    meta = {
        "decoder_train_seconds": seconds,
        "decoder_final_train_loss": final_loss,
        "decoder_loss_used": similarity.describe,
        **reconstruction_quality(encoder, decoder, dataset.x_test[:_EVAL_IMAGES], lo, hi,
                                 batch_size=params.batch_size, device=device, amp=amp),
    }
    state = {k: v.detach().cpu().contiguous().clone() for k, v in decoder.state_dict().items()}
    _store(key, state, meta, cache_dir)
    return decoder.eval(), dict(meta, decoder_from_cache=False, decoder_cache_key=key)


def reconstruction_quality(encoder, decoder, x: Tensor, lo: float, hi: float, *, batch_size: int = 256,
                           device: torch.device | str = "cpu", amp: bool = False) -> dict:
    """SSIM (fitted window), MS-SSIM (when five scales fit) and L1 of decoder(f(x)) against x."""
    rec = decode(encoder, decoder, x, batch_size=batch_size, device=device, amp=amp)
    x = x.float()
    size, sigma = fitted_window(*x.shape[-2:])
    out = {
        "decoder_test_images": int(x.shape[0]),
        "decoder_test_ssim": ssim(rec, x, data_range=hi - lo, win_size=size, sigma=sigma).mean().item(),
        "decoder_test_l1": (rec - x).abs().mean().item(),
    }
    if ms_ssim_scales(*x.shape[-2:]) >= 5:
        out["decoder_test_ms_ssim"] = ms_ssim(rec, x, data_range=hi - lo).mean().item()
    return out


# --------------------------------------------------------------------------- the attack


def run(ctx, params: DecoderInversionParams, *, epsilon: float, beta: float | None, seed: int,
        progress: ProgressFn | None = None):
    """Entry point: poisons nu = decoder(zeta injected at the bottleneck, skips of mu')."""
    from attacks.pipeline import AttackOutput

    report = progress or (lambda s, f: None)
    target, _G, zeta, labels, idx, info = poisoned_features(ctx, params, epsilon, seed, progress)
    decoder, dec_info = trained_decoder(
        ctx.encoder, ctx.dataset, params, seed=seed, device=ctx.device, amp=ctx.amp,
        fingerprint=ctx.encoder_fingerprint or None, cache_dir=getattr(ctx, "cache_dir", None),
        progress=lambda f: report("decoder_training", f),
    )
    base = ctx.dataset.x_train[idx]
    nu = decode(ctx.encoder, decoder, base, zeta, batch_size=params.batch_size, device=ctx.device, amp=ctx.amp)
    report("decoder_inversion", 1.0)
    info.update(dec_info)
    info["injection"] = "mean_shift"
    # How far zeta lies from the base images' own features: ||f(nu) - zeta||^2 (the pipeline's
    # feature_match_error) is to be read against it.
    info["base_feature_error_mean"] = ((ctx.Z_train[idx] - zeta) ** 2).sum(1).mean().item()
    return AttackOutput(target=target, poisons=nu, poison_labels=labels, base_index=idx, zeta=zeta, extra=info)
