"""Expert-parallel forward over the whole world: allgather, all_to_all and fixed-capacity dispatch.

    torchrun --nproc-per-node 8 benchmarks/ep_bench.py --out ep8.json     # dsv3 experts, bf16 and fp8_block
    torchrun --nproc-per-node 4 benchmarks/ep_bench.py --quant none --tokens 1,64
    torchrun --nproc-per-node 2 benchmarks/ep_bench.py --cpu-smoke         # gloo, tiny shape: checks the script

The dsv3 routed experts (E=256, top_k=8, hidden 7168, intermediate 2048, bf16 activations) are split over
every rank (EP = world size, 256 / world experts a rank). For each quantization (``--quant``: none and
fp8_block), each T per rank (``--tokens``) and each strategy, every rank passes T fresh tokens with fresh
router logits (softmax top-k) to ``ParallelFusedMoE.forward`` (routing, dispatch, local experts with the
``auto`` backend, combine) and the script times:

- ``eager``: the forward, CUDA events around it after a barrier, median of ``--iters`` after ``--warmup``;
- ``graph``: the same forward captured once in a CUDA graph and replayed (``fixed`` only: the other two
  read the counts on the host and cannot be captured);
- ``comm``: the strategy's dispatch and combine alone (the experts skipped: the received rows are
  combined as they are), eager and, for ``fixed``, replayed as a graph: the collectives plus the
  strategy's few packing kernels; ``share`` is comm / forward;
- ``peak``: the memory the forward allocated beyond what was held before it (MiB, this rank's);
- parity: the eager output (and the replayed one, which must equal it bitwise) against the single-GPU
  ``FusedMoE`` holding all 256 experts (built on every rank from one seed; ``--no-parity`` skips it), as
  the norm-relative error within the tolerance row of ``moe.testing``.

``fixed`` runs with ``capacity = T`` (an engine capturing a graph for each batch size it serves sizes the
layer of each graph so), ``fixed_fp8`` adds ``dispatch_quant="fp8"``. Times are the slowest rank's (the
JSON keeps every rank's). Rank 0 prints the table last and writes ``--out``; the exit code is 1 when a
parity check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from parallel_gpu import DSV3, Shape  # the dsv3 experts' shape (this folder: run as benchmarks/ep_bench.py)

import moe
from moe.parallel import ParallelConfig, ParallelFusedMoE
from moe.testing import rel_error, tolerance

STRATEGIES = ("allgather", "all_to_all", "fixed", "fixed_fp8")
# torch >= 2.13 names it all_gather_single; older releases (2.11 on the GPU machines) all_gather_into_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
FP8_DISPATCH_TOL = 1e-1  # fp8 tokens against the unquantized single-GPU layer: the e4m3 rounding (QUANT_NOISE)


SMOKE = Shape(E=16, top_k=4, K=128, N=128, dtype=torch.float32)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="gloo on CPU, a tiny fp32 shape, few iterations")
    p.add_argument("--tokens", help="tokens per rank, comma-separated (default 1,16,64,256,4096; smoke: 1,16,64)")
    p.add_argument("--quant", default="none,fp8_block", help="layer quantizations, comma-separated (none, fp8_block)")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--backend", default="auto", help="experts backend (default: auto)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-parity", action="store_true", help="skip the single-GPU layer (memory, time)")
    p.add_argument("--out", help="write the results as JSON here (rank 0)")
    args = p.parse_args()
    args.tokens = args.tokens or ("1,16,64" if args.cpu_smoke else "1,16,64,256,4096")
    if args.cpu_smoke:
        args.warmup, args.iters = 1, 3
    bad = set(args.strategies.split(",")) - set(STRATEGIES)
    if bad:
        p.error(f"--strategies: unknown {sorted(bad)}; choose from {', '.join(STRATEGIES)}")
    return args


# --------------------------------------------------------------------------------------------- timing
class _Timer:
    """Median time of a callable on this rank: CUDA events on a GPU, the host clock on CPU; every
    iteration starts after a barrier, so the ranks' collectives line up."""

    def __init__(self, device: torch.device, warmup: int, iters: int) -> None:
        self.device, self.warmup, self.iters = device, warmup, iters
        self.cuda = device.type == "cuda"

    def _barrier(self) -> None:
        if self.cuda:
            dist.barrier(device_ids=[self.device.index])
            torch.cuda.synchronize()
        else:
            dist.barrier()

    def _once(self, fn: Callable[[], object]) -> float:
        self._barrier()
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e6
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) * 1e3

    def median_us(self, fn: Callable[[], object]) -> float:
        times = [self._once(fn) for _ in range(self.warmup + self.iters)]
        return statistics.median(times[self.warmup:])


