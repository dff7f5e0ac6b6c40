"""Reading and writing the experts of a format with a data :class:`~moe.checkpoints.codec.Codec` (GPTQ,
AWQ, compressed-tensors pack-quantized, gpt-oss MXFP4, ModelOpt NVFP4), for :mod:`moe.checkpoints.loader`.

Each projection's parts are located (per expert or fused), checked (presence, shape, dtype, the same
dtype in every expert), cut to the rank's slice through the parts' dims, decoded to the canonical
tensors and placed into temporaries. Parts the canonical form does not hold (``kept``: act-order's
trivial ``g_idx``, ``weight_shape``, NVFP4's input scales) are kept as read, for export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..quant import QuantConfig
from ..quant.schemes import STORAGE_DTYPES
from ..quant.weights import storage_shapes
from .codec import Codec, Decoded, Part, dtype_names
from .names import ExpertNaming
from .slicing import LayerSlice
from .source import CheckpointError, TensorSource

if TYPE_CHECKING:
    from ..layer import FusedMoE

__all__ = ["Coded", "check_sizes", "export_coded", "load_coded"]

# (projection, suffix) -> (stored dtype, stored shape): per expert, or the fused tensor's
Stored = dict[tuple[int, str], tuple[torch.dtype, tuple[int, ...]]]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Coded:
    """What export needs beyond the canonical parameters: the stored dtypes and shapes, and the ``kept``
    parts of each (local expert, projection)."""

    stored: Stored = field(default_factory=dict)
    kept: dict[tuple[int, int], dict[str, torch.Tensor]] = field(default_factory=dict)


def _full(sl: LayerSlice, p: int) -> tuple[int, int]:
    """[rows, cols] of a whole projection in the checkpoint."""
    return (sl.k, sl.n_global) if p == 2 else (sl.n_global, sl.k)


def _local(sl: LayerSlice, p: int) -> tuple[int, int]:
    """[rows, cols] of this rank's slice of a projection."""
    return (sl.k, sl.n) if p == 2 else (sl.n, sl.k)


def _scalar(part: Part) -> bool:
    return all(d.axis is None and d.size == 1 for d in part.dims)


@dataclass(frozen=True)
class _Where:
    """How to read one part of one expert's projection: the tensor, its full shape, the index of this
    layer's slice, and what to pick from the read (a fused gate_up's half)."""

    key: str
    full: tuple[int, ...]
    index: tuple[Any, ...]
    pick: tuple[int, int] | None  # (dim, part): every other row of an interleaved gate_up
    split: int | None  # a fused scalar part: [P, ...] read, part p kept


