"""The project's one tolerance table and comparison, used by every test and by ``moe bench``.

Errors are norm-relative against a float64 reference: ``||out - ref|| / ||ref||``.

Rows and why (measured this session on the parity cases, CPU and H200):
- float32 1e-5: fp32 accumulation measures 1e-7 to 3e-7 (reference, Triton, torch_grouped); 1e-5 leaves
  headroom for GPU reduction orders at large K without hiding a wrong term (a dropped bias or slot
  moves the error to 1e-2 or more).
- bfloat16 1e-2: bf16 keeps 8 mantissa bits (unit roundoff 3.9e-3); inputs, the activated intermediate
  and the output are each rounded once, which measures 1.8e-3 to 5e-3 (CPU and H200, T up to 16385).
- float16 2e-3: 11 mantissa bits (4.9e-4 roundoff); the same three roundings measure 2.7e-4 to 6.3e-4.
- float64 1e-12: the reference itself.
Changing a row needs a measurement that justifies it, written here.
"""

from __future__ import annotations

import torch

__all__ = ["TOLERANCES", "assert_close", "rel_error"]

TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 2e-3,
}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-relative error of ``out`` against ``ref`` in float64; inf if ``out`` has NaN or inf."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, what: str = "") -> None:
    """Fail unless ``out`` matches ``ref`` within the tolerance row of ``dtype`` (default: out's dtype)."""
    dtype = dtype or out.dtype
    if out.shape != ref.shape:
        raise AssertionError(f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    tol = TOLERANCES[dtype]
    err = rel_error(out, ref)
    if not err <= tol:
        raise AssertionError(f"{what}: norm-relative error {err:.3e} > {tol:.0e} ({dtype})")
