"""DeepSeek-V3/R1 and Qwen3 FP8 checkpoints (``quant_method: fp8``).

Each projection stores ``weight`` float8_e4m3fn [out, in] and ``weight_scale_inv`` fp32
[ceil(out/128), ceil(in/128)], which despite its name multiplies: w = weight * scale_inv per 128x128
block. Activations are quantized per 1x128 group from each call's data: moe's ``fp8_block``.
``scale_fmt: ue8m0`` promises power-of-two scales (checked at load). ``modules_to_not_convert`` lists
modules stored unquantized.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import CheckpointFormat, Encoding, matches_module, register_format, unsupported
from .source import CheckpointError

__all__ = ["DeepSeekFP8"]

@register_format
class DeepSeekFP8(CheckpointFormat):
    method = "fp8"

    def __init__(self, config: Mapping[str, Any], skip: tuple[str, ...], ue8m0: bool) -> None:
        self.config = dict(config)
        self.skip = skip
        self.ue8m0 = ue8m0

    @classmethod
    def parse(cls, config: Mapping[str, Any], where: str) -> DeepSeekFP8:
        def bad(field: str, allowed: str) -> CheckpointError:
            return unsupported(where, "fp8", field, config.get(field), allowed)

        if config.get("fmt", "e4m3") != "e4m3":
            raise bad("fmt", "'e4m3'")
        if config.get("activation_scheme", "dynamic") != "dynamic":
            raise bad("activation_scheme", "'dynamic' (1x128 groups from each call's data)")
        if list(config.get("weight_block_size") or []) != [128, 128]:
            raise bad("weight_block_size", "[128, 128] (moe's fp8_block)")
        if config.get("scale_fmt") not in (None, "float", "ue8m0"):
            raise bad("scale_fmt", "'float', 'ue8m0' or absent")
        skip = config.get("modules_to_not_convert") or []
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            raise bad("modules_to_not_convert", "a list of module names")
        return cls(config, tuple(skip), config.get("scale_fmt") == "ue8m0")

    def encoding(self, module: str) -> Encoding:
        if any(matches_module(module, pattern) for pattern in self.skip):
            return Encoding(None)
        return Encoding("fp8_block", scale="weight_scale_inv", power_of_two=self.ue8m0)
