"""Weight-only schemes (w8a16, w4a16, w4a16_zp, fp8_w8a16, mxfp4, nvfp4): storage against our own float64
decoders of the canonical layouts (written from the storage spec, never calling ``dequantize``), the
rounding rules, bad input, the byte counts of the floor, the layer's parameters and loaders, and the
torch reference against the float64 oracle on the decoded weights."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re

import numpy as np
import pytest
import torch

import moe
from moe.quant import NAMES, QuantConfig, QuantizedWeight, WeightScheme, check_quantized_weight, dequantize, named
from moe.quant import quantize as quantize_weight
from moe.testing import QUANT_NOISE, assert_close, experts_float64, rel_error
from moe.workload import Preset, expert_weight_bytes, random_weights

WEIGHT_ONLY = [name for name, cfg in NAMES.items() if cfg.weights is not None and cfg.activations is None]
FOUR_BIT = ["w4a16", "w4a16_zp", "mxfp4", "nvfp4"]


def test_the_weight_only_names():
    assert WEIGHT_ONLY == ["w8a16", "w4a16", "w4a16_zp", "fp8_w8a16", "mxfp4", "nvfp4"]
    w = {n: named(n).weights for n in WEIGHT_ONLY}
    assert (w["w8a16"].format, w["w8a16"].granularity) == ("int8", "channel")
    assert (w["w4a16"].format, w["w4a16"].group_size, w["w4a16"].zero_point) == ("int4", 128, False)
    assert (w["w4a16_zp"].format, w["w4a16_zp"].group_size, w["w4a16_zp"].zero_point) == ("int4", 128, True)
    assert (w["fp8_w8a16"].format, w["fp8_w8a16"].granularity) == ("fp8", "channel")
    assert (w["mxfp4"].format, w["mxfp4"].group_size) == ("mxfp4", 32)
    assert (w["nvfp4"].format, w["nvfp4"].group_size) == ("nvfp4", 16)
    for name in WEIGHT_ONLY:
        assert QuantConfig.parse(name).key() == name and named(name).activations is None
    # other group sizes through a QuantConfig, whose key round-trips
    g64 = QuantConfig(weights=WeightScheme(format="int4", granularity="group", group_size=64))
    assert QuantConfig.parse(g64.key()) == g64
    # the keys of the schemes from before zero points did not change
    assert named("fp8_channel").weights.key() == '{"format":"fp8","granularity":"channel"}'


@pytest.mark.parametrize(("kw", "match"), [
    (dict(format="int4", granularity="group"), "group_size: needed with granularity='group'"),
    (dict(format="int4", granularity="channel"), "int4 weights are stored per group, got 'channel'"),
    (dict(format="mxfp4", granularity="group", group_size=16), "mxfp4 has one scale per 32 input elements"),
    (dict(format="nvfp4", granularity="group", group_size=32), "nvfp4 has one scale per 16 input elements"),
    (dict(format="int4", granularity="group", group_size=33), "a group holds an even number of elements"),
    (dict(format="fp8", granularity="channel", zero_point=True), "only int4 weights have zero points"),
    (dict(format="fp8", granularity="channel", group_size=32), "group_size: needed with granularity='group' and only"),
])
def test_bad_schemes_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        WeightScheme(**kw)


def test_4bit_weights_refuse_quantized_activations():
    with pytest.raises(ValueError, match="mxfp4 weights are weight-only here"):
        QuantConfig(weights=named("mxfp4").weights, activations=moe.quant.ActivationScheme(format="fp8",
                                                                                        granularity="token"))


# ---------------------------------------------------------------- our own float64 decoders of the layouts
def _nibbles(data: torch.Tensor) -> np.ndarray:
    """uint8 [..., cols/2] -> codes [..., cols]: element 2j is the low nibble of byte j, 2j + 1 the high."""
    b = data.numpy().astype(np.int64)
    out = np.empty((*b.shape[:-1], 2 * b.shape[-1]), dtype=np.int64)
    out[..., 0::2] = b % 16
    out[..., 1::2] = b // 16
    return out


def _e2m1(code: np.ndarray) -> np.ndarray:
    """From the bits: sign (bit 3), exponent (bits 1-2, bias 1), mantissa (bit 0); exponent 0 is subnormal."""
    sign = np.where(code >= 8, -1.0, 1.0)
    e, m = (code >> 1) & 3, code & 1
    mag = np.where(e == 0, 0.5 * m, 2.0 ** (e - 1) * (1 + 0.5 * m))
    return sign * mag


def _e4m3(t: torch.Tensor) -> np.ndarray:
    """float8_e4m3fn from its bits: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 subnormal."""
    b = t.view(torch.uint8).numpy().astype(np.int64)
    sign = np.where(b >= 128, -1.0, 1.0)
    e, m = (b >> 3) & 15, b & 7
    assert not ((e == 15) & (m == 7)).any(), "NaN scale"
    return sign * np.where(e == 0, m / 8 * 2.0**-6, 2.0 ** (e - 7) * (1 + m / 8))


def _per_col(groups: np.ndarray, g: int) -> np.ndarray:
    return np.repeat(groups, g, axis=-1)


def decode(qw: QuantizedWeight) -> torch.Tensor:
    """The float64 values of a canonical weight, from the storage spec alone."""
    s = qw.scheme
    if s.format == "int4":
        q = _nibbles(qw.data)
        zero = _per_col(qw.zero.numpy().astype(np.float64), s.group_size) if s.zero_point else 8.0
        out = (q - zero) * _per_col(qw.scale.double().numpy(), s.group_size)
    elif s.format == "mxfp4":
        out = _e2m1(_nibbles(qw.data)) * _per_col(2.0 ** (qw.scale.numpy().astype(np.float64) - 127), 32)
    elif s.format == "nvfp4":
        _, rows, _ = qw.shape
        gs = np.repeat(qw.global_scale.double().numpy(), rows // qw.parts, axis=1)[..., None]  # [E, rows, 1]
        out = _e2m1(_nibbles(qw.data)) * _per_col(_e4m3(qw.scale), 16) * gs
    elif s.granularity == "channel":  # int8 and fp8 per output row
        data = _e4m3(qw.data) if s.format == "fp8" else qw.data.numpy().astype(np.float64)
        out = data * qw.scale.double().numpy()[..., None]
    else:
        raise AssertionError(f"no decoder for {s}")
    return torch.from_numpy(np.ascontiguousarray(out))


def _weights(e, rows, cols, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(e, rows, cols, generator=g)
    w[0, 0, :8] = 0.0  # an all-zero stretch (part of a group, or a whole nvfp4 group)
    return w.to(dtype)


# gpt-oss's 2880 (90 groups of 32, 180 of 16) for the FP4 formats; int4 with its default 128 groups
SHAPES = {"w8a16": (2, 6, 200), "fp8_w8a16": (2, 6, 200), "w4a16": (2, 6, 384), "w4a16_zp": (2, 6, 384),
          "mxfp4": (1, 4, 2880), "nvfp4": (1, 4, 2880)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("parts", [1, 2])
@pytest.mark.parametrize("name", WEIGHT_ONLY)
def test_dequantize_equals_our_decoder(name, parts, dtype):
    scheme = named(name).weights
    w = _weights(*SHAPES[name], dtype)
    qw = quantize_weight(w, scheme, parts=parts)
    assert tuple(qw.shape) == SHAPES[name] and qw.parts == parts
    ours = decode(qw)
    assert torch.equal(dequantize(qw, torch.float64), ours)
    # in fp32: the product of e2m1, block and global scale rounds twice (nvfp4), so within 2 ulp
    assert torch.allclose(dequantize(qw, torch.float32).double(), ours, rtol=2.5e-7, atol=0)
    # and the values are close to the weights (4 bits: the quantization noise of Gaussian data)
    err = rel_error(ours, w.double())
    assert err < {"int8": 1e-2, "fp8": 5e-2}.get(scheme.format, 0.15), err
    assert ours[0, 0, :8].abs().sum() == 0  # zeros stay zeros


def test_int4_storage_by_hand():
    """Two groups of 4 (a QuantConfig group size): codes and bytes as the spec says."""
    scheme = WeightScheme(format="int4", granularity="group", group_size=4)
    w = torch.tensor([[[7.0, -7.0, 1.0, 0.0, 0.5, 1.0, -0.5, 3.5]]])
    qw = quantize_weight(w, scheme)
    assert qw.scale.tolist() == [[[1.0, 0.5]]]  # amax / 7
    codes = [15, 1, 9, 8, 9, 10, 7, 15]  # round(w / s) + 8
    assert qw.data.tolist() == [[[codes[0] | codes[1] << 4, codes[2] | codes[3] << 4, codes[4] | codes[5] << 4,
                                  codes[6] | codes[7] << 4]]]
    zp = quantize_weight(w, scheme.model_copy(update={"zero_point": True}))
    # group 1: range [-7, 7] -> scale 14/15, zero round(7.5) = 8 (half to even); group 2: [-0.5, 3.5] -> 4/15, 2
    assert zp.zero.tolist() == [[[8, 2]]]
    assert torch.allclose(zp.scale, torch.tensor([[[14 / 15, 4 / 15]]]))
    assert torch.equal(dequantize(zp, torch.float64), decode(zp))


def test_e2m1_storage_by_hand():
    """mxfp4 with a block max of 6 (scale 2^0, byte 127): each value's code, two a byte, low nibble first."""
    values = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    w = torch.tensor(values * 2).reshape(1, 1, 32)
    qw = quantize_weight(w, named("mxfp4").weights)
    assert qw.scale.tolist() == [[[127]]]
    codes = [0, 1, 2, 3, 4, 5, 6, 7, 0, 9, 10, 11, 12, 13, 14, 15] * 2  # -0.0 is stored as +0
    assert qw.data[0, 0].tolist() == [codes[2 * j] | codes[2 * j + 1] << 4 for j in range(16)]
    # ties go to the even code: 0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2.0, 3.5 -> 4.0, 5 -> 4.0
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4).reshape(1, 1, 32)
    got = dequantize(quantize_weight(ties, named("mxfp4").weights))
    assert got[0, 0, :8].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]


