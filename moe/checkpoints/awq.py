"""AWQ checkpoints (``quant_method: awq``, ``version: gemm``, ``zero_point: true``, 4 bits).

Each projection [out, in] stores ``qweight`` int32 [in, out / 8], packed along the *output* features:
word slot ``i`` (bits ``4 i``) holds output ``8 c + ORDER[i]`` of its run, ``ORDER = 0, 2, 4, 6, 1, 3, 5,
7``; ``qzeros`` int32 [in / G, out / 8] in the same order; ``scales`` [in / G, out] (fp16). A value is
``(q - zero) * scale`` (no offset on the zero points): moe's ``w4a16_zp`` (groups other than 128: an
int4 ``QuantConfig`` with zero points). ``modules_to_not_convert`` lists float modules. The field names
of transformers' ``AwqConfig`` (``bits``, ``group_size``) and of AutoAWQ (``w_bit``, ``q_group_size``)
are both read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import CheckpointFormat, Encoding, matches_module, register_format, unsupported
from .codec import FLOATS, At, Codec, Decoded, Dim, Part, check_finite, int4_quant
from .packing import pack_int32, pack_nibbles, unpack_int32, unpack_nibbles
from .source import CheckpointError

__all__ = ["AWQ", "AWQ_ORDER", "AWQCodec"]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # word slot i holds element AWQ_ORDER[i] of its run of 8 outputs


@dataclass(frozen=True)
class AWQCodec(Codec):
    group: int
    config: str = field(default="quantization_config", compare=False)

    @property
    def quant(self) -> str:
        return int4_quant(self.group, True)

    def parts(self) -> tuple[Part, ...]:
        pack = "packing of 8 codes an int32 (along the output features)"
        g = Dim("in", self.group, what=f"group size {self.group}")
        return (Part("qweight", "data", (Dim("in"), Dim("out", 8, what=pack)), (torch.int32,)),
                Part("qzeros", "zero", (g, Dim("out", 8, what=pack)), (torch.int32,)),
                Part("scales", "scale", (g, Dim("out")), FLOATS))

    def check_sizes(self, rows: int, cols: int) -> str | None:
        if rows % 8:
            return (f"the {rows} output features of this [{rows}, {cols}] projection are not whole AWQ words "
                    "(8 an int32)")
        if cols % self.group:
            return (f"{self.config}.group_size={self.group} does not divide the {cols} input features of this "
                    f"[{rows}, {cols}] projection; moe's int4 groups must tile the input features")
        return None

    def decode(self, t: dict[str, torch.Tensor], rows: int, cols: int, at: At) -> Decoded:
        check_finite(t["scales"], at("scales"))
        codes = unpack_int32(t["qweight"], 4, dim=1, order=AWQ_ORDER).T  # [out, in]
        zeros = unpack_int32(t["qzeros"], 4, dim=1, order=AWQ_ORDER).T  # [out, groups]
        return Decoded(pack_nibbles(codes), t["scales"].T.contiguous(), zeros.to(torch.uint8).contiguous())

    def encode(self, d: Decoded, rows: int, cols: int, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
        assert d.zero is not None
        return {"qweight": pack_int32(unpack_nibbles(d.data).T, 4, dim=1, order=AWQ_ORDER),
                "qzeros": pack_int32(d.zero.T, 4, dim=1, order=AWQ_ORDER),
                "scales": d.scale.T.to(dtypes["scales"]).contiguous()}


@register_format
class AWQ(CheckpointFormat):
    method = "awq"
    data_suffixes = ("qweight",)

    def __init__(self, codec: AWQCodec, skip: tuple[str, ...]) -> None:
        self.codec = codec
        self.skip = skip

    @classmethod
    def parse(cls, config: Mapping[str, Any], where: str) -> AWQ:
        def bad(name: str, value: object, allowed: str) -> CheckpointError:
            return unsupported(where, "awq", name, value, allowed)

        bits = config.get("bits", config.get("w_bit", 4))
        group = config.get("group_size", config.get("q_group_size", 128))
        version = config.get("version", "gemm")
        if bits != 4:
            raise bad("bits", bits, "4")
        if not isinstance(version, str) or version.lower() != "gemm":
            raise bad("version", version, "'gemm' (qweight [in, out / 8] in the order 0, 2, 4, 6, 1, 3, 5, 7)")
        if config.get("zero_point", True) is not True:
            raise bad("zero_point", config.get("zero_point"), "true (w4a16_zp)")
        if not isinstance(group, int) or group < 2 or group % 2:
            raise bad("group_size", group, "an even group of input features (32, 64, 128)")
        skip = config.get("modules_to_not_convert") or []
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            raise bad("modules_to_not_convert", skip, "a list of module names")
        return cls(AWQCodec(group), tuple(skip))

    def encoding(self, module: str) -> Encoding:
        if any(matches_module(module, pattern) for pattern in self.skip):
            return Encoding(None)
        return Encoding(self.codec.quant, codec=self.codec)
