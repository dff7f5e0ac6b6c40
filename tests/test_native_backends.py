"""The native backends on a machine without their libraries or hardware: each is registered, says why it
cannot run (with the fix), is never imported by ``import moe``, and ``auto`` ranks it below triton until a
selection table says otherwise. Plus the cutlass backend's build cache key (sonic: tests/test_sonic.py)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe
from moe.backends import cutlass
from moe.config import ActivationSpec
from moe.contract import ExpertsProblem
from moe.target import TARGETS

NATIVE = ("deep_gemm", "cutlass", "cutlass_fp4", "sonic", "aiter")
OPTIONAL_LIBRARIES = ("deep_gemm", "tvm_ffi", "aiter", "quack", "cutlass", "cutlass_library")


def _problem(target, dtype=torch.bfloat16, activation="silu", n=256, k=512) -> ExpertsProblem:
    return ExpertsProblem("cuda", dtype, 4, 8, 8, k, n, 2, activation=ActivationSpec.parse(activation),
                          target=target)


@pytest.mark.parametrize("name", NATIVE)
def test_registered_with_a_reason(name):
    backend = moe.get_backend(name)
    ok, why = backend.is_available()
    assert isinstance(ok, bool) and why
    if not ok:
        assert any(hint in why for hint in ("pip install", "build ROCm AITer", "not in this release",
                                            "host side only", "does not call")), why


@pytest.mark.parametrize("name", NATIVE)
def test_ranked_below_triton_on_every_card(name):
    backend = moe.get_backend(name)
    for target in TARGETS.values():
        if target.vendor in ("cuda", "rocm"):
            assert backend.priority_for(target) < moe.get_backend("triton").priority_for(target), (name, target.name)


def test_import_moe_imports_no_optional_library():
    code = ("import sys, moe; from moe.explain import problem_from_config; moe.list_backends(); "
            "[b.supports(problem_from_config(moe.MoEConfig(num_experts=8, top_k=2, hidden_size=512, "
            "intermediate_size=256), target='h200')) for b in moe.list_backends()]; "
            f"print(sorted(m for m in {OPTIONAL_LIBRARIES!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_moe_backends_lists_every_native_backend_with_its_reason(capsys):
    from moe.cli import main

    main(["backends", "--target", "h200", "--problem", "8,256,512,2"])
    out = capsys.readouterr().out
    for name in NATIVE:
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        assert " no " in line or " yes " in line
    aiter_line = next(ln for ln in out.splitlines() if ln.startswith("aiter "))
    assert "AMD" in aiter_line or "ROCm" in aiter_line
    fp4_line = next(ln for ln in out.splitlines() if ln.startswith("cutlass_fp4 "))
    assert "host side only" in fp4_line or "compute capability 10.x" in fp4_line


# ---------------------------------------------------------------- cutlass


def test_cutlass_cache_key_changes_with_every_input(tmp_path):
    src = tmp_path / "k.cu"
    src.write_text("// v1")
    base = dict(arch="sm90a", cutlass="4.2.0.0", torch_version="2.11.0+cu130", cxx11_abi=True, nvcc="13.0",
                flags=("-O3",), sources=(src,))
    key = cutlass.cache_key(**base)
    assert key.startswith("sm90a-cutlass4.2.0.0-torch2.11.0_cu130-abi1-nvcc13.0-")
    for change in ({"arch": "sm100a"}, {"cutlass": "4.3"}, {"torch_version": "2.12.0"}, {"cxx11_abi": False},
                   {"nvcc": "12.9"}, {"flags": ("-O2",)}):
        assert cutlass.cache_key(**{**base, **change}) != key, change
    src.write_text("// v2")
    assert cutlass.cache_key(**base) != key
    assert cutlass.build_folder(key).name == key
    with pytest.raises(ValueError, match="nvcc"):
        cutlass.cache_key(**{**base, "nvcc": ""})


def test_cutlass_finds_headers_under_cutlass_home(tmp_path, monkeypatch):
    (tmp_path / "include" / "cutlass").mkdir(parents=True)
    (tmp_path / "include" / "cutlass" / "cutlass.h").write_text("")
    monkeypatch.setenv("CUTLASS_HOME", str(tmp_path))
    assert cutlass.cutlass_include() == tmp_path / "include"


def test_cutlass_is_available_with_headers_nvcc_and_ninja(monkeypatch, tmp_path):
    (tmp_path / "include" / "cutlass").mkdir(parents=True)
    (tmp_path / "include" / "cutlass" / "cutlass.h").write_text("")
    monkeypatch.setenv("CUTLASS_HOME", str(tmp_path))
    monkeypatch.setattr(cutlass, "nvcc_version", lambda: "13.0")
    monkeypatch.setattr(cutlass.shutil, "which", lambda name: "/usr/bin/" + name)
    assert cutlass.BACKEND.is_available() == (True, "ok (compiles at first use, minutes)")
    monkeypatch.setattr(cutlass, "nvcc_version", lambda: None)
    ok, why = cutlass.BACKEND.is_available()
    assert not ok and "nvcc" in why


def test_cutlass_without_headers_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("CUTLASS_HOME", str(tmp_path))  # no headers there
    if cutlass.cutlass_include() is not None:
        pytest.skip("nvidia-cutlass is installed here: its headers are found")
    ok, why = cutlass.BACKEND.is_available()
    assert not ok and "nvidia-cutlass==4.2.0.0" in why


@pytest.mark.parametrize(("target", "kw", "needle"), [
    (TARGETS["h200"], {}, None),
    (TARGETS["b200"], {}, "wgmma"),
    (TARGETS["a100"], {}, "wgmma"),
    (TARGETS["h200"], {"dtype": torch.float16}, "bfloat16"),
    (TARGETS["h200"], {"n": 200}, "multiples of 128"),
])
def test_cutlass_supports(target, kw, needle):
    ok, why = cutlass.BACKEND.supports(_problem(target, **kw))
    assert (ok, why) == (True, "ok") if needle is None else (not ok and needle in why)


class _GroupedGemmStandIn:
    """The extension's ``grouped_gemm_bf16`` in torch, for float32 CPU tensors: reads each group's problem
    size, addresses and leading dimensions as the CUDA code does, and computes D_g = A_g @ B_g^T in place."""

    def __init__(self) -> None:
        self.calls = 0

    @staticmethod
    def _view(addr: int, rows: int, cols: int, ld: int) -> torch.Tensor:
        import ctypes

        n = max(0, (rows - 1) * ld + cols) if rows else 0
        buf = (ctypes.c_float * max(n, 1)).from_address(addr)
        flat = torch.frombuffer(buf, dtype=torch.float32, count=n) if n else torch.empty(0)
        return flat.as_strided((rows, cols), (ld, 1)) if n else torch.empty(rows, cols)

    def grouped_gemm_bf16(self, sizes, ptr_a, ptr_b, ptr_d, ld_a, ld_b, ld_d):
        self.calls += 1
        for g in range(sizes.shape[0]):
            m, n, k = sizes[g].tolist()
            if m == 0:
                continue
            a = self._view(int(ptr_a[g]), m, k, int(ld_a[g]))
            b = self._view(int(ptr_b[g]), n, k, int(ld_b[g]))
            self._view(int(ptr_d[g]), m, n, int(ld_d[g])).copy_(a @ b.T)


    @staticmethod
    def _bytes(addr: int, rows: int, cols: int, ld: int) -> torch.Tensor:
        import ctypes

        n = max(0, (rows - 1) * ld + cols) if rows else 0
        buf = (ctypes.c_uint8 * max(n, 1)).from_address(addr)
        flat = torch.frombuffer(buf, dtype=torch.uint8, count=n) if n else torch.empty(0, dtype=torch.uint8)
        return flat.as_strided((rows, cols), (ld, 1)) if n else torch.empty(rows, cols, dtype=torch.uint8)

    def grouped_gemm_fp8(self, sizes, ptr_a, ptr_b, ptr_d, ld_a, ld_b, ld_d, ptr_sfa, ptr_sfb, scale_n):
        """e4m3 A_g and B_g with fp32 scales per 1x128 of A (rows of K/128, K-major) and per scale_n x 128 of B
        (scale_n 128: blocks, 1: rows), D_g = sum over K blocks of (A_g block @ B_g block^T) x SFA x SFB, as
        CUTLASS's blockwise mainloop."""
        assert scale_n in (1, 128), scale_n
        self.calls += 1
        for g in range(sizes.shape[0]):
            m, n, k = sizes[g].tolist()
            if m == 0:
                continue
            kb = -(-k // 128)
            a = self._bytes(int(ptr_a[g]), m, k, int(ld_a[g])).view(torch.float8_e4m3fn).float()
            b = self._bytes(int(ptr_b[g]), n, k, int(ld_b[g])).view(torch.float8_e4m3fn).float()
            sfa = self._view(int(ptr_sfa[g]), m, kb, kb)
            sfb = self._view(int(ptr_sfb[g]), -(-n // scale_n), kb, kb)
            acc = torch.zeros(m, n)
            for j in range(kb):
                cols = slice(128 * j, 128 * (j + 1))
                acc += (a[:, cols] @ b[:, cols].T) * sfa[:, j:j + 1] * sfb[:, j].repeat_interleave(scale_n)[:n]
            self._view(int(ptr_d[g]), m, n, int(ld_d[g])).copy_(acc)


def _through_the_stand_in(case, inputs: dict, prepare: bool = False):
    """cutlass_experts on CPU float32 inputs through the stand-in extension (two grouped GEMMs): (out, args,
    problem), ``out`` NaN-poisoned before the call; ``prepare``: with the backend's prepared weights."""
    problem = ExpertsProblem("cpu", torch.float32, case.T, inputs["w13"].shape[0], case.E, case.K, case.N, case.k,
                             activation=ActivationSpec.parse(case.activation), has_expert_map=case.expert_map,
                             quant=moe.quant.QuantConfig.parse(case.quant))
    args = moe.ExpertsArgs(inputs["hidden_states"], inputs["w13"], inputs["w2"], inputs["topk_weights"],
                           inputs["topk_ids"], expert_map=inputs["expert_map"])
    out = torch.full_like(inputs["hidden_states"], float("nan"))
    ext = _GroupedGemmStandIn()
    prepared = cutlass.BACKEND.prepare(args, problem) if prepare else None
    cutlass.cutlass_experts(args, problem, out, ext=ext, prepared=prepared)
    assert ext.calls == 2
    return out, args, problem


@pytest.mark.parametrize(("T", "emap", "activation"), [(1, False, "silu"), (9, True, "gelu_tanh"),
                                                      (40, False, "relu2")])
def test_cutlass_pipeline_against_a_stand_in_extension(T, emap, activation):
    from moe.testing import ParityCase, assert_close, experts_float64, make_inputs

    case = ParityCase(T=T, E=6, K=32, N=16, k=2, activation=activation, expert_map=emap)
    inputs = make_inputs(case)
    out, _, _ = _through_the_stand_in(case, inputs)
    ref = experts_float64(inputs["hidden_states"], inputs["w13"], inputs["w2"], inputs["topk_weights"],
                          inputs["topk_ids"], activation, expert_map=inputs["expert_map"])
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize(("scheme", "T", "emap", "prepare"), [
    ("fp8_block", 1, False, False), ("fp8_block", 3, False, False), ("fp8_block", 20, True, False),
    ("fp8_tensor", 1, False, False), ("fp8_tensor", 9, False, False), ("fp8_tensor", 20, True, False),
    ("fp8_channel", 1, False, True), ("fp8_channel", 9, True, False), ("fp8_channel", 20, False, True),
])
def test_cutlass_fp8_pipeline_against_a_stand_in_extension(scheme, T, emap, prepare):
    """The FP8 schemes' host side: each GEMM's input quantized as the scheme says, its scales written per 1x128
    (SFA) and the weight scales per block or row (SFB, from ``prepare`` or per call), the addresses of every
    expert's rows and scales, against the reference of the backend's arithmetic (within the float32 row) and the
    unquantized oracle (within the scheme's noise). K=384 gives three scale steps, so a scale applied to the
    wrong step shows; under fp8_tensor an expert map drops rows from GEMM1's gathered input while the
    per-tensor scale still spans every token."""
    import dataclasses

    from moe import testing as mt

    case = mt.ParityCase(T=T, E=4, K=384, N=128, k=2, quant=scheme, expert_map=emap)
    plain = mt.make_inputs(dataclasses.replace(case, quant="none"))
    inputs = mt.quantized_inputs(plain, case)  # the same values, quantized
    out, args, problem = _through_the_stand_in(case, inputs, prepare=prepare)
    emulation = mt.arithmetic_reference("cutlass", args, problem)
    assert mt.rel_error(out, emulation) <= mt.tolerance(torch.float32, scheme)
    ref = mt.experts_float64(inputs["hidden_states"], plain["w13"], plain["w2"], inputs["topk_weights"],
                             inputs["topk_ids"], expert_map=inputs["expert_map"])
    assert mt.rel_error(out, ref) <= mt.QUANT_NOISE[scheme]


def test_cutlass_kernel_scales():
    """SFA and SFB as the kernel reads them: per-token and per-tensor activation scales repeated per 128
    columns; per-tensor weight scales over each part's (gate's, up's) blocks; per-channel ones per row."""
    from moe.kernels.quant import QuantizedRows

    q = QuantizedRows(torch.zeros(3, 300, dtype=torch.float8_e4m3fn), torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(cutlass.activation_scales(q, 300), torch.tensor([[1.0] * 3, [2.0] * 3, [3.0] * 3]))
    q = QuantizedRows(q.data, torch.tensor([5.0]))
    assert torch.equal(cutlass.activation_scales(q, 300), torch.full((3, 3), 5.0))
    w = moe.quant.quantize(torch.randn(2, 512, 256), moe.quant.named("fp8_tensor").weights, parts=2)
    sfb = cutlass.weight_scales(w)
    assert sfb.shape == (2, 4, 2)
    assert torch.equal(sfb[:, :2], w.scale[:, :1, None].expand(2, 2, 2))
    assert torch.equal(sfb[:, 2:], w.scale[:, 1:, None].expand(2, 2, 2))
    w = moe.quant.quantize(torch.randn(2, 512, 256), moe.quant.named("fp8_channel").weights)
    assert torch.equal(cutlass.weight_scales(w), w.scale[:, :, None].expand(2, 512, 2))
    blocks = moe.quant.quantize(torch.randn(2, 512, 256), moe.quant.named("fp8_block").weights, parts=2)
    assert cutlass.weight_scales(blocks) is blocks.scale or torch.equal(cutlass.weight_scales(blocks), blocks.scale)


def test_cutlass_prepares_only_fp8_channel_scales():
    from moe.target import TARGETS

    w = moe.quant.quantize(torch.randn(2, 512, 256), moe.quant.named("fp8_channel").weights, parts=2)
    w2 = moe.quant.quantize(torch.randn(2, 256, 256), moe.quant.named("fp8_channel").weights)
    args = moe.ExpertsArgs(torch.randn(1, 256), w, w2, torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int32))
    problem = ExpertsProblem("cuda", torch.bfloat16, 1, 2, 2, 256, 256, 1, target=TARGETS["h200"],
                             quant=moe.quant.named("fp8_channel"))
    prepared = cutlass.BACKEND.prepare(args, problem)
    assert prepared.tensors["w13_sfb"].shape == (2, 512, 2) and prepared.tensors["w2_sfb"].shape == (2, 256, 2)
    assert cutlass.BACKEND.prepare(args, dataclasses.replace(problem, quant=moe.quant.named("fp8_block"))) is None


@pytest.mark.parametrize("scheme", cutlass.FP8_SCHEMES)
def test_cutlass_fp8_runs_on_hopper_and_says_why_not_elsewhere(scheme):
    """On since their GPU parity passed (H100, 2026-12-05); a target without FP8 MMA gets the reason."""
    from moe.target import TARGETS

    problem = ExpertsProblem("cuda", torch.bfloat16, 4, 8, 8, 512, 256, 2, target=TARGETS["h200"],
                             quant=moe.quant.named(scheme))
    assert cutlass.BACKEND.supports(problem) == (True, "ok")
    assert cutlass.HARDWARE_VERDICT == {}
    ok, why = cutlass.BACKEND.supports(dataclasses.replace(problem, target=TARGETS["a100"]))
    assert not ok and "wgmma" in why


def test_cutlass_extension_sources_are_in_the_cache_key():
    assert all(p.is_file() for p in cutlass.SOURCES)
    assert "-U__CUDA_NO_HALF_OPERATORS__" in cutlass.FLAGS
