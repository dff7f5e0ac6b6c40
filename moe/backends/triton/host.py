"""Host-side helpers for launches: integer helpers for grids and block sizes, and the device checks that
decide launch options.

Plain Python on purpose: recent triton makes ``triton.cdiv`` and ``triton.next_power_of_2`` constexpr
functions whose every call unwraps its arguments, a few microseconds each on the launch path.
"""

from __future__ import annotations

import functools
import os

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 0 if n <= 0 else 1 << (n - 1).bit_length()  # as triton.next_power_of_2, 0 -> 0


@functools.cache
def capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def hopper(device: torch.device) -> bool:
    """A CUDA device of compute capability 9.0 or later (tensor copy engine, programmatic launch)."""
    return device.type == "cuda" and capability(device_index(device))[0] >= 9


def chains(device: torch.device) -> bool:
    """Whether our kernels chain by programmatic dependent launch (Hopper and later; ``MOE_PDL=0`` turns
    it off). Each kernel of a layer's chain (routing, alignment, GEMM1, GEMM2, combine) lets the next
    launch as soon as all of its own programs have started, and each waits on the GPU for its
    predecessor before its first load: the launch gaps and the ramp of each grid hide behind the tail
    of the previous one, eager and under CUDA graphs. A program that waits holds a multiprocessor only
    after every program of the running kernel has been placed, so nothing the running kernel needs is
    taken."""
    return os.environ.get("MOE_PDL", "1") != "0" and hopper(device)


def pdl_option(pdl: bool) -> dict[str, bool]:
    """The launch option of a kernel that waits for its predecessor on the GPU (left out otherwise)."""
    return {"launch_pdl": True} if pdl else {}
