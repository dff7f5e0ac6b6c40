"""The functional API: ``fused_experts``.

Validates the call (metadata always; values on CPU or in validation mode), describes it as a
tensor-free :class:`ExpertsProblem`, asks the registry for a backend, and runs it. Under
``torch.compile`` the backend call goes through the ``moe::fused_experts`` custom op, so the whole
layer compiles with ``fullgraph=True``: quantized weights cross it as flattened optional tensors per
operand plus one canonical scheme string (custom-op schemas take tensors and plain values only).

When autograd needs it (grad mode on and an input requiring grad), the forward still runs on the
chosen backend and the backward recomputes the call through the differentiable torch reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator

import torch

from .backends.torch_ref import torch_ref_experts
from .config import GATED_ACTIVATIONS, NON_GATED_ACTIVATIONS, ActivationSpec, RoutingConfig
from .contract import ExpertsArgs, ExpertsProblem, PreparedWeights, Weight
from .options import register_cache
from .quant import QuantConfig, QuantizedWeight, WeightScheme, check_quantized_weight
from .registry import get_backend, select_backend
from .routing import RoutingFunction, route, route_and_align, routes_into, routing_outputs
from .target import current_target
from .validation import (
    check_expert_map_values,
    check_finite_weights,
    check_float,
    check_ids_range,
    check_ndim,
    check_same_device,
    check_shape,
    check_top_k,
    value_checks_enabled,
)

__all__ = ["PreparedCache", "fused_experts", "fused_moe"]

_INT_IDS = (torch.int32, torch.int64)


def fused_experts(
    hidden_states: torch.Tensor,
    w13: Weight,
    w2: Weight,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str | ActivationSpec = "silu",
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    apply_router_weight_on_input: bool = False,
    expert_map: torch.Tensor | None = None,
    quant: QuantConfig | str | None = None,
    a13_scale: torch.Tensor | None = None,
    a2_scale: torch.Tensor | None = None,
    backend: str = "auto",
    out: torch.Tensor | None = None,
    prepared: PreparedWeights | PreparedCache | None = None,
) -> torch.Tensor:
    """Compute the routed experts of a batch and combine them.

    Shapes: ``hidden_states`` [T, K]; ``w13`` [E, 2N, K] (gate rows then up rows; [E, N, K] for
    non-gated activations); ``w2`` [E, K, N]; ``topk_weights`` [T, k] float and ``topk_ids`` [T, k]
    int32/int64 with global expert ids. With ``expert_map`` ([E_global] int, local id or -1) the
    weights hold only the local experts and pairs routed elsewhere contribute zero. Any strides work.

    Quantized weights are :class:`moe.quant.QuantizedWeight`; ``quant`` (a ``QuantConfig`` or a name of
    ``moe.quant.NAMES``) also quantizes the activations, and ``None`` with quantized weights means
    weight-only. ``a13_scale`` / ``a2_scale``: static activation scales ([1] or [E] fp32).
    ``prepared``: a backend's own arrangement of these weights (``Backend.prepare``), or the layer's
    :class:`PreparedCache` that makes it once for the backend chosen.

    Returns [T, K] in the dtype of ``hidden_states``: each expert output times its fp32 routing
    weight, summed over k in fp32. ``out`` (which may be ``hidden_states`` itself, or any [T, K] view)
    receives it.
    """
    spec = ActivationSpec.parse(activation)
    cache = prepared if isinstance(prepared, PreparedCache) else None
    if cache is not None:
        prepared = cache.current
    if torch.compiler.is_compiling():
        return _compiled_call(hidden_states, w13, w2, topk_weights, topk_ids, spec, w13_bias, w2_bias,
                              apply_router_weight_on_input, expert_map, quant, a13_scale, a2_scale, backend, out,
                              prepared)
    args = ExpertsArgs(hidden_states, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, expert_map, a13_scale,
                       a2_scale, prepared)
    problem = _problem(args, spec, apply_router_weight_on_input, quant)
    _check_values(args, problem)
    if out is None:
        out = torch.empty(hidden_states.shape, dtype=hidden_states.dtype, device=hidden_states.device)
    else:
        _check_out(out, hidden_states)
    decision = select_backend(problem, backend)  # also for T = 0: a named backend must be able to run
    return _execute(args, problem, decision.chosen, cache, out)


def fused_moe(
    hidden_states: torch.Tensor,
    router_logits: torch.Tensor,
    w13: Weight,
    w2: Weight,
    *,
    top_k: int,
    routing: RoutingConfig | None = None,
    e_score_correction_bias: torch.Tensor | None = None,
    custom_routing_function: RoutingFunction | None = None,
    activation: str | ActivationSpec = "silu",
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    apply_router_weight_on_input: bool = False,
    expert_map: torch.Tensor | None = None,
    quant: QuantConfig | str | None = None,
    a13_scale: torch.Tensor | None = None,
    a2_scale: torch.Tensor | None = None,
    backend: str = "auto",
    prepared: PreparedWeights | PreparedCache | None = None,
) -> torch.Tensor:
    """Routing, then the experts: ``moe.route(router_logits [T, E], top_k, routing)`` and
    :func:`fused_experts` of its weights and ids, with the same results; what ``FusedMoE.forward`` runs.

    Where the routing kernels take the call (``moe.routing.routes_into``: CUDA logits, a top-k method, no
    gradient to the logits, not under ``torch.compile``) the call is described and its backend chosen
    first, and the kernel writes straight into the call's routing buffers; for a backend that groups the
    pairs by expert (``alignment_tile``: Triton) a small batch is grouped in the routing kernel's own launch
    (``moe.routing.route_and_align``), so routing and alignment take one launch. Everything else is the
    two calls."""
    config = routing or RoutingConfig()
    if isinstance(router_logits, torch.Tensor) and isinstance(hidden_states, torch.Tensor) and \
            router_logits.dim() == 2 and hidden_states.dim() == 2 and router_logits.shape[0] != hidden_states.shape[0]:
        raise ValueError(f"router_logits: expected [{hidden_states.shape[0]}, num_experts] (one row per token of "
                         f"hidden_states), got {tuple(router_logits.shape)}")
    if not _routes_in_place(router_logits, top_k, config, expert_map):
        weights, ids = route(router_logits, top_k, config, hidden_states=hidden_states,
                             e_score_correction_bias=e_score_correction_bias,
                             custom_routing_function=custom_routing_function)
        return fused_experts(hidden_states, w13, w2, weights, ids, activation=activation, w13_bias=w13_bias,
                             w2_bias=w2_bias, apply_router_weight_on_input=apply_router_weight_on_input,
                             expert_map=expert_map, quant=quant, a13_scale=a13_scale, a2_scale=a2_scale,
                             backend=backend, prepared=prepared)
    spec = ActivationSpec.parse(activation)
    cache = prepared if isinstance(prepared, PreparedCache) else None
    if cache is not None:
        prepared = cache.current
    weights, ids = routing_outputs(router_logits, top_k)
    args = ExpertsArgs(hidden_states, w13, w2, weights, ids, w13_bias, w2_bias, expert_map, a13_scale, a2_scale,
                       prepared)
    problem = _problem(args, spec, apply_router_weight_on_input, quant)
    chosen = select_backend(problem, backend).chosen
    tile = getattr(get_backend(chosen), "alignment_tile", None)
    al = route_and_align(router_logits, top_k, config, weights, ids, num_local=problem.num_experts,
                         block_m=tile(args, problem) if tile is not None else None, expert_map=expert_map)
    if al is not None:
        args = ExpertsArgs(hidden_states, w13, w2, weights, ids, w13_bias, w2_bias, expert_map, a13_scale,
                           a2_scale, prepared, al)
    _check_values(args, problem)
    out = torch.empty(hidden_states.shape, dtype=hidden_states.dtype, device=hidden_states.device)
    return _execute(args, problem, chosen, cache, out)


def _routes_in_place(router_logits: torch.Tensor, top_k: int, config: RoutingConfig,
                     expert_map: torch.Tensor | None) -> bool:
    """Whether fused_moe routes into its own buffers: the routing kernels take [T, E] logits, and an expert
    map (if any) has one entry per routed expert (the kernel maps the ids it routed)."""
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2:
        return False
    if expert_map is not None and (not isinstance(expert_map, torch.Tensor) or expert_map.dim() != 1
                                   or expert_map.shape[0] != router_logits.shape[1]):
        return False
    return routes_into(router_logits, top_k, config)


def _execute(args: ExpertsArgs, problem: ExpertsProblem, chosen: str, cache: PreparedCache | None,
             out: torch.Tensor) -> torch.Tensor:
    """Run a validated call on the chosen backend: its prepared weights, autograd, the backend itself."""
    impl = get_backend(chosen)
    if cache is not None:
        made = cache.get(impl, args, problem)
        if made is not args.prepared:  # most backends prepare nothing: no copy of the arguments then
            args = dataclasses.replace(args, prepared=made)
    elif args.prepared is not None and args.prepared.backend != chosen:
        args = dataclasses.replace(args, prepared=None)  # another backend's arrangement: not for this one
    if problem.num_tokens == 0:
        return out
    if _needs_grad(args):
        return out.copy_(_WithGrad.apply(args, problem, chosen, *_grad_inputs(args)))
    impl.apply(args, problem, out)
    return out


def _check_values(args: ExpertsArgs, problem: ExpertsProblem) -> None:
    """The value checks (CPU tensors, or validation mode): ids in range, finite weights, the map's values."""
    check_ids_range(args.topk_ids, problem.num_global_experts)
    check_finite_weights(args.topk_weights)
    if args.expert_map is not None and value_checks_enabled(args.expert_map):
        check_expert_map_values(args.expert_map, problem.num_experts)


