"""Bounded, torch-free models of an encoder ``spec`` and a SimCLR pre-training ``config``.

This module imports no torch (only pydantic and :mod:`attacks.catalogue`), so the
HTTP API validates request fields with the very models the engine uses:
``attacks.encoders.EncoderSpec`` and ``attacks.pretrain.SimCLRConfig`` (frozen
dataclasses, the engine's working types) validate their fields through
:class:`EncoderSpec` and :class:`SimCLRConfig` here. Field names and defaults are
the dataclasses'; every field has an upper bound, unknown fields are refused
(``extra="forbid"``) and ints, bools and strings are strict (``True`` is not an
int, ``"3"`` is not a number).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from attacks.catalogue import ARCHITECTURES, FIXED_INPUT_SIZE

__all__ = ["MAX_EPOCHS", "MAX_WIDTH", "PRESETS", "EncoderSpec", "SimCLRConfig", "error_text"]

MAX_EPOCHS = 1000
MAX_WIDTH = 1024
MAX_INPUT_SIZE = 1024
_RESNETS = ("resnet18", "resnet50")
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:[0-9]{1,3})$")

_Norm = Annotated[float, Field(ge=-1e3, le=1e3)]

# Preprocessing presets: (mean, std, input_size) of the published pre-training pipelines
# (torchvision's ImageNet weights, OpenAI CLIP, the usual CIFAR-10 statistics).
PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...], int | None]] = {
    "none": ((0.0,), (1.0,), None),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), 224),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), None),
}
MAX_KEY_MAP = 16
_KEY_PREFIX = re.compile(r"^[A-Za-z0-9_.]{0,200}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False, str_max_length=64)


class EncoderSpec(_Strict):
    """What encoder to build and how to feed it (``attacks.encoders.EncoderSpec``'s fields)."""

    arch: Literal[ARCHITECTURES] = Field(description="The backbone: " + ", ".join(ARCHITECTURES) + ".")  # type: ignore[valid-type]
    in_channels: int = Field(3, ge=1, le=3, description="Channels the backbone expects: 1 or 3.")
    input_size: int | None = Field(
        None, ge=1, le=MAX_INPUT_SIZE, validate_default=True, description="Square side the backbone expects; null keeps the data's "
        f"own size. vit_b_16 and the CLIP ResNets need their own: {FIXED_INPUT_SIZE}."
    )
    mean: tuple[_Norm, ...] = Field(
        (0.0,), min_length=1, max_length=3, strict=False,
        description="Per-channel normalisation after resize: 1 value, or in_channels values.",
    )
    std: tuple[Annotated[float, Field(gt=0, le=1e3)], ...] = Field(
        (1.0,), min_length=1, max_length=3, strict=False, description="As mean; every value > 0."
    )
    cifar_stem: bool = Field(False, description="resnets only: 3x3 stride-1 conv1 and no max-pool.")
    width: int = Field(64, ge=1, le=MAX_WIDTH, description="small_cnn base width.")
    feature_dim: int | None = Field(None, ge=1, le=65_536, description="Backbone output dim (filled in when built).")
    preprocessing: Literal[tuple(PRESETS)] | None = Field(  # type: ignore[valid-type]
        None, description="A preset for mean, std and input_size: " + ", ".join(PRESETS) + " (imagenet and clip "
        "resize to 224). Sets the fields left at their defaults; explicit values must agree.")
    key_map: tuple[Annotated[tuple[Annotated[str, Field(max_length=200)], Annotated[str, Field(max_length=200)]],
                             Field(strict=False)], ...] = Field(
        (), max_length=MAX_KEY_MAP, strict=False,
        description="Checkpoint key renames, applied in order before loading: pairs [old_prefix, new_prefix] "
        "(literal prefixes of letters, digits, '_' and '.'; '' as new_prefix strips it).")

    @model_validator(mode="before")
    @classmethod
    def _preset_size(cls, data: Any) -> Any:
        """A preset on a fixed-input backbone fills its input size, as the engine's spec does."""
        if (isinstance(data, dict) and data.get("preprocessing") is not None and data.get("input_size") is None
                and data.get("arch") in FIXED_INPUT_SIZE):
            data = {**data, "input_size": FIXED_INPUT_SIZE[data["arch"]]}
        return data

    @field_validator("preprocessing")
    @classmethod
    def _preset_fits(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        mean, std, _ = PRESETS[v]
        c = info.data.get("in_channels")
        if c is not None and len(mean) not in (1, c):
            raise ValueError(f"preprocessing {v!r} is for {len(mean)}-channel images, not in_channels={c}")
        for name, preset, default in (("mean", mean, (0.0,)), ("std", std, (1.0,))):
            given = info.data.get(name)
            if given is not None and tuple(given) != default and (
                    len(given) != len(preset) or any(abs(a - b) > 1e-6 * max(1.0, abs(b)) for a, b in zip(given, preset))):
                raise ValueError(f"{name} {list(given)} disagrees with preprocessing {v!r} ({list(preset)}); "
                                 "give one or the other")
        return v

    @field_validator("key_map")
    @classmethod
    def _prefixes(cls, v: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        for old, new in v:
            if not old or not _KEY_PREFIX.match(old) or not _KEY_PREFIX.match(new):
                raise ValueError(f"key_map pairs are literal key prefixes (letters, digits, '_', '.'), "
                                 f"the first non-empty; got {[old, new]!r}")
        return v

    @field_validator("in_channels")
    @classmethod
    def _one_or_three(cls, v: int) -> int:
        if v not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {v}")
        return v

    @field_validator("input_size")
    @classmethod
    def _vit_size(cls, v: int | None, info: ValidationInfo) -> int | None:
        arch = info.data.get("arch")
        if arch in FIXED_INPUT_SIZE and v != FIXED_INPUT_SIZE[arch]:
            raise ValueError(f"{arch} needs input_size={FIXED_INPUT_SIZE[arch]}, got {v!r}")
        return v

    @field_validator("mean", "std")
    @classmethod
    def _per_channel(cls, v: tuple[float, ...], info: ValidationInfo) -> tuple[float, ...]:
        c = info.data.get("in_channels")
        if c is not None and len(v) not in (1, c):
            raise ValueError(f"{info.field_name} has {len(v)} values; need 1 or in_channels={c}")
        return v

    @field_validator("cifar_stem")
    @classmethod
    def _resnet_only(cls, v: bool, info: ValidationInfo) -> bool:
        arch = info.data.get("arch")
        if v and arch is not None and arch not in _RESNETS:
            raise ValueError(f"cifar_stem applies to {' and '.join(_RESNETS)} only, not {arch}")
        return v


class SimCLRConfig(_Strict):
    """SimCLR hyper-parameters (``attacks.pretrain.SimCLRConfig``'s fields and defaults)."""

    epochs: int = Field(3, ge=1, le=MAX_EPOCHS, description="Passes over the data.")
    batch_size: int = Field(256, ge=2, le=8192, description="Images per step (each gives two views).")
    lr: float = Field(1e-3, gt=0, le=10, description="Adam learning rate, cosine-decayed to 0.")
    temperature: float = Field(0.5, gt=0, le=100, description="NT-Xent temperature.")
    proj_dim: int = Field(64, ge=1, le=4096, description="Projection head output dim.")
    crop_scale: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] = Field(
        (0.5, 1.0), strict=False, description="Area fraction range (lo, hi) of the random crop, 0 < lo <= hi <= 1."
    )
    flip: bool = Field(False, description="Random horizontal flips.")
    jitter: float = Field(0.4, ge=0, lt=1, description="Brightness/contrast jitter strength.")
    noise_std: float = Field(0.1, ge=0, le=1, description="Largest per-image gaussian noise std.")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="RNG seed.")
    device: str = Field("auto", max_length=16, description='"auto", "cpu", "cuda" or "cuda:N".')

    @field_validator("crop_scale")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] > v[1]:
            raise ValueError(f"crop_scale must be (lo, hi) with lo <= hi, got {v}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.match(v):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {v[:20]!r}")
        return v


def error_text(exc: Any, limit: int = 5) -> str:
    """A pydantic ValidationError in one line, each error as ``field: message`` (fields dotted, shortened)."""
    parts = []
    for e in exc.errors()[:limit]:
        field = ".".join(str(p)[:40] for p in e.get("loc", ())) or "value"
        parts.append(f"{field}: {e.get('msg', 'invalid')}")
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
