"""``moe bench``: every usable backend on a workload, timed against the roofline floor and checked
against the reference.

Method (docs/performance.md): fresh random logits -> softmax -> top-k -> renormalize; experts hit are
counted from the ids for the floor; ``fused_experts`` is timed from weights and routing ids with
alignment and allocation inside; a ``FusedMoE.forward`` row times the layer from router logits; on
CUDA small batches are also timed as CUDA-graph replays; both ceilings (copy bandwidth, matmul rate)
are measured in the same run. The reference upcasts one expert at a time.

Each row reports the median of its timed calls with their min and max; a row whose spread
(max - min) / median exceeds :data:`WIDE_SPREAD` says so. On CPU the "floor" comes from ceilings measured
on a large copy and a 1024-square matmul, while small presets run from cache: it is no bound (rows land
above 100%), so CPU rows leave ``pct_floor`` None and the table prints "-".

With ``--quant NAME`` (a quantization scheme of ``moe.quant.NAMES``, or several separated by commas: one
run, the unquantized rows measured once for all) the same random weights are also quantized once
(``moe.quant.quantize``, expert by expert, on the device); each backend that declares the
scheme gets quantized rows beside its unquantized rows of the same mode, tokens and routing, with the
speed-up ``vs_bf16`` (unquantized median / quantized median). Quantized rows are checked against the
torch reference on the quantized weights (W8A8: both GEMM inputs quantized as the kernels do); their
floor counts the quantized weight bytes (data + scales) and the FP8 or INT8 matmul rate measured now.
``fp8_tensor_static`` takes its static scales from a calibration batch
(``moe.quant.calibration.calibrate_static_scales``). No kernels or layer rows under ``--quant``.

Requests are checked before anything is allocated (:func:`resolve_request`, :func:`check_memory`, and
for the CLI :func:`check_output_path` and :func:`check_plot_available`); a bad one raises
:class:`BenchError` naming the flag.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from .backends.torch_ref import torch_ref_experts
from .contract import ExpertsArgs, ExpertsProblem, gemm1_rounding
from .functional import PreparedCache, fused_experts
from .layer import FusedMoE
from .quant import NAMES, named
from .quant.schemes import FORMAT_MAX
from .registry import BackendUnavailableError, get_backend, list_backends, select_backend
from .routing import fused_topk
from .testing import arithmetic_reference, rel_error
from .workload import (
    CALIBRATION_M,
    PRESETS,
    Ceilings,
    Preset,
    QuantizedWorkload,
    expert_weight_bytes,
    floor_seconds,
    graph_time,  # noqa: F401  (imported from here by the scripts under benchmarks/)
    matmul_rate,
    measure_ceilings,
    quantize_workload,
    random_biases,
    random_tokens,
    random_weights,
    time_fn,  # noqa: F401  (the same)
    two_gemms,
    two_gemms_unavailable,
    wall_times,
)

__all__ = ["CALIBRATION_M", "GRAPH_MAX_M", "KERNELS_MAX_M", "TWO_GEMMS", "TWO_GEMMS_ROW", "WIDE_SPREAD", "BenchError",
           "BenchRequest", "Row",
           "bench_info", "check_memory", "check_output_path", "check_plot_available",
           "estimate_bytes", "format_table", "plot", "resolve_request", "run_bench", "run_request", "write_json"]

GRAPH_MAX_M = 256
KERNELS_MAX_M = 1024  # "kernels" rows (routing aligned beforehand) up to here, as docs/performance.md times vLLM
REFERENCE_TIMING_MAX_PAIRS = 8192  # the per-expert reference is an oracle, not a contender
WIDE_SPREAD = 0.1  # (max - min) / median above this: the row's median is not to be trusted to 10%
TWO_GEMMS = "torch._grouped_mm"  # the backend column of the "gemms" row
TWO_GEMMS_ROW = ("torch._grouped_mm twice on the same routing (GEMM1 [T*k, K] x w13, GEMM2 of the activated rows "
                 "x w2), rows pre-permuted by expert, no padding; permutation, activation and combine not timed: "
                 "the lower bound for two separate GEMMs (a fused pipeline may beat it: it writes half the "
                 "intermediate)")
GB = 1e9


class BenchError(ValueError):
    """A bench request that cannot run: the message names the flag, the value and the fix."""


@dataclass
class Row:
    preset: str
    m: int
    backend: str
    mode: str  # eager | graph | kernels | layer | gemms (torch's two bare grouped GEMMs: TWO_GEMMS)
    time_us: float | None  # median
    floor_us: float
    pct_floor: float | None  # None on CPU, where the floor is no bound
    rel_err: float | None
    note: str = ""
    extra: dict = field(default_factory=dict)
    min_us: float | None = None
    max_us: float | None = None
    quant: str = "none"  # the quantization scheme of the row's call (a name of moe.quant.NAMES), or "none"
    vs_bf16: float | None = None  # quantized rows: median of the unquantized row of the same mode / this median

    @property
    def spread(self) -> float | None:
        """(max - min) / median of the timed calls."""
        if self.time_us is None or self.min_us is None or self.max_us is None or self.time_us <= 0:
            return None
        return (self.max_us - self.min_us) / self.time_us


@dataclass(frozen=True)
class BenchRequest:
    """A checked request: the preset, token counts, device, dtype and backend names to run."""

    preset: Preset
    ms: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype
    backends: tuple[str, ...]
    quant: tuple[str, ...] = ()  # names of moe.quant.NAMES; empty: unquantized only


# ---------------------------------------------------------------- checks (before any allocation)


def resolve_request(
    preset: str = "default",
    ms: tuple[int, ...] | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    backends: tuple[str, ...] | None = None,
    quant: str | tuple[str, ...] | None = None,
) -> BenchRequest:
    """Check and complete a request; raises :class:`BenchError` naming the flag at fault. ``quant``: a
    name of ``moe.quant.NAMES``, several (a tuple or comma-separated), or None."""
    if preset not in PRESETS:
        raise BenchError(f"--preset: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    dev = _resolve_device(device)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    ms = tuple(ms) if ms else p.default_m
    if any(m < 1 for m in ms):
        raise BenchError(f"--m: token counts must be >= 1, got {','.join(map(str, ms))}")
    names = _resolve_backends(backends)
    return BenchRequest(p, ms, dev, dtype, names, _resolve_quant(quant, p))


def _resolve_quant(quant: str | tuple[str, ...] | None, p: Preset | None = None) -> tuple[str, ...]:
    names = tuple(quant.split(",")) if isinstance(quant, str) else tuple(quant or ())
    names = tuple(n for n in names if n != "none")
    for n in names:
        if n not in NAMES:
            raise BenchError(f"--quant: unknown quantization scheme {n!r}; allowed: {', '.join(NAMES)} "
                             "(or none), one or several separated by commas")
        if p is not None:
            try:
                expert_weight_bytes(p, 2, n)  # a group size must divide K and N
            except ValueError as exc:
                raise BenchError(f"--quant {n} with --preset {p.name}: {exc}") from None
    if len(set(names)) != len(names):
        raise BenchError(f"--quant: {','.join(names)} names a scheme twice")
    return names


def _resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cuda", "cpu"):
        raise BenchError(f"--device: got {device!r}; allowed: cuda (or cuda:N) and cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__}); "
                         "use --device cpu or leave --device out")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BenchError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _resolve_backends(backends: tuple[str, ...] | None) -> tuple[str, ...]:
    registered = [b.name for b in list_backends()]
    if backends is None:
        return tuple(registered)
    for name in backends:
        if name == "auto":  # rows "auto->chosen": what a call that names no backend runs
            continue
        try:
            get_backend(name)
        except ValueError:
            raise BenchError(f"--backends: unknown backend {name!r}; registered: {', '.join(registered)} "
                             "or auto (comma-separated, e.g. --backends torch,triton)") from None
    return tuple(backends)


def check_output_path(flag: str, path: str) -> None:
    """The file's folder must exist and be writable, and the path must not be a folder."""
    p = Path(path).expanduser()
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise BenchError(f"{flag} {path}: is a folder; give a file path such as {p / 'results.json'}")
    if not parent.is_dir():
        raise BenchError(f"{flag} {path}: the folder {parent} does not exist; create it or give another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BenchError(f"{flag} {path}: the folder {parent} is not writable; give another path")


def check_plot_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError("--plot needs matplotlib, which is not installed: pip install 'moe-layer[plot]'") from None


def estimate_bytes(p: Preset, ms: tuple[int, ...], dtype: torch.dtype, device_type: str,
                   quant: str | tuple[str, ...] | None = None) -> tuple[int, int]:
    """(bytes of the experts' weights, an allowance for everything else) for a run: the ceiling
    measurement, the tokens, the fp32 reference (one expert upcast at a time, at worst every token on it)
    and a backend's workspace at the largest M, sized as fp32 intermediates of every (token, expert) pair.
    With ``quant`` (one name or several) the weights include each quantized copy (data + scales) and the
    allowance the quantizing and W8A8 reference temporaries (a few fp32 copies of one expert, the GEMM2
    inputs of every pair) and the second reference."""
    elt = torch.empty((), dtype=dtype).element_size()
    k, n, e, top_k, rows = p.hidden_size, p.intermediate_size, p.num_experts, p.top_k, p.w13_rows
    weights = p.weight_bytes(elt) + (e * (rows + k) * elt if p.bias else 0)
    m = max(ms)
    copy = 2 * 2**31 if device_type == "cuda" else 2 * 2**28  # what measure_ceilings copies
    square = 8192 if device_type == "cuda" else 1024
    ceilings = copy + 3 * square * square * max(elt, 2)  # bf16 / fp8 (+ bf16 out) / int8 (+ int32 out): one at a time
    tokens = m * (2 * k * elt + e * 4 + top_k * 12)
    reference = 2 * m * k * 4 + (rows + n) * k * 4 + m * (rows + n) * 4
    workspace = m * top_k * (rows + n + k) * 4
    names = _resolve_quant(quant)
    if not names:
        return weights, ceilings + tokens + reference + workspace
    copy_q = sum(e * expert_weight_bytes(p, elt, name) for name in names)
    temporaries = 4 * max(rows * k, k * n) * 4 + m * top_k * n * 4 + m * k * 4 + CALIBRATION_M * (k + rows) * 4
    return weights + copy_q, ceilings + tokens + reference + workspace + temporaries


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device``: MemAvailable on CPU, ``mem_get_info`` on CUDA; None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None  # not Linux, or unreadable: skip the check


def check_memory(req: BenchRequest) -> None:
    """Refuse a run that would not fit, with the numbers, before allocating its weights."""
    avail = available_bytes(req.device)
    if avail is None:
        return
    weights, other = estimate_bytes(req.preset, req.ms, req.dtype, req.device.type, req.quant)
    if weights + other <= avail:
        return
    smaller = [n for n, q in PRESETS.items() if n != req.preset.name and
               sum(estimate_bytes(q, q.default_m, req.dtype, req.device.type, req.quant)) <= avail]
    hint = f"--preset {'default' if 'default' in smaller else smaller[0]}" if smaller else "a machine with more memory"
    copy = f" and their {','.join(req.quant)} {'copy' if len(req.quant) == 1 else 'copies'}" if req.quant else ""
    raise BenchError(
        f"--preset {req.preset.name}: needs about {(weights + other) / GB:.1f} GB on {req.device} "
        f"({weights / GB:.1f} GB of expert weights in {_dtype_name(req.dtype)}{copy} + {other / GB:.1f} GB for the "
        f"ceilings, reference and workspaces at M={max(req.ms)}) but {avail / GB:.1f} GB is available; "
        f"use a smaller preset (e.g. {hint}; fitting here: {', '.join(smaller) or 'none'})")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bench_info(req: BenchRequest) -> dict:
    """What a result needs to be read later: the shape, dtype, device, versions and the time."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    from . import __version__

    p = req.preset
    return {
        "preset": p.name,
        "shape": {"E": p.num_experts, "N": p.intermediate_size, "K": p.hidden_size, "top_k": p.top_k,
                  "activation": p.activation, "bias": p.bias},
        "dtype": _dtype_name(req.dtype),
        "device": str(req.device),
        "versions": {"torch": torch.__version__, "triton": triton_version, "moe": __version__},
        "time": datetime.now().astimezone().isoformat(timespec="seconds"),
        "floor_is_bound": req.device.type != "cpu",
        "quant": [_quant_info(req, name) for name in req.quant],
        "two_gemms": {"backend": TWO_GEMMS, "mode": "gemms", "what": TWO_GEMMS_ROW,
                      "skipped": (two_gemms_unavailable(req.device) if not req.quant
                                  else "not under --quant (unquantized GEMMs)")},
    }


def _quant_info(req: BenchRequest, name: str) -> dict:
    """A scheme of a ``--quant`` run and how its rows are measured."""
    cfg, p = named(name), req.preset
    elt = torch.empty((), dtype=req.dtype).element_size()
    info = {
        "name": name,
        "scheme": cfg.model_dump(mode="json", exclude_none=True),
        "weight_bytes_per_expert": expert_weight_bytes(p, elt, cfg),
        "unquantized_bytes_per_expert": expert_weight_bytes(p, elt),
        "matmul_rate": ("matmul_tflops" if cfg.activations is None  # weight-only: dots in the activation dtype
                        else "fp8_tflops" if cfg.activations.format == "fp8" else "int8_tops"),
        "rel_err": "against the torch reference on the quantized weights" + (
            " (weights dequantized, activations unquantized)" if cfg.activations is None
            else " (both GEMM inputs quantized)"),
        "quant_err": "rel err of that reference against the unquantized fp32 reference (row extra)",
        "vs_bf16": f"median of the {_dtype_name(req.dtype)} row of the same backend and mode, same tokens and "
                   "routing / median of the quantized row",
    }
    if cfg.static_activations:
        top = FORMAT_MAX[cfg.activations.format]
        info["calibration"] = {
            "tokens": CALIBRATION_M,
            "method": f"per-tensor scales from {CALIBRATION_M} random tokens drawn and routed like the run's: "
                      f"a13 = amax|x| / {top:g}; a2 = amax of GEMM2's input (the unquantized GEMM1 output with its "
                      f"bias, after the activation, max over the experts hit) / {top:g}; values in each row's extra",
        }
    return info


# ---------------------------------------------------------------- running


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled, self.t0 = total, 0, enabled, time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        if self.enabled:
            el = time.perf_counter() - self.t0
            print(f"\r[{self.done}/{self.total}] {el:6.1f}s {what:<48}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def run_bench(
    preset: str = "default",
    ms: tuple[int, ...] | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    backends: tuple[str, ...] | None = None,
    progress: bool = True,
    quant: str | None = None,
) -> tuple[Ceilings, list[Row]]:
    """Check the request (raising :class:`BenchError`), then run it."""
    req = resolve_request(preset, ms, device, dtype, backends, quant)
    check_memory(req)
    return run_request(req, progress)


@dataclass(frozen=True, eq=False)
class _Case:
    """One kind of call to time at one M: its tensors, problem, reference output, floor and scheme; ``extra``
    is copied onto its rows."""

    args: ExpertsArgs
    problem: ExpertsProblem
    ref: torch.Tensor
    floor: float
    quant: str = "none"
    extra: dict = field(default_factory=dict)


def _quantized_case(q: QuantizedWorkload, p: Preset, base: _Case, hit: int, ceil: Ceilings) -> _Case:
    """The quantized call on ``base``'s tokens and routing, with its W8A8 reference and floor."""
    args = dataclasses.replace(base.args, w13=q.w13, w2=q.w2, a13_scale=q.a13_scale, a2_scale=q.a2_scale)
    problem = dataclasses.replace(base.problem, quant=q.config)
    ref = torch_ref_experts(args, problem, compute_dtype=torch.float32)
    x = args.hidden_states
    floor = floor_seconds(p, x.shape[0], hit, x.element_size(), ceil, q.bytes_per_expert, matmul_rate(ceil, q.config))
    extra = {"quant_err": rel_error(ref, base.ref)}
    if q.a13_scale is not None and q.a2_scale is not None:
        extra |= {"a13_scale": q.a13_scale.item(), "a2_scale": q.a2_scale.item()}
    return _Case(args, problem, ref, floor, q.name, extra)


def run_request(req: BenchRequest, progress: bool = True) -> tuple[Ceilings, list[Row]]:
    p, dev, dtype = req.preset, req.device, req.dtype
    ceil = measure_ceilings(dev, dtype)
    gen = torch.Generator(device=dev).manual_seed(0)
    bar = _Progress(len(req.ms) * (len(req.backends) + (0 if req.quant else 2)), progress)
    rows: list[Row] = []
    w13, w2 = random_weights(p, dtype, dev, gen)
    b13, b2 = random_biases(p, dtype, dev, gen)
    quantized = [quantize_workload(name, p, w13, w2, b13, gen) for name in req.quant]
    for m in req.ms:
        x, logits = random_tokens(p, m, dtype, dev, gen)
        weights, ids = fused_topk(logits, p.top_k)
        hit = int(torch.unique(ids).numel())
        args = ExpertsArgs(x, w13, w2, weights, ids, b13, b2)
        problem = p.problem(dev, dtype, m)
        base = _Case(args, problem, torch_ref_experts(args, problem, compute_dtype=torch.float32),
                     floor_seconds(p, m, hit, x.element_size(), ceil))
        qcases = [_quantized_case(q, p, base, hit, ceil) for q in quantized]
        for name in req.backends:
            bar.step(f"{p.name} M={m} {name} {','.join(req.quant)}".rstrip())
            rows.extend(_bench_quantized(name, p, m, base, qcases, dev) if qcases
                        else _bench_backend(name, p, m, base, dev))
        if not qcases:
            bar.step(f"{p.name} M={m} {TWO_GEMMS} x2")
            rows.append(_bench_two_gemms(p, m, args, base.ref, base.floor, dev))
            bar.step(f"{p.name} M={m} FusedMoE.forward")
            rows.append(_bench_layer(p, m, args, logits, base.ref, base.floor, dev))
        del x, base, qcases
    bar.close()
    return ceil, rows


def _call_times(fn: Callable[[], object], dev: torch.device) -> list[float]:
    """Seconds of each timed call: do_bench's samples on CUDA (it flushes L2), wall clock on CPU."""
    if dev.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            pass
        else:
            return [t * 1e-3 for t in do_bench(fn, warmup=25, rep=100, return_mode="all")]
    return wall_times(fn, dev)


def _graph_times(fn: Callable[[], object], dev: torch.device) -> list[float]:
    """Seconds of each replay of ``fn`` captured in a CUDA graph (warmed up outside the capture)."""
    stream = torch.cuda.Stream(dev)
    stream.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(stream):
        fn()  # compiles kernels outside the capture
    torch.cuda.current_stream(dev).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _call_times(graph.replay, dev)


def timed_row(p: Preset, m: int, backend: str, mode: str, times: list[float], floor: float,
              err: float | None, dev: torch.device, note: str = "", quant: str = "none") -> Row:
    """A row from per-call seconds: median, min and max; no % of floor on CPU; a wide spread noted."""
    med, lo, hi = statistics.median(times), min(times), max(times)
    pct = None if dev.type == "cpu" else 100 * floor / med
    row = Row(p.name, m, backend, mode, med * 1e6, floor * 1e6, pct, err, note, min_us=lo * 1e6, max_us=hi * 1e6,
              quant=quant)
    spread = row.spread
    if spread is not None and spread > WIDE_SPREAD:
        row.note = _joined(row.note, f"wide spread: (max-min)/median = {spread:.0%}")
    return row


def _joined(*notes: str) -> str:
    return "; ".join(filter(None, notes))


def _skipped(p: Preset, m: int, name: str, mode: str, floor: float, note: str, err: float | None = None,
             quant: str = "none") -> Row:
    return Row(p.name, m, name, mode, None, floor * 1e6, None, err, note, quant=quant)


def _caller(p: Preset, case: _Case, name: str) -> Callable[[], torch.Tensor]:
    a, quant = case.args, None if case.quant == "none" else case.quant
    cache = PreparedCache()  # the backend's arrangement of these weights, made at the first call as a layer does

    def call() -> torch.Tensor:
        return fused_experts(a.hidden_states, a.w13, a.w2, a.topk_weights, a.topk_ids, activation=p.activation,
                             w13_bias=a.w13_bias, w2_bias=a.w2_bias, quant=quant, a13_scale=a.a13_scale,
                             a2_scale=a.a2_scale, backend=name, prepared=cache)

    return call


def _bench_backend(name: str, p: Preset, m: int, case: _Case, dev: torch.device, kernels: bool = True) -> list[Row]:
    """The backend's eager row, its graph row (CUDA, M <= GRAPH_MAX_M) and, for triton, its kernels row."""
    q = case.quant
    try:
        chosen = select_backend(case.problem, name).chosen
    except BackendUnavailableError as err:
        return [_skipped(p, m, name, "eager", case.floor, f"skipped: {err}", quant=q)]
    label = f"auto->{chosen}" if name == "auto" else name
    if chosen == "torch" and dev.type == "cuda" and m * p.top_k > REFERENCE_TIMING_MAX_PAIRS:
        return [_skipped(p, m, label, "eager", case.floor, "reference: not timed at this size", quant=q)]
    call = _caller(p, case, name)
    err = rel_error(call(), _reference(case, chosen))
    rows = [timed_row(p, m, label, "eager", _call_times(call, dev), case.floor, err, dev, quant=q)]
    if dev.type == "cuda" and m <= GRAPH_MAX_M and chosen != "torch":
        try:
            rows.append(timed_row(p, m, label, "graph", _graph_times(call, dev), case.floor, err, dev, quant=q))
        except Exception as exc:  # a backend that cannot be captured says so in the table
            rows.append(_skipped(p, m, label, "graph", case.floor, f"not capturable: {exc}", err, quant=q))
    if kernels and name == "triton" and dev.type == "cuda" and m <= KERNELS_MAX_M:
        rows.append(_bench_triton_kernels(p, m, case.args, case.problem, case.ref, case.floor, dev))
    return rows


def _reference(case: _Case, backend: str) -> torch.Tensor:
    """The case's reference, or under a W8A8 scheme for a backend that rounds GEMM1's output, the reference
    of its arithmetic (``moe.testing.arithmetic_reference``; the rel err column)."""
    if gemm1_rounding(get_backend(backend), case.problem) is None:
        return case.ref
    return arithmetic_reference(backend, case.args, case.problem)


def _bench_quantized(name: str, p: Preset, m: int, base: _Case, qcases: list[_Case],
                     dev: torch.device) -> list[Row]:
    """A backend's unquantized rows and, for each scheme it declares, its quantized rows of the same modes:
    each quantized row after the unquantized row of its mode, carrying ``vs_bf16``; a scheme it does not
    run: one skipped row."""
    usable, skipped = [], []
    for qcase in qcases:
        try:
            select_backend(qcase.problem, name)
            usable.append(qcase)
        except BackendUnavailableError as err:
            skipped.append(_with_extra(_skipped(p, m, name, "eager", qcase.floor, f"skipped: {err}",
                                                quant=qcase.quant), qcase.extra))
    if not usable:
        return skipped
    plain = _bench_backend(name, p, m, base, dev, kernels=False)
    by_mode: dict[str, list[Row]] = {r.mode: [] for r in plain}
    for qcase in usable:
        for q in _bench_backend(name, p, m, qcase, dev, kernels=False):
            _with_extra(q, qcase.extra)
            if name == "torch":
                q.note = _joined(f"quantization error vs unquantized {qcase.extra['quant_err']:.2e}", q.note)
            b = next((r for r in plain if r.mode == q.mode), None)
            if b is not None and b.time_us and q.time_us:
                q.vs_bf16 = b.time_us / q.time_us
            by_mode.setdefault(q.mode, []).append(q)
    rows = [r for b in plain for r in (b, *by_mode.pop(b.mode))]
    return rows + [q for qs in by_mode.values() for q in qs] + skipped


def _with_extra(row: Row, extra: dict) -> Row:
    row.extra.update(extra)
    return row


def _bench_triton_kernels(p: Preset, m: int, args: ExpertsArgs, problem: ExpertsProblem, ref: torch.Tensor,
                          floor: float, dev: torch.device) -> Row:
    """The Triton kernels alone, eager, with the routing aligned beforehand: how docs/performance.md times
    vLLM's Triton kernel up to 1024 tokens (mode "kernels")."""
    from .backends.triton import choose_config, prepared_scales, triton_experts
    from .kernels.align import align

    args = dataclasses.replace(args, prepared=prepared_scales(args, problem))  # as the layer's, made once
    cfg = choose_config(problem, dev)
    al = align(args.topk_ids, problem.num_experts, cfg.block_m, args.expert_map) if m > 1 else None
    out = torch.empty_like(args.hidden_states)

    def call() -> torch.Tensor:
        return triton_experts(args, problem, out, cfg, alignment=al)

    call()
    err = rel_error(out, ref)
    return timed_row(p, m, "triton", "kernels", _call_times(call, dev), floor, err, dev)


def _bench_two_gemms(p: Preset, m: int, args: ExpertsArgs, ref: torch.Tensor, floor: float,
                     dev: torch.device) -> Row:
    """Torch's two bare grouped GEMMs on the run's routing (mode "gemms", :data:`TWO_GEMMS_ROW`); skipped
    with the reason where they bound nothing (``moe.workload.two_gemms_unavailable``)."""
    why = two_gemms_unavailable(dev)
    if why is not None:
        return _skipped(p, m, TWO_GEMMS, "gemms", floor, f"skipped: {why}")
    g = two_gemms(args.hidden_states, args.w13, args.w2, args.topk_weights, args.topk_ids, p.activation,
                  args.w13_bias, args.w2_bias)
    err = rel_error(g.output(m), ref)
    row = timed_row(p, m, TWO_GEMMS, "gemms", _call_times(g.call, dev), floor, err, dev,
                    note="lower bound for two separate GEMMs")
    del g
    return row


def _bench_layer(p: Preset, m: int, args: ExpertsArgs, logits: torch.Tensor, ref: torch.Tensor, floor: float,
                 dev: torch.device) -> Row:
    x = args.hidden_states
    layer = FusedMoE(p.num_experts, p.top_k, p.hidden_size, p.intermediate_size, gate=False,
                     activation=p.activation, bias=p.bias, params_dtype=x.dtype, device="meta")
    layer.w13_weight = torch.nn.Parameter(args.w13, requires_grad=False)
    layer.w2_weight = torch.nn.Parameter(args.w2, requires_grad=False)
    if p.bias:
        layer.w13_bias = torch.nn.Parameter(args.w13_bias, requires_grad=False)
        layer.w2_bias = torch.nn.Parameter(args.w2_bias, requires_grad=False)
    with torch.no_grad():
        out = layer(x, logits)
        chosen = select_backend(p.problem(dev, x.dtype, m)).chosen
        times = _call_times(lambda: layer(x, logits), dev)
    return timed_row(p, m, f"auto->{chosen}", "layer", times, floor, rel_error(out, ref), dev)


# ---------------------------------------------------------------- output


def _header(ceil: Ceilings, info: dict | None, rows: list[Row]) -> list[str]:
    lines = []
    if info is not None:
        s, v = info["shape"], info["versions"]
        lines.append(f"preset {info['preset']}: E={s['E']} N={s['N']} K={s['K']} top_k={s['top_k']} "
                     f"{s['activation']}{' +bias' if s['bias'] else ''}, {info['dtype']} on {info['device']}   "
                     f"torch {v['torch']}, triton {v['triton']}, moe {v['moe']}   {info['time']}")
    low = "".join(f", {label} {value:,.0f} {unit}" for label, value, unit in
                  (("fp8", ceil.fp8_tflops, "TFLOP/s"), ("int8", ceil.int8_tops, "TOP/s")) if value is not None)
    lines.append(f"device: {ceil.device}   ceilings (measured now): copy {ceil.copy_gbps:,.0f} GB/s, "
                 f"matmul {ceil.matmul_tflops:.4g} TFLOP/s{low}")
    if ceil.device == "cpu":
        lines.append("cpu: the roofline floor is not a bound here (its ceilings come from a large copy and a "
                     "1024-square matmul; small presets run from cache), so 'floor us' and '% floor' are left out")
    for q in (info or {}).get("quant") or ():
        lines += _quant_header(ceil, info, q, [r for r in rows if r.quant == q["name"]])
    lines.append(f"times: median of the timed calls, with min and max; a spread (max-min)/median over "
                 f"{WIDE_SPREAD:.0%} is noted")
    if any(r.mode == "gemms" for r in rows):
        lines.append(f"mode gemms: {TWO_GEMMS_ROW}")
    return lines


def _quant_header(ceil: Ceilings, info: dict, q: dict, rows: list[Row]) -> list[str]:
    w, a = q["scheme"]["weights"], q["scheme"].get("activations")  # no activations: weight-only
    block = "x".join(map(str, w.get("block") or ()))
    per = {"tensor": "tensor", "channel": "output channel", "block": f"block {block}", "token": "token",
           "group": f"group of {(a or w).get('group_size')}"}
    rate = q["matmul_rate"].split("_")[0]
    zeros = " with zero points" if w.get("zero_point") else ""
    acts = ("unquantized (weight-only)" if a is None else
            f"{a['format']} per {per[a['granularity']]} ({'static' if a.get('static') else 'dynamic'})")
    lines = [f"quantization scheme {q['name']}: weights {w['format']} per {per[w['granularity']]}{zeros}, "
             f"activations {acts}; "
             f"{q['weight_bytes_per_expert'] / 1e6:.3g} MB an expert (data + scales{' + zeros' if zeros else ''}) "
             "against "
             f"{q['unquantized_bytes_per_expert'] / 1e6:.3g} MB in {info['dtype']}",
             f"rows quant={q['name']}: rel err against the torch reference on the quantized weights (GEMM1's "
             "output rounded to the activations' dtype for a backend that stores it so); floor from "
             f"their weight bytes and the {rate} rate; 'vs bf16' = median of the {info['dtype']} row above "
             f"(same backend, mode, tokens, routing) / median of the quantized row"]
    if getattr(ceil, q["matmul_rate"]) is None and ceil.device != "cpu":
        lines.append(f"no {rate} matmul rate on this device: the floor of quantized rows uses the "
                     f"{info['dtype']} rate")
    cal = q.get("calibration")
    scales = next((r.extra for r in rows if "a13_scale" in r.extra), None)
    if cal is not None:
        values = f": a13 = {scales['a13_scale']:.4g}, a2 = {scales['a2_scale']:.4g}" if scales else ""
        lines.append(f"static activation scales: {cal['method'].split('; values')[0]}{values}")
    return lines


def format_table(ceil: Ceilings, rows: list[Row], info: dict | None = None) -> str:
    cpu = ceil.device == "cpu"
    quant = any(r.quant != "none" for r in rows)
    pw = max([8, *(len(r.preset) for r in rows)])
    qw = max([5, *(len(r.quant) for r in rows)])
    lines = _header(ceil, info, rows)
    lines.append(f"{'preset':<{pw}} {'M':>6} {'backend':<18} " + (f"{'quant':<{qw}} " if quant else "")
                 + f"{'mode':<7} {'median us':>10} {'min us':>10} {'max us':>10} {'floor us':>10} {'% floor':>8} "
                 f"{'rel err':>9}" + (f" {'vs bf16':>7}" if quant else "") + "  note")
    for r in rows:
        med, lo, hi = (_num(v, 10, ".1f") for v in (r.time_us, r.min_us, r.max_us))
        floor = _num(None if cpu else r.floor_us, 10, ".1f")
        pct = f"{r.pct_floor:7.1f}%" if r.pct_floor is not None else f"{'-':>8}"
        err = _num(r.rel_err, 9, ".2e")
        speedup = (f" {r.vs_bf16:6.2f}x" if r.vs_bf16 is not None else f" {'-':>7}") if quant else ""
        lines.append(f"{r.preset:<{pw}} {r.m:>6} {r.backend:<18} " + (f"{r.quant:<{qw}} " if quant else "")
                     + f"{r.mode:<7} {med} {lo} {hi} {floor} {pct} {err}{speedup}  {r.note}")
    return "\n".join(lines)


def _num(value: float | None, width: int, spec: str) -> str:
    return f"{value:{width}{spec}}" if value is not None else f"{'-':>{width}}"


def write_json(path: str, ceil: Ceilings, rows: list[Row], info: dict | None = None) -> None:
    data = {"info": info or {}, "ceilings": asdict(ceil), "rows": [asdict(r) for r in rows]}
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def plot(path: str, rows: list[Row]) -> None:
    """% of floor against M; where no row has one (CPU), the median time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install 'moe-layer[plot]'") from exc
    use_pct = any(r.pct_floor is not None for r in rows)
    fig, ax = plt.subplots(figsize=(7, 4))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        value = r.pct_floor if use_pct else r.time_us
        if value is not None:
            label = f"{r.preset} {r.backend} {r.mode}" + (f" {r.quant}" if r.quant != "none" else "")
            series.setdefault(label, []).append((r.m, value))
    for label, pts in series.items():
        ax.plot([m for m, _ in pts], [v for _, v in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens (M)")
    ax.set_ylabel("% of roofline floor" if use_pct else "median time (us)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
