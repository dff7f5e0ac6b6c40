"""The quant seam on CPU: schemes and their canonical keys, QuantizedWeight validation, quantize and
dequantize against float64 decoders written here, the scaled test scheme through fused_experts eagerly
and under torch.compile(fullgraph=True), backends declaring their schemes, and the errors of a call whose
weights and scheme disagree."""

from __future__ import annotations

import pytest
import torch
from cases import Case, make_inputs, oracle

import moe
from moe.quant import NAMES, SCALED, QuantConfig, QuantizedWeight, WeightScheme, dequantize, named, quantize
from moe.testing import assert_close


def test_names_keys_and_parsing_round_trip():
    for name, cfg in NAMES.items():
        assert named(name) is cfg and cfg.key() == name and QuantConfig.parse(name) is cfg
    custom = QuantConfig(weights=WeightScheme(format="fp8", granularity="block", block=(64, 128)))
    assert QuantConfig.parse(custom.key()) == custom and custom.key().startswith("{")
    assert QuantConfig.parse(None).key() == "none" and SCALED.key() == "scaled"
    with pytest.raises(ValueError, match="unknown quantization scheme 'fp9'; named schemes: fp8_tensor"):
        named("fp9")
    with pytest.raises(ValueError, match="int8 weights are stored per channel, got 'tensor'"):
        WeightScheme(format="int8", granularity="tensor")
    with pytest.raises(ValueError, match="fp8 activations need fp8 weights, got int8"):
        QuantConfig(weights=WeightScheme(format="int8", granularity="channel"),
                    activations=moe.quant.ActivationScheme(format="fp8", granularity="token"))