# ----------------------------------------------------------------------------- one-time weight preparation
class PreparedCache:
    """The one prepared copy of a layer's weights (``Backend.prepare``), owned by the layer.

    Memory rule: at most one prepared copy per layer exists beside the canonical weights (which stay the
    parameters and the ``state_dict``). It is made at the first call that runs a backend with ``prepare``
    (or by ``FusedMoE.prepare``), kept while the weights are unchanged (same storage, same version
    counter), and freed before a new one is made: when the weights change, when another preparing
    backend runs, or on ``FusedMoE.release_prepared()``. A backend keeps no copy of its own."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self.current: PreparedWeights | None = None

    def release(self) -> None:
        self._key, self.current = None, None

    def get(self, backend: object, args: ExpertsArgs, problem: ExpertsProblem) -> PreparedWeights | None:
        prepare = getattr(backend, "prepare", None)
        if prepare is None:
            return None
        if self.current is None and self._key is not None and self._key[:2] == (backend.name, problem):  # type: ignore[attr-defined]
            return None  # prepared nothing for this problem, which depends on it alone: no identities to compare
        key = (backend.name, problem, *(_identity(getattr(args, f)) for f in ("w13", "w2", "w13_bias", "w2_bias")))  # type: ignore[attr-defined]
        if key != self._key:
            self.release()  # the old copy goes before the new one is made
            made = prepare(args, problem)
            if made is not None and (not isinstance(made, PreparedWeights)
                                     or made.backend != backend.name):  # type: ignore[attr-defined]
                raise TypeError(f"backend {backend.name!r}: prepare() must return PreparedWeights for itself "  # type: ignore[attr-defined]
                                f"(or None: nothing to prepare for this problem), got {made!r}")
            self._key, self.current = key, made
        return self.current


def _identity(w: Weight | None) -> tuple:
    """What changes when a weight is replaced or written in place: its storage and version counter."""
    if w is None:
        return ()
    tensors = w.tensors() if isinstance(w, QuantizedWeight) else (w,)
    return tuple((t.data_ptr(), t._version) for t in tensors if t is not None)


# ------------------------------------------------------------------------------------------ autograd
_GRAD_NAMES = ("hidden_states", "w13", "w2", "topk_weights", "w13_bias", "w2_bias")


def _grad_inputs(args: ExpertsArgs) -> tuple[torch.Tensor | None, ...]:
    """The differentiable inputs, in _GRAD_NAMES order (quantized weights are not differentiable)."""
    w13 = args.w13 if isinstance(args.w13, torch.Tensor) else None
    w2 = args.w2 if isinstance(args.w2, torch.Tensor) else None
    return args.hidden_states, w13, w2, args.topk_weights, args.w13_bias, args.w2_bias


def _needs_grad(args: ExpertsArgs) -> bool:
    """Grad mode on and a differentiable input requiring grad (written out: it runs on every call)."""
    if not torch.is_grad_enabled():
        return False
    a = args
    return (a.hidden_states.requires_grad or a.topk_weights.requires_grad
            or (isinstance(a.w13, torch.Tensor) and a.w13.requires_grad)
            or (isinstance(a.w2, torch.Tensor) and a.w2.requires_grad)
            or (a.w13_bias is not None and a.w13_bias.requires_grad)
            or (a.w2_bias is not None and a.w2_bias.requires_grad))


def reference_grads(args: ExpertsArgs, problem: ExpertsProblem, grad_out: torch.Tensor,
                    need: tuple[bool, ...]) -> tuple[torch.Tensor | None, ...]:
    """Gradients of the call with respect to the inputs of _GRAD_NAMES marked in ``need``: autograd through
    the torch reference, recomputed (the forward ran on a faster backend)."""
    leaves = [t.detach().requires_grad_(n) if t is not None else None
              for t, n in zip(_grad_inputs(args), need, strict=True)]
    x, w13, w2, weights, b13, b2 = leaves
    rebuilt = dataclasses.replace(args, hidden_states=x, w13=w13 if w13 is not None else args.w13,
                                  w2=w2 if w2 is not None else args.w2, topk_weights=weights, w13_bias=b13,
                                  w2_bias=b2, prepared=None)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    if not wanted:
        return (None,) * len(leaves)
    with torch.enable_grad():
        ref = torch_ref_experts(rebuilt, problem)
        grads = iter(torch.autograd.grad(ref, wanted, grad_out.to(ref.dtype), allow_unused=True))
    out = []
    for t in leaves:
        g = next(grads) if t is not None and t.requires_grad else None
        out.append(torch.zeros_like(t) if g is None and t is not None and t.requires_grad else g)
    return tuple(out)


class _WithGrad(torch.autograd.Function):
    """Forward on the chosen backend; backward through the torch reference, recomputed under autograd."""

    @staticmethod
    def forward(ctx, args, problem, chosen, *inputs):  # type: ignore[override]
        x = args.hidden_states
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        with torch.no_grad():
            get_backend(chosen).apply(args, problem, out)
        ctx.args, ctx.problem = args, problem
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        return (None, None, None, *reference_grads(ctx.args, ctx.problem, grad_out, ctx.needs_input_grad[3:]))


# ------------------------------------------------------------------------------------ describing a call
_problems: dict[tuple, ExpertsProblem] = {}
register_cache(_problems.clear)


def _meta(t: torch.Tensor | QuantizedWeight | None) -> tuple | None:
    if t is None:
        return None
    if isinstance(t, QuantizedWeight):
        return (t.scheme, t.parts, *(_meta(x) for x in t.tensors()))
    return (t.shape, t.dtype, t.device)


def _problem(args: ExpertsArgs, spec: ActivationSpec, on_input: bool,
             quant: QuantConfig | str | None) -> ExpertsProblem:
    """The validated description of a call, remembered per (shapes, dtypes, devices, options): the
    metadata checks depend on nothing else, and they cost more host time than a small batch's kernels."""
    try:
        a = args
        key = (spec, on_input, quant, _meta(a.hidden_states), _meta(a.w13), _meta(a.w2), _meta(a.topk_weights),
               _meta(a.topk_ids), _meta(a.w13_bias), _meta(a.w2_bias), _meta(a.expert_map), _meta(a.a13_scale),
               _meta(a.a2_scale))
        problem = _problems.get(key)
    except (AttributeError, TypeError):  # not tensors, or unhashable options: the checks below say what is wrong
        key, problem = None, None
    if problem is None:
        problem = _describe(args, spec, on_input, _effective_quant(quant, args))
        if key is not None:
            if len(_problems) > 4096:
                _problems.clear()
            _problems[key] = problem
    return problem


