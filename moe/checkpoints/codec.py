"""Data codecs: formats whose stored tensors are not moe's canonical storage as they are (packed int4 in
int32 words, GPTQ's transposed layout, AWQ's interleaved order, gpt-oss's ``_blocks``, zero points).

A :class:`Codec` describes the tensors one projection ([out, in]) stores (:class:`Part`: suffix, role,
dtypes, and each dim as a function of the projection's out and in features, so the loader can check
shapes and cut a tensor-parallel slice of any of them), and converts them to the canonical tensors of
``moe.quant.schemes`` (:class:`Decoded`) and back, bit for bit. The loader does the naming, reading,
slicing, checks and temporaries for every codec alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..quant import QuantConfig, WeightScheme
from .source import CheckpointError

__all__ = ["FLOATS", "At", "Codec", "Decoded", "Dim", "Part", "check_constant", "check_finite", "check_g_idx",
           "dtype_names", "int4_quant"]

Axis = Literal["out", "in"]
# data, scale, zero, global_scale, bias: canonical tensors; kept: read, checked, and written back verbatim
Role = Literal["data", "scale", "zero", "global_scale", "bias", "kept"]
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    return " or ".join(str(d).removeprefix("torch.") for d in dtypes)


@dataclass(frozen=True)
class Dim:
    """One dim of a stored tensor: along the projection's ``out`` or ``in`` features, one entry per ``per``
    of them (a packing or group size, named by ``what`` in errors; a last partial entry rounds up), or a
    fixed ``size`` (``axis`` None). ``whole``: read in full under tensor parallelism (act-order's g_idx)."""

    axis: Axis | None
    per: int = 1
    size: int = 1
    what: str = ""
    whole: bool = False

    def length(self, rows: int, cols: int) -> int:
        if self.axis is None:
            return self.size
        return _cdiv(rows if self.axis == "out" else cols, self.per)


@dataclass(frozen=True)
class Part:
    """One stored tensor of a projection: ``{module}.{suffix}`` per expert."""

    suffix: str
    role: Role
    dims: tuple[Dim, ...]
    dtypes: tuple[torch.dtype, ...]
    required: bool = True

    def shape(self, rows: int, cols: int) -> tuple[int, ...]:
        return tuple(d.length(rows, cols) for d in self.dims)

    def out_dim(self) -> int | None:
        """The index of the dim along the out features (where a fused gate_up stacks gate and up)."""
        return next((i for i, d in enumerate(self.dims) if d.axis == "out"), None)


@dataclass
class Decoded:
    """One projection's canonical tensors (``moe.quant.schemes``): ``data`` [rows, cols] or [rows, cols / 2]
    bytes, ``scale`` [rows, cols / G] or [rows], ``zero`` like the scale, ``global_scale`` a 0-dim fp32,
    ``bias`` [rows]."""

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None


# where a tensor is, for errors: suffix -> "FILE: tensor KEY"
At = Callable[[str], str]


class Codec(ABC):
    """A projection's stored tensors <-> the canonical ones. Subclasses are frozen dataclasses (an
    :class:`~moe.checkpoints.Encoding` holds one and is compared for "one format per layer").

    ``quant``: the moe scheme key the format maps to; ``interleaved``: a fused ``gate_up`` alternates gate
    and up rows (gpt-oss) instead of holding all gate rows, then all up rows."""

    interleaved: ClassVar[bool] = False

    @property
    @abstractmethod
    def quant(self) -> str: ...

    @abstractmethod
    def parts(self) -> tuple[Part, ...]: ...

    def check_sizes(self, rows: int, cols: int) -> str | None:
        """Why a [rows, cols] projection cannot be stored in this format (None: it can)."""
        return None

    @abstractmethod
    def decode(self, t: dict[str, torch.Tensor], rows: int, cols: int, at: At) -> Decoded:
        """The canonical tensors of one projection (its slice under tensor parallelism: ``rows`` x ``cols``)
        from its stored tensors by suffix (optional parts absent when the file has none); raises
        :class:`CheckpointError` (``at(suffix)`` names the tensor) for values the format does not allow."""

    @abstractmethod
    def encode(self, d: Decoded, rows: int, cols: int, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
        """The stored tensors (every role but ``kept``) of one whole projection, in ``dtypes`` (the stored
        dtype of each suffix): the inverse of :meth:`decode`."""

    def has(self, role: Role) -> bool:
        return any(p.role == role for p in self.parts())


def int4_quant(group: int, zero_point: bool) -> str:
    """The moe scheme key of int4 weights in groups of ``group`` input features: ``w4a16`` / ``w4a16_zp`` for
    128, else a ``QuantConfig`` key."""
    scheme = WeightScheme(format="int4", granularity="group", group_size=group, zero_point=zero_point)
    return QuantConfig(weights=scheme).key()


def check_g_idx(g_idx: torch.Tensor | None, group: int, at: str, field: str) -> None:
    """Act-order's ``g_idx`` (input feature i -> its group) must be the contiguous grouping ``i // group``:
    moe's int4 kernels read the scale of feature i at group i // group."""
    if g_idx is None:
        return
    want = torch.arange(g_idx.numel(), dtype=torch.int64, device=g_idx.device) // group
    got = g_idx.reshape(-1).to(torch.int64)
    if not torch.equal(got, want):
        i = int((got != want).nonzero()[0])
        raise CheckpointError(
            f"{at} assigns input feature {i} to group {int(got[i])}, not {i} // {group} = {int(want[i])}: act-order "
            f"({field}) with a g_idx that is not the contiguous grouping is not supported (moe's int4 kernels read "
            "the scale of feature i at group i // group_size); use a checkpoint quantized without act-order, or "
            "reorder the input features and requantize")


def check_constant(t: torch.Tensor, value: int, at: str, why: str) -> None:
    """Every code of ``t`` is ``value`` (a symmetric scheme's stored zero points)."""
    if not bool((t == value).all()):
        bad = sorted(set(t[t != value].flatten()[:8].tolist()))
        raise CheckpointError(f"{at} holds zero points {bad}, but {why} stores every zero point as {value}")


def check_finite(t: torch.Tensor, at: str, positive: bool = True) -> None:
    s = t.float()
    ok = torch.isfinite(s) & (s > 0) if positive else torch.isfinite(s)
    if not bool(ok.all()):
        rule = "finite and > 0" if positive else "finite"
        raise CheckpointError(f"{at} holds scales that are not {rule}, e.g. {s[~ok].flatten()[:4].tolist()}")
