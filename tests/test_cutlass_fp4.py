"""The cutlass_fp4 backend's host side on CPU, against references written from the formats' definitions:
e2m1 rounding (nearest, ties to even, saturating), NVFP4 and MXFP4 block scales, CUTLASS's SM100
block-scaled scale-factor layout (K-major atom ((32, 4), (SFVec, 4)) : ((16, 4), (0, 1)), 512-byte tiles),
problem sizes and pointer arrays; and its verdicts (the kernel is not built: no SM100 GPU here)."""

from __future__ import annotations

import pytest
import torch

import moe
from moe.backends import cutlass_fp4 as fp4
from moe.config import ActivationSpec
from moe.contract import ExpertsProblem
from moe.kernels import grouped
from moe.target import TARGETS


def _nearest_code_ref(v: float) -> int:
    """Brute force: the grid value nearest to |v| (saturating), on a tie the one with an even code."""
    mag = min(abs(v), fp4.E2M1_MAX)
    dist = [abs(mag - g) for g in fp4.E2M1_VALUES]
    best = min(dist)
    code = min((c for c, d in enumerate(dist) if d == best), key=lambda c: (c % 2, c))
    return code | (8 if v < 0 else 0)


def test_e2m1_rounding_matches_the_brute_force_reference():
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    values = torch.tensor([0.0, -0.0, 0.1, 6.0, 7.5, 100.0, -5.0, -2.6, *ties, *(-t for t in ties)])
    values = torch.cat((values, torch.randn(500) * 3))
    got = fp4.round_to_e2m1(values).tolist()
    want = [_nearest_code_ref(v) for v in values.tolist()]
    # -0.0 has the sign bit of the float but rounds to code 0 either way in the value it stands for
    assert [g & 7 for g in got] == [w & 7 for w in want]
    assert [g for g, v in zip(got, values.tolist(), strict=True) if v < 0 and g & 7] == \
        [w for w, v in zip(want, values.tolist(), strict=True) if v < 0 and w & 7]
    # ties go to the even code: 0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 2.5 -> 2.0, 5 -> 4; beyond 6 saturates
    assert fp4.round_to_e2m1(torch.tensor([0.25, 0.75, 1.25, 2.5, 5.0, 9.0])).tolist() == [0, 2, 2, 4, 6, 7]


def test_packing_puts_the_first_value_in_the_low_nibble():
    x = torch.tensor([[1.0, -6.0] * 16])  # codes 2 and 15
    packed, _ = fp4.quantize_fp4(x, "mxfp4")
    assert packed.dtype == torch.uint8 and packed.shape == (1, 16)
    sf_exp = int(fp4.quantize_fp4(x, "mxfp4")[1][0, 0]) - 127
    assert sf_exp == 2 - 2  # amax 6: floor(log2 6) - 2 = 0
    assert int(packed[0, 0]) == (2 | (15 << 4))


def test_nvfp4_block_scales_and_round_trip():
    x = torch.randn(8, 64)
    gs = torch.tensor([fp4.E4M3_MAX * fp4.E2M1_MAX]) / x.abs().max()
    packed, sf = fp4.quantize_fp4(x, "nvfp4", gs)
    assert sf.dtype == torch.float8_e4m3fn and sf.shape == (8, 4)
    want = (x.reshape(8, 4, 16).abs().amax(-1) * gs / 6).to(torch.float8_e4m3fn)
    assert torch.equal(sf.float(), want.float())
    back = fp4.dequantize_fp4(packed, sf, "nvfp4", gs)
    assert (back - x).norm() / x.norm() < 0.12  # 4-bit values with 16-element scales
    assert ((back - x).abs() <= x.reshape(8, 4, 16).abs().amax(-1).repeat_interleave(16, -1) / 6 * 1.1).all()


def test_mxfp4_scales_are_ocp_power_of_two_exponents():
    x = torch.randn(4, 64) * 10
    packed, sf = fp4.quantize_fp4(x, "mxfp4")
    assert sf.dtype == torch.uint8 and sf.shape == (4, 2)
    amax = x.reshape(4, 2, 32).abs().amax(-1)
    assert torch.equal(sf.long() - 127, (torch.floor(torch.log2(amax)) - 2).long())
    back = fp4.dequantize_fp4(packed, sf, "mxfp4")
    assert (back - x).norm() / x.norm() < 0.2