def _effective_quant(quant: QuantConfig | str | None, args: ExpertsArgs) -> QuantConfig:
    """The call's scheme: ``quant``, or weight-only from the weights' own scheme; they must agree."""
    cfg = QuantConfig.parse(quant)
    kinds = {name: isinstance(w, QuantizedWeight) for name, w in (("w13", args.w13), ("w2", args.w2))}
    if kinds["w13"] != kinds["w2"]:
        raise TypeError("w13 and w2: both are QuantizedWeight or both are plain tensors; got "
                        + ", ".join(f"{n} {'QuantizedWeight' if q else 'tensor'}" for n, q in kinds.items()))
    if not kinds["w13"]:
        if cfg.weights is not None:
            raise TypeError(f"quant: {cfg.key()} needs quantized weights, but w13 and w2 are plain tensors; "
                            "quantize them with moe.quant.quantize (or moe.quant.quantize_ on a FusedMoE)")
        return cfg
    w13, w2 = args.w13, args.w2
    if w13.scheme != w2.scheme:  # type: ignore[union-attr]
        raise ValueError(f"w13 and w2 are stored with different schemes ({w13.scheme} and {w2.scheme})")  # type: ignore[union-attr]
    if cfg.weights is None:
        return QuantConfig(weights=w13.scheme)  # type: ignore[union-attr]
    if cfg.weights != w13.scheme:  # type: ignore[union-attr]
        raise ValueError(f"quant: {cfg.key()} stores weights as {cfg.weights}, but w13 is stored as "
                         f"{w13.scheme}; pass the quant that matches the weights")  # type: ignore[union-attr]
    return cfg


