"""The CUTLASS FP4 backend (``nvfp4_w4a4``, ``mxfp4_w4a4``): FP4 weights and activations through CUTLASS's
SM100 block-scaled grouped GEMM. Host side only in this release.

What is here, in pure torch (so it is tested on CPU against element-by-element references):
- **activation quantization to FP4** (e2m1, two values a byte, the first in the low nibble):
  ``nvfp4``: one float8_e4m3fn scale per 16 values and one fp32 global scale; ``mxfp4`` (OCP MX): one
  power-of-two UE8M0 scale per 32 values;
- **the scale-factor layout** CUTLASS's SM100 block-scaled MMA reads (``Sm1xxBlockScaledConfig``, K-major
  scale atom ``((32, 4), (SFVec, 4)) : ((16, 4), (0, 1))``): 128-row x 4-scale tiles of 512 bytes, tiles
  row-tile-major; inside a tile, row r and scale column c at byte ``(r % 32) * 16 + (r // 32) * 4 + c``;
  rows padded to 128 and scale columns to 4 with zeros. Per expert, each group starts on its own tile;
- **problem sizes** ([E, 3] int32: rows of each expert, N, K) and **pointer arrays** ([E] int64 start
  addresses of each expert's operands) come from ``moe.kernels.grouped`` (shared with ``cutlass``);
  here, each expert's first scale row (:func:`expert_scale_offsets`).

What is not: a runnable kernel. These GEMMs need compute capability 10.x (tcgen05 with block-scaled FP4);
no SM100 GPU has been available to this project. The two CUTLASS instantiations it would launch are in
``_cutlass/grouped_gemm_fp4_sm100.cu`` (compile-checked for sm_100a only: no binding, never run), and
``supports()`` always refuses with the reason. ``moe.quant`` has no FP4 weight format yet (another change
adds it), so no call carries these schemes today.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..contract import ExpertsArgs, ExpertsProblem
from ..kernels.grouped import expert_counts
from ..quant.weights import pack_nibbles, unpack_nibbles

__all__ = ["BACKEND", "E2M1_MAX", "E2M1_VALUES", "Fp4Format", "dequantize_fp4", "expert_scale_offsets",
           "quantize_fp4", "round_to_e2m1", "swizzle_scales", "swizzled_scale_shape"]

Fp4Format = Literal["nvfp4", "mxfp4"]
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # the magnitudes of codes 0..7
E2M1_MAX = 6.0
E4M3_MAX = 448.0
BLOCK = {"nvfp4": 16, "mxfp4": 32}
SF_ROWS, SF_COLS = 128, 4  # one scale tile: 128 rows x 4 scale columns
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """The e2m1 code (0..15: sign in bit 3) nearest to each value, ties to the even code, saturating at 6."""
    mag = x.abs().float()
    mids = torch.tensor(_MIDPOINTS, device=x.device)
    code = torch.bucketize(mag, mids)  # a tie rounds down here
    tie = (code < len(_MIDPOINTS)) & (mag == mids[code.clamp(max=len(_MIDPOINTS) - 1)]) & (code % 2 == 1)
    code = code + tie.long()  # ties between an odd code and the next go up, to the even one
    return (code | ((x < 0).long() << 3)).to(torch.uint8)


def _check_input(x: torch.Tensor, fmt: str) -> int:
    if fmt not in BLOCK:
        raise ValueError(f"fmt: expected one of {', '.join(BLOCK)}, got {fmt!r}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x: expected a float [rows, K] tensor, got {x.dtype} of shape {tuple(x.shape)}")
    block = BLOCK[fmt]
    if x.shape[1] % block:
        raise ValueError(f"x: {fmt} quantizes blocks of {block} columns; K={x.shape[1]} is not a multiple")
    return block


def quantize_fp4(x: torch.Tensor, fmt: Fp4Format, global_scale: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [rows, K] -> (packed uint8 [rows, K/2], scales [rows, K/block]).

    nvfp4: scales float8_e4m3fn, ``global_scale`` (fp32 [1]) multiplies x first, so ``x ~= q * scale /
    global_scale`` (the usual choice is ``448 * 6 / amax(x)``). mxfp4: scales are UE8M0 exponents (uint8,
    bias 127): ``2^(floor(log2(amax)) - 2)`` per block (OCP MX: the largest e2m1 exponent is 2)."""
    block = _check_input(x, fmt)
    xb = x.float().reshape(x.shape[0], -1, block)  # [rows, blocks, block]
    if fmt == "nvfp4":
        if global_scale is None:
            raise ValueError("global_scale: nvfp4 needs the fp32 global scale (e.g. 448 * 6 / amax(x))")
        xb = xb * global_scale.float()
        amax = xb.abs().amax(-1, keepdim=True)
        sf = (amax / E2M1_MAX).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
        denom = sf.float()
        stored = sf.squeeze(-1)
    else:
        amax = xb.abs().amax(-1, keepdim=True)
        exp = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -127))
        exp = exp.clamp(-127, 127)
        denom = torch.exp2(exp)
        stored = (exp + 127).to(torch.uint8).squeeze(-1)
    q = torch.where(denom > 0, xb / denom, torch.zeros_like(xb))
    return pack_nibbles(round_to_e2m1(q).reshape(x.shape)), stored


