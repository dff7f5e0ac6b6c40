"""Benchmark the two expert-parallel dispatch strategies: each rank holds 1/world of the experts.

    torchrun --nproc-per-node 2 benchmarks/parallel_gpu.py --out parallel.json          # 2 GPUs, NCCL, dsv3
    torchrun --nproc-per-node 2 benchmarks/parallel_gpu.py --tiny --out tiny.json       # CPU, gloo, small shape

Per rank, T tokens with fresh ``torch.randn`` router logits (softmax top-k, renormalized) go through
routing -> dispatch -> local experts (``fused_experts``, backend ``auto`` by default) -> combine, the
forward of ``ParallelFusedMoE``. Each phase is timed with CUDA events (``perf_counter`` on CPU) after a
barrier; the table shows medians over the iterations, the slowest rank's. Before timing, the two
strategies' outputs are checked against each other. Rank 0 prints the table and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

import moe
from moe.layer import FusedMoE
from moe.parallel import AllGatherDispatch, AllToAllDispatch, Dispatch, ParallelConfig, ParallelFusedMoE
from moe.parallel.placement import expert_owners
from moe.testing import assert_close

PHASES = ("route", "dispatch", "experts", "combine")


@dataclass(frozen=True)
class Shape:
    E: int
    top_k: int
    K: int
    N: int
    dtype: torch.dtype


DSV3 = Shape(E=256, top_k=8, K=7168, N=2048, dtype=torch.bfloat16)
TINY = Shape(E=16, top_k=4, K=64, N=32, dtype=torch.float32)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small fp32 shape on CPU with gloo (a smoke test)")
    p.add_argument("--tokens", default="1,64,4096", help="tokens per rank, comma-separated")
    p.add_argument("--strategies", default="allgather,all_to_all")
    p.add_argument("--backend", default="auto", help="experts backend (default: auto)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", help="write the results as JSON here (rank 0)")
    return p.parse_args()


class _Clock:
    """Marks on the device timeline (CUDA events) or the host clock (CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> object:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_us(self, a: object, b: object) -> float:
        if self.cuda:
            return a.elapsed_time(b) * 1e3  # type: ignore[attr-defined]
        return (b - a) * 1e6  # type: ignore[operator]


def _step(layer: ParallelFusedMoE, dispatcher: Dispatch, x: torch.Tensor, logits: torch.Tensor,
          mark: Callable[[], object]) -> tuple[torch.Tensor, list[object], int, int]:
    """One forward, marking the phase boundaries. Returns (output, marks, rows computed, experts hit)."""
    marks = [mark()]
    weights, ids = layer.select_experts(x, logits)
    marks.append(mark())
    sent = dispatcher.dispatch(x, weights, ids)
    marks.append(mark())
    partial = FusedMoE.experts(layer, sent.hidden_states, sent.topk_weights, sent.topk_ids)
    marks.append(mark())
    y = dispatcher.combine(partial, sent)
    marks.append(mark())
    local = layer.expert_map[sent.topk_ids.long()]  # [R, k] local id or -1
    hit = int(torch.unique(local[local >= 0]).numel())
    return y, marks, sent.hidden_states.shape[0], hit


def _bench(layer: ParallelFusedMoE, dispatcher: Dispatch, x: torch.Tensor, logits: torch.Tensor,
           warmup: int, iters: int, clock: _Clock, device: torch.device) -> dict:
    times: dict[str, list[float]] = {p: [] for p in (*PHASES, "total")}
    rows = hit = 0
    for i in range(warmup + iters):
        if device.type == "cuda":
            dist.barrier(device_ids=[device.index])  # start every rank's iteration together
            torch.cuda.synchronize()
        else:
            dist.barrier()
        _, marks, rows, hit = _step(layer, dispatcher, x, logits, clock.mark)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i < warmup:
            continue
        for p, a, b in zip(PHASES, marks[:-1], marks[1:], strict=True):
            times[p].append(clock.elapsed_us(a, b))
        times["total"].append(clock.elapsed_us(marks[0], marks[-1]))
    return {"median_us": {p: statistics.median(v) for p, v in times.items()}, "rows": rows, "experts_hit": hit}


def _slowest(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _gather_ints(value: int, device: torch.device) -> list[int]:
    out = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([value], dtype=torch.int64, device=device))
    return [int(t) for t in out]


def main() -> None:
    args = _args()
    use_cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shape = TINY if args.tiny else DSV3
    tokens = [int(t) for t in args.tokens.split(",")]
    strategies = args.strategies.split(",")
    clock = _Clock(device)

    torch.manual_seed(0)  # the same weights everywhere; tokens differ per rank below
    parallel = ParallelConfig(ep_size=world)
    layer = ParallelFusedMoE(shape.E, shape.top_k, shape.K, shape.N, parallel=parallel, params_dtype=shape.dtype,
                             device=device, gate=False, backend=args.backend)
    group = layer.ranks.ep_group
    owners = expert_owners(shape.E, world, parallel.placement).to(device)
    dispatchers = {"allgather": AllGatherDispatch(group), "all_to_all": AllToAllDispatch(group, owners)}
    expert_bytes = (2 * shape.N * shape.K + shape.K * shape.N) * shape.dtype.itemsize

    results = []
    for t in tokens:
        g = torch.Generator(device=device).manual_seed(1000 * t + rank)
        x = torch.randn(t, shape.K, device=device, generator=g).to(shape.dtype)
        logits = torch.randn(t, shape.E, device=device, generator=g)
        outs = {s: _step(layer, dispatchers[s], x, logits, lambda: None)[0] for s in strategies}
        if len(outs) == 2 and t:
            assert_close(outs["all_to_all"], outs["allgather"].float(), dtype=shape.dtype,
                         what=f"rank {rank}, T={t}: all_to_all vs allgather")
        for s in strategies:
            r = _bench(layer, dispatchers[s], x, logits, args.warmup, args.iters, clock, device)
            med = {p: _slowest(v, device) for p, v in r["median_us"].items()}
            hit = _gather_ints(r["experts_hit"], device)
            results.append({
                "strategy": s, "tokens_per_rank": t, "median_us": med,
                "rows_computed": _gather_ints(r["rows"], device), "local_experts_hit": hit,
                "experts_weight_GBps": max(hit) * expert_bytes / med["experts"] / 1e3 if med["experts"] else 0.0,
            })
    decision = moe.last_decision()
    if rank == 0:
        _report(args, shape, world, device, decision.chosen if decision else "-", results)
    dist.destroy_process_group()


def _report(args: argparse.Namespace, shape: Shape, world: int, device: torch.device, backend: str,
            results: list[dict]) -> None:
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"EP over {world} ranks ({card}, {'nccl' if device.type == 'cuda' else 'gloo'}); E={shape.E} "
          f"top_k={shape.top_k} K={shape.K} N={shape.N} {str(shape.dtype).removeprefix('torch.')}; "
          f"experts backend {backend}; medians of {args.iters} iterations, slowest rank, us")
    print(f"{'strategy':<11} {'T/rank':>6} {'total':>9} {'route':>8} {'dispatch':>9} {'experts':>9} "
          f"{'combine':>9} {'rows/rank':>11} {'experts GB/s':>12}")
    for r in results:
        m = r["median_us"]
        print(f"{r['strategy']:<11} {r['tokens_per_rank']:>6} {m['total']:>9.1f} {m['route']:>8.1f} "
              f"{m['dispatch']:>9.1f} {m['experts']:>9.1f} {m['combine']:>9.1f} "
              f"{max(r['rows_computed']):>11} {r['experts_weight_GBps']:>12.1f}")
    if args.out:
        meta = {"card": card, "world": world, "torch": torch.__version__, "experts_backend": backend,
                "shape": {"E": shape.E, "top_k": shape.top_k, "K": shape.K, "N": shape.N,
                          "dtype": str(shape.dtype)},
                "warmup": args.warmup, "iters": args.iters}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
