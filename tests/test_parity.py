"""The cross-backend parity matrix: moe.testing's parity cases x every registered backend, each compared
with the float64 oracle through the same helper backend authors call (moe.testing.run_case). A case a
backend's supports() refuses is skipped with that reason; every run checks from the decision trace that
the asked-for backend ran.
"""

from __future__ import annotations

import os

import pytest
import torch

import moe
from moe.testing import parity_cases, run_case

BACKENDS = [b.name for b in moe.list_backends()]
CASES = parity_cases()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_parity(case, backend):
    result = run_case(backend, case)
    if result.status == "skipped":
        pytest.skip(f"{backend}: {result.detail}")
    assert result.status == "passed", result.detail


def test_the_matrix_covers_the_built_in_backends():
    assert {"torch", "triton", "torch_grouped"} <= set(BACKENDS)


def test_check_backend_reports_a_wrong_backend():
    """The helper fails a backend whose output is wrong, and one that runs nothing (it cannot pass
    vacuously)."""

    class Off:
        name, priority = "test_off_by_one", -100

        def is_available(self):
            return True, "ok"

        def supports(self, problem):
            return (True, "ok") if problem.dtype == torch.float32 else (False, "float32 only")

        def apply(self, args, problem, out):
            from moe.backends.torch_ref import torch_ref_experts

            out.copy_(torch_ref_experts(args, problem) * 1.01)

    moe.register_backend(Off())
    try:
        with pytest.raises(AssertionError, match=r"test_off_by_one: \d+ passed, \d+ skipped, 1[0-9] failed"):
            moe.testing.check_backend("test_off_by_one", quick=True)
    finally:
        moe.unregister_backend("test_off_by_one")


def test_triton_runs_in_ci():
    """CI must exercise the kernels: a missing triton is a failure there, not a skip."""
    if os.environ.get("CI"):
        ok, why = moe.get_backend("triton").is_available()
        assert ok, why
        ok, why = moe.get_backend("torch_grouped").is_available()
        assert ok, why


# ---------------------------------------------------------------- the GPU matrix


def _matrix() -> list[tuple[str, str]]:
    """(backend, scheme) for every registered backend meant for this machine's device kind (its priority for
    the card's target is not negative: aiter is for ROCm) x every scheme of moe.quant's names it declares."""
    from moe.contract import backend_schemes
    from moe.target import TARGETS, current_target

    target = current_target("cuda") if torch.cuda.is_available() else TARGETS["h200"]
    schemes = ("none", *moe.quant.NAMES)
    meant = [b for b in moe.list_backends() if b.name != "torch"
             and (b.priority_for(target) if hasattr(b, "priority_for") else b.priority) >= 0]
    return [(b.name, s) for b in meant for s in schemes if s in backend_schemes(b)]


MATRIX = _matrix()


@pytest.mark.gpu
@pytest.mark.matrix
@pytest.mark.parametrize(("backend", "scheme"), MATRIX, ids=[f"{b}-{s}" for b, s in MATRIX])
def test_gpu_matrix(backend, scheme):
    """Every backend meant for this card x every scheme it declares x the token-count sweep, bf16,
    NaN-poisoned, against the float64 oracle (quantized: against the reference of the backend's declared
    arithmetic within its tolerance row, and the unquantized oracle within the scheme's noise). A backend
    that refuses on this card fails with its reason; every bucket runs and the failures are listed together."""
    from moe.testing import TOKEN_COUNTS, ParityCase

    results = [run_case(backend, ParityCase(T=T, E=16, K=512, N=256, k=4, dtype=torch.bfloat16, quant=scheme),
                        "cuda") for T in TOKEN_COUNTS]
    failed = [f"T={r.case.T} {r.status}: {r.detail}" for r in results if r.status != "passed"]
    assert not failed, f"{backend} {scheme}: " + "; ".join(failed)
