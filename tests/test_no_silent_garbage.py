"""One regression test per finding of the "no silent garbage" review (CPU; the Triton kernels under the
interpreter). Each was a wrong result, a crash or an error blaming the wrong thing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from cases import Case, make_inputs, oracle

import moe
from moe.testing import assert_close

BACKENDS = ["torch", "triton", "torch_grouped"]


def _inputs(dtype=torch.float32, **kw):
    return make_inputs(Case(T=9, E=8, K=32, N=24, k=2, **kw), dtype)


def _call(inp, backend, **kw):
    args = dict(inp)
    x, w13, w2, w, ids = (args.pop(n) for n in ("hidden_states", "w13", "w2", "topk_weights", "topk_ids"))
    return moe.fused_experts(x, w13, w2, w, ids, backend=backend, **{**args, **kw})


# 1. layouts ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_1_transposed_input_and_transposed_or_strided_out(backend, dtype):
    inp = _inputs(dtype)
    ref = oracle(inp)
    x = inp["hidden_states"]
    xt = torch.randn(x.shape[1], x.shape[0]).to(dtype).t()  # [T, K] view of [K, T] storage
    xt.copy_(x)
    got = _call(dict(inp, hidden_states=xt), backend)
    assert got.is_contiguous()  # a fresh out is row-major whatever the input's strides
    assert_close(got, ref, what=f"{backend} transposed hidden_states")
    for out in (torch.full((x.shape[1], x.shape[0]), float("nan"), dtype=dtype).t(),
                torch.full((x.shape[0], 3 * x.shape[1]), float("nan"), dtype=dtype)[:, 1::3]):
        assert _call(inp, backend, out=out) is out
        assert_close(out, ref, what=f"{backend} out strides {out.stride()}")


def test_1_layer_with_transposed_input():
    layer = moe.FusedMoE(8, 2, 32, 24, params_dtype=torch.float32, backend="triton")
    x = torch.randn(32, 6).t()
    with torch.no_grad():
        assert_close(layer(x), moe.FusedMoE.forward(layer.to(torch.float32), x.contiguous()))


# 2. expert maps --------------------------------------------------------------------------------------------
def test_2_bad_maps_are_refused_where_built_and_where_used():
    with pytest.raises(ValueError, match=r"expert_map: values must be -1 \(another rank\) or a local id in \[0, 3\)"):
        moe.FusedMoE(4, 2, 16, 8, expert_map=torch.tensor([0, 5, 1, -1]))
    with pytest.raises(ValueError, match=r"each local id 0\.\.1 must appear exactly once"):
        moe.FusedMoE(4, 2, 16, 8, expert_map=torch.tensor([0, 0, -1, -1]))
    with pytest.raises(ValueError, match="holds no local expert"):
        moe.FusedMoE(4, 2, 16, 8, expert_map=torch.tensor([-1, -1, -1, -1]))
    inp = _inputs(expert_map=True)
    bad = inp["expert_map"].clone()
    bad[2] = 7  # only 4 local experts
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=r"expert_map: values must be .* global experts \[2\] map to \[7\]"):
            _call(dict(inp, expert_map=bad), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_2_out_of_range_local_ids_are_remote_inside_every_backend(backend):
    """With the value check bypassed (as on a GPU without validation mode), a local id past the local
    experts (or below -1) is treated as remote: no crash, no NaN, those pairs contribute nothing."""
    inp = _inputs(expert_map=True)
    bad = inp["expert_map"].clone()
    bad[2], bad[4] = 7, -5
    args = moe.ExpertsArgs(inp["hidden_states"], inp["w13"], inp["w2"], inp["topk_weights"], inp["topk_ids"],
                           expert_map=bad)
    problem = moe.ExpertsProblem("cpu", torch.float32, 9, 4, 8, 32, 24, 2, has_expert_map=True)
    out = torch.full_like(inp["hidden_states"], float("nan"))
    moe.get_backend(backend).apply(args, problem, out)
    remote = bad.clone()
    remote[2] = remote[4] = -1
    assert_close(out, oracle(dict(inp, expert_map=remote)), what=backend)


# 3. fully masked tokens ------------------------------------------------------------------------------------
def _masked_logits():
    logits = torch.randn(4, 8)
    logits[1] = float("-inf")
    return logits


@pytest.mark.parametrize("gpu_path", [False, True])
def test_3_fully_masked_token_gets_zero_weights_and_the_lowest_ids(gpu_path):
    import moe.routing.reference as ref
    import moe.routing.triton as kernels

    impl = kernels if gpu_path else ref
    logits = _masked_logits()
    bias = torch.randn(8)
    calls = {
        "softmax": lambda: (impl.fused_topk if gpu_path else impl.fused_topk_ref)(logits, 3),
        "sigmoid": lambda: (impl.fused_topk if gpu_path else impl.fused_topk_ref)(logits, 3, scoring="sigmoid"),
        "topk_softmax": lambda: (impl.topk_softmax if gpu_path else impl.topk_softmax_ref)(logits, 3),
        "grouped+bias": lambda: (impl.grouped_topk if gpu_path else impl.grouped_topk_ref)(
            logits, 3, num_expert_group=4, topk_group=2, e_score_correction_bias=bias),
    }
    for what, call in calls.items():
        w, ids = call()
        assert torch.isfinite(w).all(), what
        assert w[1].tolist() == [0.0, 0.0, 0.0] and ids[1].tolist() == [0, 1, 2], what
        assert (w[[0, 2, 3]].sum(-1) > 0).all(), what


def test_3_masked_token_output_is_the_shared_experts_alone():
    shared = moe.GatedMLP(16, 8, dtype=torch.float32)
    layer = moe.FusedMoE(8, 2, 16, 8, params_dtype=torch.float32, gate=False, shared_experts=shared)
    x = torch.randn(4, 16)
    with torch.no_grad():
        y = layer(x, _masked_logits())
        assert torch.isfinite(y).all()
        assert_close(y[1], shared(x[1]))


def test_3_nan_routing_weights_are_refused():
    inp = _inputs()
    inp["topk_weights"][3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"topk_weights: 1 NaN or infinite values \(first rows \[3\]\)"):
        _call(inp, "torch")


# 4. gradients ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_4_gradients_are_never_dropped(backend):
    """Every backend returns a result with autograd history (forward on the backend, backward through the
    reference): the same gradients as the differentiable torch backend."""
    inp = _inputs()
    grads = {}
    for name in ("torch", backend):
        leaves = {k: inp[k].clone().requires_grad_() for k in ("hidden_states", "w13", "w2", "topk_weights")}
        y = _call({**inp, **leaves}, name)
        assert y.requires_grad and y.grad_fn is not None
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads[name] = {k: v.grad for k, v in leaves.items()}
    for k in grads["torch"]:
        assert_close(grads[backend][k], grads["torch"][k], what=f"{backend} d/d{k}")


def test_4_layer_without_no_grad_and_compiled_backward():
    layer = moe.FusedMoE(8, 2, 16, 8, params_dtype=torch.float32, backend="triton")
    x = torch.randn(5, 16, requires_grad=True)
    layer(x).sum().backward()
    eager = x.grad.clone()
    assert layer.gate.weight.grad is not None  # the router learns through the routing weights
    x.grad = None
    torch._dynamo.reset()
    torch.compile(layer, fullgraph=True, backend="aot_eager")(x).sum().backward()
    assert_close(x.grad, eager)


# 5. errors that name the right thing -----------------------------------------------------------------------
def test_5_errors_blame_the_right_parameter():
    layer = moe.FusedMoE(8, 2, 16, 8, params_dtype=torch.float32, gate=False)
    with pytest.raises(ValueError, match=r"router_logits: expected \[4, 8\] .* for 4 tokens and 8 experts, got \(4, 9\)"):
        layer(torch.randn(4, 16), torch.randn(4, 9))
    inp = _inputs()
    with pytest.raises(ValueError, match=r"w2: expected shape \[num_experts, hidden_size=32, intermediate_size\], "
                                         r"got \(8, 24, 32\) \(a transposed w2"):
        _call(dict(inp, w2=inp["w2"].transpose(1, 2)), "torch")
    bf16 = moe.FusedMoE(8, 2, 16, 8, params_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"hidden_states: dtype torch.float32 differs from the layer's parameters"):
        bf16(torch.randn(3, 16))
    with pytest.raises(TypeError, match=r"params_dtype: torch\.int8 is not allowed"):
        moe.FusedMoE(8, 2, 16, 8, params_dtype=torch.int8)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        moe.FusedMoE(8, 2, 16, 8, backend="nope")


def test_5_config_errors_do_not_dump_the_input():
    with pytest.raises(ValueError) as err:
        moe.MoEConfig(num_experts=8, top_k=9, hidden_size=8, intermediate_size=8)
    assert "top_k=9 must be <= num_experts=8" in str(err.value) and "input_value" not in str(err.value)


def test_regression_cases_cover_the_layouts_of_the_parity_helper():
    kinds = {c.layout for c in moe.testing.parity_cases()}
    assert {"transposed", "strided_out", "in_place"} <= kinds
    assert dataclasses.replace(moe.testing.parity_cases()[0], layout="transposed").layout == "transposed"
