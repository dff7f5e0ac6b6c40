"""Quantized expert weights: :class:`QuantizedWeight`, ``quantize`` and ``dequantize``.

Round to nearest (even), scales chosen so the largest magnitude of each tensor, row, block or group maps
to the format's largest value (an all-zero one gets scale 1). Work is done one expert at a time in fp32,
so quantizing a large layer on its device never holds a full fp32 copy.

The 4-bit formats (storage in ``moe.quant.schemes``):
- int4, symmetric: ``scale = amax / 7`` per group and codes ``q = round(w / scale) + 8`` in 1..15 (code 0,
  i.e. -8, is never produced, so a group's largest magnitude is represented exactly rather than clipped);
  with zero points: ``scale = (max - min) / 15`` over the group (the range always holding 0) and
  ``zero = round(-min / scale)``, ``q = clamp(round(w / scale) + zero, 0, 15)``. Scales are stored in the
  weight's dtype when it is bf16 or fp16 (as GPTQ/AWQ checkpoints store them), else fp32.
- mxfp4: the e8m0 exponent of a block of 32 is ``ceil(log2(amax / 6))``, the smallest power of two for
  which the block's largest magnitude fits e2m1's largest value (6) without saturating. (The OCP MX
  recipe takes ``floor(log2(amax)) - 2``, which can clip the largest elements; we prefer no clipping at
  the cost of, sometimes, one binade of resolution.) Exponents are clamped to the byte range 0..254.
- nvfp4: a global scale per (expert, part) ``amax / (448 * 6)``, so every block scale ``block_amax / 6 /
  global`` fits e4m3; block scales rounded to e4m3 (to nearest), then the elements to e2m1, saturating
  at 6 where the rounded scale came out below the exact one.
e2m1 rounding is to the nearest value of +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}, ties to the even code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .schemes import E2M1_MAX, FP8_MAX, INT8_MAX, STORAGE_DTYPES, WeightScheme, scale_from_amax

__all__ = ["E2M1_VALUES", "QuantizedWeight", "check_quantized_weight", "dequantize", "e2m1_codes", "int4_scale_dtype",
           "pack_nibbles", "quantize", "scale_dtypes", "scale_shape", "storage_shapes", "unpack_nibbles"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT4_SCALES = (torch.bfloat16, torch.float16, torch.float32)
# the value of each e2m1 code 0..15 (bit 3 the sign)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _data_dtypes(scheme: WeightScheme) -> tuple[torch.dtype, ...]:
    return (STORAGE_DTYPES[scheme.format],) if scheme.format in STORAGE_DTYPES else _FLOATS


def scale_dtypes(scheme: WeightScheme) -> tuple[torch.dtype, ...]:
    """The dtypes a scheme's scales may have: fp32; int4 also bf16 and fp16; mxfp4 e8m0 bytes (uint8);
    nvfp4 float8_e4m3fn."""
    if scheme.format == "int4":
        return _INT4_SCALES
    if scheme.format == "mxfp4":
        return (torch.uint8,)
    if scheme.format == "nvfp4":
        return (torch.float8_e4m3fn,)
    return (torch.float32,)


def int4_scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype ``quantize`` stores int4 scales in for weights of ``dtype``: bf16 and fp16 keep theirs."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return " or ".join(str(d).removeprefix("torch.") for d in dtypes)


def scale_shape(scheme: WeightScheme, experts: int, rows: int, cols: int, parts: int) -> tuple[int, ...]:
    """The canonical shape of the scale of a ``[experts, rows, cols]`` weight stored with ``scheme``
    (``cols``: the logical input features; a group size must divide it, see :func:`storage_shapes`)."""
    if scheme.granularity == "tensor":
        return (experts, parts)
    if scheme.granularity == "channel":
        return (experts, rows)
    if scheme.granularity == "block":
        br, bc = scheme.block  # type: ignore[misc]
        return (experts, parts * _cdiv(rows // parts, br), _cdiv(cols, bc))
    return (experts, rows, cols // scheme.group_size)  # type: ignore[operator]


def storage_shapes(scheme: WeightScheme, experts: int, rows: int, cols: int,
                   parts: int) -> dict[str, tuple[int, ...] | None]:
    """The canonical shapes of a logical ``[experts, rows, cols]`` weight's tensors: ``data``, ``scale``,
    ``zero`` and ``global_scale`` (None: the scheme has none). A group size that does not divide ``cols``
    is an error naming both."""
    g = scheme.group_size
    if g is not None and cols % g:
        raise ValueError(f"group_size: {scheme.format} groups of {g} input elements do not divide the "
                         f"{cols} input features (K or N) of a {(experts, rows, cols)} weight")
    scale = scale_shape(scheme, experts, rows, cols, parts)
    return {"data": (experts, rows, cols // 2 if scheme.packed else cols), "scale": scale,
            "zero": scale if scheme.zero_point else None,
            "global_scale": (experts, parts) if scheme.format == "nvfp4" else None}


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """Expert weights in a quantized storage format (canonical layout, see ``moe.quant.schemes``).

    ``shape`` is the logical ``[E, rows, cols]`` (packed 4-bit data holds ``cols / 2`` bytes a row);
    ``parts`` is 2 for a gated w13 (gate rows, then up rows, each with its own scales) and 1 otherwise.
    ``zero``: int4 zero points (``zero_point`` schemes); ``global_scale``: nvfp4's fp32 [E, P]."""

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
        e, rows, cols = self.data.shape
        return torch.Size((e, rows, 2 * cols if self.scheme.packed else cols))

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


