"""``moe bench --quant NAME``: quantized rows beside the unquantized ones, their floor, the scheme in the
table and the JSON, and refusals before any work."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from cases import refused as _refused

import moe
import moe.bench
from moe.activations import apply_activation
from moe.cli import main
from moe.contract import backend_schemes
from moe.quant import NAMES, named, quantize, scale_shape
from moe.quant.calibration import calibrate_static_scales
from moe.registry import judge
from moe.workload import (
    PRESETS,
    Ceilings,
    Preset,
    expert_weight_bytes,
    floor_seconds,
    matmul_rate,
    measure_ceilings,
)


@pytest.fixture
def no_work(monkeypatch):
    """Measuring or making weights fails the test: a refusal comes before either."""
    def fail(*args, **kwargs):
        raise AssertionError("bench started working before refusing")

    monkeypatch.setattr(moe.bench, "measure_ceilings", fail)
    monkeypatch.setattr(moe.bench, "random_weights", fail)


def _line(out: str, backend: str, quant: str) -> str:
    return next(ln for ln in out.splitlines() if ln.split()[2:4] == [backend, quant])


# ---------------------------------------------------------------- the command


def test_bench_quant_fp8_block_on_the_torch_backend(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert main(["bench", "--quant", "fp8_block", "--preset", "default", "--m", "1", "--backends", "torch",
                 "--json", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "quantization scheme fp8_block: weights fp8 per block 128x128, activations fp8 per group of 128" in out
    assert "vs bf16" in next(ln for ln in out.splitlines() if "median us" in ln)
    quant_line, plain_line = _line(out, "torch", "fp8_block"), _line(out, "torch", "none")
    assert quant_line.split()[4] == "eager" and quant_line.split()[8:10] == ["-", "-"]  # CPU: no floor, no %
    assert quant_line.split()[11].endswith("x") and "quantization error vs unquantized" in quant_line
    assert plain_line.split()[11] == "-"  # the unquantized row has no speed-up of its own

    data = json.loads(path.read_text())
    assert data["info"]["quant"][0]["name"] == "fp8_block"
    assert data["info"]["quant"][0]["scheme"] == named("fp8_block").model_dump(mode="json", exclude_none=True)
    rows = data["rows"]
    assert {r["quant"] for r in rows} == {"none", "fp8_block"} and {r["mode"] for r in rows} == {"eager"}
    (q,) = [r for r in rows if r["quant"] == "fp8_block"]
    (b,) = [r for r in rows if r["quant"] == "none"]
    assert q["rel_err"] <= 1e-6  # the torch row is the W8A8 reference itself
    assert 1e-3 < q["extra"]["quant_err"] < 0.2  # e4m3 rounding against the unquantized result
    assert q["vs_bf16"] == pytest.approx(b["time_us"] / q["time_us"])
    assert q["pct_floor"] is None and q["floor_us"] < b["floor_us"]  # fewer weight bytes, same tokens
    assert b["rel_err"] <= 1e-5 and b["vs_bf16"] is None


def test_bench_several_schemes_share_one_unquantized_measurement(tmp_path, capsys):
    """``--quant a,b``: one run, the unquantized row measured once, each scheme's row after it with its own
    header line and its speed-up against that one row; a name twice or an unknown one is refused."""
    path = tmp_path / "r.json"
    assert main(["bench", "--quant", "fp8_block,int8_channel", "--preset", "default", "--m", "1", "--backends",
                 "torch", "--json", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "quantization scheme fp8_block:" in out and "quantization scheme int8_channel:" in out
    data = json.loads(path.read_text())
    assert [q["name"] for q in data["info"]["quant"]] == ["fp8_block", "int8_channel"]
    assert [r["quant"] for r in data["rows"]] == ["none", "fp8_block", "int8_channel"]
    plain = data["rows"][0]
    for r in data["rows"][1:]:
        assert r["vs_bf16"] == pytest.approx(plain["time_us"] / r["time_us"])
    with pytest.raises(moe.bench.BenchError, match="--quant: fp8_block,fp8_block names a scheme twice"):
        moe.bench.resolve_request("default", (1,), "cpu", None, ("torch",), "fp8_block,fp8_block")
    with pytest.raises(moe.bench.BenchError, match="--quant: unknown quantization scheme 'fp4'"):
        moe.bench.resolve_request("default", (1,), "cpu", None, ("torch",), ("fp8_block", "fp4"))


@pytest.fixture
def fixed_ceilings(monkeypatch):
    """CPU ceilings without measuring them (the floor is no bound on CPU anyway)."""
    monkeypatch.setattr(moe.bench, "measure_ceilings", lambda device, dtype: Ceilings(10.0, 0.1, "cpu"))


@pytest.mark.parametrize("name", ["fp8_tensor_static"])
def test_bench_quant_times_the_backends_that_declare_the_scheme_and_skips_the_others(name, fixed_ceilings):
    """Every registered backend (triton under the interpreter where it declares the scheme)."""
    _, rows = moe.bench.run_bench("default", (1,), "cpu", None, None, progress=False, quant=name)
    problem = dataclasses.replace(PRESETS["default"].problem("cpu", torch.float32, 1), quant=named(name))
    for b in moe.list_backends():
        mine = [r for r in rows if r.backend == b.name]
        c = judge(b, problem)
        if not c.ok:  # e.g. a backend whose schemes lack this one: one skipped row, nothing timed
            assert len(mine) == 1 and mine[0].time_us is None and c.reason in mine[0].note
            assert mine[0].quant == name
            continue
        assert name in backend_schemes(b) or "*" in backend_schemes(b)
        quant = [r for r in mine if r.quant == name and r.time_us is not None]
        assert quant and all(r.vs_bf16 is not None and r.rel_err < 1e-2 for r in quant), mine
        assert [r.quant for r in mine] == ["none", name]  # the unquantized row of the mode, then the quantized
    assert not any(r.mode in ("layer", "kernels") for r in rows)  # no layer or kernels rows under --quant


def test_bench_quant_static_scales_come_from_a_calibration(fixed_ceilings):
    req = moe.bench.resolve_request("default", (1,), "cpu", None, ("torch",), "fp8_tensor_static")
    ceil, rows = moe.bench.run_request(req, progress=False)
    info = moe.bench.bench_info(req)
    assert info["quant"][0]["calibration"]["tokens"] == moe.bench.CALIBRATION_M
    (q,) = [r for r in rows if r.quant == "fp8_tensor_static"]
    assert q.extra["a13_scale"] > 0 and q.extra["a2_scale"] > 0 and q.rel_err <= 1e-6
    table = moe.bench.format_table(ceil, rows, info)
    assert "static activation scales" in table and f"a13 = {q.extra['a13_scale']:.4g}" in table


def test_calibrate_static_scales_is_amax_over_448():
    p = Preset("tiny", 4, 2, 32, 16, (1,), activation="swigluoai", bias=True)
    gen = torch.Generator().manual_seed(0)
    w13, _ = moe.workload.random_weights(p, torch.float32, "cpu", gen)
    b13, _ = moe.workload.random_biases(p, torch.float32, "cpu", gen)
    x = torch.randn(8, 32, generator=gen)
    ids = torch.tensor([[0, 1]] * 8)
    a13, a2 = calibrate_static_scales(x, w13, ids, named("fp8_tensor_static").activations, p.activation, w13_bias=b13)
    assert a13.shape == a2.shape == (1,) and a13.dtype == a2.dtype == torch.float32
    assert a13.item() == pytest.approx(x.abs().max().item() / 448)
    spec = moe.ActivationSpec.parse("swigluoai")
    amax = max(apply_activation(x @ w13[e].t() + b13[e], spec).abs().max().item() for e in (0, 1))
    assert a2.item() == pytest.approx(amax / 448)


def test_calibrate_static_scales_per_expert_with_an_expert_map():
    """Per expert: each local expert's own rows (a pair routed to another rank counts for none); an expert that
    got no rows has scale 1; per tensor is the max over the experts."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 16, generator=gen, dtype=torch.float64).to(torch.bfloat16)
    w13 = torch.randn(3, 2 * 8, 16, generator=gen, dtype=torch.float64).to(torch.bfloat16)
    emap = torch.tensor([0, -1, 1, 2], dtype=torch.int32)  # global 1 lives elsewhere; local 2 gets no rows
    ids = torch.tensor([[0, 1], [2, 1], [0, 2], [1, 0], [2, 0], [1, 1]])
    scheme = named("fp8_tensor_static").activations
    a13, a2 = calibrate_static_scales(x, w13, ids, scheme, "silu", expert_map=emap, per_expert=True)
    spec = moe.ActivationSpec.parse("silu")
    for local, glob in ((0, 0), (1, 2)):
        rows = x[(ids == glob).any(dim=1)].double()
        assert a13[local].item() == pytest.approx(rows.abs().max().item() / 448, rel=1e-6)
        act = apply_activation(rows @ w13[local].double().t(), spec).to(torch.bfloat16)
        assert a2[local].item() == pytest.approx(act.abs().max().item() / 448, rel=1e-2)
    assert a13[2].item() == a2[2].item() == 1.0
    t13, t2 = calibrate_static_scales(x, w13, ids, scheme, "silu", expert_map=emap)
    assert t13.shape == t2.shape == (1,)
    assert t13.item() == a13[:2].max().item() and t2.item() == a2[:2].max().item()


