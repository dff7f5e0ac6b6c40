"""The activation table shared by every backend: the torch definition of each activation.

Kernels implement the same formulas; this module is their reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import ActivationSpec

__all__ = ["apply_activation", "interleaved_to_gate_up"]


def _gate_act(name: str, g: torch.Tensor) -> torch.Tensor:
    if name in ("silu", "silu_no_mul"):
        return F.silu(g)
    if name in ("gelu", "gelu_no_mul"):
        return F.gelu(g)
    if name == "gelu_tanh":
        return F.gelu(g, approximate="tanh")
    if name == "relu2":
        return torch.square(F.relu(g))
    raise ValueError(f"activation: no elementwise definition for {name!r}")


def apply_activation(h: torch.Tensor, spec: ActivationSpec) -> torch.Tensor:
    """``h`` is the first projection's output: [..., 2N] (gate columns first) for gated activations,
    [..., N] otherwise. Returns [..., N] in ``h``'s dtype (compute it in fp32 for low precision)."""
    if not spec.gated:
        return _gate_act(spec.name, h)
    n = h.shape[-1] // 2
    gate, up = h[..., :n], h[..., n:]
    if spec.name == "swigluoai":
        gate = gate.clamp(max=spec.limit)
        up = up.clamp(min=-spec.limit, max=spec.limit)
        return (up + 1) * gate * torch.sigmoid(spec.alpha * gate)
    return _gate_act(spec.name, gate) * up


def interleaved_to_gate_up(w: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """Convert a checkpoint whose gate and up rows alternate (gpt-oss: gate = rows 0, 2, 4, ...;
    up = rows 1, 3, 5, ...) along ``dim`` into our layout, all gate rows then all up rows.
    Works for weights ([E, 2N, K] with dim=-2) and biases ([E, 2N] with dim=-1)."""
    pairs = w.unflatten(dim, (-1, 2))  # the pair axis sits at `dim` (negative) or `dim + 1`
    pair_dim = dim if dim < 0 else dim + 1
    return torch.cat([pairs.select(pair_dim, 0), pairs.select(pair_dim, 1)], dim=dim).contiguous()
