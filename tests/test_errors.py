"""Every bad input gets an error naming the parameter, what was received and what is allowed."""

from __future__ import annotations

import pytest
import torch
from cases import Case, make_inputs

import moe


@pytest.fixture
def inp():
    return make_inputs(Case(T=4, E=4, K=16, N=8, k=2))


def call(inp, **over):
    a = dict(inp)
    a.update(over)
    x, w13, w2, w, ids = (a.pop(n) for n in ("hidden_states", "w13", "w2", "topk_weights", "topk_ids"))
    return moe.fused_experts(x, w13, w2, w, ids, **a)


@pytest.mark.parametrize("over,exc,match", [
    (lambda i: {"hidden_states": torch.randn(4, 17)}, ValueError, r"w13: its last dim \(hidden_size\) is 16 but hidden_states has hidden_size 17"),
    (lambda i: {"w2": i["w2"][:3]}, ValueError, "w2: has 3 experts but w13 has 4"),
    (lambda i: {"w13": i["w13"][:, :15]}, ValueError, "w13: has 15 rows per expert but the gated activation 'silu' with intermediate_size=8"),
    (lambda i: {"topk_weights": i["topk_weights"][:, :1]}, ValueError, r"topk_weights has shape \(4, 1\) but topk_ids has \(4, 2\)"),
    (lambda i: {"topk_ids": i["topk_ids"].float()}, TypeError, "topk_ids: dtype torch.float32 is not allowed; use torch.int32 or torch.int64"),
    (lambda i: {"topk_ids": i["topk_ids"].to(torch.int16)}, TypeError, "topk_ids: dtype torch.int16"),
    (lambda i: {"topk_ids": i["topk_ids"] + 3}, ValueError, r"topk_ids: values must be in \[0, 4\)"),
    (lambda i: {"topk_ids": torch.zeros(4, 5, dtype=torch.int32), "topk_weights": torch.ones(4, 5)}, ValueError, "top_k=5 is out of range; it must be between 1 and num_experts=4"),
    (lambda i: {"hidden_states": torch.randint(0, 3, (4, 16))}, TypeError, "hidden_states: dtype int64 is not allowed"),
    (lambda i: {"w13": i["w13"].double(), "w2": i["w2"].double()}, TypeError, "w13: dtype torch.float64 differs from hidden_states' torch.float32"),
    (lambda i: {"topk_weights": torch.ones(4, 2, device="meta")}, ValueError, "topk_weights is on meta but hidden_states is on cpu"),
    (lambda i: {"activation": "swish"}, ValueError, "activation: unknown activation 'swish'; allowed: silu"),
    (lambda i: {"apply_router_weight_on_input": True}, ValueError, "apply_router_weight_on_input needs top_k=1, got top_k=2"),
    (lambda i: {"w13_bias": torch.randn(4, 8)}, ValueError, r"w13_bias: expected shape \(4, 16\)"),
    (lambda i: {"backend": "cutlass_magic"}, ValueError, "backend: unknown backend 'cutlass_magic'"),
    (lambda i: {"out": torch.empty(4, 15)}, ValueError, r"out: expected a \(4, 16\) torch.float32 tensor"),
    (lambda i: {"expert_map": torch.zeros(4, 1, dtype=torch.int32)}, ValueError, "expert_map: expected a 1-D tensor"),
    (lambda i: {"topk_ids": i["topk_ids"][:3], "topk_weights": i["topk_weights"][:3]}, ValueError, "topk_ids has 3 rows but hidden_states has 4 tokens"),
])
def test_bad_fused_experts_input(inp, over, exc, match):
    with pytest.raises(exc, match=match):
        call(inp, **over(inp))


def test_gpu_value_checks_are_opt_in(inp, monkeypatch):
    import importlib

    v = importlib.import_module("moe.validation")

    fake_gpu = type("T", (), {"device": torch.device("cuda")})()
    assert not v.value_checks_enabled(fake_gpu)
    with moe.validation():
        assert v.value_checks_enabled(fake_gpu)
    assert v.value_checks_enabled(inp["hidden_states"])  # CPU: always


@pytest.mark.parametrize("top_k,match", [(0, "top_k=0 is out of range"), (9, "top_k=9 is out of range; it must be between 1 and num_experts=8")])
def test_bad_top_k(top_k, match):
    with pytest.raises(ValueError, match=match):
        moe.fused_topk(torch.randn(2, 8), top_k)


def test_bad_config_values():
    with pytest.raises(ValueError, match="num_experts"):
        moe.MoEConfig(num_experts=0, top_k=1, hidden_size=8, intermediate_size=8)
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        moe.MoEConfig(num_experts=4, top_k=1, hidden_size=8, intermediate_size=8, hiden_size=3)
    with pytest.raises(ValueError, match="name"):
        moe.ActivationSpec(name="swish")
    with pytest.raises(ValueError, match="routed_scaling_factor"):
        moe.RoutingConfig(routed_scaling_factor=0)
    with pytest.raises(ValueError, match="num_expert_group=3 must divide num_experts=8"):
        moe.MoEConfig(num_experts=8, top_k=2, hidden_size=8, intermediate_size=8,
                      routing=moe.RoutingConfig(method="grouped_topk", num_expert_group=3, topk_group=1))
    with pytest.raises(ValueError, match="format"):
        moe.quant.WeightScheme(format="fp7", granularity="tensor")
    with pytest.raises(ValueError, match="router_logits: expected a 2-D tensor"):
        moe.fused_topk(torch.randn(8), 2)
