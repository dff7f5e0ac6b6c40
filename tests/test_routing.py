from __future__ import annotations

import pytest
import torch
from oracle import grouped_route64, topk_route64, topk_softmax64

import moe


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("T,E,k", [(1, 4, 1), (33, 8, 2), (7, 64, 8), (5, 5, 3)])
def test_fused_topk(T, E, k, renormalize, scoring):
    logits = torch.randn(T, E, dtype=torch.bfloat16)
    w, ids = moe.fused_topk(logits, k, renormalize=renormalize, scoring=scoring)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and w.shape == (T, k)
    ref_w, ref_ids = topk_route64(logits, k, renormalize, scoring)
    assert torch.equal(ids.long(), ref_ids)  # ties resolved the same way: exact ids
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-6, atol=1e-7)


def test_ties_go_to_lower_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0, 3.0]])
    _, ids = moe.fused_topk(logits, 3)
    assert ids.tolist() == [[1, 2, 3]]
    _, ids = moe.topk_softmax(logits, 2)
    assert ids.tolist() == [[1, 2]]
    # a whole row of ties: the first k experts
    _, ids = moe.fused_topk(torch.zeros(2, 8), 4)
    assert ids.tolist() == [[0, 1, 2, 3]] * 2


def test_topk_softmax():
    logits = torch.randn(9, 16)
    w, ids = moe.topk_softmax(logits, 4)
    ref_w, ref_ids = topk_softmax64(logits, 4)
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scoring,bias,renorm,scale", [
    ("softmax", False, False, 1.0),   # DeepSeek-V2 group-limited greedy
    ("softmax", False, True, 16.0),
    ("sigmoid", True, True, 2.5),     # DeepSeek-V3
    ("sigmoid", True, False, 1.0),
])
def test_grouped_topk(scoring, bias, renorm, scale):
    T, E, G, TG, k = 17, 32, 8, 3, 6
    logits = torch.randn(T, E)
    b = torch.randn(E) * 0.5 if bias else None
    w, ids = moe.grouped_topk(logits, k, num_expert_group=G, topk_group=TG, renormalize=renorm,
                              scoring=scoring, e_score_correction_bias=b, routed_scaling_factor=scale)
    ref_w, ref_ids = grouped_route64(logits, k, G, TG, renorm, scoring, b, scale)
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-6, atol=1e-6)
    # only experts of the kept groups are chosen
    assert (ids // (E // G)).unique(dim=None).numel() <= T * TG


def test_grouped_topk_bias_changes_selection_not_weights():
    logits = torch.randn(4, 16)
    bias = torch.zeros(16)
    bias[15] = 100.0  # forces expert 15 in
    w, ids = moe.grouped_topk(logits, 2, num_expert_group=4, topk_group=2, renormalize=False,
                              scoring="sigmoid", e_score_correction_bias=bias)
    assert (ids == 15).any(dim=1).all()
    pos = (ids == 15).nonzero()[:, 1]
    torch.testing.assert_close(w[torch.arange(4), pos], torch.sigmoid(logits[:, 15]))


def test_custom_routing_function():
    calls = []

    def fn(hidden, logits, k):
        calls.append(k)
        return torch.full((logits.shape[0], k), 0.5), torch.zeros(logits.shape[0], k, dtype=torch.int64)

    cfg = moe.RoutingConfig(method="custom")
    w, ids = moe.route(torch.randn(3, 4), 2, cfg, custom_routing_function=fn)
    assert calls == [2] and ids.dtype == torch.int32 and w.dtype == torch.float32


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_rejected(bad):
    logits = torch.randn(3, 8)
    logits[1, 2] = bad
    with pytest.raises(ValueError, match=r"router_logits: 1 NaN or \+inf"):
        moe.fused_topk(logits, 2)


def test_neg_inf_logits_are_a_mask():
    logits = torch.randn(3, 8)
    logits[:, :6] = float("-inf")
    w, ids = moe.fused_topk(logits, 2)
    assert sorted(ids[0].tolist()) == [6, 7] and torch.isfinite(w).all()


def test_routing_config_grouped_validation():
    with pytest.raises(ValueError, match="topk_group=5 must be <= num_expert_group=4"):
        moe.RoutingConfig(method="grouped_topk", num_expert_group=4, topk_group=5)
    with pytest.raises(ValueError, match="needs num_expert_group and topk_group"):
        moe.RoutingConfig(method="grouped_topk")
    with pytest.raises(ValueError, match="num_expert_group=3 must divide num_experts=8"):
        moe.grouped_topk(torch.randn(2, 8), 2, num_expert_group=3, topk_group=1)
    with pytest.raises(ValueError, match="topk_group=4 must be between 1 and num_expert_group=2"):
        moe.grouped_topk(torch.randn(2, 8), 2, num_expert_group=2, topk_group=4)


def test_empty_batch_routing():
    for fn in (lambda x: moe.fused_topk(x, 2), lambda x: moe.topk_softmax(x, 2),
               lambda x: moe.grouped_topk(x, 2, num_expert_group=4, topk_group=2, scoring="sigmoid",
                                          e_score_correction_bias=torch.zeros(8))):
        w, ids = fn(torch.randn(0, 8))
        assert w.shape == (0, 2) and ids.shape == (0, 2) and ids.dtype == torch.int32
