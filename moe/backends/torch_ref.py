"""The pure-torch reference backend: every dtype, device, activation and option. The test oracle.

One expert at a time: gather its (token, slot) pairs, two matmuls in the input dtype with the
activation computed in fp32, weight by the fp32 routing weight, and sum over the k slots in fp32.
Quantized weights are dequantized one expert at a time and the matmuls run in fp32.
"""

from __future__ import annotations

import torch

from ..activations import apply_activation
from ..contract import ExpertsArgs, ExpertsProblem, Weight
from ..quant import QuantizedWeight, dequantize

__all__ = ["BACKEND", "torch_ref_experts"]


def _expert(w: Weight, e: int, dtype: torch.dtype | None) -> torch.Tensor:
    """Expert ``e``'s [rows, cols] weight in ``dtype`` (None: as stored)."""
    if isinstance(w, QuantizedWeight):
        return dequantize(w, dtype or torch.float32, expert=e)
    return w[e] if dtype is None else w[e].to(dtype)


def torch_ref_experts(
    args: ExpertsArgs, problem: ExpertsProblem, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The reference. With ``compute_dtype`` (e.g. float32 for a bf16 problem) each expert's weights
    are upcast one expert at a time, so checking a large layer never holds a full upcast copy."""
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


class TorchRefBackend:
    name = "torch"
    priority = 0  # the oracle: chosen by "auto" only when nothing faster can run
    schemes = ("none", "scaled")

    def is_available(self) -> tuple[bool, str]:
        return True, "pure torch, always available"

    def supports(self, problem: ExpertsProblem) -> tuple[bool, str]:
        return True, "ok"

    def apply(self, args: ExpertsArgs, problem: ExpertsProblem, out: torch.Tensor) -> None:
        out.copy_(torch_ref_experts(args, problem))


BACKEND = TorchRefBackend()
