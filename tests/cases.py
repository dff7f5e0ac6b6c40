"""Random MoE problems for tests: fresh random inputs (never zeros), routing from random logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import moe
from moe.config import ActivationSpec


@dataclass(frozen=True)
class Case:
    T: int
    E: int
    K: int
    N: int
    k: int
    activation: str = "silu"
    bias: bool = False
    expert_map: bool = False

    def __str__(self) -> str:
        extra = ("+bias" if self.bias else "") + ("+emap" if self.expert_map else "")
        return f"T{self.T}-E{self.E}-K{self.K}-N{self.N}-k{self.k}-{self.activation}{extra}"


def make_inputs(case: Case, dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict:
    gated = ActivationSpec.parse(case.activation).gated
    rows = 2 * case.N if gated else case.N
    local = case.E
    emap = None
    if case.expert_map:
        # every other global expert is local (round-robin placement over 2 ranks, this is rank 0)
        emap = torch.full((case.E,), -1, dtype=torch.int32)
        held = torch.arange(0, case.E, 2)
        emap[held] = torch.arange(held.numel(), dtype=torch.int32)
        local = held.numel()
        emap = emap.to(device)
    scale = 1.0 if case.activation != "swigluoai" else 4.0  # reach the clamp
    x = torch.randn(case.T, case.K, device=device, dtype=torch.float32)
    w13 = torch.randn(local, rows, case.K, device=device) * (scale / case.K**0.5)
    w2 = torch.randn(local, case.K, case.N, device=device) / case.N**0.5
    logits = torch.randn(case.T, case.E, device=device)
    weights, ids = moe.fused_topk(logits, case.k, renormalize=True)
    out = {
        "hidden_states": x.to(dtype), "w13": w13.to(dtype), "w2": w2.to(dtype),
        "topk_weights": weights, "topk_ids": ids, "activation": case.activation,
        "w13_bias": None, "w2_bias": None, "expert_map": emap,
    }
    if case.bias:
        out["w13_bias"] = (torch.randn(local, rows, device=device) * 0.1).to(dtype)
        out["w2_bias"] = (torch.randn(local, case.K, device=device) * 0.1).to(dtype)
    return out


def oracle(inputs: dict) -> torch.Tensor:
    from oracle import experts64

    return experts64(
        inputs["hidden_states"], inputs["w13"], inputs["w2"], inputs["topk_weights"], inputs["topk_ids"],
        inputs["activation"], inputs["w13_bias"], inputs["w2_bias"], expert_map=inputs["expert_map"],
    )


def run(inputs: dict, backend: str, **kw) -> torch.Tensor:
    args = dict(inputs)
    x, w13, w2, w, ids = (args.pop(n) for n in ("hidden_states", "w13", "w2", "topk_weights", "topk_ids"))
    return moe.fused_experts(x, w13, w2, w, ids, backend=backend, **args, **kw)
