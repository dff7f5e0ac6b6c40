"""Activation quantization (kernels only; the launch lives in quant.py), and the jit helpers that round
to FP8 / INT8 the way ``moe.quant.activations`` does: multiply by the scale's reciprocal (one IEEE division a
scale, ``reciprocal``; then one rounded product an element, the same on every device and in the interpreter),
round to nearest even, saturate at the format's largest value.

The Triton interpreter truncates fp32 -> fp8 casts, so under ``INTERP`` the value is first rounded to the
e4m3 grid in fp32 (then the cast is exact); on the GPU the hardware conversion rounds to nearest even.
"""

import triton
import triton.language as tl

from ._jit import chain, local_expert

# modes (see quant.py): how a row's scale is found
TOKEN, GROUP, TENSOR, STATIC, AMAX = 0, 1, 2, 3, 4
FP8, INT8 = 0, 1
FP8_MAX = tl.constexpr(448.0)
INT8_MAX = tl.constexpr(127.0)
_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (v + M) - M rounds |v| < 2**22 to nearest even in fp32


@triton.jit
def _rint(v):
    return (v + _MAGIC) - _MAGIC


@triton.jit
def div_rn(a, b):
    """``a / b`` in fp32 rounded to nearest, as the host divides: Triton's ``/`` is approximate on NVIDIA GPUs
    (``div.full.f32``, up to 2 ulp). Used once a scale (``scale_of``, ``reciprocal``), never per element: IEEE
    division is a subroutine call (qwen3 GEMM2 at one token, sm_90: 584 loop instructions against 419)."""
    a, b = tl.broadcast(a.to(tl.float32), b.to(tl.float32))
    return tl.math.div_rn(a, b)


@triton.jit
def reciprocal(scale):
    """``1 / scale`` rounded to nearest: what every quantization multiplies by. Dividing each element instead
    (approximately, with ``/``) moved values that sit on a rounding tie, which a ratio of bf16 values to a
    scale of amax / 448 often does: 19 of 16384 int8 roundings off the host's (H200, 2026-12-04), and
    fp8_channel 1.1-1.7e-2 from its emulation (H100, 2026-12-05)."""
    return div_rn(scale * 0.0 + 1.0, scale)


@triton.jit
def round_e4m3(v):
    """``v`` (fp32, |v| <= 448) rounded to the nearest e4m3 value, ties to even: 3 mantissa bits above
    2**-6, steps of 2**-9 below (subnormals)."""
    bits = v.to(tl.uint32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    sub = _rint(v * 512.0) * 0.001953125
    return tl.where(tl.abs(v) < 0.015625, sub, normal)


@triton.jit
def quantize(v, FMT: tl.constexpr, INTERP: tl.constexpr):
    """fp32 ``v`` (already times its scale's reciprocal) stored as fp8 e4m3 or int8."""
    if FMT == 1:  # one return for both formats: Triton 3.6 type-checks every return of a function
        q = _rint(tl.minimum(tl.maximum(v, -INT8_MAX), INT8_MAX)).to(tl.int8)
    else:
        v = tl.minimum(tl.maximum(v, -FP8_MAX), FP8_MAX)
        if INTERP:
            v = round_e4m3(v)
        q = v.to(tl.float8e4nv)
    return q


@triton.jit
def scale_of(amax, FMT: tl.constexpr):
    if FMT == 1:  # an if: Triton 3.6 does not fold a conditional expression on constexprs
        scale = tl.where(amax > 0, div_rn(amax, amax * 0.0 + INT8_MAX), 1.0)
    else:
        scale = tl.where(amax > 0, div_rn(amax, amax * 0.0 + FP8_MAX), 1.0)
    return scale


@triton.jit
def quant_rows(
    x_ptr, q_ptr, s_ptr, src_ptr, sorted_ptr, block_expert_ptr, ids_ptr, emap_ptr,
    K, stride_x, stride_q, stride_s, num_pairs, num_global, num_local,
    MODE: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr, PER_EXPERT: tl.constexpr,
    SORTED: tl.constexpr, ROWS_PER_EXPERT: tl.constexpr, DIRECT: tl.constexpr, HAS_MAP: tl.constexpr,
    INTERP: tl.constexpr, PDL: tl.constexpr,
):
    """Row ``program_id(0)`` of x [rows, K] quantized into q with its scale:
    - TOKEN: one scale per row (its amax / top), stored at s[row];
    - GROUP: one per GROUP columns, stored at s[row, g] (BLOCK is a multiple of GROUP);
    - TENSOR: the scale made from ``src[0]``, the tensor's amax;
    - STATIC: the scale given, src[0], or with PER_EXPERT src[e] of the row's expert: a sorted
      intermediate row's expert comes from the alignment (ROWS_PER_EXPERT rows a tile), a DIRECT row's
      from the routing ids;
    - AMAX: no quantization: the row's amax joins src[0] (atomic max), for a TENSOR pass after it.
    SORTED: x is a GEMM's intermediate in sorted order; its padding rows (no pair) are skipped."""
    chain(PDL, PDL)
    row = tl.program_id(0).to(tl.int64)
    if SORTED:  # noqa: SIM102  (a constexpr branch around a runtime one: Triton does not fold `and` here)
        if tl.load(sorted_ptr + row) >= num_pairs:
            return
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    if MODE == 0 or MODE == 4:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            amax = tl.maximum(amax, tl.abs(tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)))
        m = tl.max(amax, axis=0)
        if MODE == 4:
            tl.atomic_max(src_ptr, m)
            return
        scale = scale_of(m, FMT)
        tl.store(s_ptr + row * stride_s, scale)
    elif MODE == 2:
        scale = scale_of(tl.load(src_ptr), FMT)
    elif MODE == 3:
        if PER_EXPERT:
            if DIRECT:
                e = local_expert(ids_ptr, emap_ptr, row, True, num_global, num_local, HAS_MAP)
            else:
                e = tl.load(block_expert_ptr + row // ROWS_PER_EXPERT)
            scale = tl.load(src_ptr + tl.maximum(e, 0))
        else:
            scale = tl.load(src_ptr)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        kmask = offs < K
        v = tl.load(x_row + offs, mask=kmask, other=0.0).to(tl.float32)
        if MODE == 1:  # per group of GROUP columns: [BLOCK // GROUP, GROUP]
            vg = tl.reshape(v, [BLOCK // GROUP, GROUP])
            gs = scale_of(tl.max(tl.abs(vg), axis=1), FMT)
            g = k0 // GROUP + tl.arange(0, BLOCK // GROUP)
            tl.store(s_ptr + row * stride_s + g, gs, mask=g * GROUP < K)
            q = tl.reshape(quantize(vg * reciprocal(gs)[:, None], FMT, INTERP), [BLOCK])
        else:
            q = quantize(v * reciprocal(scale), FMT, INTERP)
        tl.store(q_row + offs, q, mask=kmask)