# ---------------------------------------------------------------- refusals


def test_bench_quant_unknown_name_is_one_line_before_any_work(capsys, no_work):
    err = _refused(capsys, ["bench", "--quant", "nosuch", "--no-progress"])
    assert "--quant: unknown quantization scheme 'nosuch'" in err
    for name in NAMES:
        assert name in err


def test_bench_quant_memory_estimate_counts_the_quantized_copy(monkeypatch, capsys, no_work):
    p = PRESETS["dsv3"]
    plain, other = moe.bench.estimate_bytes(p, p.default_m, torch.bfloat16, "cuda")
    quant, other_q = moe.bench.estimate_bytes(p, p.default_m, torch.bfloat16, "cuda", "fp8_block")
    assert quant == plain + p.num_experts * expert_weight_bytes(p, 2, "fp8_block") and other_q > other
    # room for the unquantized run but not for the quantized copy beside it
    monkeypatch.setattr(moe.bench, "available_bytes", lambda device: plain + other + 2**20)
    moe.bench.check_memory(moe.bench.resolve_request("dsv3", None, "cpu", torch.bfloat16, ("torch",)))
    err = _refused(capsys, ["bench", "--preset", "dsv3", "--device", "cpu", "--dtype", "bf16", "--quant", "fp8_block",
                            "--no-progress"])
    assert "--preset dsv3: needs about" in err and "and their fp8_block copy" in err