def dequantize_fp4(packed: torch.Tensor, scales: torch.Tensor, fmt: Fp4Format,
                   global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 values of :func:`quantize_fp4`'s output."""
    codes = unpack_nibbles(packed).long()
    values = torch.tensor(E2M1_VALUES, device=packed.device)[codes & 7]
    values = torch.where(codes >= 8, -values, values)
    if fmt == "nvfp4":
        s = scales.float() / (global_scale.float() if global_scale is not None else 1.0)
    else:
        s = torch.exp2(scales.float() - 127)
    return values * s.repeat_interleave(BLOCK[fmt], dim=-1)


def swizzled_scale_shape(rows: int, scale_cols: int) -> tuple[int, int]:
    """Rows padded to 128, scale columns to 4: the shape :func:`swizzle_scales` returns."""
    return -(-rows // SF_ROWS) * SF_ROWS, -(-scale_cols // SF_COLS) * SF_COLS


def swizzle_scales(sf: torch.Tensor) -> torch.Tensor:
    """Scales [rows, cols] (one byte each) in the SM100 block-scaled layout, as a [rows_pad, cols_pad]
    tensor whose flat bytes are the tiles (see the module docstring); padding is zero."""
    if sf.dim() != 2 or sf.element_size() != 1:
        raise ValueError(f"sf: expected one-byte scales [rows, cols], got {sf.dtype} of shape {tuple(sf.shape)}")
    rows, cols = sf.shape
    rp, cp = swizzled_scale_shape(rows, cols)
    padded = torch.zeros(rp, cp, dtype=torch.uint8, device=sf.device)
    padded[:rows, :cols] = sf.view(torch.uint8)
    tiles = padded.view(rp // SF_ROWS, 4, 32, cp // SF_COLS, SF_COLS)  # [row tile, r // 32, r % 32, col tile, c]
    out = tiles.permute(0, 3, 2, 1, 4).contiguous().view(rp, cp)
    return out.view(sf.dtype)


def expert_scale_offsets(expert_ends: torch.Tensor) -> torch.Tensor:
    """[E + 1] int64 first scale row of each expert when each expert's rows are padded to 128 (its
    scales start on their own tile), and the total rows last; on the device, from the alignment's
    [E] cumulative row ends."""
    counts = expert_counts(expert_ends)
    padded = -(-counts // SF_ROWS) * SF_ROWS
    return torch.cat((padded.new_zeros(1), padded.cumsum(0)))


FP4_SCHEMES = ("nvfp4_w4a4", "mxfp4_w4a4")
NOT_BUILT = "the SM100 kernel is not built in this release (host side only; no compute capability 10.x GPU here)"


class CutlassFp4Backend:
    name = "cutlass_fp4"
    schemes = FP4_SCHEMES
    priority = 12

    def priority_for(self, target) -> int:
        return 12 if target.vendor == "cuda" else -30

    def is_available(self) -> tuple[bool, str]:
        # unavailable everywhere: nothing here can run it. The reason leads with the hardware it needs.
        return False, ("needs compute capability 10.x (SM100 block-scaled FP4 MMA) and its kernel: "
                       f"{NOT_BUILT}; moe.quant has no FP4 weight format yet")

    def supports(self, problem: ExpertsProblem) -> tuple[bool, str]:
        target = problem.target
        if target is None or not (target.tcgen05 and target.fp4_mma):
            where = target.describe() if target is not None else "no device target"
            return False, (f"needs compute capability 10.x (SM100 block-scaled FP4 MMA: tcgen05, fp4_mma); {where}; "
                           f"{NOT_BUILT}")
        k, n = problem.hidden_size, problem.intermediate_size
        if k % 128 or n % 128:
            return False, f"FP4 grouped GEMMs here need N and K multiples of 128, got N={n}, K={k}"
        return False, NOT_BUILT

    def apply(self, args: ExpertsArgs, problem: ExpertsProblem, out: torch.Tensor) -> None:
        raise NotImplementedError(f"cutlass_fp4: {NOT_BUILT}")


BACKEND = CutlassFp4Backend()
