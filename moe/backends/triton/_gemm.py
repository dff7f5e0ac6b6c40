"""Triton kernels for the two expert projections (kernels only; modes.py derives their constexprs and
__init__.py launches them).

Each kernel takes its choices as mode values, never one boolean per format (modes.py names them):
- ROUTE: SORTED row tiles from the alignment (BLOCK_M pairs of one expert each), or DIRECT for a single
  token (one pair a tile, its expert read from the routing ids: a token's k experts are distinct);
- LOADS: weight tiles (GEMM2: its input tiles too) by POINTER loads or through TMA tensor descriptors;
- GATE_UP (gated GEMM1): TWO_DOTS, a gate and an up tile with a dot each, or ONE_DOT, one tile of
  [gate | up] columns (2 x BLOCK_N wide) with one dot, split after the loop;
- W_SCALE: how the weights are scaled (NO_SCALE, TENSOR_SCALE: one fp32 per expert and part); each
  quantization scheme adds a value here;
- INTERP: the one interpreter switch (``moe.kernels._jit``).
"""

import triton
import triton.language as tl

from ...kernels._jit import cast, chain, dot, local_expert

# activation codes (ACT_CODES in modes.py); codes below RELU2 are gated
SILU, GELU, GELU_TANH, SWIGLUOAI, RELU2, SILU_NO_MUL, GELU_NO_MUL = 0, 1, 2, 3, 4, 5, 6
SORTED, DIRECT = 0, 1
POINTER, TMA = 0, 1
TWO_DOTS, ONE_DOT = 0, 1
NO_SCALE, TENSOR_SCALE = 0, 1


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
def _rows(pid_m, sorted_ptr, block_expert_ptr, total_ptr, ids_ptr, emap_ptr, num_pairs, num_global, num_local,
          ROUTE: tl.constexpr, HAS_MAP: tl.constexpr, BLOCK_M: tl.constexpr):
    """The pair index of each row of tile ``pid_m`` (num_pairs where empty) and the tile's local expert
    (-1 when the tile has no work: past the end, or a DIRECT pair routed elsewhere or out of range)."""
    r = tl.arange(0, BLOCK_M)
    if ROUTE == 1:
        pair = tl.where(r == 0, pid_m, num_pairs)
        expert = local_expert(ids_ptr, emap_ptr, pid_m, True, num_global, num_local, HAS_MAP)
    else:
        total = tl.load(total_ptr)
        expert = tl.where(pid_m * BLOCK_M < total, tl.load(block_expert_ptr + pid_m), -1)
        pair = tl.load(sorted_ptr + pid_m * BLOCK_M + r)
    return pair, expert


@triton.jit
def _first_row(pid_m, ROUTE: tl.constexpr, BLOCK_M: tl.constexpr):
    """The intermediate row of a tile's first pair: tiles are stored in sorted order, BLOCK_M rows each,
    except DIRECT tiles, one pair each."""
    if ROUTE == 1:
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
def _load_a(ptrs, kmask, rw, EVEN_K: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr, INTERP: tl.constexpr):
    """A [BLOCK_M, BLOCK_K] activation tile (columns past the reduction read 0 unless EVEN_K), scaled by
    the router weight ``rw`` when it applies on the input."""
    a = tl.load(ptrs) if EVEN_K else tl.load(ptrs, mask=kmask[None, :], other=0.0)
    if WEIGHT_ON_INPUT:
        a = cast(a.to(tl.float32) * rw[:, None], ptrs.dtype.element_ty, INTERP)
    return a


