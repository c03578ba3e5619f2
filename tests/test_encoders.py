"""attacks.encoders: building, preprocessing, fingerprints, save/load and untrusted checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attacks.encoders import (
    ARCHITECTURES,
    META_FILE,
    WEIGHTS_FILE,
    Encoder,
    EncoderError,
    EncoderSpec,
    build_encoder,
    freeze,
    load_encoder,
    load_state_dict_file,
    normalize_state_dict,
    save_encoder,
)

REPO = Path(__file__).resolve().parents[1]


def _encoder(spec: EncoderSpec, seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    return build_encoder(spec)


@pytest.fixture(scope="module")
def small() -> Encoder:
    """A tiny small_cnn whose BatchNorm statistics are not the defaults."""
    enc = _encoder(EncoderSpec("small_cnn", in_channels=1, width=8))
    with torch.no_grad():
        enc.train()(torch.rand(16, 1, 12, 12))  # move the running stats off 0/1
    return freeze(enc)


def _sd(enc: Encoder) -> dict[str, torch.Tensor]:
    """The backbone's state dict as contiguous copies (small_cnn keeps conv weights channels_last)."""
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in enc.backbone.state_dict().items()}


def _small_spec() -> EncoderSpec:
    return EncoderSpec("small_cnn", in_channels=1, width=8)


# --------------------------------------------------------------------------- building


# (arch, spec kwargs, input shape, feature_dim, parameter count of torchvision's model minus its head)
BUILDS = [
    ("small_cnn", dict(in_channels=1), (2, 1, 28, 28), 128, None),
    ("resnet18", dict(cifar_stem=True), (2, 3, 32, 32), 512, 11_176_512 - 64 * 3 * (49 - 9)),  # 3x3 stem
    ("resnet50", dict(), (1, 3, 32, 32), 2048, 23_508_032),
    ("vit_b_16", dict(input_size=224), (1, 3, 32, 32), 768, 85_798_656),  # one image: slow on CPU
    # CLIP's image towers: open_clip's visual parameter counts (their features are compared with
    # open_clip's own in tests/test_encoders_published.py)
    ("clip_rn50", dict(preprocessing="clip"), (1, 3, 32, 32), 1024, 38_316_896),
    ("clip_rn101", dict(input_size=224), (1, 3, 32, 32), 512, 56_259_936),
    ("clip_rn50x4", dict(input_size=288), (1, 3, 32, 32), 640, 87_137_080),
]


@pytest.fixture(scope="module")
def vit() -> Encoder:
    return freeze(_encoder(EncoderSpec("vit_b_16", input_size=224)))


def test_builds_cover_every_architecture():
    assert {b[0] for b in BUILDS} == set(ARCHITECTURES)


@pytest.mark.parametrize(("arch", "kwargs", "shape", "dim", "n_params"), BUILDS, ids=[b[0] for b in BUILDS])
def test_build_forward_is_differentiable(request, arch, kwargs, shape, dim, n_params):
    enc = request.getfixturevalue("vit") if arch == "vit_b_16" else freeze(_encoder(EncoderSpec(arch, **kwargs)))
    assert enc.feature_dim == dim and enc.spec.feature_dim == dim
    if n_params is not None:
        assert sum(p.numel() for p in enc.parameters()) == n_params
    x = torch.rand(shape, requires_grad=True)
    feats = enc(x)
    assert feats.shape == (shape[0], dim) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()
    (grad,) = torch.autograd.grad(feats.square().sum(), x)
    assert grad.shape == x.shape and grad.abs().sum() > 0


def test_small_cnn_widths_and_tiny_inputs():
    enc = freeze(_encoder(EncoderSpec("small_cnn", in_channels=1, width=16)))
    assert enc.feature_dim == 32
    for side in (8, 3, 1):  # pooling never goes below 1x1
        assert enc(torch.rand(2, 1, side, side)).shape == (2, 32)


