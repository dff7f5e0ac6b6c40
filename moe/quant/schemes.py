"""Quantization schemes: one frozen scheme per operand, and the named configurations.

A :class:`QuantConfig` holds a :class:`WeightScheme` (how ``w13`` and ``w2`` are stored) and an
:class:`ActivationScheme` (how the GEMMs' inputs are quantized; ``None``: they stay in the activation
dtype, weight-only). Each scheme is a format plus a granularity, never a boolean per format: adding a
scheme adds a value here and a mode in the kernels.

Canonical storage (rows = output features, cols = input features; ``P`` = 2 for a gated w13, else 1):

| format | data | scale |
|---|---|---|
| ``scaled`` | the activation dtype ``[E, rows, cols]`` | fp32 per tensor ``[E, P]`` |
| ``fp8`` | float8_e4m3fn ``[E, rows, cols]`` | fp32: tensor ``[E, P]``; channel ``[E, rows]``; block |
|  |  | ``[E, P * ceil(rows / P / 128), ceil(cols / 128)]``, the gate's blocks then the up's |
| ``int8`` | int8 ``[E, rows, cols]`` (symmetric) | fp32 channel ``[E, rows]`` |
| ``int4`` | uint8 ``[E, rows, cols / 2]``, two codes a byte | the activation dtype (bf16, fp16 or fp32) per group |
|  | (element ``2j`` in the low nibble) | ``[E, rows, cols / G]``; optional zero points uint8, same shape |
| ``mxfp4`` | uint8 ``[E, rows, cols / 2]`` of e2m1 codes | e8m0 (uint8) per 32: ``[E, rows, cols / 32]`` |
| ``nvfp4`` | uint8 ``[E, rows, cols / 2]`` of e2m1 codes | float8_e4m3fn per 16 ``[E, rows, cols / 16]``; fp32 |
|  |  | ``global_scale`` ``[E, P]`` |

``scaled`` is unquantized weights times a per-(expert, part) scale: the seam's test scheme, with real
scale tensors on every path, not a format anyone ships. Dequantization multiplies: ``data * scale``
broadcast over its tensor, row or block. The 4-bit formats (``moe.quant.weights`` decodes them):
int4 ``(q - 8) * scale``, or ``(q - zero) * scale`` with zero points; mxfp4 ``e2m1 * 2^(scale - 127)``;
nvfp4 ``e2m1 * scale * global_scale[e, part]``. e2m1 codes 0..7 are +0, 0.5, 1, 1.5, 2, 3, 4, 6 and bit 3
is the sign.

Weight-only names (``activations=None``: the GEMM inputs stay in the activation dtype): ``w8a16`` (int8
per channel), ``w4a16`` / ``w4a16_zp`` (int4 per group of 128, without / with zero points; other group
sizes through a ``QuantConfig``), ``fp8_w8a16`` (e4m3 per channel; the other fp8 granularities through
a ``QuantConfig``), ``mxfp4`` and ``nvfp4``.
"""

from __future__ import annotations

import functools
import json
from typing import Literal

import torch
from pydantic import BaseModel, Field, model_validator

from ..frozen import Frozen

__all__ = ["E2M1_MAX", "FIXED_GROUPS", "FORMAT_MAX", "NAMES", "PACKED_FORMATS", "SCALED", "STORAGE_DTYPES",
           "ActivationScheme", "QuantConfig", "WeightScheme", "named", "scale_from_amax", "scheme_key"]

WeightFormat = Literal["scaled", "fp8", "int8", "int4", "mxfp4", "nvfp4"]
Granularity = Literal["tensor", "channel", "block", "group"]
ActivationFormat = Literal["fp8", "int8"]
ActivationGranularity = Literal["tensor", "token", "group"]

# the granularities each weight format is stored with
_WEIGHT_GRANULARITIES: dict[str, tuple[str, ...]] = {
    "scaled": ("tensor",),
    "fp8": ("tensor", "channel", "block"),
    "int8": ("channel",),
    "int4": ("group",),
    "mxfp4": ("group",),
    "nvfp4": ("group",),
}
# formats whose group size is part of the format (the e8m0 / e4m3 block scales of the FP4 formats)
FIXED_GROUPS = {"mxfp4": 32, "nvfp4": 16}
PACKED_FORMATS = ("int4", "mxfp4", "nvfp4")  # two 4-bit codes a byte along the input dim
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0
# the largest stored value of each format, and its storage dtype (``scaled`` keeps the float dtype)
E2M1_MAX = 6.0
# int4: symmetric codes use q - 8 in -7..7 (the largest magnitude of a group maps to 7, so it fits)
FORMAT_MAX = {"scaled": 1.0, "fp8": FP8_MAX, "int8": INT8_MAX, "int4": 7.0, "mxfp4": E2M1_MAX, "nvfp4": E2M1_MAX}
STORAGE_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8, "int4": torch.uint8, "mxfp4": torch.uint8,
                  "nvfp4": torch.uint8}


