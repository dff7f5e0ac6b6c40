"""Load a layer's experts from a checkpoint into ``FusedMoE``'s canonical parameters, and export them.

One pass per layer: check every projection's encoding (one format per layer), read each local expert's
tensors (only this rank's experts, and under tensor parallelism only its slice of the intermediate
dim), convert scales once to the canonical layout of ``moe.quant.schemes``, fill temporaries, and swap
them in (``FusedMoE.swap_expert_tensors_``): a refused checkpoint leaves the layer as it was.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..layer import FusedMoE
from ..quant import NAMES, scale_shape
from ..quant.schemes import STORAGE_DTYPES
from ..validation import FLOAT_DTYPES
from .base import CheckpointFormat, Encoding, decode_scale, encode_scale, parse_format
from .coded import Coded, check_sizes, export_coded, load_coded
from .names import ExpertNaming, find_naming
from .slicing import LayerSlice
from .source import CheckpointError, TensorSource, open_source

__all__ = ["CheckpointInfo", "checkpoint_scheme", "export_experts", "find_experts", "load_experts"]

Source = str | os.PathLike[str] | Mapping[str, torch.Tensor] | TensorSource
BLOCK = 128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a loaded layer came from, for :func:`export_experts`: the format, the naming, the encoding and
    the dtypes its scales were stored in (``coded``: a codec format's stored dtypes, shapes and kept parts)."""

    format: CheckpointFormat
    naming: ExpertNaming
    encoding: Encoding
    scale_dtype: torch.dtype | None
    input_scale_dtype: torch.dtype | None
    coded: Coded | None = None


def _slice_of(layer: FusedMoE) -> LayerSlice:
    c, ranks = layer.config, getattr(layer, "ranks", None)
    tp_rank = ranks.tp_rank if ranks is not None else 0
    n = c.intermediate_size
    n_global = getattr(layer, "global_intermediate_size", n)
    parts = 2 if c.activation.gated else 1
    return LayerSlice(tuple(int(e) for e in layer.global_expert_ids()), c.num_experts, tp_rank * n, n, n_global,
                  c.hidden_size, parts)


# ------------------------------------------------------------------------------------ encodings
def _layer_encoding(fmt: CheckpointFormat, naming: ExpertNaming, sl: LayerSlice, where: str) -> Encoding:
    """The one encoding of every projection of every expert of the layer (all E, not only the local ones:
    a layer of two formats is an error on every rank)."""
    experts = range(sl.num_experts) if naming.style == "per_expert" else (0,)
    first: tuple[str, Encoding] | None = None
    for e in experts:
        for p in sl.projections:
            module = naming.module(e, p)
            enc = fmt.encoding(module)
            if first is None:
                first = (module, enc)
            elif enc != first[1]:
                raise CheckpointError(
                    f"{where}: mixed formats in one layer: {first[0]} is {first[1].describe()} but {module} is "
                    f"{enc.describe()}; the experts of one layer share one format (different layers may differ)")
    assert first is not None
    return first[1]


def _open(source: Source, quantization_config: dict[str, Any] | None) -> tuple[TensorSource, CheckpointFormat]:
    src = open_source(source, quantization_config)
    return src, parse_format(src.quantization_config, src.config_where)


def find_experts(source: Source, prefixes: list[str], expert: int = 0, *, dense: bool = False,
                 quantization_config: dict[str, Any] | None = None) -> ExpertNaming:
    """Where the experts are (the first of ``prefixes`` holding ``expert``'s gate data, per expert, fused
    or dense), looking for the data tensor names of the checkpoint's format."""
    src, fmt = _open(source, quantization_config)
    return find_naming(src, prefixes, expert, dense=dense, suffixes=("weight", *fmt.data_suffixes))