@pytest.mark.parametrize("name", FOUR_BIT)
def test_rounding_is_to_the_nearest_code_and_the_block_max_fits(name):
    scheme = named(name).weights
    w = _weights(2, 4, 256, torch.float32, seed=3) * 3
    qw = quantize_weight(w, scheme, parts=2)
    g = scheme.group_size
    values = decode(qw)
    x = w.double()
    if scheme.format == "int4":
        step = torch.from_numpy(_per_col(qw.scale.double().numpy(), g))
        assert ((values - x).abs() <= step / 2 + 1e-6 * step).all()  # nothing clipped, nearest step
        codes = torch.from_numpy(_nibbles(qw.data))
        if not scheme.zero_point:
            assert codes.min() >= 1  # -8 unused: the symmetric range is -7..7
        return
    # FP4: the chosen code's value is the nearest of the 16 (after the block scale)
    if scheme.format == "mxfp4":
        step = 2.0 ** (qw.scale.double() - 127)
        amax = x.abs().view(2, 4, -1, g).amax(-1)
        assert (amax <= 6 * step).all() and ((amax > 3 * step) | (amax == 0)).all()  # the smallest that fits
        per = torch.from_numpy(_per_col(step.numpy(), g))
    else:
        per = torch.from_numpy(_per_col(_e4m3(qw.scale), g)) * torch.from_numpy(
            np.repeat(qw.global_scale.double().numpy(), 2, axis=1)[..., None])
        part_amax = x.abs().view(2, 2, -1).amax(-1)
        assert torch.allclose(qw.global_scale.double(), part_amax / (448 * 6))
    grid = torch.tensor(_e2m1(np.arange(16)))
    best = (x[..., None] / per[..., None] - grid).abs().min(-1).values
    got = (x / per - values / per).abs()
    assert (got <= best + 1e-9).all()


# ---------------------------------------------------------------- bad input
def _qw(name, e=1, rows=4, cols=64, parts=1):
    return quantize_weight(_weights(e, rows, cols, torch.bfloat16), named(name).weights, parts=parts)


def _bad(qw: QuantizedWeight, **fields) -> QuantizedWeight:
    bad = object.__new__(QuantizedWeight)  # skip __post_init__ to check the function itself
    for k in ("data", "scale", "scheme", "zero", "global_scale", "parts"):
        object.__setattr__(bad, k, fields.get(k, getattr(qw, k)))
    return bad


def test_bad_quantized_weights_name_the_parameter():
    w4 = _qw("w4a16", cols=256)  # two groups of 128 a row, 128 bytes
    with pytest.raises(ValueError, match=r"w13.data: shape \(1, 4, 100\) \(100 bytes a row hold 200 packed 4-bit "
                                         r"codes\): group_size: int4 groups of 128 input elements do not divide the 200"):
        check_quantized_weight("w13", _bad(w4, data=w4.data[..., :100]))
    with pytest.raises(TypeError, match=r"w13.data: int4 weights are stored as uint8, got torch.int8 \(two unsigned "
                                        r"4-bit codes a byte: a signed dtype"):
        check_quantized_weight("w13", _bad(w4, data=w4.data.view(torch.int8)))
    with pytest.raises(ValueError, match=re.escape("w13.scale: int4 group 128 scales of a (1, 4, 256) weight with "
                                                   "parts=1 have shape (1, 4, 2), got (1, 4, 1)")):
        check_quantized_weight("w13", _bad(w4, scale=w4.scale[..., :1]))
    with pytest.raises(TypeError, match=r"w13.scale: int4 scales are bfloat16 or float16 or float32, got torch.uint8"):
        check_quantized_weight("w13", _bad(w4, scale=w4.scale.to(torch.uint8)))
    with pytest.raises(ValueError, match=r"w13.zero: int4 weights have no zero \(the scheme has zero_point=False\)"):
        check_quantized_weight("w13", _bad(w4, zero=torch.zeros(1, 4, 2, dtype=torch.uint8)))
    zp = _qw("w4a16_zp", cols=256)
    with pytest.raises(ValueError, match=re.escape("w2.zero: int4 group 128 with zero points zero points of a "
                                                   "(1, 4, 256) weight with parts=1 have shape (1, 4, 2), got (1, 2, 2)")):
        check_quantized_weight("w2", _bad(zp, zero=zp.zero[:, :2]))
    with pytest.raises(TypeError, match=r"w2.zero: int4 group 128 with zero points weights need zero points of "
                                        r"shape \(1, 4, 2\) \(uint8\), got NoneType"):
        check_quantized_weight("w2", _bad(zp, zero=None))
    with pytest.raises(TypeError, match=r"w2.zero: int4 zero points are uint8, got torch.int32"):
        check_quantized_weight("w2", _bad(zp, zero=zp.zero.int()))
    mx = _qw("mxfp4")
    with pytest.raises(TypeError, match=r"w13.scale: mxfp4 scales are uint8, got torch.float32"):
        check_quantized_weight("w13", _bad(mx, scale=mx.scale.float()))
    with pytest.raises(ValueError, match=re.escape("w13.scale: mxfp4 group 32 scales of a (1, 4, 64) weight with "
                                                   "parts=1 have shape (1, 4, 2), got (1, 4, 4)")):
        check_quantized_weight("w13", _bad(mx, scale=torch.zeros(1, 4, 4, dtype=torch.uint8)))
    nv = _qw("nvfp4", parts=2)
    with pytest.raises(TypeError, match=r"w13.global_scale: nvfp4 group 16 weights need global scales of shape "
                                        r"\(1, 2\) \(float32\), got NoneType"):
        check_quantized_weight("w13", _bad(nv, global_scale=None))
    with pytest.raises(ValueError, match=r"w13.global_scale: .* have shape \(1, 2\), got \(1, 1\)"):
        check_quantized_weight("w13", _bad(nv, global_scale=nv.global_scale[:, :1]))
    with pytest.raises(TypeError, match=r"w13.scale: nvfp4 scales are float8_e4m3fn, got torch.float32"):
        check_quantized_weight("w13", _bad(nv, scale=nv.scale.float()))
    with pytest.raises(ValueError, match=r"w13.global_scale: mxfp4 weights have no global_scale"):
        check_quantized_weight("w13", _bad(mx, global_scale=torch.ones(1, 1)))