@triton.jit
def _load_w(ptrs, kmask, cmask, EVEN_K: tl.constexpr):
    """A [BLOCK_K, columns] weight tile by pointers: columns outside ``cmask`` read 0, and rows past the
    reduction unless EVEN_K (no tail, no mask along it)."""
    if EVEN_K:
        return tl.load(ptrs, mask=cmask[None, :], other=0.0)
    return tl.load(ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def _gemm1_one_dot(a_ptrs, w_desc, w_base, expert, n0, N, K, stride_wn, rw,
                   LOADS: tl.constexpr, EVEN_K: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr, INTERP: tl.constexpr,
                   IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The K loop of a gated GEMM1 as one dot per step over [gate | up] columns: [BLOCK_M, 2 * BLOCK_N].
    TMA: one [1, 2, BLOCK_N, BLOCK_K] box of the [E, 2, N, K] view; gate rows past N read up rows, finite
    and never stored."""
    offs_k = tl.arange(0, BLOCK_K)
    c = tl.arange(0, 2 * BLOCK_N)
    cmask = n0 + c % BLOCK_N < N
    wrow = n0 + c % BLOCK_N + (c // BLOCK_N) * N  # columns 0..BLOCK_N: gate rows, then the up rows
    gu_ptrs = w_base + wrow[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = offs_k < K - k0
        a = _load_a(a_ptrs, kmask, rw, EVEN_K, WEIGHT_ON_INPUT, INTERP)
        if LOADS == 1:
            gu = w_desc.load([expert, 0, n0, k0]).reshape(2 * BLOCK_N, BLOCK_K).T
        else:
            gu = _load_w(gu_ptrs, kmask, cmask, EVEN_K)
            gu_ptrs += BLOCK_K
        acc = dot(a, gu, acc, INTERP, IEEE)
        a_ptrs += BLOCK_K
    return acc


@triton.jit
def _gemm1_two_dots(a_ptrs, w_desc, w_base, expert, n0, N, K, stride_wn, rw, nmask,
                    GATED: tl.constexpr, LOADS: tl.constexpr, EVEN_K: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr,
                    INTERP: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """The K loop of GEMM1 as a gate dot and (gated) an up dot per step: two [BLOCK_M, BLOCK_N]
    accumulators. TMA: [1, BLOCK_N, BLOCK_K] boxes; gate rows past N read up rows, never stored."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    g_ptrs = w_base + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    u_ptrs = g_ptrs + N * stride_wn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = offs_k < K - k0
        a = _load_a(a_ptrs, kmask, rw, EVEN_K, WEIGHT_ON_INPUT, INTERP)
        if LOADS == 1:
            g = w_desc.load([expert, n0, k0]).reshape(BLOCK_N, BLOCK_K).T
        else:
            g = _load_w(g_ptrs, kmask, nmask, EVEN_K)
            g_ptrs += BLOCK_K
        acc_g = dot(a, g, acc_g, INTERP, IEEE)
        if GATED:
            if LOADS == 1:
                u = w_desc.load([expert, N + n0, k0]).reshape(BLOCK_N, BLOCK_K).T
            else:
                u = _load_w(u_ptrs, kmask, nmask, EVEN_K)
                u_ptrs += BLOCK_K
            acc_u = dot(a, u, acc_u, INTERP, IEEE)
        a_ptrs += BLOCK_K
    return acc_g, acc_u


@triton.jit
def _weight_scale(acc, scale_ptr, expert, stride_se, part, W_SCALE: tl.constexpr):
    """The epilogue's weight scale of one part (0: gate or the only part, 1: up)."""
    if W_SCALE == 1:
        acc = acc * tl.load(scale_ptr + expert.to(tl.int64) * stride_se + part)
    return acc


@triton.jit
def moe_gemm1(
    x_ptr, w_ptr, w_desc, bias_ptr, scale_ptr, out_ptr,
    sorted_ptr, block_expert_ptr, total_ptr, ids_ptr, emap_ptr, topk_w_ptr,
    N, K, num_pairs, num_pid_m, num_global, num_local,
    stride_xm, stride_we, stride_wn, stride_be, stride_se, stride_om,
    alpha, limit,
    TOP_K: tl.constexpr, ROUTE: tl.constexpr, HAS_MAP: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr, W_SCALE: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, LOADS: tl.constexpr, GATE_UP: tl.constexpr,
    INTERP: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):
    """out[row, n] = act(x[token] @ w13[e, gate rows n].T, x[token] @ w13[e, N + n].T) for the tile's pairs,
    where row is the pair's place in the sorted order (the pair itself for DIRECT tiles).

    TMA loads read ``w_desc``: w13 as [E, 2N, K] with [1, BLOCK_N, BLOCK_K] boxes, or with ONE_DOT as
    [E, 2, N, K] with [1, 2, BLOCK_N, BLOCK_K] boxes. PDL: launched with launch_pdl; wait for the previous
    kernel (the alignment, or whatever ran before), then let GEMM2 launch."""
    chain(PDL, PDL)
    pid_m, pid_n = _tile_ids(num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    pair, expert = _rows(pid_m, sorted_ptr, block_expert_ptr, total_ptr, ids_ptr, emap_ptr, num_pairs, num_global,
                         num_local, ROUTE, HAS_MAP, BLOCK_M)
    if expert < 0:
        return
    valid = pair < num_pairs
    token = tl.where(valid, pair // TOP_K, 0).to(tl.int64)  # padding rows read token 0, never stored
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    a_ptrs = x_ptr + token[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    if WEIGHT_ON_INPUT:
        rw = tl.load(topk_w_ptr + pair, mask=valid, other=0.0).to(tl.float32)
    else:
        rw = tl.full([BLOCK_M], 1.0, tl.float32)  # unused
    if GATED and GATE_UP == 1:
        acc = _gemm1_one_dot(a_ptrs, w_desc, w_base, expert, n0, N, K, stride_wn, rw, LOADS, EVEN_K,
                             WEIGHT_ON_INPUT, INTERP, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
        acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, BLOCK_N]), (0, 2, 1)))
    else:
        acc_g, acc_u = _gemm1_two_dots(a_ptrs, w_desc, w_base, expert, n0, N, K, stride_wn, rw, nmask, GATED, LOADS,
                                       EVEN_K, WEIGHT_ON_INPUT, INTERP, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
    acc_g = _weight_scale(acc_g, scale_ptr, expert, stride_se, 0, W_SCALE)
    if GATED:
        acc_u = _weight_scale(acc_u, scale_ptr, expert, stride_se, 1, W_SCALE)
    if HAS_BIAS:
        b_base = bias_ptr + expert.to(tl.int64) * stride_be
        acc_g += tl.load(b_base + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(b_base + N + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    h = _activate(acc_g, acc_u, ACT, alpha, limit)
    orow = _first_row(pid_m, ROUTE, BLOCK_M) + tl.arange(0, BLOCK_M)
    o_ptrs = out_ptr + orow[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(o_ptrs, cast(h, out_ptr.dtype.element_ty, INTERP), mask=valid[:, None] & nmask[None, :])


@triton.jit
def _gemm2_loop(a_ptr, a_desc, w_desc, w_base, expert, first, valid, o0, omask, N, stride_am, stride_wk,
                LOADS: tl.constexpr, EVEN_K: tl.constexpr, INTERP: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The reduction of GEMM2 over the intermediate dim N: [BLOCK_M, BLOCK_N] output columns o0... TMA:
    the input as [rows, N] with [BLOCK_M, BLOCK_K] boxes (padding rows read whatever GEMM1 left there:
    they reach only their own, unstored, rows) and w2 as [E, K, N] with [1, BLOCK_N, BLOCK_K] boxes."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_o = o0 + tl.arange(0, BLOCK_N)
    # pointer loads: padding rows read the tile's first row (always a pair's), never stored
    row = tl.where(valid, first + tl.arange(0, BLOCK_M), first).to(tl.int64)
    a_ptrs = a_ptr + row[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_base + offs_o[None, :].to(tl.int64) * stride_wk + offs_k[:, None]
    no_rw = tl.full([BLOCK_M], 1.0, tl.float32)  # GEMM2 never scales its input
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        if LOADS == 1:
            w = w_desc.load([expert, o0, k0]).reshape(BLOCK_N, BLOCK_K).T
            a = a_desc.load([first, k0])
        else:
            kmask = offs_k < N - k0
            a = _load_a(a_ptrs, kmask, no_rw, EVEN_K, False, INTERP)
            w = _load_w(w_ptrs, kmask, omask, EVEN_K)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        acc = dot(a, w, acc, INTERP, IEEE)
    return acc


@triton.jit
def moe_gemm2(
    a_ptr, w_ptr, a_desc, w_desc, bias_ptr, scale_ptr, y_ptr,
    sorted_ptr, block_expert_ptr, total_ptr, ids_ptr, emap_ptr, topk_w_ptr,
    N, K, num_pairs, num_pid_m, num_global, num_local,
    stride_am, stride_we, stride_wk, stride_be, stride_se, stride_ym,
    TOP_K: tl.constexpr, ROUTE: tl.constexpr, HAS_MAP: tl.constexpr, HAS_BIAS: tl.constexpr,
    W_SCALE: tl.constexpr, ATOMIC: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, LOADS: tl.constexpr, INTERP: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):
    """y[pair, kk] = a[row] @ w2[e, kk].T (+ bias), a's rows in sorted order as GEMM1 stored them; with
    ATOMIC, add weight * y into fp32 y[token]. PDL: launched with launch_pdl; wait for GEMM1, then let
    the combine launch."""
    chain(PDL, PDL)
    pid_m, pid_n = _tile_ids(num_pid_m, tl.cdiv(K, BLOCK_N), GROUP_M)
    pair, expert = _rows(pid_m, sorted_ptr, block_expert_ptr, total_ptr, ids_ptr, emap_ptr, num_pairs, num_global,
                         num_local, ROUTE, HAS_MAP, BLOCK_M)
    if expert < 0:
        return
    valid = pair < num_pairs
    o0 = pid_n * BLOCK_N
    offs_o = o0 + tl.arange(0, BLOCK_N)  # output columns (hidden dim)
    omask = offs_o < K
    first = _first_row(pid_m, ROUTE, BLOCK_M)
    acc = _gemm2_loop(a_ptr, a_desc, w_desc, w_ptr + expert.to(tl.int64) * stride_we, expert, first, valid, o0, omask,
                      N, stride_am, stride_wk, LOADS, EVEN_K, INTERP, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = _weight_scale(acc, scale_ptr, expert, stride_se, 0, W_SCALE)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert.to(tl.int64) * stride_be + offs_o, mask=omask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    mask = valid[:, None] & omask[None, :]
    y = cast(acc, a_ptr.dtype.element_ty, INTERP)  # rounded like the reference's expert output
    if ATOMIC:
        if WEIGHT_ON_INPUT:
            rw = tl.full([BLOCK_M], 1.0, tl.float32)
        else:
            rw = tl.load(topk_w_ptr + pair, mask=valid, other=0.0).to(tl.float32)
        token = (pair // TOP_K).to(tl.int64)
        tl.atomic_add(y_ptr + token[:, None] * stride_ym + offs_o[None, :], y.to(tl.float32) * rw[:, None], mask=mask)
    else:
        tl.store(y_ptr + pair[:, None].to(tl.int64) * stride_ym + offs_o[None, :], y, mask=mask)
