"""Routing on the GPU: one Triton launch per call (kernels in _kernels.py).

Outputs are allocated with ``torch.empty``; nothing reads a value back to the host, so a call can be
captured in a CUDA graph (after a first call has compiled the kernel). Under ``torch.compile`` each
call is one opaque custom op (``moe::triton_topk`` / ``moe::triton_grouped_topk``) with a fake
implementation, so the layer traces with ``fullgraph=True``.

The torch implementations in ``moe.routing.reference`` define the semantics (and are the CPU path); these
functions match them, ties to the lower expert index included. CPU tensors work only under the
Triton interpreter (``TRITON_INTERPRET=1``, the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..contract import Alignment
from ..kernels.align import ONE_PROGRAM_CHUNK, fits_one_program, one_program_bins, one_program_buffers
from ..kernels.host import cdiv, chains, interpreting, next_pow2, pdl_option
from ..kernels.launch import launch
from ..validation import check_finite_logits, check_float, check_ndim, check_same_device, check_top_k
from . import _kernels as _routing
from .reference import check_groups, routing_vjp

__all__ = ["FUSED_MAX_SCORES", "MAX_EXPERTS", "MAX_TOP_K", "RoutingTile", "aligns_in_one_launch", "default_tile",
           "fused_topk", "grouped_topk", "supports", "topk_and_align", "topk_into", "topk_softmax"]

MAX_EXPERTS = 4096  # the padded expert row of a token lives in registers
MAX_TOP_K = 32  # the k selection rounds are unrolled
# (token, padded expert) scores the routing kernel that aligns its own ids takes: one [BLOCK_T, E_PAD] tile,
# 16 values a thread over 8 warps, the work of one program of the routing kernel (which spreads larger batches)
FUSED_MAX_SCORES = 4096
SCORING = {"softmax": _routing.SOFTMAX, "sigmoid": _routing.SIGMOID}
_WARPS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class RoutingTile:
    """Rows per program (a power of two) and warps per program."""

    block_t: int
    num_warps: int

    def __post_init__(self) -> None:
        if self.block_t < 1 or self.block_t & (self.block_t - 1):
            raise ValueError(f"RoutingTile: block_t must be a power of two, got {self.block_t}")
        if self.num_warps not in _WARPS:
            raise ValueError(f"RoutingTile: num_warps must be one of {_WARPS}, got {self.num_warps}")


def default_tile(num_tokens: int, width: int, interpret: bool = False) -> RoutingTile:
    """About 1024 fp32 values a program on the GPU (a few rows per program at E = 256, one warp for a
    single row of up to 512 experts); under the interpreter up to 64 rows, since its cost is per
    operation rather than per element."""
    rows = next_pow2(max(1, num_tokens))
    if interpret:
        return RoutingTile(block_t=min(rows, 64), num_warps=1)
    block_t = min(rows, max(1, 1024 // width), 16)
    return RoutingTile(block_t=block_t, num_warps=min(8, max(1, block_t * width // 512)))


def supports(num_experts: int, top_k: int) -> tuple[bool, str]:
    """Whether the kernels handle this expert count and k (the torch path handles the rest)."""
    if num_experts > MAX_EXPERTS:
        return False, f"num_experts={num_experts} exceeds the routing kernels' limit of {MAX_EXPERTS}"
    if top_k > MAX_TOP_K:
        return False, f"top_k={top_k} exceeds the routing kernels' limit of {MAX_TOP_K}"
    return True, "ok"


def fused_topk(
    router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True, scoring: str = "softmax",
    routed_scaling_factor: float = 1.0, tile: RoutingTile | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (fp32) or sigmoid scores, top-k, optional renormalization, times the scaling factor:
    fp32 weights [T, k] and int32 ids [T, k] in one launch."""
    _check(router_logits, top_k)
    code = _scoring(scoring)
    if torch.compiler.is_compiling():
        return torch.ops.moe.triton_topk(router_logits, top_k, code, False, renormalize, routed_scaling_factor)
    out = _launch_topk(router_logits, top_k, code, False, renormalize, routed_scaling_factor, tile)
    return _with_grad(router_logits, *out, code, renormalize, routed_scaling_factor, False)


