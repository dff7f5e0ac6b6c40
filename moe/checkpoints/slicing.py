"""The part of a checkpoint one layer holds (its experts, its tensor-parallel rows), shared by the loader
and the codec formats."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerSlice:
    """The part of the checkpoint this layer holds: its global experts and its rows [r0, r0 + n) of the
    intermediate dim (of n_global); ``k`` the hidden size, ``parts`` 2 for a gated w13."""

    experts: tuple[int, ...]
    num_experts: int
    r0: int
    n: int
    n_global: int
    k: int
    parts: int

    @property
    def tp(self) -> bool:
        return self.n != self.n_global

    @property
    def projections(self) -> tuple[int, ...]:
        """The projections stored: w1 (gate), w3 (up, gated only) and w2, as 0, 1, 2."""
        return (0, 1, 2) if self.parts == 2 else (0, 2)