def checkpoint_scheme(source: Source, prefix: str, num_experts: int, *, gated: bool = True,
                      quantization_config: dict[str, Any] | None = None, hidden_size: int | None = None,
                      intermediate_size: int | None = None) -> str | None:
    """The moe quantization scheme (a name of ``moe.quant.NAMES`` or, e.g. for int4 in groups of 64, a
    ``QuantConfig`` key; None: float) of the experts under ``prefix`` in a checkpoint: what to build
    ``FusedMoE(quant=...)`` with before :func:`load_experts`. ``num_experts=1`` looks for a dense MLP
    (shared experts). Given the layer's sizes it also checks the format can hold them (a group size that
    does not divide the input features is an error naming the tensor and the config field)."""
    src, fmt = _open(source, quantization_config)
    naming = find_naming(src, [prefix], 0, dense=num_experts == 1, suffixes=("weight", *fmt.data_suffixes))
    sl = LayerSlice(tuple(range(num_experts)), num_experts, 0, 1, 1, 1, 2 if gated else 1)
    enc = _layer_encoding(fmt, naming, sl, src.config_where)
    if enc.codec is not None and hidden_size is not None and intermediate_size is not None:
        n = intermediate_size
        check_sizes(enc.codec, src, naming, LayerSlice((0,), num_experts, 0, n, n, hidden_size, sl.parts), 0)
    return enc.quant


# ------------------------------------------------------------------------------------ reading
def _check_full_shape(src: TensorSource, key: str, want: tuple[int, ...], what: str, squeeze: bool = False) -> None:
    if key not in src:
        raise CheckpointError(f"{src.where(key)}: tensor {key} ({what}) is missing")
    got = src.shape(key)
    same = [d for d in got if d != 1] == [d for d in want if d != 1] if squeeze else got == want
    if not same:
        extra = " (size-1 dims may be left out)" if squeeze else ""
        raise CheckpointError(f"{src.where(key)}: tensor {key} ({what}) has shape {list(got)}, expected "
                              f"{list(want)}{extra}")


def _data_index(naming: ExpertNaming, sl: LayerSlice, e: int, p: int) -> tuple[tuple[int, ...], tuple]:
    """(full shape, index of this layer's part) of projection ``p``'s data of expert ``e``."""
    rows = slice(sl.r0, sl.r0 + sl.n)
    if naming.style == "fused":
        if p == 2:
            return (sl.num_experts, sl.k, sl.n_global), (e, slice(None), rows)
        off = p * sl.n_global
        return ((sl.num_experts, sl.parts * sl.n_global, sl.k),
                (e, slice(off + sl.r0, off + sl.r0 + sl.n), slice(None)))
    if p == 2:
        return (sl.k, sl.n_global), (slice(None), rows)
    return (sl.n_global, sl.k), (rows, slice(None))


def _read_data(src: TensorSource, naming: ExpertNaming, enc: Encoding, sl: LayerSlice, e: int, p: int,
               dtype: torch.dtype) -> torch.Tensor:
    key = naming.key(e, p, "weight")
    full, index = _data_index(naming, sl, e, p)
    _check_full_shape(src, key, full, f"expert {e} weight")
    got = src.dtype(key)
    if enc.quant is None:
        if got not in FLOAT_DTYPES:
            raise CheckpointError(f"{src.where(key)}: tensor {key} is {got}, but the config says this layer is "
                                  "unquantized (float weights); mixed formats across experts are an error")
        return src.read(key, index).to(dtype)
    if got != dtype:
        raise CheckpointError(f"{src.where(key)}: tensor {key} is {got}, but {enc.quant} stores weights as {dtype}; "
                              "the experts of one layer share one format (mixed formats across experts?)")
    return src.read(key, index)


def _proj_shape(sl: LayerSlice, p: int) -> tuple[int, int]:
    """[rows, cols] of one full projection in the checkpoint."""
    return (sl.k, sl.n_global) if p == 2 else (sl.n_global, sl.k)


def _read_scale(src: TensorSource, naming: ExpertNaming, enc: Encoding, sl: LayerSlice, e: int, p: int,
                suffix: str, what: str) -> tuple[torch.Tensor, torch.dtype]:
    """One projection's full scale (its checkpoint shape, fp32) and its stored dtype."""
    key = naming.key(e, p, suffix)
    rows, cols = _proj_shape(sl, p)
    per = enc.scale_shape(rows, cols) if what == "weight scale" else (1,)
    if naming.style == "fused":
        per = _fused_scale_shape(enc, sl, p) if what == "weight scale" else ((sl.parts,) if p < 2 else (1,))
        if what == "weight scale" and p < 2:
            _check_straddling(src, key, enc, sl)
        _check_full_shape(src, key, (sl.num_experts, *per), f"expert {e} {what}", squeeze=True)
        t = src.read(key, (e,))
    else:
        _check_full_shape(src, key, per, f"expert {e} {what}", squeeze=True)
        t = src.read(key)
    s = decode_scale(t, enc, src.where(key), key).reshape(per)
    if naming.style == "fused" and p < 2:
        s = s.unflatten(0, (sl.parts, -1))[p] if what == "weight scale" else s[p:p + 1]
    return s, t.dtype


