"""Routing: router logits [T, E] -> (fp32 weights [T, k], int32 ids [T, k]).

Ties between equal scores always go to the lower expert index (a stable descending sort), in every
implementation, so ids can be compared exactly across backends. ``-inf`` logits mask experts: a masked
expert is picked only when fewer than k are unmasked, then with weight 0 (lowest indices first), and a
token whose logits are all ``-inf`` gets weights 0 and ids 0..k-1 (its routed output is 0).

Logits on a CUDA device are routed by one Triton kernel launch per call (``moe/routing/triton.py``,
kernels in ``_kernels.py``), on by default (option ``gpu_routing``, ``MOE_GPU_ROUTING=0`` switches them
off); CPU logits and everything else take the torch implementations (``moe/routing/reference.py``,
``*_ref``), which define the semantics. :func:`route_and_align` is the layer's path: the top-k methods
write into given outputs and, for small batches, group the pairs by expert in the same launch.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from types import ModuleType

import torch

from ..config import RoutingConfig
from ..contract import Alignment
from ..options import options, set_options
from .reference import check_logits, fused_topk_ref, grouped_topk_ref, stable_topk, topk_softmax_ref

__all__ = [
    "fused_topk",
    "fused_topk_ref",
    "gpu_routing_enabled",
    "grouped_topk",
    "grouped_topk_ref",
    "route",
    "route_and_align",
    "routes_into",
    "routing_outputs",
    "set_gpu_routing",
    "stable_topk",
    "topk_softmax",
    "topk_softmax_ref",
]

RoutingFunction = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]

_HAS_TRITON = importlib.util.find_spec("triton") is not None  # looked up, not imported


def set_gpu_routing(enabled: bool) -> None:
    """Route CUDA logits with the Triton kernels (the default) or with the torch implementations:
    ``moe.set_options(gpu_routing=...)``."""
    set_options(gpu_routing=bool(enabled))


def gpu_routing_enabled() -> bool:
    """Whether CUDA logits go to the Triton routing kernels (switched on, and triton installed). On by
    default: their GPU parity tests ran green on an H200 (2026-11-27)."""
    return options().gpu_routing and _HAS_TRITON


def _gpu_kernels(router_logits: torch.Tensor, top_k: int) -> ModuleType | None:
    """The Triton routing module when these logits go to it, else None (the torch path)."""
    if not isinstance(router_logits, torch.Tensor) or router_logits.device.type != "cuda":
        return None
    if not gpu_routing_enabled():
        return None
    from . import triton as kernels

    ok, why = kernels.supports(router_logits.shape[-1], top_k)
    if not ok and why not in _warned and not torch.compiler.is_compiling():  # no silent downgrade: say why, once
        _warned.add(why)
        warnings.warn(f"moe: GPU routing kernels skipped, using the torch path: {why}", stacklevel=3)
    return kernels if ok else None


_warned: set[str] = set()


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
    kernels = _gpu_kernels(router_logits, top_k)
    impl = kernels.grouped_topk if kernels is not None else grouped_topk_ref
    return impl(
        router_logits, top_k, num_expert_group=num_expert_group, topk_group=topk_group, renormalize=renormalize,
        scoring=scoring, e_score_correction_bias=e_score_correction_bias, routed_scaling_factor=routed_scaling_factor,
    )


def _fused_topk(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, scoring: str, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    kernels = _gpu_kernels(router_logits, top_k)
    if kernels is not None:
        return kernels.fused_topk(router_logits, top_k, renormalize=renormalize, scoring=scoring,
                                  routed_scaling_factor=scale)
    weights, ids = fused_topk_ref(router_logits, top_k, renormalize=renormalize, scoring=scoring)
    return (weights * scale if scale != 1.0 else weights), ids


def _topk_softmax(router_logits: torch.Tensor, top_k: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    kernels = _gpu_kernels(router_logits, top_k)
    if kernels is not None:
        return kernels.topk_softmax(router_logits, top_k, routed_scaling_factor=scale)
    weights, ids = topk_softmax_ref(router_logits, top_k)
    return (weights * scale if scale != 1.0 else weights), ids


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
    check_logits(router_logits, top_k)
    weights, ids = custom_routing_function(hidden_states, router_logits, top_k)
    return weights.float(), ids.to(torch.int32)


_INTO_METHODS = ("topk", "topk_then_softmax")  # the methods of the routing kernel that can also align


def routes_into(router_logits: torch.Tensor, top_k: int, config: RoutingConfig) -> bool:
    """Whether :func:`route_and_align` runs this call: logits that go to the routing kernels, a top-k
    method (``topk``, ``topk_then_softmax``), outside ``torch.compile`` (each routing call is one custom op
    there), and no gradient wanted for the logits."""
    if config.method not in _INTO_METHODS or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and router_logits.requires_grad:
        return False
    return _gpu_kernels(router_logits, top_k) is not None


def route_and_align(
    router_logits: torch.Tensor, top_k: int, config: RoutingConfig, weights: torch.Tensor, ids: torch.Tensor, *,
    num_local: int, block_m: int | None = None, expert_map: torch.Tensor | None = None,
) -> Alignment | None:
    """Route ``router_logits`` [T, E] as :func:`route` does into ``weights`` (fp32) and ``ids`` (int32),
    both contiguous [T, k]. With ``block_m``, a batch that fits one program
    (``moe.routing.triton.aligns_in_one_launch``) also has its pairs grouped by local expert for that row
    tile in the same launch (``expert_map`` [E] maps global ids to ``num_local`` local experts), unless the
    ``route_align`` option (``MOE_ROUTE_ALIGN=0``) is off; that alignment is returned, else None. Only for
    calls :func:`routes_into` accepts."""
    from . import triton as kernels

    opts = {"scoring": "softmax" if config.method == "topk_then_softmax" else config.scoring,
            "topk_first": config.method == "topk_then_softmax", "renormalize": config.renormalize,
            "routed_scaling_factor": config.routed_scaling_factor}
    num_tokens, num_experts = router_logits.shape
    if block_m is not None and options().route_align and \
            kernels.aligns_in_one_launch(num_tokens, num_experts, num_local, top_k):
        return kernels.topk_and_align(router_logits, top_k, weights, ids, num_local=num_local, block_m=block_m,
                                      expert_map=expert_map, **opts)
    kernels.topk_into(router_logits, top_k, weights, ids, **opts)
    return None


def routing_outputs(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unwritten fp32 weights and int32 ids [T, k] on the logits' device, for :func:`route_and_align`."""
    return (torch.empty(router_logits.shape[0], top_k, dtype=torch.float32, device=router_logits.device),
            torch.empty(router_logits.shape[0], top_k, dtype=torch.int32, device=router_logits.device))