def _logical(name: str, w: Weight) -> tuple[torch.Tensor, tuple[int, ...], torch.dtype | None]:
    """(tensor to check devices on, logical [E, rows, cols] shape, dtype or None when quantized)."""
    if isinstance(w, QuantizedWeight):
        check_quantized_weight(name, w)
        return w.data, tuple(w.shape), None
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or a moe.quant.QuantizedWeight, got {type(w).__name__}")
    return w, tuple(w.shape), w.dtype


def _describe(args: ExpertsArgs, spec: ActivationSpec, on_input: bool, quant: QuantConfig) -> ExpertsProblem:
    """Check the metadata of a call (shapes, dtypes, devices) and describe it."""
    x = args.hidden_states
    check_float("hidden_states", x)
    check_ndim("hidden_states", x, 2, "[num_tokens, hidden_size]")
    w13, s13, dt13 = _logical("w13", args.w13)
    w2, s2, dt2 = _logical("w2", args.w2)
    if len(s13) != 3:
        raise ValueError(f"w13: expected a 3-D tensor [num_experts, 2 * intermediate_size, hidden_size], got shape "
                         f"{s13}")
    if len(s2) != 3:
        raise ValueError(f"w2: expected a 3-D tensor [num_experts, hidden_size, intermediate_size], got shape {s2}")
    num_tokens, hidden = x.shape
    num_experts, rows, k_w13 = s13
    if k_w13 != hidden:
        raise ValueError(
            f"w13: its last dim (hidden_size) is {k_w13} but hidden_states has hidden_size {hidden}; "
            "w13 must be [num_experts, 2 * intermediate_size, hidden_size]"
        )
    if s2[0] != num_experts:
        raise ValueError(f"w2: has {s2[0]} experts but w13 has {num_experts}; they must match")
    if s2[1] != hidden:
        raise ValueError(f"w2: expected shape [num_experts, hidden_size={hidden}, intermediate_size], got {s2} "
                         "(a transposed w2 is [E, N, K]; w2 must be [E, K, N])")
    n = s2[2]
    want_rows = 2 * n if spec.gated else n
    if rows != want_rows:
        kind = "gated" if spec.gated else "non-gated"
        raise ValueError(
            f"w13: has {rows} rows per expert but the {kind} activation {spec.name!r} with "
            f"intermediate_size={n} (from w2) needs {want_rows}"
        )
    for name, dt in (("w13", dt13), ("w2", dt2)):
        if dt is not None and dt != x.dtype:
            raise TypeError(f"{name}: dtype {dt} differs from hidden_states' {x.dtype}; unquantized weights must "
                            f"have the activations' dtype (cast one of them, e.g. hidden_states.to({dt}))")
    top_k, num_global = _check_routing(args, num_tokens, num_experts)
    if on_input and top_k != 1:
        raise ValueError(f"apply_router_weight_on_input needs top_k=1, got top_k={top_k}")
    _check_biases(args, num_experts, want_rows, hidden, x.dtype)
    _check_activation_scales(args, quant, num_experts)
    check_same_device(
        "hidden_states", x, w13=w13, w2=w2, topk_weights=args.topk_weights, topk_ids=args.topk_ids,
        w13_bias=args.w13_bias, w2_bias=args.w2_bias, expert_map=args.expert_map, a13_scale=args.a13_scale,
        a2_scale=args.a2_scale,
    )
    return ExpertsProblem(
        device_type=x.device.type, dtype=x.dtype, num_tokens=num_tokens, num_experts=num_experts,
        num_global_experts=num_global, hidden_size=hidden, intermediate_size=n, top_k=top_k,
        activation=spec, has_w13_bias=args.w13_bias is not None, has_w2_bias=args.w2_bias is not None,
        has_expert_map=args.expert_map is not None, apply_router_weight_on_input=on_input, quant=quant,
        target=current_target(x.device),
    )


