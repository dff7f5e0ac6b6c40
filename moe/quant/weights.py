"""Quantized expert weights: :class:`QuantizedWeight`, ``quantize`` and ``dequantize``.

Round to nearest (even), scales chosen so the largest magnitude of each tensor, row or block maps to the
format's largest value (an all-zero one gets scale 1). Work is done one expert at a time in fp32, so
quantizing a large layer on its device never holds a full fp32 copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .schemes import FP8_MAX, INT8_MAX, STORAGE_DTYPES, WeightScheme, scale_from_amax

__all__ = ["QuantizedWeight", "check_quantized_weight", "dequantize", "quantize", "scale_shape"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _data_dtypes(scheme: WeightScheme) -> tuple[torch.dtype, ...]:
    return (STORAGE_DTYPES[scheme.format],) if scheme.format in STORAGE_DTYPES else _FLOATS


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scale_shape(scheme: WeightScheme, experts: int, rows: int, cols: int, parts: int) -> tuple[int, ...]:
    """The canonical shape of the scale of a ``[experts, rows, cols]`` weight stored with ``scheme``."""
    if scheme.granularity == "tensor":
        return (experts, parts)
    if scheme.granularity == "channel":
        return (experts, rows)
    if scheme.granularity == "block":
        br, bc = scheme.block  # type: ignore[misc]
        return (experts, parts * _cdiv(rows // parts, br), _cdiv(cols, bc))
    raise ValueError(f"scale_shape: no scale layout for granularity {scheme.granularity!r}")


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """Expert weights in a quantized storage format (canonical layout, see ``moe.quant.schemes``).

    ``shape`` is the logical ``[E, rows, cols]``; ``parts`` is 2 for a gated w13 (gate rows, then up rows,
    each with its own scales) and 1 otherwise."""

    data: torch.Tensor
    scale: torch.Tensor
    scheme: WeightScheme
    zero: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None
    parts: int = 1
    scheme_key: str = field(init=False, repr=False)  # the scheme as a plain string (torch.compile reads it)

    def __post_init__(self) -> None:
        check_quantized_weight("QuantizedWeight", self)
        object.__setattr__(self, "scheme_key", self.scheme.key())

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def num_experts(self) -> int:
        return self.data.shape[0]

    def tensors(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(data, scale, zero, global_scale): how the weight crosses the custom-op boundary."""
        return self.data, self.scale, self.zero, self.global_scale

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)

    def __repr__(self) -> str:
        return (f"QuantizedWeight({self.scheme.format}/{self.scheme.granularity}, shape={tuple(self.shape)}, "
                f"data={self.data.dtype}, scale={tuple(self.scale.shape)} {self.scale.dtype}, parts={self.parts})")


def check_quantized_weight(name: str, qw: QuantizedWeight) -> None:
    """Raise, naming ``name``, unless ``qw``'s tensors have the dtypes and shapes of its scheme."""
    if not isinstance(qw.scheme, WeightScheme):
        raise TypeError(f"{name}.scheme: expected a WeightScheme, got {type(qw.scheme).__name__}")
    for attr in ("data", "scale"):
        if not isinstance(getattr(qw, attr), torch.Tensor):
            raise TypeError(f"{name}.{attr}: expected a torch.Tensor, got {type(getattr(qw, attr)).__name__}")
    data, scale, scheme = qw.data, qw.scale, qw.scheme
    allowed = _data_dtypes(scheme)
    if data.dtype not in allowed:
        raise TypeError(f"{name}.data: {scheme.format} weights are stored as "
                        f"{' or '.join(str(d).removeprefix('torch.') for d in allowed)}, got {data.dtype}")
    if data.dim() != 3:
        raise ValueError(f"{name}.data: expected [num_experts, rows, cols], got shape {tuple(data.shape)}")
    if qw.parts not in (1, 2) or data.shape[1] % qw.parts:
        raise ValueError(f"{name}.parts: must be 1, or 2 for a gated w13 with an even row count; got parts="
                         f"{qw.parts} for {data.shape[1]} rows")
    if scale.dtype != torch.float32:
        raise TypeError(f"{name}.scale: {scheme.format} scales are float32, got {scale.dtype}")
    want = scale_shape(scheme, *data.shape, qw.parts)
    if tuple(scale.shape) != want:
        raise ValueError(f"{name}.scale: {scheme.format} {scheme.granularity} scales of a {tuple(data.shape)} "
                         f"weight with parts={qw.parts} have shape {want}, got {tuple(scale.shape)}")
    if scale.device != data.device:
        raise ValueError(f"{name}.scale is on {scale.device} but {name}.data is on {data.device}")
    for attr in ("zero", "global_scale"):
        if getattr(qw, attr) is not None:
            raise ValueError(f"{name}.{attr}: {scheme.format} weights have no {attr}")


