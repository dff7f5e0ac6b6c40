"""The DeepGEMM backend: DeepGEMM's grouped GEMMs for the two projections, our alignment, activation,
FP8 quantization of GEMM2's input and combine around them.

Two layouts, both without a host synchronization (so a CUDA graph captured once replays with any
routing):
- **contiguous** (prefill): the pairs grouped by expert by our alignment, padded to DeepGEMM's M
  alignment; each row's expert in ``grouped_layout``, -1 on padding rows (DeepGEMM skips them);
- **masked** (decode, up to ``MASKED_MAX_TOKENS`` tokens): one [max_rows] slab per local expert, the
  pair count of each expert in ``masked_m`` (device-side), ``expected_m`` the mean rows per expert.

DeepGEMM is imported only when this backend is judged or run. The package is ``sgl-deep-gemm`` (imports as
``deep_gemm``); PyPI's ``deep-gemm`` 1.0.0 is a placeholder. API (sgl-deep-gemm 0.1.4, read from its wheel's
``deep_gemm/__init__.py`` and sgl-project/DeepGEMM ``csrc/apis/gemm.hpp`` at release/v0.1.2, cc4a4ea):
- ``m_grouped_bf16_gemm_nt_contiguous(a [M, K], b [G, N, K], d [M, N], grouped_layout [M] int32,
  compiled_dims='nk', use_psum_layout=False, ensure_zero_padding=True, expected_m_for_psum_layout=None)``
- ``m_grouped_bf16_gemm_nt_masked(a [G, M, K], b [G, N, K], d [G, M, N], masked_m [G] int32, expected_m,
  compiled_dims='nk')``
- ``m_grouped_fp8_gemm_nt_contiguous`` / ``fp8_m_grouped_gemm_nt_masked``: the same with ``a`` and ``b`` as
  ``(data, scale)`` pairs (scales fp32 [M, K/128] and [G, N/128, K/128]; ``recipe=None`` infers 1x128 and
  128x128), aliases of ``m_grouped_fp8_fp4_gemm_nt_contiguous`` / ``m_grouped_fp8_fp4_gemm_nt_masked``,
  which take ``disable_ue8m0_cast``;
- ``get_mk_alignment_for_contiguous_layout() -> int`` (128).
Kernels compile at first use with nvcc >= 12.3 into ``$DG_JIT_CACHE_DIR`` (default ``~/.deep_gemm``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from ..contract import ExpertsArgs, ExpertsProblem
from ..kernels.activation import activate_rows
from ..kernels.align import Alignment, align, pair_rows
from ..kernels.combine import combine
from ..kernels.quant import quantize_rows
from ..options import options
from ..quant import QuantizedWeight

__all__ = ["BACKEND", "MASKED_MAX_TOKENS", "MaskedLayout", "contiguous_layout", "deep_gemm_experts", "jit_cache_dir",
           "masked_layout"]

INSTALL = "pip install 'sgl-deep-gemm==0.1.4' (built for torch 2.11; PyPI's deep-gemm is a placeholder)"
MIN_NVCC = (12, 3)
ALIGN_NK = 128  # N and K multiples of this: the GEMMs' N tile and the FP8 block
MASKED_MAX_TOKENS = 64  # up to this many tokens the masked (decode) layout runs
# The masked slabs' rows, a multiple of this: DeepGEMM's masked kernel stores whole BLOCK_M-row tiles (64 or
# 128 on SM90), so a slab shorter than its tile is overwritten by its neighbour's padding rows. With 16-row
# slabs the first H200 run failed every token count up to 16 (norm-relative errors 0.9-1.2); 64 rows passed
MASKED_ROW_TILE = 128
_FUNCTIONS = ("m_grouped_bf16_gemm_nt_contiguous", "m_grouped_bf16_gemm_nt_masked",
              "m_grouped_fp8_gemm_nt_contiguous", "fp8_m_grouped_gemm_nt_masked",
              "get_mk_alignment_for_contiguous_layout")


# An off switch for a card on which the GPU parity tests fail (a reason string), None while they pass. The
# first H200 run failed every token count up to 16 (16-row masked slabs, see MASKED_ROW_TILE); with 128-row
# slabs all 19 GPU tests of tests/test_deep_gemm.py passed on an H200 (2026-12-02).
HARDWARE_VERDICT: str | None = None


@functools.cache
def _import() -> tuple[ModuleType | None, str]:
    try:
        import deep_gemm
    except Exception as exc:  # ImportError, or the compiled part failing against this torch
        return None, f"deep_gemm does not import ({type(exc).__name__}: {exc}); {INSTALL}"
    missing = [f for f in _FUNCTIONS if not hasattr(deep_gemm, f)]
    if missing:
        return None, f"deep_gemm lacks {', '.join(missing)} (a different release?); {INSTALL}"
    return deep_gemm, "ok"


def _dg() -> ModuleType:
    module, reason = _import()
    if module is None:
        raise RuntimeError(reason)
    return module


def jit_cache_dir() -> Path:
    """Where DeepGEMM keeps its compiled kernels: ``$DG_JIT_CACHE_DIR``, else ``~/.deep_gemm``."""
    return Path(os.environ.get("DG_JIT_CACHE_DIR") or Path.home() / ".deep_gemm")


def _cache_problem() -> str | None:
    d = jit_cache_dir()
    probe = d if d.exists() else next((p for p in d.parents if p.exists()), None)
    if probe is None or not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        return f"DeepGEMM's JIT cache folder {d} is not writable; set DG_JIT_CACHE_DIR to a writable folder"
    return None


def _nvcc_problem(nvcc: str | None) -> str | None:
    if nvcc is None:
        return ("DeepGEMM compiles its kernels at first use with nvcc >= 12.3; the target has no nvcc (put it on "
                "PATH or set CUDA_HOME)")
    try:
        version = tuple(int(v) for v in nvcc.split(".")[:2])
    except ValueError:
        return f"cannot read the nvcc version {nvcc!r}; DeepGEMM needs nvcc >= 12.3"
    if version < MIN_NVCC:
        return f"DeepGEMM needs nvcc >= 12.3 to compile its kernels, found {nvcc}"
    return None


# ---------------------------------------------------------------- layouts (pure torch on the device)


def contiguous_layout(al: Alignment, num_pairs: int) -> torch.Tensor:
    """DeepGEMM's ``grouped_layout`` [rows] int32 for sorted rows: each row's local expert, -1 on padding
    rows and on row tiles past the end (the alignment's padding marker is ``num_pairs``)."""
    experts = al.block_expert.repeat_interleave(al.block_m)  # [rows]
    return torch.where(al.sorted_ids < num_pairs, experts, -1).to(torch.int32)


@dataclass(frozen=True)
class MaskedLayout:
    """Where each sorted row sits in the masked layout's [E, max_rows] slabs, and each expert's row count."""

    slot: torch.Tensor  # [P] int64: expert * max_rows + row within the expert; E * max_rows: not local
    masked_m: torch.Tensor  # [E] int32: rows in use in each slab
    max_rows: int
    expected_m: int  # DeepGEMM's hint for its tile choice: the mean rows per expert


def masked_layout(al: Alignment, num_pairs: int, num_tokens: int) -> MaskedLayout:
    """Masked layout from an alignment with a row tile of 1 (no padding): sorted row r of expert e goes
    to slab row ``r - start[e]``. A token sends at most one pair to each expert, so ``num_tokens`` rows
    (rounded up to ``MASKED_ROW_TILE``) a slab hold any routing. Rows of pairs that are not local (an
    expert map) go to one spare row past the slabs."""
    if al.block_m != 1:
        raise ValueError(f"alignment: the masked layout needs a row tile of 1, got block_m={al.block_m}")
    ends = al.expert_ends.long()  # [E]
    num_experts = ends.numel()
    counts = torch.diff(ends, prepend=ends.new_zeros(1))  # [E]
    max_rows = -(-max(1, num_tokens) // MASKED_ROW_TILE) * MASKED_ROW_TILE
    live = al.sorted_ids[:num_pairs] < num_pairs
    expert = al.block_expert[:num_pairs].clamp(min=0).long()  # row tile 1: each row's expert
    row = torch.arange(num_pairs, device=ends.device)
    slot = expert * max_rows + (row - (ends - counts).index_select(0, expert))
    slot = torch.where(live, slot, num_experts * max_rows)
    expected = max(1, -(-num_pairs // max(1, num_experts)))
    return MaskedLayout(slot, counts.to(torch.int32), max_rows, expected)


# ---------------------------------------------------------------- the pipeline


def _operand(w: torch.Tensor | QuantizedWeight) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if isinstance(w, QuantizedWeight):
        return w.data.contiguous(), w.scale.float().contiguous()
    return w.contiguous()


def _quantized(problem: ExpertsProblem) -> bool:
    return problem.quant.activations is not None


@dataclass(frozen=True)
class _Rows:
    """A GEMM input as DeepGEMM takes it: bf16 rows (``scale`` None), or fp8 rows and their fp32
    [rows, K/128] scales. Quantization is per row (1x128 groups), so rows quantize before they move."""

    data: torch.Tensor
    scale: torch.Tensor | None = None

    def operand(self):
        return self.data if self.scale is None else (self.data, self.scale)

    def select(self, index: torch.Tensor) -> _Rows:
        return _Rows(_bytes(self.data).index_select(0, index).view(self.data.dtype),
                     None if self.scale is None else self.scale.index_select(0, index))

    def scatter(self, slot: torch.Tensor, rows: int) -> _Rows:
        """These rows at ``slot`` of ``rows`` new rows; the rest are left unwritten (a GEMM row depends on its
        own input row only, and no unwritten row's output is read)."""
        data = torch.empty(rows, self.data.shape[1], dtype=self.data.dtype, device=self.data.device)
        _bytes(data).index_copy_(0, slot, _bytes(self.data))
        if self.scale is None:
            return _Rows(data)
        scale = torch.empty(rows, self.scale.shape[1], dtype=self.scale.dtype, device=self.scale.device)
        return _Rows(data, scale.index_copy_(0, slot, self.scale))

    def slabs(self, num_experts: int, max_rows: int) -> _Rows:
        """The first E * max_rows rows as [E, max_rows, ...] (a spare row past them is left out)."""
        def view(t: torch.Tensor) -> torch.Tensor:
            return t[:num_experts * max_rows].reshape(num_experts, max_rows, t.shape[-1])

        return _Rows(view(self.data), None if self.scale is None else view(self.scale))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t  # index kernels for fp8 rows: as bytes


def _gemm_input(x: torch.Tensor, problem: ExpertsProblem) -> _Rows:
    if not _quantized(problem):
        return _Rows(x)
    q = quantize_rows(x.contiguous(), problem.quant.activations)
    return _Rows(q.data, q.scale)


def _fp8_kwargs(problem: ExpertsProblem) -> dict[str, bool]:
    # supports() admits fp32 scales on SM100 only with the option; DeepGEMM then casts them to UE8M0
    return {"disable_ue8m0_cast": not options().deep_gemm_ue8m0} if problem.target.tcgen05 else {}


def _gemm(problem: ExpertsProblem, masked: bool):
    dg, quant = _dg(), _quantized(problem)
    if masked:
        fn = dg.fp8_m_grouped_gemm_nt_masked if quant else dg.m_grouped_bf16_gemm_nt_masked
    else:
        fn = dg.m_grouped_fp8_gemm_nt_contiguous if quant else dg.m_grouped_bf16_gemm_nt_contiguous
    return fn, (_fp8_kwargs(problem) if quant else {})


def _contiguous(args: ExpertsArgs, problem: ExpertsProblem, xs: _Rows, al: Alignment, num_pairs: int,
                dtype: torch.dtype) -> torch.Tensor:
    """[rows, K] expert outputs of the sorted rows (contiguous layout)."""
    gemm, extra = _gemm(problem, masked=False)
    layout = contiguous_layout(al, num_pairs)
    rows, dev = xs.data.shape[0], xs.data.device
    h = torch.empty(rows, args.w13.shape[1], dtype=dtype, device=dev)
    gemm(xs.operand(), _operand(args.w13), h, layout, **extra)
    y = torch.empty(rows, problem.hidden_size, dtype=dtype, device=dev)
    gemm(_gemm_input(activate_rows(h, problem.activation), problem).operand(), _operand(args.w2), y, layout,
         **extra)
    return y


def _masked(args: ExpertsArgs, problem: ExpertsProblem, xs: _Rows, ml: MaskedLayout,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[E * max_rows, K] expert outputs in the slabs and the row of each sorted row (masked layout). Only the
    P rows in use move, activate and quantize; the slabs' other rows are never written nor read."""
    gemm, extra = _gemm(problem, masked=True)
    E, K, dev = problem.num_experts, problem.hidden_size, xs.data.device
    used = E * ml.max_rows
    rows = ml.slot.clamp(max=used - 1)  # non-local rows read any row: dropped later
    h = torch.empty(E, ml.max_rows, args.w13.shape[1], dtype=dtype, device=dev)
    gemm(xs.scatter(ml.slot, used + 1).slabs(E, ml.max_rows).operand(), _operand(args.w13), h, ml.masked_m,
         ml.expected_m, **extra)
    a = activate_rows(h.reshape(used, -1).index_select(0, rows), problem.activation)  # [P, N]
    a_in = _gemm_input(a, problem).scatter(ml.slot, used + 1).slabs(E, ml.max_rows)
    y = torch.empty(E, ml.max_rows, K, dtype=dtype, device=dev)
    gemm(a_in.operand(), _operand(args.w2), y, ml.masked_m, ml.expected_m, **extra)
    return y.reshape(used, K), rows


def deep_gemm_experts(args: ExpertsArgs, problem: ExpertsProblem, out: torch.Tensor) -> torch.Tensor:
    x, ids = args.hidden_states, args.topk_ids.reshape(-1).contiguous()
    T, k = problem.num_tokens, problem.top_k
    num_pairs = T * k
    topk_w = args.topk_weights.reshape(-1).contiguous()
    masked = T <= MASKED_MAX_TOKENS
    block_m = 1 if masked else _dg().get_mk_alignment_for_contiguous_layout()
    al = align(ids, problem.num_experts, block_m, args.expert_map)
    sorted_pairs = al.sorted_ids.long() if not masked else al.sorted_ids[:num_pairs].long()
    live = sorted_pairs < num_pairs
    if problem.apply_router_weight_on_input:  # top_k = 1: a token is its pair; weighted before it is quantized
        x = (x.float() * topk_w.unsqueeze(1)).to(x.dtype)
    # each token quantized once (per-row groups), then its rows grouped by expert: [rows, K]
    xs = _gemm_input(x, problem).select(torch.where(live, sorted_pairs, 0) // k)
    if masked:
        y, row_of = _masked(args, problem, xs, masked_layout(al, num_pairs, T), x.dtype)
    else:
        y, row_of = _contiguous(args, problem, xs, al, num_pairs, x.dtype), None  # row i of y is sorted row i
    combine(y, ids, topk_w, out, top_k=k, num_global=problem.num_global_experts, num_local=problem.num_experts,
            expert_map=args.expert_map, weight_on_input=problem.apply_router_weight_on_input,
            rows=pair_rows(sorted_pairs, num_pairs, row_of))
    return out


# ---------------------------------------------------------------- the backend object


def _shape_problem(problem: ExpertsProblem) -> str | None:
    n, k = problem.intermediate_size, problem.hidden_size
    if n % ALIGN_NK or k % ALIGN_NK:
        return (f"DeepGEMM's grouped GEMMs need N and K multiples of {ALIGN_NK}: got N={n}, K={k} "
                "(use triton for this shape)")
    if problem.has_w13_bias or problem.has_w2_bias:
        return "expert biases are not implemented (DeepGEMM's grouped GEMMs have no bias epilogue)"
    return None


def _scheme_problem(problem: ExpertsProblem) -> str | None:
    if problem.dtype != torch.bfloat16:
        return f"DeepGEMM's grouped GEMMs take and write bfloat16, got {problem.dtype}"
    if problem.quant.weights is not None and problem.quant.activations is None:
        return "weight-only schemes are not implemented"
    if _quantized(problem) and problem.target.tcgen05 and not options().deep_gemm_ue8m0:
        return ("on SM100 DeepGEMM rounds fp32 block scales to powers of two (UE8M0), which costs accuracy on "
                "some models; allow it explicitly with MOE_DEEP_GEMM_UE8M0=1 (moe.set_options(deep_gemm_ue8m0=True))")
    return None


class DeepGemmBackend:
    name = "deep_gemm"
    schemes = ("none", "fp8_block")
    w8a8_gemm1_rounded = True  # its GEMM1 writes bf16 before our activation (contract.gemm1_rounding)

    @property
    def priority(self) -> int:
        return 12 if torch.cuda.is_available() else -30

    def priority_for(self, target) -> int:
        # below triton until a selection table measured on the card says otherwise
        return 12 if target.vendor == "cuda" else -30

    def is_available(self) -> tuple[bool, str]:
        module, reason = _import()
        return (module is not None), reason

    def supports(self, problem: ExpertsProblem) -> tuple[bool, str]:
        if HARDWARE_VERDICT is not None:
            return False, HARDWARE_VERDICT
        target = problem.target
        if target is None or target.vendor != "cuda":
            where = target.describe() if target is not None else "no device target"
            return False, f"DeepGEMM runs on NVIDIA SM90 (wgmma) or SM100 (tcgen05) GPUs; {where}"
        if not (target.wgmma or target.tcgen05):
            return False, f"DeepGEMM needs Hopper (wgmma) or Blackwell datacenter (tcgen05) MMA; {target.describe()}"
        for check in (_shape_problem(problem), _scheme_problem(problem), _nvcc_problem(target.nvcc),
                      _cache_problem()):
            if check is not None:
                return False, check
        return True, "ok"

    def apply(self, args: ExpertsArgs, problem: ExpertsProblem, out: torch.Tensor) -> None:
        deep_gemm_experts(args, problem, out)


BACKEND = DeepGemmBackend()
