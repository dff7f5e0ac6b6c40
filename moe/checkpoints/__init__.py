"""Quantized checkpoints: load a layer's experts as they are stored, keep them quantized, export them again.

    from moe.checkpoints import checkpoint_scheme, export_experts, load_experts

    prefix = "model.layers.3.mlp.experts"
    quant = checkpoint_scheme(path, prefix, num_experts=256)     # e.g. "fp8_block"
    layer = moe.FusedMoE(256, 8, 7168, 2048, quant=quant, device="meta", gate=False)
    load_experts(layer, path, prefix)                            # only this rank's experts and slice
    tensors = export_experts(layer)                              # the file's own tensors, bit for bit

Formats (one module each, behind :class:`CheckpointFormat`; ``FORMATS`` lists them by ``quant_method``):
DeepSeek-V3/R1 and Qwen3 FP8 (``fp8``), compressed-tensors W8A8 and pack-quantized INT4/INT8
(``compressed-tensors``), GPTQ v1/v2 (``gptq``), AWQ (``awq``), gpt-oss MXFP4 (``mxfp4``) and ModelOpt
NVFP4 (``modelopt``). See docs/checkpoints.md.
"""

from __future__ import annotations

from . import awq, compressed, fp8, gptq, modelopt, mxfp4  # noqa: F401  (register their formats)
from .base import FORMATS, CheckpointFormat, Encoding, matches_module, parse_format, register_format
from .codec import Codec, Decoded, Dim, Part
from .loader import CheckpointInfo, checkpoint_scheme, export_experts, find_experts, load_experts
from .names import ExpertNaming, find_naming
from .shared import QuantizedMLP, load_mlp
from .source import CheckpointError, SafetensorsSource, StateDictSource, TensorSource, open_source

__all__ = [
    "FORMATS",
    "CheckpointError",
    "CheckpointFormat",
    "CheckpointInfo",
    "Codec",
    "Decoded",
    "Dim",
    "Encoding",
    "ExpertNaming",
    "Part",
    "QuantizedMLP",
    "SafetensorsSource",
    "StateDictSource",
    "TensorSource",
    "checkpoint_scheme",
    "export_experts",
    "find_experts",
    "find_naming",
    "load_experts",
    "load_mlp",
    "matches_module",
    "open_source",
    "parse_format",
    "register_format",
]
