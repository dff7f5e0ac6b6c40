"""The deep_gemm backend: its verdicts on CPU, its layouts, and its pipeline against a stand-in DeepGEMM.

The stand-in has the signatures of sgl-deep-gemm 0.1.4's Python API (read from the wheel's
``deep_gemm/__init__.py``; the same as sgl-project/DeepGEMM release/v0.1.2, cc4a4ea, csrc/apis/gemm.hpp)
and computes in float32 with torch, checking what DeepGEMM asserts (row counts, int32 layouts, one
expert per M-alignment block). It tests our side of the call; the kernels themselves run in the GPU tests
at the end (``pytest -m gpu``, with sgl-deep-gemm installed).
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

import moe
from moe.backends import deep_gemm as dgb
from moe.config import ActivationSpec
from moe.contract import ExpertsArgs, ExpertsProblem
from moe.kernels.align import align
from moe.quant import QuantizedWeight
from moe.target import TARGETS, cuda_target
from moe.testing import ParityCase, assert_close, experts_float64, make_inputs

H200 = TARGETS["h200"].model_copy(update={"nvcc": "13.0"})
ALIGNMENT = 128


@pytest.fixture(autouse=True)
def _past_the_hardware_verdict(monkeypatch):
    """Everything behind the off switch (moe.backends.deep_gemm.HARDWARE_VERDICT) is checked as if on."""
    monkeypatch.setattr(dgb, "HARDWARE_VERDICT", None)


def test_off_until_its_gpu_parity_test_passes(monkeypatch):
    monkeypatch.setattr(dgb, "HARDWARE_VERDICT", "off: failed")
    assert _verdict(H200) == (False, "off: failed")


def _dequant_rows(a):
    if not isinstance(a, tuple):
        return a.float()
    data, scale = a
    return data.float() * scale.float().repeat_interleave(128, dim=-1)[..., :data.shape[-1]]


def _dequant_weights(b):
    if not isinstance(b, tuple):
        return b.float()
    data, scale = b
    s = scale.float().repeat_interleave(128, dim=-2).repeat_interleave(128, dim=-1)
    return data.float() * s[..., :data.shape[-2], :data.shape[-1]]


def _contiguous(a, b, d, grouped_layout, *, fp8):
    assert grouped_layout.dtype == torch.int32 and grouped_layout.is_contiguous()
    x, w = _dequant_rows(a), _dequant_weights(b)
    assert x.shape[0] == d.shape[0] == grouped_layout.shape[0] and x.shape[0] % ALIGNMENT == 0
    blocks = grouped_layout.view(-1, ALIGNMENT)
    valid = blocks[blocks[:, 0] >= 0]
    assert ((valid == valid[:, :1]) | (valid == -1)).all(), "one expert per M-alignment block"
    for r in range(x.shape[0]):
        e = int(grouped_layout[r])
        if e >= 0:
            d[r] = (x[r] @ w[e].T).to(d.dtype)


def _masked(a, b, d, masked_m, expected_m):
    assert masked_m.dtype == torch.int32 and expected_m >= 1
    x, w = _dequant_rows(a), _dequant_weights(b)
    assert x.dim() == 3 and x.shape[0] == w.shape[0] == d.shape[0] == masked_m.numel()
    for e in range(x.shape[0]):
        m = int(masked_m[e])
        assert m <= x.shape[1]
        d[e, :m] = (x[e, :m] @ w[e].T).to(d.dtype)


def stand_in() -> types.SimpleNamespace:
    """DeepGEMM's functions as recorded above (keyword names and defaults kept; no **kwargs, so an argument
    the release lacks is a TypeError here too)."""

    def m_grouped_bf16_gemm_nt_contiguous(a, b, d, grouped_layout, compiled_dims="nk", use_psum_layout=False,
                                          ensure_zero_padding=True, expected_m_for_psum_layout=None):
        _contiguous(a, b, d, grouped_layout, fp8=False)

    def m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, expected_m, compiled_dims="nk"):
        _masked(a, b, d, masked_m, expected_m)

    def m_grouped_fp8_gemm_nt_contiguous(a, b, d, grouped_layout, recipe=None, recipe_a=None, recipe_b=None,
                                         compiled_dims="nk", disable_ue8m0_cast=False, use_psum_layout=False,
                                         ensure_zero_padding=True, expected_m_for_psum_layout=None):
        assert isinstance(a, tuple) and isinstance(b, tuple)
        _contiguous(a, b, d, grouped_layout, fp8=True)

    def fp8_m_grouped_gemm_nt_masked(a, b, d, masked_m, expected_m, recipe=None, recipe_a=None, recipe_b=None,
                                     compiled_dims="nk", disable_ue8m0_cast=False):
        assert isinstance(a, tuple) and isinstance(b, tuple)
        _masked(a, b, d, masked_m, expected_m)

    return types.SimpleNamespace(
        m_grouped_bf16_gemm_nt_contiguous=m_grouped_bf16_gemm_nt_contiguous,
        m_grouped_bf16_gemm_nt_masked=m_grouped_bf16_gemm_nt_masked,
        m_grouped_fp8_gemm_nt_contiguous=m_grouped_fp8_gemm_nt_contiguous,
        fp8_m_grouped_gemm_nt_masked=fp8_m_grouped_gemm_nt_masked,
        get_mk_alignment_for_contiguous_layout=lambda: ALIGNMENT,
    )


def _problem(case: ParityCase, target=None) -> ExpertsProblem:
    local = case.E // 2 if case.expert_map else case.E
    return ExpertsProblem("cpu", case.dtype, case.T, local, case.E, case.K, case.N, case.k,
                          activation=ActivationSpec.parse(case.activation), has_expert_map=case.expert_map,
                          quant=moe.QuantConfig.parse(case.quant), target=target)


def _run(case: ParityCase, monkeypatch, inputs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    monkeypatch.setattr(dgb, "_dg", stand_in)
    inputs = inputs or make_inputs(case)  # quantized weights for a quantized case
    args = ExpertsArgs(inputs["hidden_states"], inputs["w13"], inputs["w2"], inputs["topk_weights"],
                       inputs["topk_ids"], expert_map=inputs["expert_map"])
    out = torch.full_like(inputs["hidden_states"], float("nan"))
    dgb.deep_gemm_experts(args, _problem(case), out)
    ref = experts_float64(inputs["hidden_states"], inputs["w13"], inputs["w2"], inputs["topk_weights"],
                          inputs["topk_ids"], case.activation, expert_map=inputs["expert_map"])
    return out, ref


@pytest.mark.parametrize("T", [1, 3, 64, 65, 200])  # masked up to MASKED_MAX_TOKENS, contiguous above
@pytest.mark.parametrize(("activation", "emap"), [("silu", False), ("gelu_tanh", True), ("swigluoai", False)])
def test_pipeline_against_the_stand_in(T, activation, emap, monkeypatch):
    out, ref = _run(ParityCase(T=T, E=6, K=128, N=128, k=2, activation=activation, expert_map=emap), monkeypatch)
    assert_close(out, ref, torch.float32)


def _emulation(inputs: dict, problem: ExpertsProblem) -> torch.Tensor:
    """The reference of deep_gemm's declared W8A8 arithmetic (GEMM1's output rounded to the call's dtype)."""
    args = ExpertsArgs(inputs["hidden_states"], inputs["w13"], inputs["w2"], inputs["topk_weights"],
                       inputs["topk_ids"], expert_map=inputs.get("expert_map"))
    return moe.testing.arithmetic_reference("deep_gemm", args, problem)


