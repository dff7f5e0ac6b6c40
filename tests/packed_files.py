"""Tiny weight-only checkpoints written by the tests in each packed format (GPTQ v1/v2, AWQ,
compressed-tensors pack-quantized, gpt-oss MXFP4, ModelOpt NVFP4), from random codes, zero points and
scales, with the float64 value of every weight worked out here from the format's own definition (not
through moe's decoders). The packers below are written from the formats' descriptions, one slot at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words (int64) as the int32 a checkpoint stores."""
    return ((words + 2**31) % 2**32 - 2**31).to(torch.int32)


def pack_last(codes: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Codes [R, C] -> int32 words [R, ceil(C / per)]: slot i of word w holds element per * w + order[i]
    (zero codes pad the last word)."""
    per = 32 // bits
    order = order or tuple(range(per))
    c = codes.to(torch.int64)
    pad = -c.shape[1] % per
    c = torch.cat([c, c.new_zeros(c.shape[0], pad)], dim=1)
    words = torch.zeros(c.shape[0], c.shape[1] // per, dtype=torch.int64)
    for slot in range(per):
        words += c[:, order[slot]::per] << (bits * slot)
    return to_int32(words)


def pack_first(codes: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Packed along dim 0: [R, C] -> [ceil(R / per), C]."""
    return pack_last(codes.T, bits, order).T.contiguous()


def nibble_bytes(codes: torch.Tensor) -> torch.Tensor:
    """[R, C] 4-bit codes -> [R, C / 2] uint8, element 2j in the low nibble."""
    c = codes.to(torch.int64)
    return (c[:, 0::2] + 16 * c[:, 1::2]).to(torch.uint8)


@dataclass
class Packed:
    """A checkpoint's expert tensors, its quantization config, the moe scheme it loads as, and the float64
    value of each (expert, projection) [out, in] weight (and bias)."""

    tensors: dict[str, torch.Tensor]
    config: dict
    quant: str
    values: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    biases: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)


NAMES = ("gate_proj", "up_proj", "down_proj")


def _shapes(k: int, n: int) -> tuple[tuple[int, int], ...]:
    return ((n, k), (n, k), (k, n))


def _scales(g: torch.Generator, *shape: int) -> torch.Tensor:
    return (torch.rand(*shape, generator=g) * 0.02 + 0.005).to(torch.float16)


