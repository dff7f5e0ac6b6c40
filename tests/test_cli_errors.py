"""One regression test per CLI finding: each bad request is refused in one line (exit status 2) before
anything is built, timed or allocated."""

from __future__ import annotations

import sys

import pytest
import torch
from cases import refused as _refused

import moe
import moe.bench
from moe.cli import main
from moe.explain import problem_from_config
from moe.registry import BrokenPlugin, judge


@pytest.fixture
def no_timing(monkeypatch):
    """Any measurement fails the test: a refusal must come before the first allocation."""
    def fail(*args, **kwargs):
        raise AssertionError("bench started measuring before refusing")

    monkeypatch.setattr(moe.bench, "measure_ceilings", fail)


# ---------------------------------------------------------------- moe bench


def test_bench_unknown_backend(capsys, no_timing):
    err = _refused(capsys, ["bench", "--backends", "torch,nosuch", "--no-progress"])
    assert "--backends: unknown backend 'nosuch'" in err
    for b in moe.list_backends():
        assert b.name in err


def test_bench_device_not_cuda_or_cpu(capsys, no_timing):
    err = _refused(capsys, ["bench", "--device", "tpu", "--no-progress"])
    assert "--device: got 'tpu'" in err and "cuda" in err and "cpu" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_bench_cuda_without_a_cuda_device(capsys, no_timing):
    err = _refused(capsys, ["bench", "--device", "cuda", "--no-progress"])
    assert "no CUDA device" in err and "--device cpu" in err


def test_bench_json_folder_missing(tmp_path, capsys, no_timing):
    err = _refused(capsys, ["bench", "--m", "1", "--json", str(tmp_path / "nosuch" / "r.json"), "--no-progress"])
    assert "--json" in err and "does not exist" in err


def test_bench_json_is_a_folder(tmp_path, capsys, no_timing):
    err = _refused(capsys, ["bench", "--m", "1", "--json", str(tmp_path), "--no-progress"])
    assert "is a folder" in err


def test_bench_plot_without_matplotlib(tmp_path, monkeypatch, capsys, no_timing):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    err = _refused(capsys, ["bench", "--m", "1", "--plot", str(tmp_path / "p.png"), "--no-progress"])
    assert "pip install 'moe-layer[plot]'" in err


def test_bench_dsv3_refused_for_memory(monkeypatch, capsys, no_timing):
    p = moe.bench.PRESETS["dsv3"]
    weights, other = moe.bench.estimate_bytes(p, p.default_m, torch.float32, "cpu")
    assert weights == p.weight_bytes(4)
    avail = moe.bench.available_bytes(torch.device("cpu"))
    if avail is None or avail >= weights + other:  # a machine this large: pretend it is smaller
        monkeypatch.setattr(moe.bench, "available_bytes", lambda device: 16 * 10**9)
    err = _refused(capsys, ["bench", "--preset", "dsv3", "--device", "cpu", "--no-progress"])
    assert "--preset dsv3: needs about" in err and "GB is available" in err and "--preset default" in err


