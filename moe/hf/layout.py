"""Expert weights between a transformers experts module's layout and FusedMoE's.

FusedMoE holds ``w13`` [E, 2N, K] (gate rows then up rows), ``w2`` [E, K, N] and optional biases
``w13_bias`` [E, 2N], ``w2_bias`` [E, K]. A :class:`CheckpointLayout` converts both ways, so a replaced
block reads its weights from the original module and writes its state dict in the original format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..activations import interleaved_to_gate_up

__all__ = ["OURS", "CheckpointLayout"]

OURS = ("w13", "w2", "w13_bias", "w2_bias")


def _gate_up_to_interleaved(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of ``interleaved_to_gate_up`` for a negative ``dim``: rows gate0, up0, gate1, up1, ..."""
    gate, up = w.chunk(2, dim=dim)
    return torch.stack([gate, up], dim=dim).flatten(dim - 1, dim)


@dataclass(frozen=True)
class CheckpointLayout:
    """How an experts module stores its weights (names relative to the module).

    - ``fused`` (transformers' standard): ``gate_up_proj`` [E, 2N, K] and ``down_proj`` [E, K, N], or
      [E, K, 2N] and [E, N, K] when ``transposed``; gate and up alternate along 2N when ``interleaved``
      (gpt-oss); optional ``gate_up_proj_bias`` [E, 2N] and ``down_proj_bias`` [E, K].
    - ``dbrx``: ``mlp.w1`` (gate), ``mlp.v1`` (up) and ``mlp.w2`` (down, transposed), each [E * N, K].
    """

    kind: Literal["fused", "dbrx"] = "fused"
    transposed: bool = False
    interleaved: bool = False
    has_bias: bool = False
    num_experts: int = 0  # dbrx: to split the [E * N, K] tensors

    def original_keys(self) -> tuple[str, ...]:
        if self.kind == "dbrx":
            return ("mlp.w1", "mlp.v1", "mlp.w2")
        bias = ("gate_up_proj_bias", "down_proj_bias") if self.has_bias else ()
        return ("gate_up_proj", "down_proj", *bias)

    def shared(self) -> frozenset[str]:
        """Which of our tensors are the original ones as they are (same storage)."""
        if self.kind == "dbrx":
            return frozenset()
        names = set()
        if not (self.transposed or self.interleaved):
            names.add("w13")
        if not self.transposed:
            names.add("w2")
        if self.has_bias:
            names |= {"w2_bias"} if self.interleaved else {"w13_bias", "w2_bias"}
        return frozenset(names)

    def to_ours(self, original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """Original tensors (by :meth:`original_keys`) -> ours; no copy where :meth:`shared` says so."""
        if self.kind == "dbrx":
            w1, v1, w2 = (original[k].view(self.num_experts, -1, original[k].shape[-1]) for k in self.original_keys())
            return {"w13": torch.cat([w1, v1], dim=1), "w2": w2.transpose(1, 2).contiguous(),
                    "w13_bias": None, "w2_bias": None}
        w13, w2 = original["gate_up_proj"], original["down_proj"]
        b13, b2 = original.get("gate_up_proj_bias"), original.get("down_proj_bias")
        if self.transposed:
            w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
        if self.interleaved:
            w13 = interleaved_to_gate_up(w13, dim=-2)
            b13 = interleaved_to_gate_up(b13, dim=-1) if b13 is not None else None
        return {"w13": w13.contiguous(), "w2": w2.contiguous(), "w13_bias": b13, "w2_bias": b2}

    def to_original(self, ours: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """Ours -> the original names and layout (the inverse of :meth:`to_ours`)."""
        w13, w2, b13, b2 = (ours[k] for k in OURS)
        assert w13 is not None and w2 is not None
        if self.kind == "dbrx":
            n, k = w13.shape[1] // 2, w13.shape[2]
            return {"mlp.w1": w13[:, :n].reshape(-1, k), "mlp.v1": w13[:, n:].reshape(-1, k),
                    "mlp.w2": w2.transpose(1, 2).reshape(-1, k)}
        if self.interleaved:
            w13 = _gate_up_to_interleaved(w13, dim=-2)
            b13 = _gate_up_to_interleaved(b13, dim=-1) if b13 is not None else None
        if self.transposed:
            w13, w2 = w13.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
        out = {"gate_up_proj": w13, "down_proj": w2}
        if self.has_bias:
            assert b13 is not None and b2 is not None
            out.update(gate_up_proj_bias=b13, down_proj_bias=b2)
        return out
