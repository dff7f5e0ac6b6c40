"""Validated, frozen, tensor-free configs: activation, routing, layer (quantization schemes: ``moe.quant``).

Every model here is a pydantic model with ``frozen=True`` and ``extra="forbid"``: a typo in a field
name is an error, and nobody mutates a config they were given. Validation errors name the field, the
value received and what is allowed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .frozen import Frozen
from .quant.schemes import QuantConfig

__all__ = [
    "GATED_ACTIVATIONS",
    "NON_GATED_ACTIVATIONS",
    "ActivationSpec",
    "MoEConfig",
    "RoutingConfig",
]


DEFAULT_ALPHA = 1.702
DEFAULT_LIMIT = 7.0
GATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "swigluoai")
NON_GATED_ACTIVATIONS = ("relu2", "silu_no_mul", "gelu_no_mul")
ActivationName = Literal["silu", "gelu", "gelu_tanh", "swigluoai", "relu2", "silu_no_mul", "gelu_no_mul"]


class ActivationSpec(Frozen):
    """An activation and its parameters.

    Gated activations compute ``act(gate) * up`` from ``w13 = [gate rows; up rows]``; ``swigluoai`` is
    gpt-oss's clamped SwiGLU ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with
    ``g = clamp(gate, max=limit)``. Non-gated ones (``relu2``, ``silu_no_mul``, ``gelu_no_mul``) apply
    ``act`` to ``w13 = [N, K]`` rows directly.
    """

    name: ActivationName = "silu"
    alpha: float = Field(DEFAULT_ALPHA, gt=0, description="swigluoai: sigmoid slope")
    limit: float = Field(DEFAULT_LIMIT, gt=0, description="swigluoai: clamp limit")

    @property
    def gated(self) -> bool:
        return self.name in GATED_ACTIVATIONS

    @classmethod
    def parse(cls, value: str | ActivationSpec) -> ActivationSpec:
        if isinstance(value, ActivationSpec):
            return value
        if not isinstance(value, str):
            raise TypeError(f"activation must be a name or an ActivationSpec, got {type(value).__name__}")
        allowed = GATED_ACTIVATIONS + NON_GATED_ACTIVATIONS
        if value not in allowed:
            raise ValueError(f"activation: unknown activation {value!r}; allowed: {', '.join(allowed)}")
        if value not in _PARSED:  # one object per name: parsing sits on the hot path of every call
            _PARSED[value] = cls(name=value)  # type: ignore[arg-type]
        return _PARSED[value]


_PARSED: dict[str, ActivationSpec] = {}

RoutingMethod = Literal["topk", "topk_then_softmax", "grouped_topk", "custom"]


class RoutingConfig(Frozen):
    """How router logits become (weights, ids).

    - ``topk``: softmax (fp32) or sigmoid scores, top-k, optional renormalization (Mixtral, Qwen).
    - ``topk_then_softmax``: top-k on the logits, softmax over the k selected (gpt-oss, GraniteMoE).
    - ``grouped_topk``: DeepSeek-V2/V3 group-limited routing with an optional correction bias.
    - ``custom``: a user function ``(hidden_states, router_logits, top_k) -> (weights, ids)``.
    """

    method: RoutingMethod = "topk"
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: bool = True
    num_expert_group: int | None = Field(None, ge=1)
    topk_group: int | None = Field(None, ge=1)
    routed_scaling_factor: float = Field(1.0, gt=0)
    use_correction_bias: bool = False

    @model_validator(mode="after")
    def _check(self) -> RoutingConfig:
        if self.method == "grouped_topk":
            if self.num_expert_group is None or self.topk_group is None:
                raise ValueError(
                    "grouped_topk needs num_expert_group and topk_group, got "
                    f"num_expert_group={self.num_expert_group}, topk_group={self.topk_group}"
                )
            if self.topk_group > self.num_expert_group:
                raise ValueError(
                    f"topk_group={self.topk_group} must be <= num_expert_group={self.num_expert_group}"
                )
        elif self.use_correction_bias:
            raise ValueError(f"use_correction_bias needs method='grouped_topk', got method={self.method!r}")
        if self.method == "topk_then_softmax" and self.scoring != "softmax":
            raise ValueError("topk_then_softmax always uses softmax scoring; leave scoring='softmax'")
        return self


class MoEConfig(Frozen):
    """The shape, routing and activation of one MoE layer (no tensors)."""

    num_experts: int = Field(ge=1)
    top_k: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    routing: RoutingConfig = RoutingConfig()
    activation: ActivationSpec = ActivationSpec()
    bias: bool = False
    apply_router_weight_on_input: bool = False
    quant: QuantConfig = QuantConfig()

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be <= num_experts={self.num_experts}")
        if self.apply_router_weight_on_input and self.top_k != 1:
            raise ValueError(f"apply_router_weight_on_input needs top_k=1, got top_k={self.top_k}")
        r = self.routing
        if r.method == "grouped_topk":
            assert r.num_expert_group is not None and r.topk_group is not None
            if self.num_experts % r.num_expert_group:
                raise ValueError(
                    f"num_expert_group={r.num_expert_group} must divide num_experts={self.num_experts}"
                )
            per_group = self.num_experts // r.num_expert_group
            if self.top_k > r.topk_group * per_group:
                raise ValueError(
                    f"top_k={self.top_k} exceeds the {r.topk_group * per_group} experts in the "
                    f"topk_group={r.topk_group} kept groups of {per_group}"
                )
        return self
