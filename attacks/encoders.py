"""Frozen feature extractors: building, preprocessing, fingerprints and safe checkpoint loading.

An :class:`Encoder` maps images in the *dataset's own pixel space* (``(N, C, H, W)``
floats, nominally in ``[0, 1]``) to features ``(N, d)``. Everything that adapts
the data to the backbone lives inside :meth:`Encoder.preprocess` and is
differentiable, so poisons are optimised in pixel space whatever the backbone
expects (ATTACKS.md, "Setting and notation"):

1. channel adapt: 1 -> ``in_channels`` by repeat, many -> 1 by the channel mean;
2. bilinear resize to ``input_size`` (``antialias=False``, ``align_corners=False``)
   when the sizes differ;
3. ``(x - mean) / std`` per channel.

Backbones (random init; seeding is the caller's job):

* ``small_cnn``: three conv3x3-BN-ReLU blocks of widths ``width, 2*width, 2*width``,
  a 2x2 max-pool (ceil mode, so never below 1x1) after blocks 1 and 2, global
  average pool. ``feature_dim = 2 * width``.
* ``resnet18`` / ``resnet50``: torchvision's, ``fc`` replaced by ``Identity``;
  ``cifar_stem`` swaps ``conv1`` for a 3x3 stride-1 conv and drops the max-pool.
* ``vit_b_16``: torchvision's, ``heads`` replaced by ``Identity``; input 224 only.

Checkpoints are untrusted input. :func:`load_state_dict_file` reads
``.safetensors`` with safetensors and anything else with
``torch.load(weights_only=True)`` (never the full unpickler), refuses files over
``max_bytes`` before reading a byte, unwraps the usual ``{"state_dict": ...}``
containers and requires every value to be a tensor. :func:`load_encoder` then
strips self-supervised prefixes and heads (see :func:`normalize_state_dict`) and
loads strictly.

TorchScript trust decision: ``torch.jit.load`` does not unpickle arbitrary
Python objects, but it does *execute the archive's TorchScript code*, which can
read and write files (``torch.save``/``open`` are scriptable) and allocate
without bound. A TorchScript archive is therefore refused unless the caller
passes ``allow_torchscript=True``, which should only be done for archives from
a trusted source (e.g. an operator, never an anonymous upload).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor, nn

from attacks import specs
from attacks.catalogue import ARCHITECTURES, FIXED_INPUT_SIZE
from attacks.clip_resnet import CLIP_SHAPES, build_clip_resnet

__all__ = [
    "ARCHITECTURES",
    "feature_dim_of",
    "EncoderError",
    "EncoderSpec",
    "Encoder",
    "build_encoder",
    "freeze",
    "place",
    "save_encoder",
    "load_encoder",
    "load_state_dict_file",
    "normalize_state_dict",
    "apply_key_map",
    "layout_hint",
    "is_torchscript_archive",
    "WEIGHTS_FILE",
    "META_FILE",
    "FORMAT_VERSION",
]

_CLIPS = tuple(CLIP_SHAPES)
_RESNETS = ("resnet18", "resnet50")
_RESNET_DIMS = {"resnet18": 512, "resnet50": 2048}
VIT_INPUT_SIZE = FIXED_INPUT_SIZE["vit_b_16"]

WEIGHTS_FILE = "encoder.safetensors"
META_FILE = "encoder.json"
FORMAT_VERSION = 1
_META_MAX_BYTES = 1024 * 1024
_DEFAULT_MAX_BYTES = 2 * 1024**3

# Containers a checkpoint may wrap its state dict in, in order of preference.
_WRAPPER_KEYS = ("state_dict", "model", "teacher", "encoder", "backbone", "net")  # DINO: the teacher, as released
# Prefixes stripped (repeatedly) while *every* key carries them.
_STRIP_PREFIXES = ("module.", "base_encoder.", "encoder.", "backbone.", "model.")
# Top-level modules dropped: momentum copies and projection/prediction heads.
_DROP_ALWAYS = ("momentum_encoder", "projector", "projection_head", "head", "predictor")
_DROP_BY_ARCH = {"small_cnn": ("fc",), "resnet18": ("fc",), "resnet50": ("fc",), "vit_b_16": ("heads",),
                 **{a: () for a in CLIP_SHAPES}}
_LIST_LIMIT = 10


class EncoderError(ValueError):
    """Every user-facing encoder failure: bad spec, bad input, bad or unsafe checkpoint."""


def feature_dim_of(spec: "EncoderSpec") -> int:
    """The backbone output dimension a spec implies."""
    if spec.arch == "small_cnn":
        return 2 * spec.width
    if spec.arch in _RESNETS:
        return _RESNET_DIMS[spec.arch]
    if spec.arch in CLIP_SHAPES:
        return CLIP_SHAPES[spec.arch][2]
    return 768


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class EncoderSpec:
    """What to build and how to feed it. Validated on construction (EncoderError), also
    through the torch-free :class:`attacks.specs.EncoderSpec` (its bounds: in_channels 1 or 3,
    width <= 1024, input_size <= 1024, ...).

    arch: one of :data:`ARCHITECTURES`.
    in_channels: channels the backbone expects (>= 1).
    input_size: square side the backbone expects; None keeps the data's own size.
        ``vit_b_16`` needs 224.
    mean, std: per-channel normalisation after resize; length 1 broadcasts,
        otherwise length ``in_channels``; std > 0.
    cifar_stem: resnets only: 3x3 stride-1 ``conv1`` and no max-pool.
    width: small_cnn base width (>= 1).
    feature_dim: backbone output dim, filled in by :func:`build_encoder`.
    """

    arch: str
    in_channels: int = 3
    input_size: int | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    cifar_stem: bool = False
    width: int = 64
    feature_dim: int | None = None
    preprocessing: str | None = None
    key_map: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise EncoderError(f"unknown arch {self.arch!r}; valid choices: {', '.join(ARCHITECTURES)}")
        if self.preprocessing is not None:
            self._apply_preset()
        if isinstance(self.key_map, (list, tuple)):
            object.__setattr__(self, "key_map", tuple(tuple(p) if isinstance(p, (list, tuple)) else p
                                                      for p in self.key_map))
        if not _is_int(self.in_channels) or self.in_channels < 1:
            raise EncoderError(f"in_channels must be a positive int, got {self.in_channels!r}")
        if self.input_size is not None and (not _is_int(self.input_size) or self.input_size < 1):
            raise EncoderError(f"input_size must be None or a positive int, got {self.input_size!r}")
        fixed = FIXED_INPUT_SIZE.get(self.arch)
        if fixed is not None and self.input_size != fixed:
            raise EncoderError(f"{self.arch} needs input_size={fixed}, got {self.input_size!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise EncoderError(f"{name} must be a sequence of numbers, got {value!r}")
            value = tuple(value)
            if not value or not all(_is_number(v) for v in value):
                raise EncoderError(f"{name} must be a non-empty sequence of finite numbers, got {value!r}")
            if len(value) not in (1, self.in_channels):
                raise EncoderError(
                    f"{name} has {len(value)} values; need 1 or in_channels={self.in_channels}"
                )
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if any(s <= 0 for s in self.std):
            raise EncoderError(f"std must be > 0, got {self.std}")
        if not isinstance(self.cifar_stem, bool):
            raise EncoderError(f"cifar_stem must be a bool, got {self.cifar_stem!r}")
        if self.cifar_stem and self.arch not in _RESNETS:
            raise EncoderError(f"cifar_stem applies to {' and '.join(_RESNETS)} only, not {self.arch}")
        if not _is_int(self.width) or self.width < 1:
            raise EncoderError(f"width must be a positive int, got {self.width!r}")
        if self.feature_dim is not None and (not _is_int(self.feature_dim) or self.feature_dim < 1):
            raise EncoderError(f"feature_dim must be None or a positive int, got {self.feature_dim!r}")
        # The bounds (in_channels 1 or 3, width <= 1024, ...) are the torch-free model's, shared with the API.
        try:
            specs.EncoderSpec.model_validate(self.to_json())
        except ValidationError as exc:
            raise EncoderError(f"invalid encoder spec: {specs.error_text(exc)}") from None

    def _apply_preset(self) -> None:
        """``preprocessing``: mean, std and input_size from :data:`attacks.specs.PRESETS` where
        they are left at their defaults; explicit values must agree with the preset."""
        if self.preprocessing not in specs.PRESETS:
            raise EncoderError(f"unknown preprocessing {self.preprocessing!r}; valid choices: {', '.join(specs.PRESETS)}")
        mean, std, size = specs.PRESETS[self.preprocessing]
        if len(mean) not in (1, self.in_channels):
            raise EncoderError(f"preprocessing {self.preprocessing!r} is for {len(mean)}-channel images, "
                               f"not in_channels={self.in_channels}")
        for name, value in (("mean", mean), ("std", std)):
            given = tuple(float(v) for v in getattr(self, name)) if hasattr(getattr(self, name), "__iter__") else None
            default = (0.0,) if name == "mean" else (1.0,)
            if given in (None, default):
                object.__setattr__(self, name, value)
            elif not all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(given, value)) or len(given) != len(value):
                raise EncoderError(f"{name} {list(given)} disagrees with preprocessing {self.preprocessing!r} "
                                   f"({list(value)}); give one or the other")
        if self.input_size is None and size is not None:
            object.__setattr__(self, "input_size", FIXED_INPUT_SIZE.get(self.arch, size))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["key_map"] = [list(p) for p in self.key_map]
        for name, default in (("preprocessing", None), ("key_map", [])):
            if d[name] == default:
                del d[name]  # as encoder.json files written before these fields
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "EncoderSpec":
        if not isinstance(d, Mapping):
            raise EncoderError(f"encoder spec must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unexpected = sorted(set(d) - names)
        if unexpected:
            raise EncoderError(f"unexpected encoder spec fields {unexpected}; valid fields: {sorted(names)}")
        if "arch" not in d:
            raise EncoderError("encoder spec is missing 'arch'")
        return cls(**dict(d))


# --------------------------------------------------------------------------- backbones


class SmallCNN(nn.Module):
    """Three conv3x3-BN-ReLU blocks, max-pool after blocks 1 and 2, global average pool."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        widths = (width, 2 * width, 2 * width)
        blocks, c = [], in_channels
        for w in widths:
            blocks.append(
                nn.Sequential(nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
            )
            c = w
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.out_dim = widths[-1]

    def forward_with_skips(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            skips.append(x)
            if i < len(self.blocks) - 1:
                x = self.pool(x)
        return x.mean(dim=(2, 3)), skips

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_skips(x)[0]


def _build_backbone(spec: EncoderSpec) -> nn.Module:
    if spec.arch == "small_cnn":
        net = SmallCNN(spec.in_channels, spec.width)
        # channels_last roughly doubles CPU throughput of the mkldnn convolutions.
        return net.to(memory_format=torch.channels_last)
    import torchvision  # deferred: only the backbones that need it pay for the import

    if spec.arch in _RESNETS:
        net = getattr(torchvision.models, spec.arch)(weights=None)
        if spec.cifar_stem:
            net.conv1 = nn.Conv2d(spec.in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif spec.in_channels != 3:
            net.conv1 = nn.Conv2d(spec.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if spec.cifar_stem or spec.in_channels != 3:  # torchvision's own init for the replaced conv
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.fc = nn.Identity()
        return net
    if spec.arch in CLIP_SHAPES:
        return build_clip_resnet(spec.arch, spec.in_channels)
    net = torchvision.models.vit_b_16(weights=None)
    if spec.in_channels != 3:
        old = net.conv_proj
        net.conv_proj = nn.Conv2d(spec.in_channels, old.out_channels, kernel_size=16, stride=16)
    net.heads = nn.Identity()
    return net


def _resnet_forward_with_skips(net: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    stem = net.relu(net.bn1(net.conv1(x)))
    x = net.maxpool(stem)
    skips = [stem]
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(net, name)(x)
        skips.append(x)
    return torch.flatten(net.avgpool(x), 1), skips


# --------------------------------------------------------------------------- the wrapper


class Encoder(nn.Module):
    """Preprocess (channel adapt, resize, normalise) then backbone -> (N, d) float32 features.

    Input ``x``: ``(N, C, H, W)`` floats in dataset pixel space, with ``C`` equal
    to ``spec.in_channels``, or 1, or any ``C`` when the backbone takes 1 channel.
    Differentiable w.r.t. ``x``. Only the backbone's tensors are state: the
    normalisation constants are non-persistent buffers rebuilt from the spec.
    """

    def __init__(self, spec: EncoderSpec, backbone: nn.Module) -> None:
        super().__init__()
        if spec.feature_dim is None:
            raise EncoderError("Encoder needs a spec with feature_dim; use build_encoder")
        self.spec = spec
        self.feature_dim = spec.feature_dim
        self.backbone = backbone
        # Where the weights came from, e.g. {"pretrained_on": {"name": ..., "content_hash": ...}}.
        # Saved in encoder.json; not part of the fingerprint (it does not change the function).
        self.provenance: dict[str, Any] = {}
        shape = (1, -1, 1, 1)
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(shape), persistent=False)

    def extra_repr(self) -> str:
        return f"arch={self.spec.arch}, input_size={self.spec.input_size}, feature_dim={self.feature_dim}"

    def preprocess(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise EncoderError(f"expected a (N, C, H, W) tensor, got shape {tuple(getattr(x, 'shape', ()))}")
        if not x.is_floating_point():
            raise EncoderError(f"expected float pixels in [0, 1], got dtype {x.dtype}")
        want, c = self.spec.in_channels, x.shape[1]
        x = x.to(self.mean.dtype)
        if c != want:
            if c == 1:
                x = x.expand(-1, want, -1, -1)
            elif want == 1:
                x = x.mean(dim=1, keepdim=True)
            else:
                raise EncoderError(f"data has {c} channels but the backbone expects {want} (only 1 <-> n adapts)")
        size = self.spec.input_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        return (x - self.mean) / self.std

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(self.preprocess(x)).float()

    def forward_with_skips(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Pooled features and intermediate maps, shallow to deep.

        small_cnn: the output of each conv block (before pooling); resnets: the
        stem (after conv1-bn-relu, before the max-pool) and layer1..layer4.
        vit_b_16 and TorchScript backbones raise EncoderError.
        """
        x = self.preprocess(x)
        if isinstance(self.backbone, SmallCNN):
            feats, skips = self.backbone.forward_with_skips(x)
        elif self.spec.arch in _RESNETS and not isinstance(self.backbone, torch.jit.ScriptModule):
            feats, skips = _resnet_forward_with_skips(self.backbone, x)
        else:
            kind = type(self.backbone).__name__
            raise EncoderError(f"forward_with_skips is not supported for {self.spec.arch} ({kind})")
        return feats.float(), skips

    def fingerprint(self) -> str:
        """sha256 over the spec JSON and the backbone tensors (sorted keys, dtype, shape, bytes)."""
        h = hashlib.sha256()
        h.update(json.dumps(self.spec.to_json(), sort_keys=True).encode())
        for key, t in sorted(self.backbone.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"\0{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


def build_encoder(spec: EncoderSpec) -> Encoder:
    """A randomly initialised encoder (torch's global RNG: seed it, or fork it, first)."""
    backbone = _build_backbone(spec)
    dim = feature_dim_of(spec)
    if spec.feature_dim is not None and spec.feature_dim != dim:
        raise EncoderError(f"spec.feature_dim={spec.feature_dim} but {spec.arch} produces {dim}")
    return Encoder(replace(spec, feature_dim=dim), backbone)


def place(encoder: Encoder, device: str | torch.device, *, channels_last: bool | None = None) -> Encoder:
    """Move ``encoder`` to ``device``, in place; returns it.

    channels_last (None: automatic): convolutional backbones (small_cnn, the
    resnets) are put in channels-last memory format on CUDA, where cuDNN's NHWC
    kernels are the fast ones (tensor cores under bf16 autocast); convolutions
    then return channels-last maps whatever the input's layout. small_cnn is
    built channels-last for every device (oneDNN on the CPU is faster so).
    ViT and TorchScript backbones are left as they are. The layout changes no
    value beyond the kernels' own rounding (float32: ~1e-6 relative).
    """
    device = torch.device(device)
    encoder.to(device)
    conv = encoder.spec.arch in ("small_cnn", *_RESNETS) and not isinstance(encoder.backbone, torch.jit.ScriptModule)
    if channels_last is None:
        channels_last = device.type == "cuda"
    if channels_last and conv:
        encoder.backbone.to(memory_format=torch.channels_last)
    return encoder


def freeze(encoder: Encoder) -> Encoder:
    """eval() and requires_grad_(False), in place; returns the encoder."""
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder


# --------------------------------------------------------------------------- save / load


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_encoder(encoder: Encoder, directory: str | os.PathLike[str]) -> Path:
    """Write ``encoder.safetensors`` (backbone state dict) and ``encoder.json``; returns the directory.

    ``encoder.json`` holds the spec, the fingerprint and the format version. Both
    files are written atomically. A TorchScript-backed encoder saves its tensors
    too, but reloads only if they fit the eager ``spec.arch`` backbone.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in encoder.backbone.state_dict().items()}
    meta = {"format_version": FORMAT_VERSION, "spec": encoder.spec.to_json(), "fingerprint": encoder.fingerprint()}
    if getattr(encoder, "provenance", None):
        meta["provenance"] = encoder.provenance
    _atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(directory / META_FILE, lambda p: Path(p).write_text(json.dumps(meta, indent=2, sort_keys=True)))
    return directory


def is_torchscript_archive(path: str | os.PathLike[str]) -> bool:
    """True for a zip holding TorchScript code (``constants.pkl`` or a ``code/`` folder)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(
        n.endswith("/constants.pkl") or n == "constants.pkl" or "/code/" in n or n.startswith("code/") for n in names
    )


def _check_size(path: Path, max_bytes: int) -> None:
    if not path.is_file():
        raise EncoderError(f"checkpoint {path.name!r} not found or not a file")
    size = path.stat().st_size
    if size > max_bytes:
        raise EncoderError(f"checkpoint {path.name!r} is {size} bytes, over the limit of {max_bytes}")


def _fmt_keys(keys: list[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_LIST_LIMIT])
    return shown + (f", ... and {len(keys) - _LIST_LIMIT} more" if len(keys) > _LIST_LIMIT else "")


def _unwrap(obj: Any) -> dict[str, Tensor]:
    for _ in range(4):  # e.g. {"model": {"state_dict": {...}}}
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise EncoderError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise EncoderError(
            f"checkpoint entries are not all tensors ({_fmt_keys(bad)}); wrap the state dict under one of "
            f"{list(_WRAPPER_KEYS)}"
        )
    if not obj:
        raise EncoderError("checkpoint state dict is empty")
    return dict(obj)


def load_state_dict_file(path: str | os.PathLike[str], max_bytes: int = _DEFAULT_MAX_BYTES) -> dict[str, Tensor]:
    """Read an untrusted tensor checkpoint into a flat ``{name: tensor}`` dict on the CPU.

    ``.safetensors`` via safetensors; anything else via ``torch.load(weights_only=True)``.
    Files over ``max_bytes`` are refused before reading; TorchScript archives are
    refused (see :func:`load_encoder`); the state dict may be wrapped under
    ``state_dict``/``model``/``teacher``/``encoder``/``backbone``/``net``. Keys are not renamed.
    """
    path = Path(path)
    _check_size(path, max_bytes)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return _unwrap(load_file(str(path), device="cpu"))
        except EncoderError:
            raise
        except Exception as exc:  # safetensors raises its own error types
            raise EncoderError(f"cannot read safetensors file {path.name!r}: {exc}") from None
    if is_torchscript_archive(path):
        raise EncoderError(
            f"{path.name!r} is a TorchScript archive, not a state dict; load it with "
            "load_encoder(..., allow_torchscript=True) only if you trust its source"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EncoderError(
            f"refused {path.name!r}: not a plain tensor checkpoint (weights-only unpickling failed: {first})"
        ) from None
    return _unwrap(obj)


def normalize_state_dict(
    state_dict: Mapping[str, Tensor], arch: str, expected_keys: set[str] | None = None
) -> dict[str, Tensor]:
    """Strip self-supervised wrappers until stable.

    Repeats: drop momentum encoders and projection/prediction heads
    (``momentum_encoder``, ``projector``, ``projection_head``, ``head``,
    ``predictor``, plus ``fc`` for CNNs and ``heads`` for ViT) unless the
    backbone itself has a module of that name; then strip one of ``module.``,
    ``base_encoder.``, ``encoder.``, ``backbone.``, ``model.`` when *every* key
    carries it; for resnets, rename ``nn.Sequential`` children (``f.N.*``, head ``g.*``) to
    torchvision's names (:func:`_sequential_resnet`). Stops early once the keys equal
    ``expected_keys``. A spec's ``key_map`` is applied before (:func:`apply_key_map`).
    """
    if arch not in ARCHITECTURES:
        raise EncoderError(f"unknown arch {arch!r}; valid choices: {', '.join(ARCHITECTURES)}")
    sd = dict(state_dict)
    own = {k.split(".", 1)[0] for k in expected_keys} if expected_keys else set()
    drop = tuple(n for n in _DROP_ALWAYS + _DROP_BY_ARCH[arch] if n not in own)
    while True:
        if expected_keys is not None and set(sd) == expected_keys:
            return sd
        before = set(sd)
        sd = {k: v for k, v in sd.items() if k.split(".", 1)[0] not in drop}
        for prefix in _STRIP_PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                break
        if arch in _RESNETS:
            sd = _sequential_resnet(sd) or sd
        elif arch == "vit_b_16":
            sd = _timm_vit(sd) or sd
        elif arch in _CLIPS:
            sd = _clip_visual(sd)
        if set(sd) == before:
            return sd


def apply_key_map(state_dict: Mapping[str, Tensor], key_map: tuple[tuple[str, str], ...]) -> dict[str, Tensor]:
    """Renames keys by literal prefixes, in order: each ``(old, new)`` turns ``old...`` into ``new...``."""
    sd = dict(state_dict)
    for old, new in key_map:
        renamed: dict[str, Tensor] = {}
        for k, v in sd.items():
            k2 = new + k[len(old):] if k.startswith(old) else k
            if k2 in renamed:
                raise EncoderError(f"key_map {[old, new]!r} maps two keys onto {k2!r}")
            renamed[k2] = v
        sd = renamed
    return sd


def _sequential_resnet(sd: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """A ResNet kept as ``nn.Sequential`` children (``f.N.*``, projection head ``g.*``: SimCLR
    implementations that drop ``fc`` and the max-pool, e.g. leftthomas/SimCLR) renamed to
    torchvision's names: the first conv is ``conv1``, the first BatchNorm ``bn1``, the children
    made of blocks ``layer1``..``layer4`` in order. None when the keys are not of that form."""
    if not sd or not all(k.startswith(("f.", "g.")) for k in sd):
        return None
    groups: dict[int, dict[str, Tensor]] = {}
    for k, v in sd.items():
        if k.startswith("f."):
            idx, _, rest = k[2:].partition(".")
            if not idx.isdigit() or not rest:
                return None
            groups.setdefault(int(idx), {})[rest] = v
    names: dict[int, str] = {}
    layers = 0
    for idx in sorted(groups):
        g = groups[idx]
        if "weight" in g and g["weight"].ndim == 4 and "conv1" not in names.values():
            names[idx] = "conv1"
        elif "running_mean" in g and "bn1" not in names.values():
            names[idx] = "bn1"
        elif all(r.split(".", 1)[0].isdigit() for r in g) and layers < 4:
            layers += 1
            names[idx] = f"layer{layers}"
        else:
            return None
    return {f"{names[i]}.{rest}": v for i, g in groups.items() for rest, v in g.items()}


def _clip_visual(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A whole CLIP state dict (image tower ``visual.*`` beside the text tower): the image tower."""
    if any(k.startswith("visual.") for k in sd):
        return {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    return dict(sd)


_TIMM_BLOCK = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv.weight": "self_attention.in_proj_weight",
               "attn.qkv.bias": "self_attention.in_proj_bias", "attn.proj": "self_attention.out_proj",
               "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3"}


def _timm_vit(sd: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """timm's ViT names (MoCo v3, DINO and timm checkpoints: ``patch_embed.proj``, ``cls_token``,
    ``pos_embed``, ``blocks.N.attn.qkv``, ``norm``) renamed to torchvision's ``vit_b_16``: the
    same pre-norm blocks, the class token after the last LayerNorm. None when the keys are not
    of that form, or have parts torchvision's ViT lacks (layer scale, a pooled ``fc_norm``...)."""
    if "patch_embed.proj.weight" not in sd:
        return None
    top = {"cls_token": "class_token", "pos_embed": "encoder.pos_embedding", "patch_embed.proj.weight":
           "conv_proj.weight", "patch_embed.proj.bias": "conv_proj.bias", "norm.weight": "encoder.ln.weight",
           "norm.bias": "encoder.ln.bias"}
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
            continue
        if not k.startswith("blocks."):
            return None
        idx, _, rest = k[len("blocks."):].partition(".")
        new = next((rest.replace(a, b, 1) for a, b in _TIMM_BLOCK.items() if rest.startswith(a)), None)
        if not idx.isdigit() or new is None:
            return None
        out[f"encoder.layers.encoder_layer_{idx}.{new}"] = v
    return out


def layout_hint(keys: set[str], arch: str) -> str | None:
    """What a state dict's keys look like, when they say so and it is not ``arch``."""
    def has(*names: str) -> bool:
        return any(n in keys for n in names)

    clip_like = (any(k.startswith("visual.") for k in keys) or any(".attnpool." in f".{k}" for k in keys)
                 or has("conv2.weight", "conv3.weight") and has("bn3.weight"))
    if clip_like and arch not in _CLIPS:
        return ("these keys look like CLIP's ModifiedResNet image tower (3-conv stem, attention pooling: OpenAI/"
                "open_clip RN50): use architecture clip_rn50 (clip_rn101, clip_rn50x4 for those shapes)")
    if has("patch_embed.proj.weight", "cls_token", "blocks.0.attn.qkv.weight"):
        return ("these keys look like a timm-named ViT (patch_embed, blocks.N.attn.qkv: MoCo v3, DINO, timm); "
                "vit_b_16 loads those with a class-token output, but not with layer scale, a pooled fc_norm, "
                "register tokens or another depth or width")
    guess = ("vit_b_16" if has("conv_proj.weight") else "resnet50" if has("layer1.0.conv3.weight")
             else "resnet18" if has("layer1.0.conv2.weight") else None)
    if guess and guess != arch:
        return f"these keys look like {guess}: use architecture {guess}"
    return None


def _load_into(encoder: Encoder, state_dict: Mapping[str, Tensor], source: str) -> None:
    target = encoder.backbone.state_dict()
    sd = normalize_state_dict(apply_key_map(state_dict, encoder.spec.key_map), encoder.spec.arch, set(target))
    # Checkpoints from other frameworks often omit BatchNorm's step counters.
    for k in target:
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros_like(target[k])
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
        for k in target
        if k in sd and sd[k].shape != target[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [f"checkpoint {source!r} does not fit {encoder.spec.arch}"]
        hint = layout_hint(set(sd), encoder.spec.arch)
        if hint:
            parts.append(hint)
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
        if shapes:
            shown = "; ".join(shapes[:_LIST_LIMIT])
            more = f"; ... and {len(shapes) - _LIST_LIMIT} more" if len(shapes) > _LIST_LIMIT else ""
            parts.append(f"shape mismatches ({len(shapes)}): {shown}{more}")
        raise EncoderError("; ".join(parts))
    bad_dtype = [k for k, v in sd.items() if v.is_floating_point() != target[k].is_floating_point()]
    if bad_dtype:
        raise EncoderError(f"checkpoint {source!r} has tensors of the wrong kind: {_fmt_keys(bad_dtype)}")
    try:
        encoder.backbone.load_state_dict(sd, strict=True)
    except RuntimeError as exc:  # anything the checks above did not foresee
        raise EncoderError(f"checkpoint {source!r} does not fit {encoder.spec.arch}: {exc}") from None


def _read_meta(path: Path) -> dict[str, Any]:
    _check_size(path, _META_MAX_BYTES)
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EncoderError(f"cannot read {path.name}: {exc}") from None
    if not isinstance(meta, dict) or "spec" not in meta:
        raise EncoderError(f"{path.name} has no 'spec'")
    if meta.get("format_version") != FORMAT_VERSION:
        raise EncoderError(
            f"{path.name} has format_version {meta.get('format_version')!r}; this code reads {FORMAT_VERSION}"
        )
    return meta


def _same_spec(a: EncoderSpec, b: EncoderSpec) -> bool:
    return replace(a, feature_dim=None) == replace(b, feature_dim=None) and (
        a.feature_dim is None or b.feature_dim is None or a.feature_dim == b.feature_dim
    )


def _load_torchscript(path: Path, spec: EncoderSpec) -> Encoder:
    try:
        with warnings.catch_warnings():  # jit.load is deprecated in favour of export; still the uploaded format
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise EncoderError(f"cannot load TorchScript archive {path.name!r}: {exc}") from None
    dim = spec.feature_dim
    if spec.input_size is not None:
        module.eval()
        probe = torch.zeros(1, spec.in_channels, spec.input_size, spec.input_size)
        try:
            with torch.no_grad():
                out = module(probe)
        except Exception as exc:
            shape = tuple(probe.shape)
            raise EncoderError(f"TorchScript module {path.name!r} fails on a {shape} input: {exc}") from None
        if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 1:
            raise EncoderError(f"TorchScript module {path.name!r} must return (N, d) features")
        if dim is not None and out.shape[1] != dim:
            raise EncoderError(f"TorchScript module returns {out.shape[1]} features, spec.feature_dim={dim}")
        dim = int(out.shape[1])
    if dim is None:
        raise EncoderError("a TorchScript encoder needs spec.input_size (to probe it) or spec.feature_dim")
    return Encoder(replace(spec, feature_dim=dim), module)


def load_encoder(
    directory_or_file: str | os.PathLike[str],
    spec: EncoderSpec | None = None,
    *,
    max_bytes: int = _DEFAULT_MAX_BYTES,
    allow_torchscript: bool = False,
) -> Encoder:
    """Load an encoder saved by :func:`save_encoder` (a directory) or an untrusted checkpoint file.

    Directory: the spec comes from ``encoder.json`` (a ``spec`` passed too must
    agree) and the loaded weights must reproduce the stored fingerprint.
    File: ``spec`` is required; the state dict is unwrapped, stripped of
    self-supervised prefixes and heads (:func:`normalize_state_dict`) and
    loaded strictly. A TorchScript archive is refused unless
    ``allow_torchscript=True`` (it runs the archive's code; see the module
    docstring), and is then wrapped as the backbone. The encoder comes back in
    eval mode on the CPU, not frozen.
    """
    path = Path(directory_or_file)
    fingerprint = None
    if path.is_file() and path.name == WEIGHTS_FILE and spec is None and (path.parent / META_FILE).is_file():
        path = path.parent
    if path.is_dir():
        meta = _read_meta(path / META_FILE)
        stored = EncoderSpec.from_json(meta["spec"])
        if spec is not None and not _same_spec(spec, stored):
            raise EncoderError(f"spec {spec} disagrees with the stored spec {stored}")
        spec, fingerprint, path = stored, meta.get("fingerprint"), path / WEIGHTS_FILE
    elif spec is None:
        raise EncoderError(f"{path.name!r} is a bare checkpoint file: pass spec=EncoderSpec(...) to load it")
    _check_size(path, max_bytes)
    if is_torchscript_archive(path):
        if not allow_torchscript:
            raise EncoderError(
                f"{path.name!r} is a TorchScript archive; it runs code when loaded, so it is refused unless "
                "allow_torchscript=True (only for trusted sources)"
            )
        encoder = _load_torchscript(path, spec)
    else:
        encoder = build_encoder(spec)
        _load_into(encoder, load_state_dict_file(path, max_bytes), path.name)
    encoder.eval()
    if fingerprint is not None and encoder.fingerprint() != fingerprint:
        raise EncoderError(f"{path.name!r} does not match the fingerprint in {META_FILE}: file altered or corrupt")
    if fingerprint is not None and isinstance(meta.get("provenance"), dict):
        encoder.provenance = dict(meta["provenance"])
    return encoder


def mark_pretrained_on(encoder: Encoder, dataset: Any) -> Encoder:
    """Record which dataset the encoder was pre-trained on (name and content hash), in place.

    The pipeline compares it with the audited dataset to tell the paper's two
    scenarios apart: the same dataset (its "FT") or transfer learning ("TL").
    """
    encoder.provenance = dict(encoder.provenance) | {
        "pretrained_on": {"name": getattr(dataset, "name", None), "content_hash": getattr(dataset, "content_hash", None)}
    }
    return encoder