def topk_softmax(
    router_logits: torch.Tensor, top_k: int, *, routed_scaling_factor: float = 1.0, tile: RoutingTile | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k on the logits, softmax over the k selected, times the scaling factor, in one launch."""
    _check(router_logits, top_k)
    code = _routing.SOFTMAX
    if torch.compiler.is_compiling():
        return torch.ops.moe.triton_topk(router_logits, top_k, code, True, True, routed_scaling_factor)
    out = _launch_topk(router_logits, top_k, code, True, True, routed_scaling_factor, tile)
    return _with_grad(router_logits, *out, code, True, routed_scaling_factor, True)


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
    tile: RoutingTile | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2/V3 group-limited routing (semantics of ``moe.routing.grouped_topk``) in one launch."""
    _check(router_logits, top_k)
    num_experts = router_logits.shape[1]
    check_groups(num_experts, top_k, num_expert_group, topk_group, e_score_correction_bias)
    check_same_device("router_logits", router_logits, e_score_correction_bias=e_score_correction_bias)
    code = _scoring(scoring)
    if torch.compiler.is_compiling():
        return torch.ops.moe.triton_grouped_topk(router_logits, e_score_correction_bias, top_k, num_expert_group,
                                                 topk_group, code, renormalize, routed_scaling_factor)
    out = _launch_grouped(router_logits, e_score_correction_bias, top_k, num_expert_group, topk_group, code,
                          renormalize, routed_scaling_factor, tile)
    return _with_grad(router_logits, *out, code, renormalize, routed_scaling_factor, False)


def aligns_in_one_launch(num_tokens: int, num_experts: int, num_local: int, top_k: int) -> bool:
    """Whether :func:`topk_and_align` takes the batch: more than one token (a single token is not aligned),
    pairs and local experts within the one-program alignment's limits (``moe.kernels.align``), at most
    :data:`FUSED_MAX_SCORES` scores for its one program to route, and shapes the kernels support."""
    return (num_tokens > 1 and num_tokens * next_pow2(num_experts) <= FUSED_MAX_SCORES
            and fits_one_program(num_tokens * top_k, num_local) and supports(num_experts, top_k)[0])


def topk_into(
    router_logits: torch.Tensor, top_k: int, weights: torch.Tensor, ids: torch.Tensor, *, scoring: str = "softmax",
    topk_first: bool = False, renormalize: bool = True, routed_scaling_factor: float = 1.0,
) -> None:
    """:func:`fused_topk` (with ``topk_first``: :func:`topk_softmax`) written into ``weights`` [T, k] fp32
    and ``ids`` [T, k] int32 (contiguous: ``moe.routing.routing_outputs``); no gradient."""
    _check(router_logits, top_k)
    _launch_topk(router_logits, top_k, _scoring(scoring), topk_first, renormalize, routed_scaling_factor,
                 out=(weights, ids))


def topk_and_align(
    router_logits: torch.Tensor, top_k: int, weights: torch.Tensor, ids: torch.Tensor, *, num_local: int,
    block_m: int, expert_map: torch.Tensor | None = None, scoring: str = "softmax", topk_first: bool = False,
    renormalize: bool = True, routed_scaling_factor: float = 1.0,
) -> Alignment:
    """:func:`topk_into`, and the pairs grouped by local expert for row tile ``block_m`` (what
    ``moe.kernels.align.align(ids, num_local, block_m, expert_map)`` returns), in one launch of one
    program: the batches :func:`aligns_in_one_launch` takes. ``expert_map`` [E] maps the global ids."""
    _check(router_logits, top_k)
    num_tokens, num_experts = router_logits.shape
    if not aligns_in_one_launch(num_tokens, num_experts, num_local, top_k):
        raise ValueError(f"router_logits: {num_tokens} tokens of {num_experts} experts, top_k={top_k}, "
                         f"{num_local} local experts do not fit one program (aligns_in_one_launch); use "
                         "topk_into, then moe.kernels.align.align")
    if expert_map is not None and expert_map.shape != (num_experts,):
        raise ValueError(f"expert_map: expected shape ({num_experts},) (one entry per routed expert), got "
                         f"{tuple(expert_map.shape)}")
    al, cursor = one_program_buffers(num_tokens * top_k, num_local, block_m, router_logits.device)
    e_pad = next_pow2(num_experts)
    interp = interpreting()
    block_t = min(next_pow2(num_tokens), 64 if interp else max(1, FUSED_MAX_SCORES // e_pad))
    emap = expert_map.contiguous() if expert_map is not None else ids
    launch(
        _routing.topk_align_kernel, (1,), router_logits.device,
        router_logits, weights, ids, num_tokens, num_experts, router_logits.stride(0), router_logits.stride(1),
        float(routed_scaling_factor), emap, cursor, al.expert_ends, al.total, al.block_expert, al.sorted_ids,
        num_local, al.max_blocks, al.sorted_ids.numel(),
        TOP_K=top_k, K_PAD=next_pow2(top_k), E_PAD=e_pad, BLOCK_T=block_t, SCORING=_scoring(scoring),
        TOPK_FIRST=topk_first, RENORM=renormalize or topk_first, HAS_MAP=expert_map is not None,
        A_PAD=one_program_bins(num_local), BLOCK_M=block_m, CHUNK=ONE_PROGRAM_CHUNK, num_warps=1 if interp else 8,
        **_chained(router_logits.device),
    )
    return al


def _check(router_logits: torch.Tensor, top_k: int) -> None:
    check_float("router_logits", router_logits)
    check_ndim("router_logits", router_logits, 2, "[num_tokens, num_experts]")
    check_top_k(top_k, router_logits.shape[1])
    ok, reason = supports(router_logits.shape[1], top_k)
    if not ok:
        raise ValueError(f"{reason}; use the torch implementation in moe.routing (moe.set_options(gpu_routing=False))")
    check_finite_logits(router_logits)


def _scoring(scoring: str) -> int:
    if scoring not in SCORING:
        raise ValueError(f"scoring: expected 'softmax' or 'sigmoid', got {scoring!r}")
    return SCORING[scoring]


def _outputs(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens = logits.shape[0]
    return (torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device),
            torch.empty(num_tokens, top_k, dtype=torch.int32, device=logits.device))


def _chained(device: torch.device) -> dict[str, bool]:
    """The PDL constexpr and launch option: chained (``host.chains``) on Hopper and later."""
    pdl = chains(device)
    return {"PDL": pdl, **pdl_option(pdl)}


def _launch_topk(
    logits: torch.Tensor, top_k: int, scoring: int, topk_first: bool, renormalize: bool, scale: float,
    tile: RoutingTile | None = None, out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    weights, ids = out if out is not None else _outputs(logits, top_k)
    num_tokens, num_experts = logits.shape
    if num_tokens == 0:
        return weights, ids
    e_pad = next_pow2(num_experts)
    tile = tile or default_tile(num_tokens, e_pad, interpreting())
    launch(
        _routing.topk_kernel, (cdiv(num_tokens, tile.block_t),), logits.device,
        logits, weights, ids, num_tokens, num_experts, logits.stride(0), logits.stride(1), float(scale),
        TOP_K=top_k, K_PAD=next_pow2(top_k), E_PAD=e_pad, BLOCK_T=tile.block_t,
        SCORING=scoring, TOPK_FIRST=topk_first, RENORM=renormalize or topk_first, num_warps=tile.num_warps,
        **_chained(logits.device),
    )
    return weights, ids


def _launch_grouped(
    logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, num_groups: int, topk_group: int, scoring: int,
    renormalize: bool, scale: float, tile: RoutingTile | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    weights, ids = _outputs(logits, top_k)
    num_tokens, num_experts = logits.shape
    if num_tokens == 0:
        return weights, ids
    per_group = num_experts // num_groups
    g_pad, p_pad = next_pow2(num_groups), next_pow2(per_group)
    tile = tile or default_tile(num_tokens, g_pad * p_pad, interpreting())
    launch(
        _routing.grouped_topk_kernel, (cdiv(num_tokens, tile.block_t),), logits.device,
        logits, bias if bias is not None else logits, weights, ids, num_tokens, num_experts, num_groups, per_group,
        logits.stride(0), logits.stride(1), bias.stride(0) if bias is not None else 0, float(scale),
        TOP_K=top_k, K_PAD=next_pow2(top_k), TOPK_GROUP=topk_group, G_PAD=g_pad, P_PAD=p_pad,
        WIDTH=g_pad * p_pad, BLOCK_T=tile.block_t, SCORING=scoring, HAS_BIAS=bias is not None,
        RENORM=renormalize, num_warps=tile.num_warps, **_chained(logits.device),
    )
    return weights, ids


# -------------------------------------------------------------------------------------------- gradients
_SCORING_NAMES = {code: name for name, code in SCORING.items()}


class _RoutingGrad(torch.autograd.Function):
    """The kernels' weights, with the gradient of the torch semantics (``routing_vjp``): the router learns."""

    @staticmethod
    def forward(ctx, logits, weights, ids, scoring, renormalize, scale, topk_first):  # type: ignore[override]
        ctx.save_for_backward(logits, ids)
        ctx.opts = (_SCORING_NAMES[scoring], renormalize, scale, topk_first)
        ctx.mark_non_differentiable(ids)
        return weights.view_as(weights), ids

    @staticmethod
    def backward(ctx, grad_weights, _grad_ids):  # type: ignore[override]
        logits, ids = ctx.saved_tensors
        scoring, renormalize, scale, topk_first = ctx.opts
        grad = routing_vjp(logits, ids, grad_weights, scoring=scoring, renormalize=renormalize, scale=scale,
                           topk_first=topk_first)
        return grad, None, None, None, None, None, None


def _with_grad(logits: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, scoring: int, renormalize: bool,
               scale: float, topk_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return weights, ids
    return _RoutingGrad.apply(logits, weights, ids, scoring, renormalize, scale, topk_first)


# ------------------------------------------------------------------------------ torch.compile boundary
@torch.library.custom_op("moe::triton_topk", mutates_args=())
def _topk_op(
    logits: torch.Tensor, top_k: int, scoring: int, topk_first: bool, renormalize: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_topk(logits, top_k, scoring, topk_first, renormalize, scale)


@_topk_op.register_fake
def _(logits, top_k, scoring, topk_first, renormalize, scale):
    return _outputs(logits, top_k)


@torch.library.custom_op("moe::triton_grouped_topk", mutates_args=())
def _grouped_op(
    logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, num_groups: int, topk_group: int, scoring: int,
    renormalize: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_grouped(logits, bias, top_k, num_groups, topk_group, scoring, renormalize, scale)


@_grouped_op.register_fake
def _(logits, bias, top_k, num_groups, topk_group, scoring, renormalize, scale):
    return _outputs(logits, top_k)


def _topk_setup(ctx, inputs, output) -> None:
    logits, _top_k, scoring, topk_first, renormalize, scale = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.opts = (_SCORING_NAMES[scoring], renormalize or topk_first, scale, topk_first)


def _grouped_setup(ctx, inputs, output) -> None:
    logits, _bias, _top_k, _groups, _topk_group, scoring, renormalize, scale = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.opts = (_SCORING_NAMES[scoring], renormalize, scale, False)


def _logits_grad(ctx, grad_weights, _grad_ids) -> torch.Tensor:
    logits, ids = ctx.saved_tensors
    scoring, renormalize, scale, topk_first = ctx.opts
    return routing_vjp(logits, ids, grad_weights, scoring=scoring, renormalize=renormalize, scale=scale,
                       topk_first=topk_first)


_topk_op.register_autograd(lambda ctx, gw, gi: (_logits_grad(ctx, gw, gi), None, None, None, None, None),
                           setup_context=_topk_setup)
_grouped_op.register_autograd(
    lambda ctx, gw, gi: (_logits_grad(ctx, gw, gi), None, None, None, None, None, None, None),
    setup_context=_grouped_setup)
