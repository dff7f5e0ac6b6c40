"""``FusedMoE``: gate -> routing -> experts backend -> (+ shared experts)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from .activations import apply_activation
from .config import ActivationSpec, MoEConfig, RoutingConfig
from .functional import PreparedCache, fused_experts
from .quant import QuantConfig
from .registry import get_backend
from .routing import RoutingFunction, route
from .validation import FLOAT_DTYPES, check_expert_map_values

__all__ = ["FusedMoE", "GatedMLP"]

ShardId = Literal["w1", "w3", "w2", "w1_bias", "w3_bias", "w2_bias"]


class GatedMLP(nn.Module):
    """A dense expert (for shared experts): ``down(act(gate(x)) * up(x))``, or ``down(act(up(x)))``
    for non-gated activations. Uses the same activation table as the routed experts."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, activation: str | ActivationSpec = "silu",
        bias: bool = False, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.activation = ActivationSpec.parse(activation)
        rows = 2 * intermediate_size if self.activation.gated else intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, rows, bias=bias, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = apply_activation(self.gate_up_proj(x).float(), self.activation).to(x.dtype)
        return self.down_proj(h)


class FusedMoE(nn.Module):
    """A Mixture-of-Experts layer whose routed experts run on a registered backend.

    Parameters: ``w13_weight`` [E_local, 2N, K] (gate rows then up rows; [E_local, N, K] for
    non-gated activations), ``w2_weight`` [E_local, K, N], optional ``w13_bias``/``w2_bias``, the
    router ``gate`` (``nn.Linear(K, E)``, optional), ``e_score_correction_bias`` [E] for DeepSeek-V3
    routing, and optional ``shared_experts`` added to the routed output (scaled by
    ``sigmoid(shared_expert_gate(x))`` when a shared-expert gate is given, as Qwen2-MoE does).

    ``expert_map`` ([E] int, the local id of each global expert or -1) is the seam for expert
    parallelism: the layer then holds only the local experts, and loaders skip the others.
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        routing: RoutingConfig | None = None,
        activation: str | ActivationSpec = "silu",
        bias: bool = False,
        params_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        quant: QuantConfig | None = None,
        backend: str = "auto",
        gate: bool = True,
        gate_bias: bool = False,
        shared_experts: nn.Module | None = None,
        shared_expert_gate: bool | nn.Module = False,
        custom_routing_function: RoutingFunction | None = None,
        expert_map: torch.Tensor | None = None,
        apply_router_weight_on_input: bool = False,
    ) -> None:
        super().__init__()
        self.config = MoEConfig(
            num_experts=num_experts, top_k=top_k, hidden_size=hidden_size,
            intermediate_size=intermediate_size, routing=routing or RoutingConfig(),
            activation=ActivationSpec.parse(activation), bias=bias,
            apply_router_weight_on_input=apply_router_weight_on_input, quant=quant or QuantConfig(),
        )
        if self.config.routing.method == "custom" and custom_routing_function is None:
            raise ValueError("routing method 'custom' needs custom_routing_function")
        if not isinstance(backend, str):
            raise TypeError(f"backend: expected a backend name, got {type(backend).__name__}")
        if backend != "auto":
            get_backend(backend)  # an unknown name fails here, not at the first forward
        self.backend = backend
        self.custom_routing_function = custom_routing_function
        dtype = params_dtype or torch.get_default_dtype()
        if dtype not in FLOAT_DTYPES:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
            raise TypeError(f"params_dtype: {dtype} is not allowed; use {allowed} (quantized weights: quant=...)")
        factory = {"dtype": dtype, "device": device}
        self._init_expert_map(expert_map, device)
        local, n, k = self.num_local_experts, intermediate_size, hidden_size
        rows = 2 * n if self.config.activation.gated else n
        self.w13_weight = nn.Parameter(torch.empty(local, rows, k, **factory), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(local, k, n, **factory), requires_grad=False)
        self.w13_bias = nn.Parameter(torch.zeros(local, rows, **factory), requires_grad=False) if bias else None
        self.w2_bias = nn.Parameter(torch.zeros(local, k, **factory), requires_grad=False) if bias else None
        self.gate = nn.Linear(k, num_experts, bias=gate_bias, **factory) if gate else None
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(num_experts, dtype=torch.float32, device=device), requires_grad=False)
            if self.config.routing.use_correction_bias
            else None
        )
        self.shared_experts = shared_experts
        if isinstance(shared_expert_gate, nn.Module):
            self.shared_expert_gate: nn.Module | None = shared_expert_gate
        else:
            self.shared_expert_gate = nn.Linear(k, 1, bias=False, **factory) if shared_expert_gate else None
        if self.shared_expert_gate is not None and shared_experts is None:
            raise ValueError("shared_expert_gate needs shared_experts")
        self._prepared = PreparedCache()  # a backend's own arrangement of the weights, made once (Backend.prepare)
        # the scheme as a string: what crosses torch.compile (None: unquantized)
        self._quant_key = self.config.quant.key() if self.config.quant.is_quantized else None
        self.reset_parameters()

    def _init_expert_map(self, expert_map: torch.Tensor | None, device: torch.device | str | None) -> None:
        num_experts = self.config.num_experts
        if expert_map is None:
            self.num_local_experts = num_experts
            self.register_buffer("expert_map", None, persistent=False)
            return
        if not isinstance(expert_map, torch.Tensor) or expert_map.dim() != 1 or expert_map.shape[0] != num_experts:
            got = tuple(expert_map.shape) if isinstance(expert_map, torch.Tensor) else type(expert_map).__name__
            raise ValueError(f"expert_map: expected a tensor of shape ({num_experts},), got {got}")
        if expert_map.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"expert_map: dtype {expert_map.dtype} is not allowed; use torch.int32 or torch.int64")
        num_local = int((expert_map >= 0).sum())
        if num_local == 0:
            raise ValueError("expert_map: holds no local expert (every value is -1); a layer holds at least one")
        check_expert_map_values(expert_map, num_local, each_once=True)
        self.num_local_experts = num_local
        self.register_buffer("expert_map", expert_map.to(torch.int32).to(device), persistent=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound13 = 1.0 / math.sqrt(self.config.hidden_size)
        bound2 = 1.0 / math.sqrt(self.config.intermediate_size)
        self.w13_weight.uniform_(-bound13, bound13)
        self.w2_weight.uniform_(-bound2, bound2)

    # ---------------------------------------------------------------------------------- forward
    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden_states`` [T, K] or [B, S, K]; ``router_logits`` [T, E] (or [B, S, E]) when the layer
        has no gate. Returns the same shape as ``hidden_states``."""
        shape = hidden_states.shape
        if hidden_states.dim() not in (2, 3) or shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"hidden_states: expected [T, {self.config.hidden_size}] or [B, S, {self.config.hidden_size}], "
                f"got {tuple(shape)}"
            )
        x = hidden_states.reshape(-1, shape[-1])
        if x.dtype != self.w13_weight.dtype and not self.config.quant.is_quantized:
            raise TypeError(f"hidden_states: dtype {x.dtype} differs from the layer's parameters "
                            f"({self.w13_weight.dtype}); cast the input (x.to({self.w13_weight.dtype})) or the layer "
                            f"(layer.to({x.dtype}))")
        weights, ids = self.select_experts(x, router_logits)
        y = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            shared = self.shared_experts(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        return y.view(shape)

    def select_experts(
        self, x: torch.Tensor, router_logits: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits -> (fp32 weights [T, k], int32 global ids [T, k])."""
        if router_logits is None:
            if self.gate is None:
                raise ValueError("router_logits is required: this FusedMoE was built with gate=False")
            router_logits = self.gate(x)
        num_experts = self.config.num_experts
        if not isinstance(router_logits, torch.Tensor) or router_logits.shape[-1] != num_experts or \
                router_logits.numel() != x.shape[0] * num_experts:
            got = (tuple(router_logits.shape) if isinstance(router_logits, torch.Tensor)
                   else type(router_logits).__name__)
            raise ValueError(f"router_logits: expected [{x.shape[0]}, {num_experts}] (or [B, S, {num_experts}]) for "
                             f"{x.shape[0]} tokens and {num_experts} experts, got {got}")
        router_logits = router_logits.reshape(x.shape[0], num_experts)
        return route(
            router_logits, self.config.top_k, self.config.routing, hidden_states=x,
            e_score_correction_bias=self.e_score_correction_bias,
            custom_routing_function=self.custom_routing_function,
        )

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The routed experts alone: [T, K] from routing weights and global ids."""
        return fused_experts(
            x, self.w13_weight, self.w2_weight, weights, ids, activation=self.config.activation,
            w13_bias=self.w13_bias, w2_bias=self.w2_bias,
            apply_router_weight_on_input=self.config.apply_router_weight_on_input,
            expert_map=self.expert_map, quant=self._quant_key, backend=self.backend, prepared=self._prepared,
        )

    @torch.no_grad()
    def prepare(self) -> None:
        """Make the chosen backend's own arrangement of the weights now (``Backend.prepare``; most backends
        need none), e.g. before ``torch.compile``, which cannot make it while tracing."""
        x = self.w13_weight.new_empty(0, self.config.hidden_size)
        k = self.config.top_k
        self.experts(x, x.new_empty(0, k, dtype=torch.float32), x.new_empty(0, k, dtype=torch.int32))

    def release_prepared(self) -> None:
        """Free the backend's own arrangement of the weights (``Backend.prepare``); the next forward on
        such a backend makes it again."""
        self._prepared.release()

    # ---------------------------------------------------------------------------- weight loading
    def local_expert_id(self, expert_id: int) -> int:
        """The local index of global ``expert_id``, or -1 when another rank holds it."""
        if not 0 <= expert_id < self.config.num_experts:
            raise ValueError(f"expert_id={expert_id} is out of range [0, {self.config.num_experts})")
        return expert_id if self.expert_map is None else int(self.expert_map[expert_id])

    def global_expert_ids(self) -> torch.Tensor:
        """[E_local] int64: the global id of each local expert."""
        if self.expert_map is None:
            return torch.arange(self.config.num_experts)
        emap = self.expert_map.cpu().long()
        held = (emap >= 0).nonzero().flatten()
        return torch.empty_like(held).scatter_(0, emap[held], held)

    @torch.no_grad()
    def weight_loader(self, loaded_weight: torch.Tensor, expert_id: int, shard_id: ShardId) -> bool:
        """Load one per-expert checkpoint tensor: ``w1`` (gate, [N, K]) and ``w3`` (up, [N, K]) into the
        two halves of w13 (``w1`` fills all of it for non-gated activations), ``w2`` ([K, N]), and
        their ``*_bias`` ([N] or [K]). Returns False (and loads nothing) for experts held elsewhere."""
        local = self.local_expert_id(expert_id)
        if local < 0:
            return False
        dst = self._shard_view(shard_id, local)
        if tuple(loaded_weight.shape) != tuple(dst.shape):
            raise ValueError(
                f"weight_loader: {shard_id} of expert {expert_id} must have shape {tuple(dst.shape)}, "
                f"got {tuple(loaded_weight.shape)}"
            )
        dst.copy_(loaded_weight)
        return True

    def _shard_view(self, shard_id: str, local: int) -> torch.Tensor:
        n, gated = self.config.intermediate_size, self.config.activation.gated
        is_bias = shard_id.endswith("_bias")
        if is_bias and not self.config.bias:
            raise ValueError(f"weight_loader: {shard_id} given but this FusedMoE was built with bias=False")
        base = shard_id.removesuffix("_bias")
        if base == "w2":
            return (self.w2_bias if is_bias else self.w2_weight)[local]  # type: ignore[index]
        if base not in ("w1", "w3"):
            raise ValueError(f"weight_loader: shard_id must be w1, w3, w2 or *_bias, got {shard_id!r}")
        if base == "w3" and not gated:
            raise ValueError(f"weight_loader: {shard_id} given but activation {self.config.activation.name!r} "
                             "is not gated (only w1 and w2)")
        w13 = (self.w13_bias if is_bias else self.w13_weight)[local]  # type: ignore[index]
        return w13.narrow(0, n if base == "w3" else 0, n)

    @torch.no_grad()
    def load_fused_weights(
        self,
        w13: torch.Tensor | None = None,
        w2: torch.Tensor | None = None,
        w13_bias: torch.Tensor | None = None,
        w2_bias: torch.Tensor | None = None,
    ) -> None:
        """Load fused 3-D checkpoint tensors covering all ``num_experts`` global experts (transformers'
        ``gate_up_proj`` transposed to [E, 2N, K], ``down_proj`` to [E, K, N]); only the local
        experts are copied."""
        idx = None if self.expert_map is None else self.global_expert_ids()
        for name, src, dst in (("w13", w13, self.w13_weight), ("w2", w2, self.w2_weight),
                               ("w13_bias", w13_bias, self.w13_bias), ("w2_bias", w2_bias, self.w2_bias)):
            if src is None:
                continue
            if dst is None:
                raise ValueError(f"load_fused_weights: {name} given but this FusedMoE was built with bias=False")
            want = self._fused_shape(name, dst)
            if tuple(src.shape) != want:
                raise ValueError(f"load_fused_weights: {name} must have shape {want}, got {tuple(src.shape)}")
            local = self._fused_slice(name, src)  # a view: only the local rows below are read
            if idx is not None:
                local = local[idx.to(src.device)]
            dst.view(local.shape).copy_(local)

    def _fused_shape(self, name: str, dst: torch.Tensor) -> tuple[int, ...]:
        """The checkpoint shape of fused tensor ``name`` (all global experts)."""
        return (self.config.num_experts, *dst.shape[1:])

    def _fused_slice(self, name: str, src: torch.Tensor) -> torch.Tensor:
        """This layer's part of a fused checkpoint tensor, before picking the local experts (tensor
        parallelism slices here)."""
        return src

    def extra_repr(self) -> str:
        c = self.config
        return (f"experts={c.num_experts} (local {self.num_local_experts}), top_k={c.top_k}, "
                f"hidden={c.hidden_size}, intermediate={c.intermediate_size}, activation={c.activation.name}, "
                f"routing={c.routing.method}, backend={self.backend!r}")
