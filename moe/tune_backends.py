"""``moe tune --backends``: time every usable backend at each token count on this card, check each against
the reference first, and write the selection table ``auto`` reads (``moe.selection``).

Timing is ``moe bench``'s: ``moe.workload.time_fn`` (do_bench's median on CUDA), and CUDA-graph replays
(``graph_time``) up to ``GRAPH_MAX_M`` tokens. Parity: each backend's output, into an output poisoned with
NaN, against the torch reference of the same inputs (fp32 compute), within the tolerance row of
(dtype, scheme) of ``moe.testing.TOLERANCES``; under a W8A8 scheme the reference emulates the backend's
declared rounding of GEMM1's output (``moe.contract.gemm1_rounding``). A backend that fails is recorded in
the table and never chosen by ``auto`` at that bucket.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .contract import ExpertsArgs, ExpertsProblem, gemm1_rounding
from .functional import fused_experts
from .quant import QuantConfig, quantize
from .registry import get_backend, judge, list_backends
from .routing import fused_topk
from .selection import BucketChoice, SelectionTable, load_table, table_file_name, write_table
from .testing import arithmetic_key, arithmetic_reference, rel_error, tolerance
from .workload import Preset, graph_time, random_tokens, random_weights, time_fn

__all__ = ["GRAPH_MAX_M", "Timer", "measure_bucket", "tune_selection"]

GRAPH_MAX_M = 256  # as moe bench: small batches are timed as CUDA-graph replays
Timer = Callable[[str, int, Callable[[], object], torch.device], float]  # (backend, M, call, device) -> seconds


def default_timer(name: str, m: int, call: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda" and m <= GRAPH_MAX_M:
        return graph_time(call, device)
    return time_fn(call, device)


def _weights(p: Preset, dtype: torch.dtype, device: torch.device, quant: QuantConfig, gen: torch.Generator):
    w13, w2 = random_weights(p, dtype, device, gen)
    if quant.weights is None:
        return w13, w2
    return quantize(w13, quant.weights, parts=p.parts), quantize(w2, quant.weights)


def _problem(p: Preset, device: torch.device, dtype: torch.dtype, m: int, quant: QuantConfig) -> ExpertsProblem:
    return dataclasses.replace(p.problem(device, dtype, m), quant=quant)


def _candidates(problem: ExpertsProblem, backends: Sequence[str] | None) -> list[str]:
    """The backends to time: those named (each must exist), else every registered one but the reference;
    only those that can run the problem here."""
    names = list(backends) if backends else [b.name for b in list_backends() if b.name != "torch"]
    return [n for n in names if judge(get_backend(n), problem).ok]


def measure_bucket(p: Preset, m: int, dtype: torch.dtype, device: torch.device, weights, quant: QuantConfig,
                   names: Sequence[str], timer: Timer, gen: torch.Generator) -> BucketChoice | None:
    """Parity first, then time, for one token count; None when no backend passed."""
    x, logits = random_tokens(p, m, dtype, device, gen)
    topk_w, ids = fused_topk(logits, p.top_k)
    w13, w2 = weights
    scheme = None if quant.weights is None else quant
    problem = _problem(p, device, dtype, m, quant)
    refs: dict[torch.dtype | None, torch.Tensor] = {}  # the reference of each backend's declared arithmetic
    timings, failed = {}, []
    for name in names:
        rounding = gemm1_rounding(get_backend(name), problem)
        if rounding not in refs:
            refs[rounding] = arithmetic_reference(name, ExpertsArgs(x, w13, w2, topk_w, ids), problem)
        ref, limit = refs[rounding], tolerance(dtype, arithmetic_key(name, problem))
        def call(name: str = name) -> torch.Tensor:
            return fused_experts(x, w13, w2, topk_w, ids, activation=p.activation, quant=scheme, backend=name)

        out = torch.full_like(x, float("nan"))
        fused_experts(x, w13, w2, topk_w, ids, activation=p.activation, quant=scheme, backend=name, out=out)
        if rel_error(out, ref) > limit:
            failed.append(name)
            continue
        timings[name] = timer(name, m, call, device) * 1e6
    if not timings:
        return None
    best = min(timings, key=timings.get)
    return BucketChoice(backend=best, timings_us=timings, failed_parity=tuple(failed))


def _earlier(path: Path, table: SelectionTable) -> dict[int, BucketChoice]:
    """The buckets of an earlier run's table for the same key (a resumed ``moe tune --backends``), else {}."""
    if not path.is_file():
        return {}
    old = load_table(path)
    return dict(old.buckets) if old.model_copy(update={"buckets": table.buckets}) == table else {}


def tune_selection(p: Preset, ms: Sequence[int], dtype: torch.dtype, out_dir: Path, *,
                   device: torch.device | str = "cuda", backends: Sequence[str] | None = None,
                   quant: QuantConfig | None = None, timer: Timer = default_timer, seed: int = 0,
                   log: Callable[[str], None] | None = None) -> Path:
    """Measure ``p`` at each token count of ``ms`` and write its selection table under ``out_dir``.

    The file is written after every token count, merged with the buckets of an earlier run of the same key
    (a token count measured again replaces its bucket), so a run stopped part way keeps what it measured.
    ``log`` gets one line per token count (the choice, and the seconds it took: compiles included)."""
    device, quant = torch.device(device), quant or QuantConfig()
    if quant.static_activations:
        raise ValueError(f"quant: static activation scales are not tuned here, got {quant.key()}")
    if p.bias:
        raise ValueError(f"preset {p.name}: biases are not tuned here (the selection key has no bias)")
    gen = torch.Generator(device).manual_seed(seed)
    weights = _weights(p, dtype, device, quant, gen)
    problem = _problem(p, device, dtype, 1, quant)
    names = _candidates(problem, backends)
    if not names:
        raise ValueError(f"no backend can run {p.describe()} here; see `moe backends`")
    path, buckets = None, None
    for m in ms:
        start = time.perf_counter()
        choice = measure_bucket(p, m, dtype, device, weights, quant, names, timer, gen)
        if log is not None:
            log(_log_line(p, m, quant, choice, time.perf_counter() - start))
        if choice is None:
            continue
        table = _table(p, dtype, quant, problem.target.name, {m: choice})
        path = Path(out_dir) / table_file_name(table)
        if buckets is None:
            buckets = _earlier(path, table)
        buckets[m] = choice
        write_table(table.model_copy(update={"buckets": dict(sorted(buckets.items()))}), Path(out_dir))
    if path is None:
        raise ValueError(f"every backend failed its parity check on {p.describe()}: {', '.join(names)}")
    return path


def _table(p: Preset, dtype: torch.dtype, quant: QuantConfig, device_name: str,
           buckets: dict[int, BucketChoice]) -> SelectionTable:
    return SelectionTable(num_experts=p.num_experts, intermediate_size=p.intermediate_size,
                          hidden_size=p.hidden_size, top_k=p.top_k, activation=p.activation,
                          dtype=str(dtype).removeprefix("torch."), quant=quant.key(), device_name=device_name,
                          buckets=buckets)


def _log_line(p: Preset, m: int, quant: QuantConfig, choice: BucketChoice | None, seconds: float) -> str:
    head = f"{p.name} {quant.key()} M={m} ({seconds:.0f} s):"
    if choice is None:
        return f"{head} every backend failed parity"
    times = ", ".join(f"{b} {t:.1f} us" for b, t in sorted(choice.timings_us.items(), key=lambda kv: kv[1]))
    failed = f"; failed parity: {', '.join(choice.failed_parity)}" if choice.failed_parity else ""
    return f"{head} {choice.backend} ({times}){failed}"
