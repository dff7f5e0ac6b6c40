"""Activation quantization on the device: a GEMM's input rows quantized to FP8 or INT8 with their scales,
as ``moe.quant.activations`` defines (one launch; a per-tensor dynamic scale takes one more, the amax).

Shared by every backend that computes W8A8 GEMMs; the kernels are in _quant.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant.activations import storage_dtype
from ..quant.schemes import ActivationScheme, scale_from_amax
from .host import interpreting, next_pow2, pdl_option
from .launch import launch

__all__ = ["QuantizedRows", "RowLayout", "quantize_rows"]


@dataclass(frozen=True)
class QuantizedRows:
    """A GEMM input [rows, K] in FP8/INT8 and its scales: [rows] per token, [rows, groups] per group, [1] per
    tensor, or [E] per expert (static, indexed by each row's expert)."""

    data: torch.Tensor
    scale: torch.Tensor


def _kernels():
    from . import _quant  # imports triton: only when something is quantized

    return _quant


@dataclass(frozen=True)
class RowLayout:
    """Which pair and expert each row of a GEMM's intermediate holds: sorted row tiles from the alignment
    (``sorted_ids``, ``block_expert``, ``rows_per_tile``), or one pair a row (``direct``, experts from the
    routing ``ids`` through ``expert_map``)."""

    sorted_ids: torch.Tensor | None
    block_expert: torch.Tensor | None
    rows_per_tile: int
    ids: torch.Tensor
    expert_map: torch.Tensor | None
    num_pairs: int
    num_global: int
    num_local: int


def quantize_rows(x: torch.Tensor, scheme: ActivationScheme, *, static: torch.Tensor | None = None,
                  amax: torch.Tensor | None = None, layout: RowLayout | None = None,
                  pdl: bool = False) -> QuantizedRows:
    """Quantize ``x`` [rows, K] (unit stride along K).

    ``static``: given scale(s), [1], or [E] (then ``layout`` says each row's expert). ``amax``: for a
    dynamic per-tensor scale, an fp32 [1] buffer already holding the tensor's absolute max (gathered by
    the GEMM that wrote ``x``); without it one more launch computes it. ``layout``: ``x`` is a GEMM's
    intermediate; rows holding no pair are skipped (left unquantized: no GEMM stores their results)."""
    q_mod = _kernels()
    rows, k = x.shape
    q = torch.empty(rows, k, dtype=storage_dtype(scheme), device=x.device)
    fmt = q_mod.INT8 if scheme.format == "int8" else q_mod.FP8
    group = scheme.group_size or 1
    block = -(-max(min(256 if interpreting() else 4096, next_pow2(k)), group) // group) * group
    launch_args = dict(fmt=fmt, group=group, block=block, layout=layout, pdl=pdl)
    if static is not None:
        _launch(q_mod, x, q, static, static, q_mod.STATIC, per_expert=static.numel() > 1, **launch_args)
        return QuantizedRows(q, static)
    if scheme.granularity == "tensor":
        if amax is None and rows == 1:  # one row (one token): its scale is the tensor's, in one launch
            scale = torch.empty(1, dtype=torch.float32, device=x.device)
            _launch(q_mod, x, q, scale, scale, q_mod.TOKEN, **launch_args)
            return QuantizedRows(q, scale)
        if amax is None:
            amax = torch.zeros(1, dtype=torch.float32, device=x.device)
            _launch(q_mod, x, q, amax, amax, q_mod.AMAX, **launch_args)
        _launch(q_mod, x, q, amax, amax, q_mod.TENSOR, **launch_args)
        return QuantizedRows(q, scale_from_amax(amax, scheme.format))  # the kernel's scale
    if scheme.granularity == "group":
        scale = torch.empty(rows, -(-k // group), dtype=torch.float32, device=x.device)
        _launch(q_mod, x, q, scale, scale, q_mod.GROUP, **launch_args)
    else:
        scale = torch.empty(rows, dtype=torch.float32, device=x.device)
        _launch(q_mod, x, q, scale, scale, q_mod.TOKEN, **launch_args)
    return QuantizedRows(q, scale)


def _launch(q_mod, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, src: torch.Tensor, mode: int, *, fmt: int,
            group: int, block: int, layout: RowLayout | None, pdl: bool, per_expert: bool = False) -> None:
    rows, k = x.shape
    if rows == 0:
        return
    lay = layout
    ids = lay.ids if lay is not None else src
    sorted_ids = lay.sorted_ids if lay is not None and lay.sorted_ids is not None else ids
    block_expert = lay.block_expert if lay is not None and lay.block_expert is not None else ids
    emap = lay.expert_map if lay is not None else None
    launch(q_mod.quant_rows, (rows,), x.device, x, q, s, src, sorted_ids, block_expert, ids,
           emap if emap is not None else ids, k, x.stride(0), q.stride(0), s.stride(0),
           lay.num_pairs if lay else rows, lay.num_global if lay else 1, lay.num_local if lay else 1, MODE=mode,
           FMT=fmt, GROUP=group, BLOCK=block, PER_EXPERT=per_expert,
           SORTED=lay is not None and lay.sorted_ids is not None, ROWS_PER_EXPERT=lay.rows_per_tile if lay else 1,
           DIRECT=lay is not None and lay.sorted_ids is None, HAS_MAP=emap is not None, INTERP=interpreting(),
           PDL=pdl, num_warps=4 if block >= 1024 else 1, **pdl_option(pdl))
