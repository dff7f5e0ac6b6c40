"""Contract test of the aiter adapter against a stand-in AITer.

The stand-in's names, signature, defaults and enum values are recorded from ROCm/aiter at tag
v0.1.20.post1, commit de07f3885ee5f2030ba72b6cc5940d674fd457cf:
- ``aiter/fused_moe.py``: ``def fused_moe(hidden_states, w1, w2, topk_weight, topk_ids, expert_mask=None,
  activation=ActivationType.Silu, quant_type=QuantType.No, doweight_stage1=False, w1_scale=None,
  w2_scale=None, a1_scale=None, a2_scale=None, block_size_M=None, num_local_tokens=None,
  moe_sorting_dispatch_policy=0, dtype=None, hidden_pad=0, intermediate_pad=0, bias1=None, bias2=None,
  splitk=0, swiglu_limit=None, beta=None, linear_beta=None, gate_mode=GateMode.SEPARATED.value,
  shared_w1=None, shared_w2=None, shared_w1_scale=None, shared_w2_scale=None, shared_expert_id=-1)``;
- ``csrc/include/aiter_enum.h``: ``ActivationType {No=-1, Silu=0, Gelu=1, Swiglu=2, Situv2=3}``,
  ``QuantType {No, per_Tensor, per_Token, per_1x32, per_1x128, per_128x128, per_256x128, per_1024x128}``;
- ``aiter/ops/flydsl/moe_common.py``: ``GateMode(str, Enum)`` separated, mock_gate_only, gate_only, interleave;
- ``aiter/ops/shuffle.py``: ``shuffle_weight(x, layout=(16, 16), use_int4=False, is_guinterleave=False,
  gate_up=False, pad_k_to=0)``: rows in tiles of 16, columns in tiles of 32 split into 16-byte packs,
  permuted (tile_n, tile_k, pack, row, elem), tagged ``is_shuffled = True``.

The stand-in takes no ``**kwargs``: an argument the tag lacks is a TypeError, as on the real library. It
checks what the adapter must get right (shuffled and flagged weights, the explicit gate/up mode, the enum
members, the scale shapes), undoes the shuffle and computes the experts in float64. A contract test: it
proves the adapter matches the recorded API, not that AITer's kernels run (no AMD GPU here).
"""

from __future__ import annotations

import dataclasses
import enum
import sys
import types

import pytest
import torch

import moe
from moe.backends import aiter as adapter
from moe.config import ActivationSpec
from moe.contract import ExpertsArgs, ExpertsProblem
from moe.target import TARGETS, rocm_target
from moe.testing import ParityCase, assert_close, experts_float64, make_inputs

MI355 = rocm_target("AMD Instinct MI355X", (9, 5), 256, 65536)


class ActivationType(enum.IntEnum):
    No = -1
    Silu = 0
    Gelu = 1
    Swiglu = 2
    Situv2 = 3


QuantType = enum.IntEnum("QuantType", ["No", "per_Tensor", "per_Token", "per_1x32", "per_1x128", "per_128x128",
                                       "per_256x128", "per_1024x128"], start=0)


class GateMode(str, enum.Enum):
    SEPARATED = "separated"
    MOCK_GATE_ONLY = "mock_gate_only"
    GATE_ONLY = "gate_only"
    INTERLEAVE = "interleave"