def _per_rank(value: float, device: torch.device) -> list[float]:
    out = torch.zeros(dist.get_world_size(), dtype=torch.float64, device=device)
    _all_gather(out, torch.tensor([value], dtype=torch.float64, device=device))
    return out.tolist()


class _Graph:
    """A callable captured once in a CUDA graph (after warm-up on a side stream), replayed by ``replay``."""

    def __init__(self, fn: Callable[[], torch.Tensor]) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: NCCL's watchdog thread may query events of earlier work while this thread captures
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.out = fn()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out


# --------------------------------------------------------------------------------------------- layers
def _config(strategy: str, world: int, tokens: int) -> ParallelConfig:
    if strategy.startswith("fixed"):
        quant = "fp8" if strategy == "fixed_fp8" else "none"
        return ParallelConfig(ep_size=world, dispatch="fixed", capacity=max(tokens, 1), dispatch_quant=quant)
    return ParallelConfig(ep_size=world, dispatch=strategy)


def _layer(shape: Shape, quant: str, parallel: ParallelConfig, device: torch.device, backend: str,
           weights_of: ParallelFusedMoE | None) -> ParallelFusedMoE:
    """A parallel layer; with ``weights_of``, holding that layer's parameters (shared, not copied)."""
    layer = ParallelFusedMoE(shape.E, shape.top_k, shape.K, shape.N, parallel=parallel, params_dtype=shape.dtype,
                             device=device, gate=False, backend=backend, quant=None if quant == "none" else quant)
    if weights_of is not None:
        for name, param in weights_of.named_parameters(recurse=False):
            setattr(layer, name, param)
    return layer


def _single(shape: Shape, quant: str, device: torch.device, backend: str) -> moe.FusedMoE:
    torch.manual_seed(0)  # the same weights on every rank
    return moe.FusedMoE(shape.E, shape.top_k, shape.K, shape.N, params_dtype=shape.dtype, device=device, gate=False,
                        backend=backend, quant=None if quant == "none" else quant)


def _load_from(layer: ParallelFusedMoE, single: moe.FusedMoE) -> None:
    scales = {}
    if single.w13_weight_scale is not None:
        scales = {"w13_scale": single.w13_weight_scale, "w2_scale": single.w2_weight_scale}
    layer.load_fused_weights(single.w13_weight, single.w2_weight, **scales)


