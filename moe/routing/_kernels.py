"""Triton routing kernels (kernels only; launches in triton.py).

Each program routes BLOCK_T token rows held in registers as one [BLOCK_T, width] tile, the expert
axis padded to a power of two. Scores are fp32 whatever the logits' dtype. Top-k is k rounds of
"take the largest still-available value, the lowest column among equals": the order of a stable
descending sort, so ties go to the lower expert index as in the torch reference. Availability is a
mask, not a -inf fill, so -inf scores (masked experts) keep their index order and padding columns
are never picked. A token whose logits are all -inf gets weights 0 and ids 0..k-1, as in the torch
implementations.
"""

import triton
import triton.language as tl

from ..kernels._align import align_pairs
from ..kernels._jit import chain

# scoring codes (see SCORING in routing.py)
SOFTMAX, SIGMOID = 0, 1


@triton.jit
def _load_rows(ptr, rows, cols, row_ok, col_ok, stride_t, stride_e):
    """[BLOCK_T, width] fp32 logits: -inf in padding columns, 0 in rows past the end (never stored)."""
    ptrs = ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :].to(tl.int64) * stride_e
    x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=float("-inf")).to(tl.float32)
    return tl.where(row_ok[:, None], x, 0.0)


@triton.jit
def _safe_div(x, total):
    """x / total per row; a total of exactly 0 (every value masked) leaves x (all 0) as it is, a NaN
    total stays visible."""
    return x / tl.where(total == 0.0, 1.0, total)[:, None]


@triton.jit
def _score(x, SCORING: tl.constexpr):
    if SCORING == 0:  # a row of -inf (a fully masked token; padding columns are -inf too) scores 0
        top = tl.max(x, axis=1)
        top = tl.where(top == float("-inf"), 0.0, top)
        e = tl.exp(x - top[:, None])
        s = _safe_div(e, tl.sum(e, axis=1))
    else:
        s = 1.0 / (1.0 + tl.exp(-x))
    return s


@triton.jit
def _pick(values, avail, cols, WIDTH: tl.constexpr):
    """Per row: the largest available value and its column, ties to the lowest column."""
    best = tl.max(tl.where(avail, values, float("-inf")), axis=1)
    hit = avail & (values == best[:, None])
    col = tl.min(tl.where(hit, cols[None, :], WIDTH), axis=1)
    return best, col


@triton.jit
def _store(w_ptr, ids_ptr, w, ids, rows, row_ok, slots, scale, RENORM: tl.constexpr, TOP_K: tl.constexpr):
    if RENORM:
        w = _safe_div(w, tl.sum(w, axis=1))  # padding slots hold 0
    offs = rows[:, None].to(tl.int64) * TOP_K + slots[None, :]
    mask = row_ok[:, None] & (slots < TOP_K)[None, :]
    tl.store(w_ptr + offs, w * scale, mask=mask)
    tl.store(ids_ptr + offs, ids, mask=mask)


@triton.jit
def _topk_rows(
    logits_ptr, w_ptr, ids_ptr, rows, T, E, stride_t, stride_e, scale,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr, SCORING: tl.constexpr,
    TOPK_FIRST: tl.constexpr, RENORM: tl.constexpr,
):
    """Route the BLOCK_T token rows ``rows`` (rows past T are masked): see topk_kernel."""
    cols = tl.arange(0, E_PAD)
    row_ok = rows < T
    col_ok = cols < E
    x = _load_rows(logits_ptr, rows, cols, row_ok, col_ok, stride_t, stride_e)
    values = x if TOPK_FIRST else _score(x, SCORING)
    avail = col_ok[None, :] & (rows >= 0)[:, None]
    slots = tl.arange(0, K_PAD)
    w = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    ids = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best, col = _pick(values, avail, cols, E_PAD)
        avail = avail & (cols[None, :] != col[:, None])
        w = tl.where(slots[None, :] == j, best[:, None], w)
        ids = tl.where(slots[None, :] == j, col[:, None], ids)
    if TOPK_FIRST:  # softmax over the k picked logits (normalized in _store)
        live = (slots < TOP_K)[None, :] & (rows >= 0)[:, None]
        top = tl.max(tl.where(live, w, float("-inf")), axis=1)
        top = tl.where(top == float("-inf"), 0.0, top)
        w = tl.where(live, tl.exp(w - top[:, None]), 0.0)
    ids = tl.minimum(ids, E - 1)  # only NaN logits (undefined) leave a round without a pick: stay in range
    _store(w_ptr, ids_ptr, w, ids, rows, row_ok, slots, scale, RENORM, TOP_K)


@triton.jit
def topk_kernel(
    logits_ptr, w_ptr, ids_ptr, T, E, stride_t, stride_e, scale,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    SCORING: tl.constexpr, TOPK_FIRST: tl.constexpr, RENORM: tl.constexpr, PDL: tl.constexpr,
):
    """Scores then top-k (optionally renormalized), or with TOPK_FIRST top-k on the logits then a
    softmax over the k selected (the launcher sets RENORM with it); times ``scale``. fp32 weights and
    int32 ids, both [T, TOP_K]. PDL: launched with launch_pdl; wait for the logits, then let the
    alignment launch."""
    chain(PDL, PDL)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    _topk_rows(logits_ptr, w_ptr, ids_ptr, rows, T, E, stride_t, stride_e, scale, TOP_K, K_PAD, E_PAD, BLOCK_T,
               SCORING, TOPK_FIRST, RENORM)


