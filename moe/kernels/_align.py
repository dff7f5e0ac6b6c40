"""Triton kernels for routing alignment (kernels only; the launch lives in align.py).

Pairs (token, slot) are grouped by local expert, each expert's group padded to BLOCK_M rows; pairs
routed elsewhere, or with an id or mapped id out of range, are dropped (``_jit.local_expert``):
- ``_count``: per-expert pair counts (atomics), and the sentinel fill of the
  sorted-pair buffer, shared among its programs;
- ``_scan``: one program: padded offsets, the expert of every row tile, the padded total;
- ``_scatter``: each pair's row in the sorted order;
- ``_align_one``: all of it in one program, for small batches (``align_pairs``, which the routing
  kernel that aligns its own ids calls too).
"""

import triton
import triton.language as tl

from ._jit import chain, local_expert


@triton.jit
def _count(ids_ptr, emap_ptr, counts_ptr, sorted_ptr, num_pairs, sorted_len, num_global, num_experts,
           HAS_MAP: tl.constexpr, BLOCK: tl.constexpr):
    """Per-expert counts of this program's pairs, and its share of the padding marker fill."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_pairs
    e = local_expert(ids_ptr, emap_ptr, offs, mask, num_global, num_experts, HAS_MAP)
    mask = e >= 0
    tl.atomic_add(counts_ptr + e, tl.full([BLOCK], 1, tl.int32), mask=mask)
    share = tl.cdiv(sorted_len, tl.num_programs(0))
    end = tl.minimum(pid * share + share, sorted_len)
    for r0 in range(pid * share, end, BLOCK):
        r = r0 + tl.arange(0, BLOCK)
        tl.store(sorted_ptr + r, tl.full([BLOCK], 0, tl.int32) + num_pairs, mask=r < end)


@triton.jit
def _scan(
    counts_ptr, starts_ptr, ends_ptr, block_expert_ptr, total_ptr,
    num_experts, max_blocks,
    E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
):
    e = tl.arange(0, E_PAD)
    emask = e < num_experts
    counts = tl.load(counts_ptr + e, mask=emask, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)
    start = end - padded
    tl.store(starts_ptr + e, start, mask=emask)
    tl.store(ends_ptr + e, start + counts, mask=emask)
    total = tl.sum(padded, 0)
    tl.store(total_ptr, total)
    # The expert of row tile b is the number of experts whose padded group ends at or before row b*BLOCK_M.
    end_or_big = tl.where(emask, end, 2147483647)
    for b0 in range(0, max_blocks, CHUNK):
        b = b0 + tl.arange(0, CHUNK)
        row = b * BLOCK_M
        expert = tl.sum((end_or_big[None, :] <= row[:, None]).to(tl.int32), axis=1)
        expert = tl.where(row < total, expert, -1)
        tl.store(block_expert_ptr + b, expert, mask=b < max_blocks)


@triton.jit
def _scatter(
    ids_ptr, emap_ptr, starts_ptr, cursor_ptr, sorted_ptr, num_pairs, num_global, num_experts, HAS_MAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_pairs
    e = local_expert(ids_ptr, emap_ptr, offs, mask, num_global, num_experts, HAS_MAP)
    mask = e >= 0
    rank = tl.atomic_add(cursor_ptr + e, tl.full([BLOCK], 1, tl.int32), mask=mask)
    start = tl.load(starts_ptr + e, mask=mask, other=0)
    tl.store(sorted_ptr + start + rank, offs.to(tl.int32), mask=mask)


@triton.jit
def align_pairs(
    ids_ptr, emap_ptr, cursor_ptr, ends_ptr, total_ptr, block_expert_ptr, sorted_ptr,
    num_global, num_experts, num_pairs, max_blocks, sorted_len,
    HAS_MAP: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
):
    """The alignment by one program (``_align_one``, and the routing kernel that aligns its own ids):
    counts by histogram, the scan, the sentinel fill, then each pair's row from an atomic cursor that
    starts at its expert's first row. E_PAD > num_experts: bin num_experts collects non-local pairs. The
    ids are read from memory: a caller that wrote them in the same program puts a barrier before this."""
    e_all = tl.arange(0, E_PAD)
    emask = e_all < num_experts
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for p0 in range(0, num_pairs, CHUNK):
        offs = p0 + tl.arange(0, CHUNK)
        mask = offs < num_pairs
        e = local_expert(ids_ptr, emap_ptr, offs, mask, num_global, num_experts, HAS_MAP)
        counts += tl.histogram(tl.where(e >= 0, e, num_experts), E_PAD)
    counts = tl.where(emask, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)
    start = end - padded
    tl.atomic_xchg(cursor_ptr + e_all, start, mask=emask)  # at L2, like the atomics that take rows below
    tl.store(ends_ptr + e_all, start + counts, mask=emask)
    total = tl.sum(padded, 0)
    tl.store(total_ptr, total)
    end_or_big = tl.where(emask, end, 2147483647)
    for b0 in range(0, max_blocks, 32):
        b = b0 + tl.arange(0, 32)
        row = b * BLOCK_M
        expert = tl.sum((end_or_big[None, :] <= row[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(row < total, expert, -1), mask=b < max_blocks)
    for r0 in range(0, sorted_len, CHUNK):
        r = r0 + tl.arange(0, CHUNK)
        tl.store(sorted_ptr + r, tl.full([CHUNK], 0, tl.int32) + num_pairs, mask=r < sorted_len)
    tl.debug_barrier()  # the cursors and the sentinel fill are in place before any pair takes a row
    for p0 in range(0, num_pairs, CHUNK):
        offs = p0 + tl.arange(0, CHUNK)
        mask = offs < num_pairs
        e = local_expert(ids_ptr, emap_ptr, offs, mask, num_global, num_experts, HAS_MAP)
        mask = e >= 0
        row = tl.atomic_add(cursor_ptr + e, tl.full([CHUNK], 1, tl.int32), mask=mask)
        tl.store(sorted_ptr + row, offs.to(tl.int32), mask=mask)


@triton.jit
def _align_one(
    ids_ptr, emap_ptr, cursor_ptr, ends_ptr, total_ptr, block_expert_ptr, sorted_ptr,
    num_global, num_experts, num_pairs, max_blocks, sorted_len,
    HAS_MAP: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr,
):
    """The whole alignment in one program, for small batches (one launch instead of a memset and three).
    PDL: launched with launch_pdl; wait for the routing, then let GEMM1 launch."""
    chain(PDL, PDL)
    align_pairs(ids_ptr, emap_ptr, cursor_ptr, ends_ptr, total_ptr, block_expert_ptr, sorted_ptr, num_global,
                num_experts, num_pairs, max_blocks, sorted_len, HAS_MAP, E_PAD, BLOCK_M, CHUNK)
