"""The AITer backend: an adapter to ROCm AITer's fused MoE (``aiter.fused_moe.fused_moe``) on AMD GPUs.

Unverified on hardware: no AMD GPU was available to this project. It is tested against a stand-in
module whose signature and enums are recorded from ROCm/aiter v0.1.20.post1 (commit de07f38,
``aiter/fused_moe.py``, ``csrc/include/aiter_enum.h``, ``aiter/ops/shuffle.py``, ``aiter/ops/flydsl/
moe_common.py``): ``tests/test_aiter_contract.py``.

What the adapter does, and why:
- **weights shuffled once** by ``prepare`` (``aiter.ops.shuffle.shuffle_weight(w, layout=(16, 16))``, which
  tags the result ``is_shuffled``, the flag AITer's dispatcher reads); the layer keeps that one copy. The
  flag is set again before each call: a tensor attribute does not survive every path (torch.compile);
- **the gate/up layout passed explicitly** (``gate_mode="separated"``: our w13 holds the gate rows, then
  the up rows). AITer's default has changed between releases, which silently broke other projects;
- **activation and quantization enums mapped** from our names (below); anything else is refused.

Install: PyPI's ``aiter`` is an unrelated async-iterator library. Build AITer from ROCm's source at the
pinned tag (docs/backends.md says how).
"""

from __future__ import annotations

import inspect

import torch

from ..contract import ExpertsArgs, ExpertsProblem, PreparedWeights
from ..quant import QuantizedWeight

__all__ = ["ACTIVATIONS", "AITER_TAG", "BACKEND", "PASSED", "QUANT_TYPES", "aiter_call"]

AITER_TAG = "v0.1.20.post1"
INSTALL = (f"build ROCm AITer from source: git clone --recursive --branch {AITER_TAG} "
           "https://github.com/ROCm/aiter && cd aiter && python3 setup.py develop "
           "(PyPI's 'aiter' is an unrelated package)")
# our activation name -> AITer's ActivationType member (gated: act(gate) * up)
ACTIVATIONS = {"silu": "Silu", "gelu": "Gelu"}
# our scheme key -> AITer's QuantType member
QUANT_TYPES = {"none": "No", "fp8_channel": "per_Token", "fp8_block": "per_128x128"}
# the parameters of fused_moe this adapter passes: is_available checks the installed release has each
PASSED = ("hidden_states", "w1", "w2", "topk_weight", "topk_ids", "activation", "quant_type", "doweight_stage1",
          "w1_scale", "w2_scale", "gate_mode")
GATE_MODE = "separated"


def _load() -> tuple[dict[str, object] | None, str]:
    """AITer's pieces this adapter uses, or why they are missing."""
    try:
        import aiter
        from aiter.fused_moe import fused_moe
        from aiter.ops.shuffle import shuffle_weight
    except Exception as exc:
        return None, f"AITer's fused MoE does not import ({type(exc).__name__}: {exc}); {INSTALL}"
    params = inspect.signature(fused_moe).parameters
    missing = [p for p in PASSED if p not in params]
    if missing:
        return None, (f"aiter.fused_moe.fused_moe lacks the parameters {', '.join(missing)} this adapter passes "
                      f"(written against {AITER_TAG}); {INSTALL}")
    act, qt = getattr(aiter, "ActivationType", None), getattr(aiter, "QuantType", None)
    gaps = [f"ActivationType.{m}" for m in ACTIVATIONS.values() if not hasattr(act, m)]
    gaps += [f"QuantType.{m}" for m in QUANT_TYPES.values() if not hasattr(qt, m)]
    if gaps:
        return None, f"aiter lacks {', '.join(gaps)} (written against {AITER_TAG}); {INSTALL}"
    return {"fused_moe": fused_moe, "shuffle_weight": shuffle_weight, "ActivationType": act, "QuantType": qt}, "ok"


def _parts() -> dict[str, object]:
    parts, reason = _load()
    if parts is None:
        raise RuntimeError(reason)
    return parts


