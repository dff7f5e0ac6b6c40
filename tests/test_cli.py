from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch

import moe
from moe.cli import main
from moe.explain import problem_from_config
from moe.registry import judge
from moe.workload import PRESETS


def _line_of(out: str, name: str) -> str:
    return next(ln for ln in out.splitlines() if ln.startswith(name + " "))


def test_backends_lists_every_registered_backend(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("target: ") and "(this machine)" in out.splitlines()[0]
    assert "backend          priority  usable  schemes" in out
    target = moe.current_target("cuda" if torch.cuda.is_available() else "cpu")
    cfg = moe.MoEConfig(num_experts=8, top_k=2, hidden_size=4096, intermediate_size=14336)
    problem = problem_from_config(cfg, dtype=torch.bfloat16 if target.is_gpu else torch.float32, target=target)
    for b in moe.list_backends():
        c = judge(b, problem)
        line = _line_of(out, b.name)
        assert ("yes" if c.ok else "no") in line.split() and c.reason in line
    assert "direct launcher: " in out and "broken plugins: none" in out


def test_backends_problem_dtype_quant_print_the_decision(capsys):
    assert main(["backends", "--target", "h200", "--problem", "8,64,32,2", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "problem: E=8 N=64 K=32 top_k=2 bfloat16 quant=none" in out
    assert "requested='auto' -> chosen=" in out
    # a scheme some backends do not run: their reason is printed, not a traceback
    assert main(["backends", "--target", "h200", "--quant", "fp8_block"]) == 0
    out = capsys.readouterr().out
    assert "quant=fp8_block" in out and "runs the quantization schemes fp8_channel, none, not fp8_block" in out


def test_bench_default_runs_and_checks_every_backend(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert main(["bench", "--m", "1,5", "--json", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    p = PRESETS["default"]
    assert "ceilings (measured now)" in out and "% floor" in out and "median us" in out
    assert f"E={p.num_experts} N={p.intermediate_size} K={p.hidden_size} top_k={p.top_k} silu, float32" in out
    assert f"torch {torch.__version__}" in out and f"moe {moe.__version__}" in out
    assert out.index("ceilings (measured now)") < out.index("wrote ")  # the table comes before the file
    data = json.loads(path.read_text())
    info = data["info"]
    assert info["shape"] == {"E": 8, "N": 384, "K": 256, "top_k": 2, "activation": "silu", "bias": False}
    assert info["dtype"] == "float32" and info["versions"]["moe"] == moe.__version__ and "T" in info["time"]
    assert data["ceilings"]["copy_gbps"] > 0 and data["ceilings"]["matmul_tflops"] > 0
    rows = data["rows"]
    assert {r["m"] for r in rows} == {1, 5}
    timed = [r for r in rows if r["time_us"] is not None]
    assert {r["mode"] for r in timed} >= {"eager", "layer"}
    for r in timed:
        assert r["rel_err"] <= 1e-5, r  # fp32 on CPU
        assert r["floor_us"] > 0 and r["min_us"] <= r["time_us"] <= r["max_us"]
        assert r["pct_floor"] is None  # on CPU the floor is no bound: no percentage
    assert info["floor_is_bound"] is False and "'% floor' are left out" in out
    usable = [b.name for b in moe.list_backends() if b.is_available()[0]]
    assert {r["backend"] for r in timed if r["mode"] == "eager"} == set(usable)
    gemms = [r for r in rows if r["mode"] == "gemms"]  # torch's two bare GEMMs: no bound on CPU, and it says so
    assert [r["m"] for r in gemms] == [1, 5] and all(r["time_us"] is None for r in gemms)
    assert all("torch._grouped_mm is a loop over the experts" in r["note"] for r in gemms)
    assert "mode gemms: torch._grouped_mm twice on the same routing" in out


def test_bench_rejects_bad_m(capsys):
    with pytest.raises(SystemExit, match="--m: expected comma-separated token counts") as exc:
        main(["bench", "--m", "1,x"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().endswith("got '1,x'")  # one line on stderr


def test_bench_help_lists_presets_with_shapes(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name, p in PRESETS.items():
        assert f"{name:<12} {p.describe()}" in out


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "moe", "--version"], capture_output=True, text=True, check=True)
    assert res.stdout.startswith("moe ")


def test_hf_check_subcommand(capsys):
    assert main(["hf-check", "olmoe", "--backend", "torch", "--repeat", "1", "--seq", "4"]) == 0
    out = capsys.readouterr().out
    assert "replaced 2 blocks" in out and "backend: requested 'torch', ran 'torch'" in out


def test_other_commands_do_not_import_transformers():
    code = "import sys; from moe.cli import main; main(['backends']); print('transformers' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip().splitlines()[-1] == "False"


def test_tune_writes_to_the_user_cache_folder_by_default(tmp_path, monkeypatch):
    from moe.backends.triton.tuned import search_dirs, user_dir
    from moe.cli import tune_out_dir

    monkeypatch.delenv("MOE_TUNED_CONFIGS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    moe.reset_caches()
    assert tune_out_dir(None) == user_dir() == tmp_path / "moe" / "configs" / "triton"
    assert user_dir() in search_dirs()  # what tune writes, the lookup reads
    assert tune_out_dir(str(tmp_path / "mine")) == tmp_path / "mine"


def test_tune_accepts_dtype_spellings():
    from moe.cli import build_parser

    for spelling in ("bf16", "bfloat16", "fp16", "float16", "fp32", "float32"):
        assert build_parser().parse_args(["tune", "--dtype", spelling]).dtype == spelling


def test_hf_check_accepts_the_same_dtype_spellings():
    from moe.cli import DTYPES
    from moe.hf.check import DTYPES as HF_DTYPES
    from moe.hf.check import add_arguments

    assert HF_DTYPES == DTYPES
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for spelling in DTYPES:
        assert parser.parse_args(["mixtral", "--dtype", spelling.upper()]).dtype == spelling