def _check_routing(args: ExpertsArgs, num_tokens: int, num_experts: int) -> tuple[int, int]:
    ids, weights = args.topk_ids, args.topk_weights
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"topk_ids: expected a torch.Tensor, got {type(ids).__name__}")
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
        if args.expert_map.numel() == 0:
            raise ValueError("expert_map: empty; it has one entry per global expert (the range of topk_ids)")
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


def _check_activation_scales(args: ExpertsArgs, quant: QuantConfig, num_experts: int) -> None:
    static = quant.static_activations
    for name, s in (("a13_scale", args.a13_scale), ("a2_scale", args.a2_scale)):
        if s is None:
            if static:
                raise ValueError(f"{name}: {quant.key()} quantizes activations with static scales; pass {name} "
                                 f"(a [1] or [{num_experts}] float32 tensor), or the layer's input-scale parameters")
            continue
        if not static:
            raise ValueError(f"{name}: given, but {quant.key()} has no static activation scales")
        if s.dtype != torch.float32 or s.dim() != 1 or s.shape[0] not in (1, num_experts):
            raise ValueError(f"{name}: expected a [1] or [{num_experts}] float32 tensor (per tensor, or one per "
                             f"expert), got {tuple(s.shape)} {s.dtype}")


def _check_out(out: torch.Tensor, x: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        got = f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"out: expected a {tuple(x.shape)} {x.dtype} tensor on {x.device} (like hidden_states; any strides), "
            f"got {got}"
        )


