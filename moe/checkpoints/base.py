"""The one interface every checkpoint format implements, and the registry of formats.

A format reads the ``quantization_config`` of a checkpoint's ``config.json`` and says, for each
projection module (``model.layers.3.mlp.experts.7.gate_proj``), how its weight is stored: an
:class:`Encoding` (the moe scheme it maps to, the names of its scale tensors, and how one projection's
scale is shaped in the file). The loader does the reading, slicing, checking and conversion for every
format alike; a format is one small module that subclasses :class:`CheckpointFormat` and is listed by
:func:`register_format`. Formats whose data is not the canonical storage as it is (packed int4, FP4)
have a data :class:`~moe.checkpoints.codec.Codec` in their encoding instead.
"""

from __future__ import annotations

import fnmatch
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..quant import NAMES
from .codec import Codec
from .source import CheckpointError

__all__ = ["FORMATS", "UNQUANTIZED", "CheckpointFormat", "Encoding", "Unquantized", "matches_module",
           "parse_format", "register_format"]



def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Encoding:
    """How one projection's weight is stored in a checkpoint.

    ``quant``: the moe scheme (a name of ``moe.quant.NAMES``), None for unquantized float weights;
    ``scale``/``input_scale``: the suffixes of its weight scale and static input scale tensors
    (``weight_scale_inv``, ``weight_scale``, ``input_scale``), None when it has none;
    ``power_of_two``: every weight scale must be a power of two (DeepSeek's ``scale_fmt: ue8m0``);
    ``channel_dims``/``tensor_dims``: the stored shape of a per-channel ([out, 1] or [out]) and a
    per-tensor ([1] or []) scale, which export writes again; ``codec``: for formats whose data is not the
    canonical storage as it is (packed int4, GPTQ/AWQ layouts, gpt-oss blocks), how each projection's
    tensors are stored and converted (``quant`` is then a scheme key, e.g. of int4 in groups of 64)."""

    quant: str | None
    scale: str | None = None
    input_scale: str | None = None
    power_of_two: bool = False
    channel_dims: int = 2
    tensor_dims: int = 1
    codec: Codec | None = None

    def describe(self) -> str:
        return self.quant or "unquantized"

    def scale_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        """The checkpoint shape of one [rows, cols] projection's weight scale."""
        scheme = NAMES[self.quant].weights if self.quant else None
        if scheme is None:
            raise ValueError("scale_shape: an unquantized projection has no scale")
        if scheme.granularity == "block":
            br, bc = scheme.block  # type: ignore[misc]
            return (_cdiv(rows, br), _cdiv(cols, bc))
        if scheme.granularity == "channel":
            return (rows, 1)[: self.channel_dims]
        return (1,) * self.tensor_dims


class CheckpointFormat(ABC):
    """A checkpoint format: ``method`` is the ``quant_method`` it reads; ``parse`` builds it from the
    config (or raises a :class:`CheckpointError` naming the field); ``encoding`` answers per module.
    ``data_suffixes``: the suffixes of a projection's data tensor besides ``weight`` (``qweight``,
    ``weight_packed``, ``blocks``), by which a layer's experts are found."""

    method: ClassVar[str]
    data_suffixes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    @abstractmethod
    def parse(cls, config: Mapping[str, Any], where: str) -> CheckpointFormat: ...

    @abstractmethod
    def encoding(self, module: str) -> Encoding: ...


class Unquantized(CheckpointFormat):
    """A checkpoint without a quantization config: float weights."""

    method = "none"

    @classmethod
    def parse(cls, config: Mapping[str, Any], where: str) -> Unquantized:
        return cls()

    def encoding(self, module: str) -> Encoding:
        return Encoding(None)


UNQUANTIZED = Unquantized()
FORMATS: dict[str, type[CheckpointFormat]] = {}


def unsupported(where: str, method: str, name: str, value: object, allowed: str) -> CheckpointError:
    """The error for a ``quantization_config`` field a format does not take: the file, the field, its
    value and what is allowed."""
    return CheckpointError(f"{where}: quantization_config.{name}={value!r} is not supported for quant_method "
                           f"'{method}'; allowed: {allowed}")


def register_format(cls: type[CheckpointFormat]) -> type[CheckpointFormat]:
    """Make ``cls`` the reader of configs whose ``quant_method`` is ``cls.method`` (a class decorator)."""
    FORMATS[cls.method] = cls
    return cls


def parse_format(config: Mapping[str, Any] | None, where: str) -> CheckpointFormat:
    """The format of a ``quantization_config`` (None: unquantized); an unknown ``quant_method`` is an error
    listing the ones registered."""
    if not config:
        return UNQUANTIZED
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{where}: quantization_config must be a JSON object, got {type(config).__name__}")
    method = config.get("quant_method")
    if method not in FORMATS:
        raise CheckpointError(f"{where}: quantization_config.quant_method={method!r} is not supported; moe reads "
                              f"{', '.join(sorted(FORMATS))}")
    return FORMATS[method].parse(config, where)


def matches_module(name: str, pattern: str) -> bool:
    """Whether a skip-list entry names module ``name``: ``re:REGEX`` matched from the start (compressed-tensors),
    a glob with ``*`` (gpt-oss's ``model.layers.*.self_attn``, ModelOpt's exclude lists) matching the name or
    a prefix of it at a module boundary, else the name itself, a prefix of it or a suffix of it, each at a
    module boundary (``mlp.gate`` names ``model.layers.0.mlp.gate`` but not ``...mlp.gate_proj``)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    if "*" in pattern:
        parts = name.split(".")
        return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))
    return (name == pattern or name.startswith(pattern + ".") or name.endswith("." + pattern)
            or f".{pattern}." in f".{name}.")


def decode_scale(t: torch.Tensor, enc: Encoding, where: str, key: str) -> torch.Tensor:
    """A checkpoint scale as canonical fp32 (exact from fp32, bf16, fp16 and e8m0); checks the values."""
    allowed = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e8m0fnu)
    if t.dtype not in allowed:
        raise CheckpointError(f"{where}: tensor {key} has dtype {t.dtype}; scales are stored as "
                              f"{', '.join(str(d).removeprefix('torch.') for d in allowed)}")
    s = t.to(torch.float32)
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise CheckpointError(f"{where}: tensor {key} holds scales that are not finite and > 0, e.g. "
                              f"{s.flatten()[:4].tolist()}")
    if enc.power_of_two and not bool((torch.frexp(s).mantissa == 0.5).all()):
        bad = s[torch.frexp(s).mantissa != 0.5][:4].tolist()
        raise CheckpointError(f"{where}: tensor {key} holds scales that are not powers of two ({bad}), but the "
                              "config says scale_fmt: ue8m0")
    return s


def encode_scale(s: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Canonical fp32 scales back in the checkpoint's dtype and shape (exact for what decode_scale read)."""
    if math.prod(shape) != s.numel():
        raise ValueError(f"encode_scale: {s.numel()} scales do not fill shape {shape}")
    return s.to(dtype).reshape(shape).contiguous()