@pytest.mark.parametrize(("kw", "needle"), [
    ({"x": torch.randn(2, 24), "fmt": "nvfp4", "global_scale": torch.ones(1)}, "multiple"),
    ({"x": torch.randn(2, 32), "fmt": "nvfp8"}, "fmt"),
    ({"x": torch.randn(2, 32), "fmt": "nvfp4"}, "global_scale"),
    ({"x": torch.randn(2, 2, 32), "fmt": "mxfp4"}, "x: expected"),
])
def test_bad_input_names_the_parameter(kw, needle):
    with pytest.raises(ValueError, match=needle):
        fp4.quantize_fp4(**kw)


def _swizzle_ref(sf: torch.Tensor) -> torch.Tensor:
    """Element by element from the CuTe layout: tile (row // 128, col // 4), row-tile-major, 512 bytes a
    tile; inside, (r % 32) * 16 + ((r // 32) % 4) * 4 + c % 4."""
    rows, cols = sf.shape
    rp, cp = fp4.swizzled_scale_shape(rows, cols)
    flat = torch.zeros(rp * cp, dtype=torch.uint8)
    src = sf.view(torch.uint8)
    for r in range(rows):
        for c in range(cols):
            tile = (r // 128) * (cp // 4) + c // 4
            flat[tile * 512 + (r % 32) * 16 + ((r // 32) % 4) * 4 + c % 4] = src[r, c]
    return flat


@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (128, 4), (130, 7), (300, 16)])
def test_scale_layout_matches_the_cute_layout(rows, cols):
    sf = torch.randint(1, 255, (rows, cols), dtype=torch.uint8)
    got = fp4.swizzle_scales(sf)
    assert got.shape == fp4.swizzled_scale_shape(rows, cols)
    assert torch.equal(got.reshape(-1), _swizzle_ref(sf))


def test_scale_layout_keeps_the_e4m3_dtype():
    sf = torch.rand(5, 3).to(torch.float8_e4m3fn)
    got = fp4.swizzle_scales(sf)
    assert got.dtype == torch.float8_e4m3fn
    assert torch.equal(got.view(torch.uint8).reshape(-1), _swizzle_ref(sf))


def test_problem_sizes_pointer_arrays_and_scale_offsets():
    ends = torch.tensor([3, 3, 140, 141], dtype=torch.int32)  # counts 3, 0, 137, 1
    sizes = grouped.problem_sizes(ends, 256, 512)
    assert sizes.dtype == torch.int32 and sizes.tolist() == [[3, 256, 512], [0, 256, 512], [137, 256, 512],
                                                             [1, 256, 512]]
    assert fp4.expert_scale_offsets(ends).tolist() == [0, 128, 128, 384, 512]
    a = torch.zeros(141, 256, dtype=torch.uint8)  # FP4 rows of K=512: 256 bytes
    starts = torch.tensor([0, 3, 3, 140])
    ptrs = grouped.pointer_array(a, starts, a.stride(0) * a.element_size())
    assert ptrs.dtype == torch.int64
    assert ptrs.tolist() == [a[int(s)].data_ptr() for s in starts]
    with pytest.raises(ValueError, match="row_bytes"):
        grouped.pointer_array(a, starts, 0)
    with pytest.raises(ValueError, match="n, k"):
        grouped.problem_sizes(ends, 0, 512)
    assert grouped.expert_starts(ends).tolist() == [0, 3, 3, 140]
    assert grouped.leading_dims(4, 512, torch.device("cpu")).tolist() == [512] * 4
    with pytest.raises(ValueError, match="ld"):
        grouped.leading_dims(4, 0, torch.device("cpu"))


def _problem(target) -> ExpertsProblem:
    return ExpertsProblem("cuda", torch.bfloat16, 4, 8, 8, 512, 256, 2, activation=ActivationSpec.parse("silu"),
                          target=target)


def test_on_hopper_it_needs_compute_capability_10():
    ok, why = fp4.BACKEND.supports(_problem(TARGETS["h200"]))
    assert not ok and "needs compute capability 10.x" in why and "not built" in why
    ok, why = fp4.BACKEND.supports(_problem(TARGETS["b200"]))
    assert not ok and why == fp4.NOT_BUILT  # a B200 gets past the hardware check, not past the missing kernel


def test_it_is_registered_as_unavailable_with_the_reason():
    ok, why = moe.get_backend("cutlass_fp4").is_available()
    assert not ok and "needs compute capability 10.x" in why and "not built" in why
    decision = moe.explain(_problem(TARGETS["h200"]))
    reason = {c.name: c.reason for c in decision.candidates}["cutlass_fp4"]
    assert "needs compute capability 10.x" in reason  # what `moe backends --target h200` prints
    with pytest.raises(NotImplementedError, match="not built"):
        fp4.BACKEND.apply(None, None, None)
