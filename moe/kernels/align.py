"""Routing alignment: group (token, slot) pairs by local expert, padded to the GEMM row tile.

Everything stays on the device: no host synchronization, fixed-size buffers whose sizes depend only on
the number of pairs, the expert count and the row tile, so a CUDA graph captured once replays with any
routing.
"""

from __future__ import annotations

import torch

from ..contract import Alignment
from . import _align
from .host import cdiv, next_pow2, pdl_option
from .launch import launch

MAX_EXPERTS = 4096
_BLOCK = 256
ONE_PROGRAM_PAIRS = 4096  # up to this many pairs the alignment runs as one program
ONE_PROGRAM_EXPERTS = 1024
ONE_PROGRAM_CHUNK = 1024  # pairs a step of the one-program alignment


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """An upper bound of the padded rows: at most min(E, pairs) experts are hit, each padded by < block_m."""
    rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return cdiv(rows, block_m) * block_m


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int, expert_map: torch.Tensor | None = None,
          pdl: bool = False) -> Alignment:
    """Group the pairs of ``topk_ids`` [T, k] by local expert (``expert_map`` drops non-local pairs).

    Pairs routed elsewhere, or whose id (or mapped id) is out of range, are dropped: a bad map or bad ids
    can never make a kernel read or write out of bounds. Small batches (up to ONE_PROGRAM_PAIRS pairs)
    take one launch of one program; larger ones a memset and three launches spread over the device.
    ``pdl``: the one-program launch chains by programmatic dependent launch (``host.chains``)."""
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"num_experts={num_experts} exceeds the alignment kernel's limit of {MAX_EXPERTS}")
    ids = topk_ids.reshape(-1)
    num_pairs = ids.numel()
    dev = ids.device
    emap = expert_map.contiguous() if expert_map is not None else ids  # indexed as a flat array
    has_map = expert_map is not None
    num_global = expert_map.shape[0] if has_map else num_experts
    if fits_one_program(num_pairs, num_experts):
        al, cursor = one_program_buffers(num_pairs, num_experts, block_m, dev)
        launch(_align._align_one, (1,), dev, ids, emap, cursor, al.expert_ends, al.total, al.block_expert,
               al.sorted_ids, num_global, num_experts, num_pairs, al.max_blocks, al.sorted_ids.numel(),
               HAS_MAP=has_map, E_PAD=one_program_bins(num_experts), BLOCK_M=block_m, CHUNK=ONE_PROGRAM_CHUNK,
               PDL=pdl, num_warps=8, **pdl_option(pdl))
        return al
    sorted_len = max_padded_rows(num_pairs, num_experts, block_m)
    max_blocks = sorted_len // block_m
    # one int32 buffer, each part starting on a 128-byte boundary: counts and cursors [2E], starts and
    # ends [E each], the padded total [1], the expert of each row tile, the sorted pair ids
    scratch, starts, ends, total, block_expert, sorted_ids = _carve(
        dev, (2 * num_experts, num_experts, num_experts, 1, max_blocks, sorted_len))
    counts, cursor = scratch[:num_experts], scratch[num_experts:]
    scratch.zero_()
    grid = (cdiv(num_pairs, _BLOCK),)
    launch(_align._count, grid, dev, ids, emap, counts, sorted_ids, num_pairs, sorted_len, num_global, num_experts,
           HAS_MAP=has_map, BLOCK=_BLOCK)
    launch(_align._scan, (1,), dev, counts, starts, ends, block_expert, total, num_experts, max_blocks,
           E_PAD=next_pow2(num_experts), BLOCK_M=block_m, CHUNK=32)
    launch(_align._scatter, grid, dev, ids, emap, starts, cursor, sorted_ids, num_pairs, num_global, num_experts,
           HAS_MAP=has_map, BLOCK=_BLOCK)
    return Alignment(sorted_ids, block_expert, total, ends, max_blocks, block_m)


def fits_one_program(num_pairs: int, num_experts: int) -> bool:
    """Whether one program aligns these pairs (``align_pairs``): the small batches."""
    return num_pairs <= ONE_PROGRAM_PAIRS and num_experts <= ONE_PROGRAM_EXPERTS


def one_program_bins(num_experts: int) -> int:
    """The histogram bins of the one-program alignment: a power of two above ``num_experts`` (the last
    collects the pairs that are not local)."""
    return next_pow2(num_experts + 1)


def one_program_buffers(num_pairs: int, num_experts: int, block_m: int,
                        device: torch.device) -> tuple[Alignment, torch.Tensor]:
    """The outputs of the one-program alignment, unwritten, and its [E] row cursors: one allocation."""
    sorted_len = max_padded_rows(num_pairs, num_experts, block_m)
    max_blocks = sorted_len // block_m
    cursor, ends, total, block_expert, sorted_ids = _carve(
        device, (num_experts, num_experts, 1, max_blocks, sorted_len))
    return Alignment(sorted_ids, block_expert, total, ends, max_blocks, block_m), cursor


def _carve(device: torch.device, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    """Views of one int32 allocation with the given sizes, each starting on a 128-byte boundary."""
    starts, at = [], 0
    for n in sizes:
        starts.append(at)
        at += cdiv(n, 32) * 32
    buf = torch.empty(at, dtype=torch.int32, device=device)
    return [buf[a:a + n] for a, n in zip(starts, sizes, strict=True)]


def pair_rows(sorted_pairs: torch.Tensor, num_pairs: int, row_of: torch.Tensor | None = None) -> torch.Tensor:
    """[num_pairs + 1] int32: the row holding each pair's output, for the combine's ``rows=`` (rows grouped
    by expert, as a library GEMM wrote them: no copy back to pair order). ``sorted_pairs``: each sorted row's
    pair (num_pairs or more where the row holds none: padding, a pair that is not local); ``row_of``: that
    row's index in the output (default: its position). A pair without a row (not local) reads row 0, which
    the combine skips; the last entry collects the rows holding no pair."""
    live = sorted_pairs < num_pairs
    rows = torch.zeros(num_pairs + 1, dtype=torch.int32, device=sorted_pairs.device)
    if row_of is None:
        row_of = torch.arange(sorted_pairs.numel(), dtype=torch.int32, device=sorted_pairs.device)
    return rows.index_copy_(0, torch.where(live, sorted_pairs, num_pairs).long(), row_of.to(torch.int32))
