"""The torch implementations of the routing functions: they define the semantics (ties to the lower
expert index; a token whose logits are all -inf gets weights 0 and ids 0..k-1) and route CPU logits.
The GPU routing kernels (``moe.routing.triton``) match them."""

from __future__ import annotations

import torch

from ..validation import check_finite_logits, check_float, check_ndim, check_top_k

__all__ = ["check_groups", "check_logits", "fused_topk_ref", "grouped_topk_ref", "routing_vjp", "stable_topk",
           "topk_softmax_ref"]


def stable_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim; equal values keep ascending index order."""
    values, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], idx[..., :k]


def check_logits(router_logits: torch.Tensor, top_k: int) -> None:
    check_float("router_logits", router_logits)
    check_ndim("router_logits", router_logits, 2, "[num_tokens, num_experts]")
    check_top_k(top_k, router_logits.shape[-1])
    check_finite_logits(router_logits)


def _softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax along the last dim; a row of -inf only (a fully masked token) scores 0 everywhere, with a
    zero gradient (not the NaN a softmax of -inf would give)."""
    dead = torch.isneginf(x).all(dim=-1, keepdim=True)
    return torch.softmax(x.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)


def _scores(router_logits: torch.Tensor, scoring: str) -> torch.Tensor:
    logits = router_logits.float()
    if scoring == "softmax":
        return _softmax(logits)
    if scoring == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"scoring: expected 'softmax' or 'sigmoid', got {scoring!r}")


def _normalize(weights: torch.Tensor) -> torch.Tensor:
    """Divide each row by its sum; a row summing to exactly 0 (masked) stays 0, NaN stays NaN."""
    total = weights.sum(dim=-1, keepdim=True)
    return weights / torch.where(total == 0, torch.ones_like(total), total)


def _finish(weights: torch.Tensor, ids: torch.Tensor, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if renormalize:
        weights = _normalize(weights)
    return weights.float(), ids.to(torch.int32)


def fused_topk_ref(
    router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True, scoring: str = "softmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch implementation of :func:`fused_topk`."""
    check_logits(router_logits, top_k)
    weights, ids = stable_topk(_scores(router_logits, scoring), top_k)  # [T, k]
    return _finish(weights, ids, renormalize)


def topk_softmax_ref(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch implementation of :func:`topk_softmax`."""
    check_logits(router_logits, top_k)
    values, ids = stable_topk(router_logits.float(), top_k)  # [T, k]
    return _softmax(values), ids.to(torch.int32)


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
    check_logits(router_logits, top_k)
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
    dead = torch.isneginf(router_logits).all(dim=-1, keepdim=True)  # fully masked: ids 0..k-1, whatever the bias
    ids = torch.where(dead, torch.arange(top_k, device=ids.device), ids)
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


def routing_vjp(logits: torch.Tensor, ids: torch.Tensor, grad_weights: torch.Tensor, *, scoring: str = "softmax",
                renormalize: bool = True, scale: float = 1.0, topk_first: bool = False) -> torch.Tensor:
    """The gradient of the routing weights with respect to the logits, the ids held fixed (how any top-k
    routing differentiates): for ``weights = scale * norm(score(logits)[ids])`` (``fused_topk``,
    ``grouped_topk``: the bias only selects) or, with ``topk_first``, ``scale * softmax(logits[ids])``
    (``topk_softmax``). Static shapes only (gather / scatter), so it also traces under torch.compile."""
    x = logits.float()  # [T, E]
    g = grad_weights.float() * scale  # [T, k]
    idx = ids.long()
    if topk_first:
        w = _softmax(x.gather(1, idx))  # [T, k]
        gv = w * (g - (g * w).sum(dim=-1, keepdim=True))
        return torch.zeros_like(x).scatter_add_(1, idx, gv).to(logits.dtype)
    s = _scores(logits, scoring)  # [T, E]
    v = s.gather(1, idx)  # [T, k]
    if renormalize:
        total = v.sum(dim=-1, keepdim=True)
        total = torch.where(total == 0, torch.ones_like(total), total)
        gv = (g - (g * v / total).sum(dim=-1, keepdim=True)) / total
    else:
        gv = g
    gs = torch.zeros_like(s).scatter_add_(1, idx, gv)  # [T, E]
    gx = s * (gs - (gs * s).sum(dim=-1, keepdim=True)) if scoring == "softmax" else gs * s * (1 - s)
    return gx.to(logits.dtype)
