"""Peak memory: bounded by the chunk (batch) size, not by the data size.

Each case runs in a fresh subprocess (``python -m bench.memory CASE ...``) so
no earlier allocation can hide a peak. The subprocess builds what the case
needs (the encoder, the data when it is held in memory), runs a tiny warm-up
(2 images: thread pools and kernel primitives, no batch-sized activations),
reads the baseline, runs the case once, and reports the peak above the
baseline: the resident high-water mark (``VmHWM``, reset at the baseline through
``/proc/self/clear_refs``; ``ru_maxrss`` is not used because the kernel carries
the parent's pre-exec peak into it) on the CPU,
``torch.cuda.max_memory_allocated`` on CUDA (the host side is then reported
too).

What is data-proportional and what is not is reported separately:
``features_mib`` is the (N, d) float32 output, the one O(N) allocation
extraction must make; ``peak_minus_features_mib`` is the rest (activations,
batch copies), which should not grow with N. The 50,000-image synthetic set
is measured twice: held in memory (its 150 MiB are allocated before the
baseline: the input exists either way) and generated chunk by chunk on
demand (nothing of size N but the features).

Feature matching: a whole job (features, clean head, GC, feature matching,
evaluation) at epsilon 1 on mnist5k (4,000 poisons) against epsilon 0.25
(1,000 poisons), and at epsilon 1 with a smaller poison batch.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

from bench.common import device_name, table, write

MIB = 2**20


class LazySynthetic:
    """A synthetic image set whose rows are made on demand, chunk by chunk (same
    values for the same rows): only the slice being read exists."""

    def __init__(self, n: int, shape: tuple[int, ...], seed: int = 0):
        self.shape = (n, *shape)
        self.seed = seed
        self.device = torch.device("cpu")

    def __getitem__(self, sl: slice) -> torch.Tensor:
        start, stop, _ = sl.indices(self.shape[0])
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + start)
        return torch.rand(stop - start, *self.shape[1:], generator=g)


def _status_mib(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def _reset_peak() -> bool:
    """Resets this process's resident high-water mark (VmHWM), Linux >= 4.0."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_mib() -> float:
    """The process's resident high-water mark. VmHWM, not ru_maxrss: the kernel carries
    the pre-exec peak (here: the parent's, torch loaded) into ru_maxrss across execve,
    which would hide a child's own smaller peak."""
    try:
        return _status_mib("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class _Probe:
    def __init__(self, device: torch.device):
        self.device = device

    def baseline(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.gpu0 = torch.cuda.memory_allocated(self.device)
        if _reset_peak():  # peak from here on, above the resident size now
            self.rss0 = _status_mib("VmRSS")
        else:
            self.rss0 = _rss_mib()

    def peak(self) -> dict:
        out = {"host_peak_mib": _rss_mib() - self.rss0}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            out["gpu_peak_mib"] = (torch.cuda.max_memory_allocated(self.device) - self.gpu0) / MIB
        return out


def case_extraction(n: int, batch: int, lazy: bool, device: str) -> dict:
    from attacks.encoders import EncoderSpec, build_encoder, freeze, place
    from attacks.features import extract_features

    dev = torch.device(device)
    torch.manual_seed(0)
    encoder = place(freeze(build_encoder(EncoderSpec(arch="small_cnn", in_channels=1, width=32))), dev)
    shape = (1, 28, 28)
    x = LazySynthetic(n, shape) if lazy else torch.rand(n, *shape, generator=torch.Generator().manual_seed(0))
    extract_features(encoder, torch.rand(2, *shape), batch_size=2, device=dev)  # warm-up
    probe = _Probe(dev)
    probe.baseline()
    z = extract_features(encoder, x, batch_size=batch, device=dev)
    res = probe.peak()
    feats = z.numel() * 4 / MIB
    res.update(features_mib=feats, peak_minus_features_mib=res["host_peak_mib"] - feats,
               data_in_memory_mib=0.0 if lazy else n * 784 * 4 / MIB)
    return res


def case_fm_job(epsilon: float, batch: int, fm_steps: int, device: str) -> dict:
    from attacks.data import load_dataset
    from attacks.encoders import EncoderSpec, build_encoder
    from attacks.features import extract_features
    from attacks.pipeline import run_job

    dev = torch.device(device)
    ds = load_dataset("mnist5k")
    torch.manual_seed(0)
    encoder = build_encoder(EncoderSpec(arch="small_cnn", in_channels=1))
    extract_features(encoder.eval(), ds.x_train[:2], batch_size=2)  # warm-up
    probe = _Probe(dev)
    probe.baseline()
    r = run_job(encoder=encoder, dataset=ds, attack="feature_matching", epsilon=epsilon, seed=0, device=device,
                params={"gc_steps": 100, "fm_steps": fm_steps, "batch_size": batch})
    res = probe.peak()
    res.update(n_poisons=r.metrics["n_poisons"], poisons_mib=r.metrics["n_poisons"] * 784 * 4 / MIB)
    return res


# glibc raises its mmap threshold after large frees (up to 32 MiB), after which batch-sized
# buffers come from the heap and fragment it: the resident peak then drifts by tens of MiB
# from run to run, independently of N. Each case is run under glibc's default and with the
# threshold pinned (MALLOC_MMAP_THRESHOLD_), which turns that heuristic off.
MALLOC = {"glibc default": {}, "mmap threshold 64 KiB": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def _spawn(args: list[str], env: dict) -> dict:
    cmd = [sys.executable, "-m", "bench.memory", *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    dev = torch.device(device)
    rows = []
    sizes = [2_000, 10_000] if quick else [10_000, 50_000]
    fm_steps = "2"
    for malloc, env in MALLOC.items():
        for lazy in (False, True):
            for n in sizes:
                args = ["extraction", "--n", str(n), "--batch", "512", "--device", device] + (["--lazy"] if lazy else [])
                rows.append(dict(case="extraction", data="generated per chunk" if lazy else "in memory", n=n,
                                 batch=512, malloc=malloc, **_spawn(args, env)))
        if not quick:
            args = ["extraction", "--n", str(sizes[-1]), "--batch", "128", "--device", device, "--lazy"]
            rows.append(dict(case="extraction", data="generated per chunk", n=sizes[-1], batch=128, malloc=malloc,
                             **_spawn(args, env)))
        for eps, batch in ([(0.25, 512), (1.0, 512)] + ([] if quick else [(1.0, 128)])):
            args = ["fm_job", "--epsilon", str(eps), "--batch", str(batch), "--fm-steps", fm_steps, "--device", device]
            r = _spawn(args, env)
            rows.append(dict(case=f"fm job eps {eps}", data="mnist5k in memory", n=r.pop("n_poisons"), batch=batch,
                             malloc=malloc, **r))
    write("memory", rows, {"device": device_name(dev), "measure": "VmHWM (reset at the baseline) above VmRSS at a post-set-up baseline"
                           + ("; torch.cuda.max_memory_allocated above the allocated baseline" if dev.type == "cuda" else ""),
                           "extraction_encoder": "small_cnn width 32, 1x28x28", "fm_job_encoder": "small_cnn width 64",
                           "fm_steps": int(fm_steps)})
    cols = ["case", "data", "n", "batch", "malloc", "host_peak_mib", "features_mib", "peak_minus_features_mib", "poisons_mib"]
    if dev.type == "cuda":
        cols.append("gpu_peak_mib")
    print(table(rows, cols))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("case", choices=["extraction", "fm_job"])
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lazy", action="store_true")
    p.add_argument("--epsilon", type=float, default=1.0)
    p.add_argument("--fm-steps", type=int, default=2)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if a.case == "extraction":
        res = case_extraction(a.n, a.batch, a.lazy, a.device)
    else:
        res = case_fm_job(a.epsilon, a.batch, a.fm_steps, a.device)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
