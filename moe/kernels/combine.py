"""The weighted combine shared by the backends that compute per-pair expert outputs."""

from __future__ import annotations

import torch

from .host import cdiv, interpreting, next_pow2, pdl_option
from .launch import launch

__all__ = ["combine"]


def combine(y: torch.Tensor, ids: torch.Tensor, topk_w: torch.Tensor, out: torch.Tensor, *, top_k: int,
            num_global: int, num_local: int, expert_map: torch.Tensor | None = None,
            weight_on_input: bool = False, pdl: bool = False, splits: int = 1,
            rows: torch.Tensor | None = None) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * y[t * k + j]`` (fp32, fixed order) from per-pair outputs ``y`` [T*k, K]
    (unit stride along K); ``ids``/``topk_w`` flat [T*k]. Pairs that are not local (``expert_map``), or
    whose ids are out of range, add nothing. ``out`` [T, K] may have any strides. ``weight_on_input``:
    the router weights were applied to the input, so the pairs are summed unweighted. ``pdl``: launched
    to wait on the GPU for the kernel that wrote ``y`` (a chained GEMM). ``splits`` > 1: ``y`` is
    [splits * T*k, K] fp32, each pair's output the sum of its ``splits`` partial sums (a split-K GEMM's),
    rounded to ``out``'s dtype before the weighting. ``rows`` [T*k] (int32/int64, each in range of ``y``'s
    rows): pair p's output is ``y[rows[p]]`` (rows grouped by expert, as a library GEMM wrote them: no copy
    back to pair order); a pair that is not local may point at any row."""
    if rows is not None and splits != 1:
        raise ValueError(f"combine: rows index one output per pair; got splits={splits}")
    num_tokens, hidden = out.shape
    expert_map = expert_map.contiguous() if expert_map is not None else None  # indexed as a flat array
    interp = interpreting()
    block = min(64 if interp else 1024, next_pow2(hidden))
    launch(
        _kernel[0] if _kernel else _load(), (num_tokens, cdiv(hidden, block)), y.device,
        y, ids, expert_map if expert_map is not None else ids, topk_w, rows if rows is not None else ids, out,
        hidden, num_global, num_local, y.stride(0), y.stride(0) * num_tokens * top_k, out.stride(0), out.stride(1),
        TOP_K=top_k, HAS_MAP=expert_map is not None, WEIGHT_ON_INPUT=weight_on_input, SPLITS=splits,
        HAS_ROWS=rows is not None, BLOCK=block,
        INTERP=interp, PDL=pdl, **pdl_option(pdl),
    )
    return out


_kernel: list = []


def _load():
    from ._combine import moe_combine  # imports triton: only when a combine runs

    _kernel.append(moe_combine)
    return moe_combine
