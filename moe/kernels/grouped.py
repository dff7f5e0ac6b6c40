"""Host-side arguments of pointer-array grouped GEMMs (CUTLASS's grouped GEMMs take one problem shape, one
address and one leading dimension per group): built with torch ops on the device from the alignment's
expert ends, so a launch needs no host synchronization and can be captured in a CUDA graph."""

from __future__ import annotations

import torch

__all__ = ["expert_counts", "expert_starts", "leading_dims", "pointer_array", "problem_sizes"]


def expert_counts(expert_ends: torch.Tensor) -> torch.Tensor:
    """[E] int64 rows of each expert from the [E] cumulative row ends."""
    ends = expert_ends.long()
    return torch.diff(ends, prepend=ends.new_zeros(1))


def expert_starts(expert_ends: torch.Tensor) -> torch.Tensor:
    """[E] int64 first row of each expert."""
    return expert_ends.long() - expert_counts(expert_ends)


def problem_sizes(expert_ends: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """[E, 3] int32 (rows of each expert, N, K): the grouped GEMM's problem shapes."""
    if n < 1 or k < 1:
        raise ValueError(f"n, k: expected positive sizes, got n={n}, k={k}")
    counts = expert_counts(expert_ends)
    return torch.stack((counts, torch.full_like(counts, n), torch.full_like(counts, k)), dim=1).to(torch.int32)


def pointer_array(base: torch.Tensor, first_row: torch.Tensor, row_bytes: int) -> torch.Tensor:
    """[E] int64 address of each group's first row: ``base``'s address plus ``first_row * row_bytes``.
    ``first_row``: [E] rows (activations: :func:`expert_starts`; weights [E, N, K]: ``arange(E) * N``)."""
    if row_bytes < 1:
        raise ValueError(f"row_bytes: expected a positive byte count, got {row_bytes}")
    return base.data_ptr() + first_row.long() * row_bytes


def leading_dims(groups: int, ld: int, device: torch.device) -> torch.Tensor:
    """[E] int64 leading dimension (elements between rows) of each group: one value for all."""
    if ld < 1:
        raise ValueError(f"ld: expected a positive leading dimension, got {ld}")
    return torch.full((groups,), ld, dtype=torch.int64, device=device)
