"""Workloads and timing shared by ``moe bench``, the tuner and the benchmark scripts.

- :data:`PRESETS`: the benchmark shapes (``moe bench --preset``);
- random inputs the way shared benchmarks draw them: weights made in their dtype directly, fresh
  ``torch.randn`` router logits, softmax, top-k, renormalized (never balanced or hand-made ids);
- the roofline: copy bandwidth and matmul rates (bf16; on CUDA also FP8 and INT8) measured now, and the
  floor of a call, unquantized or with a quantization scheme's weight bytes and matmul rate;
- timing: :func:`time_fn` (``triton.testing.do_bench``'s median on CUDA, which flushes L2; wall clock on
  CPU) and :func:`graph_time` (CUDA-graph replays);
- torch's two bare grouped GEMMs on a routing (:func:`two_gemms`), the bound of any pipeline of two
  separate GEMMs, and where they are no bound (:func:`two_gemms_unavailable`).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .activations import apply_activation
from .config import ActivationSpec
from .contract import ExpertsProblem
from .quant import QuantConfig, QuantizedWeight, named, quantize
from .quant.calibration import calibrate_static_scales
from .quant.schemes import STORAGE_DTYPES
from .quant.weights import int4_scale_dtype, scale_dtypes, storage_shapes
from .target import current_target

__all__ = [
    "CALIBRATION_M",
    "PRESETS",
    "Ceilings",
    "Preset",
    "QuantizedWorkload",
    "TwoGemms",
    "copy_bandwidth",
    "dense_matmul_rate",
    "expert_weight_bytes",
    "floor_seconds",
    "fp8_matmul_rate",
    "graph_time",
    "int8_matmul_rate",
    "matmul_rate",
    "measure_ceilings",
    "preset",
    "quantize_workload",
    "random_biases",
    "random_tokens",
    "random_weights",
    "time_fn",
    "two_gemms",
    "two_gemms_unavailable",
]


@dataclass(frozen=True)
class Preset:
    """A benchmark shape: w13 [E, 2N, K], w2 [E, K, N], top-k of E."""

    name: str
    num_experts: int
    top_k: int
    hidden_size: int  # K
    intermediate_size: int  # N
    default_m: tuple[int, ...]
    activation: str = "silu"
    bias: bool = False  # per-expert biases on both projections (gpt-oss)

    def problem(self, device: torch.device | str, dtype: torch.dtype, m: int) -> ExpertsProblem:
        device = torch.device(device)
        return ExpertsProblem(device.type, dtype, m, self.num_experts, self.num_experts, self.hidden_size,
                              self.intermediate_size, self.top_k, ActivationSpec.parse(self.activation),
                              has_w13_bias=self.bias, has_w2_bias=self.bias, target=current_target(device))

    @property
    def parts(self) -> int:
        """2 for a gated activation (w13 holds gate rows, then up rows), 1 otherwise."""
        return 2 if ActivationSpec.parse(self.activation).gated else 1

    @property
    def w13_rows(self) -> int:
        return self.parts * self.intermediate_size

    def describe(self) -> str:
        return (f"E={self.num_experts} N={self.intermediate_size} K={self.hidden_size} top_k={self.top_k} "
                f"{self.activation}{' +bias' if self.bias else ''}")

    def weight_bytes(self, elt: int) -> int:
        """Bytes of all experts' weights at ``elt`` bytes an element."""
        return self.num_experts * expert_weight_bytes(self, elt)