@pytest.mark.parametrize("T", [4, 130])  # masked, contiguous
@pytest.mark.parametrize("emap", [False, True])
def test_fp8_block_pipeline_against_the_stand_in(T, emap, monkeypatch):
    """Against the float64 oracle within the quantization noise, and against the emulation of the scheme
    within the kernel-vs-emulation row (both quantize the same values)."""
    case = ParityCase(T=T, E=4, K=256, N=128, k=2, quant="fp8_block", expert_map=emap)
    monkeypatch.setattr(dgb, "_dg", stand_in)
    inputs = make_inputs(case)
    out, ref = _run(case, monkeypatch, inputs)
    assert moe.testing.rel_error(out, ref) < moe.testing.QUANT_NOISE["fp8_block"]
    limit = moe.testing.tolerance(case.dtype, "fp8_block")
    assert moe.testing.rel_error(out, _emulation(inputs, _problem(case))) < limit


def test_contiguous_layout_marks_padding_rows():
    ids = torch.tensor([[0, 2], [2, 1], [0, 2]], dtype=torch.int32)
    al = align(ids, 3, 4)
    layout = dgb.contiguous_layout(al, ids.numel())
    assert layout.dtype == torch.int32 and layout.numel() == al.sorted_ids.numel()
    assert layout.tolist()[:12] == [0, 0, -1, -1, 1, -1, -1, -1, 2, 2, 2, -1]
    assert (layout[12:] == -1).all()


