"""Compile the GEMM kernels' weight-only modes for sm90 without a GPU (to a cubin, through ptxas): the
16-bit decode path that the interpreter does not run. Run in a process without TRITON_INTERPRET:
``python tests/sm90_compile.py``; prints one line per variant, exits non-zero if one fails."""

from __future__ import annotations

import inspect
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moe.backends.triton import _gemm
from moe.kernels.activation import ACT_CODES

_COMMON_PTRS = {"sorted_ptr": "*i32", "block_expert_ptr": "*i32", "total_ptr": "*i32", "ids_ptr": "*i32",
                "emap_ptr": "*i32", "topk_w_ptr": "*fp32", "as_ptr": "*fp32", "wg_ptr": "*fp32", "amax_ptr": "*fp32",
                "alpha": "fp32", "limit": "fp32"}
# (name, kernel, activation dtype, weight dtype, scale dtype, W_SCALE, W_CODE, W_BK, one dot, W16: 1 scalar
# scale multiplies, | 2 packed pairs, | 4 the nibble decode in mask order)
VARIANTS = [
    ("w4a16_zp gemm1 bf16", _gemm.moe_gemm1, "bf16", "u8", "bf16", _gemm.WEIGHT_BLOCK, _gemm.W_INT4_ZP, 128, False, 1),
    ("mxfp4 gemm1 bf16 one-dot", _gemm.moe_gemm1, "bf16", "u8", "u8", _gemm.WEIGHT_BLOCK, _gemm.W_E2M1, 32, True, 1),
    ("nvfp4 gemm2 fp16", _gemm.moe_gemm2, "fp16", "u8", "fp8e4nv", _gemm.WEIGHT_BLOCK_GLOBAL, _gemm.W_E2M1, 16, False,
     1),
    ("w8a16 gemm2 bf16", _gemm.moe_gemm2, "bf16", "i8", "fp32", _gemm.CHANNEL_SCALE, _gemm.W_CONVERT, 1, False, 1),
    ("w4a16_zp gemm1 bf16 pairs", _gemm.moe_gemm1, "bf16", "u8", "fp32", _gemm.WEIGHT_BLOCK, _gemm.W_INT4_ZP, 128,
     False, 2),
    ("w4a16 gemm2 fp16 pairs", _gemm.moe_gemm2, "fp16", "u8", "fp32", _gemm.WEIGHT_BLOCK, _gemm.W_INT4, 128, False, 2),
    ("mxfp4 gemm1 bf16 one-dot pairs", _gemm.moe_gemm1, "bf16", "u8", "bf16", _gemm.WEIGHT_BLOCK, _gemm.W_E2M1, 32,
     True, 2),
    ("nvfp4 gemm2 bf16 pairs", _gemm.moe_gemm2, "bf16", "u8", "fp8e4nv", _gemm.WEIGHT_BLOCK_GLOBAL, _gemm.W_E2M1, 16,
     False, 2),
    ("w4a16_zp gemm1 bf16 masks", _gemm.moe_gemm1, "bf16", "u8", "bf16", _gemm.WEIGHT_BLOCK, _gemm.W_INT4_ZP, 128,
     False, 5),
    ("mxfp4 gemm1 bf16 one-dot pairs masks", _gemm.moe_gemm1, "bf16", "u8", "bf16", _gemm.WEIGHT_BLOCK, _gemm.W_E2M1,
     32, True, 7),
    ("nvfp4 gemm2 fp16 masks", _gemm.moe_gemm2, "fp16", "u8", "fp8e4nv", _gemm.WEIGHT_BLOCK_GLOBAL, _gemm.W_E2M1, 16,
     False, 5),
]


def compile_variant(kernel, dt, wdt, sdt, w_scale, code, w_bk, one_dot, w16) -> None:
    consts = dict(TOP_K=2, ROUTE=_gemm.SORTED, HAS_MAP=False, WEIGHT_ON_INPUT=False, W_SCALE=w_scale, W_CODE=code,
                  W_PACK=1 if code == _gemm.W_CONVERT else 2, W16=w16, INT=False, BLOCK_M=16, W_BN=1, W_BK=w_bk,
                  INTERP=False, IEEE=False, PDL=False, HAS_BIAS=True, A_SCALE=_gemm.A_NONE, BLOCK_N=64,
                  BLOCK_K=64, GROUP_M=8, EVEN_K=False, LOADS=_gemm.POINTER)
    if kernel is _gemm.moe_gemm1:
        consts |= dict(ACT=ACT_CODES["silu"], GATED=True, OUT_AMAX=False, GATE_UP=_gemm.ONE_DOT if one_dot else _gemm.TWO_DOTS)
    else:
        consts |= dict(ATOMIC=False, SPLIT_K=1)
    types = _COMMON_PTRS | {"x_ptr": f"*{dt}", "a_ptr": f"*{dt}", "a_desc": f"*{dt}", "out_ptr": f"*{dt}",
                            "y_ptr": f"*{dt}", "bias_ptr": f"*{dt}", "w_ptr": f"*{wdt}", "w_desc": f"*{wdt}",
                            "ws_ptr": f"*{sdt}",
                            "wz_ptr": ("*fp32" if w16 & 2 else "*u8") if code == _gemm.W_INT4_ZP else f"*{sdt}"}
    signature = {p: "constexpr" if p in consts else types.get(p, "i32")
                 for p in inspect.signature(kernel.fn).parameters}
    triton.compile(ASTSource(kernel, signature, constexprs=consts), target=GPUTarget("cuda", 90, 32))


def main() -> int:
    failed = 0
    for name, *variant in VARIANTS:
        try:
            compile_variant(*variant)
            print(f"{name}: ok")
        except Exception as exc:  # report every variant, then fail
            failed += 1
            print(f"{name}: FAILED {str(exc).strip().splitlines()[-1]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
