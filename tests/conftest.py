"""Shared fixtures: tiny real encoders and data for fast tests, and one SimCLR
encoder pre-trained once per session for the paper-claim tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def digits_small():
    from attacks.data import load_dataset

    return load_dataset("digits", max_train=300, max_test=120)


@pytest.fixture(scope="session")
def tiny_encoder():
    """A small_cnn with random weights: real code path, seconds to run."""
    from attacks.encoders import EncoderSpec, build_encoder, freeze

    torch.manual_seed(0)
    return freeze(build_encoder(EncoderSpec(arch="small_cnn", in_channels=1, width=8)))


@pytest.fixture(scope="session")
def tiny_encoder_dir(tiny_encoder, tmp_path_factory) -> Path:
    from attacks.encoders import save_encoder

    d = tmp_path_factory.mktemp("tiny_encoder")
    save_encoder(tiny_encoder, d)
    return d


@pytest.fixture(scope="session")
def mnist5k():
    from attacks.data import load_dataset

    return load_dataset("mnist5k")


@pytest.fixture(scope="session")
def simclr_mnist(mnist5k, tmp_path_factory):
    """The project's own SimCLR small_cnn on mnist5k (seed 0), pre-trained once per session."""
    from attacks.encoders import EncoderSpec, save_encoder
    from attacks.pretrain import SimCLRConfig, pretrain_simclr

    enc = pretrain_simclr(EncoderSpec(arch="small_cnn", in_channels=1), mnist5k.x_train, SimCLRConfig(epochs=1, batch_size=128, seed=0, device="cpu"))
    d = tmp_path_factory.mktemp("simclr_mnist")
    save_encoder(enc, d)
    return enc


@pytest.fixture(scope="module")
def one_thread():
    """Small ops run as fast on one thread on an idle machine, and are immune to OpenMP spin-waits
    on a shared one; use as ``pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits():
    """The real sklearn digits split (1,437 train / 360 test 8x8 images), for the claims tests."""
    from attacks.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def simclr_digits(digits):
    """The claims tests' encoder: small_cnn (width 16), SimCLR 2 epochs, seed 0, on digits;
    pre-trained on one thread so that its bits do not depend on the machine's thread count."""
    from attacks.encoders import EncoderSpec
    from attacks.pretrain import SimCLRConfig, pretrain_simclr

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = EncoderSpec(arch="small_cnn", in_channels=1, width=16)
        return pretrain_simclr(spec, digits.x_train, SimCLRConfig(epochs=2, batch_size=128, seed=0, device="cpu"))
    finally:
        torch.set_num_threads(before)
