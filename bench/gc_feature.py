"""GC in feature space: closed-form gradient against autograd double backprop.

The reference (plim) gets d/dZp of 1/2||G + grad_w l(Zp)||^2 by
`torch.autograd.grad(loss, w, create_graph=True)` and a second backward pass.
Both sides here use the same constant clean gradient G (computed once) and
take the same number of steps; the gradients are checked to agree.

On CUDA a third column times the step as `gradient_canceling` runs it there: the
closed form captured once in a CUDA graph and replayed (`attacks.head.GCStep`);
`speedup` is autograd over that path, `speedup_eager` autograd over the eager closed form.
"""

from __future__ import annotations

import torch

from attacks.head import GCStep, Head, gc_loss_and_grad, gc_loss_and_grad_autograd, summed_gradient
from bench.common import device_name, table, timeit, write


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    dev = torch.device(device)
    configs = [(4000, 128, 10, 120), (4000, 128, 10, 4000)]
    if not quick:
        configs += [(50000, 512, 10, 1500), (50000, 512, 10, 50000)]
    rows = []
    for N, d, K, n in configs:
        g = torch.Generator().manual_seed(0)
        Z = torch.randn(N, d, generator=g).to(dev)
        y = torch.randint(0, K, (N,), generator=g).to(dev)
        head = Head(torch.randn(K, d, generator=g).to(dev) * 0.1, torch.zeros(K, device=dev))
        G = summed_gradient(head, Z, y)
        Zp, yp = Z[:n].clone() * 2, y[:n]
        steps = 20
        _, g_cf = gc_loss_and_grad(head, G, Zp, yp)
        _, g_ag = gc_loss_and_grad_autograd(head, G, Zp, yp)
        rel = ((g_cf - g_ag).norm() / g_ag.norm()).item()

        def closed():
            for _ in range(steps):
                gc_loss_and_grad(head, G, Zp, yp)

        def autograd():
            for _ in range(steps):
                gc_loss_and_grad_autograd(head, G, Zp, yp)

        t_cf = timeit(closed, device=dev)
        t_ag = timeit(autograd, device=dev)
        row = dict(N=N, d=d, K=K, poisons=n, closed_ms_per_step=1e3 * t_cf / steps,
                   autograd_ms_per_step=1e3 * t_ag / steps, speedup=t_ag / t_cf, grad_rel_diff=rel)
        if dev.type == "cuda":
            step = GCStep(head, G, yp, like=Zp)
            rel_graph = ((step(Zp)[1] - g_ag).norm() / g_ag.norm()).item()

            def graphed():
                for _ in range(steps):
                    step(Zp)

            t_gr = timeit(graphed, device=dev)
            row.update(graph_ms_per_step=1e3 * t_gr / steps, speedup_eager=t_ag / t_cf, speedup=t_ag / t_gr,
                       graph_grad_rel_diff=rel_graph)
        rows.append(row)
    write("gc_feature", rows, {"device": device_name(dev)})
    cols = ["N", "d", "poisons", "closed_ms_per_step", "autograd_ms_per_step", "speedup", "grad_rel_diff"]
    if dev.type == "cuda":
        cols[4:4] = ["graph_ms_per_step"]
        cols += ["speedup_eager", "graph_grad_rel_diff"]
    print(table(rows, cols))
    return rows
