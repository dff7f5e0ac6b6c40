"""Random MoE problems for tests: moe.testing's cases and inputs, with the dtype given per call."""

from __future__ import annotations

import dataclasses

import torch

import moe
from moe.testing import ParityCase as Case
from moe.testing import experts_float64

__all__ = ["Case", "make_inputs", "oracle", "run"]


def make_inputs(case: Case, dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict:
    return moe.testing.make_inputs(dataclasses.replace(case, dtype=dtype), device)


def oracle(inputs: dict) -> torch.Tensor:
    return experts_float64(
        inputs["hidden_states"], inputs["w13"], inputs["w2"], inputs["topk_weights"], inputs["topk_ids"],
        inputs["activation"], inputs["w13_bias"], inputs["w2_bias"], expert_map=inputs["expert_map"],
    )


def run(inputs: dict, backend: str, **kw) -> torch.Tensor:
    args = dict(inputs)
    x, w13, w2, w, ids = (args.pop(n) for n in ("hidden_states", "w13", "w2", "topk_weights", "topk_ids"))
    return moe.fused_experts(x, w13, w2, w, ids, backend=backend, **args, **kw)
