"""moe: a multi-backend Mixture-of-Experts inference layer for PyTorch."""

from . import functional as _functional  # noqa: F401  (registers the moe::fused_experts custom op)
from . import quant, testing
from .activations import apply_activation, interleaved_to_gate_up
from .config import ActivationSpec, MoEConfig, RoutingConfig
from .contract import Backend, ExpertsArgs, ExpertsProblem, PreparedWeights
from .explain import explain
from .functional import PreparedCache, fused_experts
from .layer import FusedMoE, GatedMLP
from .options import Options, options, override_options, reset_caches, set_options
from .quant import QuantConfig, QuantizedWeight
from .registry import (
    BackendUnavailableError,
    Decision,
    broken_plugins,
    get_backend,
    last_decision,
    list_backends,
    register_backend,
    select_backend,
    unregister_backend,
)
from .routing import fused_topk, grouped_topk, route, stable_topk, topk_softmax
from .target import TARGETS, DeviceTarget, current_target
from .validation import set_validation, validation

__version__ = "0.1.0"

__all__ = [
    "TARGETS",
    "ActivationSpec",
    "Backend",
    "BackendUnavailableError",
    "Decision",
    "DeviceTarget",
    "ExpertsArgs",
    "ExpertsProblem",
    "FusedMoE",
    "GatedMLP",
    "MoEConfig",
    "Options",
    "PreparedCache",
    "PreparedWeights",
    "QuantConfig",
    "QuantizedWeight",
    "RoutingConfig",
    "apply_activation",
    "broken_plugins",
    "current_target",
    "explain",
    "fused_experts",
    "fused_topk",
    "get_backend",
    "grouped_topk",
    "interleaved_to_gate_up",
    "last_decision",
    "list_backends",
    "options",
    "override_options",
    "quant",
    "register_backend",
    "reset_caches",
    "route",
    "select_backend",
    "set_options",
    "set_validation",
    "stable_topk",
    "testing",
    "topk_softmax",
    "unregister_backend",
    "validation",
]
