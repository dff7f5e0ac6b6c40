"""NVIDIA ModelOpt NVFP4 exports (``quant_method: modelopt``, ``quant_algo: NVFP4``; a checkpoint with
only ``hf_quant_config.json`` reads as the same).

Each projection [out, in] stores ``weight`` uint8 [out, in / 2] (two e2m1 codes a byte, the even element
in the low nibble), ``weight_scale`` float8_e4m3fn [out, in / 16], ``weight_scale_2`` fp32 (a scalar:
the global multiplier, ``w = e2m1 * weight_scale * weight_scale_2``) and ``input_scale`` fp32 (the static
activation scale of W4A4 kernels). moe's ``nvfp4`` is weight-only (bf16 activations): data and block
scales are its storage as they are, ``weight_scale_2`` of w1, w3 and w2 its ``global_scale`` [E, P]; the
input scales are kept as read and written back by export. ``exclude_modules`` (or ``ignore``) lists float
modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .base import CheckpointFormat, Encoding, matches_module, register_format, unsupported
from .codec import At, Codec, Decoded, Dim, Part, check_finite
from .source import CheckpointError

__all__ = ["ModelOptNVFP4", "NVFP4Codec"]

GROUP = 16


@dataclass(frozen=True)
class NVFP4Codec(Codec):
    @property
    def quant(self) -> str:
        return "nvfp4"

    def parts(self) -> tuple[Part, ...]:
        return (Part("weight", "data", (Dim("out"), Dim("in", 2, what="packing of 2 codes a byte")), (torch.uint8,)),
                Part("weight_scale", "scale", (Dim("out"), Dim("in", GROUP, what=f"NVFP4 block of {GROUP}")),
                     (torch.float8_e4m3fn,)),
                Part("weight_scale_2", "global_scale", (), (torch.float32,)),
                Part("input_scale", "kept", (), (torch.float32,), required=False))

    def check_sizes(self, rows: int, cols: int) -> str | None:
        if cols % GROUP:
            return (f"the {cols} input features of this [{rows}, {cols}] projection are not whole NVFP4 blocks of "
                    f"{GROUP}")
        return None

    def decode(self, t: dict[str, torch.Tensor], rows: int, cols: int, at: At) -> Decoded:
        check_finite(t["weight_scale"], at("weight_scale"), positive=False)
        check_finite(t["weight_scale_2"], at("weight_scale_2"))
        return Decoded(t["weight"].contiguous(), t["weight_scale"].contiguous(), global_scale=t["weight_scale_2"])

    def encode(self, d: Decoded, rows: int, cols: int, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
        assert d.global_scale is not None
        return {"weight": d.data, "weight_scale": d.scale, "weight_scale_2": d.global_scale.to(torch.float32)}


def _field(config: Mapping[str, Any], name: str) -> Any:
    """A field of the config or of its ``quantization`` section (hf_quant_config.json's layout)."""
    nested = config.get("quantization")
    return config.get(name, nested.get(name) if isinstance(nested, Mapping) else None)


@register_format
class ModelOptNVFP4(CheckpointFormat):
    method = "modelopt"

    def __init__(self, skip: tuple[str, ...]) -> None:
        self.skip = skip
        self.codec = NVFP4Codec()

    @classmethod
    def parse(cls, config: Mapping[str, Any], where: str) -> ModelOptNVFP4:
        algo, group = _field(config, "quant_algo"), _field(config, "group_size")
        if not isinstance(algo, str) or algo.upper() != "NVFP4":
            raise unsupported(where, "modelopt", "quant_algo", algo, "'NVFP4' (moe's nvfp4, weight-only)")
        if group not in (None, GROUP):
            raise CheckpointError(f"{where}: quantization_config.group_size={group!r} is not supported for NVFP4; "
                                  f"allowed: {GROUP}")
        skip = _field(config, "exclude_modules") or _field(config, "ignore") or []
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            raise CheckpointError(f"{where}: quantization_config.exclude_modules={skip!r} is not supported; allowed: a "
                                  "list of module names (or patterns with *)")
        return cls(tuple(skip))

    def encoding(self, module: str) -> Encoding:
        if any(matches_module(module, pattern) for pattern in self.skip):
            return Encoding(None)
        return Encoding("nvfp4", codec=self.codec)

