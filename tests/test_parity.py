"""The cross-backend parity matrix: cases x activations x biases x expert map x dtypes x backends,
each compared with the float64 oracle. A combination a backend does not support is skipped with its
``supports()`` reason; every test checks from the decision trace that the intended backend ran.

One case runs the full product; the other shapes cover the options pairwise, to keep CI short.
"""

from __future__ import annotations

import os

import pytest
import torch
from cases import Case, make_inputs, oracle, run

import moe
from moe.explain import problem_from_config
from moe.testing import assert_close

BACKENDS = ["torch", "triton", "torch_grouped"]
ACTS = ["silu", "gelu", "gelu_tanh", "swigluoai", "relu2", "silu_no_mul", "gelu_no_mul"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FULL = (9, 8, 32, 24, 2)
SHAPES = [  # T, E, K, N, k: T = 1, odd K/N, K/N not multiples of 128, E in {4, 5, 8, 64, 256}, k in {1, 2, 3, 8}
    (1, 4, 16, 8, 1),
    (1, 64, 32, 16, 8),
    (7, 5, 33, 17, 3),
    (33, 8, 48, 40, 2),
    (17, 256, 16, 8, 8),
    (12, 64, 24, 20, 2),
]


def _matrix():
    out = []
    for act in ACTS:
        for bias in (False, True):
            for emap in (False, True):
                for dtype in (torch.float32, torch.bfloat16):
                    out.append((Case(*FULL[:1], *FULL[1:], activation=act, bias=bias, expert_map=emap), dtype))
    for i, shape in enumerate(SHAPES):
        for j, act in enumerate(ACTS):
            case = Case(*shape, activation=act, bias=(i + j) % 2 == 1, expert_map=(i + j // 2) % 2 == 1)
            out.append((case, DTYPES[(i + j) % 3]))
    return out


MATRIX = _matrix()


def _problem(case: Case, dtype: torch.dtype) -> moe.ExpertsProblem:
    cfg = moe.MoEConfig(num_experts=case.E, top_k=case.k, hidden_size=case.K, intermediate_size=case.N,
                        activation=moe.ActivationSpec.parse(case.activation), bias=case.bias)
    p = problem_from_config(cfg, dtype=dtype, device="cpu", num_tokens=case.T)
    if case.expert_map:
        from dataclasses import replace
        p = replace(p, has_expert_map=True, num_experts=(case.E + 1) // 2)
    return p


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,dtype", MATRIX, ids=[f"{c}-{str(d)[6:]}" for c, d in MATRIX])
def test_parity(case, dtype, backend):
    b = moe.get_backend(backend)
    ok, why = b.is_available()
    if ok:
        ok, why = b.supports(_problem(case, dtype))
    if not ok:
        pytest.skip(f"{backend}: {why}")
    inputs = make_inputs(case, dtype)
    out = run(inputs, backend)
    assert moe.last_decision().chosen == backend
    assert_close(out, oracle(inputs), what=f"{backend} {case} {dtype}")


def test_triton_runs_in_ci():
    """CI must exercise the kernels: a missing triton is a failure there, not a skip."""
    if os.environ.get("CI"):
        ok, why = moe.get_backend("triton").is_available()
        assert ok, why
        ok, why = moe.get_backend("torch_grouped").is_available()
        assert ok, why
