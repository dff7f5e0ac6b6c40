"""The parallel config: how one MoE layer is split over ranks, and the process groups that carry it.

Layout: ``world = ep_size * tp_size``. A tensor-parallel (TP) group holds ``tp_size`` ranks that see
the same tokens and each hold a 1/tp_size slice of every local expert's intermediate dim. An
expert-parallel (EP) group holds ``ep_size`` ranks that each pass their own tokens and each hold a
disjoint set of experts. :meth:`ParallelConfig.from_world` builds TP groups of consecutive ranks
(``rank = ep_rank * tp_size + tp_rank``) and EP groups across them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.distributed as dist
from pydantic import ConfigDict, Field, model_validator
from torch.distributed import ProcessGroup

from ..frozen import Frozen

__all__ = ["DispatchName", "DispatchQuant", "ParallelConfig", "ParallelRanks", "Placement"]

Placement = Literal["contiguous", "round_robin"]
DispatchName = Literal["allgather", "all_to_all", "fixed"]
DispatchQuant = Literal["none", "fp8"]


class ParallelConfig(Frozen):
    """How a :class:`~moe.parallel.ParallelFusedMoE` is split. Frozen and validated; holds no tensors.

    - ``ep_size``: ranks the experts are spread over. ``num_experts`` need not divide evenly: with
      ``contiguous`` placement the first ``E % ep_size`` ranks hold one expert more, with ``round_robin``
      expert ``e`` lives on EP rank ``e % ep_size``. Every rank must hold at least one expert.
    - ``tp_size``: ranks each expert's intermediate dim is split over; it must divide ``intermediate_size``.
    - ``placement``: ``contiguous`` (blocks of consecutive experts) or ``round_robin``.
    - ``dispatch``: ``allgather`` (gather every token, reduce-scatter the partial outputs),
      ``all_to_all`` (send each token only to the ranks that own one of its experts), or ``fixed``
      (``allgather`` of fixed blocks of ``capacity`` rows: no host synchronization, so the forward can be
      captured in a CUDA graph and compiled with ``fullgraph=True``).
    - ``capacity``: ``fixed`` only, and required there: the most tokens one rank passes to a forward (the
      largest batch the engine captures). A forward with more is refused before anything launches; the
      receive buffers hold ``ep_size * capacity`` rows.
    - ``dispatch_quant``: ``fixed`` only: ``fp8`` sends the tokens as float8_e4m3fn with one fp32 scale
      per token (dequantized on receipt), ``none`` (the default) in the activation dtype.
    - ``ep_group`` / ``tp_group``: the process groups; ``None`` means the default (world) group when
      that size equals the world size, or no group when the size is 1. For ``ep_size > 1`` and
      ``tp_size > 1`` together, pass both or use :meth:`from_world`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    ep_size: int = Field(1, ge=1)
    tp_size: int = Field(1, ge=1)
    placement: Placement = "contiguous"
    dispatch: DispatchName = "allgather"
    capacity: int | None = Field(None, ge=1)
    dispatch_quant: DispatchQuant = "none"
    ep_group: ProcessGroup | None = None
    tp_group: ProcessGroup | None = None

    @model_validator(mode="after")
    def _check_capacity(self) -> ParallelConfig:
        fixed = self.dispatch == "fixed"
        if fixed and self.capacity is None:
            raise ValueError("dispatch='fixed' needs capacity, the most tokens one rank passes to a forward "
                             "(e.g. the largest batch the engine captures); got capacity=None")
        if not fixed and self.capacity is not None:
            raise ValueError(f"capacity={self.capacity} sizes the buffers of dispatch='fixed' only, but "
                             f"dispatch={self.dispatch!r}; drop capacity or use dispatch='fixed'")
        if not fixed and self.dispatch_quant != "none":
            raise ValueError(f"dispatch_quant={self.dispatch_quant!r} is implemented for dispatch='fixed' only, "
                             f"but dispatch={self.dispatch!r}; use dispatch_quant='none' or dispatch='fixed'")
        return self

    @model_validator(mode="after")
    def _check_groups(self) -> ParallelConfig:
        for name, group, size in (("ep_group", self.ep_group, self.ep_size),
                                  ("tp_group", self.tp_group, self.tp_size)):
            if group is None:
                continue
            got = dist.get_world_size(group)
            if got != size:
                raise ValueError(
                    f"{name} has {got} ranks (-1: this rank is not in it) but {name[:2]}_size={size}; "
                    f"pass a group of {size} ranks that contains this rank"
                )
        return self

    @classmethod
    def from_world(
        cls,
        ep_size: int | None = None,
        tp_size: int = 1,
        *,
        placement: Placement = "contiguous",
        dispatch: DispatchName = "allgather",
        capacity: int | None = None,
        dispatch_quant: DispatchQuant = "none",
    ) -> ParallelConfig:
        """Split the default group: TP groups of ``tp_size`` consecutive ranks, EP groups across them.
        ``ep_size`` defaults to ``world // tp_size``; the other arguments are the fields of the same names.
        Collective: every rank must call it, in the same order, once per layout (not once per layer)."""
        world = _world_size("ParallelConfig.from_world")
        if tp_size < 1 or world % tp_size:
            raise ValueError(f"tp_size={tp_size} must be >= 1 and divide the world size {world}")
        ep_size = world // tp_size if ep_size is None else ep_size
        if ep_size * tp_size != world:
            raise ValueError(
                f"ep_size={ep_size} x tp_size={tp_size} = {ep_size * tp_size} must equal the world size "
                f"{world}; pick sizes whose product is {world}"
            )
        tp_ranks = [[e * tp_size + t for t in range(tp_size)] for e in range(ep_size)]
        ep_ranks = [[e * tp_size + t for e in range(ep_size)] for t in range(tp_size)]
        return cls(
            ep_size=ep_size, tp_size=tp_size, placement=placement, dispatch=dispatch, capacity=capacity,
            dispatch_quant=dispatch_quant, ep_group=_subgroup(ep_ranks, world), tp_group=_subgroup(tp_ranks, world),
        )

    def check_layer(self, num_experts: int, intermediate_size: int) -> None:
        """Raise unless a layer of this shape can be split this way (no process group needed)."""
        if self.ep_size > num_experts:
            raise ValueError(
                f"ep_size={self.ep_size} exceeds num_experts={num_experts}: every EP rank must hold at "
                f"least one expert; use ep_size <= {num_experts}"
            )
        if intermediate_size % self.tp_size:
            raise ValueError(
                f"tp_size={self.tp_size} must divide intermediate_size={intermediate_size} (each TP rank "
                "holds an equal slice of every expert's intermediate dim); pick a divisor"
            )

    def resolve(self) -> ParallelRanks:
        """This rank's place in the layout. Checks the groups against the world; with both EP and TP,
        checks (collectively, once) that the EP group's ranks share a TP rank."""
        if self.ep_size == 1 and self.tp_size == 1:
            return ParallelRanks(1, 0, None, 1, 0, None)
        world = _world_size(f"ParallelConfig(ep_size={self.ep_size}, tp_size={self.tp_size})")
        ep_group = self._group("ep_group", self.ep_group, self.ep_size, world)
        tp_group = self._group("tp_group", self.tp_group, self.tp_size, world)
        ranks = ParallelRanks(
            self.ep_size, dist.get_rank(ep_group) if ep_group is not None else 0, ep_group,
            self.tp_size, dist.get_rank(tp_group) if tp_group is not None else 0, tp_group,
        )
        if ep_group is not None and tp_group is not None:
            _check_ep_shares_tp_rank(ranks)
        return ranks

    def _group(self, name: str, group: ProcessGroup | None, size: int, world: int) -> ProcessGroup | None:
        if size == 1:
            return None
        if group is not None:
            return group
        if size == world:
            return dist.group.WORLD
        raise ValueError(
            f"{name} is None, which means the default group of {world} ranks, but {name[:2]}_size={size}; "
            f"pass ep_group and tp_group, or build the config with ParallelConfig.from_world("
            f"ep_size={self.ep_size}, tp_size={self.tp_size}) on every rank"
        )


