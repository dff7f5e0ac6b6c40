"""Quantized dense MLPs (DeepSeek's shared experts), run through the routed experts' schemes and backends.

A :class:`QuantizedMLP` is a one-expert ``FusedMoE`` that every token is routed to with weight 1, so a
quantized shared expert uses exactly the storage, loader and kernels of the routed ones.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..config import ActivationSpec
from ..layer import FusedMoE
from .loader import CheckpointInfo, checkpoint_scheme, load_experts
from .source import TensorSource

__all__ = ["QuantizedMLP", "load_mlp"]


class QuantizedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with quantized weights (``quant``: a name of ``moe.quant.NAMES``, or
    None for float). Parameters live in ``self.mlp``, a one-expert :class:`~moe.FusedMoE`."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, activation: str | ActivationSpec = "silu",
                 quant: str | None = None, params_dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.mlp = FusedMoE(1, 1, hidden_size, intermediate_size, activation=activation, quant=quant,
                            params_dtype=params_dtype, device=device, backend=backend, gate=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [T, K]
        ones = torch.ones(flat.shape[0], 1, dtype=torch.float32, device=flat.device)
        ids = torch.zeros(flat.shape[0], 1, dtype=torch.int32, device=flat.device)
        return self.mlp.experts(flat, ones, ids).view(x.shape)


def load_mlp(source: str | os.PathLike[str] | Mapping[str, torch.Tensor] | TensorSource, prefix: str,
             hidden_size: int, intermediate_size: int, *, activation: str | ActivationSpec = "silu",
             params_dtype: torch.dtype | None = None, backend: str = "auto",
             quantization_config: dict[str, Any] | None = None) -> tuple[QuantizedMLP, CheckpointInfo]:
    """A :class:`QuantizedMLP` with the dense MLP under ``prefix`` (``{prefix}.gate_proj.weight``, ...)
    loaded in the checkpoint's scheme."""
    quant = checkpoint_scheme(source, prefix, 1, quantization_config=quantization_config)
    module = QuantizedMLP(hidden_size, intermediate_size, activation=activation, quant=quant,
                          params_dtype=params_dtype, device="meta", backend=backend)
    info = load_experts(module.mlp, source, prefix, quantization_config=quantization_config)
    return module, info