# ---------------------------------------------------------------- the floor (moe.workload)


@pytest.mark.parametrize("p", [PRESETS["default"], Preset("odd", 2, 1, 200, 136, (1,), activation="swigluoai",
                                                          bias=True), Preset("relu", 2, 1, 64, 48, (1,), "relu2")])
@pytest.mark.parametrize("name", [name for name in NAMES if named(name).weights.group_size is None])
def test_expert_weight_bytes_match_quantize(p, name):
    gen = torch.Generator().manual_seed(0)
    w13, w2 = moe.workload.random_weights(p, torch.bfloat16, "cpu", gen)
    gated = moe.ActivationSpec.parse(p.activation).gated
    scheme = named(name).weights
    qw13, qw2 = quantize(w13, scheme, parts=2 if gated else 1), quantize(w2, scheme)
    assert expert_weight_bytes(p, 2, name) == (qw13.nbytes() + qw2.nbytes()) // p.num_experts
    assert expert_weight_bytes(p, 2) == (w13[0].numel() + w2[0].numel()) * 2


def test_fp8_bytes_are_half_of_bf16_plus_scales():
    p = PRESETS["mixtral"]
    bf16, fp8 = expert_weight_bytes(p, 2), expert_weight_bytes(p, 2, "fp8_block")
    k, n = p.hidden_size, p.intermediate_size
    scales = math.prod(scale_shape(named("fp8_block").weights, 1, 2 * n, k, 2)) + math.prod(
        scale_shape(named("fp8_block").weights, 1, k, n, 1))
    assert fp8 == bf16 // 2 + 4 * scales and 0.5 < fp8 / bf16 < 0.51


