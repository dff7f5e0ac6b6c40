"""Triton kernels for the two expert projections and the combine (kernels only; launches in __init__.py).

Row tiles come either from the alignment (SORTED: each tile holds BLOCK_M pairs of one expert) or,
for a single token (DIRECT), one pair per tile with its expert read from the routing ids: top-k ids of
one token are distinct, so nothing needs grouping.

Scales are described per operand (W_SCALE: 0 none, 1 one fp32 scale per expert); later schemes
(block, group-wise, microscaled) add modes here rather than new kernels.
"""

import triton
import triton.language as tl

from ._pdl import chain

# activation codes (see ACT_CODES in __init__.py)
SILU, GELU, GELU_TANH, SWIGLUOAI, RELU2, SILU_NO_MUL, GELU_NO_MUL = 0, 1, 2, 3, 4, 5, 6


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_tanh(x):
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (2.0 * _sigmoid(2.0 * inner))  # 1 + tanh(y) == 2 * sigmoid(2y)


@triton.jit
def _activate(g, u, ACT: tl.constexpr, alpha, limit):
    if ACT == 0:
        out = g * _sigmoid(g) * u
    elif ACT == 1:
        out = _gelu(g) * u
    elif ACT == 2:
        out = _gelu_tanh(g) * u
    elif ACT == 3:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        out = (u + 1.0) * g * _sigmoid(alpha * g)
    elif ACT == 4:
        r = tl.maximum(g, 0.0)
        out = r * r
    elif ACT == 5:
        out = g * _sigmoid(g)
    else:
        out = _gelu(g)
    return out


@triton.jit
def _cast(x, dtype, RNE_BF16: tl.constexpr):
    """Cast fp32 ``x`` to ``dtype``. The interpreter truncates fp32 -> bf16; RNE_BF16 rounds to
    nearest-even first (exact afterwards), so CPU tests see the GPU's rounding."""
    if RNE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _rows(pid_m, sorted_ptr, block_expert_ptr, total_ptr, ids_ptr, emap_ptr, num_pairs,
          DIRECT: tl.constexpr, HAS_MAP: tl.constexpr, BLOCK_M: tl.constexpr):
    """The pair index of each row of tile ``pid_m`` (num_pairs where empty) and the tile's local expert
    (-1 when the tile has no work)."""
    r = tl.arange(0, BLOCK_M)
    if DIRECT:
        pair = tl.where(r == 0, pid_m, num_pairs)
        expert = tl.load(ids_ptr + pid_m).to(tl.int32)
        if HAS_MAP:
            expert = tl.load(emap_ptr + expert).to(tl.int32)
    else:
        total = tl.load(total_ptr)
        expert = tl.where(pid_m * BLOCK_M < total, tl.load(block_expert_ptr + pid_m), -1)
        pair = tl.load(sorted_ptr + pid_m * BLOCK_M + r)
    return pair, expert


@triton.jit
def _first_row(pid_m, DIRECT: tl.constexpr, BLOCK_M: tl.constexpr):
    """The intermediate row of a tile's first pair: tiles are stored in sorted order, BLOCK_M rows each,
    except DIRECT tiles, one pair each."""
    if DIRECT:
        return pid_m
    return pid_m * BLOCK_M


