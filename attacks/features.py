"""Feature extraction and the feature cache.

f(train) and f(test) are computed once per (encoder fingerprint, dataset
content hash, split) -- the encoder fingerprint covers its weights and its
preprocessing spec -- and reused by every stage and every evaluation. The
extraction is batched and chunked: peak memory is bounded by the batch size,
not by the dataset size (the output features are the only O(N) allocation).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from attacks.progress import checkpoint


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu. 'cuda' without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available; valid: auto, cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; valid: auto, cpu, cuda")
    return torch.device(device)


def autocast_for(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when enabled; a no-op context elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _device_batches(x: torch.Tensor, batch_size: int, device: torch.device):
    """Yields (start, batch on device). On CUDA the next batch is staged through pinned
    memory and copied on a side stream while the current one computes (one batch ahead,
    so host memory stays bounded by the batch size); elsewhere the batches are views."""
    n = x.shape[0]
    if device.type != "cuda":
        for i in range(0, n, batch_size):
            checkpoint()
            yield i, x[i : i + batch_size].to(device)
        return
    copy_stream = torch.cuda.Stream(device)
    compute = torch.cuda.current_stream(device)

    def stage(i: int) -> torch.Tensor:
        xb = x[i : i + batch_size]
        if xb.device.type == "cpu" and not xb.is_pinned():
            xb = xb.pin_memory()
        with torch.cuda.stream(copy_stream):
            return xb.to(device, non_blocking=True)

    nxt = stage(0)
    for i in range(0, n, batch_size):
        checkpoint()
        compute.wait_stream(copy_stream)
        cur = nxt
        cur.record_stream(compute)  # its memory is not reused before the compute stream is done with it
        if i + batch_size < n:
            nxt = stage(i + batch_size)
        yield i, cur


def default_batch_size(device: torch.device) -> int:
    """Images per encoder pass when the caller does not say: 512 on a GPU; 128 on the CPU, where
    a batch's activations then stay in cache (small_cnn on mnist5k, 2 cores: ~4,000 images/s at
    64-128 against ~2,000 at 512; bench/README.md, evaluation)."""
    return 512 if device.type == "cuda" else 128


def extract_features(
    encoder: torch.nn.Module,
    x: torch.Tensor,
    *,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    amp: bool = False,
    progress: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """f(x) for a whole set, batch by batch. x stays where it is (usually CPU);
    only one batch at a time (two on CUDA: the next is prefetched) is on ``device``.
    The encoder runs under inference mode. Returns float32 (N, d) on CPU (pinned
    on CUDA, filled by asynchronous copies that are waited for before returning)."""
    device = resolve_device(device)
    if batch_size is None:
        batch_size = default_batch_size(device)
    n = x.shape[0]
    cuda = device.type == "cuda"
    out: torch.Tensor | None = None
    # On CUDA the finiteness check runs on each batch where it is (one small reduction, no
    # sync) instead of a host pass over the whole output at the end.
    bad = torch.zeros((), dtype=torch.bool, device=device) if cuda else None
    for i, xb in _device_batches(x, batch_size, device):
        checkpoint()
        with torch.inference_mode(), autocast_for(device, amp):
            zb = encoder(xb)
        if out is None:  # allocated outside inference mode: the features may enter autograd later
            out = torch.empty(n, zb.shape[1], dtype=torch.float32, pin_memory=cuda)
        if cuda:
            with torch.inference_mode():
                bad = bad | ~torch.isfinite(zb).all()
        out[i : i + zb.shape[0]].copy_(zb, non_blocking=cuda)
        if progress:
            progress(min(i + batch_size, n) / n)
    if out is None:
        raise ValueError("cannot extract features of an empty set")
    if cuda:
        torch.cuda.synchronize(device)
        finite = not bad.item()
    else:
        finite = bool(torch.isfinite(out).all())
    if not finite:
        raise FloatingPointError("the encoder produced non-finite features")
    return out


class FeatureCache:
    """f(split) by (encoder fingerprint, dataset hash, split): in memory, and on disk
    as safetensors under ``directory`` when one is given (shared across jobs)."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory else None
        self._memory: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(encoder_fingerprint: str, dataset_hash: str, split: str, variant: str = "") -> str:
        """variant: how the features were computed when that changes them (device kind, bf16)."""
        raw = f"{encoder_fingerprint}:{dataset_hash}:{split}".encode() + (f":{variant}".encode() if variant else b"")
        return hashlib.sha256(raw).hexdigest()

    def path_for(self, key: str) -> Path | None:
        return self.directory / "features" / f"{key}.safetensors" if self.directory else None

    def get_or_compute(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        path = self.path_for(key)
        if path is not None and path.exists():
            try:
                z = load_file(str(path))["z"]
                self.hits += 1
                self._memory[key] = z
                return z
            except Exception:  # a corrupt cache entry is recomputed, never trusted
                path.unlink(missing_ok=True)
        self.misses += 1
        z = compute()
        self._memory[key] = z
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            save_file({"z": z.contiguous()}, tmp)
            os.replace(tmp, path)  # atomic: concurrent workers never read half a file
        return z

    def features(
        self,
        encoder,
        dataset,
        split: str,
        *,
        fingerprint: str | None = None,
        device: torch.device | str = "cpu",
        batch_size: int | None = None,
        amp: bool = False,
        progress: Callable[[float], None] | None = None,
    ) -> torch.Tensor:
        x = {"train": dataset.x_train, "test": dataset.x_test}[split]
        dev = torch.device(device)
        variant = "" if dev.type == "cpu" and not amp else f"{dev.type}-{'amp' if amp else 'fp32'}"
        key = self.key(fingerprint or encoder.fingerprint(), dataset.content_hash, split, variant)
        return self.get_or_compute(
            key,
            lambda: extract_features(
                encoder, x, batch_size=batch_size, device=device, amp=amp, progress=progress
            ),
        )
