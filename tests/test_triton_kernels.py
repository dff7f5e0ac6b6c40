"""Triton kernel details on CPU (interpreter): per-expert weight scales, explicit kernel configs,
the combine variants, and the config validation."""

from __future__ import annotations

import pytest
import torch
from cases import Case, make_inputs, oracle

from moe.backends.base import ExpertsArgs, ExpertsProblem
from moe.config import ActivationSpec
from moe.testing import assert_close

pytest.importorskip("triton")


def _args(case, dtype=torch.float32):
    inp = make_inputs(case, dtype)
    args = ExpertsArgs(inp["hidden_states"], inp["w13"], inp["w2"], inp["topk_weights"], inp["topk_ids"],
                       inp["w13_bias"], inp["w2_bias"], inp["expert_map"])
    local = inp["w13"].shape[0]
    prob = ExpertsProblem("cpu", dtype, case.T, local, case.E, case.K, case.N, case.k,
                          ActivationSpec.parse(case.activation), case.bias, case.bias, case.expert_map)
    return inp, args, prob


def test_per_expert_weight_scale():
    from moe.backends.triton import triton_experts

    inp, args, prob = _args(Case(T=6, E=4, K=32, N=16, k=2))
    s13, s2 = torch.rand(4) + 0.5, torch.rand(4) + 0.5
    out = torch.full_like(args.hidden_states, float("nan"))
    triton_experts(args, prob, out, w13_scale=s13, w2_scale=s2)
    scaled = dict(inp, w13=inp["w13"] * s13[:, None, None], w2=inp["w2"] * s2[:, None, None])
    assert_close(out, oracle(scaled))


@pytest.mark.parametrize("combine", ["reduce", "atomic"])
@pytest.mark.parametrize("block_m", [16, 32])
def test_explicit_configs_and_combine_variants(combine, block_m):
    from moe.backends.triton import GemmTile, KernelConfig, triton_experts

    inp, args, prob = _args(Case(T=20, E=5, K=40, N=24, k=2, bias=True))
    cfg = KernelConfig(block_m=block_m, gemm1=GemmTile(block_n=16, block_k=16, group_m=2, num_stages=1),
                       gemm2=GemmTile(block_n=32, block_k=16, group_m=1, num_stages=1), combine=combine)
    out = torch.full_like(args.hidden_states, float("nan"))
    triton_experts(args, prob, out, cfg)
    assert_close(out, oracle(inp))


def test_kernel_config_validation():
    from moe.backends.triton import GemmTile, KernelConfig
    from moe.backends.triton.config import fit_smem

    with pytest.raises(ValueError, match="block_n"):
        GemmTile(block_n=48)
    with pytest.raises(ValueError, match="num_stages"):
        GemmTile(num_stages=0)
    big = KernelConfig(block_m=128, gemm1=GemmTile(block_n=256, block_k=128, num_stages=6))
    fitted = fit_smem(big, 4, True)
    assert max(fitted.smem_bytes(4, True)) <= 200 * 1024 < max(big.smem_bytes(4, True))
