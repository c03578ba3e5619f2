"""Evaluation on cached features against retraining with the encoder in the loop.

The reference protocol (plim, TGDA) retrains the linear head with the frozen
encoder inside the training loop: every epoch pushes every image through f.
poisonaudit computes f(train) once (the feature cache) and trains the head on
the cached features. Both sides run the same SGD recipe for the same epochs
with the same shuffle seed; the cached side's time includes extracting the
features. The test accuracies are reported side by side to show they agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attacks.catalogue import HeadRecipe
from attacks.encoders import EncoderSpec, build_encoder, freeze
from attacks.features import extract_features
from attacks.head import Head, accuracy, train_head
from bench.common import device_name, table, timeit, write


def encoder_in_loop(encoder, x, y, x_test, y_test, K, recipe: HeadRecipe, seed: int, device):
    """The reference protocol: the encoder runs inside every epoch."""
    d = encoder.feature_dim
    W = torch.zeros(K, d, device=device, requires_grad=True)
    b = torch.zeros(K, device=device, requires_grad=True)
    opt = torch.optim.SGD([W, b], lr=recipe.lr, momentum=recipe.momentum)
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    for _ in range(recipe.epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, recipe.batch_size):
            idx = perm[i : i + recipe.batch_size]
            with torch.no_grad():
                z = encoder(x[idx].to(device))
            opt.zero_grad(set_to_none=False)
            F.cross_entropy(torch.addmm(b, z, W.T), y[idx].to(device)).backward()
            opt.step()
    with torch.no_grad():
        zt = extract_features(encoder, x_test, device=device)
    return accuracy(Head(W.detach().cpu(), b.detach().cpu()), zt, y_test)


def cached(encoder, x, y, x_test, y_test, K, recipe: HeadRecipe, seed: int, device):
    Z = extract_features(encoder, x, device=device)
    Zt = extract_features(encoder, x_test, device=device)
    head = train_head(Z.to(device), y.to(device), K, recipe, seed)
    return accuracy(head.to("cpu"), Zt, y_test)


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    from attacks.data import load_dataset

    dev = torch.device(device)
    ds = load_dataset("mnist5k")
    torch.manual_seed(0)
    encoder = freeze(build_encoder(EncoderSpec(arch="small_cnn", in_channels=1))).to(dev)
    rows = []
    for epochs in ([2] if quick else [5, 20]):
        recipe = HeadRecipe(optimizer="sgd", epochs=epochs, lr=0.1, batch_size=256)
        args = (encoder, ds.x_train, ds.y_train, ds.x_test, ds.y_test, ds.num_classes, recipe, 0, dev)
        acc_loop = encoder_in_loop(*args)
        acc_cached = cached(*args)
        t_loop = timeit(lambda: encoder_in_loop(*args), repeat=1, warmup=0, device=dev)
        t_cached = timeit(lambda: cached(*args), repeat=3, warmup=0, device=dev)
        rows.append(
            dict(dataset="mnist5k", encoder="small_cnn", epochs=epochs, encoder_in_loop_s=t_loop,
                 cached_s=t_cached, speedup=t_loop / t_cached, acc_encoder_in_loop=acc_loop, acc_cached=acc_cached)
        )
    write("evaluation", rows, {"device": device_name(dev)})
    print(table(rows, ["epochs", "encoder_in_loop_s", "cached_s", "speedup", "acc_encoder_in_loop", "acc_cached"]))
    return rows