def test_forward_with_skips_matches_forward():
    enc = freeze(_encoder(EncoderSpec("small_cnn", in_channels=1)))
    x = torch.rand(2, 1, 28, 28)
    feats, skips = enc.forward_with_skips(x)
    assert [tuple(s.shape) for s in skips] == [(2, 64, 28, 28), (2, 128, 14, 14), (2, 128, 7, 7)]
    torch.testing.assert_close(feats, enc(x))

    res = freeze(_encoder(EncoderSpec("resnet18", cifar_stem=True)))
    x = torch.rand(1, 3, 32, 32)
    feats, skips = res.forward_with_skips(x)
    assert [tuple(s.shape) for s in skips] == [
        (1, 64, 32, 32), (1, 64, 32, 32), (1, 128, 16, 16), (1, 256, 8, 8), (1, 512, 4, 4)
    ]
    torch.testing.assert_close(feats, res(x))


def test_forward_with_skips_refused_for_vit(vit):
    with pytest.raises(EncoderError, match="not supported"):
        vit.forward_with_skips(torch.rand(1, 3, 224, 224))


# --------------------------------------------------------------------------- preprocessing


def test_resize_digits_into_28px_small_cnn():
    enc = freeze(_encoder(EncoderSpec("small_cnn", in_channels=1, input_size=28, mean=(0.5,), std=(0.25,))))
    x = torch.rand(3, 1, 8, 8)
    pre = enc.preprocess(x)
    expected = (F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=False) - 0.5) / 0.25
    assert pre.shape == (3, 1, 28, 28)
    torch.testing.assert_close(pre, expected)
    torch.testing.assert_close(enc(x), enc.backbone(expected))


def test_resize_and_channel_adapt_into_cifar_resnet():
    enc = freeze(_encoder(EncoderSpec("resnet18", input_size=32, cifar_stem=True)))
    x = torch.rand(2, 1, 28, 28)
    pre = enc.preprocess(x)
    assert pre.shape == (2, 3, 32, 32)
    torch.testing.assert_close(pre, F.interpolate(x, size=(32, 32), mode="bilinear").repeat(1, 3, 1, 1))
    same = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(enc.preprocess(same), same)  # sizes match: no resize


def test_channel_adapt_and_per_channel_normalisation():
    rgb = freeze(_encoder(EncoderSpec("small_cnn", in_channels=3, width=4, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))))
    grey = torch.rand(2, 1, 6, 6)
    expected = (grey.repeat(1, 3, 1, 1) - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.5, 0.25, 2.0]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(rgb.preprocess(grey), expected)

    mono = freeze(_encoder(EncoderSpec("small_cnn", in_channels=1, width=4)))
    colour = torch.rand(2, 3, 6, 6)
    torch.testing.assert_close(mono.preprocess(colour), colour.mean(1, keepdim=True))

    with pytest.raises(EncoderError, match="2 channels"):
        rgb(torch.rand(1, 2, 6, 6))
    with pytest.raises(EncoderError, match="float"):
        mono(torch.zeros(1, 1, 6, 6, dtype=torch.uint8))
    with pytest.raises(EncoderError, match=r"\(N, C, H, W\)"):
        mono(torch.rand(1, 6, 6))


# --------------------------------------------------------------------------- the spec


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(arch="alexnet"), "small_cnn, resnet18, resnet50, vit_b_16"),
        (dict(arch="vit_b_16", input_size=32), "224"),
        (dict(arch="vit_b_16"), "224"),
        (dict(arch="small_cnn", in_channels=0), "in_channels"),
        (dict(arch="small_cnn", input_size=0), "input_size"),
        (dict(arch="small_cnn", mean=(0.1, 0.2)), "mean has 2 values"),
        (dict(arch="small_cnn", std=(0.0,)), "std must be > 0"),
        (dict(arch="small_cnn", std=(float("nan"),)), "std"),
        (dict(arch="small_cnn", cifar_stem=True), "cifar_stem"),
        (dict(arch="resnet18", cifar_stem=1), "cifar_stem must be a bool"),
        (dict(arch="small_cnn", width=0), "width"),
        (dict(arch="small_cnn", width=True), "width"),
        (dict(arch="small_cnn", feature_dim=-1), "feature_dim"),
    ],
)
def test_bad_spec_fields_raise(kwargs, match):
    with pytest.raises(EncoderError, match=match):
        EncoderSpec(**kwargs)


def test_spec_json_round_trip_and_validation():
    spec = EncoderSpec("resnet18", in_channels=1, input_size=32, mean=(0.5,), std=(0.2,), cifar_stem=True)
    data = json.loads(json.dumps(spec.to_json()))
    assert EncoderSpec.from_json(data) == spec
    with pytest.raises(EncoderError, match="unexpected encoder spec fields \\['depth'\\]"):
        EncoderSpec.from_json({**data, "depth": 3})
    with pytest.raises(EncoderError, match="missing 'arch'"):
        EncoderSpec.from_json({"in_channels": 3})
    with pytest.raises(EncoderError, match="JSON object"):
        EncoderSpec.from_json(["resnet18"])


