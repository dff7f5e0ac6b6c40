"""Routing alignment: group (token, slot) pairs by local expert, padded to the GEMM row tile.

Everything stays on the device: no host synchronization, fixed-size buffers whose sizes depend only on
the number of pairs, the expert count and the row tile, so a CUDA graph captured once replays with any
routing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _align
from .host import cdiv, next_pow2

MAX_EXPERTS = 4096
_BLOCK = 256


@dataclass(frozen=True)
class Alignment:
    sorted_ids: torch.Tensor  # [sorted_len] int32: pair index (t * k + j) per row, num_pairs for padding
    block_expert: torch.Tensor  # [max_blocks] int32: local expert of each row tile, -1 past the end
    total: torch.Tensor  # [1] int32: padded number of rows in use
    expert_ends: torch.Tensor  # [E] int32: end row of each expert's unpadded group (grouped GEMM offsets)
    max_blocks: int
    block_m: int


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """An upper bound of the padded rows: at most min(E, pairs) experts are hit, each padded by < block_m."""
    rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return cdiv(rows, block_m) * block_m


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int, expert_map: torch.Tensor | None = None) -> Alignment:
    """Group the pairs of ``topk_ids`` [T, k] by local expert (``expert_map`` drops non-local pairs)."""
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"num_experts={num_experts} exceeds the alignment kernel's limit of {MAX_EXPERTS}")
    ids = topk_ids.reshape(-1)
    num_pairs = ids.numel()
    dev = ids.device
    sorted_len = max_padded_rows(num_pairs, num_experts, block_m)
    max_blocks = sorted_len // block_m
    scratch = torch.zeros(2 * num_experts, dtype=torch.int32, device=dev)  # counts, then cursors
    counts, cursor = scratch[:num_experts], scratch[num_experts:]
    meta = torch.empty(2 * num_experts + 1, dtype=torch.int32, device=dev)  # starts, ends, total
    starts, ends, total = meta[:num_experts], meta[num_experts : 2 * num_experts], meta[2 * num_experts :]
    sorted_ids = torch.empty(sorted_len, dtype=torch.int32, device=dev)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    emap = expert_map if expert_map is not None else ids
    has_map = expert_map is not None
    grid = (cdiv(num_pairs, _BLOCK),)
    _align._count[grid](ids, emap, counts, num_pairs, HAS_MAP=has_map, BLOCK=_BLOCK)
    _align._scan[(1,)](
        counts, starts, ends, block_expert, total, sorted_ids, num_experts, num_pairs, max_blocks, sorted_len,
        E_PAD=next_pow2(num_experts), BLOCK_M=block_m, CHUNK=32,
    )
    _align._scatter[grid](ids, emap, starts, cursor, sorted_ids, num_pairs, HAS_MAP=has_map, BLOCK=_BLOCK)
    return Alignment(sorted_ids, block_expert, total, ends, max_blocks, block_m)