# ----------------------------------------------------------------------------------- torch.compile
def _flat(w: Weight) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, int]:
    if isinstance(w, QuantizedWeight):
        return (*w.tensors(), w.parts)  # type: ignore[return-value]
    return w, None, None, None, 1


def _compiled_call(x, w13, w2, topk_weights, topk_ids, spec, w13_bias, w2_bias, on_input, expert_map, quant,
                   a13_scale, a2_scale, backend, out, prepared):
    """Under torch.compile: the whole call is the opaque ``moe::fused_experts`` op (functional, with an
    autograd formula through the reference), which validates and selects a backend when it runs. Only
    tensors and plain values cross the op boundary: schemes travel as their string keys (``FusedMoE`` and
    ``QuantizedWeight`` hold them as strings, since Dynamo does not trace pydantic models on every torch
    release; pass ``quant`` as a name or key string when calling fused_experts under compile)."""
    scheme = quant if isinstance(quant, str) else ("none" if quant is None else quant.key())
    weights_scheme = w13.scheme_key if isinstance(w13, QuantizedWeight) else ""
    d13, s13, z13, g13, parts13 = _flat(w13)
    d2, s2, z2, g2, parts2 = _flat(w2)
    names = ",".join(prepared.tensors) if prepared is not None else ""
    y = torch.ops.moe.fused_experts(
        x, d13, s13, z13, g13, d2, s2, z2, g2, topk_weights, topk_ids, w13_bias, w2_bias, expert_map,
        a13_scale, a2_scale, list(prepared.tensors.values()) if prepared is not None else [],
        f"{prepared.backend}:{names}" if prepared is not None else "", spec.name, spec.alpha, spec.limit, scheme,
        weights_scheme, parts13, parts2, on_input, backend,
    )
    return y if out is None else out.copy_(y)