@triton.jit
def _tile_ids(num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    if UPCAST:  # the interpreter mishandles low-precision dots
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _load_a(ptrs, kmask, rw, EVEN_K: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr, UPCAST: tl.constexpr):
    """A [BLOCK_M, BLOCK_K] activation tile (rows past K read 0 unless EVEN_K), scaled by the router
    weight ``rw`` when it applies on the input."""
    a = tl.load(ptrs) if EVEN_K else tl.load(ptrs, mask=kmask[None, :], other=0.0)
    if WEIGHT_ON_INPUT:
        a = _cast(a.to(tl.float32) * rw[:, None], ptrs.dtype.element_ty, UPCAST)
    return a


@triton.jit
def _load_w(ptrs, kmask, cmask, EVEN_K: tl.constexpr):
    """A [BLOCK_K, columns] weight tile: columns outside ``cmask`` read 0, and rows past K unless EVEN_K
    (K % BLOCK_K == 0: no tail and no mask along K)."""
    if EVEN_K:
        return tl.load(ptrs, mask=cmask[None, :], other=0.0)
    return tl.load(ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def moe_gemm1(
    x_ptr, w_ptr, w_desc, bias_ptr, wscale_ptr, out_ptr,
    sorted_ptr, block_expert_ptr, total_ptr, ids_ptr, emap_ptr, topk_w_ptr,
    N, K, num_pairs, num_pid_m,
    stride_xm, stride_we, stride_wn, stride_be, stride_om,
    alpha, limit,
    TOP_K: tl.constexpr, DIRECT: tl.constexpr, HAS_MAP: tl.constexpr, GATED: tl.constexpr,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, W_SCALE: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr, ONE_DOT: tl.constexpr, W_TMA: tl.constexpr,
    PDL: tl.constexpr,
):
    """out[row, n] = act(x[token] @ w13[e, gate rows n].T, x[token] @ w13[e, N + n].T) for the tile's pairs,
    where row is the pair's place in the sorted order (the pair itself for DIRECT tiles).

    W_TMA: the weight tiles come through ``w_desc``, a tensor descriptor (Hopper's copy engine): over
    w13 as [E, 2N, K] with [1, BLOCK_N, BLOCK_K] boxes, or with ONE_DOT as [E, 2, N, K] with
    [1, 2, BLOCK_N, BLOCK_K] boxes (gate rows, then up rows, in one box).
    PDL: launched with launch_pdl; wait for the previous kernel (the alignment, or whatever ran
    before), then let GEMM2 launch."""
    chain(PDL, PDL)
    pid_m, pid_n = _tile_ids(num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    pair, expert = _rows(pid_m, sorted_ptr, block_expert_ptr, total_ptr, ids_ptr, emap_ptr, num_pairs,
                         DIRECT, HAS_MAP, BLOCK_M)
    if expert < 0:
        return
    valid = pair < num_pairs
    token = tl.where(valid, pair // TOP_K, 0).to(tl.int64)  # padding rows read token 0, never stored
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    nmask = offs_n < N
    a_ptrs = x_ptr + token[:, None] * stride_xm + offs_k[None, :]
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    g_ptrs = w_base + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    u_ptrs = g_ptrs + N * stride_wn
    if WEIGHT_ON_INPUT:
        rw = tl.load(topk_w_ptr + pair, mask=valid, other=0.0).to(tl.float32)
    else:
        rw = tl.full([BLOCK_M], 1.0, tl.float32)  # unused
    n0 = pid_n * BLOCK_N
    if ONE_DOT and W_TMA:  # one box of gate rows then up rows: acc columns [gate | up]
        acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = _load_a(a_ptrs, offs_k < K - k0, rw, EVEN_K, WEIGHT_ON_INPUT, UPCAST)
            gu = w_desc.load([expert, 0, n0, k0]).reshape(2 * BLOCK_N, BLOCK_K)
            acc = _dot(a, gu.T, acc, UPCAST, IEEE)
            a_ptrs += BLOCK_K
        acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, BLOCK_N]), (0, 2, 1)))
    elif ONE_DOT:  # gate and up columns interleaved in one [BLOCK_K, 2 * BLOCK_N] tile: one MMA per step
        c = tl.arange(0, 2 * BLOCK_N)
        cmask = n0 + c // 2 < N
        wrow = n0 + c // 2 + (c % 2) * N  # even columns: gate row n, odd: up row N + n
        gu_ptrs = w_base + wrow[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kmask = offs_k < K - k0
            a = _load_a(a_ptrs, kmask, rw, EVEN_K, WEIGHT_ON_INPUT, UPCAST)
            acc = _dot(a, _load_w(gu_ptrs, kmask, cmask, EVEN_K), acc, UPCAST, IEEE)
            a_ptrs += BLOCK_K
            gu_ptrs += BLOCK_K
        acc_g, acc_u = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N, 2]))
    elif W_TMA:  # gate rows past N read up rows: finite, and never stored
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = _load_a(a_ptrs, offs_k < K - k0, rw, EVEN_K, WEIGHT_ON_INPUT, UPCAST)
            g = w_desc.load([expert, n0, k0]).reshape(BLOCK_N, BLOCK_K)
            acc_g = _dot(a, g.T, acc_g, UPCAST, IEEE)
            if GATED:
                u = w_desc.load([expert, N + n0, k0]).reshape(BLOCK_N, BLOCK_K)
                acc_u = _dot(a, u.T, acc_u, UPCAST, IEEE)
            a_ptrs += BLOCK_K
    else:
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kmask = offs_k < K - k0
            a = _load_a(a_ptrs, kmask, rw, EVEN_K, WEIGHT_ON_INPUT, UPCAST)
            acc_g = _dot(a, _load_w(g_ptrs, kmask, nmask, EVEN_K), acc_g, UPCAST, IEEE)
            if GATED:
                acc_u = _dot(a, _load_w(u_ptrs, kmask, nmask, EVEN_K), acc_u, UPCAST, IEEE)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
    if W_SCALE == 1:
        s = tl.load(wscale_ptr + expert)
        acc_g = acc_g * s
        acc_u = acc_u * s
    if HAS_BIAS:
        b_base = bias_ptr + expert.to(tl.int64) * stride_be
        acc_g += tl.load(b_base + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(b_base + N + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    h = _activate(acc_g, acc_u, ACT, alpha, limit)
    orow = _first_row(pid_m, DIRECT, BLOCK_M) + tl.arange(0, BLOCK_M)
    o_ptrs = out_ptr + orow[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(o_ptrs, _cast(h, out_ptr.dtype.element_ty, UPCAST), mask=valid[:, None] & nmask[None, :])


@triton.jit
def moe_gemm2(
    a_ptr, w_ptr, a_desc, w_desc, bias_ptr, wscale_ptr, y_ptr,
    sorted_ptr, block_expert_ptr, total_ptr, ids_ptr, emap_ptr, topk_w_ptr,
    N, K, num_pairs, num_pid_m,
    stride_am, stride_we, stride_wk, stride_be, stride_ym,
    TOP_K: tl.constexpr, DIRECT: tl.constexpr, HAS_MAP: tl.constexpr, HAS_BIAS: tl.constexpr,
    W_SCALE: tl.constexpr, ATOMIC: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr, PDL: tl.constexpr,
):
    """y[pair, kk] = a[row] @ w2[e, kk].T (+ bias), a's rows in sorted order as GEMM1 stored them; with
    ATOMIC, add weight * y into fp32 y[token]. TMA: both operands through tensor descriptors, a as
    [rows, N] with [BLOCK_M, BLOCK_K] boxes and w2 as [E, K, N] with [1, BLOCK_N, BLOCK_K] boxes.
    PDL: launched with launch_pdl; wait for GEMM1, then let the combine launch."""
    chain(PDL, PDL)
    pid_m, pid_n = _tile_ids(num_pid_m, tl.cdiv(K, BLOCK_N), GROUP_M)
    pair, expert = _rows(pid_m, sorted_ptr, block_expert_ptr, total_ptr, ids_ptr, emap_ptr, num_pairs,
                         DIRECT, HAS_MAP, BLOCK_M)
    if expert < 0:
        return
    valid = pair < num_pairs
    offs_o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns (hidden dim)
    offs_k = tl.arange(0, BLOCK_K)  # reduction over the intermediate dim
    omask = offs_o < K
    first = _first_row(pid_m, DIRECT, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if TMA:  # padding rows read whatever GEMM1 left there: they only reach their own, unstored, rows
        for k0 in range(0, N, BLOCK_K):
            w = w_desc.load([expert, pid_n * BLOCK_N, k0]).reshape(BLOCK_N, BLOCK_K)
            acc = _dot(a_desc.load([first, k0]), w.T, acc, UPCAST, IEEE)
    else:
        # padding rows read the tile's first row (always a pair's), never stored
        row = tl.where(valid, first + tl.arange(0, BLOCK_M), first).to(tl.int64)
        a_ptrs = a_ptr + row[:, None] * stride_am + offs_k[None, :]
        w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_o[None, :].to(tl.int64) * stride_wk + offs_k[:, None]
        no_rw = tl.full([BLOCK_M], 1.0, tl.float32)  # GEMM2 never scales its input
        for k0 in range(0, N, BLOCK_K):  # the reduction runs over the intermediate dim N
            kmask = offs_k < N - k0
            a = _load_a(a_ptrs, kmask, no_rw, EVEN_K, False, UPCAST)
            acc = _dot(a, _load_w(w_ptrs, kmask, omask, EVEN_K), acc, UPCAST, IEEE)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
    if W_SCALE == 1:
        acc = acc * tl.load(wscale_ptr + expert)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert.to(tl.int64) * stride_be + offs_o, mask=omask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    mask = valid[:, None] & omask[None, :]
    y = _cast(acc, a_ptr.dtype.element_ty, UPCAST)  # rounded like the reference's expert output
    if ATOMIC:
        if WEIGHT_ON_INPUT:
            rw = tl.full([BLOCK_M], 1.0, tl.float32)
        else:
            rw = tl.load(topk_w_ptr + pair, mask=valid, other=0.0).to(tl.float32)
        token = (pair // TOP_K).to(tl.int64)
        tl.atomic_add(y_ptr + token[:, None] * stride_ym + offs_o[None, :], y.to(tl.float32) * rw[:, None], mask=mask)
    else:
        tl.store(y_ptr + pair[:, None].to(tl.int64) * stride_ym + offs_o[None, :], y, mask=mask)


@triton.jit
def moe_combine(
    y_ptr, ids_ptr, emap_ptr, topk_w_ptr, out_ptr, K, stride_ym, stride_om,
    TOP_K: tl.constexpr, HAS_MAP: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr, BLOCK: tl.constexpr,
    RNE_BF16: tl.constexpr, PDL: tl.constexpr,
):
    """out[t] = sum_j w[t, j] * y[t * k + j] in fp32, skipping pairs whose expert is not local. PDL:
    launched with launch_pdl; wait for GEMM2."""
    chain(PDL, False)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < K
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = t * TOP_K + j
        y = tl.load(y_ptr + pair * stride_ym + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_MAP:  # rows of pairs routed to other ranks were never written
            y = tl.where(tl.load(emap_ptr + tl.load(ids_ptr + pair)) >= 0, y, 0.0)
        if WEIGHT_ON_INPUT:
            acc += y
        else:
            acc += y * tl.load(topk_w_ptr + pair).to(tl.float32)
    tl.store(out_ptr + t * stride_om + cols, _cast(acc, out_ptr.dtype.element_ty, RNE_BF16), mask=cmask)
