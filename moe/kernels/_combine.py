"""The weighted combine over the k slots of each token (kernel only; the launch lives in combine.py)."""

import triton
import triton.language as tl

from ._jit import cast, chain, local_expert


@triton.jit
def moe_combine(
    y_ptr, ids_ptr, emap_ptr, topk_w_ptr, rows_ptr, out_ptr, K, num_global, num_local, stride_ym, stride_ys,
    stride_om, stride_ok, TOP_K: tl.constexpr, HAS_MAP: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr,
    SPLITS: tl.constexpr, HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr,
):
    """out[t] = sum_j w[t, j] * y[t * k + j] in fp32, fixed order, skipping pairs whose expert is not
    local (their rows of y were never written). SPLITS > 1: y holds SPLITS fp32 partial sums of each
    pair's output, ``stride_ys`` apart, added in order and rounded to out's dtype (the expert output, as
    an unsplit GEMM stores it) before the weighting. HAS_ROWS: pair p's output is row ``rows[p]`` of y
    (a library GEMM's rows, grouped by expert) instead of row p. ``out`` may have any strides. PDL:
    launched with launch_pdl; wait for the kernel that wrote y."""
    chain(PDL, False)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < K
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = t * TOP_K + j
        row = pair
        if HAS_ROWS:
            row = tl.load(rows_ptr + pair).to(tl.int64)
        y = tl.load(y_ptr + row * stride_ym + cols, mask=cmask, other=0.0).to(tl.float32)
        if SPLITS > 1:
            for s in tl.static_range(1, SPLITS):
                y += tl.load(y_ptr + s * stride_ys + pair * stride_ym + cols, mask=cmask, other=0.0)
            y = cast(y, out_ptr.dtype.element_ty, INTERP).to(tl.float32)
        e = local_expert(ids_ptr, emap_ptr, pair, True, num_global, num_local, HAS_MAP)
        y = tl.where(e >= 0, y, 0.0)
        if WEIGHT_ON_INPUT:
            acc += y
        else:
            acc += y * tl.load(topk_w_ptr + pair).to(tl.float32)
    tl.store(out_ptr + t * stride_om + cols.to(tl.int64) * stride_ok, cast(acc, out_ptr.dtype.element_ty, INTERP),
             mask=cmask)