def test_bench_failing_write_keeps_the_table(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(moe.bench, "write_json", broken)
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--m", "1", "--backends", "torch", "--json", str(tmp_path / "r.json"), "--no-progress"])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert "ceilings (measured now)" in captured.out and "disk full" in captured.err


def test_bench_rows_note_a_wide_spread():
    p, cpu, cuda = moe.bench.PRESETS["default"], torch.device("cpu"), torch.device("cuda")
    wide = moe.bench.timed_row(p, 1, "torch", "eager", [1e-3, 1.05e-3, 1.3e-3], 5e-4, 0.0, cuda)
    assert wide.time_us == pytest.approx(1050) and wide.min_us == pytest.approx(1000)
    assert wide.max_us == pytest.approx(1300) and "wide spread" in wide.note
    assert wide.pct_floor == pytest.approx(100 * 5e-4 / 1.05e-3)
    narrow = moe.bench.timed_row(p, 1, "torch", "eager", [1e-3, 1.02e-3, 1.05e-3], 5e-4, 0.0, cpu)
    assert narrow.note == "" and narrow.pct_floor is None  # CPU: no % of floor


# ---------------------------------------------------------------- moe backends


@pytest.mark.parametrize("target", ["mi300x", "a100"])
def test_backends_for_a_named_target(target, capsys):
    assert main(["backends", "--target", target]) == 0
    out = capsys.readouterr().out
    t = moe.TARGETS[target]
    assert out.splitlines()[0].startswith(f"target: {t.describe()}")
    problem = problem_from_config(
        moe.MoEConfig(num_experts=8, top_k=2, hidden_size=4096, intermediate_size=14336),
        dtype=torch.bfloat16, target=t)
    for b in moe.list_backends():
        c = judge(b, problem)
        line = next(ln for ln in out.splitlines() if ln.startswith(b.name + " "))
        assert c.reason and c.reason in line and ("yes" if c.ok else "no") in line.split()


def test_backends_lists_broken_plugins(monkeypatch, capsys):
    moe.list_backends()  # plugins are discovered at the first use
    bad = BrokenPlugin("fastmoe", "fastmoe.backend:BACKEND", "fastmoe-dist", "failed to load: ImportError: no cuda")
    monkeypatch.setitem(moe.registry._broken, bad.name, bad)
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "broken plugins (1, never selected):" in out
    assert "fastmoe = fastmoe.backend:BACKEND (from fastmoe-dist): failed to load: ImportError: no cuda" in out


def test_backends_bad_problem(capsys):
    err = _refused(capsys, ["backends", "--problem", "8,64,32"])
    assert "--problem: expected E,N,K,TOPK" in err and "'8,64,32'" in err
    err = _refused(capsys, ["backends", "--problem", "2,64,32,4"])
    assert "top_k=4 must be <= num_experts=2" in err


# ---------------------------------------------------------------- moe tune


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_tune_needs_cuda(capsys):
    err = _refused(capsys, ["tune", "--preset", "default"])
    assert "CUDA device" in err


# ---------------------------------------------------------------- moe hf-check


@pytest.fixture
def no_model(monkeypatch):
    """Building a model fails the test: these refusals come first."""
    from moe.hf import check

    def fail(*args, **kwargs):
        raise AssertionError("hf-check built the model before refusing")

    monkeypatch.setattr(check, "tiny_model", fail)


def test_hf_check_unknown_backend(capsys, no_model):
    err = _refused(capsys, ["hf-check", "mixtral", "--backend", "nosuch"])
    assert "--backend 'nosuch' is not registered" in err
    for b in moe.list_backends():
        assert b.name in err


def test_hf_check_folder_that_is_not_a_model(tmp_path, capsys, no_model):
    err = _refused(capsys, ["hf-check", str(tmp_path)])
    assert "not a model (no config.json)" in err


def test_hf_check_neither_folder_nor_family(capsys, no_model):
    err = _refused(capsys, ["hf-check", "nosuch-family"])
    assert "neither a directory nor a family" in err and "mixtral" in err


def test_hf_check_without_transformers(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)
    for name in [n for n in sys.modules if n == "moe.hf" or n.startswith("moe.hf.")]:
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    err = _refused(capsys, ["hf-check", "mixtral"])
    assert "pip install 'moe-layer[hf]'" in err


def test_hf_check_triton_on_cpu_without_the_interpreter(monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    moe.reset_caches()  # the CPU target reads TRITON_INTERPRET again
    # moe.functional remembers call descriptions (with their target) per shape, and reset_caches does not
    # empty that memory yet: start from an empty one so an earlier test's interpreter target is not reused
    if hasattr(moe.functional, "_problems"):
        monkeypatch.setattr(moe.functional, "_problems", {})
    err = _refused(capsys, ["hf-check", "olmoe", "--backend", "triton", "--repeat", "1", "--seq", "2",
                            "--batch", "1"])
    assert "--backend triton" in err and "TRITON_INTERPRET=1" in err


def test_hf_check_implementation_the_model_refuses(capsys):
    err = _refused(capsys, ["hf-check", "dbrx", "--experts-implementation", "grouped_mm"])
    assert "--experts-implementation 'grouped_mm' is not accepted by DbrxForCausalLM" in err


@pytest.mark.parametrize("family", ["dbrx", "mixtral"])
def test_hf_check_tiny_family_runs_with_the_models_own_experts(family, capsys):
    assert main(["hf-check", family, "--dtype", "fp32", "--repeat", "1", "--seq", "4", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "float32" in out and " ok" in out and "experts before: 'eager'" in out
