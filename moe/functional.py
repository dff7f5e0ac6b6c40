"""The functional API: ``fused_experts``.

Validates the call (metadata always; values on CPU or in validation mode), describes it as a
tensor-free :class:`ExpertsProblem`, asks the registry for a backend, and runs it. Under
``torch.compile`` the backend call goes through the ``moe::fused_experts`` custom op, so the whole
layer compiles with ``fullgraph=True``.
"""

from __future__ import annotations

import functools

import torch

from .backends.base import ExpertsArgs, ExpertsProblem
from .config import (
    DEFAULT_ALPHA,
    DEFAULT_LIMIT,
    GATED_ACTIVATIONS,
    NON_GATED_ACTIVATIONS,
    ActivationSpec,
    QuantConfig,
    QuantScheme,
)
from .registry import get_backend, select_backend
from .validation import (
    check_float,
    check_ids_range,
    check_ndim,
    check_same_device,
    check_shape,
    check_top_k,
)

__all__ = ["fused_experts"]

_INT_IDS = (torch.int32, torch.int64)
_NO_QUANT = QuantConfig()


def _compiled_call(x, w13, w2, topk_weights, topk_ids, activation, w13_bias, w2_bias, on_input, expert_map,
                   quant, backend, out):
    """Under torch.compile: the whole call is the opaque ``moe::fused_experts`` op, which validates and
    selects a backend when it runs. Only plain values cross the op boundary (no pydantic objects)."""
    if isinstance(activation, str):
        name, alpha, limit = activation, DEFAULT_ALPHA, DEFAULT_LIMIT
    else:
        name, alpha, limit = activation.name, activation.alpha, activation.limit
    wk, ak = ("none", "none") if quant is None else (quant.weights.kind, quant.activations.kind)
    if out is None:
        out = torch.empty_like(x)
    torch.ops.moe.fused_experts(out, x, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, expert_map,
                                name, alpha, limit, wk, ak, on_input, backend)
    return out


