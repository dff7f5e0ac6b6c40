"""compressed-tensors ``pack-quantized`` weight-only INT4/INT8 (the ``config_groups`` reader lives in
:mod:`moe.checkpoints.compressed`).

Each projection [out, in] stores ``weight_packed`` int32 [out, ceil(in * bits / 32)] (``q + 2^(bits-1)``
unsigned, element i of a row at bit ``bits * i``), ``weight_scale`` [out, in / G] (group) or [out, 1]
(channel), ``weight_zero_point`` int32 [ceil(out * bits / 32), in / G] (asymmetric only, packed along the
*output* features, offset like the data), optionally ``weight_g_idx`` [in] (act-order ``group``) and
``weight_shape`` [2]. A value is ``(q - zero) * scale`` in the signed range, i.e. the stored codes
minus the stored zero (or minus 8 / 128 when symmetric) times the scale.

- 4 bits per group: moe's int4 (``w4a16`` / ``w4a16_zp`` for 128; another group an int4 ``QuantConfig``);
- 8 bits per channel, symmetric: ``w8a16``.
``weight_g_idx`` is supported only as the contiguous grouping ``i // G``; ``weight_g_idx`` and
``weight_shape`` are kept and written back as read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .codec import FLOATS, At, Codec, Decoded, Dim, Part, check_finite, check_g_idx, int4_quant
from .packing import pack_int32, pack_nibbles, unpack_int32, unpack_nibbles
from .source import CheckpointError

__all__ = ["PackedCodec", "parse_packed_group"]


@dataclass(frozen=True)
class PackedCodec(Codec):
    """``bits`` 4 (per ``group``) or 8 (per channel: ``group`` None), ``sym``; ``config``: the config
    group's field, for errors."""

    bits: int
    group: int | None
    sym: bool
    config: str = field(default="quantization_config", compare=False)

    @property
    def quant(self) -> str:
        return "w8a16" if self.bits == 8 else int4_quant(self.group, not self.sym)  # type: ignore[arg-type]

    def parts(self) -> tuple[Part, ...]:
        per = 32 // self.bits
        pack = f"packing of {per} codes an int32"
        g = Dim("in", self.group, what=f"group size {self.group}") if self.group else Dim(None, size=1)
        parts = [Part("weight_packed", "data", (Dim("out"), Dim("in", per, what=pack)), (torch.int32,)),
                 Part("weight_scale", "scale", (Dim("out"), g), FLOATS)]
        if not self.sym:
            parts.append(Part("weight_zero_point", "zero", (Dim("out", per, what=pack), g), (torch.int32,)))
        return (*parts,
                Part("weight_g_idx", "kept", (Dim("in", whole=True),), (torch.int32, torch.int64), required=False),
                Part("weight_shape", "kept", (Dim(None, size=2),), (torch.int64, torch.int32), required=False))

    def check_sizes(self, rows: int, cols: int) -> str | None:
        if self.group and cols % self.group:
            return (f"{self.config}.weights.group_size={self.group} does not divide the {cols} input features of "
                    f"this [{rows}, {cols}] projection; moe's int4 groups must tile the input features")
        return None

    def _codes(self, words: torch.Tensor, dim: int, size: int, at: str) -> torch.Tensor:
        """Unpacked codes, the padding of the last word (zero codes) checked and cut off."""
        codes = unpack_int32(words, self.bits, dim=dim)
        pad = codes.narrow(dim, size, codes.shape[dim] - size)
        if bool((pad != 0).any()):
            raise CheckpointError(f"{at} has non-zero padding codes past element {size} of its packed dim; "
                                  "compressed-tensors pads the last int32 with zeros")
        return codes.narrow(dim, 0, size)

    def decode(self, t: dict[str, torch.Tensor], rows: int, cols: int, at: At) -> Decoded:
        check_g_idx(t.get("weight_g_idx"), self.group or cols, at("weight_g_idx"), f"{self.config}.weights.actorder")
        check_finite(t["weight_scale"], at("weight_scale"))
        codes = self._codes(t["weight_packed"], 1, cols, at("weight_packed"))  # [out, in], offset
        if self.bits == 8:
            return Decoded((codes - 128).to(torch.int8), t["weight_scale"].reshape(-1).float())
        zero = None
        if not self.sym:
            zero = self._codes(t["weight_zero_point"], 0, rows, at("weight_zero_point")).to(torch.uint8)
        return Decoded(pack_nibbles(codes), t["weight_scale"].contiguous(), zero)

    def encode(self, d: Decoded, rows: int, cols: int, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
        if self.bits == 8:
            return {"weight_packed": pack_int32(d.data.to(torch.int32) + 128, 8, dim=1),
                    "weight_scale": d.scale.reshape(rows, 1).to(dtypes["weight_scale"])}
        out = {"weight_packed": pack_int32(unpack_nibbles(d.data), 4, dim=1),
               "weight_scale": d.scale.to(dtypes["weight_scale"]).contiguous()}
        if d.zero is not None:
            out["weight_zero_point"] = pack_int32(d.zero, 4, dim=0)
        return out


def parse_packed_group(field_name: str, w: Mapping[str, Any], a: Any, where: str) -> PackedCodec:
    """The codec of a ``pack-quantized`` config group (``weights``: ``w``, ``input_activations``: ``a``)."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{where}: {field_name}.weights: {what} is not supported for pack-quantized weights; "
                               "supported: int 4-bit per group (symmetric or not; act-order only as the contiguous "
                               "grouping), int 8-bit symmetric per channel")

    if a is not None:
        raise CheckpointError(f"{where}: {field_name}.input_activations={a!r}: pack-quantized weights are read as "
                              "weight-only (w4a16, w4a16_zp, w8a16): input_activations must be null")
    bits, strategy, sym = w.get("num_bits"), w.get("strategy"), w.get("symmetric", True)
    if w.get("type", "int") != "int" or w.get("dynamic") not in (None, False):
        raise bad(f"type={w.get('type')!r}, dynamic={w.get('dynamic')!r}")
    if bits == 4 and strategy == "group":
        group = w.get("group_size")
        if not isinstance(group, int) or group < 2 or group % 2:
            raise bad(f"group_size={group!r} (an even number of input features is needed)")
        return PackedCodec(4, group, bool(sym), field_name)
    if bits == 8 and strategy == "channel" and sym:
        return PackedCodec(8, None, True, field_name)
    raise bad(f"num_bits={bits!r}, strategy={strategy!r}, symmetric={sym!r}")