@triton.jit
def topk_align_kernel(
    logits_ptr, w_ptr, ids_ptr, T, E, stride_t, stride_e, scale,
    emap_ptr, cursor_ptr, ends_ptr, total_ptr, block_expert_ptr, sorted_ptr, num_local, max_blocks, sorted_len,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    SCORING: tl.constexpr, TOPK_FIRST: tl.constexpr, RENORM: tl.constexpr,
    HAS_MAP: tl.constexpr, A_PAD: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr,
):
    """topk_kernel and the one-program alignment (``moe.kernels._align.align_pairs``) in one program, for
    small batches: the rows BLOCK_T at a time, a barrier, then the pairs of the ids just stored grouped by
    local expert (A_PAD > num_local bins; the global ids are < E, the map's length). PDL: as topk_kernel;
    GEMM1 waits for the whole kernel."""
    chain(PDL, PDL)
    for t0 in range(0, T, BLOCK_T):
        _topk_rows(logits_ptr, w_ptr, ids_ptr, t0 + tl.arange(0, BLOCK_T), T, E, stride_t, stride_e, scale, TOP_K,
                   K_PAD, E_PAD, BLOCK_T, SCORING, TOPK_FIRST, RENORM)
    tl.debug_barrier()  # every id is stored before the alignment reads them back
    align_pairs(ids_ptr, emap_ptr, cursor_ptr, ends_ptr, total_ptr, block_expert_ptr, sorted_ptr, E, num_local,
                T * TOP_K, max_blocks, sorted_len, HAS_MAP, A_PAD, BLOCK_M, CHUNK)


@triton.jit
def grouped_topk_kernel(
    logits_ptr, bias_ptr, w_ptr, ids_ptr, T, E, G, P, stride_t, stride_e, stride_b, scale,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, TOPK_GROUP: tl.constexpr, G_PAD: tl.constexpr,
    P_PAD: tl.constexpr, WIDTH: tl.constexpr, BLOCK_T: tl.constexpr, SCORING: tl.constexpr, HAS_BIAS: tl.constexpr,
    RENORM: tl.constexpr, PDL: tl.constexpr,
):
    """DeepSeek group-limited routing over G groups of P experts. Column c of the tile is expert
    (c // P_PAD) * P + c % P_PAD, so column order is expert order and every group is one P_PAD-wide
    slice (reshaped to [BLOCK_T, G_PAD, P_PAD] for the group scores); WIDTH = G_PAD * P_PAD. PDL: as in
    topk_kernel."""
    chain(PDL, PDL)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, WIDTH)
    group = cols // P_PAD
    member = cols % P_PAD
    expert = group * P + member
    row_ok = rows < T
    col_ok = (group < G) & (member < P)
    x = _load_rows(logits_ptr, rows, expert, row_ok, col_ok, stride_t, stride_e)
    s = _score(x, SCORING)  # the weights: unbiased
    if HAS_BIAS:
        b = tl.load(bias_ptr + expert.to(tl.int64) * stride_b, mask=col_ok, other=0.0).to(tl.float32)
        choice = s + b[None, :]
    else:
        choice = s
    choice = tl.where(col_ok[None, :], choice, float("-inf"))

    # group scores: the best member, or with a bias the sum of the best two
    by_group = tl.reshape(choice, (BLOCK_T, G_PAD, P_PAD))
    top1 = tl.max(by_group, axis=2)
    if HAS_BIAS:
        idx = tl.arange(0, P_PAD)[None, None, :]
        first = tl.min(tl.where(by_group == top1[:, :, None], idx, P_PAD), axis=2)
        top2 = tl.max(tl.where(idx == first[:, :, None], float("-inf"), by_group), axis=2)
        gscore = top1 + top2
    else:
        gscore = top1
    gcols = tl.arange(0, G_PAD)
    gavail = (gcols < G)[None, :] & (rows >= 0)[:, None]
    kept = (group[None, :] < 0) & (rows >= 0)[:, None]  # all False
    for _ in tl.static_range(TOPK_GROUP):
        _, g = _pick(gscore, gavail, gcols, G_PAD)
        gavail = gavail & (gcols[None, :] != g[:, None])
        kept = kept | (group[None, :] == g[:, None])

    values = tl.where(kept, choice, float("-inf"))
    avail = col_ok[None, :] & (rows >= 0)[:, None]
    slots = tl.arange(0, K_PAD)
    w = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    ids = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        _, col = _pick(values, avail, cols, WIDTH)
        this = cols[None, :] == col[:, None]
        avail = avail & ~this
        weight = tl.sum(tl.where(this, s, 0.0), axis=1)
        w = tl.where(slots[None, :] == j, weight[:, None], w)
        ids = tl.where(slots[None, :] == j, ((col // P_PAD) * P + col % P_PAD)[:, None], ids)
    ids = tl.minimum(ids, E - 1)  # only NaN logits (undefined) leave a round without a pick: stay in range
    # a fully masked token (every logit -inf) gets ids 0..k-1 and weight 0, whatever the bias would pick
    dead = tl.max(tl.where(col_ok[None, :], x, float("-inf")), axis=1) == float("-inf")
    ids = tl.where(dead[:, None], slots[None, :], ids)
    w = tl.where(dead[:, None], 0.0, w)
    _store(w_ptr, ids_ptr, w, ids, rows, row_ok, slots, scale, RENORM, TOP_K)
