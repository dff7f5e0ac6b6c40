"""``ParallelFusedMoE``: ``FusedMoE`` with its experts split over ranks (expert and tensor parallel).

Routing, the router gate, the correction bias and the shared experts are replicated: every rank
routes its own tokens exactly as the single-rank layer does (``routed_scaling_factor`` included) and
adds the shared experts to its own rows after the combine. Only the routed experts are split:

- EP: this rank holds the experts of its EP rank (``expert_map``), a dispatch strategy brings it the
  rows routed to them and takes the partial outputs home;
- TP: every local expert holds a 1/tp_size slice of the intermediate dim (w13 rows of both the gate
  and the up half, w2 columns, w13 bias; ``w2_bias`` only on TP rank 0), and one all-reduce over the
  TP group sums the slices.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..layer import FusedMoE, ShardId
from .config import ParallelConfig
from .dispatch import AllGatherDispatch, AllToAllDispatch, Dispatch
from .placement import expert_map, expert_owners

__all__ = ["ParallelFusedMoE"]


class ParallelFusedMoE(FusedMoE):
    """A :class:`~moe.FusedMoE` whose routed experts are spread over an EP x TP grid of ranks.

    Takes ``FusedMoE``'s arguments (``num_experts`` and ``intermediate_size`` are the global ones; no
    ``expert_map``: it is built from ``parallel``) plus ``parallel``, a :class:`ParallelConfig`.
    Every rank of an EP group passes its own tokens (T may differ, or be 0); the ranks of a TP group
    pass identical tokens. Each rank gets the single-rank layer's output for its tokens. Load weights
    with the checkpoint's full shapes: the loaders keep this rank's experts and slice.
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        parallel: ParallelConfig,
        **kwargs: Any,
    ) -> None:
        if not isinstance(parallel, ParallelConfig):
            raise TypeError(f"parallel: expected a ParallelConfig, got {type(parallel).__name__}")
        if "expert_map" in kwargs:
            raise ValueError("expert_map: ParallelFusedMoE builds it from parallel (ep_size, placement); "
                             "do not pass one")
        parallel.check_layer(num_experts, intermediate_size)
        ranks = parallel.resolve()
        emap = None
        if ranks.ep_size > 1:
            emap = expert_map(num_experts, ranks.ep_size, ranks.ep_rank, parallel.placement)
        super().__init__(num_experts, top_k, hidden_size, intermediate_size // ranks.tp_size,
                         expert_map=emap, **kwargs)
        self.parallel = parallel
        self.ranks = ranks
        self.global_intermediate_size = intermediate_size
        self.dispatcher: Dispatch | None = None
        if ranks.ep_group is not None:
            if parallel.dispatch == "allgather":
                self.dispatcher = AllGatherDispatch(ranks.ep_group)
            else:
                owners = expert_owners(num_experts, ranks.ep_size, parallel.placement)
                self.dispatcher = AllToAllDispatch(ranks.ep_group, owners)

    # ---------------------------------------------------------------------------------- forward
    def select_experts(
        self, x: torch.Tensor, router_logits: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``FusedMoE.select_experts``; a rank with no tokens (common under EP) routes nothing."""
        if x.shape[0] == 0 and (router_logits is not None or self.gate is not None):
            k = self.config.top_k
            return x.new_empty(0, k, dtype=torch.float32), x.new_empty(0, k, dtype=torch.int32)
        return super().select_experts(x, router_logits)

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The routed experts for this rank's tokens [T, K]: dispatch, local experts, combine, and the
        TP all-reduce. Collective: every rank of the EP and TP groups must call it."""
        if self.dispatcher is None:
            y = super().experts(x, weights, ids)
        else:
            sent = self.dispatcher.dispatch(x, weights, ids)
            partial = super().experts(sent.hidden_states, sent.topk_weights, sent.topk_ids)
            y = self.dispatcher.combine(partial, sent)
        if self.ranks.tp_group is not None and y.shape[0] > 0:  # TP ranks hold the same tokens
            dist.all_reduce(y, group=self.ranks.tp_group)
        return y

    # ---------------------------------------------------------------------------- weight loading
    def _tp_slice(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        n = self.config.intermediate_size
        return t.narrow(dim, self.ranks.tp_rank * n, n)

    @torch.no_grad()
    def weight_loader(self, loaded_weight: torch.Tensor, expert_id: int, shard_id: ShardId) -> bool:
        """Load one per-expert checkpoint tensor of the full (unsliced) shape: ``w1``/``w3`` [N, K],
        ``w2`` [K, N], ``w1_bias``/``w3_bias`` [N], ``w2_bias`` [K]. Keeps this rank's TP slice;
        returns False for experts held by another EP rank."""
        if self.ranks.tp_size == 1:
            return super().weight_loader(loaded_weight, expert_id, shard_id)
        big_n, k = self.global_intermediate_size, self.config.hidden_size
        full = {"w1": (big_n, k), "w3": (big_n, k), "w2": (k, big_n),
                "w1_bias": (big_n,), "w3_bias": (big_n,), "w2_bias": (k,)}
        if shard_id in full and tuple(loaded_weight.shape) != full[shard_id]:
            raise ValueError(
                f"weight_loader: {shard_id} of expert {expert_id} must have shape {full[shard_id]} "
                f"(the full checkpoint shape), got {tuple(loaded_weight.shape)}"
            )
        if shard_id in ("w1", "w3", "w1_bias", "w3_bias"):
            loaded_weight = self._tp_slice(loaded_weight, 0)
        elif shard_id == "w2":
            loaded_weight = self._tp_slice(loaded_weight, 1)
        elif shard_id == "w2_bias" and self.ranks.tp_rank > 0:
            loaded_weight = torch.zeros_like(loaded_weight)  # added once, by TP rank 0
        return super().weight_loader(loaded_weight, expert_id, shard_id)

    def _fused_shape(self, name: str, dst: torch.Tensor) -> tuple[int, ...]:
        """Fused checkpoint tensors have the full shape: [E, 2N, K], [E, K, N], [E, 2N], [E, K]."""
        c, big_n = self.config, self.global_intermediate_size
        halves = 2 if c.activation.gated else 1
        return {"w13": (c.num_experts, halves * big_n, c.hidden_size), "w2": (c.num_experts, c.hidden_size, big_n),
                "w13_bias": (c.num_experts, halves * big_n), "w2_bias": (c.num_experts, c.hidden_size)}[name]

    def _fused_slice(self, name: str, src: torch.Tensor) -> torch.Tensor:
        """This rank's TP slice of a fused tensor (``load_fused_weights`` then keeps the local experts)."""
        if self.ranks.tp_size == 1:
            return src
        if name == "w2":
            return self._tp_slice(src, 2)
        if name == "w2_bias":
            return src if self.ranks.tp_rank == 0 else torch.zeros_like(src)
        halves = src.unflatten(1, (-1, self.global_intermediate_size))  # [E, 2, N, ...] gate, up
        return self._tp_slice(halves, 2)

    def extra_repr(self) -> str:
        r = self.ranks
        return (f"{super().extra_repr()}, ep={r.ep_rank}/{r.ep_size} ({self.parallel.placement}, "
                f"{self.parallel.dispatch}), tp={r.tp_rank}/{r.tp_size} (intermediate {self.config.intermediate_size} "
                f"of {self.global_intermediate_size})")
