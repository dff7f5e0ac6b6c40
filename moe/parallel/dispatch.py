"""Dispatch and combine: move each rank's tokens to the ranks that hold their experts, and the results back.

A strategy only moves rows; the expert computation between ``dispatch`` and ``combine`` is
``fused_experts`` on the local experts, with whatever backend accepts the local problem. Both
strategies accept any number of tokens per rank (0 included) and any routing.

- :class:`AllGatherDispatch`: every rank gathers every rank's tokens and routing (padded to the largest
  T, after an all-gather of the sizes), computes its local experts on all of them, and a reduce-scatter
  sums the partial outputs and hands each rank its own rows.
- :class:`AllToAllDispatch`: the unit sent is a (token, destination rank) pair: a token travels once to
  each rank that holds at least one of its k experts, with its whole routing row (the receiver's expert
  map zeroes the slots it does not hold). Per-rank counts are exchanged first; results come back by the
  reverse all-to-all and the home rank sums the partials in fp32.

Both read the sizes on the host (one device synchronization per call): the collectives need them.
``FixedCapacityDispatch`` (fixed.py) reads none, at the cost of buffers sized for the worst case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = ["AllGatherDispatch", "AllToAllDispatch", "Dispatch", "Dispatched"]

# torch >= 2.13 renames the tensor collectives; older releases (2.11 on our GPU machines) only have these.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_P = TypeVar("_P")


@dataclass(frozen=True)
class Dispatched:
    """The rows this rank computes, and what ``combine`` needs to send the results home."""

    hidden_states: torch.Tensor  # [R, K]
    topk_weights: torch.Tensor  # [R, k] fp32
    topk_ids: torch.Tensor  # [R, k] int32 global ids
    plan: object  # strategy-specific bookkeeping


class Dispatch(Protocol):
    name: str

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> Dispatched:
        """This rank's tokens [T, K] and routing [T, k] -> the rows it must compute."""
        ...

    def combine(self, y: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        """The partial expert outputs [R, K] for ``dispatched`` -> this rank's output [T, K]."""
        ...


def _pack_routing(weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[T, k] weights and ids -> one [T, 2k] int32 tensor, so they travel in one collective."""
    return torch.cat([weights.float().contiguous().view(torch.int32), ids.to(torch.int32)], dim=1)


def _unpack_routing(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = packed.shape[1] // 2
    return packed[:, :k].contiguous().view(torch.float32), packed[:, k:].contiguous()


def _plan(dispatched: Dispatched, kind: type[_P], strategy: str) -> _P:
    if not isinstance(dispatched.plan, kind):
        raise TypeError(f"combine: {strategy!r} got rows dispatched by another strategy "
                        f"({type(dispatched.plan).__name__}); combine with the dispatch that produced them")
    return dispatched.plan


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


@dataclass(frozen=True)
class _GatherPlan:
    sizes: list[int]  # tokens of each rank
    t_max: int
    rows: torch.Tensor | None  # [sum(sizes)] positions of real rows in the padded gather; None: no padding


class AllGatherDispatch:
    """All-gather tokens and routing, compute every token on the local experts, reduce-scatter back."""

    name = "allgather"

    def __init__(self, group: ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        out = t.new_empty(self.size * t.shape[0], *t.shape[1:])
        _all_gather(out, t, group=self.group)
        return out

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> Dispatched:
        num_tokens = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
        sizes = self._gather(num_tokens).tolist()
        t_max = max(sizes)
        if t_max == 0:
            return Dispatched(x, weights.float(), ids.to(torch.int32), _GatherPlan(sizes, 0, None))
        x_all = self._gather(_pad_rows(x, t_max))  # [P * t_max, K]
        routing = self._gather(_pad_rows(_pack_routing(weights, ids), t_max))  # [P * t_max, 2k]
        rows = None
        if min(sizes) != t_max:  # drop the padding rather than compute it
            rows = torch.cat([torch.arange(n) + r * t_max for r, n in enumerate(sizes)]).to(x.device)
            x_all, routing = x_all[rows], routing[rows]
        w_all, ids_all = _unpack_routing(routing)
        return Dispatched(x_all, w_all, ids_all, _GatherPlan(sizes, t_max, rows))

    def combine(self, y: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        plan = _plan(dispatched, _GatherPlan, self.name)
        if plan.rows is not None:
            y = y.new_zeros(self.size * plan.t_max, y.shape[1]).index_copy_(0, plan.rows, y)
        out = y.new_empty(plan.t_max, y.shape[1])
        if plan.t_max:
            _reduce_scatter(out, y.contiguous(), group=self.group)
        return out[: plan.sizes[self.rank]]


@dataclass(frozen=True)
class _AllToAllPlan:
    num_tokens: int
    tokens: torch.Tensor  # [S] the home token of each row sent, grouped by destination rank
    send_sizes: list[int]  # rows sent to each rank
    recv_sizes: list[int]  # rows received from each rank


class AllToAllDispatch:
    """Send each token to the ranks that own its experts; return the partial outputs the same way."""

    name = "all_to_all"

    def __init__(self, group: ProcessGroup, owners: torch.Tensor) -> None:
        """``owners``: [E] the rank (in ``group``) that holds each global expert."""
        self.group = group
        self.size = dist.get_world_size(group)
        if owners.dim() != 1 or owners.numel() == 0 or not 0 <= int(owners.min()) <= int(owners.max()) < self.size:
            raise ValueError(f"owners: expected [num_experts] ranks in [0, {self.size}), got {owners.tolist()}")
        self._owners = {owners.device: owners.long()}

    def owners(self, device: torch.device) -> torch.Tensor:
        if device not in self._owners:
            self._owners[device] = next(iter(self._owners.values())).to(device)
        return self._owners[device]

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> Dispatched:
        owner = self.owners(x.device)[ids.long()]  # [T, k] rank of each (token, slot)
        hit = torch.zeros(x.shape[0], self.size, dtype=torch.bool, device=x.device)
        hit.scatter_(1, owner, True)  # [T, P] does rank p hold any expert of token t
        tokens = hit.t().nonzero(as_tuple=True)[1]  # [S] tokens to send, grouped by rank
        send = hit.sum(0)  # [P]
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_sizes, recv_sizes = send.tolist(), recv.tolist()
        x_recv = self._exchange(x[tokens], recv_sizes, send_sizes)  # [R, K]
        routing = self._exchange(_pack_routing(weights, ids)[tokens], recv_sizes, send_sizes)  # [R, 2k]
        w_recv, ids_recv = _unpack_routing(routing)
        return Dispatched(x_recv, w_recv, ids_recv, _AllToAllPlan(x.shape[0], tokens, send_sizes, recv_sizes))

    def _exchange(self, t: torch.Tensor, out_sizes: list[int], in_sizes: list[int]) -> torch.Tensor:
        out = t.new_empty(sum(out_sizes), *t.shape[1:])
        dist.all_to_all_single(out, t.contiguous(), out_sizes, in_sizes, group=self.group)
        return out

    def combine(self, y: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        plan = _plan(dispatched, _AllToAllPlan, self.name)
        back = self._exchange(y, plan.send_sizes, plan.recv_sizes)  # [S, K] partials, by home token
        acc_dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
        acc = torch.zeros(plan.num_tokens, y.shape[1], dtype=acc_dtype, device=y.device)
        return acc.index_add_(0, plan.tokens, back.to(acc_dtype)).to(y.dtype)
