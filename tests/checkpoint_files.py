"""Tiny quantized checkpoints written by the tests: random experts quantized per projection and stored
in each format's own names, shapes and dtypes (safetensors files plus config.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from moe.checkpoints import SafetensorsSource
from moe.quant import named, quantize

FP8_BLOCK_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": [128, 128]}


def ct_config(quant: str, targets: list[str] | None = None, ignore: list[str] | None = None) -> dict:
    """A compressed-tensors quantization_config for a moe scheme (one config group)."""
    kind = "int" if quant.startswith("int8") else "float"
    w = {"num_bits": 8, "type": kind, "symmetric": True, "dynamic": False,
         "strategy": {"fp8_tensor": "tensor", "fp8_tensor_static": "tensor", "fp8_block": "block"}.get(quant, "channel")}
    a = {"num_bits": 8, "type": kind, "symmetric": True, "dynamic": quant != "fp8_tensor_static",
         "strategy": {"fp8_channel": "token", "int8_channel": "token", "fp8_block": "group"}.get(quant, "tensor")}
    if quant == "fp8_block":
        w["block_structure"] = [128, 128]
        a["group_size"] = 128
    return {"quant_method": "compressed-tensors", "format": f"{kind}-quantized", "ignore": ignore or ["lm_head"],
            "config_groups": {"group_0": {"targets": targets or ["Linear"], "weights": w, "input_activations": a}}}


@dataclass
class Spec:
    """One format: the moe scheme, the scale's tensor suffix, its dtype, and how names are written."""

    quant: str
    config: dict
    scale: str = "weight_scale"
    scale_dtype: torch.dtype = torch.float32
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    fused: bool = False
    ue8m0: bool = False
    extra: dict = field(default_factory=dict)


SPECS: dict[str, Spec] = {
    "deepseek_fp8": Spec("fp8_block", FP8_BLOCK_CONFIG, scale="weight_scale_inv"),
    "deepseek_fp8_ue8m0": Spec("fp8_block", {**FP8_BLOCK_CONFIG, "scale_fmt": "ue8m0"}, scale="weight_scale_inv",
                               ue8m0=True),
    "deepseek_fp8_ue8m0_e8m0": Spec("fp8_block", {**FP8_BLOCK_CONFIG, "scale_fmt": "ue8m0"},
                                    scale="weight_scale_inv", scale_dtype=torch.float8_e8m0fnu, ue8m0=True),
    "deepseek_fp8_fused": Spec("fp8_block", FP8_BLOCK_CONFIG, scale="weight_scale_inv", fused=True),
    "ct_fp8_tensor": Spec("fp8_tensor", ct_config("fp8_tensor")),
    "ct_fp8_tensor_static": Spec("fp8_tensor_static", ct_config("fp8_tensor_static")),
    "ct_fp8_channel_bf16": Spec("fp8_channel", ct_config("fp8_channel"), scale_dtype=torch.bfloat16,
                                names=("w1", "w3", "w2")),
    "ct_fp8_block": Spec("fp8_block", ct_config("fp8_block")),
    "ct_int8_channel": Spec("int8_channel", ct_config("int8_channel")),
    "ct_fp8_channel_fused": Spec("fp8_channel", ct_config("fp8_channel"), fused=True),
}


def _power_of_two(s: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(s)))


def quantize_projection(w: torch.Tensor, spec: Spec) -> tuple[torch.Tensor, torch.Tensor]:
    """(data, scale in the checkpoint's shape and dtype) of one [out, in] float weight."""
    scheme = named(spec.quant).weights
    q = quantize(w[None].float(), scheme)
    data, scale = q.data[0], q.scale[0]
    if spec.ue8m0:  # round scales up to powers of two, then quantize again with them
        scale = _power_of_two(scale)
        full = scale.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
        data = (w.float() / full).clamp(-448, 448).to(torch.float8_e4m3fn)
    if scheme.granularity == "channel":
        scale = scale[:, None]
    elif scheme.granularity == "tensor":
        scale = scale.reshape(1)
    if spec.scale_dtype != torch.float32:  # a scale the stored dtype holds exactly
        stored = scale.to(spec.scale_dtype)
        if not torch.equal(stored.float(), scale):  # rounded (bf16 channel scales): quantize with it again
            data = quantize_with(w, stored.float(), spec)
        scale = stored
    return data, scale


def quantize_with(w: torch.Tensor, scale: torch.Tensor, spec: Spec) -> torch.Tensor:
    """``w`` quantized with a given per-channel [out, 1] or per-tensor scale."""
    q = w.float() / scale.reshape(-1, 1) if scale.numel() > 1 else w.float() / scale
    if spec.quant.startswith("int8"):
        return q.round().clamp(-127, 127).to(torch.int8)
    return q.clamp(-448, 448).to(torch.float8_e4m3fn)


def expert_tensors(prefix: str, spec: Spec, experts: int, k: int, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random experts under ``prefix`` in ``spec``'s format (per expert, or fused)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    per: list[dict[str, dict[str, torch.Tensor]]] = []
    for e in range(experts):
        tensors = {}
        for p, (rows, cols) in enumerate(((n, k), (n, k), (k, n))):
            w = torch.randn(rows, cols, generator=g) / cols**0.5
            data, scale = quantize_projection(w, spec)
            t = {"weight": data, spec.scale: scale}
            if named(spec.quant).activations.static:
                t["input_scale"] = (torch.rand(1, generator=g) * 0.02 + 0.01)
            tensors[p] = t
        per.append(tensors)
        if not spec.fused:
            for p, t in tensors.items():
                for suffix, tensor in t.items():
                    out[f"{prefix}.{e}.{spec.names[p]}.{suffix}"] = tensor
    if spec.fused:
        for suffix in per[0][0]:
            fused = suffix.removeprefix("weight") if suffix.startswith("weight") else f"_{suffix}"
            out[f"{prefix}.gate_up_proj{fused}"] = torch.stack([torch.cat([x[0][suffix], x[1][suffix]]) for x in per])
            out[f"{prefix}.down_proj{fused}"] = torch.stack([x[2][suffix] for x in per])
    return out


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], quantization_config: dict | None,
                     config: dict | None = None, shards: int = 1) -> Path:
    """safetensors files (``shards`` > 1: with model.safetensors.index.json) and config.json."""
    path.mkdir(parents=True, exist_ok=True)
    keys = sorted(tensors)
    if shards == 1:
        save_file({k: tensors[k].contiguous() for k in keys}, str(path / "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = keys[i::shards]
            save_file({k: tensors[k].contiguous() for k in part}, str(path / name))
            weight_map |= dict.fromkeys(part, name)
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = dict(config or {})
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(cfg))
    return path


class RecordingSource(SafetensorsSource):
    """A safetensors source that records what was read: (key, index)."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.reads: list[tuple[str, tuple]] = []

    def read(self, key, index=()):
        self.reads.append((key, index))
        return super().read(key, index)
