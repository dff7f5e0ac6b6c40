"""Fixed-capacity dispatch: the strategy whose forward never reads a device value on the host.

Every rank sends a block of exactly ``capacity`` rows, whatever its T and its routing: its tokens, then
zero rows whose routing ids are -1. One all-gather of the tokens and one of the routing give every rank
``ep_size * capacity`` rows; the receiver points the padding rows' ids at an expert it does not hold, so its
experts skip them, and runs its local experts on every row. A reduce-scatter sums the partial outputs and
hands each rank its own block, whose first T rows are its output. No count or offset leaves the device and
no shape depends on routing, so the forward can be captured in a CUDA graph (one graph per T) and traced
by ``torch.compile(fullgraph=True)``; the price is buffers sized for the worst case (docs/parallel.md).

With ``quant="fp8"`` the tokens travel as float8_e4m3fn (sent as bytes) with one fp32 scale per token,
packed beside the routing, and are dequantized to the activation dtype on receipt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from ..quant import ActivationScheme
from ..quant.activations import dequantize_activations, quantize_activations
from .config import DispatchQuant
from .dispatch import Dispatched, _all_gather, _plan, _reduce_scatter

__all__ = ["FixedCapacityDispatch", "check_capacity"]

_FP8_TOKEN = ActivationScheme(format="fp8", granularity="token")


def check_capacity(num_tokens: int, capacity: int) -> None:
    """Refuse a forward of more tokens than the buffers hold. T is a shape: this reads nothing on the device."""
    if num_tokens > capacity:
        raise ValueError(
            f"hidden_states: {num_tokens} tokens on this rank, but ParallelConfig.capacity={capacity} (dispatch="
            f"'fixed' sends blocks of {capacity} rows); pass at most {capacity} tokens a forward (split the batch) "
            "or build the layer with a larger capacity. Nothing was launched on this rank: the other ranks of its "
            "EP group must not run this forward either"
        )


@dataclass(frozen=True)
class _FixedPlan:
    num_tokens: int  # T of this rank: the rows of its block that are real


class FixedCapacityDispatch:
    """All-gather fixed blocks of ``capacity`` rows, compute every row on the local experts, reduce-scatter."""

    name = "fixed"

    def __init__(self, group: ProcessGroup, capacity: int, expert_map: torch.Tensor,
                 quant: DispatchQuant = "none") -> None:
        """``expert_map``: [E] this rank's local id of each global expert, -1 where another rank holds it."""
        if capacity < 1:
            raise ValueError(f"capacity: expected an int >= 1 (tokens per rank), got {capacity}")
        if quant not in ("none", "fp8"):
            raise ValueError(f"quant: expected 'none' or 'fp8', got {quant!r}")
        elsewhere = (expert_map < 0).nonzero().flatten()  # once, at build time
        if elsewhere.numel() == 0:
            raise ValueError("expert_map: this rank holds every expert, so no expert id can mark a padding row; "
                             "fixed dispatch needs ep_size >= 2")
        self.group = group
        self.size = dist.get_world_size(group)
        self.capacity = capacity
        self.quant = quant
        self._padding_id = int(elsewhere[0])  # a global expert this rank does not hold: its experts skip it

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> Dispatched:
        """This rank's tokens [T, K] (T <= capacity) and routing [T, k] -> [ep_size * capacity] rows."""
        num_tokens = x.shape[0]
        check_capacity(num_tokens, self.capacity)
        pad = (0, 0, 0, self.capacity - num_tokens)
        routing = [F.pad(weights.float(), pad).view(torch.int32), F.pad(ids.to(torch.int32), pad, value=-1)]
        rows = F.pad(x, pad)  # [C, K]
        if self.quant == "fp8":
            q, scale = quantize_activations(rows, _FP8_TOKEN)  # [C, K] e4m3, [C] fp32
            rows = q.view(torch.uint8)  # bytes: the collectives need not know float8
            routing.append(scale.reshape(-1, 1).view(torch.int32))
        rows_all = self._gather(rows)  # [P * C, K]
        routing_all = self._gather(torch.cat(routing, dim=1))  # [P * C, 2k (+1)] int32
        k = ids.shape[1]
        w_all = routing_all[:, :k].contiguous().view(torch.float32)
        ids_all = routing_all[:, k: 2 * k]
        ids_all = torch.where(ids_all >= 0, ids_all, self._padding_id)
        if self.quant == "fp8":
            scale_all = routing_all[:, 2 * k:].contiguous().view(torch.float32).reshape(-1)
            rows_all = dequantize_activations(rows_all.view(torch.float8_e4m3fn), scale_all, _FP8_TOKEN, x.dtype)
        return Dispatched(rows_all, w_all, ids_all, _FixedPlan(num_tokens))

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        out = t.new_empty(self.size * t.shape[0], *t.shape[1:])
        _all_gather(out, t.contiguous(), group=self.group)
        return out

    def combine(self, y: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        """The partial outputs [ep_size * capacity, K] -> this rank's output [T, K] (summed in y's dtype)."""
        plan = _plan(dispatched, _FixedPlan, self.name)
        out = y.new_empty(self.capacity, y.shape[1])
        _reduce_scatter(out, y.contiguous(), group=self.group)
        return out[: plan.num_tokens]
