from __future__ import annotations

import pytest
import torch
from oracle import experts64, topk_route64

import moe
from moe.testing import assert_close


def _layer(**kw):
    base = dict(num_experts=8, top_k=2, hidden_size=24, intermediate_size=16, params_dtype=torch.float32)
    base.update(kw)
    return moe.FusedMoE(**base)


def test_forward_matches_oracle_2d_and_3d():
    layer = _layer()
    x = torch.randn(2, 5, 24)
    out = layer(x)
    assert out.shape == x.shape
    flat = x.reshape(-1, 24)
    w, ids = topk_route64(layer.gate(flat).detach(), 2)
    ref = experts64(flat, layer.w13_weight, layer.w2_weight, w, ids)
    assert_close(out.reshape(-1, 24), ref)
    assert_close(layer(flat), ref)


def test_router_logits_given_without_gate():
    layer = _layer(gate=False)
    x, logits = torch.randn(6, 24), torch.randn(6, 8)
    w, ids = topk_route64(logits, 2)
    assert_close(layer(x, logits), experts64(x, layer.w13_weight, layer.w2_weight, w, ids))
    with pytest.raises(ValueError, match="router_logits is required"):
        layer(x)


def test_per_expert_weight_loading():
    layer = _layer(bias=True)
    E, N, K = 8, 16, 24
    w1, w3, w2 = torch.randn(E, N, K), torch.randn(E, N, K), torch.randn(E, K, N)
    b1, b3, b2 = torch.randn(E, N), torch.randn(E, N), torch.randn(E, K)
    for e in range(E):
        for shard, t in (("w1", w1), ("w3", w3), ("w2", w2), ("w1_bias", b1), ("w3_bias", b3), ("w2_bias", b2)):
            assert layer.weight_loader(t[e], e, shard)
    assert torch.equal(layer.w13_weight, torch.cat([w1, w3], dim=1))
    assert torch.equal(layer.w2_weight, w2)
    assert torch.equal(layer.w13_bias, torch.cat([b1, b3], dim=1))
    with pytest.raises(ValueError, match=r"w1 of expert 0 must have shape \(16, 24\), got \(24, 16\)"):
        layer.weight_loader(w1[0].t(), 0, "w1")
    with pytest.raises(ValueError, match="shard_id must be w1, w3, w2"):
        layer.weight_loader(w1[0], 0, "w4")


def test_fused_loading_with_expert_map():
    emap = torch.tensor([-1, 0, -1, 1, -1, 2, -1, 3], dtype=torch.int32)  # odd experts local
    layer = _layer(expert_map=emap)
    assert layer.w13_weight.shape[0] == 4
    w13, w2 = torch.randn(8, 32, 24), torch.randn(8, 24, 16)
    layer.load_fused_weights(w13=w13, w2=w2)
    assert torch.equal(layer.w13_weight, w13[1::2]) and torch.equal(layer.w2_weight, w2[1::2])
    assert not layer.weight_loader(torch.randn(16, 24), 0, "w1")  # expert 0 is not local
    with pytest.raises(ValueError, match=r"w13 must have shape \(8, 32, 24\)"):
        layer.load_fused_weights(w13=w13[:4])
    x = torch.randn(9, 24)
    w, ids = topk_route64(layer.gate(x).detach(), 2)
    assert_close(layer(x), experts64(x, layer.w13_weight, layer.w2_weight, w, ids, expert_map=emap))


def test_shared_experts_with_sigmoid_gate():
    shared = moe.GatedMLP(24, 12, dtype=torch.float32)
    layer = _layer(shared_experts=shared, shared_expert_gate=True)
    x = torch.randn(5, 24)
    w, ids = topk_route64(layer.gate(x).detach(), 2)
    routed = experts64(x, layer.w13_weight, layer.w2_weight, w, ids)
    gate_up = shared.gate_up_proj(x).double()
    s = shared.down_proj.weight.double() @ (torch.nn.functional.silu(gate_up[:, :12]) * gate_up[:, 12:]).t()
    ref = routed + torch.sigmoid(layer.shared_expert_gate(x).double()) * s.t()
    assert_close(layer(x), ref.detach())


def test_deepseek_v3_layer():
    routing = moe.RoutingConfig(method="grouped_topk", scoring="sigmoid", num_expert_group=4, topk_group=2,
                                use_correction_bias=True, routed_scaling_factor=2.5)
    layer = _layer(num_experts=16, top_k=4, routing=routing)
    with torch.no_grad():
        layer.e_score_correction_bias.normal_()
    x = torch.randn(7, 24)
    from oracle import grouped_route64
    w, ids = grouped_route64(layer.gate(x).detach(), 4, 4, 2, True, "sigmoid", layer.e_score_correction_bias, 2.5)
    assert_close(layer(x), experts64(x, layer.w13_weight, layer.w2_weight, w, ids))


def test_empty_input():
    layer = _layer()
    assert layer(torch.randn(0, 24)).shape == (0, 24)
    assert layer(torch.randn(2, 0, 24)).shape == (2, 0, 24)


def test_layer_bad_config():
    with pytest.raises(ValueError, match="top_k=9 must be <= num_experts=8"):
        _layer(top_k=9)
    with pytest.raises(ValueError, match="apply_router_weight_on_input needs top_k=1"):
        _layer(apply_router_weight_on_input=True)
    with pytest.raises(ValueError, match=r"hidden_states: expected \[T, 24\]"):
        _layer()(torch.randn(3, 25))
    with pytest.raises(ValueError, match=r"expert_map: each local id 0\.\.1 must appear exactly once"):
        _layer(expert_map=torch.tensor([0, 0, -1, -1, -1, -1, -1, -1]))


@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
def test_torch_compile_fullgraph_traces_the_layer(activation):
    """Dynamo traces FusedMoE.forward in one graph (the experts are the moe::fused_experts custom op)."""
    shared = moe.GatedMLP(24, 12, dtype=torch.float32)
    layer = _layer(activation=activation, shared_experts=shared, shared_expert_gate=True, backend="torch")
    x = torch.randn(2, 5, 24)
    eager = layer(x)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)
    out = torch.compile(lambda a, b, c, w, i: moe.fused_experts(a, b, c, w, i, activation="gelu", backend="torch"),
                        fullgraph=True, backend="eager")
    w, ids = moe.fused_topk(torch.randn(10, 8), 2)
    a = torch.randn(10, 24)
    ref = moe.fused_experts(a, layer.w13_weight, layer.w2_weight, w, ids, activation="gelu", backend="torch")
    torch.testing.assert_close(out(a, layer.w13_weight, layer.w2_weight, w, ids), ref, rtol=0, atol=0)
