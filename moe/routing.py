"""Routing: router logits [T, E] -> (fp32 weights [T, k], int32 ids [T, k]).

Ties between equal scores always go to the lower expert index (a stable descending sort), in every
implementation, so ids can be compared exactly across backends.

Logits on a CUDA device are routed by one Triton kernel launch per call
(``moe/backends/triton/routing.py``), on by default (``set_gpu_routing(False)`` or ``MOE_GPU_ROUTING=0``
switch them off); CPU logits and everything else take the torch implementations (``*_ref``), which
define the semantics.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable
from types import ModuleType

import torch

from .config import RoutingConfig
from .validation import check_finite_logits, check_float, check_ndim, check_top_k

__all__ = [
    "fused_topk",
    "fused_topk_ref",
    "gpu_routing_enabled",
    "grouped_topk",
    "grouped_topk_ref",
    "route",
    "set_gpu_routing",
    "stable_topk",
    "topk_softmax",
    "topk_softmax_ref",
]

RoutingFunction = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]

_gpu = {
    # On by default (their GPU parity tests ran green on an H200, 2026-11-27); MOE_GPU_ROUTING=0 switches off.
    "enabled": os.environ.get("MOE_GPU_ROUTING", "1") not in ("0", "false", "False"),
    "triton": importlib.util.find_spec("triton") is not None,  # looked up, not imported
}


def set_gpu_routing(enabled: bool) -> None:
    """Route CUDA logits with the Triton kernels (the default) or with the torch implementations."""
    _gpu["enabled"] = bool(enabled)


def gpu_routing_enabled() -> bool:
    """Whether CUDA logits go to the Triton routing kernels (switched on, and triton installed)."""
    return _gpu["enabled"] and _gpu["triton"]


def _kernels(router_logits: torch.Tensor, top_k: int) -> ModuleType | None:
    """The Triton routing module when these logits go to it, else None (the torch path)."""
    if not isinstance(router_logits, torch.Tensor) or router_logits.device.type != "cuda":
        return None
    if not gpu_routing_enabled():
        return None
    from .backends.triton import routing as kernels

    ok, why = kernels.supports(router_logits.shape[-1], top_k)
    if not ok and why not in _warned and not torch.compiler.is_compiling():  # no silent downgrade: say why, once
        _warned.add(why)
        warnings.warn(f"moe: GPU routing kernels skipped, using the torch path: {why}", stacklevel=3)
    return kernels if ok else None


_warned: set[str] = set()


def stable_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim; equal values keep ascending index order."""
    values, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], idx[..., :k]


def _check_logits(router_logits: torch.Tensor, top_k: int) -> None:
    check_float("router_logits", router_logits)
    check_ndim("router_logits", router_logits, 2, "[num_tokens, num_experts]")
    check_top_k(top_k, router_logits.shape[-1])
    check_finite_logits(router_logits)


def _scores(router_logits: torch.Tensor, scoring: str) -> torch.Tensor:
    logits = router_logits.float()
    if scoring == "softmax":
        return torch.softmax(logits, dim=-1)
    if scoring == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"scoring: expected 'softmax' or 'sigmoid', got {scoring!r}")


