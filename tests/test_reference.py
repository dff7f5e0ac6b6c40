"""The torch reference backend against the independent float64 loop."""

from __future__ import annotations

import pytest
import torch
from cases import Case, make_inputs, oracle, run

import moe
from moe.testing import assert_close

ACTIVATIONS = ["silu", "gelu", "gelu_tanh", "swigluoai", "relu2", "silu_no_mul", "gelu_no_mul"]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
def test_activations_and_biases(activation, bias):
    inputs = make_inputs(Case(T=9, E=6, K=24, N=20, k=2, activation=activation, bias=bias))
    out = run(inputs, "torch")
    assert_close(out, oracle(inputs), what=activation)
    assert moe.last_decision().chosen == "torch"


@pytest.mark.parametrize("case", [
    Case(T=1, E=4, K=16, N=8, k=1),
    Case(T=33, E=5, K=19, N=13, k=3),
    Case(T=33, E=8, K=40, N=24, k=2, expert_map=True),
    Case(T=17, E=64, K=8, N=6, k=8, bias=True),
], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_shapes_and_dtypes(case, dtype):
    inputs = make_inputs(case, dtype)
    out = run(inputs, "torch")
    assert out.dtype == dtype
    assert_close(out, oracle(inputs), what=str(case))


def test_swigluoai_clamp_is_reached():
    inputs = make_inputs(Case(T=16, E=4, K=32, N=16, k=2, activation="swigluoai"))
    h = inputs["hidden_states"] @ inputs["w13"][0].t()
    assert h.abs().max() > 7.0  # the test exercises the clamp
    custom = moe.ActivationSpec(name="swigluoai", alpha=1.5, limit=3.0)
    from oracle import experts64
    ref = experts64(inputs["hidden_states"], inputs["w13"], inputs["w2"], inputs["topk_weights"],
                    inputs["topk_ids"], "swigluoai", alpha=1.5, limit=3.0)
    inputs["activation"] = custom
    assert_close(run(inputs, "torch"), ref)


def test_apply_router_weight_on_input():
    inputs = make_inputs(Case(T=11, E=4, K=16, N=12, k=1))
    from oracle import experts64
    ref = experts64(inputs["hidden_states"], inputs["w13"], inputs["w2"], inputs["topk_weights"],
                    inputs["topk_ids"], on_input=True)
    assert_close(run(inputs, "torch", apply_router_weight_on_input=True), ref)


def test_empty_batch():
    inputs = make_inputs(Case(T=3, E=4, K=16, N=12, k=2))
    x = inputs["hidden_states"][:0]
    out = moe.fused_experts(x, inputs["w13"], inputs["w2"], inputs["topk_weights"][:0], inputs["topk_ids"][:0])
    assert out.shape == (0, 16)


def test_out_buffer_and_in_place():
    inputs = make_inputs(Case(T=7, E=4, K=16, N=12, k=2))
    ref = oracle(inputs)
    out = torch.full_like(inputs["hidden_states"], float("nan"))
    got = run(inputs, "torch", out=out)
    assert got is out
    assert_close(out, ref)
    x = inputs["hidden_states"].clone()
    inputs["hidden_states"] = x
    got = run(inputs, "torch", out=x)  # the in-place variant
    assert got is x
    assert_close(x, ref)


def test_interleaved_checkpoint_conversion():
    n, k = 3, 5
    gate, up = torch.randn(2, n, k), torch.randn(2, n, k)
    inter = torch.stack([gate, up], dim=2).reshape(2, 2 * n, k)  # rows g0 u0 g1 u1 ...
    assert torch.equal(moe.interleaved_to_gate_up(inter), torch.cat([gate, up], dim=1))
    b = torch.stack([gate[..., 0], up[..., 0]], dim=2).reshape(2, 2 * n)
    assert torch.equal(moe.interleaved_to_gate_up(b, dim=-1), torch.cat([gate[..., 0], up[..., 0]], dim=1))