def _expand(scale: torch.Tensor, scheme: WeightScheme, rows: int, cols: int, parts: int) -> torch.Tensor:
    """One expert's scale ([P], [rows] or [row blocks, col blocks]) broadcast to [rows, cols]."""
    if scheme.granularity == "tensor":
        return scale.repeat_interleave(rows // parts)[:, None].expand(rows, cols)
    if scheme.granularity == "channel":
        return scale[:, None].expand(rows, cols)
    br, bc = scheme.block  # type: ignore[misc]
    per_part = rows // parts
    blocks = scale.view(parts, -1, scale.shape[-1])  # [P, row blocks, col blocks]
    full = blocks.repeat_interleave(br, dim=1)[:, :per_part].repeat_interleave(bc, dim=2)[:, :, :cols]
    return full.reshape(rows, cols)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32, expert: int | None = None) -> torch.Tensor:
    """``data * scale`` in ``dtype``: [E, rows, cols], or [rows, cols] of one ``expert``."""
    experts = range(qw.num_experts) if expert is None else [expert]
    _, rows, cols = qw.shape
    work = torch.float64 if dtype == torch.float64 else torch.float32
    out = [(qw.data[e].to(work) * _expand(qw.scale[e].to(work), qw.scheme, rows, cols, qw.parts)).to(dtype)
           for e in experts]
    return out[0] if expert is not None else torch.stack(out)


def _scale_of(w: torch.Tensor, scheme: WeightScheme, parts: int) -> torch.Tensor:
    """One expert's fp32 scale from its fp32 weight [rows, cols]."""
    rows, cols = w.shape
    a = w.abs()
    if scheme.granularity == "tensor":
        return scale_from_amax(a.view(parts, -1).amax(dim=1), scheme.format)
    if scheme.granularity == "channel":
        return scale_from_amax(a.amax(dim=1), scheme.format)
    br, bc = scheme.block  # type: ignore[misc]
    per_part = rows // parts
    nr, nc = _cdiv(per_part, br), _cdiv(cols, bc)
    padded = a.new_zeros(parts, nr * br, nc * bc)
    padded[:, :per_part, :cols] = a.view(parts, per_part, cols)
    amax = padded.view(parts, nr, br, nc, bc).amax(dim=(2, 4))  # [P, nr, nc]
    return scale_from_amax(amax, scheme.format).reshape(parts * nr, nc)


def quantize(weight: torch.Tensor, scheme: WeightScheme, *, parts: int = 1) -> QuantizedWeight:
    """Quantize ``weight`` [E, rows, cols] (a float tensor) with ``scheme``; ``parts=2`` for a gated w13,
    whose gate rows and up rows get their own scales."""
    if not isinstance(weight, torch.Tensor) or weight.dtype not in _FLOATS:
        raise TypeError(f"quantize: weight must be a float tensor, got "
                        f"{weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if weight.dim() != 3:
        raise ValueError(f"quantize: weight must be [num_experts, rows, cols], got shape {tuple(weight.shape)}")
    if parts not in (1, 2) or weight.shape[1] % parts:
        raise ValueError(f"quantize: parts must be 1, or 2 with an even row count; got parts={parts} for "
                         f"{weight.shape[1]} rows")
    if not isinstance(scheme, WeightScheme):
        raise TypeError(f"quantize: scheme must be a WeightScheme, got {type(scheme).__name__}")
    store = STORAGE_DTYPES.get(scheme.format, weight.dtype)
    e, rows, cols = weight.shape
    data = torch.empty(e, rows, cols, dtype=store, device=weight.device)
    scale = torch.empty(scale_shape(scheme, e, rows, cols, parts), dtype=torch.float32, device=weight.device)
    for i in range(e):
        w = weight[i].to(torch.float32)
        s = _scale_of(w, scheme, parts)
        q = w / _expand(s, scheme, rows, cols, parts)
        if scheme.format == "int8":
            q = q.round().clamp(-INT8_MAX, INT8_MAX)
        elif scheme.format == "fp8":
            q = q.clamp(-FP8_MAX, FP8_MAX)
        data[i] = q.to(store)
        scale[i] = s
    return QuantizedWeight(data, scale, scheme, parts=parts)