def _check_straddling(src: TensorSource, key: str, enc: Encoding, sl: LayerSlice) -> None:
    """A fused gate_up block scale cut into blocks of the fused rows (ceil(2N/128) of them) has blocks that hold
    gate and up rows together when N is not a multiple of 128: no per-half scale exists for them."""
    scheme = NAMES[enc.quant].weights  # type: ignore[index]
    if scheme.granularity != "block" or key not in src or sl.n_global % BLOCK == 0:
        return
    straddling = _cdiv(sl.parts * sl.n_global, BLOCK)
    if src.shape(key)[:2] == (sl.num_experts, straddling) and straddling != sl.parts * _cdiv(sl.n_global, BLOCK):
        raise CheckpointError(
            f"{src.where(key)}: tensor {key} has {straddling} block rows over the fused gate and up rows, so with an "
            f"intermediate size of {sl.n_global} (not a multiple of {BLOCK}) a block holds gate and up rows together; "
            f"moe keeps each half's blocks ({sl.parts} x {_cdiv(sl.n_global, BLOCK)} rows): store the scales per "
            "half (as the per-expert form does)")


def _fused_scale_shape(enc: Encoding, sl: LayerSlice, p: int) -> tuple[int, ...]:
    """One expert's weight scale of a fused projection: gate_up [P * rows, ...] (gate's then up's), down."""
    if p == 2:
        return enc.scale_shape(sl.k, sl.n_global)
    scheme = NAMES[enc.quant].weights  # type: ignore[index]
    if scheme.granularity == "tensor":
        return (sl.parts,)
    one = enc.scale_shape(sl.n_global, sl.k)
    return (sl.parts * one[0], *one[1:])


def _tp_scale(s: torch.Tensor, enc: Encoding, sl: LayerSlice, p: int, where: str) -> torch.Tensor:
    """This rank's slice of one projection's full scale, as the canonical per-projection scale."""
    g = NAMES[enc.quant].weights.granularity  # type: ignore[index]
    if g == "tensor":
        return s.reshape(-1)[:1]
    if g == "channel":
        s = s.reshape(-1)
        return s if p == 2 else s[sl.r0:sl.r0 + sl.n]
    if sl.tp and (sl.r0 % BLOCK or sl.n % BLOCK):
        raise CheckpointError(f"{where}: a tensor-parallel slice of {sl.n} rows at {sl.r0} (of intermediate size "
                              f"{sl.n_global}) is not a multiple of the {BLOCK}x{BLOCK} scale block, so the block "
                              "scales cannot be sliced with the weights")
    b0, nb = sl.r0 // BLOCK, _cdiv(sl.n, BLOCK)
    return s[:, b0:b0 + nb] if p == 2 else s[b0:b0 + nb]


@dataclass
class _Temporaries:
    w13: torch.Tensor
    w2: torch.Tensor
    s13: torch.Tensor | None
    s2: torch.Tensor | None
    i13: torch.Tensor | None  # [E_local, 2]: w1's and w3's input scales
    i2: torch.Tensor | None

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"w13_weight": self.w13, "w2_weight": self.w2}
        if self.s13 is not None:
            out |= {"w13_weight_scale": self.s13, "w2_weight_scale": self.s2}
        if self.i13 is not None:
            out |= {"w13_input_scale": torch.fmax(self.i13[:, 0], self.i13[:, 1]), "w2_input_scale": self.i2}
        return out


def _empty(layer: FusedMoE, enc: Encoding, sl: LayerSlice) -> _Temporaries:
    local, rows = len(sl.experts), sl.parts * sl.n
    store = STORAGE_DTYPES[NAMES[enc.quant].weights.format] if enc.quant else layer.params_dtype
    t = _Temporaries(torch.empty(local, rows, sl.k, dtype=store), torch.empty(local, sl.k, sl.n, dtype=store),
                     None, None, None, None)
    if enc.quant:
        scheme = NAMES[enc.quant].weights
        t.s13 = torch.empty(scale_shape(scheme, local, rows, sl.k, sl.parts))
        t.s2 = torch.empty(scale_shape(scheme, local, sl.k, sl.n, 1))
    if enc.input_scale:
        t.i13, t.i2 = torch.full((local, 2), float("nan")), torch.empty(local)  # fmax skips a missing up part
    return t