def _check_data(name: str, data: torch.Tensor, scheme: WeightScheme) -> None:
    allowed = _data_dtypes(scheme)
    if data.dtype not in allowed:
        why = ""
        if scheme.packed and not data.dtype.is_floating_point and data.dtype.is_signed:
            why = " (two unsigned 4-bit codes a byte: a signed dtype would sign-extend the high nibble; view " \
                  "the bytes as uint8)"
        raise TypeError(f"{name}.data: {scheme.format} weights are stored as {_names(allowed)}, got "
                        f"{data.dtype}{why}")
    if data.dim() != 3:
        raise ValueError(f"{name}.data: expected [num_experts, rows, cols], got shape {tuple(data.shape)}")


def check_quantized_weight(name: str, qw: QuantizedWeight) -> None:
    """Raise, naming ``name`` and the field, unless ``qw``'s tensors have the dtypes and shapes of its
    scheme."""
    if not isinstance(qw.scheme, WeightScheme):
        raise TypeError(f"{name}.scheme: expected a WeightScheme, got {type(qw.scheme).__name__}")
    for attr in ("data", "scale"):
        if not isinstance(getattr(qw, attr), torch.Tensor):
            raise TypeError(f"{name}.{attr}: expected a torch.Tensor, got {type(getattr(qw, attr)).__name__}")
    data, scheme = qw.data, qw.scheme
    _check_data(name, data, scheme)
    if qw.parts not in (1, 2) or data.shape[1] % qw.parts:
        raise ValueError(f"{name}.parts: must be 1, or 2 for a gated w13 with an even row count; got parts="
                         f"{qw.parts} for {data.shape[1]} rows")
    e, rows, cols = qw.shape
    try:
        want = storage_shapes(scheme, e, rows, cols, qw.parts)
    except ValueError as exc:
        packed = f" ({data.shape[2]} bytes a row hold {cols} packed 4-bit codes)" if scheme.packed else ""
        raise ValueError(f"{name}.data: shape {tuple(data.shape)}{packed}: {exc}") from None
    for attr, dtypes in (("scale", scale_dtypes(scheme)), ("zero", (torch.uint8,)),
                         ("global_scale", (torch.float32,))):
        t, shape, what = getattr(qw, attr), want[attr], _PLURAL[attr]
        if shape is None:
            if t is not None:
                hint = " (the scheme has zero_point=False)" if scheme.format == "int4" else ""
                raise ValueError(f"{name}.{attr}: {scheme.format} weights have no {attr}{hint}, got a tensor")
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}.{attr}: {_describe(scheme)} weights need {what} of shape {shape} "
                            f"({_names(dtypes)}), got {type(t).__name__}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name}.{attr}: {scheme.format} {what} are {_names(dtypes)}, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}.{attr}: {_describe(scheme)} {what} of a {tuple(qw.shape)} weight with "
                             f"parts={qw.parts} have shape {shape}, got {tuple(t.shape)}")
        if t.device != data.device:
            raise ValueError(f"{name}.{attr} is on {t.device} but {name}.data is on {data.device}")


_PLURAL = {"scale": "scales", "zero": "zero points", "global_scale": "global scales"}


def _describe(scheme: WeightScheme) -> str:
    g = f" {scheme.group_size}" if scheme.group_size else ""
    zp = " with zero points" if scheme.zero_point else ""
    return f"{scheme.format} {scheme.granularity}{g}{zp}"


