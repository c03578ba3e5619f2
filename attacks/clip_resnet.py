"""CLIP's image tower for ResNets ("ModifiedResNet"), so that OpenAI / open_clip RN50-style
checkpoints load with their own parameter names.

Radford et al., *Learning Transferable Visual Models From Natural Language Supervision*
(ICML 2021), section 2.4: a ResNet with a 3-convolution stem and an average pool instead of
the max-pool, anti-aliased strided convolutions (an average pool before the stride-1
convolution of each strided block and its shortcut), and attention pooling: one
multi-head attention query (the mean of the last feature map, with a learned positional
embedding) in place of global average pooling. The output of the attention pool is the
image embedding CLIP projects into its joint space, and the feature this module returns.

Shapes (``CLIP_SHAPES``): name -> (blocks per stage, width, output dim, heads, input size).
Input ``(N, 3, S, S)`` with S the input size the positional embedding was made for;
output ``(N, output_dim)``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CLIP_SHAPES", "ModifiedResNet", "build_clip_resnet"]

CLIP_SHAPES: dict[str, tuple[tuple[int, int, int, int], int, int, int, int]] = {
    "clip_rn50": ((3, 4, 6, 3), 64, 1024, 32, 224),
    "clip_rn101": ((3, 4, 23, 3), 64, 512, 32, 224),
    "clip_rn50x4": ((4, 6, 10, 6), 80, 640, 40, 288),
}


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != out:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, out, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(out)),
            ]))

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(self.avgpool(y)))
        return self.relu3(y + (x if self.downsample is None else self.downsample(x)))


class _AttentionPool2d(nn.Module):
    def __init__(self, spatial: int, embed_dim: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial * spatial + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.flatten(2).permute(2, 0, 1)  # (HW, N, C)
        tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens], dim=0)
        if tokens.shape[0] != self.positional_embedding.shape[0]:
            raise ValueError(f"attention pooling was made for {self.positional_embedding.shape[0] - 1} positions, "
                             f"got {tokens.shape[0] - 1}: feed the input size the encoder was trained at")
        tokens = tokens + self.positional_embedding[:, None, :].to(tokens.dtype)
        out, _ = F.multi_head_attention_forward(
            query=tokens[:1], key=tokens, value=tokens, embed_dim_to_check=tokens.shape[-1], num_heads=self.heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias, use_separate_proj_weight=True, training=self.training, need_weights=False,
        )
        return out.squeeze(0)


class ModifiedResNet(nn.Module):
    """CLIP's ResNet image tower; parameter names as OpenAI's ``visual.*`` (without the prefix)."""

    def __init__(self, layers: tuple[int, int, int, int], width: int, output_dim: int, heads: int,
                 input_size: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._stage(width, layers[0])
        self.layer2 = self._stage(width * 2, layers[1], stride=2)
        self.layer3 = self._stage(width * 4, layers[2], stride=2)
        self.layer4 = self._stage(width * 8, layers[3], stride=2)
        self.attnpool = _AttentionPool2d(input_size // 32, width * 32, heads, output_dim)
        self.out_dim = output_dim

    def _stage(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        mods = [_Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * _Bottleneck.expansion
        mods += [_Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


def build_clip_resnet(arch: str, in_channels: int = 3) -> ModifiedResNet:
    layers, width, output_dim, heads, size = CLIP_SHAPES[arch]
    return ModifiedResNet(layers, width, output_dim, heads, size, in_channels)
