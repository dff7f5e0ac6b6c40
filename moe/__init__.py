"""moe: a multi-backend Mixture-of-Experts inference layer for PyTorch."""

from . import functional as _functional  # noqa: F401  (registers the moe::fused_experts custom op)
from .activations import apply_activation, interleaved_to_gate_up
from .backends.base import ExpertsArgs, ExpertsProblem
from .config import ActivationSpec, MoEConfig, QuantConfig, QuantScheme, RoutingConfig
from .explain import explain
from .functional import fused_experts
from .layer import FusedMoE, GatedMLP
from .registry import (
    BackendUnavailableError,
    Decision,
    get_backend,
    last_decision,
    list_backends,
    register_backend,
    select_backend,
    unregister_backend,
)
from .routing import fused_topk, grouped_topk, route, stable_topk, topk_softmax
from .validation import set_validation, validation

__version__ = "0.1.0"

__all__ = [
    "ActivationSpec",
    "BackendUnavailableError",
    "Decision",
    "ExpertsArgs",
    "ExpertsProblem",
    "FusedMoE",
    "GatedMLP",
    "MoEConfig",
    "QuantConfig",
    "QuantScheme",
    "RoutingConfig",
    "apply_activation",
    "explain",
    "fused_experts",
    "fused_topk",
    "get_backend",
    "grouped_topk",
    "interleaved_to_gate_up",
    "last_decision",
    "list_backends",
    "register_backend",
    "route",
    "select_backend",
    "set_validation",
    "stable_topk",
    "topk_softmax",
    "unregister_backend",
    "validation",
]
