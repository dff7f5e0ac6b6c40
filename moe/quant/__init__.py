"""Quantization schemes. Today only the scheme types exist (``moe.config.QuantScheme``, kind ``none``);
quantize/dequantize and packing for FP8, INT8, INT4 and MXFP4/NVFP4 land here."""

from ..config import QuantConfig, QuantScheme

__all__ = ["QuantConfig", "QuantScheme"]
