"""Decoder inversion: the U-Net decoder, the injection of zeta, SSIM/MS-SSIM and the decoder cache (fast)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from attacks.catalogue import DecoderInversionParams
from attacks.decoder_inversion import (
    _cache_key,
    build_decoder,
    clear_memory_cache,
    decode,
    fitted_window,
    inject,
    ms_ssim,
    ms_ssim_scales,
    reconstruction_quality,
    ssim,
    trained_decoder,
)
from attacks.encoders import EncoderSpec, build_encoder, freeze
from attacks.pipeline import run_job


@functools.cache
def _built(name: str):
    torch.manual_seed(0)
    return freeze(build_encoder(EncoderSpec(**ENCODERS[name][0])))


ENCODERS = {
    "small_cnn 8x8": (dict(arch="small_cnn", in_channels=1, width=4), (1, 8, 8)),
    "small_cnn 8x8 resized to 28": (dict(arch="small_cnn", in_channels=1, width=4, input_size=28), (1, 8, 8)),
    "small_cnn 28x28": (dict(arch="small_cnn", in_channels=1, width=4), (1, 28, 28)),
    "resnet18 cifar_stem 32x32": (dict(arch="resnet18", in_channels=3, cifar_stem=True), (3, 32, 32)),
}


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_decoder_output_has_the_data_shape_and_stays_in_the_clean_range(name):
    enc, shape = _built(name), ENCODERS[name][1]
    g = torch.Generator().manual_seed(1)
    lo, hi = 0.1, 0.9  # a clean range other than [0, 1]
    x = lo + (hi - lo) * torch.rand(4, *shape, generator=g)
    dec = build_decoder(enc, x, width=8, lo=lo, hi=hi, seed=0)
    rec = decode(enc, dec, x)
    assert rec.shape == x.shape and rec.dtype == torch.float32
    # zeta far off the encoder's range still decodes into the clean range
    zeta = 100 * torch.randn(4, enc.feature_dim, generator=g)
    nu = decode(enc, dec, x, zeta)
    assert nu.shape == x.shape
    assert torch.isfinite(nu).all() and nu.min() >= lo and nu.max() <= hi
    assert not torch.equal(nu, rec)  # zeta reaches the output
    # seeded and pure: the same seed builds the same decoder, and the global RNG is untouched
    state = torch.random.get_rng_state()
    again = build_decoder(enc, x, width=8, lo=lo, hi=hi, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(dec.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("name", ["small_cnn 8x8", "resnet18 cifar_stem 32x32"])
def test_the_bottleneck_pools_to_f_and_injection_pools_to_zeta(name):
    enc, shape = _built(name), ENCODERS[name][1]
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        feats, maps = enc.forward_with_skips(x)
    bott = maps[-1]
    # the deepest map is the one whose global average pool is f(x)
    torch.testing.assert_close(bott.mean(dim=(2, 3)), enc(x), rtol=1e-5, atol=1e-5)
    # injecting f(x) itself is the identity (training sees the true maps)
    torch.testing.assert_close(inject(bott, feats), bott, rtol=1e-5, atol=1e-5)
    zeta = 50 * torch.randn(3, bott.shape[1], generator=torch.Generator().manual_seed(3))
    out = inject(bott, zeta)
    torch.testing.assert_close(out.mean(dim=(2, 3)), zeta, rtol=1e-5, atol=1e-4)
    # the spatial pattern of the map is kept
    torch.testing.assert_close(out - out.mean(dim=(2, 3), keepdim=True), bott - bott.mean(dim=(2, 3), keepdim=True),
                               rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError):
        inject(bott, zeta[:, :-1])


def _reference_ssim(x: np.ndarray, y: np.ndarray, size: int, sigma: float, L: float) -> float:
    """SSIM by explicit window sums (no convolution), mean over channels and valid positions."""
    c = np.arange(size) - (size - 1) / 2
    g = np.exp(-(c**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for ch in range(x.shape[0]):
        for i in range(x.shape[1] - size + 1):
            for j in range(x.shape[2] - size + 1):
                a, b = x[ch, i : i + size, j : j + size], y[ch, i : i + size, j : j + size]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * a * a).sum() - ma**2, (w * b * b).sum() - mb**2
                cov = (w * a * b).sum() - ma * mb
                vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 28, 28, generator=g, dtype=torch.float64)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    noisy = [(x + s * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1) for s in (0.02, 0.1, 0.3)]
    scores = [ssim(x, n).mean().item() for n in noisy]
    assert 1 > scores[0] > scores[1] > scores[2]
    assert torch.allclose(ssim(x, noisy[1]), ssim(noisy[1], x))
    # constant images: no variance, SSIM is the luminance term (2ab + C1) / (a^2 + b^2 + C1)
    a, b = 0.2, 0.7
    got = ssim(torch.full((1, 1, 16, 16), a, dtype=torch.float64), torch.full((1, 1, 16, 16), b, dtype=torch.float64))
    assert got.item() == pytest.approx((2 * a * b + 1e-4) / (a * a + b * b + 1e-4), rel=1e-9)
    # against an independent computation by explicit window sums, with a non-unit data range
    xs, ys = x[0, :2, :10, :10], noisy[2][0, :2, :10, :10]
    ref = _reference_ssim(xs.numpy(), ys.numpy(), 5, 0.7, 2.0)
    assert ssim(xs[None], ys[None], data_range=2.0, win_size=5, sigma=0.7).item() == pytest.approx(ref, rel=1e-9)
    with pytest.raises(ValueError):
        ssim(x[..., :8, :8], x[..., :8, :8], win_size=11)


def test_ssim_agrees_with_scikit_image():
    from skimage import metrics  # a test dependency: the comparison must run, never skip
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 32, 32, generator=g, dtype=torch.float64)
    y = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    ref = metrics.structural_similarity(x[0, 0].numpy(), y[0, 0].numpy(), gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, data_range=1.0)
    assert ssim(x, y).item() == pytest.approx(ref, abs=1e-6)


def test_ms_ssim_and_window_fitting():
    assert ms_ssim_scales(176, 176) == 5 and ms_ssim_scales(175, 200) == 4 and ms_ssim_scales(28, 28) == 2
    assert fitted_window(8, 8)[0] == 5 and fitted_window(28, 28)[0] == 11 and fitted_window(4, 4)[0] == 3
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 176, 176, generator=g)
    assert ms_ssim(x, x).item() == pytest.approx(1.0, abs=1e-5)
    noisy = [(x + s * torch.randn(x.shape, generator=g)).clamp(0, 1) for s in (0.05, 0.3)]
    a, b = (ms_ssim(x, n).item() for n in noisy)
    assert 1 > a > b > 0
    assert ms_ssim(noisy[0], x).item() == pytest.approx(a, rel=1e-5)
    with pytest.raises(ValueError, match="too small"):
        ms_ssim(x[..., :160, :160], x[..., :160, :160])


TINY_DECODER = dict(decoder_epochs=2, decoder_width=8, decoder_batch_size=64, decoder_lr=1e-2)


def test_trained_decoder_is_cached_in_memory_and_on_disk(tiny_encoder, digits_small, tmp_path):
    clear_memory_cache()
    params = DecoderInversionParams(**TINY_DECODER)
    first, info1 = trained_decoder(tiny_encoder, digits_small, params, seed=0, cache_dir=tmp_path)
    assert info1["decoder_from_cache"] is False and info1["decoder_train_seconds"] > 0
    assert "ssim_l1 (window 5" in info1["decoder_loss_used"]  # 8x8 digits: single-scale SSIM, 5-px window
    assert len(list((tmp_path / "decoders").glob("*.safetensors"))) == 1
    # training helps: better than the same architecture untrained
    x = digits_small.x_test
    untrained = build_decoder(tiny_encoder, x, 8, float(digits_small.x_train.min()), float(digits_small.x_train.max()), 0)
    before = reconstruction_quality(tiny_encoder, untrained, x, 0.0, 1.0)
    assert info1["decoder_test_ssim"] > before["decoder_test_ssim"] + 0.1
    assert info1["decoder_test_l1"] < before["decoder_test_l1"]

    second, info2 = trained_decoder(tiny_encoder, digits_small, params, seed=0, cache_dir=tmp_path)  # memory
    clear_memory_cache()
    third, info3 = trained_decoder(tiny_encoder, digits_small, params, seed=0, cache_dir=tmp_path)  # disk
    assert info2["decoder_from_cache"] is True and info3["decoder_from_cache"] is True
    assert info3["decoder_test_ssim"] == info1["decoder_test_ssim"]
    assert info3["decoder_train_seconds"] == info1["decoder_train_seconds"]
    for other in (second, third):
        for (k, a), b in zip(first.state_dict().items(), other.state_dict().values()):
            assert torch.equal(a, b), k
    # another hyper-parameter, seed or precision is another decoder
    keys = {_cache_key("f", "d", params, 0, "fp32"), _cache_key("f", "d", params, 1, "fp32"),
            _cache_key("f", "d", params, 0, "bf16"), _cache_key("f", "e", params, 0, "fp32"),
            _cache_key("g", "d", params, 0, "fp32")}
    keys |= {_cache_key("f", "d", params.model_copy(update={k: v}), 0, "fp32")
             for k, v in [("decoder_epochs", 1), ("decoder_lr", 1e-3), ("decoder_batch_size", 32),
                          ("decoder_loss", "ssim_l1"), ("ssim_weight", 0.5), ("decoder_width", 16),
                          ("skip_swap", 0.0)]}
    assert len(keys) == 12
    one_epoch = params.model_copy(update={"decoder_epochs": 1})
    _, info4 = trained_decoder(tiny_encoder, digits_small, one_epoch, seed=0, cache_dir=tmp_path)
    assert info4["decoder_from_cache"] is False and info4["decoder_cache_key"] != info1["decoder_cache_key"]
    # a corrupt file on disk is retrained, not trusted
    clear_memory_cache()
    path = tmp_path / "decoders" / f"{info4['decoder_cache_key']}.safetensors"
    path.write_bytes(b"not a safetensors file")
    _, info5 = trained_decoder(tiny_encoder, digits_small, one_epoch, seed=0, cache_dir=tmp_path)
    assert info5["decoder_from_cache"] is False
    _, info6 = trained_decoder(tiny_encoder, digits_small, one_epoch, seed=0, cache_dir=tmp_path)
    assert info6["decoder_from_cache"] is True


@pytest.mark.parametrize("swap", [0.0, 0.5, 1.0])
def test_skip_swap_trains_on_another_images_skips(tiny_encoder, digits_small, swap, monkeypatch):
    """skip_swap s: in each training batch about a fraction s of the images is decoded from its own
    bottleneck with its neighbour's skip maps (0: every image with its own, the paper's training)."""
    import attacks.decoder_inversion as di

    last, counts = {}, {"own": 0, "other": 0}
    real_skips, real_forward = di._skips, di.UNetDecoder.forward

    def skips_spy(encoder, x, amp):
        bott, skips = real_skips(encoder, x, amp)
        last["skips"] = skips
        return bott, skips

    def forward_spy(self, bottleneck, skips):
        if self.training:  # compare what the decoder gets with each image's own skip maps
            for i in range(bottleneck.shape[0]):
                mine = all(torch.equal(s[i], o[i]) for s, o in zip(skips, last["skips"]))
                counts["own" if mine else "other"] += 1
        return real_forward(self, bottleneck, skips)

    monkeypatch.setattr(di, "_skips", skips_spy)
    monkeypatch.setattr(di.UNetDecoder, "forward", forward_spy)
    clear_memory_cache()
    params = DecoderInversionParams(**{**TINY_DECODER, "decoder_epochs": 2, "skip_swap": swap})
    trained_decoder(tiny_encoder, digits_small, params, seed=0)
    total = counts["own"] + counts["other"]
    assert total >= 2 * 290  # two epochs of the 300 training images (a leftover single image waits)
    assert counts["other"] / total == pytest.approx(swap, abs=0.1)
    clear_memory_cache()


def test_second_job_reuses_the_decoder_and_reports_it(tiny_encoder, digits_small, tmp_path):
    clear_memory_cache()
    params = {"gc_steps": 30, **TINY_DECODER}
    kw = dict(encoder=tiny_encoder, dataset=digits_small, attack="decoder_inversion", params=params, device="cpu",
              cache_dir=tmp_path)
    a = run_job(epsilon=0.05, **kw)
    clear_memory_cache()  # the second job finds it on disk
    b = run_job(epsilon=0.1, **kw)
    assert a.metrics["decoder_from_cache"] is False and b.metrics["decoder_from_cache"] is True
    for m in (a.metrics, b.metrics):
        assert 0 < m["decoder_test_ssim"] <= 1 and m["decoder_test_l1"] >= 0
        assert m["injection"] == "mean_shift"
        assert m["poison_stats"]["fraction_outside_clean_range"] == 0
    assert len(b.poisons) == round(0.1 * digits_small.n_train)
    # the poisons are the decoder's images of zeta from their base images, not the base images
    x = digits_small.x_train[b.poisons.base_index]
    assert not torch.allclose(b.poisons.x, x, atol=1e-3)
