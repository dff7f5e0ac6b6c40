"""Device targets: features from capabilities, validation, named cards, and what each backend says for
a card this machine does not have (ROCm MI300, Ampere without FP8 MMA, Blackwell). The launch decisions
(TMA, chained launches) read features, so a ROCm device never gets CUDA-only paths."""

from __future__ import annotations

import pytest
import torch

import moe
from moe.explain import problem_from_config
from moe.registry import judge
from moe.target import TARGETS, DeviceTarget, cuda_target, named_target

CFG = moe.MoEConfig(num_experts=8, top_k=2, hidden_size=4096, intermediate_size=14336)


def test_features_from_capabilities():
    h200, a100, b200, mi300 = (TARGETS[n] for n in ("h200", "a100", "b200", "mi300x"))
    assert h200.tma and h200.pdl and h200.wgmma and h200.fp8_mma and not h200.fp4_mma and not h200.tcgen05
    assert not (a100.tma or a100.pdl or a100.wgmma or a100.fp8_mma) and a100.int8_mma
    assert b200.tcgen05 and b200.fp4_mma and b200.fp8_mma and b200.tma and not b200.wgmma
    assert mi300.vendor == "rocm" and mi300.capability == (9, 4)
    assert not (mi300.tma or mi300.pdl or mi300.wgmma or mi300.fp8_mma) and mi300.int8_mma  # fnuz FP8, not OCP
    assert cuda_target("NVIDIA L40S", (8, 9)).fp8_mma and not cuda_target("x", (8, 9)).tma


@pytest.mark.parametrize(("fields", "match"), [
    (dict(name="c", vendor="cpu", tma=True), "a cpu target has no tensor-core features, got tma"),
    (dict(name="r", vendor="rocm", capability=(9, 4), pdl=True), "pdl are CUDA features"),
    (dict(name="g", vendor="cuda"), "needs its capability"),
    (dict(name="g", vendor="cuda", capability=(9, 0), triton_interpreter=True), "describes a CPU target"),
    (dict(name="g", vendor="tpu"), "vendor"),
])
def test_inconsistent_targets_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        DeviceTarget(**fields)


def test_unknown_named_target_lists_the_names():
    with pytest.raises(ValueError, match="unknown target 'h300'; known: a100, h100, h200, b200, mi300x, cpu"):
        named_target("h300")


def _verdicts(target: str, dtype=torch.bfloat16) -> dict[str, tuple[bool, str]]:
    problem = problem_from_config(CFG, dtype=dtype, target=target)
    return {b.name: (judge(b, problem).ok, judge(b, problem).reason) for b in moe.list_backends()}


def test_what_runs_on_named_cards():
    h200, a100, mi300 = _verdicts("h200"), _verdicts("a100"), _verdicts("mi300x")
    assert h200["triton"][0] and h200["torch_grouped"][0] and h200["torch"][0]
    assert a100["triton"][0] and not a100["torch_grouped"][0]
    assert "wgmma or tcgen05" in a100["torch_grouped"][1] and "A100" in a100["torch_grouped"][1]
    assert mi300["triton"][0] and not mi300["torch_grouped"][0]
    assert _verdicts("b200")["torch_grouped"][0]
    assert not _verdicts("h200", torch.float32)["torch_grouped"][0]  # bf16 only on CUDA


def test_decisions_key_on_the_target():
    d1 = moe.explain(CFG, target="h200")
    d2 = moe.explain(CFG, target="a100")
    assert d1.chosen == "triton" and d2.chosen == "triton"
    assert {c.name: c.ok for c in d1.candidates}["torch_grouped"]
    assert not {c.name: c.ok for c in d2.candidates}["torch_grouped"]


@pytest.mark.parametrize(("name", "tma", "pdl"), [("mi300x", False, False), ("a100", False, False),
                                                   ("h200", True, True), ("b200", True, True)])
def test_launch_paths_follow_features(name, tma, pdl, monkeypatch):
    """A ROCm device reports capability 9.4; the old 'capability >= 9' check would have switched on
    CUDA-only TMA loads and chained launches there."""
    import moe.kernels.host as host

    monkeypatch.setattr(host, "current_target", lambda device: TARGETS[name])
    gpu = torch.device("cuda", 0)
    assert host.tensor_copies(gpu) is tma and host.chains(gpu) is pdl


def test_heuristic_asks_for_tma_only_where_the_device_has_it():
    import dataclasses

    from moe.backends.triton.config import default_config

    problem = dataclasses.replace(problem_from_config(CFG, target="mi300x"), num_tokens=4096)
    assert default_config(problem, tma=TARGETS["mi300x"].tma).gemm1.loads == "pointer"
    assert default_config(problem, tma=TARGETS["h200"].tma).gemm1.loads == "tma"


def test_cpu_target_of_this_process():
    t = moe.current_target("cpu")
    assert t.vendor == "cpu" and t.triton_interpreter  # conftest runs the kernels under the interpreter
    assert problem_from_config(CFG, device="cpu").target == t
