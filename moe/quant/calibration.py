"""Static activation scales from a calibration batch, as a calibration pass sets them.

Not re-exported by ``moe.quant`` (``moe.config`` imports ``moe.quant``, and this module the activation
table, which imports ``moe.config``): ``from moe.quant.calibration import calibrate_static_scales``."""

from __future__ import annotations

import torch

from ..activations import apply_activation
from ..config import ActivationSpec
from .schemes import ActivationScheme, scale_from_amax

__all__ = ["calibrate_static_scales"]


def calibrate_static_scales(
    x: torch.Tensor,
    w13: torch.Tensor,
    ids: torch.Tensor,
    scheme: ActivationScheme,
    activation: str | ActivationSpec = "silu",
    *,
    w13_bias: torch.Tensor | None = None,
    expert_map: torch.Tensor | None = None,
    per_expert: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a13_scale, a2_scale)`` fp32 for a batch ``x`` [M, K] routed by ``ids`` [M, k] (global ids, mapped
    through ``expert_map`` when given) to the float experts ``w13`` [E, rows, K].

    Over the rows each local expert receives: the absolute max of GEMM1's input, and of GEMM2's (the expert's
    unquantized GEMM1 output with its bias, after the activation, rounded to ``x``'s dtype as GEMM1 stores
    it), each over the format's largest value (448 for e4m3). ``per_expert``: [E] scales (an expert that got
    no rows: 1); otherwise [1], the max over the experts. One expert at a time in fp32, on ``x``'s device."""
    spec = ActivationSpec.parse(activation)
    local = expert_map.long()[ids.long()] if expert_map is not None else ids.long()
    amax1 = torch.zeros(w13.shape[0], dtype=torch.float32, device=x.device)
    amax2 = torch.zeros_like(amax1)
    for e in torch.unique(local).tolist():
        if e < 0:  # routed to another rank
            continue
        rows = x[(local == e).any(dim=1)].float()
        h = rows @ w13[e].float().t()
        if w13_bias is not None:
            h = h + w13_bias[e].float()
        amax1[e] = rows.abs().max()
        amax2[e] = apply_activation(h, spec).to(x.dtype).abs().max()
    if not per_expert:
        amax1, amax2 = amax1.max().reshape(1), amax2.max().reshape(1)
    return scale_from_amax(amax1, scheme.format), scale_from_amax(amax2, scheme.format)
