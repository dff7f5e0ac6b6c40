from __future__ import annotations

import pytest
import torch
from cases import Case, make_inputs, oracle, run

import moe
from moe.testing import assert_close


class _Doubler:
    """A test backend: the reference result times two, only for float32."""

    name = "test_doubler"
    priority = 1000

    def __init__(self, available=True):
        self.available = available
        self.calls = 0

    def is_available(self):
        return (True, "ok") if self.available else (False, "test: switched off")

    def supports(self, problem):
        if problem.dtype != torch.float32:
            return False, f"test: float32 only, got {problem.dtype}"
        return True, "ok"

    def apply(self, args, problem, out):
        from moe.backends.torch_ref import torch_ref_experts

        self.calls += 1
        out.copy_(torch_ref_experts(args, problem) * 2)


@pytest.fixture
def doubler():
    b = _Doubler()
    moe.register_backend(b)
    yield b
    moe.unregister_backend(b.name)


def test_auto_picks_highest_priority_and_explains(doubler):
    inputs = make_inputs(Case(T=5, E=4, K=16, N=8, k=2))
    out = run(inputs, "auto")
    assert doubler.calls == 1
    assert_close(out, 2 * oracle(inputs))
    d = moe.last_decision()
    assert d.requested == "auto" and d.chosen == "test_doubler"
    assert [c.name for c in d.candidates][:1] == ["test_doubler"]
    assert "torch" in str(d)


def test_auto_skips_unsupported_with_reason(doubler):
    inputs = make_inputs(Case(T=5, E=4, K=16, N=8, k=2), torch.float64)
    run(inputs, "auto")
    d = moe.last_decision()
    assert d.chosen == "torch"
    reason = {c.name: c.reason for c in d.candidates}["test_doubler"]
    assert "float32 only" in reason


def test_named_backend_never_falls_back(doubler):
    inputs = make_inputs(Case(T=5, E=4, K=16, N=8, k=2), torch.float64)
    with pytest.raises(moe.BackendUnavailableError, match="'test_doubler' cannot run this problem: test: float32"):
        run(inputs, "test_doubler")
    doubler.available = False
    with pytest.raises(moe.BackendUnavailableError, match="switched off"):
        run(make_inputs(Case(T=5, E=4, K=16, N=8, k=2)), "test_doubler")


def test_unknown_backend():
    inputs = make_inputs(Case(T=2, E=4, K=16, N=8, k=2))
    with pytest.raises(ValueError, match=r"unknown backend .nope.; registered: .*torch"):
        run(inputs, "nope")


def test_register_rejects_non_backends_and_duplicates(doubler):
    with pytest.raises(TypeError, match="does not implement the Backend contract"):
        moe.register_backend(object())
    with pytest.raises(ValueError, match="already registered"):
        moe.register_backend(_Doubler())


def test_explain_config():
    cfg = moe.MoEConfig(num_experts=8, top_k=2, hidden_size=64, intermediate_size=32)
    d = moe.explain(cfg, device="cpu", dtype=torch.float32)
    assert d.chosen in {b.name for b in moe.list_backends()}
    assert any(c.name == "torch" and c.ok for c in d.candidates)


def test_decisions_are_cached_per_shape_and_cleared_on_registration(doubler):
    inputs = make_inputs(Case(T=5, E=4, K=16, N=8, k=2))
    run(inputs, "auto")
    first = moe.last_decision()
    inputs2 = make_inputs(Case(T=9, E=4, K=16, N=8, k=2))  # another token count, same shape
    run(inputs2, "auto")
    assert moe.last_decision() is first
    moe.unregister_backend(doubler.name)
    run(inputs2, "auto")
    assert moe.last_decision().chosen == "torch"
    moe.register_backend(doubler)