def _data_scale(w: torch.Tensor | QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (w.data, w.scale) if isinstance(w, QuantizedWeight) else (w, None)


def _aiter_scale(scale: torch.Tensor | None, key: str) -> torch.Tensor | None:
    """Our weight scales as AITer reads them: per channel [E, rows, 1]; 128x128 blocks as stored."""
    if scale is None:
        return None
    return scale.float().unsqueeze(-1).contiguous() if key == "fp8_channel" else scale.float().contiguous()


def _flag(t: torch.Tensor) -> torch.Tensor:
    t.is_shuffled = True  # what AITer's dispatcher reads; set by shuffle_weight, re-set here
    return t


def aiter_call(args: ExpertsArgs, problem: ExpertsProblem, prepared: PreparedWeights) -> dict[str, object]:
    """The keyword arguments of one ``fused_moe`` call (the contract test checks them)."""
    parts = _parts()
    key = problem.quant.key()
    return {
        "hidden_states": args.hidden_states.contiguous(),
        "w1": _flag(prepared.tensors["w13"]),
        "w2": _flag(prepared.tensors["w2"]),
        "topk_weight": args.topk_weights.float().contiguous(),
        "topk_ids": args.topk_ids.to(torch.int32).contiguous(),
        "activation": getattr(parts["ActivationType"], ACTIVATIONS[problem.activation.name]),
        "quant_type": getattr(parts["QuantType"], QUANT_TYPES[key]),
        "doweight_stage1": problem.apply_router_weight_on_input,
        "w1_scale": _aiter_scale(_data_scale(args.w13)[1], key),
        "w2_scale": _aiter_scale(_data_scale(args.w2)[1], key),
        "gate_mode": GATE_MODE,
    }


class AiterBackend:
    name = "aiter"
    schemes = tuple(QUANT_TYPES)

    @property
    def priority(self) -> int:
        return 15 if torch.version.hip else -30

    def priority_for(self, target) -> int:
        return 15 if target.vendor == "rocm" else -30  # below triton (20) until measured

    def is_available(self) -> tuple[bool, str]:
        parts, reason = _load()
        if parts is None:
            return False, f"{reason} (this adapter is unverified on hardware)"
        return True, f"ok (AITer {AITER_TAG} API; unverified on hardware)"

    def supports(self, problem: ExpertsProblem) -> tuple[bool, str]:
        target = problem.target
        if target is None or target.vendor != "rocm":
            return False, f"AITer runs on AMD GPUs (ROCm); {target.describe() if target else 'no device target'}"
        if problem.dtype not in (torch.bfloat16, torch.float16):
            return False, f"AITer's fused MoE takes bfloat16 or float16, got {problem.dtype}"
        if problem.activation.name not in ACTIVATIONS:
            return False, (f"activation {problem.activation.name!r} has no AITer ActivationType mapped "
                           f"(mapped: {', '.join(ACTIVATIONS)})")
        if problem.has_w13_bias or problem.has_w2_bias:
            return False, "expert biases are not passed to AITer by this adapter"
        if problem.has_expert_map:
            return False, "expert maps are not mapped to AITer's expert_mask by this adapter"
        if problem.quant.activations is not None and not target.fp8_mma:
            return False, (f"{target.describe()} computes FP8 as e4m3fnuz, not the e4m3fn our FP8 weights use "
                           "(fp8_mma: MI350 on)")
        return True, "ok (unverified on hardware)"

    def prepare(self, args: ExpertsArgs, problem: ExpertsProblem) -> PreparedWeights:
        shuffle = _parts()["shuffle_weight"]
        w13, w2 = _data_scale(args.w13)[0], _data_scale(args.w2)[0]
        return PreparedWeights(self.name, {"w13": shuffle(w13.contiguous(), layout=(16, 16)),
                                           "w2": shuffle(w2.contiguous(), layout=(16, 16))})

    def apply(self, args: ExpertsArgs, problem: ExpertsProblem, out: torch.Tensor) -> None:
        # without a layer (a bare fused_experts call) nothing keeps a prepared copy: shuffle for this call
        prepared = args.prepared if args.prepared is not None else self.prepare(args, problem)
        result = _parts()["fused_moe"](**aiter_call(args, problem, prepared))
        out.copy_(result)


BACKEND = AiterBackend()
