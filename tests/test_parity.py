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

MATRIX_SCHEMES = ("none", *moe.quant.NAMES)


@pytest.mark.gpu
@pytest.mark.matrix
@pytest.mark.parametrize("scheme", MATRIX_SCHEMES)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_gpu_matrix(backend, scheme):
    """Every registered backend x every quantization scheme x the token-count sweep, bf16, NaN-poisoned,
    against the float64 oracle (and, quantized, the reference of the backend's declared arithmetic within
    the tolerance row, and the unquantized oracle within the scheme's noise). A (backend, scheme) it cannot
    run is skipped with its reason; every bucket runs, and the failures are listed together."""
    from moe.testing import TOKEN_COUNTS, ParityCase

    results = [run_case(backend, ParityCase(T=T, E=16, K=512, N=256, k=4, dtype=torch.bfloat16, quant=scheme),
                        "cuda") for T in TOKEN_COUNTS]
    skipped = {r.detail for r in results if r.status == "skipped"}
    if len(skipped) == 1 and all(r.status == "skipped" for r in results):
        pytest.skip(f"{backend} {scheme}: {skipped.pop()}")
    failed = [f"T={r.case.T}: {r.detail}" for r in results if r.status != "passed"]
    assert not failed, f"{backend} {scheme}: " + "; ".join(failed)
