"""The CUTLASS backend: our own SM90 grouped-GEMM extension (CUTLASS 3.x pointer-array grouped GEMM, TMA,
warp-specialized cooperative kernels; ``_cutlass/``), compiled at first use with nvcc through
``torch.utils.cpp_extension`` (ninja) into a folder keyed by everything that changes the binary
(:func:`cache_key`), with the compiler's progress shown.

One call is our pipeline around a library's grouped GEMM (``moe.kernels.pipeline``): the alignment groups the
pairs by expert (no padding), the grouped GEMM computes GEMM1 with one group per expert (problem sizes,
addresses and leading dimensions built on the device by ``moe.kernels.grouped``: no host synchronization), one
activation launch, the grouped GEMM again for GEMM2, the combine.

bf16, and three FP8 schemes through one e4m3 kernel with fp32 scales applied in the K loop (CUTLASS's
blockwise-scaled mainloop; each GEMM's input quantized first by ``moe.kernels.quant``):

- ``fp8_block``: 1x128 activation groups and 128x128 weight blocks, as stored;
- ``fp8_tensor``: the per-tensor scales written as those blocks (the activation's one scale repeated per row
  and 128 columns, each expert's gate and up scales repeated per 128x128 block: small, made per call);
- ``fp8_channel``: the instantiation with one weight scale per output row and 128 columns. The per-token
  scales are repeated per 128 columns each call; the weight scales once, by ``prepare`` (fp32 ``[E, rows,
  K/128]``: 4 bytes per 128 weight bytes, 3% of the fp8 weights, kept by the layer), or per call without a layer.

Applying a row's (or channel's) constant scale at every 128-deep step instead of once in the epilogue is the
same product; only the fp32 rounding of the accumulation moves.

State: bf16 passed the GPU parity matrix on an H200 (2026-12-04), the three FP8 schemes on an H100 (2026-12-05),
at every token count of the matrix; on (``HARDWARE_VERDICT`` empty).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ..contract import ExpertsArgs, ExpertsProblem, PreparedWeights, Weight
from ..kernels.align import MAX_EXPERTS
from ..kernels.grouped import expert_starts, leading_dims, pointer_array, problem_sizes
from ..kernels.pipeline import grouped_pipeline
from ..kernels.quant import QuantizedRows, quantize_rows
from ..quant import QuantizedWeight
from ..target import nvcc_version

__all__ = ["BACKEND", "FLAGS", "FP8_SCHEMES", "SOURCES", "activation_scales", "build_folder", "cache_key",
           "cutlass_experts", "cutlass_include", "cutlass_version", "extension", "weight_scales"]

_DIR = Path(__file__).resolve().parent / "_cutlass"
SOURCES = (_DIR / "grouped_gemm_sm90.cu", _DIR / "grouped_gemm_fp8_sm90.cu", _DIR / "binding.cpp",
           _DIR / "grouped_gemm.h", _DIR / "gemm_common.h")
COMPILED = tuple(str(src) for src in SOURCES if src.suffix != ".h")
ARCH = "9.0a"  # wgmma and TMA need the architecture-specific target
# torch's extension flags switch off CUDA's half and bf16 operators, which CUTLASS uses: switched back on
FLAGS = ("-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
         "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__")

INSTALL = "pip install 'nvidia-cutlass==4.2.0.0' (used only for its C++ headers), or set CUTLASS_HOME"
ALIGN_NK = 128
FP8_SCHEMES = ("fp8_tensor", "fp8_channel", "fp8_block")
# the rows of B one weight scale covers in the kernel, by the weights' granularity (the instantiations of
# grouped_gemm_fp8_sm90.cu)
SCALE_N = {"tensor": 128, "channel": 1, "block": 128}
# The off switch of each scheme not yet run on hardware (scheme key -> reason): empty since bf16 passed the GPU
# matrix on an H200 (2026-12-04) and the FP8 schemes on an H100 (2026-12-05).
HARDWARE_VERDICT: dict[str, str] = {}


def cutlass_include() -> Path | None:
    """The folder holding ``cutlass/cutlass.h``: ``$CUTLASS_HOME/include``, else the ``nvidia-cutlass``
    package's ``cutlass_library/source/include`` (found without importing it); None when neither has it."""
    candidates = []
    home = os.environ.get("CUTLASS_HOME")
    if home:
        candidates.append(Path(home) / "include")
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "source" / "include")
    return next((c for c in candidates if (c / "cutlass" / "cutlass.h").is_file()), None)


