"""Fine-tuning vs transfer learning: the scenario a result records, and transfer as the same code path."""

from __future__ import annotations

import torch

from attacks.encoders import EncoderSpec, build_encoder, freeze, load_encoder, mark_pretrained_on, save_encoder
from attacks.pipeline import run_job


def _encoder(input_size=None):
    torch.manual_seed(1)
    return freeze(build_encoder(EncoderSpec(arch="small_cnn", in_channels=1, width=8, input_size=input_size)))


def test_provenance_survives_save_and_load_and_leaves_the_fingerprint_alone(tmp_path, digits_small):
    enc = _encoder()
    before = enc.fingerprint()
    mark_pretrained_on(enc, digits_small)
    assert enc.fingerprint() == before
    loaded = load_encoder(save_encoder(enc, tmp_path / "e"))
    assert loaded.provenance["pretrained_on"] == {"name": digits_small.name, "content_hash": digits_small.content_hash}


def test_scenario_is_recorded(digits_small, mnist5k):
    kw = dict(dataset=digits_small, attack="gradpc", device="cpu")
    unknown = run_job(encoder=_encoder(), **kw).metrics
    assert unknown["scenario"] == "unknown" and unknown["pretrained_on"] is None
    same = run_job(encoder=mark_pretrained_on(_encoder(), digits_small), **kw).metrics
    assert same["scenario"] == "same_dataset"
    other = run_job(encoder=mark_pretrained_on(_encoder(), mnist5k), **kw).metrics
    assert other["scenario"] == "transfer" and other["pretrained_on"]["name"] == "mnist5k"


def test_transfer_poisons_stay_at_the_target_resolution(digits_small, mnist5k):
    """An encoder that takes 28x28 (mnist5k) audited on 8x8 digits: upsampling lives in the
    encoder wrapper, so the poisons are optimised, and returned, as 8x8 digits."""
    enc = mark_pretrained_on(_encoder(input_size=28), mnist5k)
    r = run_job(encoder=enc, dataset=digits_small, attack="feature_matching", epsilon=0.05, device="cpu",
                params={"gc_steps": 20, "fm_steps": 30, "batch_size": 16})
    # (30 steps: with 3, the first sign-like Adam steps cost more in beta's term than they gain in
    # the features' on this random encoder, and each poison keeps its best iterate, the base)
    assert r.metrics["scenario"] == "transfer"
    assert tuple(r.poisons.x.shape[1:]) == tuple(digits_small.x_train.shape[1:]) == (1, 8, 8)
    assert r.metrics["poison_stats"]["linf_to_base"]["max"] > 0  # the poisons moved, at 8x8
