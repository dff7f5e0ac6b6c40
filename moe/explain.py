"""``moe.explain``: which backend a layer config would run on, and why the others would not."""

from __future__ import annotations

import torch

from .backends.base import ExpertsProblem
from .config import MoEConfig
from .registry import Decision, select_backend

__all__ = ["explain", "problem_from_config"]


def problem_from_config(
    config: MoEConfig, *, dtype: torch.dtype = torch.bfloat16, device: str = "cuda", num_tokens: int = 1
) -> ExpertsProblem:
    return ExpertsProblem(
        device_type=torch.device(device).type, dtype=dtype, num_tokens=num_tokens,
        num_experts=config.num_experts, num_global_experts=config.num_experts,
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size, top_k=config.top_k,
        activation=config.activation, has_w13_bias=config.bias, has_w2_bias=config.bias,
        apply_router_weight_on_input=config.apply_router_weight_on_input, quant=config.quant,
    )


def explain(
    config: MoEConfig | ExpertsProblem,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    num_tokens: int = 1,
    backend: str = "auto",
) -> Decision:
    """The decision ``backend`` would make for ``config``: ``print(moe.explain(cfg))`` lists each
    candidate with its reason."""
    problem = config if isinstance(config, ExpertsProblem) else problem_from_config(
        config, dtype=dtype, device=device, num_tokens=num_tokens
    )
    return select_backend(problem, backend)
