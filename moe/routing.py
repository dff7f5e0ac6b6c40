"""Routing: router logits [T, E] -> (fp32 weights [T, k], int32 ids [T, k]).

Ties between equal scores always go to the lower expert index (a stable descending sort), in every
implementation, so ids can be compared exactly across backends.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .config import RoutingConfig
from .validation import check_finite_logits, check_float, check_ndim, check_top_k

__all__ = ["fused_topk", "grouped_topk", "route", "stable_topk", "topk_softmax"]

RoutingFunction = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


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
    _check_logits(router_logits, top_k)
    weights, ids = stable_topk(_scores(router_logits, scoring), top_k)  # [T, k]
    return _finish(weights, ids, renormalize)


def topk_softmax(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k on the logits, then softmax over the k selected (gpt-oss, GraniteMoE)."""
    _check_logits(router_logits, top_k)
    values, ids = stable_topk(router_logits.float(), top_k)  # [T, k]
    return torch.softmax(values, dim=-1), ids.to(torch.int32)


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
    _check_logits(router_logits, top_k)
    num_tokens, num_experts = router_logits.shape
    _check_groups(num_experts, top_k, num_expert_group, topk_group)
    scores = _scores(router_logits, scoring)  # [T, E]
    choice = scores
    if e_score_correction_bias is not None:
        check_ndim("e_score_correction_bias", e_score_correction_bias, 1, "[num_experts]")
        if e_score_correction_bias.shape[0] != num_experts:
            raise ValueError(
                f"e_score_correction_bias: expected {num_experts} values, got {e_score_correction_bias.shape[0]}"
            )
        choice = scores + e_score_correction_bias.float()
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


def _check_groups(num_experts: int, top_k: int, num_expert_group: int, topk_group: int) -> None:
    if num_expert_group < 1 or num_experts % num_expert_group:
        raise ValueError(f"num_expert_group={num_expert_group} must divide num_experts={num_experts}")
    if not 1 <= topk_group <= num_expert_group:
        raise ValueError(f"topk_group={topk_group} must be between 1 and num_expert_group={num_expert_group}")
    if top_k > topk_group * (num_experts // num_expert_group):
        raise ValueError(
            f"top_k={top_k} exceeds the {topk_group * (num_experts // num_expert_group)} experts "
            f"in the kept groups (topk_group={topk_group})"
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
        weights, ids = fused_topk(router_logits, top_k, renormalize=config.renormalize, scoring=config.scoring)
        return weights * config.routed_scaling_factor, ids
    if config.method == "topk_then_softmax":
        weights, ids = topk_softmax(router_logits, top_k)
        return weights * config.routed_scaling_factor, ids
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