def cutlass_version() -> str:
    """The ``nvidia-cutlass`` distribution's version, or ``CUTLASS_HOME``'s folder name when it is not installed."""
    try:
        return importlib.metadata.version("nvidia-cutlass")
    except importlib.metadata.PackageNotFoundError:
        return Path(os.environ.get("CUTLASS_HOME", "unknown")).name


def cache_key(arch: str, cutlass: str, torch_version: str, cxx11_abi: bool, nvcc: str, flags: Sequence[str],
              sources: Sequence[Path]) -> str:
    """A folder name for one build: readable fields, then a hash of every input that changes the binary
    (the architecture, CUTLASS, torch and its C++ ABI, nvcc, the flags in order, each source's bytes)."""
    for name, value in (("arch", arch), ("cutlass", cutlass), ("torch_version", torch_version), ("nvcc", nvcc)):
        if not value:
            raise ValueError(f"{name}: expected a non-empty version string, got {value!r}")
    h = hashlib.sha256()
    for part in (arch, cutlass, torch_version, str(int(cxx11_abi)), nvcc, *flags):
        h.update(part.encode() + b"\0")
    for src in sources:
        h.update(Path(src).read_bytes() + b"\0")
    safe_torch = torch_version.replace("+", "_")
    return f"{arch}-cutlass{cutlass}-torch{safe_torch}-abi{int(cxx11_abi)}-nvcc{nvcc}-{h.hexdigest()[:16]}"


