"""Quantization: schemes (one per operand), quantized weight storage, quantize / dequantize.

    qw13 = moe.quant.quantize(w13, moe.quant.named("fp8_channel").weights, parts=2)
    y = moe.fused_experts(x, qw13, qw2, weights, ids, quant="fp8_channel")

``NAMES`` lists the named configurations; ``named(name)`` returns one. ``quantize_(module, config)``
converts the ``FusedMoE`` layers of a module in place.
"""

from __future__ import annotations

from torch import nn

from .schemes import NAMES, SCALED, ActivationScheme, QuantConfig, WeightScheme, named, scheme_key
from .weights import QuantizedWeight, check_quantized_weight, dequantize, quantize, scale_shape

__all__ = [
    "NAMES",
    "SCALED",
    "ActivationScheme",
    "QuantConfig",
    "QuantizedWeight",
    "WeightScheme",
    "check_quantized_weight",
    "dequantize",
    "named",
    "quantize",
    "quantize_",
    "scale_shape",
    "scheme_key",
]


def quantize_(module: nn.Module, config: str | QuantConfig) -> nn.Module:
    """Convert every ``FusedMoE`` inside ``module`` (itself included) to ``config`` (a name of
    :data:`NAMES` or a :class:`QuantConfig`), in place; returns ``module``. A layer converts itself
    through its ``quantize_experts_`` method, so this walks modules without importing the layer."""
    cfg = QuantConfig.parse(config)
    if not cfg.is_quantized:
        raise ValueError(f"quantize_: {config!r} is not quantized; give a name of {', '.join(NAMES)}")
    layers = [m for m in module.modules() if callable(getattr(m, "quantize_experts_", None))]
    if not layers:
        raise ValueError(f"quantize_: {type(module).__name__} holds no FusedMoE layer to quantize")
    for layer in layers:
        layer.quantize_experts_(cfg)
    return module
