"""``moe bench``'s "gemms" row: torch's two bare grouped GEMMs on the run's routing, the lower bound for two
separate GEMMs. On CPU (and GPUs without grouped GEMM kernels) it is a skipped row that says why, in the
table and the JSON; its inputs recombine to the reference output."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import moe
import moe.bench
import moe.workload
from moe.backends.torch_ref import torch_ref_experts
from moe.contract import ExpertsArgs
from moe.target import TARGETS
from moe.testing import rel_error
from moe.workload import PRESETS, Ceilings, random_biases, random_tokens, random_weights, two_gemms


@pytest.fixture
def fixed_ceilings(monkeypatch):
    monkeypatch.setattr(moe.bench, "measure_ceilings", lambda device, dtype: Ceilings(10.0, 0.1, "cpu"))


def test_gemms_row_on_cpu_is_skipped_with_its_reason(fixed_ceilings, tmp_path):
    req = moe.bench.resolve_request("default", (1, 3), "cpu", None, ("torch",))
    ceil, rows = moe.bench.run_request(req, progress=False)
    gemms = [r for r in rows if r.mode == "gemms"]
    assert [r.m for r in gemms] == [1, 3] and all(r.backend == moe.bench.TWO_GEMMS for r in gemms)
    why = "skipped: on cpu torch._grouped_mm is a loop over the experts, not a grouped GEMM kernel"
    assert all(r.time_us is None and r.note.startswith(why) for r in gemms)
    info = moe.bench.bench_info(req)
    assert info["two_gemms"]["skipped"].startswith(why.removeprefix("skipped: "))
    assert "lower bound for two separate GEMMs" in info["two_gemms"]["what"]
    table = moe.bench.format_table(ceil, rows, info)
    assert f"mode gemms: {moe.bench.TWO_GEMMS_ROW}" in table
    assert sum(line.split()[2:4] == [moe.bench.TWO_GEMMS, "gemms"] and why in line
               for line in table.splitlines()) == 2
    path = tmp_path / "r.json"
    moe.bench.write_json(str(path), ceil, rows, info)
    data = json.loads(path.read_text())
    assert [r["note"][:len(why)] for r in data["rows"] if r["mode"] == "gemms"] == [why, why]
    assert data["info"]["two_gemms"]["mode"] == "gemms"


def test_no_gemms_row_under_quant(fixed_ceilings):
    req = moe.bench.resolve_request("default", (1,), "cpu", None, ("torch",), "fp8_channel")
    _, rows = moe.bench.run_request(req, progress=False)
    assert not any(r.mode == "gemms" for r in rows)
    assert moe.bench.bench_info(req)["two_gemms"]["skipped"] == "not under --quant (unquantized GEMMs)"


def test_where_the_two_gemms_bound_nothing(monkeypatch):
    unavailable = moe.workload.two_gemms_unavailable
    assert "loop over the experts" in unavailable(torch.device("cpu"))
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(moe.workload, "current_target", lambda device: TARGETS["a100"])
    assert "grouped GEMM kernels for Hopper (wgmma) and Blackwell (tcgen05) only" in unavailable(cuda)
    assert TARGETS["a100"].name in unavailable(cuda)
    monkeypatch.setattr(moe.workload, "current_target", lambda device: TARGETS["h200"])
    assert unavailable(cuda) is None
    monkeypatch.delattr(torch, "_grouped_mm")
    assert unavailable(cuda) == f"torch {torch.__version__} has no torch._grouped_mm (torch >= 2.8 has it)"


@pytest.mark.parametrize("name", ["default", "gptoss20b"])
def test_two_gemms_recombine_to_the_reference(name):
    """The permuted rows, offsets and GEMM2 input are the call's: recombined they give the reference."""
    p = PRESETS[name]
    if p.num_experts > 8:  # a small copy of the shape (same activation and biases)
        p = dataclasses.replace(p, num_experts=6, hidden_size=64, intermediate_size=32)
    gen = torch.Generator().manual_seed(0)
    w13, w2 = random_weights(p, torch.float32, "cpu", gen)
    b13, b2 = random_biases(p, torch.float32, "cpu", gen)
    x, logits = random_tokens(p, 9, torch.float32, "cpu", gen)
    weights, ids = moe.fused_topk(logits, p.top_k)
    try:
        g = two_gemms(x, w13, w2, weights, ids, p.activation, b13, b2)
    except (RuntimeError, NotImplementedError) as exc:  # a torch without the CPU loop
        pytest.skip(f"torch._grouped_mm does not run on CPU here: {exc}")
    assert g.rows.shape == (9 * p.top_k, p.hidden_size) and g.act.shape == (9 * p.top_k, p.intermediate_size)
    assert int(g.offs[-1]) == 9 * p.top_k and bool((g.expert[1:] >= g.expert[:-1]).all())  # grouped, unpadded
    args = ExpertsArgs(x, w13, w2, weights, ids, b13, b2)
    ref = torch_ref_experts(args, p.problem("cpu", torch.float32, 9), compute_dtype=torch.float32)
    assert rel_error(g.output(9), ref) < 1e-5


def test_auto_rows_name_the_backend_auto_chose(fixed_ceilings):
    """``--backends auto``: what a call that names no backend runs, timed beside the named ones."""
    req = moe.bench.resolve_request("default", (3,), "cpu", None, ("torch", "auto"), "fp8_channel")
    _, rows = moe.bench.run_request(req, progress=False)
    auto = [r for r in rows if r.backend.startswith("auto->")]
    assert {(r.backend, r.quant) for r in auto} == {("auto->torch", "none"), ("auto->torch", "fp8_channel")}
    assert all(r.time_us is not None and r.rel_err is not None and r.rel_err < 1e-2 for r in auto)
