"""Where ``FusedMoE.forward``'s time goes beside ``fused_experts`` from precomputed routing (issue 19, the
layer path): per-kernel time from torch.profiler, eager and under CUDA-graph replay; host time per call; and
FusedMoE.forward / (fused_experts + the routing kernel), with the routing kernel's own alignment of small
batches on and off (option ``route_align``). Table last.

    python3 benchmarks/layer_profile.py [--preset qwen3] [--m 16,256,1024]
    python3 benchmarks/layer_profile.py --smoke      # CPU: a tiny shape under the Triton interpreter

Method: the layer is built over the same random weights as the ``fused_experts`` call (``moe bench``'s
layer row, backend triton); routing is fresh ``torch.randn`` logits, softmax top-k, renormalized. Times are
``moe.workload.time_fn`` (do_bench's median, L2 flushed) and ``graph_time`` (a captured call replayed).
Host time: microseconds to enqueue one call, 50 calls at a time with the GPU left to run behind (the best of
5 rounds). Per-kernel times are profiled with chained launches off (``pdl``): a chained kernel starts early
and waits on the GPU, so its profiled duration would include its wait. On CPU (``--smoke``) the times are
wall clock, there are no graphs, and the kernels are the interpreter's launches (``record_function``
spans), which only shows that the script runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

if "--smoke" in sys.argv:  # the interpreter is chosen when triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import moe
from moe import FusedMoE, fused_experts
from moe.routing import fused_topk
from moe.workload import PRESETS, Preset, graph_time, random_tokens, random_weights, time_fn

SMOKE = Preset("smoke", 8, 2, 64, 32, (4, 16))
HOST_CALLS, HOST_ROUNDS, PROFILE_ITERS = 50, 5, 5


@dataclass
class Case:
    """One token count: the layer and the two calls it is compared with, over the same weights and logits."""

    preset: Preset
    m: int
    layer: FusedMoE
    x: torch.Tensor
    logits: torch.Tensor
    weights: torch.Tensor
    ids: torch.Tensor

    def calls(self) -> dict[str, Callable[[], object]]:
        layer, x, logits, w13, w2 = self.layer, self.x, self.logits, self.layer.w13_weight, self.layer.w2_weight
        return {
            "layer": lambda: layer(x, logits),
            "fused_experts": lambda: fused_experts(x, w13, w2, self.weights, self.ids, backend="triton",
                                                   activation=self.preset.activation),
            "routing": lambda: fused_topk(logits, self.preset.top_k),
        }


def make_case(p: Preset, m: int, w13: torch.Tensor, w2: torch.Tensor, dev: torch.device) -> Case:
    gen = torch.Generator(device=dev).manual_seed(m)
    x, logits = random_tokens(p, m, w13.dtype, dev, gen)
    layer = FusedMoE(p.num_experts, p.top_k, p.hidden_size, p.intermediate_size, gate=False, backend="triton",
                     activation=p.activation, params_dtype=w13.dtype, device="meta")
    layer.w13_weight = torch.nn.Parameter(w13, requires_grad=False)
    layer.w2_weight = torch.nn.Parameter(w2, requires_grad=False)
    weights, ids = fused_topk(logits, p.top_k)
    return Case(p, m, layer, x, logits, weights, ids)


# ---------------------------------------------------------------------------------------------- timing
def median_us(fn: Callable[[], object], dev: torch.device, graph: bool) -> float | None:
    """Median microseconds of a call: do_bench (eager) or graph replays on CUDA; wall clock on CPU, where
    there are no graphs (None)."""
    if dev.type == "cuda":
        return 1e6 * (graph_time(fn, dev) if graph else time_fn(fn, dev))
    if graph:
        return None
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def host_us(fn: Callable[[], object], dev: torch.device) -> float:
    """Host microseconds to enqueue one call, the GPU running behind (few enough calls that the launch
    queue never fills); the best of a few rounds."""
    calls = HOST_CALLS if dev.type == "cuda" else 2
    best = float("inf")
    for _ in range(HOST_ROUNDS if dev.type == "cuda" else 1):
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
        _sync(dev)
    return 1e6 * best


# ------------------------------------------------------------------------------------------ profiling
@dataclass(frozen=True)
class Kernel:
    name: str
    us: float  # per call
    count: float  # launches per call


def kernels(fn: Callable[[], object], dev: torch.device, graph: bool) -> list[Kernel]:
    """Per-kernel time and launches per call of ``fn`` (eager, or replayed from a captured graph), chained
    launches off; on CPU the interpreter's launches."""
    with moe.override_options(pdl=False):
        if graph and dev.type == "cuda":
            fn = _captured(fn, dev)
        for _ in range(2):
            fn()
        _sync(dev)
        activities = [ProfilerActivity.CUDA] if dev.type == "cuda" else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            for _ in range(PROFILE_ITERS):
                fn()
            _sync(dev)
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for ev in prof.events():
        if _is_kernel(ev, dev):
            name = ev.name.removeprefix("triton:")
            total[name] += ev.time_range.elapsed_us()
            count[name] += 1
    rows = [Kernel(n, total[n] / PROFILE_ITERS, count[n] / PROFILE_ITERS) for n in total]
    return sorted(rows, key=lambda k: -k.us)


def _is_kernel(ev, dev: torch.device) -> bool:
    if dev.type == "cuda":
        return ev.device_type == torch.autograd.DeviceType.CUDA and "Sync" not in ev.name
    return ev.name.startswith("triton:")


