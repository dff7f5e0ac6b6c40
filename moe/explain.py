"""``moe.explain``: which backend a layer config would run on, and why the others would not, on this
machine's device or on a named card (``target="h200"``)."""

from __future__ import annotations

import torch

from .config import MoEConfig
from .contract import ExpertsProblem
from .registry import Decision, select_backend
from .target import DeviceTarget, current_target, named_target

__all__ = ["explain", "problem_from_config", "resolve_target"]


def resolve_target(device: str | torch.device | None = None, target: str | DeviceTarget | None = None) -> DeviceTarget:
    """A named card or a ``DeviceTarget``, else the target of ``device`` (default: cuda when available)."""
    if target is not None:
        return target if isinstance(target, DeviceTarget) else named_target(target)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but this machine has no CUDA device; pass target=NAME "
                         "(h100, h200, b200, a100, mi300x) to see what would run on such a card")
    return current_target(dev)


def problem_from_config(
    config: MoEConfig, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device | None = None,
    num_tokens: int = 1, target: str | DeviceTarget | None = None,
) -> ExpertsProblem:
    t = resolve_target(device, target)
    return ExpertsProblem(
        device_type="cpu" if t.vendor == "cpu" else ("cuda" if t.is_gpu else t.name), dtype=dtype,
        num_tokens=num_tokens, num_experts=config.num_experts, num_global_experts=config.num_experts,
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size, top_k=config.top_k,
        activation=config.activation, has_w13_bias=config.bias, has_w2_bias=config.bias,
        apply_router_weight_on_input=config.apply_router_weight_on_input, quant=config.quant, target=t,
    )


def explain(
    config: MoEConfig | ExpertsProblem,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
    target: str | DeviceTarget | None = None,
    num_tokens: int = 1,
    backend: str = "auto",
) -> Decision:
    """The decision ``backend`` would make for ``config``: ``print(moe.explain(cfg))`` lists each
    candidate with its reason; ``target="mi300x"`` asks about a card this machine does not have."""
    problem = config if isinstance(config, ExpertsProblem) else problem_from_config(
        config, dtype=dtype, device=device, num_tokens=num_tokens, target=target
    )
    return select_backend(problem, backend)