_M = (1, 16, 64, 256, 1024, 4096, 16384)
PRESETS = {
    "default": Preset("default", 8, 2, 256, 384, (1, 16, 64)),
    "mixtral": Preset("mixtral", 8, 2, 4096, 14336, _M),
    "qwen3": Preset("qwen3", 128, 8, 2048, 768, _M),
    "dsv3": Preset("dsv3", 256, 8, 7168, 2048, _M),
    # held out: the heuristic was not developed on these
    "gptoss20b": Preset("gptoss20b", 32, 4, 2880, 2880, _M, activation="swigluoai", bias=True),
    "gptoss120b": Preset("gptoss120b", 128, 4, 2880, 2880, _M, activation="swigluoai", bias=True),
    "qwen2moe57b": Preset("qwen2moe57b", 64, 8, 3584, 2560, _M),
}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def random_weights(p: Preset, dtype: torch.dtype, device: torch.device | str,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random w13, w2 made in ``dtype`` directly (no full-size fp32 temporaries: dsv3 is 22 GB in bf16)."""
    k, n, e = p.hidden_size, p.intermediate_size, p.num_experts
    w13 = torch.randn(e, p.w13_rows, k, generator=gen, device=device, dtype=dtype).mul_(k**-0.5)
    w2 = torch.randn(e, k, n, generator=gen, device=device, dtype=dtype).mul_(n**-0.5)
    return w13, w2


def random_biases(p: Preset, dtype: torch.dtype, device: torch.device | str,
                  gen: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not p.bias:
        return None, None
    b13 = torch.randn(p.num_experts, p.w13_rows, generator=gen, device=device, dtype=dtype).mul_(0.1)
    b2 = torch.randn(p.num_experts, p.hidden_size, generator=gen, device=device, dtype=dtype).mul_(0.1)
    return b13, b2


def random_tokens(p: Preset, m: int, dtype: torch.dtype, device: torch.device | str,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states [m, K] and fresh random router logits [m, E] (fp32)."""
    x = torch.randn(m, p.hidden_size, generator=gen, device=device, dtype=dtype)
    logits = torch.randn(m, p.num_experts, generator=gen, device=device)
    return x, logits


CALIBRATION_M = 256  # tokens of the calibration batch that static activation scales come from


@dataclass(frozen=True, eq=False)
class QuantizedWorkload:
    """A run's quantized copy of its weights, made once: the scheme, both weights, static scales."""

    name: str
    config: QuantConfig
    w13: QuantizedWeight
    w2: QuantizedWeight
    a13_scale: torch.Tensor | None = None
    a2_scale: torch.Tensor | None = None

    @property
    def bytes_per_expert(self) -> int:
        return (self.w13.nbytes() + self.w2.nbytes()) // self.w13.num_experts


def quantize_workload(name: str, p: Preset, w13: torch.Tensor, w2: torch.Tensor, b13: torch.Tensor | None,
                      gen: torch.Generator) -> QuantizedWorkload:
    """Quantize a run's weights with the scheme ``name`` (expert by expert, on their device). Static
    activation scales are calibrated on :data:`CALIBRATION_M` random tokens drawn like the run's, each
    routed to its top-k logits (``moe.quant.calibration.calibrate_static_scales``)."""
    cfg = named(name)
    qw13, qw2 = quantize(w13, cfg.weights, parts=p.parts), quantize(w2, cfg.weights)
    if not cfg.static_activations:
        return QuantizedWorkload(name, cfg, qw13, qw2)
    x, logits = random_tokens(p, CALIBRATION_M, w13.dtype, w13.device, gen)
    ids = logits.topk(p.top_k, dim=-1).indices
    a13, a2 = calibrate_static_scales(x, w13, ids, cfg.activations, p.activation, w13_bias=b13)
    return QuantizedWorkload(name, cfg, qw13, qw2, a13, a2)


@dataclass
class Ceilings:
    """Measured now: copy bandwidth, the matmul rate in the run's dtype and, on CUDA, the FP8 rate
    (``torch._scaled_mm``, e4m3, per-tensor scales, bf16 output) and the INT8 rate (``torch._int_mm``);
    those two are None on CPU and where the device has no such matmul."""

    copy_gbps: float
    matmul_tflops: float
    device: str
    fp8_tflops: float | None = None
    int8_tops: float | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, reps: int = 5, rep_ms: int = 100) -> float:
    """Median seconds of ``fn``: triton's do_bench on CUDA (it flushes L2; ``rep_ms`` of repetitions),
    wall clock on CPU."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median") * 1e-3
        except ImportError:
            pass
    return statistics.median(wall_times(fn, device, reps))


def wall_times(fn: Callable[[], object], device: torch.device, reps: int = 5) -> list[float]:
    """Seconds of each of ``reps`` calls after a warm-up (2 when a call takes over a second)."""
    t0 = time.perf_counter()
    fn()
    _sync(device)
    if time.perf_counter() - t0 > 1.0:  # slow paths (the interpreter): a few runs are enough
        reps = 2
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def graph_time(fn: Callable[[], object], device: torch.device, rep_ms: int = 100) -> float:
    """Median seconds of one replay of ``fn`` captured in a CUDA graph (warmed up outside the capture)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()  # warm up (compiles kernels) outside the capture
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_fn(graph.replay, device, rep_ms=rep_ms)


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> Ceilings:
    """Copy bandwidth (read + write), dense matmul rate and, on CUDA, the FP8 and INT8 matmul rates,
    measured now on ``device`` (one after another: each frees its tensors before the next)."""
    n = 8192 if device.type == "cuda" else 1024
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    ceil = Ceilings(copy_bandwidth(device), dense_matmul_rate(device, dtype, n), name)
    if device.type == "cuda":
        ceil.fp8_tflops, ceil.int8_tops = fp8_matmul_rate(device, n), int8_matmul_rate(device, n)
    return ceil


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of read + write copying 2 GiB (CUDA) or 256 MiB (CPU)."""
    nbytes = 2 * 2**30 if device.type == "cuda" else 2**28
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).uniform_()
    dst = torch.empty_like(src)
    return 2 * nbytes / time_fn(lambda: dst.copy_(src), device) / 1e9


def dense_matmul_rate(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """TFLOP/s of an n^3 matmul of random ``dtype`` data."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / time_fn(lambda: a @ b, device) / 1e12