def _captured(fn: Callable[[], object], dev: torch.device) -> Callable[[], object]:
    stream = torch.cuda.Stream(dev)
    stream.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream(dev).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _spans_for_interpreted_launches() -> None:
    """--smoke: each interpreted Triton launch becomes a ``triton:<kernel>`` profiler span."""
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def spanned(self, *args, **kwargs):
        with record_function(f"triton:{self.__name__}"):
            return run(self, *args, **kwargs)

    InterpretedFunction.run = spanned


# ------------------------------------------------------------------------------------------- reporting
@dataclass
class Result:
    m: int
    path: str  # "routing aligns" (route_align on) or "separate" (off)
    eager: dict[str, float | None]
    graph: dict[str, float | None]
    host: dict[str, float]
    launches: dict[str, float]


def measure(case: Case, dev: torch.device) -> list[Result]:
    """The two calls once, the layer with route_align on and off; their profiles printed."""
    calls = case.calls()
    base = {name: _measure_call(name, calls[name], dev, case.m) for name in ("fused_experts", "routing")}
    results = []
    with torch.no_grad():
        for on in (True, False):
            with moe.override_options(route_align=on):
                path = "routing aligns" if on else "separate"
                mine = _measure_call(f"FusedMoE.forward ({path})", calls["layer"], dev, case.m)
            stats = {"layer": mine, **base}
            results.append(Result(case.m, path, {n: s["eager"] for n, s in stats.items()},
                                   {n: s["graph"] for n, s in stats.items()}, {n: s["host"] for n, s in stats.items()},
                                   {n: s["launches"] for n, s in stats.items()}))
    return results


def _measure_call(label: str, fn: Callable[[], object], dev: torch.device, m: int) -> dict:
    with torch.no_grad():
        fn()  # compiles outside every measurement
        out = {"eager": median_us(fn, dev, False), "graph": median_us(fn, dev, True), "host": host_us(fn, dev)}
        eager_k = kernels(fn, dev, False)
        graph_k = kernels(fn, dev, True) if dev.type == "cuda" else []
    out["launches"] = sum(k.count for k in eager_k)
    print(f"\nM={m} {label}: eager {_us(out['eager'])} us, graph {_us(out['graph'])} us, "
          f"host {out['host']:.1f} us/call")
    for title, rows in (("eager", eager_k), ("graph replay", graph_k)):
        if not rows:
            continue
        print(f"  kernels, {title} (chained launches off): {sum(k.us for k in rows):.1f} us in "
              f"{sum(k.count for k in rows):g} launches")
        for k in rows:
            print(f"    {k.name[:48]:<48} {k.us:9.1f} us  x{k.count:g}")
    return out


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _ratio(num: float | None, den: float | None) -> str:
    return "-" if num is None or den is None or den <= 0 else f"{num / den:.3f}"


def table(preset: str, results: list[Result]) -> str:
    """One line per (M, path): times, the ratios against fused_experts + the routing kernel's graph time,
    the eager excess in us, host us and launches per call."""
    head = ("| preset | M | path | layer eager / graph | fused_experts eager / graph | routing graph | "
            "graph: layer / (fe + routing) | eager: layer / (fe + routing) | eager excess us | "
            "host us layer / fe / routing | launches layer / fe + routing |")
    lines = [head, "|" + "---|" * 3 + "---:|" * 8]
    for r in results:
        route = r.graph["routing"] if r.graph["routing"] is not None else r.eager["routing"]
        graph_base = None if r.graph["fused_experts"] is None else r.graph["fused_experts"] + route
        eager_base = r.eager["fused_experts"] + route
        excess = r.eager["layer"] - eager_base
        lines.append(
            f"| {preset} | {r.m} | {r.path} | {_us(r.eager['layer'])} / {_us(r.graph['layer'])} | "
            f"{_us(r.eager['fused_experts'])} / {_us(r.graph['fused_experts'])} | {_us(route)} | "
            f"{_ratio(r.graph['layer'], graph_base)} | {_ratio(r.eager['layer'], eager_base)} | {excess:.1f} | "
            f"{r.host['layer']:.1f} / {r.host['fused_experts']:.1f} / {r.host['routing']:.1f} | "
            f"{r.launches['layer']:g} / {r.launches['fused_experts'] + r.launches['routing']:g} |")
    lines.append("targets (issue 19): graph ratio <= 1.10 at every M; eager at M <= 16: layer <= 1.1 x "
                 "(fused_experts + routing graph) + 10 us of host time")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="qwen3", choices=sorted(PRESETS))
    ap.add_argument("--m", default="16,256,1024", help="comma-separated token counts")
    ap.add_argument("--smoke", action="store_true", help="CPU: a tiny shape under the Triton interpreter")
    a = ap.parse_args(argv)
    if a.smoke:
        _spans_for_interpreted_launches()
        p, ms, dev, dtype = SMOKE, SMOKE.default_m, torch.device("cpu"), torch.bfloat16
    else:
        if not torch.cuda.is_available():
            raise SystemExit("layer_profile.py: no CUDA device here; run it on a GPU, or --smoke on CPU")
        p, dev, dtype = PRESETS[a.preset], torch.device("cuda"), torch.bfloat16
        ms = tuple(int(v) for v in a.m.split(","))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke: numbers mean nothing)"
    print(f"{p.name}: {p.describe()}, {str(dtype).removeprefix('torch.')} on {name}; torch {torch.__version__}, "
          f"moe {moe.__version__}")
    gen = torch.Generator(device=dev).manual_seed(0)
    w13, w2 = random_weights(p, dtype, dev, gen)
    results: list[Result] = []
    for m in ms:
        results += measure(make_case(p, m, w13, w2, dev), dev)
    print()
    print(table(p.name, results))


if __name__ == "__main__":
    main()