def _dim_slices(part: Part, sl: LayerSlice, p: int, key: str, where: str) -> list[slice]:
    """The index of this layer's slice in each dim of a per-expert tensor of ``part``."""
    sliced = "in" if p == 2 else "out"
    out = []
    for d in part.dims:
        if d.axis != sliced or not sl.tp or d.whole:
            out.append(slice(None))
            continue
        if sl.r0 % d.per or (sl.n % d.per and sl.r0 + sl.n != sl.n_global):
            raise CheckpointError(
                f"{where}: a tensor-parallel slice of {sl.n} rows at {sl.r0} (of intermediate size {sl.n_global}) "
                f"is not a multiple of the {d.what} of tensor {key}, so the tensor cannot be sliced with the weights; "
                f"pick a tp_size whose slice is a multiple of {d.per}, or use expert parallelism")
        out.append(slice(sl.r0 // d.per, _cdiv(sl.r0 + sl.n, d.per)))
    return out


def _locate(part: Part, codec: Codec, naming: ExpertNaming, sl: LayerSlice, e: int, p: int,
            src: TensorSource) -> _Where:
    key = naming.key(e, p, part.suffix)
    rows, cols = _full(sl, p)
    shape = part.shape(rows, cols)
    index = _dim_slices(part, sl, p, key, src.where(key))
    if naming.style != "fused":
        return _Where(key, shape, tuple(index), None, None)
    i = part.out_dim()
    if p == 2:
        return _Where(key, (sl.num_experts, *shape), (e, *index), None, None)
    if i is None:  # stacked: [E, P, *shape]
        return _Where(key, (sl.num_experts, sl.parts, *shape), (e,), None, p)
    full = list(shape)
    full[i] *= sl.parts
    s = index[i]
    start, stop = s.start or 0, shape[i] if s.stop is None else s.stop
    if codec.interleaved:  # rows gate0, up0, gate1, up1, ...: both halves in one read, then every other row
        index[i] = slice(2 * start, 2 * stop)
        return _Where(key, (sl.num_experts, *full), (e, *index), (i, p), None)
    off = p * shape[i]
    index[i] = slice(off + start, off + stop)
    return _Where(key, (sl.num_experts, *full), (e, *index), None, None)


class _Reader:
    """Reads the parts of one expert, each tensor (and slice) once."""

    def __init__(self, src: TensorSource, naming: ExpertNaming, codec: Codec, sl: LayerSlice, stored: Stored) -> None:
        self.src, self.naming, self.codec, self.sl, self.stored = src, naming, codec, sl, stored
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    def expert(self, e: int) -> None:
        self._cache.clear()
        self.e = e

    def part(self, part: Part, p: int) -> torch.Tensor | None:
        src = self.src
        w = _locate(part, self.codec, self.naming, self.sl, self.e, p, src)
        what = f"expert {self.e} {part.role}" if part.role != "kept" else f"expert {self.e} {part.suffix}"
        if w.key not in src:
            if not part.required:
                return None
            raise CheckpointError(f"{src.where(w.key)}: tensor {w.key} ({what}) is missing")
        got = src.shape(w.key)
        squeeze = _scalar(part)
        same = [d for d in got if d != 1] == [d for d in w.full if d != 1] if squeeze else got == w.full
        if not same:
            extra = " (size-1 dims may be left out)" if squeeze else ""
            raise CheckpointError(f"{src.where(w.key)}: tensor {w.key} ({what}) has shape {list(got)}, expected "
                                  f"{list(w.full)}{extra}")
        dtype = src.dtype(w.key)
        if dtype not in part.dtypes:
            raise CheckpointError(f"{src.where(w.key)}: tensor {w.key} ({what}) is {dtype}, but {self.codec.quant} "
                                  f"checkpoints store {part.suffix} as {dtype_names(part.dtypes)}")
        seen = self.stored.setdefault((p, part.suffix), (dtype, got))
        if seen[0] != dtype:
            raise CheckpointError(f"{src.where(w.key)}: tensor {w.key} ({what}) is {dtype} but another expert's "
                                  f"{part.suffix} is {seen[0]}; the experts of one layer share one format (mixed "
                                  "formats across experts?)")
        cache = (w.key, repr(w.index))
        if cache not in self._cache:
            self._cache[cache] = src.read(w.key, w.index)
        t = self._cache[cache]
        if w.pick is not None:
            dim, half = w.pick
            t = t.unflatten(dim, (-1, 2)).select(dim + 1, half)
        if w.split is not None:
            t = t.reshape(self.sl.parts, -1)[w.split] if squeeze else t[w.split]
        return t.reshape(part.shape(0, 0)) if squeeze else t


@dataclass
class _Temporaries:
    t: dict[str, torch.Tensor]

    @classmethod
    def empty(cls, layer: FusedMoE, quant: str, sl: LayerSlice, scale_dtype: torch.dtype, bias: bool) -> _Temporaries:
        scheme = QuantConfig.parse(quant).weights
        assert scheme is not None
        local, rows = len(sl.experts), sl.parts * sl.n
        store = STORAGE_DTYPES[scheme.format]
        dtypes = {"data": store, "scale": scale_dtype, "zero": torch.uint8, "global_scale": torch.float32}
        t: dict[str, torch.Tensor] = {}
        for w, shapes in (("w13", storage_shapes(scheme, local, rows, sl.k, sl.parts)),
                          ("w2", storage_shapes(scheme, local, sl.k, sl.n, 1))):
            for qfield, shape in shapes.items():
                if shape is not None:
                    name = f"{w}_weight" if qfield == "data" else f"{w}_weight_{qfield.replace('zero', 'zero_point')}"
                    t[name] = torch.empty(shape, dtype=dtypes[qfield])
        if bias:
            t["w13_bias"] = torch.empty(local, rows, dtype=layer.params_dtype)
            t["w2_bias"] = torch.empty(local, sl.k, dtype=layer.params_dtype)
        return cls(t)

    def place(self, d: Decoded, local: int, p: int, sl: LayerSlice, tp_rank0: bool) -> None:
        fields = {"weight": d.data, "weight_scale": d.scale, "weight_zero_point": d.zero, "bias": d.bias}
        for name, value in fields.items():
            dst = self.t.get(f"{'w2' if p == 2 else 'w13'}_{name}")
            if dst is None or value is None:
                continue
            if p == 2 and name == "bias" and not tp_rank0:
                dst[local] = 0  # w2's bias is added once, by TP rank 0
            elif p == 2:
                dst[local] = value
            else:
                dst[local, p * sl.n:(p + 1) * sl.n] = value
        gs = self.t.get("w2_weight_global_scale" if p == 2 else "w13_weight_global_scale")
        if gs is not None and d.global_scale is not None:
            gs[local, 0 if p == 2 else p] = d.global_scale


def check_sizes(codec: Codec, src: TensorSource, naming: ExpertNaming, sl: LayerSlice, e: int) -> None:
    """Refuse projections the format cannot store (a group size that does not divide), naming the tensor."""
    for p in sl.projections:
        why = codec.check_sizes(*_full(sl, p))
        if why is not None:
            key = naming.key(e, p, codec.parts()[0].suffix)
            raise CheckpointError(f"{src.where(key)}: tensor {key}: {why}")


def load_coded(layer: FusedMoE, src: TensorSource, naming: ExpertNaming, codec: Codec,
               sl: LayerSlice) -> tuple[dict[str, torch.Tensor], Coded]:
    """The canonical temporaries of the layer's experts (for ``swap_expert_tensors_``), and what export needs."""
    check_sizes(codec, src, naming, sl, sl.experts[0])
    coded = Coded()
    reader = _Reader(src, naming, codec, sl, coded.stored)
    temps: _Temporaries | None = None
    for local, e in enumerate(sl.experts):
        reader.expert(e)
        for p in sl.projections:
            raw = {part.suffix: t for part in codec.parts() if (t := reader.part(part, p)) is not None}

            def at(suffix: str, e: int = e, p: int = p) -> str:
                key = naming.key(e, p, suffix)
                return f"{src.where(key)}: tensor {key}"

            d = codec.decode(raw, *_local(sl, p), at)
            if temps is None:
                temps = _Temporaries.empty(layer, codec.quant, sl, d.scale.dtype, codec.has("bias"))
            if d.bias is not None:
                d.bias = d.bias.to(layer.params_dtype)
            temps.place(d, local, p, sl, sl.r0 == 0)
            kept = {part.suffix: raw[part.suffix] for part in codec.parts()
                    if part.role == "kept" and part.suffix in raw}
            if kept:
                coded.kept[local, p] = kept
    assert temps is not None
    return temps.t, coded


def _decoded(layer: FusedMoE, local: int, p: int, n: int) -> Decoded:
    """Projection ``p`` of local expert ``local`` from the layer's canonical parameters."""
    w = "w2" if p == 2 else "w13"
    rows = slice(None) if p == 2 else slice(p * n, (p + 1) * n)

    def get(name: str) -> torch.Tensor | None:
        t = getattr(layer, f"{w}_{name}", None)
        return None if t is None else t[local, rows].detach().cpu()

    gs = getattr(layer, f"{w}_weight_global_scale", None)
    return Decoded(get("weight"), get("weight_scale"), get("weight_zero_point"),  # type: ignore[arg-type]
                   None if gs is None else gs[local, 0 if p == 2 else p].detach().cpu(), get("bias"))


def export_coded(layer: FusedMoE, naming: ExpertNaming, codec: Codec, coded: Coded,
                 sl: LayerSlice) -> dict[str, torch.Tensor]:
    """The layer's experts in the checkpoint's names and format (see ``export_experts``)."""
    per_expert: list[dict[int, dict[str, torch.Tensor]]] = []
    for local in range(len(sl.experts)):
        tensors = {}
        for p in sl.projections:
            dtypes = {s: dt for (q, s), (dt, _) in coded.stored.items() if q == p}
            raw = codec.encode(_decoded(layer, local, p, sl.n), *_full(sl, p), dtypes)
            tensors[p] = raw | coded.kept.get((local, p), {})
        per_expert.append(tensors)
    parts = {part.suffix: part for part in codec.parts()}
    if naming.style != "fused":
        return {naming.key(e, p, s): t.reshape(coded.stored[p, s][1]).contiguous()
                for e, x in zip(sl.experts, per_expert, strict=True) for p, ts in x.items() for s, t in ts.items()}
    out = {}
    for s in per_expert[0][0]:
        gate_up = torch.stack([_join(parts[s], [x[p][s] for p in sl.projections if p < 2], codec.interleaved)
                               for x in per_expert])
        out[naming.key(0, 0, s)] = gate_up.reshape(coded.stored[0, s][1]).contiguous()
        out[naming.key(0, 2, s)] = torch.stack([x[2][s] for x in per_expert]).reshape(coded.stored[2, s][1])
    return out


def _join(part: Part, halves: list[torch.Tensor], interleaved: bool) -> torch.Tensor:
    """gate and up stored as one fused tensor: along the out dim (one after the other, or alternating
    rows), or stacked for a part without one."""
    i = part.out_dim()
    if i is None:
        return torch.stack(halves)
    if interleaved:
        return torch.stack(halves, dim=i + 1).flatten(i, i + 1)
    return torch.cat(halves, dim=i)

