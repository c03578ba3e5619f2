"""attacks.specs: the torch-free, bounded models of an encoder spec and a SimCLR config."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from attacks import specs

REPO = Path(__file__).resolve().parents[1]


def test_imports_no_torch():
    code = "import attacks.specs, sys; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr


def test_field_names_and_defaults_are_the_engines():
    from attacks.encoders import EncoderSpec
    from attacks.pretrain import SimCLRConfig

    for dc, model, required in ((SimCLRConfig, specs.SimCLRConfig, {}), (EncoderSpec, specs.EncoderSpec, {"arch": "small_cnn"})):
        names = [f.name for f in dataclasses.fields(dc)]
        assert names == list(model.model_fields)
        engine = dataclasses.asdict(dc(**required))
        assert {k: (tuple(v) if isinstance(v, list) else v) for k, v in engine.items()} == model(**required).model_dump()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(epochs=10**12), "epochs"),
        (dict(epochs=1e12), "epochs"),
        (dict(epochs=True), "epochs"),
        (dict(epochs="3"), "epochs"),
        (dict(batch_size=10**9), "batch_size"),
        (dict(lr=1e9), "lr"),
        (dict(lr=float("inf")), "lr"),
        (dict(proj_dim=10**6), "proj_dim"),
        (dict(crop_scale=(0.9, 0.1)), "crop_scale"),
        (dict(device="x" * 1_500_000), "device"),
        (dict(junk="x"), "junk"),
    ],
)
def test_simclr_config_bounds(kwargs, field):
    with pytest.raises(ValidationError) as err:
        specs.SimCLRConfig(**kwargs)
    assert err.value.errors()[0]["loc"][0] == field


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(arch="lenet"), "arch"),
        (dict(arch="small_cnn", width=10**9), "width"),
        (dict(arch="small_cnn", width=1e9), "width"),
        (dict(arch="small_cnn", in_channels=10**6), "in_channels"),
        (dict(arch="small_cnn", in_channels=2), "in_channels"),
        (dict(arch="small_cnn", input_size=10**6), "input_size"),
        (dict(arch="vit_b_16"), "input_size"),
        (dict(arch="small_cnn", mean=[0.0] * 100_000), "mean"),
        (dict(arch="small_cnn", in_channels=3, mean=[0.1, 0.2]), "mean"),
        (dict(arch="small_cnn", std=[0.0]), "std"),
        (dict(arch="small_cnn", cifar_stem=True), "cifar_stem"),
        (dict(arch="small_cnn", feature_dim=10**9), "feature_dim"),
        (dict(arch="small_cnn", depth=50), "depth"),
    ],
)
def test_encoder_spec_bounds(kwargs, field):
    with pytest.raises(ValidationError) as err:
        specs.EncoderSpec(**kwargs)
    assert err.value.errors()[0]["loc"][0] == field


def test_the_engines_dataclasses_enforce_the_bounds():
    from attacks.encoders import EncoderError, EncoderSpec
    from attacks.pretrain import SimCLRConfig

    with pytest.raises(ValueError, match="epochs"):
        SimCLRConfig(epochs=10**12)
    with pytest.raises(EncoderError, match="width"):
        EncoderSpec("small_cnn", width=10**9)
    with pytest.raises(EncoderError, match="in_channels"):
        EncoderSpec("small_cnn", in_channels=10**6)
    assert EncoderSpec("small_cnn", in_channels=1, width=8, mean=[0.5], std=[0.25]).mean == (0.5,)
    assert SimCLRConfig(crop_scale=[0.2, 1]).crop_scale == (0.2, 1.0)