def build_folder(key: str) -> Path:
    """``$XDG_CACHE_HOME/moe/cutlass/<key>`` (``~/.cache/moe/cutlass/<key>``)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "moe" / "cutlass" / key


def _toolchain_problem() -> str | None:
    if cutlass_include() is None:
        return f"the CUTLASS C++ headers are not found; {INSTALL}"
    if nvcc_version() is None:
        return "nvcc is not on PATH (nor under CUDA_HOME): the extension compiles with nvcc at first use"
    if shutil.which("ninja") is None:
        return "ninja is not on PATH: torch.utils.cpp_extension builds with it; pip install ninja"
    return None


def _key() -> str:
    return cache_key(f"sm{ARCH.replace('.', '')}", cutlass_version(), torch.__version__,
                     bool(torch._C._GLIBCXX_USE_CXX11_ABI), nvcc_version() or "none", FLAGS, SOURCES)


@functools.cache
def extension():
    """The compiled extension (built at the first call for this cache key, minutes; later calls load it)."""
    problem = _toolchain_problem()
    if problem is not None:
        raise RuntimeError(f"cutlass: {problem}")
    from torch.utils.cpp_extension import load

    key = _key()
    folder = build_folder(key)
    folder.mkdir(parents=True, exist_ok=True)
    if not any(folder.glob("*.so")):
        print(f"moe: compiling the CUTLASS grouped GEMM for sm_{ARCH.replace('.', '')} into {folder} "
              "(minutes, once per cache key)", file=sys.stderr, flush=True)
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = ARCH  # torch emits this one -gencode
    try:
        return load(name=f"moe_cutlass_{key[-16:]}", sources=list(COMPILED),
                    extra_include_paths=[str(cutlass_include()), str(_DIR)], extra_cflags=["-O3", "-std=c++17"],
                    extra_cuda_cflags=list(FLAGS), build_directory=str(folder), verbose=True)
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved


def _grouped_gemm(ext, a: torch.Tensor, w: torch.Tensor, d: torch.Tensor, ends: torch.Tensor) -> None:
    """``d[rows of g] = a[rows of g] @ w[g]^T`` for every expert g (rows grouped by ``ends``)."""
    groups, n, k = w.shape
    elt = a.element_size()
    starts = expert_starts(ends)
    ptr_w = pointer_array(w, torch.arange(groups, device=w.device) * n, w.stride(1) * elt)
    ext.grouped_gemm_bf16(problem_sizes(ends, n, k), pointer_array(a, starts, a.stride(0) * elt), ptr_w,
                          pointer_array(d, starts, d.stride(0) * elt), leading_dims(groups, a.stride(0), a.device),
                          leading_dims(groups, w.stride(1), a.device), leading_dims(groups, d.stride(0), a.device))


def activation_scales(q: QuantizedRows, k: int) -> torch.Tensor:
    """The kernel's SFA, fp32 ``[rows, ceil(K/128)]`` row-major: 1x128 group scales as they are; a row's (per
    token) or the tensor's scale repeated per 128 columns."""
    rows, blocks = q.data.shape[0], -(-k // 128)
    if q.scale.dim() == 2:
        return q.scale.contiguous()
    return q.scale.float().reshape(-1, 1).expand(rows, blocks).contiguous()


def weight_scales(w: QuantizedWeight) -> torch.Tensor:
    """The kernel's SFB for every expert, fp32 ``[E, ceil(rows/scale_n), ceil(K/128)]`` row-major: 128x128
    blocks as stored; per tensor, each part's (gate's, up's) scale repeated over its blocks; per channel, each
    row's scale repeated per 128 columns (``scale_n`` 1)."""
    experts, rows, k = w.shape
    blocks = -(-k // 128)
    granularity = w.scheme.granularity
    if granularity == "block":
        return w.scale.contiguous()
    if granularity == "tensor":
        per_part = -(-rows // w.parts // 128)
        return w.scale.float().repeat_interleave(per_part, dim=1).unsqueeze(2).expand(-1, -1, blocks).contiguous()
    if granularity == "channel":
        return w.scale.float().unsqueeze(2).expand(experts, rows, blocks).contiguous()
    raise ValueError(f"cutlass: weight scales per {granularity!r} are not implemented (block, tensor, channel)")


def _grouped_gemm_fp8(ext, q: QuantizedRows, w: QuantizedWeight, sfb: torch.Tensor, d: torch.Tensor,
                      ends: torch.Tensor) -> None:
    """``d[rows of g] = (q's rows x SFA) @ (w[g] x SFB[g])^T`` for every expert g: e4m3 operands, fp32 scales
    per 1x128 of A and per ``scale_n`` x 128 of B (row-major, K-major for CUTLASS), bf16 ``d``."""
    groups, n, k = w.shape
    starts = expert_starts(ends)
    experts = torch.arange(groups, device=d.device)
    sfa, data, qdata = activation_scales(q, k), w.data, q.data
    ext.grouped_gemm_fp8(
        problem_sizes(ends, n, k), pointer_array(qdata, starts, qdata.stride(0)),
        pointer_array(data, experts * n, data.stride(1)), pointer_array(d, starts, d.stride(0) * d.element_size()),
        leading_dims(groups, qdata.stride(0), d.device), leading_dims(groups, data.stride(1), d.device),
        leading_dims(groups, d.stride(0), d.device), pointer_array(sfa, starts, sfa.stride(0) * 4),
        pointer_array(sfb, experts * sfb.shape[1], sfb.stride(1) * 4), SCALE_N[w.scheme.granularity])


def _abs_max(t: torch.Tensor) -> torch.Tensor:
    """fp32 [1]: the absolute max of ``t`` (two reductions, no copy of ``t``)."""
    return torch.maximum(t.amax(), -t.amin()).float().reshape(1)


def _expert_map_amax(args: ExpertsArgs, problem: ExpertsProblem, a: torch.Tensor, first: bool,
                     ends: torch.Tensor) -> torch.Tensor | None:
    """A per-tensor dynamic scale's amax when an expert map drops the pairs of other ranks' experts: GEMM1's
    over the whole call's tokens (the gathered rows miss some), GEMM2's over the rows that hold a local pair
    (the rest were never written). None otherwise: every gathered row holds a pair, and ``quantize_rows``
    takes the amax itself."""
    act = problem.quant.activations
    if act is None or act.granularity != "tensor" or act.static or args.expert_map is None:
        return None
    if first:
        x = args.hidden_states
        if problem.apply_router_weight_on_input:  # top_k = 1: the weight scales the token before it is quantized
            x = (x.float() * args.topk_weights.float()).to(x.dtype)
        return _abs_max(x)
    held = torch.arange(a.shape[0], device=a.device) < ends[-1:]  # rows past the local pairs: never written
    return _abs_max(torch.where(held.unsqueeze(1), a, 0))


def cutlass_experts(args: ExpertsArgs, problem: ExpertsProblem, out: torch.Tensor, ext=None,
                    prepared: PreparedWeights | None = None) -> torch.Tensor:
    """The experts through the grouped GEMM extension (``ext``: the compiled module, or a stand-in) in our
    pipeline around a library's grouped GEMM (``moe.kernels.pipeline``); under an FP8 scheme each GEMM's input
    rows are quantized first (``moe.kernels.quant``) and the weight scales come from ``prepared`` (made by
    ``CutlassBackend.prepare``) or are written for this call."""
    ext = ext if ext is not None else extension()
    sfb = prepared.tensors if prepared is not None else {}

    def gemm(a: torch.Tensor, w: Weight, ends: torch.Tensor) -> torch.Tensor:
        d = torch.empty(a.shape[0], w.shape[1], dtype=a.dtype, device=a.device)
        if isinstance(w, QuantizedWeight):
            first = w is args.w13
            amax = _expert_map_amax(args, problem, a, first, ends)
            q = quantize_rows(a.contiguous(), problem.quant.activations, amax=amax)
            scales = sfb.get("w13_sfb" if first else "w2_sfb")
            _grouped_gemm_fp8(ext, q, _contiguous(w), scales if scales is not None else weight_scales(w), d, ends)
        else:
            _grouped_gemm(ext, a.contiguous(), w.contiguous(), d, ends)
        return d

    return grouped_pipeline(args, problem, out, gemm)


def _contiguous(w: QuantizedWeight) -> QuantizedWeight:
    if w.data.is_contiguous() and w.scale.is_contiguous():
        return w
    return dataclasses.replace(w, data=w.data.contiguous(), scale=w.scale.contiguous())


class CutlassBackend:
    name = "cutlass"
    schemes = ("none", *FP8_SCHEMES)
    w8a8_gemm1_rounded = True  # its GEMM1 writes bf16 before our activation (contract.gemm1_rounding)

    @property
    def priority(self) -> int:
        return 11 if torch.cuda.is_available() else -30

    def priority_for(self, target) -> int:
        return 11 if target.vendor == "cuda" else -30  # below triton until measured

    def is_available(self) -> tuple[bool, str]:
        problem = _toolchain_problem()
        if problem is not None:
            return False, problem
        return True, "ok (compiles at first use, minutes)"

    def supports(self, problem: ExpertsProblem) -> tuple[bool, str]:
        target = problem.target
        if target is None or target.vendor != "cuda" or not target.wgmma:
            where = target.describe() if target is not None else "no device target"
            return False, f"the extension is built for Hopper warpgroup MMA (wgmma, SM90); {where}"
        if problem.dtype != torch.bfloat16:
            return False, f"bfloat16 activations only, got {problem.dtype}"
        n, k = problem.intermediate_size, problem.hidden_size
        if n % ALIGN_NK or k % ALIGN_NK:
            return False, f"N and K must be multiples of {ALIGN_NK} (the tile and FP8 block), got N={n}, K={k}"
        if problem.has_w13_bias or problem.has_w2_bias:
            return False, "expert biases are not implemented"
        if problem.num_experts > MAX_EXPERTS:
            return False, f"num_experts={problem.num_experts} exceeds the alignment's {MAX_EXPERTS}"
        key = problem.quant.key()
        if key in HARDWARE_VERDICT:
            return False, HARDWARE_VERDICT[key]
        if key in FP8_SCHEMES and not target.fp8_mma:
            return False, f"{key} needs FP8 tensor-core MMA; {target.describe()}"
        return True, "ok"

    def prepare(self, args: ExpertsArgs, problem: ExpertsProblem) -> PreparedWeights | None:
        """fp8_channel's weight scales written once for the kernel (``weight_scales``); None for the other
        schemes, whose kernel scales are the stored ones or small enough to write per call."""
        if problem.quant.key() != "fp8_channel":
            return None
        return PreparedWeights(self.name, {"w13_sfb": weight_scales(args.w13), "w2_sfb": weight_scales(args.w2)})

    def apply(self, args: ExpertsArgs, problem: ExpertsProblem, out: torch.Tensor) -> None:
        cutlass_experts(args, problem, out, prepared=args.prepared)


BACKEND = CutlassBackend()
