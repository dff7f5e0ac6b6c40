"""The sonic backend: its verdicts, its signature check, and its pipeline against a stand-in QuACK.

The stand-in has the parameters of quack-kernels 0.3.11's ``quack.gemm_interface.gemm_gated`` and ``gemm``
(read from Dao-AILab/quack tag v0.3.11, ``quack/gemm_interface.py``) and computes in float32 with torch,
checking what QuACK asserts for the varlen-M path (A K-major, outputs N-major, int32 offsets, gather only
with varlen) and reading B's gate/up halves as ``concat_layout=("B",)`` says (concatenated along the
non-contiguous dim) or, without it, interleaved. It tests our side of the call; the kernels run in the GPU
test (``tests/test_parity.py::test_gpu_matrix``, with quack-kernels and nvidia-cutlass-dsl installed).
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from moe.backends import sonic
from moe.config import ActivationSpec
from moe.contract import ExpertsArgs, ExpertsProblem
from moe.target import TARGETS
from moe.testing import ParityCase, experts_float64, make_inputs, rel_error, tolerance


def _groups(cu_seqlens: torch.Tensor, A_idx, num_groups: int):
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.shape == (num_groups + 1,)
    assert A_idx is None or (A_idx.dim() == 1 and A_idx.dtype == torch.int32)
    return cu_seqlens.tolist()


def _halves(B: torch.Tensor, concat_layout) -> tuple[torch.Tensor, torch.Tensor]:
    n = B.shape[-1] // 2
    if concat_layout and "B" in concat_layout:
        assert B.stride(-1) != 1, "concat_layout B: the halves are concatenated along B's non-contiguous dim"
        return B[..., :n], B[..., n:]
    return B[..., 0::2], B[..., 1::2]


def gemm_gated(A, B, C=None, bias=None, activation=None, preact_out=None, postact_out=None, out_dtype=None,
               postact_dtype=None, cu_seqlens_m=None, A_idx=None, store_preact=True, dynamic_scheduler=False,
               tuned=True, concat_layout=None):
    assert activation == "swiglu" and C is None and bias is None and not store_preact
    assert A_idx is None or cu_seqlens_m is not None, "gather_A requires varlen"
    assert A.stride(-1) == 1, "varlen_m requires A to be k-major"
    assert postact_out.stride(-1) == 1, "varlen_m requires PostAct to be n-major"
    cu = _groups(cu_seqlens_m, A_idx, B.shape[0])
    gate, up = _halves(B, concat_layout)
    total = A_idx.shape[0] if A_idx is not None else A.shape[0]
    assert postact_out.shape == (total, B.shape[-1] // 2)
    for g in range(B.shape[0]):
        rows = A[A_idx[cu[g]:cu[g + 1]].long()] if A_idx is not None else A[cu[g]:cu[g + 1]]
        h_g, h_u = rows.float() @ gate[g].float(), rows.float() @ up[g].float()
        postact_out[cu[g]:cu[g + 1]] = (F.silu(h_g) * h_u).to(postact_out.dtype)
    return None, postact_out


def gemm(A, B, out=None, bias=None, alpha=1.0, out_dtype=None, cu_seqlens_m=None, cu_seqlens_k=None, A_idx=None,
         batch_idx_permute=None, dynamic_scheduler=False, tuned=True, rounding_mode=0, sr_seed=0,
         concat_layout=None):
    assert bias is None and alpha == 1.0 and A_idx is None and cu_seqlens_k is None
    assert A.stride(-1) == 1 and out.stride(-1) == 1
    cu = _groups(cu_seqlens_m, None, B.shape[0])
    assert out.shape == (A.shape[0], B.shape[-1])
    for g in range(B.shape[0]):
        out[cu[g]:cu[g + 1]] = (A[cu[g]:cu[g + 1]].float() @ B[g].float()).to(out.dtype)
    return out


STAND_IN = types.SimpleNamespace(gemm_gated=gemm_gated, gemm=gemm)


def _problem(case: ParityCase, target=None) -> ExpertsProblem:
    return ExpertsProblem("cpu", case.dtype, case.T, case.E, case.E, case.K, case.N, case.k,
                          activation=ActivationSpec.parse(case.activation), target=target)


@pytest.mark.parametrize("T", [1, 3, 16, 65])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pipeline_against_the_stand_in(T, dtype, monkeypatch):
    """NaN-poisoned output against the float64 oracle: the groups, the gather, the gate/up halves, the
    combine through the row index (bf16 rounds GEMM1's activated rows as the kernel does)."""
    monkeypatch.setattr(sonic, "_quack", lambda: STAND_IN)
    case = ParityCase(T=T, E=6, K=64, N=32, k=2, dtype=dtype)
    inputs = make_inputs(case)
    args = ExpertsArgs(inputs["hidden_states"], inputs["w13"], inputs["w2"], inputs["topk_weights"],
                       inputs["topk_ids"])
    out = torch.full_like(inputs["hidden_states"], float("nan"))
    sonic.sonic_experts(args, _problem(case), out)
    ref = experts_float64(inputs["hidden_states"], inputs["w13"], inputs["w2"], inputs["topk_weights"],
                          inputs["topk_ids"])
    assert rel_error(out, ref) < tolerance(dtype)


def test_the_signature_check_names_what_is_missing():
    ok_module, why = sonic._check_signatures(STAND_IN)
    assert ok_module is STAND_IN and why == "ok"

    def old_gemm_gated(A, B, activation=None, postact_out=None, cu_seqlens_m=None, A_idx=None, tuned=True):
        pass

    module, why = sonic._check_signatures(types.SimpleNamespace(gemm_gated=old_gemm_gated, gemm=gemm))
    assert module is None and "gemm_gated lacks the parameters store_preact, concat_layout" in why
    assert "v0.3.11" in why and "pip install quack-kernels" in why
    module, why = sonic._check_signatures(types.SimpleNamespace(gemm_gated=gemm_gated))
    assert module is None and "lacks gemm " in why


@pytest.mark.parametrize(("target", "kw", "needle"), [
    (TARGETS["h200"], {}, None),
    (TARGETS["mi300x"], {}, "wgmma"),
    (TARGETS["h200"], {"activation": "gelu"}, "gated SiLU"),
    (TARGETS["h200"], {"dtype": torch.float32}, "bfloat16"),
    (TARGETS["h200"], {"K": 100}, "multiples of 8"),
])
def test_supports_says_why(target, kw, needle):
    case = ParityCase(T=4, E=8, K=kw.get("K", 512), N=256, k=2, dtype=kw.get("dtype", torch.bfloat16),
                      activation=kw.get("activation", "silu"))
    ok, why = sonic.BACKEND.supports(_problem(case, target))
    assert (ok, why) == (True, "ok") if needle is None else (not ok and needle in why)


def test_the_off_switch_refuses_with_its_reason(monkeypatch):
    """On since its GPU parity passed on an H200; the switch (kept for a QuACK release not yet run) refuses
    with its reason."""
    case = ParityCase(T=4, E=8, K=512, N=256, k=2, dtype=torch.bfloat16)
    assert sonic.HARDWARE_VERDICT is None
    monkeypatch.setattr(sonic, "HARDWARE_VERDICT", "not yet run on a GPU with this QuACK")
    assert sonic.BACKEND.supports(_problem(case, TARGETS["h200"])) == (False, "not yet run on a GPU with this QuACK")


def test_without_quack_names_the_package():
    import importlib.util

    ok, why = sonic.BACKEND.is_available()
    if importlib.util.find_spec("quack") is None:
        assert not ok and "pip install quack-kernels" in why
