"""The torch grouped-GEMM backend: two ``torch._grouped_mm`` calls in our pipeline around a library's grouped
GEMM (``moe.kernels.pipeline``: the alignment groups the pairs by expert, one launch activates GEMM1's rows,
the combine reads each pair's row of GEMM2's output). It is both a user option and the comparison row of
every benchmark.

``fp8_channel`` (e4m3 weights with per-output-channel scales, dynamic per-token activations) runs through
``torch._scaled_grouped_mm`` with row-wise scales, where torch has it on the device: each GEMM's input
rows quantized by our ``quantize_rows`` kernel, the weights as stored (never dequantized).
"""

from __future__ import annotations

import functools

import torch

from ..contract import ExpertsArgs, ExpertsProblem
from ..kernels.pipeline import grouped_pipeline
from ..kernels.quant import quantize_rows
from ..quant import QuantizedWeight

__all__ = ["BACKEND", "grouped_experts"]



@functools.cache
def _unavailable() -> str | None:
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm (needs torch >= 2.8)"
    try:
        import triton  # noqa: F401  (the alignment and combine kernels)
    except ImportError as exc:
        return f"needs triton for its alignment and combine kernels ({exc}); pip install 'moe-layer[triton]'"
    return None


def _aligned(w: torch.Tensor) -> torch.Tensor:
    """``w`` as torch._grouped_mm takes it: 16-byte aligned base and strides (a copy of a weight view
    that is not, e.g. a column slice; a contiguous weight passes as it is)."""
    elt = w.element_size()
    if w.data_ptr() % 16 == 0 and w.stride(-1) == 1 and all(s * elt % 16 == 0 for s in w.stride()[:-1]):
        return w
    return w.contiguous()


def _grouped_mm(a: torch.Tensor, w: torch.Tensor | QuantizedWeight, offs: torch.Tensor,
                problem: ExpertsProblem) -> torch.Tensor:
    """``a`` [P, K] @ each expert's ``w`` [E, rows, K] transposed -> [P, rows] in ``a``'s dtype; fp8
    weights take ``a`` quantized per row and the row-wise scaled grouped GEMM."""
    if not isinstance(w, QuantizedWeight):
        return torch._grouped_mm(a, _aligned(w).transpose(1, 2), offs=offs)
    q = quantize_rows(a, problem.quant.activations)
    return torch._scaled_grouped_mm(q.data, _aligned(w.data).transpose(1, 2), q.scale, w.scale, offs=offs,
                                    out_dtype=a.dtype)


def grouped_experts(args: ExpertsArgs, problem: ExpertsProblem, out: torch.Tensor) -> torch.Tensor:
    return grouped_pipeline(args, problem, out, lambda a, w, ends: _grouped_mm(a, w, ends, problem))


def _supports_quant(problem: ExpertsProblem) -> tuple[bool, str]:
    q = problem.quant
    if not q.is_quantized:
        return True, "ok"
    if q.key() != "fp8_channel":
        return False, f"quantized: fp8_channel only (torch._scaled_grouped_mm with row-wise scales), got {q.key()}"
    target = problem.target
    if target is None or target.vendor != "cuda":
        return False, "fp8_channel: torch._scaled_grouped_mm runs on CUDA only"
    if not hasattr(torch, "_scaled_grouped_mm"):
        return False, f"fp8_channel: torch {torch.__version__} has no torch._scaled_grouped_mm"
    if not target.fp8_mma or not (target.wgmma or target.tcgen05):
        return False, f"fp8_channel: torch._scaled_grouped_mm needs Hopper or Blackwell FP8 MMA; {target.describe()}"
    if problem.hidden_size % 16 or problem.intermediate_size % 16:
        return False, (f"fp8_channel: torch._scaled_grouped_mm needs 16-byte fp8 rows: K={problem.hidden_size} and "
                       f"N={problem.intermediate_size} must be multiples of 16")
    return True, "ok"


class TorchGroupedBackend:
    name = "torch_grouped"
    schemes = ("none", "fp8_channel")
    w8a8_gemm1_rounded = True  # its GEMM1 writes bf16 before our activation (contract.gemm1_rounding)

    @property
    def priority(self) -> int:
        return 10 if torch.cuda.is_available() else -20

    def priority_for(self, target) -> int:
        return -20 if target.vendor == "cpu" else 10

    def is_available(self) -> tuple[bool, str]:
        err = _unavailable()
        return (False, err) if err else (True, "ok")

    def supports(self, problem: ExpertsProblem) -> tuple[bool, str]:
        target = problem.target
        elt = problem.dtype.itemsize
        if (problem.hidden_size * elt) % 16 or (problem.intermediate_size * elt) % 16:
            return False, (f"torch._grouped_mm needs 16-byte aligned rows: K={problem.hidden_size} and "
                           f"N={problem.intermediate_size} must be multiples of {16 // elt} for {problem.dtype}")
        if target is None:
            return False, "no device target: the device's features decide (give one, e.g. moe.target.TARGETS['h200'])"
        if target.vendor == "cuda":
            if problem.dtype != torch.bfloat16:
                return False, f"torch._grouped_mm on CUDA takes bfloat16 only, got {problem.dtype}"
            if not (target.wgmma or target.tcgen05):
                return False, (f"torch._grouped_mm's fast path needs Hopper or Blackwell datacenter MMA (wgmma or "
                               f"tcgen05); {target.describe()} has neither")
            return _supports_quant(problem)
        if problem.quant.is_quantized:
            return _supports_quant(problem)
        if target.vendor == "cpu":
            if not target.triton_interpreter:
                return False, "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1) for the alignment kernel"
            if problem.dtype not in (torch.float32, torch.bfloat16):
                return False, f"CPU torch._grouped_mm: float32 or bfloat16, got {problem.dtype}"
            return True, "ok"
        return False, f"{target.describe()}: CUDA (Hopper or Blackwell), or CPU under the Triton interpreter"

    def apply(self, args: ExpertsArgs, problem: ExpertsProblem, out: torch.Tensor) -> None:
        grouped_experts(args, problem, out)


BACKEND = TorchGroupedBackend()
