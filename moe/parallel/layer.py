"""``ParallelFusedMoE``: ``FusedMoE`` with its experts split over ranks (expert and tensor parallel).

Routing, the router gate, the correction bias and the shared experts are replicated: every rank
routes its own tokens exactly as the single-rank layer does (``routed_scaling_factor`` included) and
adds the shared experts to its own rows after the combine. Only the routed experts are split:

- EP: this rank holds the experts of its EP rank (``expert_map``), a dispatch strategy brings it the
  rows routed to them and takes the partial outputs home;
- TP: every local expert holds a 1/tp_size slice of the intermediate dim (w13 rows of both the gate
  and the up half, w2 columns, w13 bias; ``w2_bias`` only on TP rank 0), and one all-reduce over the
  TP group sums the slices.

Quantized layers (``quant=...``) split their scales with the weights: per-channel w13 scales by row,
per-block scales by block (the TP slice of the intermediate dim must be a whole number of blocks, checked
when the layer is built), per-tensor and static input scales whole on every rank. Dynamic activation
scales come from what each rank computes: a per-token (or per-tensor) scale of GEMM2's input covers this
TP rank's slice of the intermediate dim, and a per-tensor one the rows of this rank's call, so such
results differ from the single-rank layer's by quantization rounding; per-group scales (``fp8_block``)
and static ones are the same.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from ..layer import FusedMoE, ShardId
from ..quant import QuantConfig
from .config import ParallelConfig
from .dispatch import AllGatherDispatch, AllToAllDispatch, Dispatch
from .fixed import FixedCapacityDispatch, check_capacity
from .placement import expert_map, expert_owners

__all__ = ["ParallelFusedMoE"]


class ParallelFusedMoE(FusedMoE):
    """A :class:`~moe.FusedMoE` whose routed experts are spread over an EP x TP grid of ranks.

    Takes ``FusedMoE``'s arguments (``num_experts`` and ``intermediate_size`` are the global ones; no
    ``expert_map``: it is built from ``parallel``) plus ``parallel``, a :class:`ParallelConfig`.
    Every rank of an EP group passes its own tokens (T may differ, or be 0); the ranks of a TP group
    pass identical tokens. Each rank gets the single-rank layer's output for its tokens. Load weights
    with the checkpoint's full shapes: the loaders keep this rank's experts and slice.

    ``expert_load=True`` keeps ``self.expert_load``, [E] int64 on the layer's device: the (token, slot)
    pairs this rank's tokens routed to each global expert, added up over every forward until the caller
    zeroes it (``layer.expert_load.zero_()``). It is updated on the device (no synchronization, CUDA-graph
    safe); sum it over the EP group (``dist.all_reduce(load, group=layer.ranks.ep_group)``) for the
    layer's load when rebalancing.
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        parallel: ParallelConfig,
        expert_load: bool = False,
        **kwargs: Any,
    ) -> None:
        if not isinstance(parallel, ParallelConfig):
            raise TypeError(f"parallel: expected a ParallelConfig, got {type(parallel).__name__}")
        if "expert_map" in kwargs:
            raise ValueError("expert_map: ParallelFusedMoE builds it from parallel (ep_size, placement); "
                             "do not pass one")
        parallel.check_layer(num_experts, intermediate_size)
        _check_tp_blocks(QuantConfig.parse(kwargs.get("quant")), parallel.tp_size, intermediate_size)
        ranks = parallel.resolve()
        emap = None
        if ranks.ep_size > 1:
            emap = expert_map(num_experts, ranks.ep_size, ranks.ep_rank, parallel.placement)
        super().__init__(num_experts, top_k, hidden_size, intermediate_size // ranks.tp_size,
                         expert_map=emap, **kwargs)
        self.parallel = parallel
        self.ranks = ranks
        self.global_intermediate_size = intermediate_size
        self.dispatcher: Dispatch | None = self._make_dispatcher()
        load = torch.zeros(num_experts, dtype=torch.int64, device=self.w13_weight.device) if expert_load else None
        self.register_buffer("expert_load", load, persistent=False)

    def _make_dispatcher(self) -> Dispatch | None:
        parallel, group = self.parallel, self.ranks.ep_group
        if group is None:
            return None
        if parallel.dispatch == "allgather":
            return AllGatherDispatch(group)
        if parallel.dispatch == "fixed":
            return FixedCapacityDispatch(group, parallel.capacity, self.expert_map, parallel.dispatch_quant)  # type: ignore[arg-type]
        owners = expert_owners(self.config.num_experts, self.ranks.ep_size, parallel.placement)
        return AllToAllDispatch(group, owners)

    # ---------------------------------------------------------------------------------- forward
    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor | None = None) -> torch.Tensor:
        """As ``FusedMoE.forward``; collective. With ``dispatch='fixed'`` more than ``capacity`` tokens are
        refused here, before anything launches."""
        if self.parallel.capacity is not None and hidden_states.dim() > 1:
            check_capacity(hidden_states.shape[:-1].numel(), self.parallel.capacity)
        return super().forward(hidden_states, router_logits)

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
        if self.parallel.capacity is not None:
            check_capacity(x.shape[0], self.parallel.capacity)
        if self.expert_load is not None:
            flat = ids.reshape(-1).long()
            self.expert_load.scatter_add_(0, flat, torch.ones_like(flat))
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
    def _tp_dim(self, param: str) -> int | None:
        """The dim of fused parameter ``param`` ([E, ...]) that TP splits, or None (kept whole): w13's rows
        (each of the gate and up halves), w2's columns, and the scales that follow them (per channel: w13's
        rows, since w2's are K; per block: both); per-tensor and input scales are the same on every rank."""
        scheme = self.config.quant.weights
        granularity = scheme.granularity if scheme is not None else None
        if param in ("w13_weight", "w13_bias") or (param in ("w13_weight_scale", "w13_weight_zero_point")
                                                   and granularity != "tensor"):
            return 1
        if param == "w2_weight" or (param in ("w2_weight_scale", "w2_weight_zero_point")
                                    and granularity in ("block", "group")):
            return 2
        return None

    def _tp_slice(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This TP rank's 1/tp_size of ``t`` (a full-size tensor) along ``dim``."""
        size = t.shape[dim] // self.ranks.tp_size
        return t.narrow(dim, self.ranks.tp_rank * size, size)

    @torch.no_grad()
    def weight_loader(self, loaded_weight: torch.Tensor, expert_id: int, shard_id: ShardId) -> bool:
        """Load one per-expert checkpoint tensor of the full (unsliced) shape: ``w1``/``w3`` [N, K],
        ``w2`` [K, N], ``w1_bias``/``w3_bias`` [N], ``w2_bias`` [K], and a quantized layer's scales
        (``FusedMoE.weight_loader`` lists them, with the full N). Keeps this rank's TP slice; returns False
        for experts held by another EP rank."""
        if self.ranks.tp_size == 1:
            return super().weight_loader(loaded_weight, expert_id, shard_id)
        param = self._shard_param(shard_id)
        dim = self._tp_dim(param)
        if dim is not None:  # the per-expert shard lacks the expert dim, and w1/w3 are one half of w13
            loaded_weight = self._tp_shard(loaded_weight, expert_id, shard_id, param, dim - 1)
        elif shard_id == "w2_bias" and self.ranks.tp_rank > 0:
            loaded_weight = torch.zeros_like(loaded_weight)  # added once, by TP rank 0
        return super().weight_loader(loaded_weight, expert_id, shard_id)

    def _tp_shard(self, loaded: torch.Tensor, expert_id: int, shard_id: str, param: str, dim: int) -> torch.Tensor:
        """This rank's slice of a full per-expert shard along ``dim``, its full shape checked first."""
        local = tuple(self._shard_view(shard_id, 0).shape)
        full = (*local[:dim], local[dim] * self.ranks.tp_size, *local[dim + 1:])
        what = f"weight_loader: {shard_id} of expert {expert_id}"
        self._check_dtype(what, param, loaded)
        self._check_shape(what, param, tuple(loaded.shape), full, " (the full checkpoint shape)")
        return self._tp_slice(loaded.reshape(full), dim)

    def _fused_shape(self, param: str, dst: torch.Tensor) -> tuple[int, ...]:
        """Fused checkpoint tensors have the full shape: [E, 2N, K], [E, K, N], [E, 2N], [E, K], and the
        scales of those (``moe.quant.scale_shape`` with the full N)."""
        full = [self.config.num_experts, *dst.shape[1:]]
        dim = self._tp_dim(param)
        if dim is not None:
            full[dim] *= self.ranks.tp_size
        return tuple(full)

    def _fused_slice(self, param: str, src: torch.Tensor) -> torch.Tensor:
        """This rank's TP slice of a fused tensor (``load_fused_weights`` then keeps the local experts)."""
        if self.ranks.tp_size == 1:
            return src
        if param == "w2_bias":
            return src if self.ranks.tp_rank == 0 else torch.zeros_like(src)
        dim = self._tp_dim(param)
        if dim is None:
            return src
        if dim == 1:  # w13: [E, P, rows of one half, ...], gate then up
            return self._tp_slice(src.unflatten(1, (self._parts, -1)), 2)
        return self._tp_slice(src, dim)

    def extra_repr(self) -> str:
        r = self.ranks
        return (f"{super().extra_repr()}, ep={r.ep_rank}/{r.ep_size} ({self.parallel.placement}, "
                f"{self._dispatch_repr()}), tp={r.tp_rank}/{r.tp_size} (intermediate {self.config.intermediate_size} "
                f"of {self.global_intermediate_size})")


    def _dispatch_repr(self) -> str:
        p = self.parallel
        if p.dispatch != "fixed":
            return p.dispatch
        return f"fixed, capacity {p.capacity}" + (", fp8" if p.dispatch_quant == "fp8" else "")


def _check_tp_blocks(quant: QuantConfig, tp_size: int, intermediate_size: int) -> None:
    """Per-block scales split with their weights only where a TP slice of the intermediate dim (w13's
    rows, w2's columns) is a whole number of blocks."""
    scheme = quant.weights
    if tp_size == 1 or scheme is None or scheme.granularity != "block":
        return
    rows, cols = scheme.block  # type: ignore[misc]
    n = intermediate_size // tp_size
    if n % rows or n % cols:
        raise ValueError(
            f"tp_size={tp_size}: each TP rank holds {n} of intermediate_size={intermediate_size}, not a multiple "
            f"of the {quant.key()} scale block {rows}x{cols}, so the per-block scales cannot be split with the "
            f"weights; pick a tp_size whose slice is a multiple of {math.lcm(rows, cols)}, or use expert parallelism"
        )