def test_build_rejects_a_wrong_feature_dim():
    with pytest.raises(EncoderError, match="feature_dim=100 but small_cnn produces 128"):
        build_encoder(EncoderSpec("small_cnn", feature_dim=100))


def test_freeze():
    enc = freeze(_encoder(_small_spec()))
    assert not enc.training and not enc.backbone.training
    assert not any(p.requires_grad for p in enc.parameters())
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    enc(x).sum().backward()  # still differentiable w.r.t. the input
    assert x.grad is not None and all(p.grad is None for p in enc.parameters())


# --------------------------------------------------------------------------- fingerprint, save, load


def test_save_load_round_trip(small, tmp_path):
    out = save_encoder(small, tmp_path / "enc")
    assert {p.name for p in out.iterdir()} == {WEIGHTS_FILE, META_FILE}
    meta = json.loads((out / META_FILE).read_text())
    assert meta["fingerprint"] == small.fingerprint() and meta["format_version"] == 1
    loaded = load_encoder(out)
    assert loaded.spec == small.spec and loaded.fingerprint() == small.fingerprint()
    assert not loaded.training
    x = torch.rand(4, 1, 12, 12)
    assert torch.equal(loaded(x), small(x))
    # the weights file alone, beside its encoder.json, loads the same
    assert load_encoder(out / WEIGHTS_FILE).fingerprint() == small.fingerprint()


def test_fingerprint_is_stable_across_processes(small, tmp_path):
    out = save_encoder(small, tmp_path / "enc")
    code = f"from attacks.encoders import load_encoder; print(load_encoder({str(out)!r}).fingerprint())"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == small.fingerprint()


def test_fingerprint_changes_with_weights_and_spec(small):
    other = _encoder(_small_spec())
    other.backbone.load_state_dict(_sd(small))
    assert other.fingerprint() == small.fingerprint()
    with torch.no_grad():
        other.backbone.blocks[1][0].weight[0, 0, 0, 0] += 1e-3
    assert other.fingerprint() != small.fingerprint()
    renormed = Encoder(EncoderSpec("small_cnn", in_channels=1, width=8, mean=(0.5,), feature_dim=16), small.backbone)
    assert renormed.fingerprint() != small.fingerprint()