def _op_args(x, w13, w13_scale, w13_zero, w13_global_scale, w2, w2_scale, w2_zero, w2_global_scale, topk_weights,
             topk_ids, w13_bias, w2_bias, expert_map, a13_scale, a2_scale, weights_scheme, w13_parts, w2_parts,
             prepared=None) -> ExpertsArgs:
    if weights_scheme:
        scheme = WeightScheme.parse(weights_scheme)
        w13 = QuantizedWeight(w13, w13_scale, scheme, w13_zero, w13_global_scale, w13_parts)
        w2 = QuantizedWeight(w2, w2_scale, scheme, w2_zero, w2_global_scale, w2_parts)
    return ExpertsArgs(x, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, expert_map, a13_scale, a2_scale,
                       prepared)


@torch.library.custom_op("moe::fused_experts", mutates_args=())
def _fused_experts_op(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor | None,
    w13_zero: torch.Tensor | None,
    w13_global_scale: torch.Tensor | None,
    w2: torch.Tensor,
    w2_scale: torch.Tensor | None,
    w2_zero: torch.Tensor | None,
    w2_global_scale: torch.Tensor | None,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_bias: torch.Tensor | None,
    w2_bias: torch.Tensor | None,
    expert_map: torch.Tensor | None,
    a13_scale: torch.Tensor | None,
    a2_scale: torch.Tensor | None,
    prepared: list[torch.Tensor],
    prepared_names: str,
    activation: str,
    alpha: float,
    limit: float,
    quant: str,
    weights_scheme: str,
    w13_parts: int,
    w2_parts: int,
    apply_router_weight_on_input: bool,
    backend: str,
) -> torch.Tensor:
    spec, cfg = _specs(activation, alpha, limit, quant)
    prep = None
    if prepared_names:
        owner, names = prepared_names.split(":", 1)
        prep = PreparedWeights(owner, dict(zip(names.split(","), prepared, strict=True)))
    a = _op_args(hidden_states, w13, w13_scale, w13_zero, w13_global_scale, w2, w2_scale, w2_zero, w2_global_scale,
                 topk_weights, topk_ids, w13_bias, w2_bias, expert_map, a13_scale, a2_scale, weights_scheme, w13_parts,
                 w2_parts)
    with torch.no_grad():  # the op's autograd formula is registered below
        return fused_experts(
            a.hidden_states, a.w13, a.w2, topk_weights, topk_ids, activation=spec, w13_bias=w13_bias, w2_bias=w2_bias,
            apply_router_weight_on_input=apply_router_weight_on_input, expert_map=expert_map,
            quant=cfg if cfg.is_quantized else None,
            a13_scale=a13_scale, a2_scale=a2_scale, backend=backend, prepared=prep,
        )


@_fused_experts_op.register_fake
def _(hidden_states, *rest) -> torch.Tensor:
    return torch.empty(hidden_states.shape, dtype=hidden_states.dtype, device=hidden_states.device)


