"""``FusedMoE``: gate -> routing -> experts backend -> (+ shared experts)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from .activations import apply_activation
from .config import ActivationSpec, MoEConfig, RoutingConfig
from .contract import Weight
from .functional import PreparedCache, fused_experts, fused_moe
from .quant import NAMES, QuantConfig, QuantizedWeight, quantize
from .quant.schemes import STORAGE_DTYPES
from .quant.weights import int4_scale_dtype, scale_dtypes, storage_shapes
from .registry import get_backend
from .routing import RoutingFunction, route
from .validation import FLOAT_DTYPES, check_expert_map_values, value_checks_enabled

__all__ = ["FusedMoE", "GatedMLP"]

ShardId = Literal[
    "w1", "w3", "w2", "w1_bias", "w3_bias", "w2_bias", "w1_weight_scale", "w3_weight_scale", "w2_weight_scale",
    "w1_input_scale", "w3_input_scale", "w2_input_scale", "w1_weight_zero_point", "w3_weight_zero_point",
    "w2_weight_zero_point", "w1_weight_global_scale", "w3_weight_global_scale", "w2_weight_global_scale",
]

# shard id -> (parameter, part): w1 is the gate half (part 0) of a w13 parameter, w3 the up half (part 1),
# w2 the whole expert slice (None); w1's and w3's input scales both feed w13_input_scale
_SHARDS: dict[str, tuple[str, int | None]] = {
    f"{w}{suffix}": (f"{'w2' if w == 'w2' else 'w13'}{suffix or '_weight'}", {"w1": 0, "w3": 1}.get(w))
    for suffix in ("", "_bias", "_weight_scale", "_weight_zero_point", "_weight_global_scale", "_input_scale")
    for w in ("w1", "w3", "w2")
}
# load_fused_weights keyword -> parameter
_FUSED = {"w13": "w13_weight", "w2": "w2_weight", "w13_bias": "w13_bias", "w2_bias": "w2_bias",
          "w13_scale": "w13_weight_scale", "w2_scale": "w2_weight_scale", "w13_input_scale": "w13_input_scale",
          "w2_input_scale": "w2_input_scale", "w13_zero_point": "w13_weight_zero_point",
          "w2_zero_point": "w2_weight_zero_point", "w13_global_scale": "w13_weight_global_scale",
          "w2_global_scale": "w2_weight_global_scale"}
# the parameters beside the data that a QuantizedWeight holds, by its field
_QFIELDS = {"scale": "_weight_scale", "zero": "_weight_zero_point", "global_scale": "_weight_global_scale"}
_FLOAT_NAMES = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


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

    ``quant`` (a :class:`~moe.quant.QuantConfig` or a name of ``moe.quant.NAMES``) stores the routed
    experts quantized, in the canonical layout of ``moe.quant.schemes``: ``w13_weight``/``w2_weight`` hold
    the data (float8_e4m3fn, int8, or uint8 packed 4-bit codes), ``w13_weight_scale``/``w2_weight_scale``
    their scales (``moe.quant.weights.storage_shapes``; w13's gate and up halves have their own), int4 with
    zero points adds ``w13_weight_zero_point``/``w2_weight_zero_point`` (uint8, the scales' shape), nvfp4
    ``w13_weight_global_scale``/``w2_weight_global_scale`` (fp32 [E_local, P], multipliers as ModelOpt's
    ``weight_scale_2``), and static activation schemes add ``w13_input_scale``/``w2_input_scale`` (fp32
    [E_local], one per expert). Weight-only schemes (``w8a16``, ``w4a16``, ``mxfp4``, ...) leave the
    activations in ``params_dtype``. ``params_dtype`` stays
    the activation dtype (of the inputs, biases, gates and shared experts). ``moe.quant.quantize_``
    converts a float layer in place instead.

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
        quant: QuantConfig | str | None = None,
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
            apply_router_weight_on_input=apply_router_weight_on_input, quant=QuantConfig.parse(quant),
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
            raise TypeError(f"params_dtype: {dtype} is not allowed; use {_FLOAT_NAMES} (quantized weights: quant=...)")
        self.params_dtype = dtype  # the activation dtype (a quantized layer's weights are stored otherwise)
        factory = {"dtype": dtype, "device": device}
        self._init_expert_map(expert_map, device)
        self._init_experts(device)
        k = hidden_size
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
        self._qweights: tuple[QuantizedWeight, QuantizedWeight] | None = None  # over the parameters, see experts()
        self.reset_parameters()
        self._expert_weights()  # made here, outside any torch.compile trace (QuantizedWeight validates eagerly)

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

    def _init_experts(self, device: torch.device | str | None) -> None:
        """The routed experts' parameters: data, biases, and the scheme's scales (None when it has none)."""
        c, local, parts, scheme = self.config, self.num_local_experts, self._parts, self.config.quant.weights
        n, k, rows = c.intermediate_size, c.hidden_size, self._parts * c.intermediate_size
        store = STORAGE_DTYPES.get(scheme.format, self.params_dtype) if scheme else self.params_dtype
        shapes = {"w13": storage_shapes(scheme, local, rows, k, parts), "w2": storage_shapes(scheme, local, k, n, 1)} \
            if scheme else {"w13": {"data": (local, rows, k)}, "w2": {"data": (local, k, n)}}
        self.w13_weight = _frozen(torch.empty(shapes["w13"]["data"], dtype=store, device=device))
        self.w2_weight = _frozen(torch.empty(shapes["w2"]["data"], dtype=store, device=device))
        factory = {"dtype": self.params_dtype, "device": device}
        self.w13_bias = _frozen(torch.zeros(local, rows, **factory)) if c.bias else None
        self.w2_bias = _frozen(torch.zeros(local, k, **factory)) if c.bias else None
        static = c.quant.static_activations
        scale_dt = (int4_scale_dtype(self.params_dtype) if scheme.format == "int4" else scale_dtypes(scheme)[0]) \
            if scheme else torch.float32
        dtypes = {"scale": scale_dt, "zero": torch.uint8, "global_scale": torch.float32}
        for w in ("w13", "w2"):
            for qfield, suffix in _QFIELDS.items():
                shape = shapes[w].get(qfield)
                ones = None if shape is None else _frozen(torch.ones(shape, dtype=dtypes[qfield], device=device))
                self.register_parameter(f"{w}{suffix}", ones)
        for name in ("w13_input_scale", "w2_input_scale"):
            ones = _frozen(torch.ones(local, dtype=torch.float32, device=device)) if static else None
            self.register_parameter(name, ones)
        # w1's and w3's input scales as loaded (NaN: not yet), merged into w13_input_scale by weight_loader
        parts_seen = torch.full((local, 2), math.nan, device=device) if static else None
        self.register_buffer("_w13_input_parts", parts_seen, persistent=False)

    @property
    def _parts(self) -> int:
        """2 for a gated w13 (gate and up halves), 1 otherwise."""
        return 2 if self.config.activation.gated else 1

    @property
    def _activation_dtype(self) -> torch.dtype:
        """The dtype ``hidden_states`` must have: the weights' when unquantized (``layer.to(dtype)`` moves it)."""
        return self.params_dtype if self._quant_key is not None else self.w13_weight.dtype

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) expert weights; a quantized layer quantizes them one expert
        at a time (scales from the data; input scales stay 1)."""
        c = self.config
        for name, fan_in, parts in (("w13", c.hidden_size, self._parts), ("w2", c.intermediate_size, 1)):
            weight, bound = getattr(self, f"{name}_weight"), 1.0 / math.sqrt(fan_in)
            if self._quant_key is None:
                weight.uniform_(-bound, bound)
                continue
            logical = (weight.shape[1], fan_in)  # [rows, cols]: packed 4-bit data holds cols / 2 bytes a row
            for e in range(weight.shape[0]):
                w = torch.empty(1, *logical, dtype=self.params_dtype, device=weight.device)
                q = quantize(w.uniform_(-bound, bound), c.quant.weights, parts=parts)
                weight[e] = q.data[0]
                for qfield, suffix in _QFIELDS.items():
                    if getattr(q, qfield) is not None:
                        getattr(self, f"{name}{suffix}")[e] = getattr(q, qfield)[0]

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
        x = hidden_states if hidden_states.dim() == 2 else hidden_states.reshape(-1, shape[-1])
        want = self._activation_dtype
        if x.dtype != want:
            fix = f"cast the input (x.to({want}))"
            if self._quant_key is None:
                fix += f" or the layer (layer.to({x.dtype}))"
            raise TypeError(f"hidden_states: dtype {x.dtype} differs from the layer's parameters ({want}); {fix}")
        y = self._routed(x, router_logits)
        if self.shared_experts is not None:
            shared = self.shared_experts(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        return y if hidden_states.dim() == 2 else y.view(shape)

    # forward calls select_experts and experts themselves when a subclass overrides either (see _routed)
    _one_call = True

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls._one_call = cls.select_experts is FusedMoE.select_experts and cls.experts is FusedMoE.experts

    def _routed(self, x: torch.Tensor, router_logits: torch.Tensor | None) -> torch.Tensor:
        """select_experts then experts, as one ``fused_moe`` call (routing and alignment in one launch where
        the kernels can); the two calls themselves when a subclass or the instance replaces either."""
        if not self._one_call or "select_experts" in self.__dict__ or "experts" in self.__dict__:
            return self.experts(x, *self.select_experts(x, router_logits))
        w13, w2 = self._expert_weights()
        c = self.config
        return fused_moe(
            x, self._router_logits(x, router_logits), w13, w2, top_k=c.top_k, routing=c.routing,
            e_score_correction_bias=self.e_score_correction_bias, custom_routing_function=self.custom_routing_function,
            activation=c.activation, w13_bias=self.w13_bias, w2_bias=self.w2_bias,
            apply_router_weight_on_input=c.apply_router_weight_on_input, expert_map=self.expert_map,
            quant=self._quant_key, a13_scale=self.w13_input_scale, a2_scale=self.w2_input_scale, backend=self.backend,
            prepared=self._prepared,
        )

    def select_experts(
        self, x: torch.Tensor, router_logits: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits -> (fp32 weights [T, k], int32 global ids [T, k])."""
        return route(
            self._router_logits(x, router_logits), self.config.top_k, self.config.routing, hidden_states=x,
            e_score_correction_bias=self.e_score_correction_bias,
            custom_routing_function=self.custom_routing_function,
        )

    def _router_logits(self, x: torch.Tensor, router_logits: torch.Tensor | None) -> torch.Tensor:
        """The logits [T, E]: given ([T, E] or [B, S, E]) or from the gate."""
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
        return router_logits if router_logits.dim() == 2 else router_logits.reshape(x.shape[0], num_experts)

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The routed experts alone: [T, K] from routing weights and global ids."""
        w13, w2 = self._expert_weights()
        return fused_experts(
            x, w13, w2, weights, ids, activation=self.config.activation,
            w13_bias=self.w13_bias, w2_bias=self.w2_bias,
            apply_router_weight_on_input=self.config.apply_router_weight_on_input,
            expert_map=self.expert_map, quant=self._quant_key, a13_scale=self.w13_input_scale,
            a2_scale=self.w2_input_scale, backend=self.backend, prepared=self._prepared,
        )

    def _expert_weights(self) -> tuple[Weight, Weight]:
        """w13 and w2 as ``fused_experts`` takes them: the parameters, or QuantizedWeights over them, made
        again only when a parameter object is replaced (in-place loads and ``layer.to(device)`` keep them;
        after replacing one, call ``prepare()`` before ``torch.compile(fullgraph=True)``, which cannot make
        them while tracing)."""
        if self._quant_key is None:
            return self.w13_weight, self.w2_weight
        q = self._qweights
        if q is None or any(getattr(qw, f) is not getattr(self, f"{w}{suffix}")
                            for w, qw in zip(("w13", "w2"), q, strict=True)
                            for f, suffix in (("data", "_weight"), *_QFIELDS.items())):
            scheme = self.config.quant.weights
            q = tuple(QuantizedWeight(getattr(self, f"{w}_weight"), getattr(self, f"{w}_weight_scale"), scheme,
                                      getattr(self, f"{w}_weight_zero_point"),
                                      getattr(self, f"{w}_weight_global_scale"), parts=self._parts if w == "w13" else 1)
                      for w in ("w13", "w2"))  # type: ignore[assignment]
            self._qweights = q
        return q

    _QUANTIZED_STORAGE = ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale", "w13_weight_zero_point",
                          "w2_weight_zero_point", "w13_weight_global_scale", "w2_weight_global_scale",
                          "w13_input_scale", "w2_input_scale")

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """``layer.to(...)``, ``.half()``, ``.cuda()``: a quantized layer's data and scales move to the new
        device but keep their storage dtypes (float8/int8 data, fp32 scales); everything else follows the
        call as usual."""
        if self._quant_key is None:
            return super()._apply(fn, recurse)
        kept = {n: self._parameters.pop(n) for n in self._QUANTIZED_STORAGE if self._parameters.get(n) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            probe = fn(torch.empty(0, dtype=self.params_dtype, device=next(iter(kept.values())).device))
            self.params_dtype = probe.dtype  # the activation dtype follows the call
            for name, p in kept.items():
                self._parameters[name] = p if p.device == probe.device else _frozen(p.data.to(probe.device))
        return self

    @torch.no_grad()
    def prepare(self) -> None:
        """Make the chosen backend's own arrangement of the weights now (``Backend.prepare``; most backends
        need none), e.g. before ``torch.compile``, which cannot make it while tracing."""
        x = torch.empty(0, self.config.hidden_size, dtype=self._activation_dtype, device=self.w13_weight.device)
        k = self.config.top_k
        self.experts(x, x.new_empty(0, k, dtype=torch.float32), x.new_empty(0, k, dtype=torch.int32))

    def release_prepared(self) -> None:
        """Free the backend's own arrangement of the weights (``Backend.prepare``); the next forward on
        such a backend makes it again."""
        self._prepared.release()

    # ------------------------------------------------------------------------------ quantization
    @torch.no_grad()
    def quantize_experts_(self, config: QuantConfig | str) -> None:
        """Quantize the routed experts in place with ``config`` (``moe.quant.quantize_`` calls this):
        ``w13_weight`` (gate and up halves with their own scales) and ``w2_weight`` become new data and
        ``*_weight_scale`` parameters (``moe.quant.quantize``) and the float weights are freed; biases
        stay in the activation dtype. Static activation schemes are refused: their input scales come from
        calibration or a checkpoint, never from the weights."""
        cfg = QuantConfig.parse(config)
        if self._quant_key is not None:
            raise ValueError(f"quantize_: this FusedMoE is already quantized ({self._quant_key}); quantize a layer "
                             "with float weights, once")
        if not cfg.is_quantized:
            raise ValueError(f"quantize_: {cfg.key()} is not quantized; give a name of {', '.join(NAMES)}")
        if cfg.static_activations:
            dynamic = cfg.model_copy(update={"activations": cfg.activations.model_copy(update={"static": False})})
            raise ValueError(
                f"quantize_: {cfg.key()} quantizes activations with static input scales, which come from "
                f"calibration or a checkpoint, not from the weights; build FusedMoE(quant={cfg.key()!r}) and "
                "load them with weight_loader (w1_input_scale, w3_input_scale, w2_input_scale) or "
                f"load_fused_weights, or use the dynamic scheme {dynamic.key()!r}"
            )
        self._prepared.release()
        self._qweights = None
        self.params_dtype = self.w13_weight.dtype  # the activation dtype from now on
        for name, parts in (("w13", self._parts), ("w2", 1)):
            q = quantize(getattr(self, f"{name}_weight"), cfg.weights, parts=parts)
            setattr(self, f"{name}_weight", _frozen(q.data))  # the float weight goes here
            for qfield, suffix in _QFIELDS.items():
                t = getattr(q, qfield)
                self.register_parameter(f"{name}{suffix}", None if t is None else _frozen(t))
        self.config = self.config.model_copy(update={"quant": cfg})
        self._quant_key = cfg.key()
        self._expert_weights()

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
        """Load one per-expert checkpoint tensor. Returns False (and loads nothing) for experts held elsewhere.

        - ``w1`` (gate, [N, K]) and ``w3`` (up, [N, K]) fill the two halves of w13 (``w1`` all of it for
          non-gated activations), ``w2`` ([K, N]) w2; a quantized layer takes them in its storage dtype
          (float8_e4m3fn, int8, or uint8 packed 4-bit codes [N, K / 2]: element 2j in the low nibble), an
          unquantized one casts float tensors to ``params_dtype``;
        - ``w1_bias``/``w3_bias`` ([N]) and ``w2_bias`` ([K]);
        - ``w1_weight_scale``/``w3_weight_scale``/``w2_weight_scale``: the shard's part of the canonical
          scale: per tensor a scalar (w13's column 0 or 1), per channel [N] (w13's first or next N rows) or
          [K], per block [ceil(N/128), ceil(K/128)] (the gate's or the up's block rows) or
          [ceil(K/128), ceil(N/128)], per group [N, K / G] or [K, N / G]; size-1 dims may be left out or
          added (a [N, 1] scale loads);
        - ``w1_weight_zero_point``/``w3_weight_zero_point``/``w2_weight_zero_point`` (int4 with zero
          points): uint8, one per group, unpacked, the scale's shape;
        - ``w1_weight_global_scale``/``w3_weight_global_scale``/``w2_weight_global_scale`` (nvfp4): a
          scalar multiplier (ModelOpt's ``weight_scale_2``; compressed-tensors' global scale is its inverse);
        - ``w1_input_scale``/``w3_input_scale``/``w2_input_scale`` (static activation schemes): scalars.
          w13's GEMM quantizes one input for both halves, so ``w13_input_scale`` of the expert is the larger
          of its w1 and w3 input scales loaded so far (as vLLM does; they are often equal).
        Scales stored as floats (fp32; int4's bf16/fp16/fp32) are cast from other float dtypes; e8m0 and e4m3
        scales and zero points load in their own dtype only. GPTQ act-order (``desc_act``, the checkpoint's
        ``g_idx``) is refused: see docs/quantization.md."""
        local = self.local_expert_id(expert_id)
        if local < 0:
            return False
        what = f"weight_loader: {shard_id} of expert {expert_id}"
        dst = self._shard_view(shard_id, local)
        param = _SHARDS[shard_id][0]
        self._check_dtype(what, param, loaded_weight)
        self._check_shape(what, param, tuple(loaded_weight.shape), tuple(dst.shape))
        value = loaded_weight.reshape(dst.shape)
        if param.endswith("_input_scale"):
            _check_input_scale(what, value)
        if param == "w13_input_scale":
            value = self._merge_input_scales(value, local, _SHARDS[shard_id][1])
        dst.copy_(value)
        return True

    def _merge_input_scales(self, value: torch.Tensor, local: int, part: int) -> torch.Tensor:
        """w13's input scale of expert ``local`` after w1's (part 0) or w3's (part 1) is loaded: the larger
        loaded so far, whatever the order (a reload replaces that part's value)."""
        seen = self._w13_input_parts[local]
        seen[part] = value
        return torch.fmax(seen[0], seen[1])  # fmax skips the NaN of a part not loaded yet

    def _shard_param(self, shard_id: str) -> str:
        """The parameter shard ``shard_id`` fills; raises unless this layer has it."""
        if shard_id.endswith("g_idx"):
            raise ValueError(f"weight_loader: {shard_id}: GPTQ act-order (desc_act=true, the checkpoint's g_idx "
                             "field) is not supported: its groups are not contiguous along K, which the group "
                             "scales here assume; use a checkpoint quantized with desc_act=false, or reorder the "
                             "input features and requantize")
        if shard_id not in _SHARDS:
            raise ValueError(f"weight_loader: shard_id must be {', '.join(_SHARDS)}, got {shard_id!r}")
        param, part = _SHARDS[shard_id]
        if getattr(self, param) is None:
            raise ValueError(self._missing(f"weight_loader: {shard_id}", param))
        if part == 1 and not self.config.activation.gated:
            raise ValueError(f"weight_loader: {shard_id} given but activation {self.config.activation.name!r} "
                             "is not gated (only w1 and w2)")
        return param

    def _shard_view(self, shard_id: str, local: int) -> torch.Tensor:
        """The part of local expert ``local``'s slice of a parameter that shard ``shard_id`` fills."""
        param = self._shard_param(shard_id)
        view, part = getattr(self, param)[local], _SHARDS[shard_id][1]
        if part is None or param == "w13_input_scale":
            return view
        size = view.shape[0] // self._parts  # w13's rows, scale rows or block rows: the gate's, then the up's
        return view.narrow(0, part * size, size)

    def _missing(self, what: str, param: str) -> str:
        """Why this layer has no ``param`` for ``what``."""
        if param.endswith("_bias"):
            return f"{what} given but this FusedMoE was built with bias=False"
        if self._quant_key is None:
            return f"{what} given but this FusedMoE is unquantized; build it with quant=... (one of {', '.join(NAMES)})"
        if param.endswith(("_zero_point", "_global_scale")):
            needs = "int4 with zero points (w4a16_zp)" if param.endswith("_zero_point") else "nvfp4"
            return f"{what} given but {self._quant_key} has no {param.split('_weight_')[1]}; only {needs} has one"
        return (f"{what} given but {self._quant_key} quantizes activations with scales computed per call (no "
                "input scales); leave it out, or build the layer with a static scheme (fp8_tensor_static)")

    def _check_dtype(self, what: str, param: str, t: torch.Tensor) -> None:
        """A quantized layer's data must be stored as its scheme stores it; everything else is float (cast)."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
        want = getattr(self, param).dtype
        if param.endswith("_weight") and self._quant_key is not None:
            if t.dtype != want:
                signed = ("; packed 4-bit codes are unsigned: view signed bytes as uint8"
                          if want == torch.uint8 and t.dtype == torch.int8 else "")
                raise TypeError(f"{what}: dtype {t.dtype}, but {self._quant_key} stores weights as {want}; load the "
                                "checkpoint's quantized data, or load float weights into an unquantized FusedMoE "
                                f"and convert it with moe.quant.quantize_{signed}")
        elif want not in FLOAT_DTYPES:  # e8m0 / e4m3 scales, zero points: their bits are the value
            if t.dtype != want:
                raise TypeError(f"{what}: dtype {t.dtype}, but {self._quant_key} stores {param} as {want}")
        elif t.dtype not in FLOAT_DTYPES:
            hint = ("; quantized checkpoints need FusedMoE(quant=...)"
                    if param.endswith("_weight") and self._quant_key is None else "")
            raise TypeError(f"{what}: dtype {t.dtype} is not allowed; use {_FLOAT_NAMES}{hint}")

    @staticmethod
    def _check_shape(what: str, param: str, got: tuple[int, ...], want: tuple[int, ...], note: str = "") -> None:
        """Weights and biases have exactly the shape; scales may add or leave out size-1 dims."""
        if param.endswith("_scale"):
            if _squeezed(got) != _squeezed(want):
                raise ValueError(f"{what} must have shape {want}{note} (size-1 dims may be left out), got {got}")
        elif got != want:
            raise ValueError(f"{what} must have shape {want}{note}, got {got}")

    @torch.no_grad()
    def load_fused_weights(
        self,
        w13: torch.Tensor | None = None,
        w2: torch.Tensor | None = None,
        w13_bias: torch.Tensor | None = None,
        w2_bias: torch.Tensor | None = None,
        *,
        w13_scale: torch.Tensor | None = None,
        w2_scale: torch.Tensor | None = None,
        w13_input_scale: torch.Tensor | None = None,
        w2_input_scale: torch.Tensor | None = None,
        w13_zero_point: torch.Tensor | None = None,
        w2_zero_point: torch.Tensor | None = None,
        w13_global_scale: torch.Tensor | None = None,
        w2_global_scale: torch.Tensor | None = None,
    ) -> None:
        """Load fused 3-D checkpoint tensors covering all ``num_experts`` global experts (transformers'
        ``gate_up_proj`` transposed to [E, 2N, K], ``down_proj`` to [E, K, N]); only the local
        experts are copied. A quantized layer also takes its scales in the canonical layout
        (``w13_scale``/``w2_scale``: ``moe.quant.scale_shape`` for all E experts) and, for static
        activation schemes, ``w13_input_scale``/``w2_input_scale`` [E] (w13's: the larger of a checkpoint's
        w1 and w3 input scales); int4 zero points ``w13_zero_point``/``w2_zero_point`` and nvfp4 global
        scales ``w13_global_scale`` [E, P]/``w2_global_scale`` [E, 1], canonical too."""
        given = {"w13": w13, "w2": w2, "w13_bias": w13_bias, "w2_bias": w2_bias, "w13_scale": w13_scale,
                 "w2_scale": w2_scale, "w13_input_scale": w13_input_scale, "w2_input_scale": w2_input_scale,
                 "w13_zero_point": w13_zero_point, "w2_zero_point": w2_zero_point,
                 "w13_global_scale": w13_global_scale, "w2_global_scale": w2_global_scale}
        idx = None if self.expert_map is None else self.global_expert_ids()
        for name, src in given.items():
            if src is None:
                continue
            param, what = _FUSED[name], f"load_fused_weights: {name}"
            dst = getattr(self, param)
            if dst is None:
                raise ValueError(self._missing(what, param))
            self._check_dtype(what, param, src)
            want = self._fused_shape(param, dst)
            self._check_shape(what, param, tuple(src.shape), want)
            if param.endswith("_input_scale"):
                _check_input_scale(what, src)
            local = self._fused_slice(param, src.reshape(want))  # a view: only the local rows below are read
            if idx is not None:
                local = local[idx.to(src.device)]
            dst.view(local.shape).copy_(local)

    @torch.no_grad()
    def swap_expert_tensors_(self, tensors: dict[str, torch.Tensor],
                             w13_input_parts: torch.Tensor | None = None) -> None:
        """Replace routed-expert parameters all at once, for checkpoint loaders that fill temporaries first
        (``moe.checkpoints``): each key names a parameter of this layer (``w13_weight``, ``w13_weight_scale``,
        ...) and its tensor must have that parameter's shape and dtype. Everything is checked before anything
        changes, so a refused call leaves the layer as it was. Parameters on a real device are copied into in
        place; parameters on the meta device (a layer built to be loaded) become new parameters on the
        tensors' device. int4 scales may come in another dtype int4 stores (bf16, fp16, fp32: a GPTQ
        checkpoint's fp16 scales in a bf16 layer), which then replaces the parameter's. ``w13_input_parts``
        ([E_local, 2]) are the w1 and w3 input scales behind ``w13_input_scale`` (their max), kept for export."""
        retyped = set()  # int4 scales in another dtype the scheme stores (a checkpoint's fp16 in a bf16 layer)
        for name, t in tensors.items():
            dst = getattr(self, name, None) if name in self._parameters else None
            if dst is None:
                raise ValueError(f"swap_expert_tensors_: {name} is not a parameter of this FusedMoE; parameters: "
                                 f"{', '.join(n for n, p in self._parameters.items() if p is not None)}")
            scheme = self.config.quant.weights
            if (name.endswith("_weight_scale") and t.dtype != dst.dtype and scheme is not None
                    and scheme.format == "int4" and t.dtype in scale_dtypes(scheme)):
                retyped.add(name)
            elif tuple(t.shape) != tuple(dst.shape) or t.dtype != dst.dtype:
                raise ValueError(f"swap_expert_tensors_: {name} must be {tuple(dst.shape)} {dst.dtype}, got "
                                 f"{tuple(t.shape)} {t.dtype}")
            if tuple(t.shape) != tuple(dst.shape):
                raise ValueError(f"swap_expert_tensors_: {name} must have shape {tuple(dst.shape)}, got "
                                 f"{tuple(t.shape)}")
        self._prepared.release()
        for name, t in tensors.items():
            dst = self._parameters[name]
            if dst.is_meta or name in retyped:
                self._parameters[name] = _frozen(t if dst.is_meta else t.to(dst.device))
            else:
                dst.copy_(t)
        if w13_input_parts is not None and self._w13_input_parts is not None:
            if self._w13_input_parts.is_meta:
                self._w13_input_parts = w13_input_parts.to(torch.float32)
            else:
                self._w13_input_parts.copy_(w13_input_parts)
        self._expert_weights()  # remade here, outside any trace

    def _fused_shape(self, param: str, dst: torch.Tensor) -> tuple[int, ...]:
        """The checkpoint shape of the fused tensor of parameter ``param`` (all global experts)."""
        return (self.config.num_experts, *dst.shape[1:])

    def _fused_slice(self, param: str, src: torch.Tensor) -> torch.Tensor:
        """This layer's part of a fused checkpoint tensor, before picking the local experts (tensor
        parallelism slices here)."""
        return src

    def extra_repr(self) -> str:
        c = self.config
        quant = f", quant={self._quant_key}" if self._quant_key is not None else ""
        return (f"experts={c.num_experts} (local {self.num_local_experts}), top_k={c.top_k}, "
                f"hidden={c.hidden_size}, intermediate={c.intermediate_size}, activation={c.activation.name}, "
                f"routing={c.routing.method}{quant}, backend={self.backend!r}")


def _check_input_scale(what: str, scale: torch.Tensor) -> None:
    """Static input scales divide the activations: a zero, negative or non-finite one is garbage (value
    check: CPU tensors, or validation mode)."""
    if value_checks_enabled(scale) and not bool(((scale > 0) & torch.isfinite(scale)).all()):
        raise ValueError(f"{what}: input scales must be finite and > 0, got {scale.flatten()[:8].tolist()}")