def scale_from_amax(amax: torch.Tensor, fmt: str) -> torch.Tensor:
    """The scale that maps ``amax`` to the format's largest value; 1 where ``amax`` is 0 (all-zero data)."""
    # a tensor divisor: torch on CUDA divides by a Python number as a product with its reciprocal, which
    # rounds differently from the kernels' (and the CPU's) IEEE division
    return torch.where(amax > 0, amax / torch.full_like(amax, FORMAT_MAX[fmt]), torch.ones_like(amax))


class WeightScheme(Frozen):
    """How expert weights are stored: a format and the granularity of its scales."""

    format: WeightFormat
    granularity: Granularity
    block: tuple[int, int] | None = Field(None, description="block: (rows, cols) of one scale, e.g. (128, 128)")
    group_size: int | None = Field(None, ge=2, description="group: input elements per scale (int4: 32, 64, 128)")
    zero_point: bool = Field(False, description="int4: asymmetric, with a zero point per group")

    def key(self) -> str:
        """Compact canonical JSON (how the scheme crosses the custom-op boundary)."""
        return _json(self)

    @classmethod
    def parse(cls, text: str) -> WeightScheme:
        return _parse_weights(text)

    @model_validator(mode="after")
    def _check(self) -> WeightScheme:
        allowed = _WEIGHT_GRANULARITIES[self.format]
        if self.granularity not in allowed:
            raise ValueError(f"granularity: {self.format} weights are stored per {', '.join(allowed)}, "
                             f"got {self.granularity!r}")
        if self.granularity == "block":
            if self.block is None or min(self.block) < 1:
                raise ValueError(f"block: block granularity needs a (rows, cols) block size, got {self.block}")
        elif self.block is not None:
            raise ValueError(f"block: only block granularity takes a block size, got block={self.block} with "
                             f"granularity={self.granularity!r}")
        if (self.granularity == "group") != (self.group_size is not None):
            raise ValueError(f"group_size: needed with granularity='group' and only then, got "
                             f"granularity={self.granularity!r}, group_size={self.group_size}")
        fixed = FIXED_GROUPS.get(self.format)
        if fixed is not None and self.group_size != fixed:
            raise ValueError(f"group_size: {self.format} has one scale per {fixed} input elements, got "
                             f"group_size={self.group_size}")
        if self.group_size is not None and self.group_size % 2:
            raise ValueError(f"group_size: two 4-bit codes share a byte, so a group holds an even number of "
                             f"elements; got group_size={self.group_size}")
        if self.zero_point and self.format != "int4":
            raise ValueError(f"zero_point: only int4 weights have zero points, got format={self.format!r}")
        return self

    @property
    def packed(self) -> bool:
        """Two 4-bit codes a byte along the input dim: the data holds cols / 2 bytes a row."""
        return self.format in PACKED_FORMATS


class ActivationScheme(Frozen):
    """How a GEMM's input is quantized before the dot: dynamic (from the data of each call) or static
    (``static=True``: scales given with the call or held by the layer)."""

    format: ActivationFormat
    granularity: ActivationGranularity
    group_size: int | None = Field(None, ge=1, description="group: input elements per scale, e.g. 128")
    static: bool = False

    @model_validator(mode="after")
    def _check(self) -> ActivationScheme:
        if (self.granularity == "group") != (self.group_size is not None):
            raise ValueError(f"group_size: needed with granularity='group' and only then, got "
                             f"granularity={self.granularity!r}, group_size={self.group_size}")
        if self.static and self.granularity != "tensor":
            raise ValueError(f"static: static activation scales are per tensor, got granularity={self.granularity!r}")
        return self