def test_load_detects_altered_weights(small, tmp_path):
    out = save_encoder(small, tmp_path / "enc")
    meta = json.loads((out / META_FILE).read_text())
    meta["fingerprint"] = "0" * 64
    (out / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(EncoderError, match="fingerprint"):
        load_encoder(out)


def test_load_directory_spec_must_agree(small, tmp_path):
    out = save_encoder(small, tmp_path / "enc")
    assert load_encoder(out, _small_spec()).fingerprint() == small.fingerprint()
    with pytest.raises(EncoderError, match="disagrees"):
        load_encoder(out, EncoderSpec("small_cnn", in_channels=1, width=16))


def test_bare_file_needs_a_spec(small, tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save(_sd(small), path)
    with pytest.raises(EncoderError, match="pass spec="):
        load_encoder(path)


# --------------------------------------------------------------------------- untrusted checkpoints


def _prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


CHECKPOINT_STYLES = {
    "raw": lambda sd: sd,
    "module": lambda sd: _prefixed(sd, "module."),
    "encoder": lambda sd: _prefixed(sd, "encoder."),
    "backbone+projector": lambda sd: {
        **_prefixed(sd, "backbone."),
        "projector.0.weight": torch.zeros(4, 16),
        "projector.0.bias": torch.zeros(4),
    },
    "model": lambda sd: _prefixed(sd, "model."),
    "wrapped state_dict": lambda sd: {"state_dict": _prefixed(sd, "module."), "epoch": 7, "arch": "small_cnn"},
    "wrapped model.encoder": lambda sd: {"model": {"encoder": sd}},
    "simclr": lambda sd: {
        **_prefixed(sd, "encoder."),
        "projection_head.0.weight": torch.zeros(16, 16),
        "head.weight": torch.zeros(3, 3),
    },
    "ddp+byol": lambda sd: {
        **_prefixed(sd, "module.backbone."),
        "module.projector.0.weight": torch.zeros(4, 16),
        "module.predictor.0.weight": torch.zeros(4, 4),
    },
}


FLAT_STYLES = [s for s in sorted(CHECKPOINT_STYLES) if not s.startswith("wrapped")]  # safetensors is flat


@pytest.mark.parametrize(
    ("style", "suffix"),
    [(s, ".pth") for s in sorted(CHECKPOINT_STYLES)] + [(s, ".safetensors") for s in FLAT_STYLES],
)
def test_checkpoint_prefix_styles_load(small, tmp_path, style, suffix):
    ckpt = CHECKPOINT_STYLES[style](_sd(small))
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(ckpt, str(path))
    else:
        torch.save(ckpt, path)
    loaded = load_encoder(path, _small_spec())
    assert loaded.fingerprint() == small.fingerprint()


def test_moco_v3_resnet_checkpoint_loads(tmp_path):
    """module.base_encoder.* with an fc projector, plus module.momentum_encoder.* and module.predictor.*."""
    spec = EncoderSpec("resnet18", cifar_stem=True)
    source = freeze(_encoder(spec, seed=1))
    sd = _sd(source)
    ckpt = {
        **_prefixed(sd, "module.base_encoder."),
        **_prefixed(sd, "module.momentum_encoder."),
        "module.base_encoder.fc.0.weight": torch.zeros(8, 512),
        "module.base_encoder.fc.1.running_mean": torch.zeros(8),
        "module.momentum_encoder.fc.0.weight": torch.zeros(8, 512),
        "module.predictor.0.weight": torch.zeros(8, 8),
    }
    path = tmp_path / "moco_v3.pth.tar"
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": ckpt, "optimizer": {"lr": 0.1}}, path)
    loaded = load_encoder(path, spec)
    assert loaded.fingerprint() == source.fingerprint()
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(loaded(x), source(x))


def test_sequential_simclr_resnet_checkpoint_loads_with_the_same_features(tmp_path):
    """SimCLR kept as nn.Sequential children (leftthomas/SimCLR: ``f`` = resnet18's children
    without fc and max-pool, 3x3 stem; projection head ``g``): ``f.N.*`` are renamed to
    torchvision's names and the features equal ``f(x)`` flattened."""
    import torchvision

    torch.manual_seed(3)
    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    f = torch.nn.Sequential(*[m for n, m in net.named_children() if n not in ("fc", "maxpool")])
    g = torch.nn.Sequential(torch.nn.Linear(512, 512, bias=False), torch.nn.BatchNorm1d(512), torch.nn.ReLU(),
                            torch.nn.Linear(512, 128))
    model = torch.nn.Module()
    model.f, model.g = f, g
    with torch.no_grad():
        f.train()(torch.rand(8, 3, 32, 32))  # running stats off their defaults
    f.eval()
    path = tmp_path / "128_0.5_200_512_500_model.pth"
    torch.save(model.state_dict(), path)
    loaded = load_encoder(path, EncoderSpec("resnet18", cifar_stem=True))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), torch.flatten(f(x), 1), atol=1e-5)
    assert loaded.feature_dim == 512


def test_key_map_renames_literal_prefixes(small, tmp_path):
    path = tmp_path / "trunk.pt"
    torch.save({f"trunk.net.{k}": v for k, v in _sd(small).items()}, path)
    with pytest.raises(EncoderError, match="missing keys"):
        load_encoder(path, _small_spec())
    spec = EncoderSpec("small_cnn", in_channels=1, width=8, key_map=[["trunk.net.", ""]])
    loaded = load_encoder(path, spec)
    x = torch.rand(2, 1, 12, 12)
    assert torch.equal(loaded(x), small(x))
    assert spec.to_json()["key_map"] == [["trunk.net.", ""]] and EncoderSpec.from_json(spec.to_json()) == spec
    for bad in ([["a(b", ""]], [["", "x"]], [["a", "b", "c"]], [["x", "y"]] * 17):
        with pytest.raises(EncoderError, match="key_map"):
            EncoderSpec("small_cnn", in_channels=1, key_map=bad)
    from attacks.encoders import apply_key_map

    with pytest.raises(EncoderError, match="two keys"):
        apply_key_map({"a.w": torch.zeros(1), "b.w": torch.zeros(1)}, (("a.", "b."),))