def _inputs(shape: Shape, tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(1000 * tokens + dist.get_rank())
    x = torch.randn(tokens, shape.K, device=device, generator=g).to(shape.dtype)
    return x, torch.randn(tokens, shape.E, device=device, generator=g)


# ------------------------------------------------------------------------------------------ one cell
def _comm(layer: ParallelFusedMoE, x: torch.Tensor, logits: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The strategy's dispatch and combine alone: the received rows go back as the 'partial outputs'."""
    weights, ids = layer.select_experts(x, logits)
    dispatcher = layer.dispatcher

    def run() -> torch.Tensor:
        sent = dispatcher.dispatch(x, weights, ids)
        return dispatcher.combine(sent.hidden_states, sent)

    return run


def _peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _cell(layer: ParallelFusedMoE, strategy: str, shape: Shape, quant: str, tokens: int,
          single: moe.FusedMoE | None, timer: _Timer, device: torch.device) -> dict:
    x, logits = _inputs(shape, tokens, device)
    forward = lambda: layer(x, logits)
    cell: dict = {"strategy": strategy, "quant": quant, "tokens_per_rank": tokens}
    with torch.no_grad():
        eager = forward()
        cell["peak_mib"] = _peak_mib(forward, device)
        cell["eager_us"] = _per_rank(timer.median_us(forward), device)
        cell["comm_us"] = _per_rank(timer.median_us(_comm(layer, x, logits)), device)
        graph_out = None
        if strategy.startswith("fixed") and device.type == "cuda":
            graph_out = _graph_cells(cell, forward, _comm(layer, x, logits), timer, device)
        ref = single(x, logits) if single is not None and tokens else None
    cell.update(_parity(eager, graph_out, ref, strategy, shape, quant))
    return cell


def _graph_cells(cell: dict, forward: Callable[[], torch.Tensor], comm: Callable[[], torch.Tensor], timer: _Timer,
                 device: torch.device) -> torch.Tensor | None:
    """Capture the forward and the comm alone, time their replays; returns the replayed output. A capture
    that fails (an experts backend that cannot be captured) is recorded, not raised: every rank fails alike."""
    try:
        graph = _Graph(forward)
        cell["graph_us"] = _per_rank(timer.median_us(graph.replay), device)
        cell["comm_graph_us"] = _per_rank(timer.median_us(_Graph(comm).replay), device)
        return graph.replay().clone()
    except Exception as e:  # reported in the table and the JSON
        cell["graph_error"] = f"{type(e).__name__}: {e}"
        return None


def _parity(eager: torch.Tensor, graph_out: torch.Tensor | None, ref: torch.Tensor | None, strategy: str,
            shape: Shape, quant: str) -> dict:
    """Each rank's result against the single-GPU layer; the replayed graph must equal eager bitwise."""
    out: dict = {}
    ok = True
    if strategy.startswith("fixed") and eager.device.type == "cuda" and graph_out is None:
        ok = False  # the capture failed (graph_error)
    if graph_out is not None:
        out["graph_equals_eager"] = bool(torch.equal(graph_out, eager))
        ok = out["graph_equals_eager"]
    if ref is not None:
        tol = FP8_DISPATCH_TOL if strategy == "fixed_fp8" else tolerance(shape.dtype, quant)
        err = rel_error(eager, ref)
        out["rel_error"], out["tolerance"] = err, tol
        ok = ok and err <= tol
    out["parity_ok"] = ok
    return out


# ----------------------------------------------------------------------------------------------- main
def _setup(cpu: bool) -> torch.device:
    if cpu:
        dist.init_process_group("gloo")
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    return device


def _run_quant(args: argparse.Namespace, shape: Shape, quant: str, device: torch.device) -> list[dict]:
    world = dist.get_world_size()
    tokens = [int(t) for t in args.tokens.split(",")]
    strategies = args.strategies.split(",")
    timer = _Timer(device, args.warmup, args.iters)
    single = None if args.no_parity else _single(shape, quant, device, args.backend)
    base = _layer(shape, quant, _config("allgather", world, 1), device, args.backend, None)
    if single is not None:
        _load_from(base, single)
    cells = []
    for t in tokens:
        for s in strategies:
            layer = base if s == "allgather" else _layer(shape, quant, _config(s, world, t), device, args.backend,
                                                          base)
            cells.append(_cell(layer, s, shape, quant, t, single, timer, device))
            del layer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return cells


def main() -> None:
    args = _args()
    device = _setup(args.cpu_smoke or not torch.cuda.is_available())
    if dist.get_world_size() < 2:
        raise SystemExit(f"ep_bench: needs 2 or more ranks (torchrun --nproc-per-node N), got {dist.get_world_size()}")
    shape = SMOKE if args.cpu_smoke else DSV3
    results = []
    for quant in args.quant.split(","):
        results += _run_quant(args, shape, quant, device)
    failed = [r for r in results if not r["parity_ok"]]
    if dist.get_rank() == 0:
        _report(args, shape, device, results)
    dist.destroy_process_group()
    if failed:
        raise SystemExit(1)


def _fmt(values: list[float] | None) -> str:
    return "-" if values is None else f"{max(values):.1f}"


def _report(args: argparse.Namespace, shape: Shape, device: torch.device, results: list[dict]) -> None:
    world = dist.get_world_size()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if args.out:
        meta = {"card": card, "world": world, "torch": torch.__version__, "backend": args.backend,
                "shape": {"E": shape.E, "top_k": shape.top_k, "K": shape.K, "N": shape.N, "dtype": str(shape.dtype)},
                "warmup": args.warmup, "iters": args.iters, "timing": "median us per rank (lists: rank order)"}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"EP over {world} ranks ({card}); E={shape.E} ({shape.E // world} a rank) top_k={shape.top_k} "
          f"K={shape.K} N={shape.N} {str(shape.dtype).removeprefix('torch.')}; backend {args.backend}; "
          f"median us of {args.iters}, slowest rank; share = comm / forward")
    print(f"{'quant':<9} {'strategy':<10} {'T/rank':>6} {'eager':>9} {'graph':>9} {'comm':>9} {'comm(g)':>9} "
          f"{'share':>6} {'peak MiB':>9} {'rel err':>9} parity")
    for r in results:
        share = max(r["comm_us"]) / max(r["eager_us"]) if max(r["eager_us"]) else 0.0
        err = f"{r['rel_error']:.2e}" if "rel_error" in r else "-"
        peak = "-" if r["peak_mib"] != r["peak_mib"] else f"{r['peak_mib']:.1f}"  # NaN: not measured (CPU)
        print(f"{r['quant']:<9} {r['strategy']:<10} {r['tokens_per_rank']:>6} {_fmt(r['eager_us']):>9} "
              f"{_fmt(r.get('graph_us')):>9} {_fmt(r['comm_us']):>9} {_fmt(r.get('comm_graph_us')):>9} "
              f"{share:>6.0%} {peak:>9} {err:>9} {'ok' if r['parity_ok'] else 'FAIL'}")
    for r in results:
        if "graph_error" in r:
            print(f"graph capture failed ({r['quant']}, {r['strategy']}, T={r['tokens_per_rank']}): {r['graph_error']}")


if __name__ == "__main__":
    main()