def _fill_expert(t: _Temporaries, src: TensorSource, naming: ExpertNaming, enc: Encoding, sl: LayerSlice, local: int,
                 e: int) -> dict[str, torch.dtype]:
    """Read expert ``e`` into row ``local`` of the temporaries; returns the stored scale dtypes."""
    dtypes: dict[str, torch.dtype] = {}
    for p in sl.projections:
        data = _read_data(src, naming, enc, sl, e, p, t.w13.dtype)
        part = min(p, 1)
        if p == 2:
            t.w2[local] = data
        else:
            t.w13[local, part * sl.n:(part + 1) * sl.n] = data
        if enc.scale is None:
            continue
        s, dtypes["weight"] = _read_scale(src, naming, enc, sl, e, p, enc.scale, "weight scale")
        s = _tp_scale(s, enc, sl, p, src.where(naming.key(e, p, enc.scale)))
        if p == 2:
            t.s2[local] = s.reshape(t.s2.shape[1:])  # type: ignore[index]
        else:
            size = t.s13.shape[1] // sl.parts  # type: ignore[union-attr]
            t.s13[local, part * size:(part + 1) * size] = s.reshape(size, *t.s13.shape[2:])  # type: ignore[index]
        if enc.input_scale:
            i, dtypes["input"] = _read_scale(src, naming, enc, sl, e, p, enc.input_scale, "input scale")
            if p == 2:
                t.i2[local] = i.reshape(())  # type: ignore[index]
            else:
                t.i13[local, part] = i.reshape(())  # type: ignore[index]
    return dtypes


def load_experts(layer: FusedMoE, source: Source, prefix: str, *,
                 quantization_config: dict[str, Any] | None = None,
                 device: torch.device | str | None = None) -> CheckpointInfo:
    """Load the experts under ``prefix`` (e.g. ``model.layers.3.mlp.experts``; for a one-expert layer, a
    dense MLP such as ``model.layers.3.mlp.shared_experts``) from ``source`` (a checkpoint directory, a
    safetensors file, a state dict or a :class:`~moe.checkpoints.TensorSource`) into ``layer``.

    The layer must be built with the checkpoint's scheme (:func:`checkpoint_scheme`). Only the layer's
    experts are read (``expert_map``), and under tensor parallelism (``ParallelFusedMoE``) only its slice.
    ``quantization_config`` replaces the checkpoint's (required for a state dict from a quantized one).
    A layer on the meta device gets new parameters on ``device`` (default: the CPU); a layer on a real
    device is copied into in place.
    Raises :class:`~moe.checkpoints.CheckpointError` naming the file and tensor, leaving the layer as it
    was. Returns what export needs (also kept as ``layer.checkpoint_info``)."""
    if not isinstance(layer, FusedMoE):
        raise TypeError(f"load_experts: expected a FusedMoE, got {type(layer).__name__}")
    src, fmt = _open(source, quantization_config)
    sl = _slice_of(layer)
    naming = find_naming(src, [prefix], sl.experts[0], dense=sl.num_experts == 1,
                         suffixes=("weight", *fmt.data_suffixes))
    enc = _layer_encoding(fmt, naming, sl, src.config_where)
    if enc.quant != layer._quant_key:
        raise CheckpointError(
            f"{src.config_where}: the experts under {prefix} are {enc.describe()} but the layer is built with "
            f"quant={layer._quant_key!r}; build FusedMoE(..., quant={enc.quant!r}) (moe.checkpoints.checkpoint_scheme "
            "reads it)")
    biased = enc.codec is not None and enc.codec.has("bias")
    if (layer.w13_bias is not None) != biased:
        have = "has expert biases" if layer.w13_bias is not None else "has no expert biases"
        fix = "bias=True" if biased else "bias=False"
        raise CheckpointError(f"load_experts: {prefix}: the layer {have} but the checkpoint's experts "
                              f"{'have' if biased else 'have none'} ({enc.describe()}); build it with {fix}")
    with torch.device(device if device is not None else "cpu"):  # temporaries where the layer's tensors go
        if enc.codec is not None:
            tensors, coded = load_coded(layer, src, naming, enc.codec, sl)
            layer.swap_expert_tensors_(tensors)
            info = CheckpointInfo(fmt, naming, enc, None, None, coded)
            layer.checkpoint_info = info
            return info
        t = _empty(layer, enc, sl)
        dtypes: dict[str, torch.dtype] = {}
        for local, e in enumerate(sl.experts):
            dtypes |= _fill_expert(t, src, naming, enc, sl, local, e)
    moved = {k: v.to(device) for k, v in t.tensors().items()} if device is not None else t.tensors()
    parts = t.i13.to(device) if device is not None and t.i13 is not None else t.i13
    layer.swap_expert_tensors_(moved, w13_input_parts=parts)
    info = CheckpointInfo(fmt, naming, enc, dtypes.get("weight"), dtypes.get("input"))
    layer.checkpoint_info = info
    return info