class QuantConfig(Frozen):
    """One scheme per operand. ``QuantConfig()`` is unquantized; weights without activations is
    weight-only quantization."""

    weights: WeightScheme | None = None
    activations: ActivationScheme | None = None

    @model_validator(mode="after")
    def _check(self) -> QuantConfig:
        w, a = self.weights, self.activations
        if a is not None:
            if w is not None and w.format in PACKED_FORMATS:
                raise ValueError(f"activations: {w.format} weights are weight-only here (activations=None); "
                                 "W4A4 is a native backend's scheme")
            if w is None:
                raise ValueError("activations: quantized activations need quantized weights (weights=...)")
            if w.format != a.format:
                raise ValueError(f"activations: {a.format} activations need {a.format} weights, got {w.format}")
        return self

    @property
    def is_quantized(self) -> bool:
        return self.weights is not None

    @property
    def static_activations(self) -> bool:
        """Whether activations are quantized with given (static) scales: ``a13_scale``/``a2_scale``."""
        return self.activations is not None and self.activations.static

    def key(self) -> str:
        """The canonical string: a name of :data:`NAMES`, ``none``, or compact JSON. It crosses the
        ``moe::fused_experts`` custom op and keys tuned files."""
        return scheme_key(self)

    @classmethod
    def parse(cls, value: str | QuantConfig | None) -> QuantConfig:
        """A name, a canonical key, a ``QuantConfig`` or None (unquantized)."""
        if value is None:
            return NONE
        if isinstance(value, QuantConfig):
            return value
        if not isinstance(value, str):
            raise TypeError(f"quant: expected a QuantConfig or a name, got {type(value).__name__}")
        return _parse(value)


NONE = QuantConfig()
SCALED = QuantConfig(weights=WeightScheme(format="scaled", granularity="tensor"))

NAMES: dict[str, QuantConfig] = {
    "fp8_tensor": QuantConfig(weights=WeightScheme(format="fp8", granularity="tensor"),
                              activations=ActivationScheme(format="fp8", granularity="tensor")),
    "fp8_tensor_static": QuantConfig(weights=WeightScheme(format="fp8", granularity="tensor"),
                                     activations=ActivationScheme(format="fp8", granularity="tensor", static=True)),
    "fp8_channel": QuantConfig(weights=WeightScheme(format="fp8", granularity="channel"),
                               activations=ActivationScheme(format="fp8", granularity="token")),
    "fp8_block": QuantConfig(weights=WeightScheme(format="fp8", granularity="block", block=(128, 128)),
                             activations=ActivationScheme(format="fp8", granularity="group", group_size=128)),
    "int8_channel": QuantConfig(weights=WeightScheme(format="int8", granularity="channel"),
                                activations=ActivationScheme(format="int8", granularity="token")),
    # weight-only: activations stay in their dtype
    "w8a16": QuantConfig(weights=WeightScheme(format="int8", granularity="channel")),
    "w4a16": QuantConfig(weights=WeightScheme(format="int4", granularity="group", group_size=128)),
    "w4a16_zp": QuantConfig(weights=WeightScheme(format="int4", granularity="group", group_size=128,
                                                 zero_point=True)),
    "fp8_w8a16": QuantConfig(weights=WeightScheme(format="fp8", granularity="channel")),
    "mxfp4": QuantConfig(weights=WeightScheme(format="mxfp4", granularity="group", group_size=32)),
    "nvfp4": QuantConfig(weights=WeightScheme(format="nvfp4", granularity="group", group_size=16)),
}
_KEYS = {cfg: name for name, cfg in NAMES.items()} | {NONE: "none", SCALED: "scaled"}


def named(name: str) -> QuantConfig:
    """The configuration a name stands for; an unknown name is an error listing :data:`NAMES`."""
    if name not in NAMES:
        raise ValueError(f"quant: unknown quantization scheme {name!r}; named schemes: {', '.join(NAMES)}")
    return NAMES[name]


def _json(model: BaseModel) -> str:
    return json.dumps(_drop_defaults(model.model_dump(exclude_none=True)), sort_keys=True, separators=(",", ":"))


def _drop_defaults(d: dict) -> dict:
    """``zero_point: false`` left out, so the keys of the schemes from before zero points stay as they were."""
    return {k: _drop_defaults(v) if isinstance(v, dict) else v for k, v in d.items()
            if not (k == "zero_point" and v is False)}


@functools.lru_cache(maxsize=256)
def scheme_key(cfg: QuantConfig) -> str:
    return _KEYS.get(cfg) or _json(cfg)


@functools.lru_cache(maxsize=256)
def _parse_weights(text: str) -> WeightScheme:
    return WeightScheme(**json.loads(text))


@functools.lru_cache(maxsize=256)
def _parse(text: str) -> QuantConfig:
    if text == "none":
        return NONE
    if text == "scaled":
        return SCALED
    if text in NAMES:
        return NAMES[text]
    if not text.startswith("{"):
        named(text)  # raises the error listing the names
    try:
        return QuantConfig(**json.loads(text))
    except (ValueError, TypeError) as exc:  # bad JSON, or a ConfigError naming the field
        raise ValueError(f"quant: {text!r} is not a QuantConfig: {exc}") from None
