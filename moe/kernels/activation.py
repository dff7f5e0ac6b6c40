"""The activation between two library GEMMs, on the device in one launch: [rows, 2N] (gate columns, then up
columns) or [rows, N] in, [rows, N] out, fp32 arithmetic (the Triton GEMM1 epilogue's code, ``_activation.py``),
rounded to the output's dtype. For backends whose GEMM1 is not ours (``deep_gemm``): the torch expression
of ``moe.activations`` reads and writes the rows four to six times (an fp32 copy, each half, the product).
"""

from __future__ import annotations

import torch

from ..config import ActivationSpec
from .host import cdiv, interpreting, next_pow2
from .launch import launch

__all__ = ["ACT_CODES", "activate_rows"]

# the ACT codes of every activation kernel (moe.kernels._activation.activate); here so it imports without triton
ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "swigluoai": 3, "relu2": 4, "silu_no_mul": 5, "gelu_no_mul": 6}


def activate_rows(h: torch.Tensor, spec: ActivationSpec, out: torch.Tensor | None = None) -> torch.Tensor:
    """``spec`` of ``h`` [rows, 2N] (gated) or [rows, N] (unit stride along the columns) into ``out``
    [rows, N] (made in ``h``'s dtype when None; unit column stride)."""
    rows, cols = h.shape
    n = cols // 2 if spec.gated else cols
    if out is None:
        out = torch.empty(rows, n, dtype=h.dtype, device=h.device)
    if h.stride(1) != 1 or out.stride(1) != 1 or out.shape != (rows, n):
        raise ValueError(f"activate_rows: h [rows, {'2N' if spec.gated else 'N'}] and out [rows, N] need unit "
                         f"column strides, got h {tuple(h.shape)} strides {h.stride()}, out {tuple(out.shape)} "
                         f"strides {out.stride()}")
    if rows == 0:
        return out
    from ._activation import activate_rows as kernel  # imports triton: only when it runs

    block = min(256 if interpreting() else 1024, next_pow2(n))
    launch(kernel, (rows, cdiv(n, block)), h.device, h, out, n, h.stride(0), out.stride(0),
           float(spec.alpha), float(spec.limit), ACT=ACT_CODES[spec.name], GATED=spec.gated, BLOCK=block,
           INTERP=interpreting())
    return out
