"""Expert placement: which EP rank holds each global expert, and the global -> local expert map.

``contiguous`` gives EP rank r a block of consecutive experts; when ``ep_size`` does not divide
``num_experts`` the first ``E % ep_size`` ranks hold one expert more. ``round_robin`` gives expert e
to rank ``e % ep_size``. On every rank, local ids follow ascending global ids.
"""

from __future__ import annotations

import torch

from .config import Placement

__all__ = ["expert_counts", "expert_map", "expert_owners"]


def _check(num_experts: int, ep_size: int, placement: str) -> None:
    if not 1 <= ep_size <= num_experts:
        raise ValueError(f"ep_size={ep_size} must be between 1 and num_experts={num_experts}")
    if placement not in ("contiguous", "round_robin"):
        raise ValueError(f"placement: expected 'contiguous' or 'round_robin', got {placement!r}")


def expert_owners(num_experts: int, ep_size: int, placement: Placement = "contiguous") -> torch.Tensor:
    """[E] int64: the EP rank that holds each global expert."""
    _check(num_experts, ep_size, placement)
    if placement == "round_robin":
        return torch.arange(num_experts) % ep_size
    base, extra = divmod(num_experts, ep_size)
    sizes = torch.tensor([base + (r < extra) for r in range(ep_size)])
    return torch.repeat_interleave(torch.arange(ep_size), sizes)


def expert_counts(num_experts: int, ep_size: int, placement: Placement = "contiguous") -> list[int]:
    """How many experts each EP rank holds."""
    return torch.bincount(expert_owners(num_experts, ep_size, placement), minlength=ep_size).tolist()


def expert_map(num_experts: int, ep_size: int, ep_rank: int, placement: Placement = "contiguous") -> torch.Tensor:
    """[E] int32: the local id of each global expert on ``ep_rank``, -1 where another rank holds it."""
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank={ep_rank} must be in [0, ep_size={ep_size})")
    mine = expert_owners(num_experts, ep_size, placement) == ep_rank  # [E] bool
    emap = torch.full((num_experts,), -1, dtype=torch.int32)
    emap[mine] = torch.arange(int(mine.sum()), dtype=torch.int32)
    return emap