@dataclass(frozen=True)
class ParallelRanks:
    """Resolved sizes, ranks and groups of one rank (``None`` group: size 1)."""

    ep_size: int
    ep_rank: int
    ep_group: ProcessGroup | None
    tp_size: int
    tp_rank: int
    tp_group: ProcessGroup | None


def _world_size(what: str) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what} needs torch.distributed: call torch.distributed.init_process_group(...) on every rank "
            "first (launch with torchrun, which sets RANK, WORLD_SIZE and MASTER_ADDR)"
        )
    return dist.get_world_size()


def _subgroup(ranks: list[list[int]], world: int) -> ProcessGroup | None:
    if len(ranks[0]) == 1:
        return None
    if len(ranks[0]) == world:
        return dist.group.WORLD
    return dist.new_subgroups_by_enumeration(ranks)[0]


def _check_ep_shares_tp_rank(ranks: ParallelRanks) -> None:
    tp_ranks: list[int | None] = [None] * ranks.ep_size
    dist.all_gather_object(tp_ranks, ranks.tp_rank, group=ranks.ep_group)
    if len(set(tp_ranks)) != 1:
        raise ValueError(
            f"the ranks of ep_group have tp ranks {tp_ranks}; they must all share one TP rank (each EP "
            "group holds the same slice of the intermediate dim). ParallelConfig.from_world builds such groups"
        )
