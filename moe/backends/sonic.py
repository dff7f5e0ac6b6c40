"""The SonicMoE backend (``sonic``): bf16 gated-SiLU experts through QuACK's grouped GEMMs (CuTe DSL), the
path vLLM's SonicMoE backend takes (it calls QuACK directly: the ``sonic-moe`` package pins torch <= 2.9.1).

State of this release: registered, not runnable. QuACK (``quack-kernels``, on ``nvidia-cutlass-dsl``) is
looked up without importing it; the calls into its grouped GEMMs are not written yet, so ``is_available()``
says so even where it is installed. ../shared/GPU.md says how its wheels reach the GPU machine.
"""

from __future__ import annotations

import importlib.util

import torch

from ..contract import ExpertsArgs, ExpertsProblem

__all__ = ["BACKEND"]

INSTALL = "pip install quack-kernels nvidia-cutlass-dsl (a QuACK release that imports with this torch)"


class SonicBackend:
    name = "sonic"

    @property
    def priority(self) -> int:
        return 8 if torch.cuda.is_available() else -30

    def priority_for(self, target) -> int:
        return 8 if target.vendor == "cuda" else -30  # below triton until measured

    def is_available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("quack") is None:
            return False, f"QuACK is not installed; {INSTALL}"
        if importlib.util.find_spec("cutlass") is None:
            return False, f"QuACK needs the CuTe DSL (the cutlass package of nvidia-cutlass-dsl); {INSTALL}"
        return False, "QuACK is here, but this release does not call its grouped GEMMs yet (registered only)"

    def supports(self, problem: ExpertsProblem) -> tuple[bool, str]:
        target = problem.target
        if target is None or target.vendor != "cuda" or not (target.wgmma or target.tcgen05):
            where = target.describe() if target is not None else "no device target"
            return False, f"QuACK's grouped GEMMs need Hopper (wgmma) or Blackwell datacenter (tcgen05) MMA; {where}"
        if problem.dtype != torch.bfloat16:
            return False, f"bfloat16 only, got {problem.dtype}"
        if problem.activation.name != "silu":
            return False, f"the SonicMoE path computes gated SiLU experts, got {problem.activation.name!r}"
        if problem.has_w13_bias or problem.has_w2_bias or problem.has_expert_map:
            return False, "expert biases and expert maps are not implemented"
        return True, "ok"

    def apply(self, args: ExpertsArgs, problem: ExpertsProblem, out: torch.Tensor) -> None:
        raise NotImplementedError(f"sonic: {self.is_available()[1]}")


BACKEND = SonicBackend()