def test_a_group_size_that_does_not_divide_k_names_both():
    with pytest.raises(ValueError, match=r"group_size: int4 groups of 128 input elements do not divide the 2880 "
                                         r"input features"):
        quantize_weight(torch.randn(1, 4, 2880), named("w4a16").weights)
    with pytest.raises(ValueError, match=r"group_size: int4 groups of 128 input elements do not divide the 2880"):
        moe.FusedMoE(4, 2, 2880, 256, quant="w4a16")
    with pytest.raises(ValueError, match=r"group_size: int4 groups of 128 .* do not divide the 200 input features"):
        moe.FusedMoE(4, 2, 256, 200, quant="w4a16")  # w2's K is the intermediate size
    with pytest.raises(ValueError, match=r"group_size: int4 groups of 128 .* do not divide the 2880"):
        expert_weight_bytes(Preset("g", 2, 1, 2880, 256, (1,)), 2, "w4a16")


# ---------------------------------------------------------------- the floor's bytes
@pytest.mark.parametrize("p", [Preset("g128", 2, 1, 256, 128, (1,)),
                               Preset("oss", 2, 1, 2880, 64, (1,), activation="swigluoai", bias=True),
                               Preset("relu", 2, 1, 128, 256, (1,), "relu2")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", WEIGHT_ONLY)
def test_expert_weight_bytes_count_data_scales_and_zeros(p, name, dtype):
    scheme = named(name).weights
    if scheme.group_size and (p.hidden_size % scheme.group_size or p.intermediate_size % scheme.group_size):
        pytest.skip(f"{name}'s groups of {scheme.group_size} do not divide {p.name}")
    w13, w2 = random_weights(p, dtype, "cpu", torch.Generator().manual_seed(0))
    qw13, qw2 = quantize_weight(w13, scheme, parts=p.parts), quantize_weight(w2, scheme)
    elt = dtype.itemsize
    assert expert_weight_bytes(p, elt, name) == (qw13.nbytes() + qw2.nbytes()) // p.num_experts
    plain = expert_weight_bytes(p, 2)
    if scheme.packed:  # half a byte an element plus scales: under a third of bf16
        assert expert_weight_bytes(p, 2, name) < 0.3 * plain


def test_4bit_bytes_by_hand():
    p = Preset("m", 1, 1, 4096, 1024, (1,))  # gated: w13 [2048, 4096], w2 [4096, 1024]
    elts = 2048 * 4096 + 4096 * 1024
    assert expert_weight_bytes(p, 2, "w4a16") == elts // 2 + 2 * elts // 128  # bf16 scales per 128
    assert expert_weight_bytes(p, 2, "w4a16_zp") == elts // 2 + 3 * elts // 128  # + a byte of zero a group
    assert expert_weight_bytes(p, 2, "mxfp4") == elts // 2 + elts // 32  # an e8m0 byte per 32
    assert expert_weight_bytes(p, 2, "nvfp4") == elts // 2 + elts // 16 + 4 * 3  # e4m3 per 16 + [P] + [1] fp32
    assert expert_weight_bytes(p, 2, "w8a16") == elts + 4 * (2048 + 4096)


# ---------------------------------------------------------------- the reference
def _inputs(name, T, K=128, N=128, E=4, k=2, dtype=torch.float32, activation="silu", seed=0):
    g = torch.Generator().manual_seed(seed)
    gated = moe.ActivationSpec.parse(activation).gated
    rows = 2 * N if gated else N
    x = torch.randn(T, K, generator=g).to(dtype)
    w13 = (torch.randn(E, rows, K, generator=g) / K**0.5).to(dtype)
    w2 = (torch.randn(E, K, N, generator=g) / N**0.5).to(dtype)
    weights, ids = moe.fused_topk(torch.randn(T, E, generator=g), k)
    scheme = named(name).weights
    return x, w13, w2, quantize_weight(w13, scheme, parts=2 if gated else 1), quantize_weight(w2, scheme), weights, ids


@pytest.mark.parametrize("T", [1, 3, 16])
@pytest.mark.parametrize("name", WEIGHT_ONLY)
def test_torch_reference_is_the_float64_oracle_on_the_decoded_weights(name, T):
    """quant=None with quantized weights is weight-only: the dequantized weights, fp32 compute."""
    x, w13, w2, q13, q2, weights, ids = _inputs(name, T, seed=T)
    out = torch.full_like(x, float("nan"))
    got = moe.fused_experts(x, q13, q2, weights, ids, backend="torch", out=out)
    assert got is out and moe.last_decision().chosen == "torch"
    assert_close(out, experts_float64(x, decode(q13), decode(q2), weights, ids), what=name)  # fp32: 1e-5
    assert rel_error(out, experts_float64(x, w13, w2, weights, ids)) <= QUANT_NOISE[name]
    same = moe.fused_experts(x, q13, q2, weights, ids, quant=name, backend="torch")  # the name says the same
    assert torch.equal(same, out)


@pytest.mark.parametrize("name", ["w4a16", "mxfp4", "nvfp4"])
def test_reference_in_bf16_with_gptoss_dimensions(name):
    """K = N = 2880-like raggedness at CPU size: mxfp4/nvfp4 with K = 2880; int4 in groups of 64 (a QuantConfig)."""
    scheme = named(name).weights
    if name == "w4a16":
        scheme = scheme.model_copy(update={"group_size": 64})
        cfg = QuantConfig(weights=scheme)
    else:
        cfg = named(name)
    K, N = (2880, 64) if name != "w4a16" else (192, 320)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, K, generator=g).to(torch.bfloat16)
    w13 = (torch.randn(2, 2 * N, K, generator=g) * (4 / K**0.5)).to(torch.bfloat16)
    w2 = (torch.randn(2, K, N, generator=g) / N**0.5).to(torch.bfloat16)
    b13, b2 = (torch.randn(2, 2 * N, generator=g) * 0.1).to(torch.bfloat16), (torch.randn(2, K, generator=g) * 0.1
                                                                                ).to(torch.bfloat16)
    weights, ids = moe.fused_topk(torch.randn(3, 2, generator=g), 2)
    q13, q2 = quantize_weight(w13, scheme, parts=2), quantize_weight(w2, scheme)
    out = moe.fused_experts(x, q13, q2, weights, ids, activation="swigluoai", w13_bias=b13, w2_bias=b2,
                            quant=cfg, backend="torch")
    want = experts_float64(x, decode(q13), decode(q2), weights, ids, "swigluoai", b13, b2)
    assert_close(out, want, what=name)  # bf16 row: the reference rounds its intermediate to bf16


def test_quant_disagreeing_with_the_weights_names_both():
    x, _, _, q13, q2, weights, ids = _inputs("w4a16", 2)
    with pytest.raises(ValueError, match=r"quant: w4a16_zp stores weights as .*zero_point=True.* but w13 is stored as"):
        moe.fused_experts(x, q13, q2, weights, ids, quant="w4a16_zp", backend="torch")
    with pytest.raises(ValueError, match="quant: int8_channel stores weights as"):
        moe.fused_experts(x, q13, q2, weights, ids, quant="int8_channel", backend="torch")


# ---------------------------------------------------------------- the layer
E, TOP_K, K, N = 3, 2, 128, 128


def _layer(quant=None, dtype=torch.bfloat16, **kw) -> moe.FusedMoE:
    kw = {"backend": "torch", "gate": False, **kw}
    return moe.FusedMoE(E, TOP_K, K, N, quant=quant, params_dtype=dtype, **kw)


_EXTRA = {"w4a16_zp": ("w13_weight_zero_point", "w2_weight_zero_point"),
          "nvfp4": ("w13_weight_global_scale", "w2_weight_global_scale")}


@pytest.mark.parametrize("name", WEIGHT_ONLY)
def test_layer_parameters_per_scheme(name):
    layer = _layer(name)
    q13, q2 = layer._expert_weights()
    assert tuple(q13.shape) == (E, 2 * N, K) and tuple(q2.shape) == (E, K, N)
    params = dict(layer.named_parameters())
    assert set(params) == {"w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale", *_EXTRA.get(name, ())}
    assert params["w13_weight"] is q13.data and params["w2_weight_scale"] is q2.scale
    scheme = named(name).weights
    if scheme.packed:
        assert params["w13_weight"].shape == (E, 2 * N, K // 2) and params["w13_weight"].dtype == torch.uint8
    if scheme.format == "int4":
        assert params["w13_weight_scale"].dtype == torch.bfloat16  # the activation dtype, as checkpoints store them
    if name == "nvfp4":
        assert params["w13_weight_global_scale"].shape == (E, 2) and params["w2_weight_global_scale"].shape == (E, 1)
    x = torch.randn(3, K, dtype=torch.bfloat16)
    y = layer(x, torch.randn(3, E))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all() and y.abs().sum() > 0


@pytest.mark.parametrize("name", WEIGHT_ONLY)
def test_quantize_loaders_and_state_dict_agree(name):
    """quantize_ on a float layer; per-expert shards (w1/w3/w2 and their scales, zero points, global scales)
    and fused tensors loaded into a fresh quantized layer give the same parameters; the state dict round-trips
    bit for bit and the outputs are equal."""
    ref = _layer(None)
    quantized = moe.quant.quantize_(copy.deepcopy(ref), name)
    state = {k: v for k, v in quantized.state_dict().items() if k.startswith(("w13_", "w2_"))}
    per_expert = _layer(name)
    scheme = named(name).weights
    for e in range(E):
        for shard, w in (("w1", ref.w13_weight[e, :N]), ("w3", ref.w13_weight[e, N:]), ("w2", ref.w2_weight[e])):
            q = quantize_weight(w[None], scheme)
            assert per_expert.weight_loader(q.data[0], e, shard)
            per_expert.weight_loader(q.scale[0], e, f"{shard}_weight_scale")
            if q.zero is not None:
                per_expert.weight_loader(q.zero[0], e, f"{shard}_weight_zero_point")
            if q.global_scale is not None:
                per_expert.weight_loader(q.global_scale[0].reshape(()), e, f"{shard}_weight_global_scale")
    fused = _layer(name)
    fused.load_fused_weights(state["w13_weight"], state["w2_weight"], w13_scale=state["w13_weight_scale"],
                             w2_scale=state["w2_weight_scale"], w13_zero_point=state.get("w13_weight_zero_point"),
                             w2_zero_point=state.get("w2_weight_zero_point"),
                             w13_global_scale=state.get("w13_weight_global_scale"),
                             w2_global_scale=state.get("w2_weight_global_scale"))
    fresh = _layer(name)
    fresh.load_state_dict(quantized.state_dict(), strict=False)
    x, logits = torch.randn(2, K, dtype=torch.bfloat16), torch.randn(2, E)
    for layer in (per_expert, fused, fresh):
        got = {k: v for k, v in layer.state_dict().items() if k.startswith(("w13_", "w2_"))}
        assert got.keys() == state.keys()
        for key in state:
            assert torch.equal(got[key].view(torch.uint8), state[key].view(torch.uint8)), key
        assert torch.equal(layer(x, logits), quantized(x, logits))
    assert rel_error(quantized(x, logits), ref(x, logits)) <= QUANT_NOISE[name]


def test_layer_loader_errors():
    nv = _layer("nvfp4")
    with pytest.raises(TypeError, match=r"weight_loader: w1_weight_scale of expert 0: dtype torch.float32, but "
                                        r"nvfp4 stores w13_weight_scale as torch.float8_e4m3fn"):
        nv.weight_loader(torch.ones(N, K // 16), 0, "w1_weight_scale")
    with pytest.raises(ValueError, match=r"weight_loader: w1_weight_zero_point given but nvfp4 has no zero_point; "
                                         r"only int4 with zero points \(w4a16_zp\) has one"):
        nv.weight_loader(torch.zeros(N, K // 16, dtype=torch.uint8), 0, "w1_weight_zero_point")
    w4 = _layer("w4a16")
    with pytest.raises(TypeError, match=r"weight_loader: w2 of expert 1: dtype torch.int8, but w4a16 stores weights "
                                        r"as torch.uint8.*packed 4-bit codes are unsigned"):
        w4.weight_loader(torch.zeros(K, N // 2, dtype=torch.int8), 1, "w2")
    with pytest.raises(ValueError, match=r"weight_loader: w2 of expert 1 must have shape \(128, 64\), got \(128, 128\)"):
        w4.weight_loader(torch.zeros(K, N, dtype=torch.uint8), 1, "w2")
    with pytest.raises(ValueError, match=r"w1_weight_global_scale given but w4a16 has no global_scale; only nvfp4"):
        w4.weight_loader(torch.ones(()), 0, "w1_weight_global_scale")
    with pytest.raises(ValueError, match=r"weight_loader: w1_g_idx: GPTQ act-order \(desc_act=true, the checkpoint's "
                                         r"g_idx field\) is not supported"):
        w4.weight_loader(torch.zeros(K, dtype=torch.int32), 0, "w1_g_idx")
    zp = _layer("w4a16_zp")
    with pytest.raises(TypeError, match=r"w2_weight_zero_point of expert 0: dtype torch.int32, but w4a16_zp stores "
                                        r"w2_weight_zero_point as torch.uint8"):
        zp.weight_loader(torch.zeros(K, N // 128, dtype=torch.int32), 0, "w2_weight_zero_point")


# ---------------------------------------------------------------- the Triton kernels (interpreter on CPU)
needs_triton = pytest.mark.skipif(not moe.get_backend("triton").is_available()[0], reason="triton not installed")


def _triton_vs_reference(name, x, q13, q2, weights, ids, **kw):
    out = torch.full_like(x, float("nan"))
    got = moe.fused_experts(x, q13, q2, weights, ids, backend="triton", out=out, **kw)
    assert got is out and moe.last_decision().chosen == "triton"
    ref = moe.fused_experts(x, q13, q2, weights, ids, backend="torch", **kw)
    assert_close(out, ref, scheme=name, what=f"triton {name} vs the reference")
    return out


# the token counts of the list up to 16 for every name, and 64 for two (CPU time: the interpreter)
TRITON_CASES = [(n, t) for n in WEIGHT_ONLY for t in moe.testing.TOKEN_COUNTS if t <= 16] + [("w4a16_zp", 64),
                                                                                             ("mxfp4", 64)]


@needs_triton
@pytest.mark.parametrize(("name", "T"), TRITON_CASES)
def test_triton_weight_only_against_the_reference(name, T):
    """bf16, NaN-poisoned, against the reference; and within the quantization noise of the float64 oracle."""
    x, w13, w2, q13, q2, weights, ids = _inputs(name, T, dtype=torch.bfloat16, seed=100 + T)
    out = _triton_vs_reference(name, x, q13, q2, weights, ids)
    assert rel_error(out, experts_float64(x, w13, w2, weights, ids)) <= QUANT_NOISE[name]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", WEIGHT_ONLY)
def test_triton_weight_only_other_dtypes(name, dtype):
    x, _, _, q13, q2, weights, ids = _inputs(name, 5, dtype=dtype, activation="gelu", seed=7)
    _triton_vs_reference(name, x, q13, q2, weights, ids, activation="gelu")


@needs_triton
@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
def test_triton_fp4_with_gptoss_k(name):
    """K = 2880 (90 groups of 32, 180 of 16: no multiple of the kernels' K tile), swigluoai with biases, an
    expert map."""
    g = torch.Generator().manual_seed(5)
    K, N, E = 2880, 64, 4
    x = torch.randn(3, K, generator=g).to(torch.bfloat16)
    w13 = (torch.randn(2, 2 * N, K, generator=g) * (4 / K**0.5)).to(torch.bfloat16)
    w2 = (torch.randn(2, K, N, generator=g) / N**0.5).to(torch.bfloat16)
    b13, b2 = (torch.randn(2, 2 * N, generator=g) * 0.1).to(torch.bfloat16), (torch.randn(2, K, generator=g) * 0.1
                                                                                ).to(torch.bfloat16)
    weights, ids = moe.fused_topk(torch.randn(3, E, generator=g), 2)
    emap = torch.tensor([0, -1, 1, -1], dtype=torch.int32)
    scheme = named(name).weights
    q13, q2 = quantize_weight(w13, scheme, parts=2), quantize_weight(w2, scheme)
    _triton_vs_reference(name, x, q13, q2, weights, ids, activation="swigluoai", w13_bias=b13, w2_bias=b2,
                         expert_map=emap)


@needs_triton
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("name", WEIGHT_ONLY)
def test_triton_weight_only_split_k(name, T):
    """GEMM2 in 4 parts (N = 512 over 128-wide K steps: a part each), every part decoding its own groups
    (int4 scales on the partial products, as the decode heuristic puts them), against the reference,
    NaN-poisoned."""
    from moe.backends.triton import GemmTile, KernelConfig, triton_experts
    from moe.contract import ExpertsArgs
    from moe.functional import _problem

    x, _, _, q13, q2, weights, ids = _inputs(name, T, K=128, N=512, dtype=torch.bfloat16, seed=11)
    args = ExpertsArgs(x, q13, q2, weights, ids)
    problem = _problem(args, moe.ActivationSpec.parse("silu"), False, None)
    tile = GemmTile(block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=1)
    scales = "accumulator" if name == "w4a16" else "weights"
    out = torch.full_like(x, float("nan"))
    triton_experts(args, problem, out, KernelConfig(block_m=16, gemm1=tile, gemm2=tile, split_k=4,
                                                    group_scales=scales))
    ref = moe.fused_experts(x, q13, q2, weights, ids, backend="torch")
    assert_close(out, ref, scheme=name, what=f"triton {name} split_k=4")


GROUP_SCALED = ["w4a16", "w4a16_zp", "mxfp4", "nvfp4"]


@needs_triton
@pytest.mark.parametrize("name", WEIGHT_ONLY)
def test_triton_prepares_group_scales_in_its_own_layout(name):
    """The Triton backend's prepared copy of group scales: the stored [E, rows, groups] shape over
    [E, groups, rows] storage (each group's columns contiguous), int4 scales and zero points in fp32,
    mxfp4's e8m0 bytes as the bf16 values the kernels build (byte 0 read as 0), nvfp4's e4m3 as they are;
    equal values. Other schemes prepare nothing."""
    from moe.backends.triton import prepared_scales
    from moe.contract import ExpertsArgs
    from moe.functional import _problem

    x, _, _, q13, q2, weights, ids = _inputs(name, 3, K=256, N=256, seed=4)
    args = ExpertsArgs(x, q13, q2, weights, ids)
    made = prepared_scales(args, _problem(args, moe.ActivationSpec.parse("silu"), False, None))
    if name not in GROUP_SCALED:
        assert made is None
        return
    assert made.backend == "triton"
    for wname, q in (("w13", q13), ("w2", q2)):
        scale = made.tensors[f"{wname}_scale"]
        _, rows, groups = q.scale.shape
        assert scale.shape == q.scale.shape and scale.stride() == (rows * groups, 1, rows)
        if name == "mxfp4":
            want = torch.where(q.scale == 0, 0.0, torch.exp2(q.scale.float() - 127))
            assert scale.dtype == torch.bfloat16 and torch.equal(scale.float(), want)
        else:
            assert scale.dtype == (torch.float32 if name.startswith("w4") else q.scale.dtype)
            assert torch.equal(scale.float(), q.scale.float())
        zero = made.tensors.get(f"{wname}_zero")
        assert (zero is None) == (q.zero is None)
        if zero is not None:
            assert zero.dtype == torch.float32 and zero.stride() == scale.stride()
            assert torch.equal(zero, q.zero.float())


@needs_triton
@pytest.mark.parametrize("name", GROUP_SCALED)
@pytest.mark.parametrize("split_k", [1, 2])
def test_triton_with_prepared_scales_against_the_reference(name, split_k):
    """The kernels on the prepared scales (both int4 scale placements, GEMM2 whole or in 2 parts),
    NaN-poisoned, equal to the stored-scale run and within the reference's tolerance; gpt-oss's ragged
    K = 2880 (no multiple of the K tile) for the e2m1 names."""
    from moe.backends.triton import GemmTile, KernelConfig, prepared_scales, triton_experts
    from moe.contract import ExpertsArgs
    from moe.functional import _problem

    K_ = 2880 if name in ("mxfp4", "nvfp4") else 256
    x, _, _, q13, q2, weights, ids = _inputs(name, 5, K=K_, N=256, dtype=torch.bfloat16, seed=21)
    args = ExpertsArgs(x, q13, q2, weights, ids)
    problem = _problem(args, moe.ActivationSpec.parse("silu"), False, None)
    prepared = dataclasses.replace(args, prepared=prepared_scales(args, problem))
    ref = moe.fused_experts(x, q13, q2, weights, ids, backend="torch")
    tile = GemmTile(block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=1)
    for scales in (("weights", "accumulator") if name == "w4a16" else ("weights",)):
        cfg = KernelConfig(block_m=16, gemm1=tile, gemm2=tile, group_scales=scales, split_k=split_k)
        out = torch.full_like(x, float("nan"))
        triton_experts(prepared, problem, out, cfg)
        assert_close(out, ref, scheme=name, what=f"triton {name} prepared scales {scales}")
        assert torch.equal(out, triton_experts(args, problem, torch.empty_like(x), cfg))


@needs_triton
def test_a_triton_layer_prepares_its_group_scales_once():
    """FusedMoE on the Triton backend makes the prepared scales at its first call and keeps them; a bf16
    layer on it prepares nothing (the cache holds None, the calls get no prepared copy)."""
    layer = _layer("w4a16", backend="triton")
    x, logits = torch.randn(3, K).to(torch.bfloat16), torch.randn(3, E)
    first = layer(x, logits)
    made = layer._prepared.current
    assert made is not None and set(made.tensors) == {"w13_scale", "w2_scale"}
    assert torch.equal(layer(x, logits), first) and layer._prepared.current is made
    plain = _layer(None, backend="triton")
    plain(x, logits)
    assert plain._prepared.current is None


@needs_triton
def test_triton_refuses_packed_weights_with_a_shallow_k_tile():
    from moe.backends.triton import GemmTile, KernelConfig, triton_experts
    from moe.contract import ExpertsArgs
    from moe.functional import _problem

    x, _, _, q13, q2, weights, ids = _inputs("mxfp4", 3, dtype=torch.bfloat16)
    args = ExpertsArgs(x, q13, q2, weights, ids)
    problem = _problem(args, moe.ActivationSpec.parse("silu"), False, None)
    tile = GemmTile(block_n=32, block_k=16, group_m=1, num_warps=4, num_stages=1)
    cfg = KernelConfig(block_m=16, gemm1=tile, gemm2=tile)
    with pytest.raises(ValueError, match=r"packed 4-bit weights need block_k >= 32 .* got gemm1 16, gemm2 16"):
        triton_experts(args, problem, torch.empty_like(x), cfg)


def test_the_kernels_bit_constants():
    """The interpreter's and fp32 activations' decode (``_nibble_values``), checked on the host: int4 by
    OR-ing the code into the mantissa of 2^23 (ulp 1), e2m1 by bit placement plus the exponent bias; and
    e8m0 scales as a bf16 exponent field (``_scale_values``)."""
    q = torch.arange(16, dtype=torch.int64)

    def as_float(v, dtype=torch.float32, bits=torch.int32):
        return v.to(bits).view(dtype).double()

    assert torch.equal(as_float(q | 0x4B000000) - 2.0**23, q.double())
    mag = torch.where((q & 6) != 0, ((q & 7) << 22) + (126 << 23), (q & 1) * (126 << 23))
    code_bits = mag | ((q & 8) << 28)
    code_bits = torch.where(code_bits >= 2**31, code_bits - 2**32, code_bits)
    assert torch.equal(as_float(code_bits), torch.tensor(_e2m1(q.numpy())))
    s = torch.arange(1, 255)
    assert torch.equal(as_float(s << 7, torch.bfloat16, torch.int16), 2.0 ** (s.double() - 127))


def _run_ptx(program: str, word: int, inputs: dict[str, int] | None = None) -> tuple[int, int | None]:
    """A host emulation of the few PTX instructions of the kernels' inline assembly (``_nibble_asm``: ``$2``
    in, ``$0``/``$1`` out; ``_pairs_asm``: ``inputs`` in, ``$0`` out): 32-bit words, fma on pairs of 16-bit
    floats rounded to nearest even."""
    import struct

    regs = {"$2": word} if inputs is None else dict(inputs)

    def val(tok):
        return regs[tok] if tok in regs else int(tok, 16) if tok.startswith("0x") else int(tok)

    def halves(x, fmt):
        lo, hi = x & 0xFFFF, x >> 16
        if fmt == "bf16":
            return [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in (lo, hi)]
        return [float(np.array([h], dtype=np.uint16).view(np.float16)[0]) for h in (lo, hi)]

    def pack(vals, fmt):
        t = torch.tensor(vals, dtype=torch.float64).to(torch.bfloat16 if fmt == "bf16" else torch.float16)
        h = t.view(torch.int16).to(torch.int64) & 0xFFFF
        return int(h[0]) | int(h[1]) << 16

    body = program.strip().strip("{}")
    for ins in (i.strip() for i in body.split(";") if i.strip()):
        op, args = ins.split(None, 1)
        a = [t.strip() for t in args.split(",")]
        if op == ".reg":
            continue
        if op == "shr.u32":
            regs[a[0]] = val(a[1]) >> val(a[2])
        elif op == "shl.b32":
            regs[a[0]] = (val(a[1]) << val(a[2])) & 0xFFFFFFFF
        elif op == "and.b32":
            regs[a[0]] = val(a[1]) & val(a[2])
        elif op == "mov.b32":
            regs[a[0]] = val(a[1])
        elif op == "lop3.b32":
            assert a[4] == "0xEA"  # (a & b) | c
            regs[a[0]] = (val(a[1]) & val(a[2])) | val(a[3])
        elif op == "prmt.b32":
            pool = val(a[1]) | val(a[2]) << 32
            sel = val(a[3])
            regs[a[0]] = sum(((pool >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))
        elif op in ("fma.rn.bf16x2", "fma.rn.f16x2"):
            fmt = "bf16" if "bf16" in op else "f16"
            x, m, c = (halves(val(t), fmt) for t in a[1:])
            regs[a[0]] = pack([x[i] * m[i] + c[i] for i in range(2)], fmt)
        else:
            raise AssertionError(f"no emulation of {op}")
    return regs["$0"], regs.get("$1")


@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_the_gpu_inline_asm_scales_pairs_to_the_scalar_bits(dtype, zero_point):
    """``dequant_math="pairs"``: the packed fmas of ``_pairs_asm`` (emulated on the host) give the bits of the
    scalar ``s * (z + v)`` / ``s * v`` in the 16-bit dtype, both halves of the word, over decoded codes
    (int4 and e2m1 values, zeros of both signs), small negated zero points and random scales; a changed
    constant or operand order fails."""
    from moe.backends.triton._gemm import _pairs_asm

    dt = torch.bfloat16 if dtype == "bf16" else torch.float16
    g = torch.Generator().manual_seed(3)
    n = 4096
    codes = torch.tensor([*range(-8, 8), 0.5, 1.5, 3.0, 6.0, -0.5, -6.0, -0.0], dtype=torch.float32)
    v = codes[torch.randint(len(codes), (n, 2), generator=g)].to(dt)
    s = (torch.rand(n, 2, generator=g) * 4 - 2).mul(torch.exp2(torch.randint(-6, 7, (n, 2), generator=g))).to(dt)
    z = (-torch.randint(0, 16, (n, 2), generator=g).float()).to(dt)
    want = s * (z + v) if zero_point else s * v

    def word(t):
        h = t.view(torch.int16).to(torch.int64) & 0xFFFF
        return h[:, 0] | h[:, 1] << 16

    ws, wz, wv, ww = word(s), word(z), word(v), word(want)
    program = _pairs_asm(zero_point, dtype)
    for i in range(n):
        inputs = {"$1": int(ws[i]), "$2": int(wz[i]), "$3": int(wv[i])} if zero_point else {
            "$1": int(ws[i]), "$2": int(wv[i])}
        got, _ = _run_ptx(program, 0, inputs)
        assert got == int(ww[i]), (f"{dtype} pair {i}: s={s[i].tolist()} z={z[i].tolist()} v={v[i].tolist()}: "
                                   f"{got:#010x} != {int(ww[i]):#010x}")


@pytest.mark.parametrize("code", ["int4", "int4_zp", "e2m1"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_the_gpu_inline_asm_decodes_every_byte(code, dtype):
    """The GPU's 16-bit decode does not run under the interpreter: emulate its PTX on the host for every
    byte in every position of the 32-bit word, low and high nibbles, and compare with the codes' values
    (int4 ``q - 8``; ``q`` where zero points follow; e2m1, the subnormal 0.5 and -0 included), each byte's
    value at its place: in byte order, or in ``NIBBLE_ORDER`` (decode_order="masks", the results' order the
    kernels permute the input's columns to)."""
    from moe.backends.triton._gemm import NIBBLE_ORDER, _nibble_asm

    assert sorted(NIBBLE_ORDER) == [0, 1, 2, 3]

    def value(q):
        return {"int4": q - 8.0, "int4_zp": float(q), "e2m1": float(_e2m1(np.array([q]))[0])}[code]

    def unpack(word, fmt):
        lo, hi = word & 0xFFFF, word >> 16
        dt = torch.bfloat16 if fmt == "bf16" else torch.float16
        return [float(torch.tensor([h - 65536 if h >= 32768 else h], dtype=torch.int16).view(dt)) for h in (lo, hi)]

    for high, masks in itertools.product((False, True), (False, True)):
        order = NIBBLE_ORDER if masks else (0, 1, 2, 3)
        program = _nibble_asm(high, code, dtype, masks)
        for b in range(256):
            for pos in range(4):
                word = b << (8 * pos) | (0x5A << (8 * ((pos + 1) % 4)))  # a neighbour byte that must not leak in
                r0, r1 = _run_ptx(program, word)
                got = unpack(r0, dtype) + unpack(r1, dtype)
                nibble = (b >> 4) if high else (b & 0xF)
                want = value(nibble)
                at = order.index(pos)
                assert got[at] == want and (want != 0 or np.signbit(got[at]) == np.signbit(want)), (
                    f"{code} {dtype} {'high' if high else 'low'} nibble of byte {b:#04x} at position {pos}: "
                    f"{got[at]} != {want}")
                n2 = (0x5A >> 4) if high else (0x5A & 0xF)
                assert got[order.index((pos + 1) % 4)] == value(n2)


@needs_triton
@pytest.mark.parametrize("name", ["w4a16", "mxfp4", "w8a16"])
def test_the_16bit_decode_runs_on_nvidia_targets_only(name):
    """The 16-bit decode (W16) is PTX inline assembly: NVIDIA targets take it (packed pairs for 4-bit tiles
    with dequant_math="pairs"), ROCm targets and fp32 activations the plain-Triton fp32 decode."""
    import dataclasses

    from moe.backends.triton import config, modes
    from moe.contract import ExpertsProblem
    from moe.target import TARGETS

    def w16(target, dtype=torch.bfloat16, math="scalar", order="bytes"):
        p = ExpertsProblem("cuda", dtype, 4, 8, 8, 256, 256, 2, target=TARGETS[target])
        p = dataclasses.replace(p, quant=named(name))
        cfg = config.default_config(p).model_copy(update={"dequant_math": math, "decode_order": order})
        m1, m2 = modes.gemm_modes(cfg, p, direct=False, tma1=False, tma2=False, pdl=False, interp=False, ieee=False)
        assert m1["W16"] == m2["W16"]
        return m1["W16"]

    # bit 1: the 16-bit decode; 4-bit tiles only: bit 2 the packed scale multiplies, bit 4 the mask order
    packed = name != "w8a16"
    assert w16("h200") == 1 and w16("a100") == 1
    assert w16("h200", math="pairs") == (3 if packed else 1)
    assert w16("h200", order="masks") == (5 if packed else 1)
    assert w16("h200", math="pairs", order="masks") == (7 if packed else 1)
    assert not w16("mi300x") and not w16("mi300x", math="pairs", order="masks") and not w16("h200", torch.float32)


def test_the_16bit_decode_path_compiles_for_sm90():
    """The GPU's bf16/fp16 decode (W16) does not run under the interpreter: compile it for sm90 (a cubin,
    through Triton's ptxas), in a process without TRITON_INTERPRET, with the scale multiplies scalar and in
    packed pairs (``dequant_math="pairs"``, the prepared scales' dtypes), the decode in byte and mask order."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, str(root / "tests" / "sm90_compile.py")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    assert run.stdout.count(": ok") == 11, run.stdout


# ---------------------------------------------------------------- moe bench --quant
def test_bench_quant_weight_only_row_and_header(capsys):
    from moe.cli import main

    assert main(["bench", "--quant", "w4a16_zp", "--preset", "default", "--m", "1", "--backends", "torch",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert ("quantization scheme w4a16_zp: weights int4 per group of 128 with zero points, activations unquantized "
            "(weight-only); ") in out
    p = moe.workload.PRESETS["default"]
    assert f"{expert_weight_bytes(p, 4, 'w4a16_zp') / 1e6:.3g} MB an expert (data + scales + zeros)" in out
    row = next(ln for ln in out.splitlines() if ln.split()[2:4] == ["torch", "w4a16_zp"])
    assert "quantization error vs unquantized" in row and row.split()[11].endswith("x")


def test_bench_quant_refuses_a_group_size_that_does_not_divide_the_preset():
    import moe.bench

    with pytest.raises(moe.bench.BenchError, match=r"--quant w4a16 with --preset gptoss20b: group_size: int4 groups "
                                                   r"of 128 input elements do not divide the 2880"):
        moe.bench.resolve_request("gptoss20b", (1,), "cpu", None, ("torch",), "w4a16")
    assert moe.bench.resolve_request("gptoss20b", (1,), "cpu", None, ("torch",), "mxfp4").quant == ("mxfp4",)


@pytest.mark.parametrize("name", ["w4a16_zp", "nvfp4"])
def test_torch_compile_fullgraph_traces_a_weight_only_layer(name):
    """Zero points and global scales cross the custom op with the data and scales."""
    layer = _layer(name, dtype=torch.float32)
    x, logits = torch.randn(3, K), torch.randn(3, E)
    eager = layer(x, logits)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x, logits), eager)


def _decode_config(name, experts: int, hidden: int, inter: int, top_k: int, tokens: int):
    import dataclasses

    from moe.backends.triton.config import default_config
    from moe.contract import ExpertsProblem

    prob = ExpertsProblem("cuda", torch.bfloat16, tokens, experts, experts, hidden, inter, top_k)
    return default_config(dataclasses.replace(prob, quant=named(name) if isinstance(name, str) else name))


@pytest.mark.parametrize("name", ["w4a16", "w4a16_zp", "mxfp4", "nvfp4", "w8a16", "fp8_w8a16"])
def test_weight_only_heuristic_keeps_every_sm_busy_and_decodes_from_pointer_loads(name):
    """Weight-only decode tiles: pointer loads (tiles decoded in the dot's register layout), GEMM2 output
    tiles narrowed until the grid has MIN_PROGRAMS programs (mixtral at one token: 2 experts x 4096 / 32,
    still short of it: the reduction then in 4 parts) except e2m1's 128-wide tiles below a long reduction,
    256-wide K steps for GEMM2's long reductions except for fp8 and int4 weights and for symmetric int4's
    GEMM1 at one or two rows an expert, and group scales on the weight tiles (where their prepared loads
    pipeline)."""
    from moe.backends.triton.config import MIN_PROGRAMS

    cfg = _decode_config(name, 8, 4096, 14336, 2, 1)
    assert (cfg.gemm1.loads, cfg.gemm2.loads) == ("pointer", "pointer")
    if name in ("mxfp4", "nvfp4"):  # WIDE_E2M1_ROWS: 128 wide in both GEMMs, GEMM2 in 4 stages
        assert (cfg.gemm1.block_n, cfg.gemm2.block_n, cfg.gemm2.num_stages) == (128, 128, 4)
    else:
        assert cfg.gemm2.block_n == 32 and MIN_PROGRAMS > 2 * 4096 // 32  # the narrowest tile, still short of it
    assert cfg.gemm2.block_k == (128 if name in ("fp8_w8a16", "w4a16", "w4a16_zp") else 256)
    # DEEP_INT4_GEMM1_ROWS: symmetric int4's GEMM1 in 256-deep steps, 4 stages, at one row an expert, not at 4
    assert (cfg.gemm1.block_k, cfg.gemm1.num_stages) == ((256, 4) if name == "w4a16" else (128, 5))
    assert _decode_config(name, 8, 4096, 14336, 2, 16).gemm1.block_k == 128
    if name in ("mxfp4", "nvfp4"):  # the wide tiles up to 4 rows an expert; at 16 narrowed again
        assert _decode_config(name, 8, 4096, 14336, 2, 16).gemm2.block_n == 128
        assert _decode_config(name, 8, 4096, 14336, 2, 64).gemm2.block_n == 64
    assert cfg.group_scales == "weights"  # where the compiler pipelines the prepared scales' loads
    assert (cfg.split_k, cfg.combine) == (4, "reduce")  # still short of MIN_PROGRAMS: GEMM2 in parts
    wide = _decode_config(name, 256, 7168, 2048, 8, 16)  # dsv3 at 16 tokens: enough programs, N = 2048
    assert (wide.gemm2.block_n, wide.gemm2.block_k, wide.split_k) == (128, 128, 1)
    prefill = _decode_config(name, 8, 4096, 14336, 2, 4096)
    assert prefill.gemm1.loads == "pointer" and prefill.block_m >= 64 and prefill.group_scales == "weights"
    # packed scale multiplies where they measured faster (mxfp4's decode tiles), else scalar
    assert (cfg.dequant_math, wide.dequant_math) == (("pairs",) * 2 if name == "mxfp4" else ("scalar",) * 2)
    assert prefill.dequant_math == "scalar"
    # the nibble decode's mask order on 4-bit decode tiles below a long GEMM2 reduction (mixtral's 14336)
    assert cfg.decode_order == "bytes" and prefill.decode_order == "bytes"
    assert wide.decode_order == ("masks" if name in ("w4a16", "w4a16_zp", "mxfp4", "nvfp4") else "bytes")


@needs_triton
@pytest.mark.parametrize("name", ["w4a16", "w4a16_zp"])
@pytest.mark.parametrize("group_scales,gate_up", [("weights", "two_dots"), ("accumulator", "two_dots"),
                                                  ("accumulator", "one_dot")])
def test_int4_group_scales_on_the_weights_or_the_partial_products(name, group_scales, gate_up):
    """Both places for int4 group scales (zero points on the partial products through the input's row
    sums) match the reference, NaN-poisoned, with 64-wide K steps inside groups of 128 (four steps), in
    both GEMM1 loops; a K step wider than a group is refused for the partial products, naming the fix."""
    from moe.backends.triton import GemmTile, KernelConfig, triton_experts
    from moe.contract import ExpertsArgs
    from moe.functional import _problem

    x, _, _, q13, q2, weights, ids = _inputs(name, 5, K=256, dtype=torch.bfloat16, seed=7)
    args = ExpertsArgs(x, q13, q2, weights, ids)
    problem = _problem(args, moe.ActivationSpec.parse("silu"), False, None)
    tile = GemmTile(block_n=64, block_k=64, group_m=1, num_warps=4, num_stages=1)
    out = torch.full_like(x, float("nan"))
    triton_experts(args, problem, out, KernelConfig(block_m=16, gemm1=tile, gemm2=tile, group_scales=group_scales,
                                                    gate_up=gate_up))
    ref = moe.fused_experts(x, q13, q2, weights, ids, backend="torch")
    assert_close(out, ref, scheme=name, what=f"triton {name} group_scales={group_scales} {gate_up}")
    if group_scales == "accumulator":
        wide = tile.model_copy(update={"block_k": 256})
        with pytest.raises(ValueError, match=r"gemm1.block_k=256 must divide the group size 128; use block_k <= "
                                             r"128 or group_scales='weights'"):
            triton_experts(args, problem, out, KernelConfig(block_m=16, gemm1=wide, gemm2=tile,
                                                            group_scales="accumulator"))


@needs_triton
def test_weight_only_tiles_asking_for_tma_loads_warn_and_load_by_pointers(monkeypatch):
    """A weight-only config asking for tensor-descriptor loads (as old tuned files may) runs its decoded tiles
    from pointer loads, with one warning that says so, and the pointer-load result bit for bit."""
    import warnings

    import moe.backends.triton as triton_backend
    from moe.backends.triton import GemmTile, KernelConfig, triton_experts

    monkeypatch.setattr(triton_backend, "_tma_warned", set())  # the warning is once a process
    from moe.contract import ExpertsArgs
    from moe.functional import _problem

    x, _, _, q13, q2, weights, ids = _inputs("mxfp4", 5, K=256, dtype=torch.bfloat16, seed=3)
    args = ExpertsArgs(x, q13, q2, weights, ids)
    problem = _problem(args, moe.ActivationSpec.parse("silu"), False, None)
    outs = {}
    for loads in ("pointer", "tma"):
        tile = GemmTile(block_n=64, block_k=64, group_m=1, num_warps=4, num_stages=1, loads=loads)
        outs[loads] = torch.full_like(x, float("nan"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            triton_experts(args, problem, outs[loads], KernelConfig(block_m=16, gemm1=tile, gemm2=tile))
        said = [str(w.message) for w in caught if "loads='tma'" in str(w.message)]
        assert (loads == "tma") == any("decoded in registers from pointer loads" in m for m in said), said
    assert torch.equal(outs["tma"], outs["pointer"])
    assert_close(outs["tma"], moe.fused_experts(x, q13, q2, weights, ids, backend="torch"), scheme="mxfp4",
                 what="mxfp4 with loads='tma' asked")


@needs_triton
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("zero_point", [False, True])
def test_int4_groups_of_32_and_64_run_on_the_kernels(group, zero_point):
    """int4 with groups of 32 and 64 (through a QuantConfig; the names use 128) runs on the Triton backend,
    NaN-poisoned, against the reference, and its heuristic decode steps hold whole groups, their scales on
    the weight tiles."""
    scheme = WeightScheme(format="int4", granularity="group", group_size=group, zero_point=zero_point)
    config = QuantConfig(weights=scheme)
    g = torch.Generator().manual_seed(group + zero_point)
    T, E, K, N, k = 5, 4, 256, 128, 2
    x = torch.randn(T, K, generator=g).to(torch.bfloat16)
    w13 = torch.randn(E, 2 * N, K, generator=g) / K**0.5
    w2 = torch.randn(E, K, N, generator=g) / N**0.5
    weights, ids = moe.fused_topk(torch.randn(T, E, generator=g), k)
    q13, q2 = quantize_weight(w13, scheme, parts=2), quantize_weight(w2, scheme)
    out = torch.full_like(x, float("nan"))
    moe.fused_experts(x, q13, q2, weights, ids, backend="triton", out=out)
    assert moe.last_decision().chosen == "triton"
    ref = moe.fused_experts(x, q13, q2, weights, ids, backend="torch")
    assert_close(out, ref, scheme="w4a16_zp" if zero_point else "w4a16", what=f"int4 groups of {group}")
    cfg = _decode_config(config, 8, 4096, 14336, 2, 1)
    assert cfg.group_scales == "weights"  # a K step of whole groups: their scales a [groups, columns] tile
    assert cfg.gemm1.block_k % group == 0 and cfg.gemm2.block_k % group == 0


@needs_triton
def test_int4_groups_the_kernels_do_not_take_are_refused_with_the_reason():
    """Groups of 48: not a scheme the Triton backend declares (the registry names what it runs); a K step
    that neither divides nor lies within the groups is refused before compiling, naming the fix."""
    from moe.backends.triton import GemmTile, KernelConfig, triton_experts
    from moe.contract import ExpertsArgs
    from moe.functional import _problem
    from moe.registry import BackendUnavailableError

    scheme = WeightScheme(format="int4", granularity="group", group_size=48)
    g = torch.Generator().manual_seed(48)
    x = torch.randn(3, 192, generator=g).to(torch.bfloat16)
    weights, ids = moe.fused_topk(torch.randn(3, 4, generator=g), 2)
    q13 = quantize_weight(torch.randn(4, 2 * 96, 192, generator=g) / 14, scheme, parts=2)
    q2 = quantize_weight(torch.randn(4, 192, 96, generator=g) / 10, scheme)
    with pytest.raises(BackendUnavailableError, match=r"backend 'triton' cannot run this problem: runs the "
                                                      r"quantization schemes .*not .*\"group_size\":48"):
        moe.fused_experts(x, q13, q2, weights, ids, backend="triton")
    args = ExpertsArgs(x, q13, q2, weights, ids)
    problem = _problem(args, moe.ActivationSpec.parse("silu"), False, None)
    tile = GemmTile(block_n=64, block_k=64, group_m=1, num_warps=4, num_stages=1)
    with pytest.raises(ValueError, match=r"gemm1.block_k=64 and the weights' groups of 48 input elements: one "
                                         r"must divide the other"):
        triton_experts(args, problem, torch.empty_like(x), KernelConfig(block_m=16, gemm1=tile, gemm2=tile))