def _decode(data: torch.Tensor, scale: torch.Tensor, scheme: WeightScheme, parts: int) -> torch.Tensor:
    """An independent float64 decoder of the canonical layouts: element by element from its scale."""
    e, rows, cols = data.shape
    out = torch.empty(e, rows, cols, dtype=torch.float64)
    per_part = rows // parts
    for i in range(e):
        for r in range(rows):
            p = r // per_part
            for c in range(cols):
                if scheme.granularity == "tensor":
                    s = scale[i, p]
                elif scheme.granularity == "channel":
                    s = scale[i, r]
                else:
                    br, bc = scheme.block
                    nr = -(-per_part // br)
                    s = scale[i, p * nr + (r - p * per_part) // br, c // bc]
                out[i, r, c] = float(data[i, r, c].to(torch.float64)) * float(s)
    return out


@pytest.mark.parametrize(("name", "parts", "rows", "cols"), [
    ("fp8_tensor", 2, 6, 5), ("fp8_channel", 1, 5, 7), ("fp8_block", 2, 10, 9), ("int8_channel", 2, 4, 6),
])
def test_quantize_dequantize_against_a_float64_decoder(name, parts, rows, cols):
    scheme = named(name).weights
    if scheme.granularity == "block":
        scheme = WeightScheme(format="fp8", granularity="block", block=(2, 4))  # ragged edge blocks at this size
    w = torch.randn(3, rows, cols) * 3
    qw = quantize(w, scheme, parts=parts)
    assert qw.shape == w.shape and qw.scale.dtype == torch.float32
    assert_close(dequantize(qw, torch.float64), _decode(qw.data, qw.scale, scheme, parts))
    err = ((dequantize(qw) - w).norm() / w.norm()).item()
    assert err < (0.04 if scheme.format == "fp8" else 0.01), err  # e4m3 keeps 3 mantissa bits, int8 127 steps
    amax = qw.data.to(torch.float32).abs().amax()
    assert amax == (448.0 if scheme.format == "fp8" else 127.0)  # the largest magnitude maps to the format's


def test_scale_layout_keeps_gate_and_up_blocks_apart():
    """N = 3 rows per part with 2-row blocks: 2 + 2 row blocks (the gate's, then the up's), never one
    straddling both."""
    scheme = WeightScheme(format="fp8", granularity="block", block=(2, 128))
    qw = quantize(torch.randn(1, 6, 5), scheme, parts=2)
    assert tuple(qw.scale.shape) == (1, 4, 1)


@pytest.mark.parametrize(("fields", "match"), [
    (dict(scale=torch.ones(2, 3)), r"w.scale: fp8 tensor scales of a \(2, 4, 8\) weight with parts=2 have shape \(2, 2\)"),
    (dict(scale=torch.ones(2, 2, dtype=torch.float16)), "w.scale: fp8 scales are float32"),
    (dict(data=torch.zeros(2, 4, 8)), "w.data: fp8 weights are stored as float8_e4m3fn, got torch.float32"),
    (dict(parts=3), "w.parts: must be 1, or 2"),
    (dict(zero=torch.zeros(2, 4, 8)), "w.zero: fp8 weights have no zero"),
])
def test_bad_quantized_weights_name_the_field(fields, match):
    from moe.quant import check_quantized_weight

    base = dict(data=torch.zeros(2, 4, 8).to(torch.float8_e4m3fn), scale=torch.ones(2, 2),
                scheme=named("fp8_tensor").weights, parts=2)
    qw = object.__new__(QuantizedWeight)  # skip __post_init__ to check the function itself
    for k, v in {**base, **fields}.items():
        object.__setattr__(qw, k, v)
    for k in ("zero", "global_scale"):
        if k not in fields:
            object.__setattr__(qw, k, None)
    with pytest.raises((ValueError, TypeError), match=match):
        check_quantized_weight("w", qw)


def _scaled():
    case = Case(T=6, E=4, K=32, N=16, k=2)
    inp = make_inputs(case)
    q13 = QuantizedWeight(inp["w13"], torch.rand(case.E, 2) + 0.5, SCALED.weights, parts=2)
    q2 = QuantizedWeight(inp["w2"], torch.rand(case.E, 1) + 0.5, SCALED.weights)
    return inp, q13, q2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_scaled_scheme_eager_and_compiled(backend):
    inp, q13, q2 = _scaled()
    ref = oracle(dict(inp, w13=dequantize(q13, torch.float64), w2=dequantize(q2, torch.float64)))

    def call(x, w, ids, out):
        return moe.fused_experts(x, q13, q2, w, ids, backend=backend, out=out)

    args = (inp["hidden_states"], inp["topk_weights"], inp["topk_ids"])
    eager = call(*args, torch.full_like(inp["hidden_states"], float("nan")))
    assert_close(eager, ref, scheme="scaled")
    assert moe.last_decision().chosen == backend
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")(
        *args, torch.full_like(inp["hidden_states"], float("nan")))
    assert torch.equal(compiled, eager)


def test_backends_declare_their_schemes():
    inp, q13, q2 = _scaled()
    with pytest.raises(moe.BackendUnavailableError, match="runs the quantization schemes fp8_channel, none, not scaled"):
        moe.fused_experts(inp["hidden_states"], q13, q2, inp["topk_weights"], inp["topk_ids"], backend="torch_grouped")
    moe.fused_experts(inp["hidden_states"], q13, q2, inp["topk_weights"], inp["topk_ids"])
    d = moe.last_decision()
    assert "not scaled" in {c.name: c.reason for c in d.candidates}["torch_grouped"]


def test_weights_and_scheme_must_agree():
    inp, q13, q2 = _scaled()
    x, w, ids = inp["hidden_states"], inp["topk_weights"], inp["topk_ids"]
    with pytest.raises(ValueError, match=r"quant: fp8_channel stores weights as .*fp8.* but w13 is stored as .*scaled"):
        moe.fused_experts(x, q13, q2, w, ids, quant="fp8_channel")
    with pytest.raises(TypeError, match="quant: fp8_block needs quantized weights, but w13 and w2 are plain tensors"):
        moe.fused_experts(x, inp["w13"], inp["w2"], w, ids, quant="fp8_block")
    with pytest.raises(TypeError, match="w13 and w2: both are QuantizedWeight or both are plain tensors"):
        moe.fused_experts(x, q13, inp["w2"], w, ids)
    with pytest.raises(ValueError, match="quant: unknown quantization scheme 'fp4'"):
        moe.fused_experts(x, inp["w13"], inp["w2"], w, ids, quant="fp4")
    with pytest.raises(ValueError, match="a13_scale: given, but scaled has no static activation scales"):
        moe.fused_experts(x, q13, q2, w, ids, a13_scale=torch.ones(1))


def test_static_activation_scales_are_required_and_checked():
    """fp8_tensor_static needs a13_scale / a2_scale ([1] or [E] fp32): checked before any backend runs."""
    inp = make_inputs(Case(T=3, E=4, K=16, N=8, k=2))
    cfg = named("fp8_tensor_static")
    q13 = quantize(inp["w13"], cfg.weights, parts=2)
    q2 = quantize(inp["w2"], cfg.weights)
    x, w, ids = inp["hidden_states"], inp["topk_weights"], inp["topk_ids"]
    with pytest.raises(ValueError, match="a13_scale: fp8_tensor_static quantizes activations with static scales"):
        moe.fused_experts(x, q13, q2, w, ids, quant=cfg)
    with pytest.raises(ValueError, match=r"a2_scale: expected a \[1\] or \[4\] float32 tensor"):
        moe.fused_experts(x, q13, q2, w, ids, quant=cfg, a13_scale=torch.ones(1), a2_scale=torch.ones(3))


def test_reference_emulates_a_rounded_gemm1_output():
    """``gemm1_dtype`` rounds GEMM1's output before the activation (torch_grouped's scaled grouped GEMM
    writes bf16): float32 changes nothing, bf16 moves some of GEMM2's fp8 inputs across a step, and an
    unquantized problem refuses it."""
    from moe.backends.torch_ref import torch_ref_experts
    from moe.contract import ExpertsArgs, ExpertsProblem

    case = Case(T=16, E=4, K=64, N=32, k=2)
    inp = make_inputs(case, torch.bfloat16)
    cfg = named("fp8_channel")
    args = ExpertsArgs(inp["hidden_states"], quantize(inp["w13"], cfg.weights, parts=2), quantize(inp["w2"], cfg.weights),
                       inp["topk_weights"], inp["topk_ids"])
    prob = ExpertsProblem("cpu", torch.bfloat16, case.T, case.E, case.E, case.K, case.N, case.k, quant=cfg)
    base = torch_ref_experts(args, prob)
    assert torch.equal(torch_ref_experts(args, prob, gemm1_dtype=torch.float32), base)
    rounded = torch_ref_experts(args, prob, gemm1_dtype=torch.bfloat16)
    assert not torch.equal(rounded, base) and (rounded.float() - base.float()).norm() < 0.1 * base.float().norm()
    plain = ExpertsArgs(inp["hidden_states"], inp["w13"], inp["w2"], inp["topk_weights"], inp["topk_ids"])
    with pytest.raises(ValueError, match="gemm1_dtype: only W8A8 schemes"):
        torch_ref_experts(plain, ExpertsProblem("cpu", torch.bfloat16, case.T, case.E, case.E, case.K, case.N, case.k),
                          gemm1_dtype=torch.bfloat16)