def fp8_matmul_rate(device: torch.device, n: int = 8192) -> float | None:
    """TFLOP/s of ``torch._scaled_mm`` on n^3 e4m3 with per-tensor scales and bf16 output; None where the
    device has no FP8 matmul."""
    try:
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16).to(torch.float8_e4m3fn).t()  # column-major
        one = torch.ones((), device=device, dtype=torch.float32)

        def mm() -> torch.Tensor:
            return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

        mm()
    except (RuntimeError, TypeError, AttributeError):  # no FP8 matmul here (e.g. before sm_89)
        return None
    return 2 * n**3 / time_fn(mm, device) / 1e12


def int8_matmul_rate(device: torch.device, n: int = 8192) -> float | None:
    """TOP/s of ``torch._int_mm`` on n^3 int8 (int32 output), the second operand column-major (the layout
    of a weight [N, K] used as its transpose: cuBLASLt's int8 tensor-core path; row-major measured 128 TOP/s
    on an H200, below what our int8 kernels reach); None where the device has no INT8 matmul."""
    try:
        a = torch.randint(-128, 128, (n, n), device=device, dtype=torch.int8)
        b = torch.randint(-128, 128, (n, n), device=device, dtype=torch.int8).t()
        torch._int_mm(a, b)
    except (RuntimeError, TypeError, AttributeError):
        return None
    return 2 * n**3 / time_fn(lambda: torch._int_mm(a, b), device) / 1e12


_FLOAT_OF_SIZE = {2: torch.bfloat16, 4: torch.float32}  # an activation dtype of each size (int4 scales)


def expert_weight_bytes(p: Preset, elt: int, quant: QuantConfig | str | None = None) -> int:
    """Bytes of one expert's w13 and w2 as stored: ``elt`` bytes an element unquantized; with a quantized
    scheme (a ``QuantConfig`` or a name of ``moe.quant.NAMES``), its data (1 byte an element for fp8 and
    int8, half a byte for the 4-bit formats) plus its scales (fp32; int4's in the activation dtype, 2-byte
    ``elt`` -> 2 bytes; one byte each for e8m0 and e4m3), zero points (1 byte) and global scales (fp32):
    what ``(qw13.nbytes() + qw2.nbytes()) / num_experts`` counts. A group size that does not divide K or N
    is an error naming both."""
    k, n, rows = p.hidden_size, p.intermediate_size, p.w13_rows
    scheme = QuantConfig.parse(quant).weights
    if scheme is None:
        return (rows * k + k * n) * elt
    scale_elt = (int4_scale_dtype(_FLOAT_OF_SIZE.get(elt, torch.float32)) if scheme.format == "int4"
                 else scale_dtypes(scheme)[0]).itemsize
    total = 0
    for shapes in (storage_shapes(scheme, 1, rows, k, p.parts), storage_shapes(scheme, 1, k, n, 1)):
        data = elt if scheme.format == "scaled" else STORAGE_DTYPES[scheme.format].itemsize
        elts = {"data": data, "scale": scale_elt, "zero": 1, "global_scale": 4}
        total += sum(math.prod(shape) * elts[name] for name, shape in shapes.items() if shape is not None)
    return total


def matmul_rate(ceil: Ceilings, quant: QuantConfig | str | None = None) -> float | None:
    """The matmul rate (TFLOP/s) bounding a scheme's GEMMs: the FP8 rate for fp8 activations, the INT8
    rate for int8 ones (None where not measured: CPU, or no such matmul); otherwise (unquantized or
    weight-only) the rate in the run's dtype."""
    act = QuantConfig.parse(quant).activations
    if act is None:
        return ceil.matmul_tflops
    return ceil.fp8_tflops if act.format == "fp8" else ceil.int8_tops


