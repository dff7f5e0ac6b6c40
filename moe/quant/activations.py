"""Activation quantization, the reference every kernel matches.

Dynamic scales come from the data of each call: the absolute max of a row (``token``), of each group of
``group_size`` elements of a row (``group``), or of the whole tensor (``tensor``), divided by the format's
largest value (448 for e4m3, 127 for int8); an all-zero row, group or tensor gets scale 1. Static scales
are given. Quantization multiplies by the scale's reciprocal (``1 / scale`` rounded to nearest in fp32, once
a scale: one rounded product an element, bitwise the same on the CPU, on CUDA and in every kernel) and rounds
to nearest (even), saturating at the largest value; the dequantized value is ``q * scale``.
"""

from __future__ import annotations

import torch

from .schemes import FORMAT_MAX, STORAGE_DTYPES, ActivationScheme, scale_from_amax

__all__ = ["activation_scale", "dequantize_activations", "quantize_activations", "storage_dtype"]


def storage_dtype(scheme: ActivationScheme) -> torch.dtype:
    return STORAGE_DTYPES[scheme.format]


def activation_scale(x: torch.Tensor, scheme: ActivationScheme) -> torch.Tensor:
    """The dynamic scale of ``x`` [rows, K] (fp32): [rows] per token, [rows, ceil(K/G)] per group, [1] per
    tensor."""
    a = x.detach().to(torch.float32).abs()
    if scheme.granularity == "token":
        amax = a.amax(dim=-1) if a.shape[-1] else a.new_zeros(a.shape[0])
    elif scheme.granularity == "group":
        g = scheme.group_size
        rows, k = a.shape
        groups = -(-k // g)
        padded = a.new_zeros(rows, groups * g)
        padded[:, :k] = a
        amax = padded.view(rows, groups, g).amax(dim=-1)
    else:
        amax = a.amax().reshape(1) if a.numel() else a.new_zeros(1)
    return scale_from_amax(amax, scheme.format)


def _expand(scale: torch.Tensor, rows: int, k: int, scheme: ActivationScheme) -> torch.Tensor:
    """The scale broadcast over [rows, K]: [rows] per token, [rows, groups] per group, [1] per tensor."""
    if scheme.granularity == "token":
        return scale.reshape(rows, 1)
    if scheme.granularity == "group":
        return scale.repeat_interleave(scheme.group_size, dim=-1)[:, :k]
    return scale.reshape(1, 1)


def quantize_activations(x: torch.Tensor, scheme: ActivationScheme,
                         scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) of ``x`` [rows, K]: ``scale`` given (static), or dynamic from the data."""
    s = activation_scale(x, scheme) if scale is None else scale.to(torch.float32)
    rows, k = x.shape
    # times the scale's reciprocal (IEEE, once a scale), as the kernels do: the same rounding on every device
    v = x.to(torch.float32) * _expand(torch.reciprocal(s), rows, k, scheme)
    top = FORMAT_MAX[scheme.format]
    if scheme.format == "int8":
        v = v.round()
    return v.clamp(-top, top).to(storage_dtype(scheme)), s


def dequantize_activations(q: torch.Tensor, scale: torch.Tensor, scheme: ActivationScheme,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, k = q.shape
    return (q.to(torch.float32) * _expand(scale.to(torch.float32), rows, k, scheme)).to(dtype)
