"""Input-space attacks: closed form + one VJP against autograd double backprop (issues #4, #6).

(a) One GC input step, d/dnu of 1/2||G + sum_j grad_W l(f(nu_j))||^2:
    closed   -- f(nu) with a graph, the closed-form cotangent, one VJP (single chunk);
    chunked  -- the same in chunks of 64 poisons (a no-grad pass, then forward + VJP per chunk);
    autograd -- the reference: head gradients with create_graph=True, a second backward to nu.
(b) One TGDA attacker gradient D_nu l_val (16 CG iterations):
    closed   -- closed-form HVPs and mixed term, one VJP;
    autograd -- every HVP by double backprop, the mixed term by create_graph through f(nu).
Both sides of each pair are checked to give the same gradient.

Encoder: a random-init small_cnn (width 64) on 28x28 single-channel inputs (mnist-sized);
clean set: 4,000 random 128-d features, 10 classes. Timing: median of 3 after a warm-up.

Peak memory. CUDA: torch.cuda.max_memory_allocated over one step, minus what was allocated
before it. CPU: each variant runs in a fresh subprocess that builds the same inputs, reads
its RSS, resets the kernel's high-water mark (/proc/self/clear_refs), runs the step twice
and reads VmHWM; the difference is the step's own high-water mark above the setup (allocator caching included, so it is an upper
bound of the tensors' peak, and the same bound for every variant).
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from attacks.encoders import EncoderSpec, build_encoder, freeze
from attacks.gc_input import ChunkedEncoder, gc_input_grad, gc_input_grad_autograd
from attacks.head import Head, summed_gradient
from attacks.tgda_input import attacker_grad_autograd, total_derivative_features
from bench.common import device_name, table, timeit, write

K, D_FEAT, N_CLEAN = 10, 128, 4000


def _setup(n: int, dev: torch.device):
    torch.manual_seed(0)
    enc = freeze(build_encoder(EncoderSpec(arch="small_cnn", in_channels=1, width=64))).to(dev)
    g = torch.Generator().manual_seed(0)
    nu = torch.rand(n, 1, 28, 28, generator=g).to(dev)
    yp = torch.randint(0, K, (n,), generator=g).to(dev)
    Z = torch.randn(N_CLEAN, D_FEAT, generator=g).to(dev) * 0.1
    y = torch.randint(0, K, (N_CLEAN,), generator=g).to(dev)
    head = Head(torch.randn(K, D_FEAT, generator=g).to(dev), torch.randn(K, generator=g).to(dev) * 0.1)
    G = summed_gradient(head, Z, y)
    return enc, nu, yp, Z, y, head, G


def _step(kind: str, n: int, dev: torch.device, s):
    enc, nu, yp, Z, y, head, G = s
    if kind == "gc_closed":
        return lambda: gc_input_grad(ChunkedEncoder(enc, batch_size=n, device=dev), head, G, nu, yp)[1]
    if kind == "gc_chunked":
        return lambda: gc_input_grad(ChunkedEncoder(enc, batch_size=64, device=dev), head, G, nu, yp)[1]
    if kind == "gc_autograd":
        return lambda: gc_input_grad_autograd(enc, head, G, nu, yp)[1]
    Ztr, ytr, Zval, yval = Z[1000:], y[1000:], Z[:1000], y[:1000]
    if kind == "tgda_closed":
        def closed():
            Zp, vjp = ChunkedEncoder(enc, batch_size=n, device=dev).features_then_vjp(nu)
            C, _ = total_derivative_features(head, Ztr, ytr, Zp.to(dev), yp, Zval, yval, 16, 1e-3)
            return vjp(C)
        return closed
    if kind == "tgda_autograd":
        return lambda: attacker_grad_autograd(enc, head, Ztr, ytr, nu, yp, Zval, yval, 16, 1e-3)
    raise ValueError(kind)


def _cpu_peak_mb(kind: str, n: int) -> float:
    """Peak RSS growth of one step in a fresh process (see the module docstring)."""
    out = subprocess.run([sys.executable, "-m", "bench.input_space", "--child", kind, str(n)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def _child(kind: str, n: int) -> None:
    dev = torch.device("cpu")
    s = _setup(n, dev)
    fn = _step(kind, n, dev, s)
    # ru_maxrss survives exec (a child inherits its parent's peak), so read the per-process
    # VmHWM instead, reset to the current RSS just before the step (Linux clear_refs 5).
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status_kb("VmRSS")
    fn()
    fn()
    print(json.dumps({"peak_mb": (_status_kb("VmHWM") - before) / 1024}))


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _gpu_peak_mb(fn, dev) -> float:
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize(dev)
    return (torch.cuda.max_memory_allocated(dev) - base) / 2**20


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    dev = torch.device(device)
    sizes = [64] if quick else [120, 512]
    pairs = [("gc", "gc_closed", "gc_autograd"), ("gc", "gc_chunked", "gc_autograd"),
             ("tgda", "tgda_closed", "tgda_autograd")]
    rows = []
    for n in sizes:
        s = _setup(n, dev)
        for what, mine, ref in pairs:
            f_mine, f_ref = _step(mine, n, dev, s), _step(ref, n, dev, s)
            g_mine, g_ref = f_mine(), f_ref()
            g_mine, g_ref = g_mine.cpu(), g_ref.cpu()
            rel = ((g_mine - g_ref).norm() / g_ref.norm()).item()
            t_mine = timeit(f_mine, device=dev)
            t_ref = timeit(f_ref, device=dev)
            if dev.type == "cuda":
                m_mine, m_ref = _gpu_peak_mb(f_mine, dev), _gpu_peak_mb(f_ref, dev)
            else:
                m_mine, m_ref = _cpu_peak_mb(mine, n), _cpu_peak_mb(ref, n)
            rows.append({"step": what, "poisons": n, "variant": mine.split("_")[1], "ms": 1e3 * t_mine,
                         "autograd_ms": 1e3 * t_ref, "speedup": t_ref / t_mine, "peak_mb": m_mine,
                         "autograd_peak_mb": m_ref, "grad_rel_diff": rel})
    write("input_space", rows, {"device": device_name(dev), "memory": "cuda max_memory_allocated" if dev.type == "cuda"
                                else "VmHWM growth of one step in a fresh process"})
    print(table(rows, ["step", "poisons", "variant", "ms", "autograd_ms", "speedup", "peak_mb", "autograd_peak_mb",
                       "grad_rel_diff"]))
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]))
