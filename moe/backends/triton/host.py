"""Host-side integer helpers for launch grids and block sizes.

Plain Python on purpose: recent triton makes ``triton.cdiv`` and ``triton.next_power_of_2`` constexpr
functions whose every call unwraps its arguments, a few microseconds each on the launch path.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 0 if n <= 0 else 1 << (n - 1).bit_length()  # as triton.next_power_of_2, 0 -> 0
