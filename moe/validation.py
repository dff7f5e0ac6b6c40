"""Input checks shared by the functional API, the routing functions and the layer.

Two kinds of checks:
- *metadata checks* (dtypes, shapes, devices, config values) always run: they cost no device work;
- *value checks* (ids in range, finite router logits) read tensor values. On CPU tensors they always run.
  On GPU they would force a host synchronization in the hot path, so they run only in validation mode:
  the ``value_checks`` option (``MOE_VALIDATE=1``, ``moe.set_validation(True)``, or
  ``with moe.validation():``). They never run while ``torch.compile`` traces.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .options import options, override_options, set_options

__all__ = ["set_validation", "validation", "value_checks_enabled"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# the dtype spellings every moe command accepts, short and long (``--dtype``)
DTYPE_NAMES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "float32": torch.float32,
}


def set_validation(enabled: bool) -> None:
    """Turn the value checks on GPU tensors on or off for this process (the ``value_checks`` option)."""
    set_options(value_checks=bool(enabled))


@contextlib.contextmanager
def validation(enabled: bool = True) -> Iterator[None]:
    """Run a block with the value checks on GPU tensors on (or off)."""
    with override_options(value_checks=bool(enabled)):
        yield


def value_checks_enabled(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or options().value_checks


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


def check_finite_weights(topk_weights: torch.Tensor) -> None:
    """NaN and infinite routing weights are rejected (a masked token has weight 0, never NaN)."""
    if not value_checks_enabled(topk_weights) or topk_weights.numel() == 0:
        return
    bad = ~torch.isfinite(topk_weights)
    if bool(bad.any()):
        rows = bad.any(dim=-1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"topk_weights: {int(bad.sum())} NaN or infinite values (first rows {rows}); routing "
                         "weights must be finite")


def check_expert_map_values(expert_map: torch.Tensor, num_local: int, *, each_once: bool = False) -> None:
    """Each value is -1 (held elsewhere) or a local id in [0, num_local); with ``each_once``, every local id
    appears exactly once (how a layer's map is built). Run where a map is built; in ``fused_experts`` on
    CPU tensors or in validation mode (reading a CUDA map synchronizes)."""
    if expert_map.numel() == 0:
        raise ValueError("expert_map: empty; it has one entry per global expert")
    values = expert_map.detach().cpu().long()
    bad = (values < -1) | (values >= num_local)
    if bool(bad.any()):
        first = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"expert_map: values must be -1 (another rank) or a local id in [0, {num_local}) (w13 and w2 hold "
            f"{num_local} experts); global experts {first} map to {values[first].tolist()}"
        )
    if not each_once:
        return
    counts = torch.bincount(values[values >= 0], minlength=num_local)
    if bool((counts != 1).any()):
        wrong = (counts != 1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"expert_map: each local id 0..{num_local - 1} must appear exactly once (-1 elsewhere); "
                         f"local ids {wrong} appear {counts[wrong].tolist()} times")
