"""Feature-extraction throughput against the encoder's bare forward.

The bare forward is the encoder applied to batches already on the device,
under inference mode, nothing else: the physical limit of extraction.
``extract_features`` adds the host-side slicing, the transfer, the copy into
the (N, d) output and the finiteness check. Both are timed alternately at the
same batch size; ratio = extraction images/s over bare forward images/s.
On CUDA the bf16-autocast path is timed too, with its features' relative
error against fp32.
"""

from __future__ import annotations

import torch

from attacks.encoders import EncoderSpec, build_encoder, freeze, place
from attacks.features import extract_features
from bench.common import device_name, table, timeit_alternating, write

CONFIGS = [
    ("small_cnn", EncoderSpec(arch="small_cnn", in_channels=1), (1, 28, 28), 512, 8192),
    ("resnet18", EncoderSpec(arch="resnet18", in_channels=3), (3, 32, 32), 512, 4096),
]
# paper scale, GPU only (an ImageNet-size ResNet-50 forward is ~1 s per 100 images on the 2-core CPU)
CUDA_CONFIGS = [
    ("resnet50", EncoderSpec(arch="resnet50", in_channels=3), (3, 224, 224), 256, 4096),
]


def run(device: str = "cpu", quick: bool = False, repeat: int = 5) -> list[dict]:
    dev = torch.device(device)
    configs = CONFIGS[:1] if quick else CONFIGS + (CUDA_CONFIGS if dev.type == "cuda" else [])
    amps = [False, True] if dev.type == "cuda" else [False]
    rows = []
    for name, spec, shape, bs, n in configs:
        n = n // 4 if quick else n
        torch.manual_seed(0)
        encoder = place(freeze(build_encoder(spec)), dev)
        x = torch.rand(n, *shape, generator=torch.Generator().manual_seed(0))
        if dev.type == "cuda":
            x = x.pin_memory()
        batches = [x[i : i + bs].to(dev) for i in range(0, n, bs)]  # the bare side's data is already there
        z32 = extract_features(encoder, x, batch_size=bs, device=dev)
        for amp in amps:
            def bare():
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    for xb in batches:
                        encoder(xb)

            def extract():
                return extract_features(encoder, x, batch_size=bs, device=dev, amp=amp)

            tb, te = timeit_alternating([bare, extract], repeat=repeat, device=dev)
            rel = ((extract() - z32).norm() / z32.norm()).item()
            rows.append(dict(encoder=name, image="x".join(map(str, shape)), n=n, batch=bs, amp=amp,
                             bare_forward_img_per_s=n / tb, extraction_img_per_s=n / te, ratio=tb / te,
                             feature_rel_err_vs_fp32=rel, target=0.9, met=tb / te >= 0.9))
    write("extraction", rows, {"device": device_name(dev), "repeat": repeat, "statistic": "median"})
    print(table(rows, ["encoder", "image", "n", "batch", "amp", "bare_forward_img_per_s", "extraction_img_per_s",
                       "ratio", "feature_rel_err_vs_fp32", "met"]))
    return rows
