"""Host-side helpers for launches: integer helpers for grids and block sizes, and the launch options that
depend on the device's features.

Plain Python on purpose: recent triton makes ``triton.cdiv`` and ``triton.next_power_of_2`` constexpr
functions whose every call unwraps its arguments, a few microseconds each on the launch path.
"""

from __future__ import annotations

import torch

from ..options import options
from ..target import current_target

__all__ = ["cdiv", "chains", "device_index", "interpreting", "next_pow2", "pdl_option", "tensor_copies"]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 0 if n <= 0 else 1 << (n - 1).bit_length()  # as triton.next_power_of_2, 0 -> 0


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def interpreting() -> bool:
    """Whether Triton kernels run under the interpreter (CPU tests: ``TRITON_INTERPRET=1``)."""
    return current_target("cpu").triton_interpreter


def tensor_copies(device: torch.device) -> bool:
    """Whether tensor-descriptor loads run on ``device``: a device with a tensor memory accelerator, or
    the interpreter on CPU."""
    if device.type == "cpu":
        return interpreting()
    return device.type == "cuda" and current_target(device).tma


def chains(device: torch.device) -> bool:
    """Whether our kernels chain by programmatic dependent launch (the device has it, and the ``pdl``
    option, ``MOE_PDL``, is on). Each kernel of a layer's chain (routing, alignment, GEMM1, GEMM2,
    combine) lets the next launch as soon as all of its own programs have started, and each waits on the
    GPU for its predecessor before its first load: the launch gaps and the ramp of each grid hide behind
    the tail of the previous one, eager and under CUDA graphs. A program that waits holds a
    multiprocessor only after every program of the running kernel has been placed, so nothing the
    running kernel needs is taken."""
    return device.type == "cuda" and options().pdl and current_target(device).pdl


def pdl_option(pdl: bool) -> dict[str, bool]:
    """The launch option of a kernel that waits for its predecessor on the GPU (left out otherwise)."""
    return {"launch_pdl": True} if pdl else {}
