"""Checkpoints saved as their publishers save them (random weights, built with the publishers'
own libraries, never downloaded) load into the engine's architectures and give the same
features as the library's own model (issue #15): timm-named ViT-B/16 (MoCo v3, DINO, timm),
CLIP's ModifiedResNet RN50 (a whole open_clip / OpenAI state dict, text tower included)."""

from __future__ import annotations

import pytest
import torch

from attacks.encoders import EncoderError, EncoderSpec, load_encoder, save_encoder

CLIP_MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
CLIP_STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def timm_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()


@pytest.fixture(scope="module")
def clip_rn50():
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model("RN50", pretrained=None).eval()


@pytest.mark.parametrize("layout", ["timm", "moco_v3", "dino"])
def test_timm_named_vit_b16_gives_the_librarys_features(timm_vit, tmp_path, layout):
    sd = timm_vit.state_dict()
    head = {"head.weight": torch.zeros(10, 768), "head.bias": torch.zeros(10)}
    if layout == "timm":
        ckpt = {**sd, **head}
    elif layout == "moco_v3":  # main_moco.py: module.base_encoder / momentum_encoder / predictor, with optimizer
        ckpt = {"epoch": 300, "arch": "vit_base", "optimizer": {"state": {}},
                "state_dict": {**{f"module.base_encoder.{k}": v for k, v in {**sd, **head}.items()},
                               **{f"module.momentum_encoder.{k}": v for k, v in sd.items()},
                               "module.predictor.0.weight": torch.zeros(8, 8)}}
    else:  # DINO: student and teacher, each backbone.* plus a DINOHead head.*
        ckpt = {"student": {f"module.backbone.{k}": v for k, v in sd.items()},
                "teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, "head.mlp.0.weight": torch.zeros(8, 768)},
                "epoch": 100}
    path = tmp_path / "vit.pth"
    torch.save(ckpt, path)
    enc = load_encoder(path, EncoderSpec("vit_b_16", preprocessing="imagenet")).eval()
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        mean, std = torch.tensor(enc.spec.mean).view(1, 3, 1, 1), torch.tensor(enc.spec.std).view(1, 3, 1, 1)
        ours, theirs = enc(x), timm_vit((x - mean) / std)
    assert enc.feature_dim == 768 and ours.shape == (2, 768)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (ours - theirs).abs().max()


def test_a_timm_vit_with_parts_torchvisions_lacks_is_refused_with_the_reason(timm_vit, tmp_path):
    sd = {**timm_vit.state_dict(), "blocks.0.ls1.gamma": torch.ones(768)}  # layer scale (DINOv2, CaiT)
    torch.save(sd, tmp_path / "ls.pth")
    with pytest.raises(EncoderError, match="layer scale"):
        load_encoder(tmp_path / "ls.pth", EncoderSpec("vit_b_16", input_size=224))


def test_clip_rn50_from_a_whole_clip_state_dict_gives_encode_image(clip_rn50, tmp_path):
    sd = clip_rn50.state_dict()
    assert any(k.startswith("transformer.") for k in sd) and any(k.startswith("visual.attnpool.") for k in sd)
    path = tmp_path / "RN50.pt"
    torch.save(sd, path)
    enc = load_encoder(path, EncoderSpec("clip_rn50", preprocessing="clip")).eval()
    assert enc.spec.input_size == 224 and enc.feature_dim == 1024
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        ours, theirs = enc(x), clip_rn50.encode_image((x - CLIP_MEAN) / CLIP_STD)
    scale = theirs.abs().max()
    assert ours.shape == (2, 1024) and torch.allclose(ours, theirs, atol=1e-5 * float(scale), rtol=1e-4)
    # the image tower alone (visual.* stripped, as open_clip saves model.visual) and a save/load round trip
    torch.save({k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}, tmp_path / "visual.pt")
    alone = load_encoder(tmp_path / "visual.pt", EncoderSpec("clip_rn50", preprocessing="clip"))
    d = tmp_path / "saved"
    save_encoder(alone, d)
    again = load_encoder(d)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), alone.eval()(x)) and torch.allclose(again(x), ours, atol=1e-6)
    # a smaller input than the positional embedding's is resized by the preset, not refused
    with torch.no_grad():
        assert enc(torch.rand(1, 3, 32, 32)).shape == (1, 1024)


def test_clip_rn50_as_a_torchvision_resnet_names_the_architecture(clip_rn50, tmp_path):
    torch.save(clip_rn50.state_dict(), tmp_path / "RN50.pt")
    with pytest.raises(EncoderError, match="use architecture clip_rn50"):
        load_encoder(tmp_path / "RN50.pt", EncoderSpec("resnet50"))