def _finish(weights: torch.Tensor, ids: torch.Tensor, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.float(), ids.to(torch.int32)


def fused_topk(
    router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True, scoring: str = "softmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (fp32) or sigmoid scores, top-k, optional renormalization (Mixtral, Qwen-MoE, OLMoE)."""
    return _fused_topk(router_logits, top_k, renormalize, scoring, 1.0)


def topk_softmax(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k on the logits, then softmax over the k selected (gpt-oss, GraniteMoE)."""
    return _topk_softmax(router_logits, top_k, 1.0)


def grouped_topk(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    num_expert_group: int,
    topk_group: int,
    renormalize: bool = True,
    scoring: str = "softmax",
    e_score_correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2/V3 group-limited routing.

    The correction bias is added for selection only; groups are scored by the sum of their top-2
    biased scores when a bias is given, by their max otherwise; the best ``topk_group`` groups are
    kept and top-k is taken within them; the weights are the unbiased scores, optionally
    renormalized, times ``routed_scaling_factor``.
    """
    kernels = _kernels(router_logits, top_k)
    impl = kernels.grouped_topk if kernels is not None else grouped_topk_ref
    return impl(
        router_logits, top_k, num_expert_group=num_expert_group, topk_group=topk_group, renormalize=renormalize,
        scoring=scoring, e_score_correction_bias=e_score_correction_bias, routed_scaling_factor=routed_scaling_factor,
    )


def _fused_topk(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, scoring: str, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    kernels = _kernels(router_logits, top_k)
    if kernels is not None:
        return kernels.fused_topk(router_logits, top_k, renormalize=renormalize, scoring=scoring,
                                  routed_scaling_factor=scale)
    weights, ids = fused_topk_ref(router_logits, top_k, renormalize=renormalize, scoring=scoring)
    return (weights * scale if scale != 1.0 else weights), ids


def _topk_softmax(router_logits: torch.Tensor, top_k: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    kernels = _kernels(router_logits, top_k)
    if kernels is not None:
        return kernels.topk_softmax(router_logits, top_k, routed_scaling_factor=scale)
    weights, ids = topk_softmax_ref(router_logits, top_k)
    return (weights * scale if scale != 1.0 else weights), ids


# ---------------------------------------------------------------- the torch implementations (reference)
def fused_topk_ref(
    router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True, scoring: str = "softmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch implementation of :func:`fused_topk`."""
    _check_logits(router_logits, top_k)
    weights, ids = stable_topk(_scores(router_logits, scoring), top_k)  # [T, k]
    return _finish(weights, ids, renormalize)


def topk_softmax_ref(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch implementation of :func:`topk_softmax`."""
    _check_logits(router_logits, top_k)
    values, ids = stable_topk(router_logits.float(), top_k)  # [T, k]
    return torch.softmax(values, dim=-1), ids.to(torch.int32)


def grouped_topk_ref(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    num_expert_group: int,
    topk_group: int,
    renormalize: bool = True,
    scoring: str = "softmax",
    e_score_correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch implementation of :func:`grouped_topk`."""
    _check_logits(router_logits, top_k)
    num_tokens, num_experts = router_logits.shape
    check_groups(num_experts, top_k, num_expert_group, topk_group, e_score_correction_bias)
    scores = _scores(router_logits, scoring)  # [T, E]
    choice = scores if e_score_correction_bias is None else scores + e_score_correction_bias.float()
    grouped = choice.view(num_tokens, num_expert_group, num_experts // num_expert_group)  # [T, G, E/G]
    if e_score_correction_bias is not None:
        group_scores = stable_topk(grouped, 2)[0].sum(dim=-1)  # [T, G]
    else:
        group_scores = grouped.max(dim=-1).values
    _, kept = stable_topk(group_scores, topk_group)  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
    expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, num_experts)
    masked = choice.masked_fill(~expert_mask, float("-inf"))
    _, ids = stable_topk(masked, top_k)  # [T, k]
    weights, ids = _finish(scores.gather(1, ids), ids, renormalize)
    return weights * routed_scaling_factor, ids


def check_groups(
    num_experts: int, top_k: int, num_expert_group: int, topk_group: int, bias: torch.Tensor | None = None
) -> None:
    """The grouped-routing arguments (shared with the Triton launch)."""
    if num_expert_group < 1 or num_experts % num_expert_group:
        raise ValueError(f"num_expert_group={num_expert_group} must divide num_experts={num_experts}")
    if not 1 <= topk_group <= num_expert_group:
        raise ValueError(f"topk_group={topk_group} must be between 1 and num_expert_group={num_expert_group}")
    if top_k > topk_group * (num_experts // num_expert_group):
        raise ValueError(
            f"top_k={top_k} exceeds the {topk_group * (num_experts // num_expert_group)} experts "
            f"in the kept groups (topk_group={topk_group})"
        )
    if bias is None:
        return
    check_ndim("e_score_correction_bias", bias, 1, "[num_experts]")
    if bias.shape[0] != num_experts:
        raise ValueError(f"e_score_correction_bias: expected {num_experts} values, got {bias.shape[0]}")
    if num_experts // num_expert_group < 2:
        raise ValueError(
            f"e_score_correction_bias scores each group by its best two experts, but num_experts={num_experts} "
            f"in num_expert_group={num_expert_group} groups leaves {num_experts // num_expert_group} per group"
        )


def route(
    router_logits: torch.Tensor,
    top_k: int,
    config: RoutingConfig,
    *,
    hidden_states: torch.Tensor | None = None,
    e_score_correction_bias: torch.Tensor | None = None,
    custom_routing_function: RoutingFunction | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to the routing method a :class:`RoutingConfig` names."""
    if config.method == "topk":
        return _fused_topk(router_logits, top_k, config.renormalize, config.scoring, config.routed_scaling_factor)
    if config.method == "topk_then_softmax":
        return _topk_softmax(router_logits, top_k, config.routed_scaling_factor)
    if config.method == "grouped_topk":
        assert config.num_expert_group is not None and config.topk_group is not None  # validated config
        return grouped_topk(
            router_logits,
            top_k,
            num_expert_group=config.num_expert_group,
            topk_group=config.topk_group,
            renormalize=config.renormalize,
            scoring=config.scoring,
            e_score_correction_bias=e_score_correction_bias,
            routed_scaling_factor=config.routed_scaling_factor,
        )
    if custom_routing_function is None:
        raise ValueError("routing method 'custom' needs custom_routing_function=(hidden, logits, top_k) -> (w, ids)")
    _check_logits(router_logits, top_k)
    weights, ids = custom_routing_function(hidden_states, router_logits, top_k)
    return weights.float(), ids.to(torch.int32)
