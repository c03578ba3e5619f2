"""Feature-matching throughput against the encoder's own forward+backward.

Every step of feature matching (Algorithm 1, lines 9-11) is one forward of the
frozen encoder on the poison batch and one vector-Jacobian product back to the
pixels; the rest (the error, the gradient step, the proximal step) is
elementwise on the batch. So the encoder's forward+backward throughput at the
same batch size, on the same device, with the same frozen weights, is the
physical limit of the attack. Both sides are timed alternately in one run,
and the ratio is (images x steps per second of match_features) over (images
per second of encoder forward + input VJP).
"""

from __future__ import annotations

import torch

from attacks.encoders import EncoderSpec, build_encoder, freeze, place
from attacks.feature_matching import match_features
from bench.common import device_name, table, timeit_alternating, write

# (name, spec, image shape, batch size)
CONFIGS = [
    ("small_cnn", EncoderSpec(arch="small_cnn", in_channels=1), (1, 28, 28), 256),
    ("resnet18", EncoderSpec(arch="resnet18", in_channels=3), (3, 32, 32), 128),
]
# paper scale, GPU only
CUDA_CONFIGS = [
    ("resnet50", EncoderSpec(arch="resnet50", in_channels=3), (3, 224, 224), 64),
]


def encoder_fwd_bwd(encoder, x: torch.Tensor, v: torch.Tensor, steps: int) -> None:
    """The limit: `steps` times f(x) and J_f(x)^T v, nothing else."""
    for _ in range(steps):
        xi = x.detach().requires_grad_(True)
        f = encoder(xi)
        torch.autograd.grad(f, xi, grad_outputs=v)


def run(device: str = "cpu", quick: bool = False, repeat: int = 5) -> list[dict]:
    dev = torch.device(device)
    configs = CONFIGS[:1] if quick else CONFIGS + (CUDA_CONFIGS if dev.type == "cuda" else [])
    amps = [False, True] if dev.type == "cuda" else [False]
    steps = 5 if quick else 10
    rows = []
    for name, spec, shape, bs in configs:
        torch.manual_seed(0)
        encoder = place(freeze(build_encoder(spec)), dev)
        g = torch.Generator().manual_seed(0)
        base = torch.rand(bs, *shape, generator=g)
        with torch.no_grad():
            zeta = encoder(base.to(dev)).cpu() + 0.1 * torch.randn(bs, encoder.feature_dim, generator=g)
        x_dev, v = base.to(dev), torch.randn(bs, encoder.feature_dim, generator=g).to(dev)
        for amp in amps:
            def limit():
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    encoder_fwd_bwd(encoder, x_dev, v, steps)

            def attack():
                match_features(encoder, base, zeta, beta=0.25, steps=steps, lr=0.1, batch_size=bs, device=dev, amp=amp)

            # warm-up inside (allocator, cudnn / oneDNN primitives), then alternating repeats
            tl, ta = timeit_alternating([limit, attack], repeat=repeat, device=dev)
            rows.append(dict(encoder=name, image=("x".join(map(str, shape))), batch=bs, steps=steps, amp=amp,
                             encoder_fwd_bwd_img_per_s=bs * steps / tl, fm_img_steps_per_s=bs * steps / ta,
                             ratio=tl / ta, target=0.8, met=tl / ta >= 0.8))
    write("fm_throughput", rows, {"device": device_name(dev), "repeat": repeat, "statistic": "median"})
    print(table(rows, ["encoder", "image", "batch", "amp", "encoder_fwd_bwd_img_per_s", "fm_img_steps_per_s", "ratio", "met"]))
    return rows