def fused_experts(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str | ActivationSpec = "silu",
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    apply_router_weight_on_input: bool = False,
    expert_map: torch.Tensor | None = None,
    quant: QuantConfig | None = None,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compute the routed experts of a batch and combine them.

    Shapes: ``hidden_states`` [T, K]; ``w13`` [E, 2N, K] (gate rows then up rows; [E, N, K] for
    non-gated activations); ``w2`` [E, K, N]; ``topk_weights`` [T, k] float and ``topk_ids`` [T, k]
    int32/int64 with global expert ids. With ``expert_map`` ([E_global] int, local id or -1) the
    weights hold only the local experts and pairs routed elsewhere contribute zero.

    Returns [T, K] in the dtype of ``hidden_states``: each expert output times its fp32 routing
    weight, summed over k in fp32. ``out`` (which may be ``hidden_states`` itself) receives it.
    """
    if torch.compiler.is_compiling():
        return _compiled_call(hidden_states, w13, w2, topk_weights, topk_ids, activation, w13_bias, w2_bias,
                              apply_router_weight_on_input, expert_map, quant, backend, out)
    args = ExpertsArgs(hidden_states, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, expert_map)
    problem = _problem(args, activation, apply_router_weight_on_input, quant)
    check_ids_range(topk_ids, problem.num_global_experts)  # a value check: every call, when enabled
    if out is None:
        out = torch.empty_like(hidden_states)
    else:
        _check_out(out, hidden_states)
    decision = select_backend(problem, backend)  # also for T = 0: a named backend must be able to run
    if problem.num_tokens > 0:
        get_backend(decision.chosen).apply(args, problem, out)
    return out


_problems: dict[tuple, ExpertsProblem] = {}


def _meta(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (t.shape, t.dtype, t.device)


def _problem(args: ExpertsArgs, activation: str | ActivationSpec, on_input: bool,
             quant: QuantConfig | None) -> ExpertsProblem:
    """The validated description of a call, remembered per (shapes, dtypes, devices, options): the
    metadata checks depend on nothing else, and they cost more host time than a small batch's kernels."""
    try:
        key = (activation, on_input, quant, _meta(args.hidden_states), _meta(args.w13), _meta(args.w2),
               _meta(args.topk_weights), _meta(args.topk_ids), _meta(args.w13_bias), _meta(args.w2_bias),
               _meta(args.expert_map))
        problem = _problems.get(key)
    except (AttributeError, TypeError):  # not tensors, or unhashable options: the checks below say what is wrong
        key, problem = None, None
    if problem is None:
        problem = _describe(args, ActivationSpec.parse(activation), on_input, quant if quant is not None else _NO_QUANT)
        if key is not None:
            if len(_problems) > 4096:
                _problems.clear()
            _problems[key] = problem
    return problem


def _describe(
    args: ExpertsArgs, spec: ActivationSpec, on_input: bool, quant: QuantConfig
) -> ExpertsProblem:
    """Check the metadata of a call (shapes, dtypes, devices) and describe it."""
    x, w13, w2 = args.hidden_states, args.w13, args.w2
    check_float("hidden_states", x)
    check_ndim("hidden_states", x, 2, "[num_tokens, hidden_size]")
    check_ndim("w13", w13, 3, "[num_experts, 2 * intermediate_size, hidden_size]")
    check_ndim("w2", w2, 3, "[num_experts, hidden_size, intermediate_size]")
    num_tokens, hidden = x.shape
    num_experts, rows, k_w13 = w13.shape
    if k_w13 != hidden:
        raise ValueError(
            f"w13: its last dim (hidden_size) is {k_w13} but hidden_states has hidden_size {hidden}; "
            "w13 must be [num_experts, 2 * intermediate_size, hidden_size]"
        )
    if w2.shape[0] != num_experts:
        raise ValueError(f"w2 has {w2.shape[0]} experts but w13 has {num_experts}; they must match")
    n = w2.shape[2]
    want_rows = 2 * n if spec.gated else n
    if rows != want_rows:
        kind = "gated" if spec.gated else "non-gated"
        raise ValueError(
            f"w13: has {rows} rows per expert but the {kind} activation {spec.name!r} with "
            f"intermediate_size={n} (from w2) needs {want_rows}"
        )
    check_shape("w2", w2, (num_experts, hidden, n), "[num_experts, hidden_size, intermediate_size]")
    if not quant.is_quantized:
        for name, w in (("w13", w13), ("w2", w2)):
            if w.dtype != x.dtype:
                raise TypeError(f"{name}: dtype {w.dtype} differs from hidden_states' {x.dtype}; unquantized "
                                "weights must have the activations' dtype")
    top_k, num_global = _check_routing(args, num_tokens, num_experts)
    if on_input and top_k != 1:
        raise ValueError(f"apply_router_weight_on_input needs top_k=1, got top_k={top_k}")
    _check_biases(args, num_experts, want_rows, hidden, x.dtype)
    check_same_device(
        "hidden_states", x, w13=w13, w2=w2, topk_weights=args.topk_weights, topk_ids=args.topk_ids,
        w13_bias=args.w13_bias, w2_bias=args.w2_bias, expert_map=args.expert_map,
    )
    return ExpertsProblem(
        device_type=x.device.type, dtype=x.dtype, num_tokens=num_tokens, num_experts=num_experts,
        num_global_experts=num_global, hidden_size=hidden, intermediate_size=n, top_k=top_k,
        activation=spec, has_w13_bias=args.w13_bias is not None, has_w2_bias=args.w2_bias is not None,
        has_expert_map=args.expert_map is not None, apply_router_weight_on_input=on_input, quant=quant,
    )


def _check_routing(args: ExpertsArgs, num_tokens: int, num_experts: int) -> tuple[int, int]:
    ids, weights = args.topk_ids, args.topk_weights
    check_ndim("topk_ids", ids, 2, "[num_tokens, top_k]")
    if ids.dtype not in _INT_IDS:
        raise TypeError(f"topk_ids: dtype {ids.dtype} is not allowed; use torch.int32 or torch.int64")
    check_float("topk_weights", weights)
    if weights.shape != ids.shape:
        raise ValueError(
            f"topk_weights has shape {tuple(weights.shape)} but topk_ids has {tuple(ids.shape)}; both are [T, k]"
        )
    if ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids has {ids.shape[0]} rows but hidden_states has {num_tokens} tokens")
    num_global = num_experts
    if args.expert_map is not None:
        check_ndim("expert_map", args.expert_map, 1, "[num_global_experts]")
        if args.expert_map.dtype not in _INT_IDS:
            raise TypeError(f"expert_map: dtype {args.expert_map.dtype} is not allowed; use torch.int32 or int64")
        num_global = args.expert_map.shape[0]
    check_top_k(ids.shape[1], num_global)
    return ids.shape[1], num_global


def _check_biases(args: ExpertsArgs, num_experts: int, rows: int, hidden: int, dtype: torch.dtype) -> None:
    for name, b, shape in (("w13_bias", args.w13_bias, (num_experts, rows)),
                           ("w2_bias", args.w2_bias, (num_experts, hidden))):
        if b is None:
            continue
        check_shape(name, b, shape, "[num_experts, out_features]")
        if b.dtype != dtype:
            raise TypeError(f"{name}: dtype {b.dtype} differs from hidden_states' {dtype}")


def _check_out(out: torch.Tensor, x: torch.Tensor) -> None:
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out: expected a {tuple(x.shape)} {x.dtype} tensor on {x.device} (like hidden_states), "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )


@torch.library.custom_op("moe::fused_experts", mutates_args=("out",))
def _fused_experts_op(
    out: torch.Tensor,
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_bias: torch.Tensor | None,
    w2_bias: torch.Tensor | None,
    expert_map: torch.Tensor | None,
    activation: str,
    alpha: float,
    limit: float,
    weights_scheme: str,
    activations_scheme: str,
    apply_router_weight_on_input: bool,
    backend: str,
) -> None:
    spec, quant = _specs(activation, alpha, limit, weights_scheme, activations_scheme)
    fused_experts(
        hidden_states, w13, w2, topk_weights, topk_ids, activation=spec, w13_bias=w13_bias, w2_bias=w2_bias,
        apply_router_weight_on_input=apply_router_weight_on_input, expert_map=expert_map, quant=quant,
        backend=backend, out=out,
    )


@functools.lru_cache(maxsize=64)
def _specs(activation: str, alpha: float, limit: float, wk: str, ak: str) -> tuple[ActivationSpec, QuantConfig]:
    if activation not in GATED_ACTIVATIONS + NON_GATED_ACTIVATIONS:
        ActivationSpec.parse(activation)  # raises the usual error
    quant = QuantConfig(weights=QuantScheme(kind=wk), activations=QuantScheme(kind=ak))
    return ActivationSpec(name=activation, alpha=alpha, limit=limit), quant


@_fused_experts_op.register_fake
def _(out, hidden_states, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, expert_map,
      activation, alpha, limit, weights_scheme, activations_scheme, apply_router_weight_on_input, backend) -> None:
    return None
