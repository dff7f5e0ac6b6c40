"""GPTQ checkpoints (``quant_method: gptq``): ``bits``, ``group_size``, ``sym``, ``desc_act``,
``checkpoint_format`` (``gptq``, the default, or ``gptq_v2``).

Each projection [out, in] stores ``qweight`` int32 [in / (32 / bits), out] (``32 / bits`` consecutive
*input* features a word, feature i of a run at bits ``bits * i``), ``qzeros`` int32 [in / G, out / (32 /
bits)] (packed along the *output* features), ``scales`` [in / G, out] (fp16 mostly) and, optionally,
``g_idx`` int32 [in] (each input feature's group). A value is ``(q - zero) * scale``; the v1 format
(``checkpoint_format: gptq``) stores ``zero - 1`` (a stored 15 is a zero point of 16, as GPTQ's own
kernels read it), ``gptq_v2`` the zero point itself.

- 4 bits, ``sym: true``: moe's ``w4a16`` (every zero point must be 8); ``sym: false``: ``w4a16_zp``. Groups
  other than 128 map to an int4 ``QuantConfig`` of that group size; ``group_size: -1`` is refused.
- 8 bits, ``group_size: -1``, ``sym: true``: ``w8a16`` (int8 ``q - 128``, one scale a row).
- ``g_idx``: act-order (``desc_act: true``) is supported only where ``g_idx`` is the contiguous grouping
  ``i // G`` (checked at load; kept and written back as read); any other is refused naming the tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import CheckpointFormat, Encoding, matches_module, register_format, unsupported
from .codec import (
    FLOATS,
    At,
    Codec,
    Decoded,
    Dim,
    Part,
    check_constant,
    check_finite,
    check_g_idx,
    int4_quant,
)
from .packing import pack_int32, pack_nibbles, unpack_int32, unpack_nibbles
from .source import CheckpointError

__all__ = ["GPTQ", "GPTQCodec"]


@dataclass(frozen=True)
class GPTQCodec(Codec):
    """One GPTQ projection: ``bits`` 4 or 8, ``group`` (-1: one group, per channel), ``sym``, ``v1`` (zero
    points stored minus one)."""

    bits: int
    group: int
    sym: bool
    v1: bool
    config: str = field(default="quantization_config", compare=False)  # the config's name in errors

    @property
    def quant(self) -> str:
        return "w8a16" if self.bits == 8 else int4_quant(self.group, not self.sym)

    @property
    def per(self) -> int:
        return 32 // self.bits

    def parts(self) -> tuple[Part, ...]:
        pack = f"packing of {self.per} codes an int32"
        g = Dim("in", self.group, what=f"group size {self.group}") if self.group > 0 else Dim(None, size=1)
        return (Part("qweight", "data", (Dim("in", self.per, what=pack), Dim("out")), (torch.int32,)),
                Part("qzeros", "zero", (g, Dim("out", self.per, what=pack)), (torch.int32,)),
                Part("scales", "scale", (g, Dim("out")), FLOATS),
                Part("g_idx", "kept", (Dim("in", whole=True),), (torch.int32, torch.int64), required=False))

    def check_sizes(self, rows: int, cols: int) -> str | None:
        if cols % self.per or rows % self.per:
            return (f"a [{rows}, {cols}] projection is not stored whole in {self.bits}-bit GPTQ words ({self.per} "
                    f"codes an int32 along both the input features of qweight and the output features of qzeros)")
        if self.group > 0 and cols % self.group:
            return (f"{self.config}.group_size={self.group} does not divide the {cols} input features of this "
                    f"[{rows}, {cols}] projection; moe's int4 groups must tile the input features")
        return None

    def _zero(self) -> int:
        return 1 << (self.bits - 1)  # the symmetric zero point: 8 or 128

    def decode(self, t: dict[str, torch.Tensor], rows: int, cols: int, at: At) -> Decoded:
        check_g_idx(t.get("g_idx"), self.group if self.group > 0 else cols, at("g_idx"), f"{self.config}.desc_act")
        codes = unpack_int32(t["qweight"], self.bits, dim=0).T  # [out, in]
        zeros = unpack_int32(t["qzeros"], self.bits, dim=1).T + int(self.v1)  # [out, groups]
        check_finite(t["scales"], at("scales"))
        if self.sym:
            check_constant(zeros, self._zero(), at("qzeros"), f"{self.config}.sym=true (after v1's + 1)"
                           if self.v1 else f"{self.config}.sym=true")
        if self.bits == 8:
            return Decoded((codes - 128).to(torch.int8).contiguous(), t["scales"].reshape(-1).float())
        zero = None if self.sym else zeros.to(torch.uint8).contiguous()
        return Decoded(pack_nibbles(codes), t["scales"].T.contiguous(), zero)

    def encode(self, d: Decoded, rows: int, cols: int, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
        if self.bits == 8:
            codes, groups = d.data.to(torch.int32) + 128, 1
            scales = d.scale.reshape(1, -1)
        else:
            codes, groups = unpack_nibbles(d.data), cols // self.group
            scales = d.scale.T
        zeros = d.zero.to(torch.int32) if d.zero is not None else torch.full((rows, groups), self._zero())
        stored = (zeros - int(self.v1)) & ((1 << self.bits) - 1)
        return {"qweight": pack_int32(codes.T, self.bits, dim=0), "qzeros": pack_int32(stored.T, self.bits, dim=1),
                "scales": scales.to(dtypes["scales"]).contiguous()}


@register_format
class GPTQ(CheckpointFormat):
    method = "gptq"
    data_suffixes = ("qweight",)

    def __init__(self, codec: GPTQCodec, skip: tuple[str, ...]) -> None:
        self.codec = codec
        self.skip = skip

    @classmethod
    def parse(cls, config: Mapping[str, Any], where: str) -> GPTQ:
        def bad(name: str, allowed: str) -> CheckpointError:
            return unsupported(where, "gptq", name, config.get(name), allowed)

        bits, group, sym = config.get("bits"), config.get("group_size", 128), config.get("sym", True)
        fmt = config.get("checkpoint_format") or "gptq"
        if bits not in (4, 8):
            raise bad("bits", "4 (w4a16, w4a16_zp) or 8 (w8a16)")
        if fmt not in ("gptq", "gptq_v2"):
            raise bad("checkpoint_format", "'gptq' (v1: zero points stored minus one) or 'gptq_v2'")
        if not isinstance(sym, bool):
            raise bad("sym", "true or false")
        if bits == 4 and (not isinstance(group, int) or group < 2 or group % 2):
            raise bad("group_size", "an even group of input features (32, 64, 128) for 4 bits; -1 (one scale a "
                      "row) is not an int4 scheme of moe")
        if bits == 8 and (group != -1 or not sym):
            raise CheckpointError(f"{where}: quantization_config: bits=8 with group_size={group!r}, sym={sym!r} is "
                                  "not supported; 8-bit GPTQ loads as w8a16: group_size -1 (one scale a row), sym true")
        skip = config.get("modules_to_not_convert") or []
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            raise bad("modules_to_not_convert", "a list of module names")
        return cls(GPTQCodec(bits, group, sym, fmt == "gptq"), tuple(skip))

    def encoding(self, module: str) -> Encoding:
        if any(matches_module(module, pattern) for pattern in self.skip):
            return Encoding(None)
        return Encoding(self.codec.quant, codec=self.codec)
