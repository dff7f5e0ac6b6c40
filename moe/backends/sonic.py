"""The SonicMoE backend (``sonic``): bf16 gated-SiLU experts through QuACK's grouped GEMMs (CuTe DSL), the
path vLLM's SonicMoE backend takes (it calls QuACK directly: the ``sonic-moe`` package pins torch <= 2.9.1).

One call, without a host synchronization (so a CUDA graph captured once replays with any routing):
1. our alignment with a row tile of 1 groups the (token, slot) pairs by expert; ``cu_seqlens_m`` [E + 1]
   int32 holds the groups' offsets (on the device);
2. GEMM1 and the activation in one QuACK kernel, ``gemm_gated``: the gathered tokens (``A_idx``: each
   sorted row's token, so the input rows are never copied) x w13, SwiGLU in the epilogue, only the
   activated [P, N] rows stored (``store_preact=False``). Our w13 [E, 2N, K] (gate rows, then up rows) is
   passed as its [E, K, 2N] view with ``concat_layout=("B",)``: QuACK reads the concatenated halves as its
   interleaved gate/up columns, so the weights are neither copied nor rearranged;
3. GEMM2, ``gemm`` over the same groups: [P, N] x w2 ([E, N, K] view of our [E, K, N]) -> [P, K];
4. our combine, reading each pair's row where GEMM2 wrote it (``combine(..., rows=)``).
QuACK's configs are its defaults (``tuned=False``): its autotuner benchmarks configs at the first call of
each shape, which a CUDA-graph capture cannot hold, and which compiles each config (seconds each).

API (quack-kernels 0.3.11, read from Dao-AILab/quack tag v0.3.11 ``quack/gemm_interface.py``; the release
run on an H200 here with torch 2.11): ``gemm_gated(A, B [L, K, N], C=None, bias=None, activation, preact_out,
postact_out, out_dtype, postact_dtype, cu_seqlens_m, A_idx, store_preact, dynamic_scheduler, tuned,
concat_layout)`` and ``gemm(A, B, out, bias, alpha, out_dtype, cu_seqlens_m, cu_seqlens_k, A_idx, ...,
tuned, ..., concat_layout)``; varlen_m needs A K-major and the outputs N-major; gather_A needs varlen_m.

``HARDWARE_VERDICT``: the off switch, a reason while the backend is unverified on hardware; None since its GPU
parity (``tests/test_parity.py::test_gpu_matrix``) passed on an H200 with QuACK 0.3.11 and torch 2.11.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from types import ModuleType

import torch

from ..contract import ExpertsArgs, ExpertsProblem
from ..kernels.align import align, pair_rows
from ..kernels.combine import combine

__all__ = ["BACKEND", "HARDWARE_VERDICT", "PASSED", "sonic_experts"]

INSTALL = "pip install quack-kernels nvidia-cutlass-dsl (a QuACK release that imports with this torch)"
QUACK_TAG = "v0.3.11"
# the parameters this backend passes to each QuACK function (checked by is_available())
PASSED = {"gemm_gated": ("A", "B", "activation", "postact_out", "cu_seqlens_m", "A_idx", "store_preact", "tuned",
                         "concat_layout"),
          "gemm": ("A", "B", "out", "cu_seqlens_m", "tuned")}
# The off switch (a reason while a backend is unverified on hardware): lifted on 2026-12-04, when its GPU
# parity (tests/test_parity.py::test_gpu_matrix[sonic-none], 9 token counts) passed on an NVIDIA H200.
HARDWARE_VERDICT: str | None = None


@functools.cache
def _import() -> tuple[ModuleType | None, str]:
    if importlib.util.find_spec("quack") is None:
        return None, f"QuACK is not installed; {INSTALL}"
    if importlib.util.find_spec("cutlass") is None:
        return None, f"QuACK needs the CuTe DSL (the cutlass package of nvidia-cutlass-dsl); {INSTALL}"
    try:
        from quack import gemm_interface
    except Exception as exc:  # the DSL or its compiled libraries failing against this torch / driver
        return None, f"quack.gemm_interface does not import ({type(exc).__name__}: {exc}); {INSTALL}"
    return _check_signatures(gemm_interface)


def _check_signatures(module: ModuleType) -> tuple[ModuleType | None, str]:
    for fn, params in PASSED.items():
        if not callable(getattr(module, fn, None)):
            return None, f"quack.gemm_interface lacks {fn} (written against QuACK {QUACK_TAG}); {INSTALL}"
        have = inspect.signature(getattr(module, fn)).parameters
        missing = [p for p in params if p not in have]
        if missing:
            return None, (f"quack.gemm_interface.{fn} lacks the parameters {', '.join(missing)} this backend passes "
                          f"(written against QuACK {QUACK_TAG}); {INSTALL}")
    return module, "ok"


def _quack() -> ModuleType:
    module, reason = _import()
    if module is None:
        raise RuntimeError(f"sonic: {reason}")
    return module


def sonic_experts(args: ExpertsArgs, problem: ExpertsProblem, out: torch.Tensor) -> torch.Tensor:
    q = _quack()
    x, ids = args.hidden_states.contiguous(), args.topk_ids.reshape(-1).contiguous()
    T, k, N, K = problem.num_tokens, problem.top_k, problem.intermediate_size, problem.hidden_size
    num_pairs = T * k
    topk_w = args.topk_weights.reshape(-1).contiguous()
    al = align(ids, problem.num_experts, 1)  # a row tile of 1: no padding rows, sorted_ids [P]
    pairs = al.sorted_ids[:num_pairs].long()
    cu_seqlens = torch.cat([al.expert_ends.new_zeros(1), al.expert_ends]).to(torch.int32)  # [E + 1]
    tokens = (pairs // k).to(torch.int32)  # the token of each sorted row: GEMM1 gathers it
    a = torch.empty(num_pairs, N, dtype=x.dtype, device=x.device)
    q.gemm_gated(x, args.w13.transpose(1, 2), activation="swiglu", postact_out=a, cu_seqlens_m=cu_seqlens,
                 A_idx=tokens, store_preact=False, tuned=False, concat_layout=("B",))
    y = torch.empty(num_pairs, K, dtype=x.dtype, device=x.device)
    q.gemm(a, args.w2.transpose(1, 2), out=y, cu_seqlens_m=cu_seqlens, tuned=False)
    return combine(y, ids, topk_w, out, top_k=k, num_global=problem.num_global_experts,
                   num_local=problem.num_experts, rows=pair_rows(pairs, num_pairs))


class SonicBackend:
    name = "sonic"

    @property
    def priority(self) -> int:
        return 8 if torch.cuda.is_available() else -30

    def priority_for(self, target) -> int:
        return 8 if target.vendor == "cuda" else -30  # below triton until measured

    def is_available(self) -> tuple[bool, str]:
        module, reason = _import()
        return module is not None, reason

    def supports(self, problem: ExpertsProblem) -> tuple[bool, str]:
        if HARDWARE_VERDICT is not None:
            return False, HARDWARE_VERDICT
        target = problem.target
        if target is None or target.vendor != "cuda" or not (target.wgmma or target.tcgen05):
            where = target.describe() if target is not None else "no device target"
            return False, f"QuACK's grouped GEMMs need Hopper (wgmma) or Blackwell datacenter (tcgen05) MMA; {where}"
        if problem.dtype != torch.bfloat16:
            return False, f"bfloat16 only, got {problem.dtype}"
        if problem.activation.name != "silu":
            return False, f"the SonicMoE path computes gated SiLU experts, got {problem.activation.name!r}"
        if problem.has_w13_bias or problem.has_w2_bias or problem.has_expert_map:
            return False, "expert biases and expert maps are not implemented"
        if problem.apply_router_weight_on_input:
            return False, "apply_router_weight_on_input is not implemented (QuACK gathers the unweighted tokens)"
        if problem.hidden_size % 8 or problem.intermediate_size % 8:
            return False, (f"QuACK's TMA loads need 16-byte rows: K and N multiples of 8 in bf16, got "
                           f"K={problem.hidden_size}, N={problem.intermediate_size}")
        return True, "ok"

    def apply(self, args: ExpertsArgs, problem: ExpertsProblem, out: torch.Tensor) -> None:
        sonic_experts(args, problem, out)


BACKEND = SonicBackend()