# ---------------------------------------------------------------------------------------------- decode
def unpack_nibbles(data: torch.Tensor) -> torch.Tensor:
    """[..., cols / 2] bytes -> [..., cols] codes 0..15 (int32): element 2j the low nibble, 2j + 1 the high
    (the canonical 4-bit storage)."""
    d = data.to(torch.int32)
    return torch.stack((d & 0xF, d >> 4), dim=-1).flatten(-2)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., cols] codes 0..15 -> [..., cols / 2] uint8 (the inverse of :func:`unpack_nibbles`)."""
    c = codes.to(torch.int32)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def _per_element(t: torch.Tensor, group: int) -> torch.Tensor:
    """A per-group [rows, cols / G] tensor repeated over each group: [rows, cols]."""
    return t.repeat_interleave(group, dim=-1)


def _e2m1_value(codes: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    return torch.tensor(E2M1_VALUES, dtype=work, device=codes.device)[codes.long()]


def _expand(scale: torch.Tensor, scheme: WeightScheme, rows: int, cols: int, parts: int) -> torch.Tensor:
    """One expert's scale ([P], [rows], [row blocks, col blocks] or [rows, groups]) broadcast to [rows, cols]."""
    if scheme.granularity == "tensor":
        return scale.repeat_interleave(rows // parts)[:, None].expand(rows, cols)
    if scheme.granularity == "channel":
        return scale[:, None].expand(rows, cols)
    if scheme.granularity == "group":
        return _per_element(scale, scheme.group_size)  # type: ignore[arg-type]
    br, bc = scheme.block  # type: ignore[misc]
    per_part = rows // parts
    blocks = scale.view(parts, -1, scale.shape[-1])  # [P, row blocks, col blocks]
    full = blocks.repeat_interleave(br, dim=1)[:, :per_part].repeat_interleave(bc, dim=2)[:, :, :cols]
    return full.reshape(rows, cols)


def _dequantize_expert(qw: QuantizedWeight, e: int, work: torch.dtype) -> torch.Tensor:
    """Expert ``e``'s [rows, cols] values in ``work`` (float32 or float64)."""
    scheme, (_, rows, cols) = qw.scheme, qw.shape
    if scheme.format == "int4":
        q = unpack_nibbles(qw.data[e]).to(work)
        zero = _per_element(qw.zero[e].to(work), scheme.group_size) if qw.zero is not None else 8.0  # type: ignore[index, arg-type]
        return (q - zero) * _per_element(qw.scale[e].to(work), scheme.group_size)  # type: ignore[arg-type]
    if scheme.format in ("mxfp4", "nvfp4"):
        v = _e2m1_value(unpack_nibbles(qw.data[e]), work)
        if scheme.format == "mxfp4":
            s = torch.exp2(qw.scale[e].to(work) - 127.0)
        else:
            gs = qw.global_scale[e].to(work).repeat_interleave(rows // qw.parts)[:, None]  # type: ignore[index]
            s = qw.scale[e].to(work) * gs
        return v * _per_element(s, scheme.group_size)  # type: ignore[arg-type]
    return qw.data[e].to(work) * _expand(qw.scale[e].to(work), scheme, rows, cols, qw.parts)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32, expert: int | None = None) -> torch.Tensor:
    """The weight's values in ``dtype``: [E, rows, cols], or [rows, cols] of one ``expert``."""
    experts = range(qw.num_experts) if expert is None else [expert]
    work = torch.float64 if dtype == torch.float64 else torch.float32
    out = [_dequantize_expert(qw, e, work).to(dtype) for e in experts]
    return out[0] if expert is not None else torch.stack(out)


# ---------------------------------------------------------------------------------------------- encode
def _scale_of(w: torch.Tensor, scheme: WeightScheme, parts: int) -> torch.Tensor:
    """One expert's fp32 scale from its fp32 weight [rows, cols] (tensor, channel or block)."""
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


def _groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """[rows, cols] -> [rows, cols / G, G]."""
    return w.view(w.shape[0], -1, group)


def e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """The e2m1 code (0..15, int32) nearest each value of ``v`` (saturating at 6), ties to the even code."""
    a = v.abs().clamp(max=E2M1_MAX)
    mids = torch.tensor(_E2M1_MIDPOINTS, dtype=a.dtype, device=a.device)
    code = torch.bucketize(a, mids)  # a == mids[i] gives i, the lower neighbour
    tie_up = (code < len(_E2M1_MIDPOINTS)) & (a == mids[code.clamp(max=len(_E2M1_MIDPOINTS) - 1)]) & (code % 2 == 1)
    code = code + tie_up.to(code.dtype)
    return (code | torch.where((v < 0) & (code > 0), 8, 0)).to(torch.int32)


def _int4_expert(w: torch.Tensor, scheme: WeightScheme, scale_dtype: torch.dtype):
    g = _groups(w, scheme.group_size)  # type: ignore[arg-type]
    if scheme.zero_point:
        lo, hi = g.amin(dim=-1).clamp(max=0.0), g.amax(dim=-1).clamp(min=0.0)  # the range holds 0
        s = torch.where(hi > lo, (hi - lo) / 15.0, torch.ones_like(hi)).to(scale_dtype)
        sf = s.to(torch.float32)
        zero = (-lo / sf).round().clamp(0, 15)
        q = ((g / sf[..., None]).round() + zero[..., None]).clamp(0, 15)
        return pack_nibbles(q.flatten(1)), s, zero.to(torch.uint8)
    s = scale_from_amax(g.abs().amax(dim=-1), "int4").to(scale_dtype)
    sf = s.to(torch.float32)
    # a scale rounded down to its dtype can push |w / s| a hair past 7: clamp to the symmetric range
    q = (g / sf[..., None]).round().clamp(-7, 7) + 8
    return pack_nibbles(q.flatten(1)), s, None


def _e8m0_of(amax: torch.Tensor) -> torch.Tensor:
    """The e8m0 byte of each block: 127 + ceil(log2(amax / 6)), so amax fits; 127 (scale 1) for amax 0."""
    exp = torch.ceil(torch.log2(amax / E2M1_MAX))
    exp = torch.where(amax > 0, exp, torch.zeros_like(exp))
    return (exp + 127).clamp(0, 254).to(torch.uint8)


def _fp4_expert(w: torch.Tensor, scheme: WeightScheme, parts: int):
    g = _groups(w, scheme.group_size)  # type: ignore[arg-type]  # [rows, groups, G]
    amax = g.abs().amax(dim=-1)  # [rows, groups]
    if scheme.format == "mxfp4":
        s = _e8m0_of(amax)
        step = torch.exp2(s.to(torch.float32) - 127.0)
        gs = None
    else:
        part_amax = amax.view(parts, -1).amax(dim=1)  # [P]
        gs = torch.where(part_amax > 0, part_amax / (FP8_MAX * E2M1_MAX), torch.ones_like(part_amax))
        gs_rows = gs.repeat_interleave(w.shape[0] // parts)[:, None]  # [rows, 1]
        s = (amax / E2M1_MAX / gs_rows).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
        step = s.to(torch.float32) * gs_rows
    v = torch.where(step[..., None] > 0, g / step[..., None], torch.zeros_like(g))  # a scale underflowing e4m3: 0
    return pack_nibbles(e2m1_codes(v).flatten(1)), s, gs


def quantize(weight: torch.Tensor, scheme: WeightScheme, *, parts: int = 1) -> QuantizedWeight:
    """Quantize ``weight`` [E, rows, cols] (a float tensor) with ``scheme``; ``parts=2`` for a gated w13,
    whose gate rows and up rows get their own scales (per tensor and block scales, nvfp4's global scales)."""
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
    e, rows, cols = weight.shape
    shapes = storage_shapes(scheme, e, rows, cols, parts)
    store = STORAGE_DTYPES.get(scheme.format, weight.dtype)
    sdt = int4_scale_dtype(weight.dtype) if scheme.format == "int4" else scale_dtypes(scheme)[0]
    dev = weight.device
    data = torch.empty(shapes["data"], dtype=store, device=dev)
    scale = torch.empty(shapes["scale"], dtype=sdt, device=dev)  # type: ignore[arg-type]
    zero = torch.empty(shapes["zero"], dtype=torch.uint8, device=dev) if shapes["zero"] else None
    gscale = torch.empty(shapes["global_scale"], dtype=torch.float32, device=dev) if shapes["global_scale"] else None
    for i in range(e):
        w = weight[i].to(torch.float32)
        if scheme.format == "int4":
            data[i], scale[i], z = _int4_expert(w, scheme, sdt)
            if zero is not None:
                zero[i] = z
            continue
        if scheme.packed:
            data[i], scale[i], gs = _fp4_expert(w, scheme, parts)
            if gscale is not None:
                gscale[i] = gs
            continue
        s = _scale_of(w, scheme, parts)
        q = w / _expand(s, scheme, rows, cols, parts)
        if scheme.format == "int8":
            q = q.round().clamp(-INT8_MAX, INT8_MAX)
        elif scheme.format == "fp8":
            q = q.clamp(-FP8_MAX, FP8_MAX)
        data[i] = q.to(store)
        scale[i] = s
    return QuantizedWeight(data, scale, scheme, zero, gscale, parts=parts)
