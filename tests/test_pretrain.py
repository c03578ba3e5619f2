"""attacks.pretrain: SimCLR augmentations, loss, determinism, progress, and the mnist5k accuracy claim."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from attacks.encoders import EncoderSpec, build_encoder, freeze
from attacks.progress import Cancelled
from attacks.pretrain import SimCLRConfig, augment, linear_probe_accuracy, nt_xent, pretrain_simclr

TINY_SPEC = EncoderSpec("small_cnn", in_channels=1, width=8)
TINY_CONFIG = SimCLRConfig(epochs=2, batch_size=16, device="cpu")


@pytest.fixture(scope="module")
def digits():
    from attacks.data import load_dataset

    return load_dataset("digits")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(epochs=0), "epochs"),
        (dict(batch_size=1), "batch_size"),
        (dict(lr=0.0), "lr"),
        (dict(temperature=-1.0), "temperature"),
        (dict(proj_dim=0), "proj_dim"),
        (dict(crop_scale=(0.0, 1.0)), "crop_scale"),
        (dict(crop_scale=(0.9, 0.5)), "crop_scale"),
        (dict(flip="yes"), "flip"),
        (dict(jitter=1.5), "jitter"),
        (dict(noise_std=-0.1), "noise_std"),
        (dict(device="tpu"), "device"),
        (dict(device="cuda:x"), "device"),
        (dict(lr="fast"), "lr"),
        (dict(epochs=True), "epochs"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SimCLRConfig(**kwargs)


def test_augment_is_seeded_in_range_and_pure():
    x = torch.rand(8, 1, 12, 12)
    before = x.clone()
    cfg = SimCLRConfig()
    a = augment(x, cfg, torch.Generator().manual_seed(3))
    b = augment(x, cfg, torch.Generator().manual_seed(3))
    c = augment(x, cfg, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(x, before)


def test_flip_mirrors_the_same_crop():
    """With flip on, each view is either the unflipped view or its exact mirror image."""
    x = torch.rand(16, 3, 10, 10)
    plain = augment(x, SimCLRConfig(jitter=0.0, noise_std=0.0), torch.Generator().manual_seed(0))
    flipped = augment(x, SimCLRConfig(jitter=0.0, noise_std=0.0, flip=True), torch.Generator().manual_seed(0))
    same = [torch.allclose(f, p, atol=1e-6) for f, p in zip(flipped, plain)]
    mirrored = [torch.allclose(f, p.flip(-1), atol=1e-6) for f, p in zip(flipped, plain)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert any(same) and any(mirrored)


def test_nt_xent_matches_a_direct_computation():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 7), torch.randn(5, 7)
    t = 0.5
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / t
    losses = []
    for i in range(10):
        positive = (i + 5) % 10
        others = torch.cat([sim[i, :i], sim[i, i + 1 :]])
        losses.append(-(sim[i, positive] - torch.logsumexp(others, 0)))
    torch.testing.assert_close(nt_xent(z1, z2, t), torch.stack(losses).mean())
    # aligned views score far better than unrelated ones
    assert nt_xent(z1, z1 + 0.01 * z2, t) < nt_xent(z1, z2, t) - 1.0


def test_pretrain_is_deterministic_and_pure(digits):
    x = digits.x_train[:64]
    before = x.clone()
    rng_before = torch.get_rng_state()
    a = pretrain_simclr(TINY_SPEC, x, TINY_CONFIG)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    b = pretrain_simclr(TINY_SPEC, x, TINY_CONFIG)
    c = pretrain_simclr(TINY_SPEC, x, SimCLRConfig(epochs=2, batch_size=16, device="cpu", seed=1))
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    assert torch.equal(x, before)
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    assert next(a.parameters()).device.type == "cpu"
    # training moved the weights away from the seeded initialisation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_CONFIG.seed)
        init = build_encoder(TINY_SPEC)
    assert init.fingerprint() != a.fingerprint()


def test_pretrain_reports_progress_and_can_be_cancelled(digits):
    x = digits.x_train[:64]
    seen: list[tuple[str, float]] = []
    pretrain_simclr(TINY_SPEC, x, TINY_CONFIG, progress=lambda stage, f: seen.append((stage, f)))
    assert {s for s, _ in seen} == {"pretrain"}
    fractions = [f for _, f in seen]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert fractions == sorted(fractions) and len(fractions) == 1 + 2 * (64 // 16)

    calls = []

    def cancel_after_two(stage: str, fraction: float) -> None:
        calls.append(fraction)
        if len(calls) == 3:
            raise Cancelled()

    with pytest.raises(Cancelled):
        pretrain_simclr(TINY_SPEC, x, TINY_CONFIG, progress=cancel_after_two)
    assert len(calls) == 3


def test_pretrain_rejects_bad_data():
    with pytest.raises(ValueError, match="at least 2"):
        pretrain_simclr(TINY_SPEC, torch.rand(1, 1, 8, 8), TINY_CONFIG)
    with pytest.raises(ValueError, match="float"):
        pretrain_simclr(TINY_SPEC, torch.zeros(4, 1, 8, 8, dtype=torch.uint8), TINY_CONFIG)


def test_linear_probe_on_digits_restores_mode(digits):
    torch.manual_seed(0)
    enc = build_encoder(EncoderSpec("small_cnn", in_channels=1, width=16))
    acc = linear_probe_accuracy(enc, digits.x_train, digits.y_train, digits.x_test, digits.y_test)
    assert 0.6 < acc <= 1.0  # random conv features of 8x8 digits are far above chance (0.1)
    assert enc.training  # the probe put it back in train mode
    frozen = freeze(enc)
    assert linear_probe_accuracy(frozen, digits.x_train, digits.y_train, digits.x_test, digits.y_test) == acc


@pytest.mark.slow
def test_simclr_small_cnn_on_mnist5k_reaches_90_percent_in_3_minutes():
    """ATTACKS.md's claim: a small CNN pre-trained with SimCLR on the CPU probes at >= 90% on mnist5k.

    One epoch at batch 128 (31 steps) keeps a wide time margin on a shared
    2-core machine (about 30 s idle, 75 s under heavy contention; the default
    3 epochs at batch 256 took 72-170 s). A random-init small_cnn already
    probes at about 92% here, so the test also demands a gain over it.
    """
    from attacks.data import load_dataset

    ds = load_dataset("mnist5k")
    spec = EncoderSpec("small_cnn", in_channels=1)
    start = time.perf_counter()
    encoder = pretrain_simclr(spec, ds.x_train, SimCLRConfig(epochs=1, batch_size=128, device="cpu"))
    acc = linear_probe_accuracy(encoder, ds.x_train, ds.y_train, ds.x_test, ds.y_test)
    elapsed = time.perf_counter() - start
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        baseline = linear_probe_accuracy(freeze(build_encoder(spec)), ds.x_train, ds.y_train, ds.x_test, ds.y_test)
    print(f"mnist5k SimCLR small_cnn: probe {acc:.4f} (random init {baseline:.4f}) in {elapsed:.1f} s")
    assert elapsed <= 180, f"pre-training and probe took {elapsed:.0f} s"
    assert acc >= 0.90, f"linear probe {acc:.4f}"
    assert acc >= baseline + 0.01, f"pre-training gained too little: {acc:.4f} vs random init {baseline:.4f}"
