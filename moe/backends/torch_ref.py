"""The pure-torch reference backend: every dtype, device, activation and option. The test oracle.

One expert at a time: gather its (token, slot) pairs, two matmuls in the input dtype with the
activation computed in fp32, weight by the fp32 routing weight, and sum over the k slots in fp32.
Quantized weights are dequantized one expert at a time and the matmuls run in fp32. With quantized
activations (W8A8) each GEMM's input is quantized exactly as the kernels do (``moe.quant.activations``):
GEMM1's from the hidden states, GEMM2's from the activation's output rounded to the activations' dtype;
per-tensor dynamic scales span the whole call (all tokens, or all (token, slot) rows).
"""

from __future__ import annotations

import torch

from ..activations import apply_activation
from ..contract import ExpertsArgs, ExpertsProblem, Weight
from ..quant import QuantizedWeight, dequantize
from ..quant.activations import activation_scale, dequantize_activations, quantize_activations

__all__ = ["BACKEND", "torch_ref_experts"]


def _expert(w: Weight, e: int, dtype: torch.dtype | None) -> torch.Tensor:
    """Expert ``e``'s [rows, cols] weight in ``dtype`` (None: as stored)."""
    if isinstance(w, QuantizedWeight):
        return dequantize(w, dtype or torch.float32, expert=e)
    return w[e] if dtype is None else w[e].to(dtype)


def torch_ref_experts(
    args: ExpertsArgs, problem: ExpertsProblem, compute_dtype: torch.dtype | None = None,
    gemm1_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The reference. With ``compute_dtype`` (e.g. float32 for a bf16 problem) each expert's weights
    are upcast one expert at a time, so checking a large layer never holds a full upcast copy.

    ``gemm1_dtype`` (W8A8 only): GEMM1's output rounded to this dtype before its bias and the activation,
    the emulation of a pipeline whose first GEMM writes its output in that dtype (``torch_grouped``:
    ``torch._scaled_grouped_mm`` writes bf16 only). The kernels keep it in fp32 (the default, None)."""
    if problem.quant.activations is not None:
        return _w8a8_reference(args, problem, compute_dtype or torch.float32, gemm1_dtype)
    if gemm1_dtype is not None:
        raise ValueError("gemm1_dtype: only W8A8 schemes emulate a rounded GEMM1 output")
    if compute_dtype is None and problem.quant.is_quantized and args.hidden_states.dtype != torch.float64:
        compute_dtype = torch.float32
    cast = (lambda t: t.to(compute_dtype)) if compute_dtype is not None else (lambda t: t)
    x = cast(args.hidden_states)  # [T, K]
    ids = args.topk_ids.long()  # [T, k] global ids
    if args.expert_map is not None:
        ids = args.expert_map.long()[ids]  # [T, k] local ids, -1 where not local
    acc = torch.zeros(x.shape, dtype=torch.float32 if x.dtype != torch.float64 else x.dtype, device=x.device)
    on_input = problem.apply_router_weight_on_input
    for e in range(problem.num_experts):
        tok, slot = (ids == e).nonzero(as_tuple=True)  # the pairs routed to expert e
        if tok.numel() == 0:
            continue
        weight = args.topk_weights[tok, slot].to(acc.dtype).unsqueeze(1)  # [n, 1]
        xe = x[tok]  # [n, K]
        if on_input:
            xe = (xe.to(acc.dtype) * weight).to(x.dtype)
        h = xe @ _expert(args.w13, e, compute_dtype).t()  # [n, 2N] or [n, N]
        if args.w13_bias is not None:
            h = h + cast(args.w13_bias[e])
        a = apply_activation(h.to(acc.dtype), problem.activation)  # [n, N]
        a = cast(a.to(args.hidden_states.dtype))  # GEMM2's input, rounded to the activations' dtype
        y = a @ _expert(args.w2, e, compute_dtype).t()  # [n, K]
        if args.w2_bias is not None:
            y = y + cast(args.w2_bias[e])
        y = y.to(acc.dtype)
        acc.index_add_(0, tok, y if on_input else y * weight)
    return acc.to(args.hidden_states.dtype)


def _quantized_input(rows: torch.Tensor, scheme, static: torch.Tensor | None, expert: int,
                     call_scale: torch.Tensor | None, work: torch.Tensor.dtype) -> torch.Tensor:
    """A GEMM input [n, K] quantized as the scheme says, returned dequantized in ``work``."""
    # static: the expert's (or the one) given scale; else the whole call's per-tensor scale, or None: per
    # row or group, from the rows themselves
    scale = static[expert if static.numel() > 1 else 0].reshape(1) if static is not None else call_scale
    q, s = quantize_activations(rows, scheme, scale)
    return dequantize_activations(q, s, scheme, work)


def _w8a8_reference(args: ExpertsArgs, problem: ExpertsProblem, work: torch.dtype,
                    gemm1_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Both GEMM inputs quantized; weights dequantized one expert at a time; fp32 (or ``work``) matmuls."""
    act = problem.quant.activations
    x = args.hidden_states  # [T, K]
    dtype = x.dtype
    ids = args.topk_ids.long()
    if args.expert_map is not None:
        ids = args.expert_map.long()[ids]  # [T, k] local ids, -1 where not local
    on_input = problem.apply_router_weight_on_input
    if on_input:  # top_k = 1: the weight scales the token before it is quantized
        x = (x.to(torch.float32) * args.topk_weights.to(torch.float32)).to(dtype)
    tensor_scale = act.granularity == "tensor" and not act.static
    scale1 = activation_scale(x, act) if tensor_scale else None
    pairs = []  # (expert, tokens, slots, GEMM2 input rows)
    for e in range(problem.num_experts):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = _quantized_input(x[tok], act, args.a13_scale, e, scale1, work)
        h = xe @ _expert(args.w13, e, work).t()  # [n, 2N]
        if gemm1_dtype is not None:
            h = h.to(gemm1_dtype)
        if args.w13_bias is not None:
            h = h + args.w13_bias[e].to(h.dtype)
        a = apply_activation(h.to(torch.float32), problem.activation).to(dtype)  # [n, N], as GEMM1 stores it
        pairs.append((e, tok, slot, a))
    rows = [a for *_, a in pairs]
    scale2 = activation_scale(torch.cat(rows), act) if tensor_scale and rows else None
    acc = torch.zeros(x.shape, dtype=torch.float64 if work == torch.float64 else torch.float32, device=x.device)
    for e, tok, slot, a in pairs:
        y = _quantized_input(a, act, args.a2_scale, e, scale2, work) @ _expert(args.w2, e, work).t()  # [n, K]
        if args.w2_bias is not None:
            y = y + args.w2_bias[e].to(work)
        y = y.to(dtype).to(acc.dtype)  # the expert output, rounded like the kernels'
        weight = args.topk_weights[tok, slot].to(acc.dtype).unsqueeze(1)
        acc.index_add_(0, tok, y if on_input else y * weight)
    return acc.to(dtype)


class TorchRefBackend:
    name = "torch"
    priority = 0  # the oracle: chosen by "auto" only when nothing faster can run
    schemes = ("*",)  # every scheme: the reference defines them

    def is_available(self) -> tuple[bool, str]:
        return True, "pure torch, always available"

    def supports(self, problem: ExpertsProblem) -> tuple[bool, str]:
        return True, "ok"

    def apply(self, args: ExpertsArgs, problem: ExpertsProblem, out: torch.Tensor) -> None:
        out.copy_(torch_ref_experts(args, problem))


BACKEND = TorchRefBackend()
