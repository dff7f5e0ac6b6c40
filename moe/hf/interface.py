"""moe as a transformers experts implementation: ``from_pretrained(..., experts_implementation="moe")``
or ``model.set_experts_implementation("moe")``.

transformers then keeps its own blocks and routing and calls us for the experts alone, on the weights
it holds. We run experts stored in the standard layout ([E, 2N, K] gate-then-up, [E, K, N]) in place;
a transposed or interleaved layout (gpt-oss) would need a converted copy of every weight, so it is
refused with a pointer to :func:`moe.hf.replace_moe_blocks`, which converts once.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..config import ActivationSpec
from ..functional import fused_experts
from ..registry import get_backend
from .families import activation_from_hf, standard_weights
from .replace import generic_experts_reason

__all__ = ["register_experts_implementation"]


@functools.lru_cache(maxsize=16)
def _activation(hidden_act: str, where: str) -> ActivationSpec:
    return activation_from_hf(hidden_act, where)


def _in_place_reason(experts: nn.Module) -> str | None:
    if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True):
        return (f"{type(experts).__name__} stores its weights transposed or with gate/up interleaved; running "
                "them here would convert every weight on every call. Use moe.hf.replace_moe_blocks(model), "
                "which converts them once")
    return generic_experts_reason(experts)


def moe_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """The experts of a transformers experts module on moe's backends (the ``ExpertsInterface`` call)."""
    reason = _in_place_reason(self)
    if reason is not None:
        raise ValueError(f"experts_implementation with moe: {reason}")
    w = standard_weights(self)  # the module's own tensors, no copy
    return fused_experts(
        hidden_states, w.w13, w.w2, top_k_weights.float(), top_k_index,
        activation=_activation(self.config.hidden_act, type(self).__name__),
        w13_bias=w.w13_bias, w2_bias=w.w2_bias, backend=backend,
    )


def register_experts_implementation(name: str = "moe", backend: str = "auto") -> str:
    """Register moe under ``name`` in transformers' ``ExpertsInterface`` (running ``backend``) and return
    the name. ``import moe.hf`` registers ``"moe"`` with ``backend="auto"``."""
    from transformers.integrations.moe import ExpertsInterface

    if backend != "auto":
        get_backend(backend)  # an unknown backend fails here, not inside a forward
    ExpertsInterface.register(name, functools.partial(moe_experts_forward, backend=backend))
    return name
