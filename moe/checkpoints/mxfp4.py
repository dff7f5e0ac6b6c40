"""gpt-oss MXFP4 checkpoints (``quant_method: mxfp4``).

The experts are fused: ``{prefix}.gate_up_proj_blocks`` uint8 [E, 2N, K / 32, 16] (each block of 32
e2m1 codes in 16 bytes, the even element in the low nibble), ``gate_up_proj_scales`` uint8 [E, 2N, K / 32]
(e8m0: ``2^(byte - 127)``), ``gate_up_proj_bias`` [E, 2N], and ``down_proj_blocks`` [E, K, N / 32, 16],
``down_proj_scales`` [E, K, N / 32], ``down_proj_bias`` [E, K]. The rows of ``gate_up`` *interleave* gate
and up (row 2j is gate j, row 2j + 1 up j); moe's w13 holds the gate rows, then the up rows, so loading
takes every other row (a tensor-parallel rank reads its rows 2 r0 .. 2 (r0 + n) once). Blocks and scales
are moe's ``mxfp4`` storage as they are (reshaped); the biases load into ``w13_bias`` / ``w2_bias`` in the
layer's dtype. ``modules_to_not_convert`` lists float modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .base import CheckpointFormat, Encoding, matches_module, register_format
from .codec import FLOATS, At, Codec, Decoded, Dim, Part
from .source import CheckpointError

__all__ = ["GptOssMXFP4", "MXFP4Codec"]

BLOCK = 32


@dataclass(frozen=True)
class MXFP4Codec(Codec):
    interleaved: ClassVar[bool] = True

    @property
    def quant(self) -> str:
        return "mxfp4"

    def parts(self) -> tuple[Part, ...]:
        block = Dim("in", BLOCK, what=f"MXFP4 block of {BLOCK}")
        return (Part("blocks", "data", (Dim("out"), block, Dim(None, size=BLOCK // 2)), (torch.uint8,)),
                Part("scales", "scale", (Dim("out"), block), (torch.uint8,)),
                Part("bias", "bias", (Dim("out"),), FLOATS))

    def check_sizes(self, rows: int, cols: int) -> str | None:
        if cols % BLOCK:
            return (f"the {cols} input features of this [{rows}, {cols}] projection are not whole MXFP4 blocks of "
                    f"{BLOCK}")
        return None

    def decode(self, t: dict[str, torch.Tensor], rows: int, cols: int, at: At) -> Decoded:
        return Decoded(t["blocks"].reshape(rows, cols // 2).contiguous(), t["scales"].contiguous(), bias=t["bias"])

    def encode(self, d: Decoded, rows: int, cols: int, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
        assert d.bias is not None
        return {"blocks": d.data.reshape(rows, cols // BLOCK, BLOCK // 2), "scales": d.scale,
                "bias": d.bias.to(dtypes["bias"])}


@register_format
class GptOssMXFP4(CheckpointFormat):
    method = "mxfp4"
    data_suffixes = ("blocks",)

    def __init__(self, skip: tuple[str, ...]) -> None:
        self.skip = skip
        self.codec = MXFP4Codec()

    @classmethod
    def parse(cls, config: Mapping[str, Any], where: str) -> GptOssMXFP4:
        skip = config.get("modules_to_not_convert") or []
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            raise CheckpointError(f"{where}: quantization_config.modules_to_not_convert={skip!r} is not supported for "
                                  "quant_method 'mxfp4'; allowed: a list of module names")
        return cls(tuple(skip))

    def encoding(self, module: str) -> Encoding:
        if any(matches_module(module, pattern) for pattern in self.skip):
            return Encoding(None)
        return Encoding("mxfp4", codec=self.codec)