@pytest.mark.parametrize("keys, arch, says", [
    # OpenAI / open_clip RN50 image tower: 3-conv stem, attention pooling
    ({"conv1.weight", "conv2.weight", "conv3.weight", "bn3.weight", "attnpool.c_proj.weight",
      "layer1.0.conv3.weight"}, "resnet50", "use architecture clip_rn50"),
    ({"visual.conv1.weight", "visual.attnpool.k_proj.weight", "transformer.resblocks.0.attn.in_proj_weight"},
     "resnet50", "use architecture clip_rn50"),
    # timm names vit_b_16 cannot take (layer scale): renamed ones are loaded (tests/test_encoders_published.py)
    ({"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.ls1.gamma"},
     "vit_b_16", "timm-named ViT"),
    ({"conv1.weight", "layer1.0.conv3.weight", "fc.weight"}, "resnet18", "use architecture resnet50"),
    ({"conv1.weight", "layer1.0.conv2.weight"}, "resnet50", "use architecture resnet18"),
    ({"conv_proj.weight", "encoder.layers.encoder_layer_0.ln_1.weight"}, "resnet18", "use architecture vit_b_16"),
])
def test_a_mismatch_names_the_layout_the_keys_look_like(tmp_path, keys, arch, says):
    path = tmp_path / "ckpt.pt"
    torch.save({k: torch.zeros(2, 2) for k in keys}, path)
    spec = EncoderSpec(arch, input_size=224) if arch == "vit_b_16" else EncoderSpec(arch)
    with pytest.raises(EncoderError, match="does not fit") as err:
        load_encoder(path, spec)
    assert says in str(err.value)


def test_preprocessing_presets_fill_mean_std_and_size():
    from attacks import specs

    s = EncoderSpec("resnet50", preprocessing="imagenet")
    assert s.mean == (0.485, 0.456, 0.406) and s.std == (0.229, 0.224, 0.225) and s.input_size == 224
    assert EncoderSpec.from_json(s.to_json()) == s
    c = EncoderSpec("resnet18", preprocessing="cifar10", cifar_stem=True)
    assert c.input_size is None and c.mean[0] == pytest.approx(0.4914)
    assert EncoderSpec("resnet18", preprocessing="clip", input_size=288).input_size == 288  # explicit wins
    assert EncoderSpec("resnet18", preprocessing="imagenet", mean=(0.485, 0.456, 0.406)).std[2] == 0.225
    for kw, match in ((dict(mean=(0.5, 0.5, 0.5)), "disagrees"), (dict(preprocessing="nope"), "valid choices")):
        with pytest.raises(EncoderError, match=match):
            EncoderSpec("resnet18", **{"preprocessing": "imagenet", **kw})
    with pytest.raises(EncoderError, match="3-channel"):
        EncoderSpec("small_cnn", in_channels=1, preprocessing="clip")
    # the API's torch-free model says the same (422 naming spec.preprocessing)
    with pytest.raises(ValueError, match="3-channel"):
        specs.EncoderSpec.model_validate({"arch": "small_cnn", "in_channels": 1, "preprocessing": "clip"})
    # the preset changes what the encoder sees: an ImageNet-normalised, resized input
    enc = freeze(_encoder(EncoderSpec("resnet18", preprocessing="imagenet")))
    plain = freeze(_encoder(EncoderSpec("resnet18", input_size=224)))
    x = torch.rand(1, 3, 32, 32)
    assert not torch.allclose(enc(x), plain(x))


def test_normalize_state_dict_keeps_vit_own_encoder_prefix():
    sd = {"class_token": torch.zeros(1), "conv_proj.weight": torch.zeros(1), "encoder.ln.weight": torch.zeros(1)}
    assert normalize_state_dict(sd, "vit_b_16") == sd
    wrapped = {**_prefixed(sd, "encoder."), "heads.head.weight": torch.zeros(1)}
    assert set(normalize_state_dict(wrapped, "vit_b_16")) == set(sd)


