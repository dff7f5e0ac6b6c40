"""The pipeline around a library's grouped GEMM (``torch_grouped``, ``cutlass``): the pairs grouped by expert
with no padding (our alignment, a row tile of 1), the token rows gathered, GEMM1, its bias, the activation in
one launch (``activate_rows``), GEMM2, its bias, and our combine reading each pair's row where GEMM2 left it.
The backend brings only its GEMM: ``gemm(a [P, K], w, expert_ends [E]) -> [P, rows]`` in ``a``'s dtype (a
quantized ``w`` quantizes ``a`` itself). Everything stays on the device: no host synchronization.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..contract import ExpertsArgs, ExpertsProblem, Weight
from .activation import activate_rows
from .align import align, pair_rows
from .combine import combine

__all__ = ["GroupedGemm", "grouped_pipeline"]

GroupedGemm = Callable[[torch.Tensor, Weight, torch.Tensor], torch.Tensor]


def grouped_pipeline(args: ExpertsArgs, problem: ExpertsProblem, out: torch.Tensor, gemm: GroupedGemm) -> torch.Tensor:
    x, k = args.hidden_states, problem.top_k
    num_pairs = problem.num_tokens * k
    ids, topk_w = args.topk_ids.reshape(-1).contiguous(), args.topk_weights.reshape(-1).contiguous()
    if num_pairs == 0:
        return out
    al = align(ids, problem.num_experts, 1, args.expert_map)  # row tile 1: groups without padding
    pair = al.sorted_ids[:num_pairs].long()  # each sorted row's pair; num_pairs past the local ones
    safe = torch.where(pair < num_pairs, pair, 0)
    xs = x.index_select(0, safe // k)  # [P, K] rows grouped by expert
    if problem.apply_router_weight_on_input:
        xs = (xs.float() * topk_w.index_select(0, safe).unsqueeze(1)).to(x.dtype)
    expert_of_row = al.block_expert[:num_pairs].clamp(min=0).long()  # row tile 1: the expert of each row
    h = gemm(xs, args.w13, al.expert_ends)  # [P, 2N] or [P, N]
    if args.w13_bias is not None:
        h = h + args.w13_bias.index_select(0, expert_of_row)
    a = activate_rows(h.contiguous(), problem.activation)  # [P, N], fp32 arithmetic, rounded to x's dtype
    y = gemm(a, args.w2, al.expert_ends)  # [P, K] in expert order
    if args.w2_bias is not None:
        y = y + args.w2_bias.index_select(0, expert_of_row)
    return combine(y, ids, topk_w, out, top_k=k, num_global=problem.num_global_experts, num_local=problem.num_experts,
                   expert_map=args.expert_map, weight_on_input=problem.apply_router_weight_on_input,
                   rows=pair_rows(pair, num_pairs))
