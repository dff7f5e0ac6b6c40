"""Input checks shared by the functional API, the routing functions and the layer.

Two kinds of checks:
- *metadata checks* (dtypes, shapes, devices, config values) always run: they cost no device work;
- *value checks* (ids in range, finite router logits) read tensor values. On CPU tensors they always run.
  On GPU they would force a host synchronization in the hot path, so they run only in validation mode:
  ``MOE_VALIDATE=1`` in the environment, ``moe.set_validation(True)``, or ``with moe.validation():``.
  They never run while ``torch.compile`` traces.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

__all__ = ["set_validation", "validation", "value_checks_enabled"]

_state = {"enabled": os.environ.get("MOE_VALIDATE", "0") not in ("", "0", "false", "False")}

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def set_validation(enabled: bool) -> None:
    """Turn the value checks on GPU tensors on or off for this process."""
    _state["enabled"] = bool(enabled)


@contextlib.contextmanager
def validation(enabled: bool = True) -> Iterator[None]:
    """Run a block with the value checks on GPU tensors on (or off)."""
    old = _state["enabled"]
    _state["enabled"] = enabled
    try:
        yield
    finally:
        _state["enabled"] = old


def value_checks_enabled(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or _state["enabled"]


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
        raise TypeError(f"{name}: dtype {str(t.dtype).removeprefix('torch.')} is not allowed; use {allowed}")


def check_ndim(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor {layout}, got shape {tuple(t.shape)}")


def check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], layout: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)} {layout}, got {tuple(t.shape)}")


def check_same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(
                f"{name} is on {t.device} but {ref_name} is on {ref.device}; move all tensors to one device"
            )


def check_top_k(top_k: int, num_experts: int) -> None:
    if not isinstance(top_k, int) or isinstance(top_k, bool):
        raise TypeError(f"top_k: expected an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} is out of range; it must be between 1 and num_experts={num_experts}")


def check_finite_logits(router_logits: torch.Tensor) -> None:
    """NaN and +inf router logits are rejected (-inf is a legal mask). See docs/configuration.md."""
    if not value_checks_enabled(router_logits):
        return
    bad = torch.isnan(router_logits) | torch.isposinf(router_logits)
    if bool(bad.any()):
        rows = bad.any(dim=-1).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"router_logits: {int(bad.sum())} NaN or +inf values (first rows {rows}); "
            "-inf is allowed as a mask, NaN and +inf are not"
        )


def check_ids_range(topk_ids: torch.Tensor, num_experts: int) -> None:
    if not value_checks_enabled(topk_ids) or topk_ids.numel() == 0:
        return
    lo, hi = int(topk_ids.min()), int(topk_ids.max())
    if lo < 0 or hi >= num_experts:
        raise ValueError(
            f"topk_ids: values must be in [0, {num_experts}) (global expert ids), got min {lo} and max {hi}"
        )