def test_quantized_floor_uses_quantized_bytes_and_the_low_precision_rate():
    p = PRESETS["mixtral"]
    ceil = Ceilings(copy_gbps=4000.0, matmul_tflops=700.0, device="gpu", fp8_tflops=1300.0, int8_tops=1400.0)
    per = expert_weight_bytes(p, 2, "fp8_block")
    # M=1: bandwidth-bound, so the floor is the bytes: 2 experts' quantized weights + one bf16 row in and out
    assert floor_seconds(p, 1, 2, 2, ceil, per, matmul_rate(ceil, "fp8_block")) == pytest.approx(
        (2 * per + 2 * p.hidden_size * 2) / 4000e9)
    bf16 = floor_seconds(p, 1, 2, 2, ceil)
    assert floor_seconds(p, 1, 2, 2, ceil, per) / bf16 == pytest.approx(0.5, abs=0.01)
    # M=16384: compute-bound, at the fp8 rate
    flops = 2 * 16384 * p.top_k * p.hidden_size * 3 * p.intermediate_size
    assert floor_seconds(p, 16384, 8, 2, ceil, per, matmul_rate(ceil, "fp8_block")) == pytest.approx(
        flops / 1300e12)
    assert floor_seconds(p, 16384, 8, 2, ceil) == pytest.approx(flops / 700e12)


def test_matmul_rate_per_scheme():
    ceil = Ceilings(4000.0, 700.0, "gpu", fp8_tflops=1300.0, int8_tops=1400.0)
    assert matmul_rate(ceil) == 700.0 and matmul_rate(ceil, "fp8_tensor_static") == 1300.0
    assert matmul_rate(ceil, "int8_channel") == 1400.0
    assert matmul_rate(Ceilings(10.0, 0.1, "cpu"), "fp8_block") is None  # not measured on CPU


def test_cpu_ceilings_leave_the_low_precision_rates_out(monkeypatch):
    monkeypatch.setattr(moe.workload, "copy_bandwidth", lambda device: 10.0)
    monkeypatch.setattr(moe.workload, "dense_matmul_rate", lambda device, dtype, n: 0.1)
    ceil = measure_ceilings(torch.device("cpu"), torch.float32)
    assert (ceil.copy_gbps, ceil.matmul_tflops, ceil.fp8_tflops, ceil.int8_tops) == (10.0, 0.1, None, None)


def test_low_precision_rate_helpers_run_or_say_none():
    for rate in (moe.workload.fp8_matmul_rate, moe.workload.int8_matmul_rate):
        value = rate(torch.device("cpu"), 32)
        assert value is None or value > 0


# ---------------------------------------------------------------- presets and help


def test_gptoss120b_preset_and_help_lists_it_and_the_schemes(capsys):
    p = PRESETS["gptoss120b"]
    assert (p.num_experts, p.top_k, p.hidden_size, p.intermediate_size, p.activation, p.bias) == (
        128, 4, 2880, 2880, "swigluoai", True)
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"gptoss120b   {p.describe()}" in out and "quantization scheme" in out
    for name in NAMES:
        assert name in out