def floor_seconds(p: Preset, m: int, experts_hit: int, elt: int, ceil: Ceilings,
                  weight_bytes_per_expert: int | None = None, rate: float | None = None) -> float:
    """The roofline floor of one call: max(bytes / bandwidth, flops / matmul rate), with bytes = the
    weights of the experts hit (``weight_bytes_per_expert`` each, e.g. :func:`expert_weight_bytes` of a
    scheme; default: unquantized at ``elt``) + the input and output rows at ``elt``, and the rate
    ``rate`` TFLOP/s (e.g. :func:`matmul_rate`; default: ``ceil.matmul_tflops``)."""
    k, n, rows = p.hidden_size, p.intermediate_size, p.w13_rows
    per_expert = weight_bytes_per_expert if weight_bytes_per_expert is not None else expert_weight_bytes(p, elt)
    nbytes = experts_hit * per_expert + 2 * m * k * elt
    flops = 2 * m * p.top_k * k * rows + 2 * m * p.top_k * n * k
    return max(nbytes / (ceil.copy_gbps * 1e9), flops / ((rate or ceil.matmul_tflops) * 1e12))


# ------------------------------------------------------------------ torch's two bare grouped GEMMs
def two_gemms_unavailable(device: torch.device) -> str | None:
    """Why torch's two bare grouped GEMMs are no bound on ``device``, or None: ``torch._grouped_mm`` has
    grouped GEMM kernels for Hopper (wgmma) and Blackwell (tcgen05); on CPU it is a loop over the
    experts."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm (torch >= 2.8 has it)"
    if device.type != "cuda":
        return (f"on {device.type} torch._grouped_mm is a loop over the experts, not a grouped GEMM kernel; the "
                "row bounds a pipeline on Hopper or Blackwell GPUs only")
    target = current_target(device)
    if not (target.wgmma or target.tcgen05):
        return (f"{target.describe()}: torch._grouped_mm has grouped GEMM kernels for Hopper (wgmma) and "
                "Blackwell (tcgen05) only")
    return None


@dataclass(frozen=True, eq=False)
class TwoGemms:
    """Torch's two grouped GEMMs on one routing, rows pre-permuted by expert and unpadded: GEMM1
    ``rows`` [P, K] x w13 -> [P, 2N] (or [P, N]), GEMM2 ``act`` [P, N] (GEMM1's output of these rows with its
    bias, activated) x w2 -> [P, K]. :meth:`call` runs the two GEMMs alone; :meth:`output` adds the rest
    (biases, weights, the sum over k) for the check."""

    rows: torch.Tensor  # [P, K] the hidden rows of the pairs, grouped by expert
    act: torch.Tensor  # [P, N] GEMM2's input
    offs: torch.Tensor  # [E] int32 end row of each expert's group
    w13t: torch.Tensor  # [E, K, 2N] (a transposed view)
    w2t: torch.Tensor  # [E, N, K]
    token: torch.Tensor  # [P] int64 token of each row
    weight: torch.Tensor  # [P] fp32 routing weight of each row
    expert: torch.Tensor  # [P] int64 expert of each row
    b2: torch.Tensor | None = None  # [E, K]

    def call(self) -> torch.Tensor:
        """The two GEMMs alone (what the bench times); returns GEMM2's [P, K]."""
        torch._grouped_mm(self.rows, self.w13t, offs=self.offs)
        return torch._grouped_mm(self.act, self.w2t, offs=self.offs)

    def output(self, num_tokens: int) -> torch.Tensor:
        """[T, K] fp32: GEMM2's rows plus w2's bias, weighted, summed into their tokens."""
        y = self.call().float()
        if self.b2 is not None:
            y = y + self.b2.float().index_select(0, self.expert)
        out = torch.zeros(num_tokens, y.shape[1], dtype=torch.float32, device=y.device)
        return out.index_add_(0, self.token, y * self.weight.unsqueeze(1))


def two_gemms(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
              activation: str | ActivationSpec = "silu", b13: torch.Tensor | None = None,
              b2: torch.Tensor | None = None) -> TwoGemms:
    """The inputs of torch's two grouped GEMMs for the routing ``weights``/``ids`` [T, k] of ``x`` [T, K]
    (weights w13 [E, 2N, K], w2 [E, K, N], unquantized): the pairs sorted by expert (stable), GEMM1 run once
    to make GEMM2's activated input. Reads the routing on the host: made outside any timing."""
    k = ids.shape[1]
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)  # [P] pair of each row
    counts = torch.bincount(flat, minlength=w13.shape[0])
    rows = x.index_select(0, order // k)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    w13t, w2t = w13.transpose(1, 2), w2.transpose(1, 2)
    expert = flat.index_select(0, order)
    h = torch._grouped_mm(rows, w13t, offs=offs).float()
    if b13 is not None:
        h = h + b13.float().index_select(0, expert)
    act = apply_activation(h, ActivationSpec.parse(activation)).to(x.dtype)
    return TwoGemms(rows, act, offs, w13t, w2t, order // k, weights.reshape(-1).float().index_select(0, order),
                    expert, b2)
