"""The contract every experts backend implements: the bottom of the package's import graph.

A backend is one object with:
- ``name``: what users pass as ``backend=``;
- ``priority``: ``backend="auto"`` tries higher priorities first;
- ``is_available() -> (ok, reason)``: are its libraries here (never raises; imports optional libraries
  lazily). Hardware is judged in ``supports`` from ``problem.target``;
- ``supports(problem) -> (ok, reason)``: can it run this problem (device target, dtype, shape,
  activation, quant); it must not depend on ``problem.num_tokens`` (decisions are cached per shape);
- ``apply(args, problem, out)``: compute the experts and write the combined [T, K] result into ``out``.

Optional members:
- ``priority_for(target) -> int``: the priority on a device target, when it differs by device (``priority``
  is then this machine's);
- ``schemes``: the quantization schemes it runs, as canonical keys (``QuantConfig.key()``: ``"none"``,
  ``"fp8_block"``, ...; ``"*"``: any, ``supports`` decides); the registry checks a call's scheme against it
  before ``supports``. A backend without it runs ``"none"`` only.
- ``prepare(args, problem) -> PreparedWeights | None``: the backend's own arrangement of the weights
  (shuffled, interleaved, transposed scales), made once per (backend, weights) by the layer that owns them
  and passed back in ``args.prepared`` on every call (docs/extending.md states the memory rule); None when
  this problem needs none (the call then gets ``args.prepared`` None).
- ``alignment_tile(args, problem) -> int | None``: the row tile of an :class:`Alignment` the backend
  would make for this call, or None when it makes none. ``FusedMoE.forward`` (``moe.functional.fused_moe``)
  then groups the pairs by expert in the routing kernel's own launch and passes the result in
  ``args.alignment``; a backend without it always gets None there.

``out`` may be ``args.hidden_states`` itself (the in-place variant): a backend must finish reading the
hidden states before it writes ``out``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Protocol, runtime_checkable

import torch

from .config import ActivationSpec
from .quant.schemes import QuantConfig
from .quant.weights import QuantizedWeight
from .target import DeviceTarget, current_target

__all__ = ["Alignment", "Backend", "ExpertsArgs", "ExpertsProblem", "PreparedWeights", "Weight", "backend_schemes"]

Weight = torch.Tensor | QuantizedWeight


@dataclass(frozen=True)
class ExpertsProblem:
    """A tensor-free description of one ``fused_experts`` call: what ``supports()`` decides on."""

    device_type: str
    dtype: torch.dtype  # the activations' dtype (and the output's)
    num_tokens: int = field(compare=False)  # not part of equality/hash: decisions are cached per shape
    num_experts: int  # local experts held in w13 / w2
    num_global_experts: int  # range of topk_ids (== num_experts without an expert map)
    hidden_size: int  # K
    intermediate_size: int  # N
    top_k: int
    activation: ActivationSpec = field(default_factory=ActivationSpec)
    has_w13_bias: bool = False
    has_w2_bias: bool = False
    has_expert_map: bool = False
    apply_router_weight_on_input: bool = False
    quant: QuantConfig = field(default_factory=QuantConfig)
    target: DeviceTarget | None = None  # the device's features; None: those of this process's device_type

    def __post_init__(self) -> None:
        if self.target is None and (self.device_type == "cpu" or
                                    (self.device_type == "cuda" and torch.cuda.is_available())):
            object.__setattr__(self, "target", current_target(self.device_type))

    def __hash__(self) -> int:
        """Computed once per object: problems key the decision and config caches on every call's hot
        path, and hashing the pydantic fields costs microseconds each time."""
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, f.name) for f in fields(self) if f.compare))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}  # string hashes differ per process


@dataclass(frozen=True, eq=False)
class PreparedWeights:
    """A backend's own arrangement of a layer's weights, made once by ``Backend.prepare``."""

    backend: str
    tensors: dict[str, torch.Tensor]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass(frozen=True, eq=False)
class Alignment:
    """The pairs (token, slot) of a call grouped by local expert, each group padded to ``block_m`` rows
    (``moe.kernels.align.align`` makes it; so does the routing kernel that aligns its own ids)."""

    sorted_ids: torch.Tensor  # [sorted_len] int32: pair index (t * k + j) per row, num_pairs for padding
    block_expert: torch.Tensor  # [max_blocks] int32: local expert of each row tile, -1 past the end
    total: torch.Tensor  # [1] int32: padded number of rows in use
    expert_ends: torch.Tensor  # [E] int32: end row of each expert's unpadded group (grouped GEMM offsets)
    max_blocks: int
    block_m: int


@dataclass(frozen=True)
class ExpertsArgs:
    """The tensors of one call, already validated by ``fused_experts``."""

    hidden_states: torch.Tensor  # [T, K]
    w13: Weight  # [E, 2N, K] gated (gate rows, then up rows) or [E, N, K]; a QuantizedWeight when quantized
    w2: Weight  # [E, K, N]
    topk_weights: torch.Tensor  # [T, k] float
    topk_ids: torch.Tensor  # [T, k] int32/int64 global ids
    w13_bias: torch.Tensor | None = None  # [E, 2N] or [E, N]
    w2_bias: torch.Tensor | None = None  # [E, K]
    expert_map: torch.Tensor | None = None  # [E_global] -> local id or -1
    a13_scale: torch.Tensor | None = None  # static scale of GEMM1's input: [1] or [E] fp32
    a2_scale: torch.Tensor | None = None  # static scale of GEMM2's input: [1] or [E] fp32
    prepared: PreparedWeights | None = None  # the chosen backend's arrangement, when it has one
    alignment: Alignment | None = None  # topk_ids grouped for the backend's alignment_tile, when it has one


@runtime_checkable
class Backend(Protocol):
    name: str
    priority: int

    def is_available(self) -> tuple[bool, str]: ...

    def supports(self, problem: ExpertsProblem) -> tuple[bool, str]: ...

    def apply(self, args: ExpertsArgs, problem: ExpertsProblem, out: torch.Tensor) -> None: ...


def gemm1_rounding(backend: object, problem: ExpertsProblem) -> torch.dtype | None:
    """The dtype a backend stores GEMM1's output in before the activation under a W8A8 scheme, when it
    rounds it there (its ``w8a8_gemm1_rounded`` attribute: a library GEMM that writes bf16 only, such as
    ``torch._scaled_grouped_mm`` or DeepGEMM's), else None (the output stays fp32 into the activation).
    The reference emulates it (``torch_ref_experts(..., gemm1_dtype=...)``): that rounding moves GEMM2's
    quantized inputs across steps, an arithmetic difference, not an error."""
    if problem.quant.activations is None or not getattr(backend, "w8a8_gemm1_rounded", False):
        return None
    return problem.dtype


def backend_schemes(backend: object) -> frozenset[str]:
    """The quantization schemes a backend declares (``{"none"}`` when it declares none)."""
    return frozenset(getattr(backend, "schemes", ("none",)))