def gptq(prefix: str, experts: int, k: int, n: int, *, bits: int = 4, group: int = 32, sym: bool = False,
         v2: bool = False, g_idx: bool = False, seed: int = 0) -> Packed:
    g = torch.Generator().manual_seed(seed)
    config = {"quant_method": "gptq", "bits": bits, "group_size": group if bits == 4 else -1, "sym": sym,
              "desc_act": g_idx, "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    quant = "w8a16" if bits == 8 else ("w4a16" if sym else "w4a16_zp") if group == 128 else None
    out = Packed({}, config, quant or _int4_key(group, not sym))
    top = (1 << bits) - 1
    for e in range(experts):
        for p, (rows, cols) in enumerate(_shapes(k, n)):
            groups = cols // group if bits == 4 else 1
            q = torch.randint(0, top + 1, (cols, rows), generator=g)  # GPTQ's [in, out]
            if sym:
                zero = torch.full((groups, rows), 1 << (bits - 1))
            else:
                zero = torch.randint(1 if not v2 else 0, top + 1, (groups, rows), generator=g)
            stored_zero = zero - (0 if v2 else 1)
            s = _scales(g, groups, rows)
            key = f"{prefix}.{e}.{NAMES[p]}"
            out.tensors[f"{key}.qweight"] = pack_first(q, bits)
            out.tensors[f"{key}.qzeros"] = pack_last(stored_zero, bits)
            out.tensors[f"{key}.scales"] = s
            if g_idx:
                out.tensors[f"{key}.g_idx"] = (torch.arange(cols) // (group if bits == 4 else cols)).to(torch.int32)
            per_in = torch.arange(cols) // (group if bits == 4 else cols)  # each input feature's group
            value = (q.double() - zero.double()[per_in]) * s.double()[per_in]  # [in, out]
            out.values[e, p] = value.T.contiguous()
    return out


def awq(prefix: str, experts: int, k: int, n: int, *, group: int = 32, seed: int = 0) -> Packed:
    g = torch.Generator().manual_seed(seed)
    config = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    out = Packed({}, config, "w4a16_zp" if group == 128 else _int4_key(group, True))
    for e in range(experts):
        for p, (rows, cols) in enumerate(_shapes(k, n)):
            q = torch.randint(0, 16, (cols, rows), generator=g)  # AWQ's [in, out]
            zero = torch.randint(0, 16, (cols // group, rows), generator=g)
            s = _scales(g, cols // group, rows)
            key = f"{prefix}.{e}.{NAMES[p]}"
            out.tensors[f"{key}.qweight"] = pack_last(q, 4, AWQ_ORDER)
            out.tensors[f"{key}.qzeros"] = pack_last(zero, 4, AWQ_ORDER)
            out.tensors[f"{key}.scales"] = s
            per_in = torch.arange(cols) // group
            out.values[e, p] = ((q.double() - zero.double()[per_in]) * s.double()[per_in]).T.contiguous()
    return out


def ct_packed(prefix: str, experts: int, k: int, n: int, *, bits: int = 4, group: int = 32, sym: bool = True,
              g_idx: bool = False, fused: bool = False, seed: int = 0) -> Packed:
    g = torch.Generator().manual_seed(seed)
    strategy = "group" if bits == 4 else "channel"
    w = {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": strategy, "dynamic": False,
         "actorder": "group" if g_idx else None}
    if bits == 4:
        w["group_size"] = group
    config = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": w, "input_activations": None,
                                            "format": "pack-quantized"}}}
    quant = "w8a16" if bits == 8 else _int4_key(group, not sym)
    out = Packed({}, config, quant)
    per: list[dict[int, dict[str, torch.Tensor]]] = []
    offset = 1 << (bits - 1)
    for e in range(experts):
        per.append({})
        for p, (rows, cols) in enumerate(_shapes(k, n)):
            groups = cols // group if bits == 4 else 1
            q = torch.randint(-offset, offset, (rows, cols), generator=g)  # signed, as compressed-tensors holds them
            s = (torch.rand(rows, groups, generator=g) * 0.02 + 0.005).to(torch.bfloat16)
            t = {"weight_packed": pack_last(q + offset, bits), "weight_scale": s,
                 "weight_shape": torch.tensor([rows, cols])}
            zero = torch.zeros(rows, groups, dtype=torch.int64)
            if not sym:
                zero = torch.randint(-offset, offset, (rows, groups), generator=g)
                t["weight_zero_point"] = pack_first(zero + offset, bits)
            if g_idx:
                t["weight_g_idx"] = (torch.arange(cols) // group).to(torch.int32)
            per_in = torch.arange(cols) // (group if bits == 4 else cols)
            out.values[e, p] = (q.double() - zero.double()[:, per_in]) * s.double()[:, per_in]
            per[e][p] = t
    _store(out, per, prefix, fused, interleaved=False)
    return out


def nvfp4(prefix: str, experts: int, k: int, n: int, *, fused: bool = False, seed: int = 0) -> Packed:
    g = torch.Generator().manual_seed(seed)
    config = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]}
    out = Packed({}, config, "nvfp4")
    per: list[dict[int, dict[str, torch.Tensor]]] = []
    for e in range(experts):
        per.append({})
        for p, (rows, cols) in enumerate(_shapes(k, n)):
            codes = torch.randint(0, 16, (rows, cols), generator=g)
            scale = (torch.rand(rows, cols // 16, generator=g) * 4 + 0.25).to(torch.float8_e4m3fn)
            scale2 = torch.rand((), generator=g) * 0.01 + 0.001
            t = {"weight": nibble_bytes(codes), "weight_scale": scale, "weight_scale_2": scale2.float(),
                 "input_scale": (torch.rand((), generator=g) + 0.5).float()}
            v = torch.tensor(E2M1, dtype=torch.float64)[codes]
            out.values[e, p] = v * scale.double().repeat_interleave(16, dim=1) * scale2.double()
            per[e][p] = t
    _store(out, per, prefix, fused, interleaved=False)
    return out


def gpt_oss_mxfp4(prefix: str, experts: int, k: int, n: int, *, seed: int = 0,
                  bias_dtype: torch.dtype = torch.bfloat16) -> Packed:
    """gpt-oss's fused, interleaved experts: rows of gate_up alternate gate j, up j."""
    g = torch.Generator().manual_seed(seed)
    out = Packed({}, {"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head", "model.layers.*.self_attn"]},
                 "mxfp4")
    per: list[dict[int, dict[str, torch.Tensor]]] = []
    for e in range(experts):
        per.append({})
        for p, (rows, cols) in enumerate(_shapes(k, n)):
            codes = torch.randint(0, 16, (rows, cols), generator=g)
            exps = torch.randint(120, 130, (rows, cols // 32), generator=g).to(torch.uint8)
            bias = (torch.randn(rows, generator=g) * 0.1).to(bias_dtype)
            v = torch.tensor(E2M1, dtype=torch.float64)[codes]
            out.values[e, p] = v * torch.exp2(exps.double() - 127).repeat_interleave(32, dim=1)
            out.biases[e, p] = bias.double()
            per[e][p] = {"blocks": nibble_bytes(codes).reshape(rows, cols // 32, 16), "scales": exps, "bias": bias}
    _store(out, per, prefix, fused=True, interleaved=True)
    return out


def _store(out: Packed, per: list[dict[int, dict[str, torch.Tensor]]], prefix: str, fused: bool,
           interleaved: bool) -> None:
    """Per expert (``{prefix}.{e}.gate_proj.{suffix}``) or fused (``{prefix}.gate_up_proj{_suffix}``: gate rows
    then up rows, or alternating rows when ``interleaved``; scalars stacked [E, 2])."""
    if not fused:
        for e, x in enumerate(per):
            for p, t in x.items():
                out.tensors |= {f"{prefix}.{e}.{NAMES[p]}.{s}": v for s, v in t.items()}
        return
    for s in per[0][0]:
        name = s.removeprefix("weight") if s.startswith("weight") else f"_{s}"

        def gate_up(x: dict[int, dict[str, torch.Tensor]], s: str = s) -> torch.Tensor:
            a, b = x[0][s], x[1][s]
            if a.dim() == 0 or s in ("weight_shape", "weight_g_idx", "g_idx"):  # no out dim: stacked
                return torch.stack([a, b])
            if interleaved:
                return torch.stack([a, b], dim=1).flatten(0, 1)
            return torch.cat([a, b])

        out.tensors[f"{prefix}.gate_up_proj{name}"] = torch.stack([gate_up(x) for x in per])
        out.tensors[f"{prefix}.down_proj{name}"] = torch.stack([x[2][s] for x in per])


def _int4_key(group: int, zero_point: bool) -> str:
    from moe.quant import QuantConfig, WeightScheme

    return QuantConfig(weights=WeightScheme(format="int4", granularity="group", group_size=group,
                                            zero_point=zero_point)).key()
