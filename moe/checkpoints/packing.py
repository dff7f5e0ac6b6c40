"""Bit packing of checkpoint formats: codes in int32 words (GPTQ, AWQ, compressed-tensors) and two 4-bit
codes a byte (moe's canonical storage, e2m1 formats).

A word holds ``32 / bits`` codes, slot ``i`` at bits ``bits * i``. ``order`` says which element of a run
of ``32 / bits`` consecutive elements each slot holds (slot ``i`` holds element ``order[i]``): identity
for GPTQ and compressed-tensors, ``0, 2, 4, 6, 1, 3, 5, 7`` for AWQ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..quant.weights import pack_nibbles, unpack_nibbles  # the canonical two codes a byte, re-exported

__all__ = ["pack_int32", "pack_nibbles", "unpack_int32", "unpack_nibbles"]


def unpack_int32(words: torch.Tensor, bits: int, dim: int, order: Sequence[int] | None = None) -> torch.Tensor:
    """int32 ``words`` -> int32 codes 0..2^bits-1, ``dim`` grown ``32 / bits`` times (element ``j`` of each
    word's run next to element ``j + 1``)."""
    per = 32 // bits
    u = words.to(torch.int64) & 0xFFFFFFFF  # the word's bits, unsigned
    shifts = torch.arange(per, device=words.device, dtype=torch.int64) * bits
    slots = (u.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., per]: slot i
    if order is not None:
        slots = slots[..., [list(order).index(j) for j in range(per)]]  # element j is in slot order.index(j)
    dim = dim % words.dim()
    return slots.movedim(-1, dim + 1).flatten(dim, dim + 1).to(torch.int32)


def pack_int32(codes: torch.Tensor, bits: int, dim: int, order: Sequence[int] | None = None) -> torch.Tensor:
    """The inverse of :func:`unpack_int32`: codes (any integer dtype, 0..2^bits-1) -> int32 words; a ``dim``
    that is not a multiple of ``32 / bits`` is padded with zero codes."""
    per = 32 // bits
    dim = dim % codes.dim()
    c = codes.to(torch.int64)
    pad = -c.shape[dim] % per
    if pad:
        c = torch.cat([c, c.new_zeros(*c.shape[:dim], pad, *c.shape[dim + 1:])], dim=dim)
    runs = c.unflatten(dim, (-1, per)).movedim(dim + 1, -1)  # [..., per]: element j of each run
    if order is not None:
        runs = runs[..., list(order)]  # slot i holds element order[i]
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    u = (runs << shifts).sum(dim=-1)  # disjoint bits: the sum is the OR
    return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32)