@functools.lru_cache(maxsize=64)
def _specs(activation: str, alpha: float, limit: float, quant: str) -> tuple[ActivationSpec, QuantConfig]:
    if activation not in GATED_ACTIVATIONS + NON_GATED_ACTIVATIONS:
        ActivationSpec.parse(activation)  # raises the usual error
    spec = ActivationSpec(name=activation, alpha=alpha, limit=limit)  # type: ignore[arg-type]
    return spec, QuantConfig.parse(quant)


# the op's differentiable inputs (positions in its schema), in _GRAD_NAMES order
_GRAD_POSITIONS = (0, 1, 5, 9, 11, 12)
_N_TENSORS = 16  # positions 0..15 are (optional) tensors; then the prepared list and plain values


@torch.library.custom_op("moe::fused_experts_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor, hidden_states: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor | None,
    w13_zero: torch.Tensor | None, w13_global_scale: torch.Tensor | None, w2: torch.Tensor,
    w2_scale: torch.Tensor | None, w2_zero: torch.Tensor | None, w2_global_scale: torch.Tensor | None,
    topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13_bias: torch.Tensor | None, w2_bias: torch.Tensor | None,
    expert_map: torch.Tensor | None, a13_scale: torch.Tensor | None, a2_scale: torch.Tensor | None,
    activation: str, alpha: float, limit: float, quant: str, weights_scheme: str, w13_parts: int, w2_parts: int,
    apply_router_weight_on_input: bool, need: list[bool],
) -> list[torch.Tensor]:
    """The gradients of ``moe::fused_experts`` (an opaque op: the reference's data-dependent shapes do
    not trace); inputs not in ``need`` get empty tensors."""
    spec, cfg = _specs(activation, alpha, limit, quant)
    args = _op_args(hidden_states, w13, w13_scale, w13_zero, w13_global_scale, w2, w2_scale, w2_zero,
                    w2_global_scale, topk_weights, topk_ids, w13_bias, w2_bias, expert_map, a13_scale, a2_scale,
                    weights_scheme, w13_parts, w2_parts)
    problem = _problem(args, spec, apply_router_weight_on_input, cfg if cfg.is_quantized else None)
    with _autograd_inside_an_op():
        grads = reference_grads(args, problem, grad_out, tuple(need))
    return [g if g is not None else grad_out.new_empty(0) for g in grads]


@contextlib.contextmanager
def _autograd_inside_an_op() -> Iterator[None]:
    """A custom op's body runs with autograd's dispatch keys excluded; the backward op records a graph of
    the reference on purpose, so it lets them back in for its own body."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.ADInplaceOrView)
    for name in dir(torch._C.DispatchKey):
        if name.startswith("Autograd"):
            keys = keys | torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, name))
    exclude = torch._C._dispatch_tls_local_exclude_set() - keys
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


@_backward_op.register_fake
def _(grad_out, hidden_states, w13, w13_scale, w13_zero, w13_global_scale, w2, w2_scale, w2_zero, w2_global_scale,
      topk_weights, topk_ids, w13_bias, w2_bias, *rest) -> list[torch.Tensor]:
    need = rest[-1]
    inputs = (hidden_states, w13, w2, topk_weights, w13_bias, w2_bias)
    return [torch.empty_like(t) if n and t is not None else grad_out.new_empty(0)
            for t, n in zip(inputs, need, strict=True)]


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:_N_TENSORS])
    ctx.plain = inputs[18:26]  # activation, alpha, limit, quant, weights_scheme, w13_parts, w2_parts, on_input
    ctx.num_prepared = len(inputs[16])


def _op_backward(ctx, grad_out):
    need = [bool(ctx.needs_input_grad[i]) for i in _GRAD_POSITIONS]
    grads = torch.ops.moe.fused_experts_backward(grad_out, *ctx.saved_tensors, *ctx.plain, need)
    result: list = [None] * 27
    result[16] = [None] * ctx.num_prepared  # the structure of the inputs: a list for the prepared tensors
    for pos, g, n in zip(_GRAD_POSITIONS, grads, need, strict=True):
        result[pos] = g if n else None
    return tuple(result)


_fused_experts_op.register_autograd(_op_backward, setup_context=_setup_context)