# ------------------------------------------------------------------------------------ export
def _export_scale(s: torch.Tensor, enc: Encoding, dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
    return encode_scale(s, dtype, enc.scale_shape(rows, cols))


def _expert_tensors(layer: FusedMoE, info: CheckpointInfo, sl: LayerSlice, local: int) -> dict[int, dict[str, Any]]:
    """proj -> suffix -> tensor of one local expert, in the checkpoint's per-expert form."""
    enc, n = info.encoding, sl.n
    out: dict[int, dict[str, Any]] = {}
    for p in sl.projections:
        part = min(p, 1)
        w = layer.w2_weight[local] if p == 2 else layer.w13_weight[local, part * n:(part + 1) * n]
        out[p] = {"weight": w.detach().cpu().contiguous()}
        if enc.scale is None:
            continue
        rows, cols = _proj_shape(sl, p)
        if p == 2:
            s = layer.w2_weight_scale[local]
        else:
            s13 = layer.w13_weight_scale[local]
            size = s13.shape[0] // sl.parts
            s = s13[part * size:(part + 1) * size]
        out[p][enc.scale] = _export_scale(s.detach().cpu(), enc, info.scale_dtype, rows, cols)  # type: ignore[arg-type]
        if enc.input_scale:
            i = layer.w2_input_scale[local] if p == 2 else layer._w13_input_parts[local, part]
            out[p][enc.input_scale] = encode_scale(i.detach().cpu().reshape(1), info.input_scale_dtype,  # type: ignore[arg-type]
                                                   (1,) * enc.tensor_dims)
    return out


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1) if t.dim() == 0 else t


def _fused(per_expert: list[dict[int, dict[str, Any]]], naming: ExpertNaming,
           sl: LayerSlice) -> dict[str, torch.Tensor]:
    """Per-expert tensors stacked into the fused form: gate then up along the rows, experts in front."""
    out: dict[str, torch.Tensor] = {}
    for suffix in per_expert[0][0]:
        gate_up = [torch.cat([_rows(x[p][suffix]) for p in sl.projections if p < 2]) for x in per_expert]
        out[naming.key(0, 0, suffix)] = torch.stack(gate_up)
        out[naming.key(0, 2, suffix)] = torch.stack([x[2][suffix] for x in per_expert])
    return out


def export_experts(layer: FusedMoE) -> dict[str, torch.Tensor]:
    """The layer's experts in the format and names of the checkpoint :func:`load_experts` read them from
    (CPU tensors; bit for bit what the file held). Under expert parallelism each rank exports its own
    experts (per-expert names only); a tensor-parallel slice cannot be exported alone."""
    info: CheckpointInfo | None = getattr(layer, "checkpoint_info", None)
    if info is None:
        raise ValueError("export_experts: this layer was not loaded by moe.checkpoints.load_experts, so it has no "
                         "checkpoint format to export to")
    sl = _slice_of(layer)
    if sl.tp:
        raise ValueError(f"export_experts: this layer holds a tensor-parallel slice ({sl.n} of {sl.n_global} rows); "
                         "export from a layer holding whole experts")
    if info.naming.style == "fused" and len(sl.experts) != sl.num_experts:
        raise ValueError(f"export_experts: the fused form holds all {sl.num_experts} experts but this layer holds "
                         f"{len(sl.experts)} (expert parallelism); export from a layer holding every expert")
    if info.coded is not None:
        return export_coded(layer, info.naming, info.encoding.codec, info.coded, sl)  # type: ignore[arg-type]
    per_expert = [_expert_tensors(layer, info, sl, local) for local in range(len(sl.experts))]
    if info.naming.style == "fused":
        return _fused(per_expert, info.naming, sl)
    return {info.naming.key(e, p, suffix): t for e, x in zip(sl.experts, per_expert, strict=True)
            for p, tensors in x.items() for suffix, t in tensors.items()}