def _tiles(x: torch.Tensor, layout=(16, 16)) -> tuple[int, ...]:
    bn, bk = layout[0], layout[1] * 2
    pack = 16 // x.element_size()
    return (-1, x.shape[-2] // bn, bn, x.shape[-1] // bk, bk // pack, pack)


def shuffle_weight(x, layout=(16, 16), use_int4=False, is_guinterleave=False, gate_up=False, pad_k_to=0):
    assert not (use_int4 or is_guinterleave or gate_up or pad_k_to), "the adapter uses the plain (16, 16) shuffle"
    y = x.view(_tiles(x, layout)).permute(0, 1, 3, 4, 2, 5).contiguous().view(x.shape)
    y.is_shuffled = True
    return y


def unshuffle(y: torch.Tensor) -> torch.Tensor:
    t = _tiles(y)
    return y.view(t[0], t[1], t[3], t[4], t[2], t[5]).permute(0, 1, 4, 2, 3, 5).contiguous().view(y.shape)


def _dequantize(w: torch.Tensor, scale: torch.Tensor | None, quant_type: QuantType) -> torch.Tensor:
    w = w.double()
    if quant_type == QuantType.No:
        assert scale is None
        return w
    if quant_type == QuantType.per_Token:
        assert scale.shape == (*w.shape[:2], 1), f"per_Token weight scales are [E, rows, 1], got {scale.shape}"
        return w * scale.double()
    assert quant_type == QuantType.per_128x128
    assert scale.shape == (w.shape[0], -(-w.shape[1] // 128), -(-w.shape[2] // 128)), scale.shape
    s = scale.double().repeat_interleave(128, 1).repeat_interleave(128, 2)
    return w * s[:, :w.shape[1], :w.shape[2]]


def fused_moe(hidden_states, w1, w2, topk_weight, topk_ids, expert_mask=None, activation=ActivationType.Silu,
              quant_type=QuantType.No, doweight_stage1=False, w1_scale=None, w2_scale=None, a1_scale=None,
              a2_scale=None, block_size_M=None, num_local_tokens=None, moe_sorting_dispatch_policy=0, dtype=None,
              hidden_pad=0, intermediate_pad=0, bias1=None, bias2=None, splitk=0, swiglu_limit=None, beta=None,
              linear_beta=None, gate_mode=GateMode.SEPARATED.value, shared_w1=None, shared_w2=None,
              shared_w1_scale=None, shared_w2_scale=None, shared_expert_id=-1):
    assert getattr(w1, "is_shuffled", False) and getattr(w2, "is_shuffled", False), "weights must be shuffled"
    assert GateMode(gate_mode) is GateMode.SEPARATED, gate_mode
    assert isinstance(activation, ActivationType) and isinstance(quant_type, QuantType)
    assert topk_ids.dtype == torch.int32 and topk_weight.dtype == torch.float32
    name = {ActivationType.Silu: "silu", ActivationType.Gelu: "gelu"}[activation]
    w13 = _dequantize(unshuffle(w1), w1_scale, quant_type)
    w2d = _dequantize(unshuffle(w2), w2_scale, quant_type)
    return experts_float64(hidden_states, w13, w2d, topk_weight, topk_ids, name,
                           on_input=doweight_stage1).to(hidden_states.dtype)


def install(monkeypatch, fused=fused_moe) -> None:
    """The stand-in as the packages ``aiter``, ``aiter.fused_moe``, ``aiter.ops``, ``aiter.ops.shuffle``."""
    root = types.ModuleType("aiter")
    root.ActivationType, root.QuantType = ActivationType, QuantType
    fm = types.ModuleType("aiter.fused_moe")
    fm.fused_moe, fm.GateMode = fused, GateMode
    ops = types.ModuleType("aiter.ops")
    sh = types.ModuleType("aiter.ops.shuffle")
    sh.shuffle_weight = shuffle_weight
    root.fused_moe, root.ops, ops.shuffle = fm, ops, sh
    for name, mod in (("aiter", root), ("aiter.fused_moe", fm), ("aiter.ops", ops), ("aiter.ops.shuffle", sh)):
        monkeypatch.setitem(sys.modules, name, mod)


def _problem(case: ParityCase, target=MI355) -> ExpertsProblem:
    return ExpertsProblem("cpu", case.dtype, case.T, case.E, case.E, case.K, case.N, case.k,
                          activation=ActivationSpec.parse(case.activation), quant=moe.QuantConfig.parse(case.quant),
                          target=target)


def _args(inputs: dict) -> ExpertsArgs:
    return ExpertsArgs(inputs["hidden_states"], inputs["w13"], inputs["w2"], inputs["topk_weights"],
                       inputs["topk_ids"])


@pytest.mark.parametrize(("activation", "quant"), [("silu", "none"), ("gelu", "none"), ("silu", "fp8_channel"),
                                                   ("silu", "fp8_block")])
def test_adapter_matches_the_recorded_api(activation, quant, monkeypatch):
    install(monkeypatch)
    case = ParityCase(T=7, E=4, K=256, N=128, k=2, activation=activation, quant=quant, dtype=torch.bfloat16)
    inputs = make_inputs(case)
    problem = _problem(case)
    assert adapter.BACKEND.is_available()[0]
    assert adapter.BACKEND.supports(problem) == (True, "ok (unverified on hardware)")
    args = _args(inputs)
    args = dataclasses.replace(args, prepared=adapter.BACKEND.prepare(args, problem))
    out = torch.full_like(inputs["hidden_states"], float("nan"))
    adapter.BACKEND.apply(args, problem, out)
    ref = experts_float64(inputs["hidden_states"], inputs["w13"], inputs["w2"], inputs["topk_weights"],
                          inputs["topk_ids"], activation)
    assert_close(out, ref, torch.bfloat16)


def test_prepare_shuffles_once_and_apply_reflags(monkeypatch):
    install(monkeypatch)
    case = ParityCase(T=3, E=2, K=64, N=32, k=1)
    inputs = make_inputs(case)
    problem, args = _problem(case), _args(inputs)
    prepared = adapter.BACKEND.prepare(args, problem)
    assert torch.equal(unshuffle(prepared.tensors["w13"]), inputs["w13"])
    assert not torch.equal(prepared.tensors["w13"], inputs["w13"])  # really rearranged
    plain = {k: v.clone() for k, v in prepared.tensors.items()}  # clones carry no is_shuffled flag
    kwargs = adapter.aiter_call(args, problem, moe.PreparedWeights("aiter", plain))
    assert kwargs["w1"].is_shuffled and kwargs["w2"].is_shuffled
    assert kwargs["gate_mode"] == "separated"


def test_an_argument_the_tag_lacks_fails_the_contract(monkeypatch):
    """A release without gate_mode (older AITer): is_available names the parameter."""

    def old_fused_moe(hidden_states, w1, w2, topk_weight, topk_ids, expert_mask=None,
                      activation=ActivationType.Silu, quant_type=QuantType.No, doweight_stage1=False,
                      w1_scale=None, w2_scale=None):
        raise AssertionError("must not be called")

    install(monkeypatch, old_fused_moe)
    ok, why = adapter.BACKEND.is_available()
    assert not ok and "gate_mode" in why and adapter.AITER_TAG in why


def test_every_passed_parameter_is_in_the_recorded_signature():
    import inspect

    params = inspect.signature(fused_moe).parameters
    assert set(adapter.PASSED) <= set(params)
    assert set(adapter.ACTIVATIONS.values()) <= set(ActivationType.__members__)
    assert set(adapter.QUANT_TYPES.values()) <= set(QuantType.__members__)


def test_without_aiter_the_reason_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "aiter", None)  # an import of it fails
    ok, why = adapter.BACKEND.is_available()
    assert not ok and "ROCm/aiter" in why and adapter.AITER_TAG in why and "unrelated" in why


@pytest.mark.parametrize(("target", "kw", "needle"), [
    (TARGETS["h200"], {}, "AMD GPUs"),
    (TARGETS["mi300x"], {"quant": "fp8_block"}, "e4m3fnuz"),
    (MI355, {"activation": "swigluoai"}, "no AITer ActivationType"),
    (MI355, {"dtype": torch.float32}, "bfloat16 or float16"),
])
def test_supports_says_why(target, kw, needle):
    case = ParityCase(T=4, E=4, K=256, N=128, k=2, dtype=kw.pop("dtype", torch.bfloat16), **kw)
    ok, why = adapter.BACKEND.supports(_problem(case, target))
    assert not ok and needle in why


def test_supports_refuses_maps_and_biases():
    problem = _problem(ParityCase(T=4, E=4, K=256, N=128, k=2, dtype=torch.bfloat16))
    for change, needle in (({"has_expert_map": True}, "expert maps"), ({"has_w13_bias": True}, "biases")):
        ok, why = adapter.BACKEND.supports(dataclasses.replace(problem, **change))
        assert not ok and needle in why