def test_missing_num_batches_tracked_is_filled(small, tmp_path):
    sd = {k: v for k, v in _sd(small).items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "no_counters.pth"
    torch.save(sd, path)
    loaded = load_encoder(path, _small_spec())
    x = torch.rand(2, 1, 12, 12)
    assert torch.equal(loaded(x), small(x))


class _Payload:
    """Unpickling this runs _mark (the full unpickler would execute it)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_mark, (self.marker,))


def _mark(marker: str) -> None:
    Path(marker).write_text("pwned")


def test_pickled_objects_are_refused_without_running(small, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _sd(small), "extra": _Payload(str(marker))}, path)
    with pytest.raises(EncoderError, match="weights-only unpickling failed"):
        load_encoder(path, _small_spec())
    with pytest.raises(EncoderError, match="not a plain tensor checkpoint"):
        load_state_dict_file(path)
    assert not marker.exists()


def test_non_tensor_entries_and_non_dicts_are_refused(tmp_path):
    path = tmp_path / "mixed.pth"
    torch.save({"conv.weight": torch.zeros(1), "epoch": 3}, path)
    with pytest.raises(EncoderError, match="not all tensors \\(epoch\\)"):
        load_state_dict_file(path)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(EncoderError, match="holds a list"):
        load_state_dict_file(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(EncoderError, match="not a plain tensor checkpoint"):
        load_state_dict_file(path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(EncoderError, match="cannot read safetensors"):
        load_state_dict_file(bad)


def test_wrong_keys_are_named(small, tmp_path):
    sd = _sd(small)
    sd["blocks.9.weight"] = torch.zeros(3)
    del sd["blocks.0.0.weight"]
    path = tmp_path / "wrong.pth"
    torch.save(sd, path)
    with pytest.raises(EncoderError) as info:
        load_encoder(path, _small_spec())
    message = str(info.value)
    assert "missing keys (1): blocks.0.0.weight" in message
    assert "unexpected keys (1): blocks.9.weight" in message


def test_shape_mismatch_and_long_lists_are_reported(small, tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(_sd(small), path)
    with pytest.raises(EncoderError) as info:
        load_encoder(path, EncoderSpec("small_cnn", in_channels=1, width=16))
    assert "shape mismatches" in str(info.value)
    assert "blocks.0.0.weight: checkpoint (8, 1, 3, 3) vs model (16, 1, 3, 3)" in str(info.value)
    with pytest.raises(EncoderError) as info:
        load_encoder(path, EncoderSpec("resnet18"))
    message = str(info.value)
    assert "missing keys (" in message and "more" in message and "unexpected keys (" in message


def test_oversized_files_are_refused_before_reading(small, tmp_path, monkeypatch):
    import safetensors.torch

    def must_not_read(*args, **kwargs):
        raise AssertionError("the file was read")

    pth, st = tmp_path / "big.pth", tmp_path / "big.safetensors"
    torch.save(_sd(small), pth)
    safetensors.torch.save_file(_sd(small), str(st))
    monkeypatch.setattr(torch, "load", must_not_read)
    monkeypatch.setattr(safetensors.torch, "load_file", must_not_read)
    for path in (pth, st):
        with pytest.raises(EncoderError, match="over the limit of 1000"):
            load_encoder(path, _small_spec(), max_bytes=1000)
        with pytest.raises(EncoderError, match="over the limit"):
            load_state_dict_file(path, max_bytes=1000)
    out = save_encoder(small, tmp_path / "enc")
    with pytest.raises(EncoderError, match="over the limit"):
        load_encoder(out, max_bytes=1000)


def test_torchscript_refused_unless_allowed(small, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated but still the format users upload
        scripted = torch.jit.script(small.backbone)
    path = tmp_path / "scripted.pt"
    scripted.save(str(path))
    with pytest.raises(EncoderError, match="allow_torchscript=True"):
        load_encoder(path, _small_spec())
    with pytest.raises(EncoderError, match="TorchScript"):
        load_state_dict_file(path)

    spec = EncoderSpec("small_cnn", in_channels=1, width=8, input_size=12)
    loaded = load_encoder(path, spec, allow_torchscript=True)
    assert isinstance(loaded.backbone, torch.jit.ScriptModule) and loaded.feature_dim == 16
    x = torch.rand(3, 1, 12, 12)
    torch.testing.assert_close(loaded(x), small(x))
    with pytest.raises(EncoderError, match="not supported"):
        loaded.forward_with_skips(x)
    with pytest.raises(EncoderError, match="input_size .* or spec.feature_dim"):
        load_encoder(path, _small_spec(), allow_torchscript=True)