def test_masked_layout_puts_each_pair_in_its_experts_slab():
    ids = torch.tensor([[0, 2], [2, 1], [0, 2]], dtype=torch.int32)
    ml = dgb.masked_layout(align(ids, 3, 1), ids.numel(), 3)
    assert ml.masked_m.tolist() == [2, 1, 3] and ml.max_rows == dgb.MASKED_ROW_TILE
    expert_of_slot = (ml.slot // ml.max_rows).tolist()
    assert sorted(expert_of_slot) == [0, 0, 1, 2, 2, 2]
    assert len(set(ml.slot.tolist())) == ids.numel()
    assert all(int(s) % ml.max_rows < 3 for s in ml.slot)


def test_masked_layout_sends_non_local_pairs_to_the_spare_row():
    ids = torch.tensor([[0, 3], [1, 2]], dtype=torch.int32)
    emap = torch.tensor([0, -1, 1, -1], dtype=torch.int32)
    ml = dgb.masked_layout(align(ids, 2, 1, emap), ids.numel(), 2)
    assert ml.masked_m.tolist() == [1, 1]
    spare = 2 * ml.max_rows
    assert (ml.slot == spare).sum() == 2


def test_masked_layout_refuses_a_padded_alignment():
    with pytest.raises(ValueError, match="row tile of 1"):
        dgb.masked_layout(align(torch.zeros(2, 1, dtype=torch.int32), 2, 16), 2, 2)


# ---------------------------------------------------------------- verdicts


def _verdict(target, **kw) -> tuple[bool, str]:
    case = ParityCase(T=4, E=8, K=kw.pop("K", 256), N=kw.pop("N", 256), k=2, dtype=kw.pop("dtype", torch.bfloat16),
                      quant=kw.pop("quant", "none"), **kw)
    return dgb.BACKEND.supports(_problem(case, target))


def test_supports_says_why_on_each_card():
    assert _verdict(H200) == (True, "ok")
    ok, why = _verdict(TARGETS["a100"].model_copy(update={"nvcc": "13.0"}))
    assert not ok and "wgmma" in why and "tcgen05" in why
    ok, why = _verdict(TARGETS["cpu"])
    assert not ok and "SM90" in why
    ok, why = _verdict(TARGETS["mi300x"])
    assert not ok and "NVIDIA" in why


@pytest.mark.parametrize(("kw", "needle"), [
    ({"N": 200}, "multiples of 128"),
    ({"K": 96}, "multiples of 128"),
    ({"dtype": torch.float16}, "bfloat16"),
    ({"bias": True}, "biases"),
])
def test_supports_refuses_shapes_with_the_rule(kw, needle):
    if kw.pop("bias", False):
        problem = _problem(ParityCase(T=4, E=8, K=256, N=256, k=2, dtype=torch.bfloat16), H200)
        ok, why = dgb.BACKEND.supports(dataclasses.replace(problem, has_w13_bias=True))
    else:
        ok, why = _verdict(H200, **kw)
    assert not ok and needle in why


def test_supports_needs_nvcc_12_3():
    ok, why = _verdict(H200.model_copy(update={"nvcc": "12.2"}))
    assert not ok and ">= 12.3" in why and "12.2" in why
    ok, why = _verdict(H200.model_copy(update={"nvcc": None}))
    assert not ok and "no nvcc" in why


def test_supports_names_an_unusable_jit_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a file where the cache folder's parent should be: no folder can be made there
    monkeypatch.setenv("DG_JIT_CACHE_DIR", str(blocker / "cache"))
    ok, why = _verdict(H200)
    assert not ok and "DG_JIT_CACHE_DIR" in why and str(blocker) in why


def test_ue8m0_on_sm100_only_with_the_option():
    b200 = cuda_target("NVIDIA B200", (10, 0), nvcc="13.0")
    assert _verdict(b200) == (True, "ok")  # bf16: no scales
    ok, why = _verdict(b200, quant="fp8_block")
    assert not ok and "UE8M0" in why and "MOE_DEEP_GEMM_UE8M0" in why
    with moe.override_options(deep_gemm_ue8m0=True):
        assert _verdict(b200, quant="fp8_block") == (True, "ok")
    assert _verdict(H200, quant="fp8_block") == (True, "ok")  # SM90 keeps fp32 scales


def test_is_available_names_the_package_when_missing():
    ok, why = dgb.BACKEND.is_available()
    try:
        import deep_gemm  # noqa: F401
    except Exception:
        assert not ok and "sgl-deep-gemm==0.1.4" in why
    else:
        assert ok, why


def test_auto_ranks_deep_gemm_below_triton_without_a_table():
    assert dgb.BACKEND.priority_for(H200) < moe.get_backend("triton").priority_for(H200)


# ---------------------------------------------------------------- GPU


def _gpu_ready() -> str | None:
    ok, why = dgb.BACKEND.is_available()
    return None if ok else why


@pytest.mark.gpu
def test_gpu_deep_gemm_masked_layout_replays_in_a_graph():
    """Decode: captured once, replayed with new routing, no host synchronization."""
    why = _gpu_ready()
    if why:
        pytest.skip(why)
    case = ParityCase(T=8, E=16, K=512, N=256, k=4, dtype=torch.bfloat16)
    inputs = make_inputs(case, "cuda")
    out = torch.empty_like(inputs["hidden_states"])

    def call():
        moe.fused_experts(inputs["hidden_states"], inputs["w13"], inputs["w2"], inputs["topk_weights"],
                          inputs["topk_ids"], backend="deep_gemm", out=out)

    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    fresh = make_inputs(case, "cuda")
    inputs["topk_ids"].copy_(fresh["topk_ids"])
    inputs["topk_weights"].copy_(fresh["topk_weights"])
    graph.replay()
    ref = experts_float64(inputs["hidden_states"], inputs["w13"], inputs["w2"], inputs["topk_weights"],
                          inputs["topk_ids"])
    assert moe.testing.rel_error(out, ref) < moe.testing.tolerance(torch.bfloat16)


def test_weights_are_taken_as_they_are():
    """No rearrangement of the weights: DeepGEMM reads the canonical [E, 2N, K] / fp8 block layout."""
    w = torch.randn(2, 256, 128)
    assert dgb._operand(w).data_ptr() == w.data_ptr()
    q = QuantizedWeight(w.to(torch.float8_e4m3fn), torch.ones(2, 2, 1), moe.quant.named("fp8_block").weights,
                        parts=2)
    data, scale = dgb._operand(q)
    assert data.data_ptr() == q.data.data_ptr() and scale.dtype == torch.float32
