"""Kernel launches with less host time than Triton's launcher.

``kernel[grid](*args)`` binds and specializes every argument on every call: tens of microseconds on a
busy host, and a layer launches up to five kernels. Here the first call with a given specialization
key goes through Triton (compiling if needed), is checked against the device's shared memory, and
keeps the compiled kernel; later calls with the same key launch that compiled kernel directly.

The key is at least as fine as Triton's own specialization, so a kept kernel is one Triton would have
picked: the constexpr arguments and launch options, each tensor's dtype and 16-byte alignment, each
integer's class (equal to 1, a multiple of 16, fits 32 bits), each tensor descriptor's dtype and box,
and every other argument's type.

Calling a compiled kernel directly depends on Triton internals (its compiled-kernel launcher and its
specialization rules), so it runs only on the Triton versions in :data:`VERIFIED_TRITON`, whose GPU
bitwise test against Triton's launcher passed (``test_gpu_direct_launch_matches_triton_launcher``); any
other version uses Triton's launcher, and ``direct_launch_status()`` (printed by ``moe backends``) says
why. The ``direct_launch`` option (``MOE_DIRECT_LAUNCH=0``) sends every launch through Triton's launcher,
after the same first-launch check. The CPU interpreter always uses Triton's launcher.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..options import options, options_version, register_cache
from ..target import current_target
from .host import device_index

__all__ = ["VERIFIED_TRITON", "compiled_kernels", "direct_launch_enabled", "direct_launch_status", "launch",
           "launch_counts"]

# Triton releases on which direct launches passed the GPU bitwise test against Triton's launcher
VERIFIED_TRITON = ("3.6.0",)

_compiled: dict[tuple, tuple[Any, tuple]] = {}  # key -> (compiled kernel, constexpr values in order)
register_cache(_compiled.clear)
_counts = {"direct": 0, "triton": 0}


@functools.cache
def _triton_version() -> str:
    import triton

    return triton.__version__


def direct_launch_status() -> tuple[bool, str]:
    """Whether CUDA launches skip Triton's launcher, and why (not)."""
    if not options().direct_launch:
        return False, "off (option direct_launch / MOE_DIRECT_LAUNCH=0): Triton's launcher"
    try:
        version = _triton_version()
    except ImportError:
        return False, "triton is not installed"
    if version not in VERIFIED_TRITON:
        return False, (f"off: triton {version} is not a verified release ({', '.join(VERIFIED_TRITON)}); "
                       "Triton's launcher is used")
    return True, f"on (triton {version} verified bitwise on a GPU)"


_enabled: dict[int, bool] = {}  # by options version: the check sits on every launch
register_cache(_enabled.clear)


def direct_launch_enabled() -> bool:
    version = options_version()
    on = _enabled.get(version)
    if on is None:
        on = _enabled[version] = direct_launch_status()[0]
    return on


def compiled_kernels() -> list[Any]:
    """The compiled kernels kept so far (one per specialization key): what ``benchmarks/disasm.py`` reads."""
    return [compiled for compiled, _ in _compiled.values()]


def launch_counts() -> dict[str, int]:
    """How many launches took each path since the process started (tests read it)."""
    return dict(_counts)


def _smem_limit(index: int) -> int:
    return current_target(torch.device("cuda", index)).smem_per_block


def _spec(args: tuple) -> tuple:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append((a.dtype, a.data_ptr() % 16 == 0))
        elif type(a) is int:
            out.append((a == 1, a % 16 == 0, -0x80000000 <= a <= 0x7FFFFFFF))
        elif hasattr(a, "block_shape") and hasattr(a, "base"):  # a host tensor descriptor (TMA)
            out.append((a.base.dtype, tuple(a.block_shape), len(a.shape), a.base.data_ptr() % 16 == 0))
        else:
            out.append(type(a))
    return tuple(out)


def launch(kernel: Any, grid: tuple[int, ...], device: torch.device, *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``: runtime arguments positional, constexprs and launch options
    (``num_warps``, ``num_stages``) by keyword. A kept compiled kernel takes every argument in the
    kernel's order, constexprs included, and a three-dimensional grid."""
    if device.type != "cuda":
        _counts["triton"] += 1
        kernel[grid](*args, **kwargs)
        return
    key = (kernel, device.index, tuple(kwargs.items()), _spec(args))
    hit = _compiled.get(key)
    if hit is None:  # the first launch of this specialization: compile, check its shared memory, keep it
        compiled = _compile_checked(kernel, grid, device, args, kwargs)
        hit = _compiled[key] = (compiled, tuple(kwargs[name] for name in kernel.arg_names[len(args):]))
    if direct_launch_enabled():
        compiled, tail = hit
        compiled[(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)](*args, *tail)
        _counts["direct"] += 1
        return
    _counts["triton"] += 1
    kernel[grid](*args, **kwargs)


def _compile_checked(kernel: Any, grid: tuple[int, ...], device: torch.device, args: tuple, kwargs: dict) -> Any:
    """Compile (or find) the kernel for these arguments and check its shared memory before any launch."""
    compiled = kernel.warmup(*args, grid=grid, **kwargs)
    shared = getattr(getattr(compiled, "metadata", None), "shared", 0)
    limit = _smem_limit(device_index(device))
    if shared > limit:
        options = {k: v for k, v in kwargs.items() if k.isupper() or k.startswith("num_")}
        raise ValueError(
            f"{getattr(kernel, '__name__', kernel)}: the compiled kernel needs {shared} bytes of shared memory, "
            f"the device allows {limit}; choose a smaller kernel config ({options})"
        )
    return compiled
