"""Host-side cost of one eager ``fused_experts`` call on the GPU (small M, where launches and Python
dominate): host microseconds per call with the GPU kept busy, with Triton's own launcher and with the
direct launches of kept compiled kernels; optionally a cProfile of where the host time goes.

    python3 benchmarks/host_overhead.py [--cases qwen3:1,qwen3:64,dsv3:1] [--quant NAME] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import moe
from moe import fused_experts
from moe.kernels.launch import direct_launch_status
from moe.routing import fused_topk
from moe.workload import PRESETS, quantize_workload, random_tokens, random_weights


def host_us(call, calls: int) -> tuple[float, float]:
    for _ in range(20):
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    return host * 1e6 / calls, total * 1e6 / calls


def measure(name: str, m: int, calls: int, profile: bool, quant: str | None = None) -> list[tuple[float, float]]:
    p = PRESETS[name]
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    w13, w2 = random_weights(p, torch.bfloat16, dev, gen)
    x, logits = random_tokens(p, m, torch.bfloat16, dev, gen)
    w, ids = fused_topk(logits, p.top_k)
    out = torch.empty_like(x)
    kw = {}
    if quant:
        q = quantize_workload(quant, p, w13, w2, None, gen)
        w13, w2, kw = q.w13, q.w2, dict(quant=quant, a13_scale=q.a13_scale, a2_scale=q.a2_scale)

    def call() -> None:
        fused_experts(x, w13, w2, w, ids, out=out, backend="triton", **kw)

    res = []
    for direct in (False, True):
        with moe.override_options(direct_launch=direct):
            res.append(host_us(call, calls))
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(500):
            call()
        prof.disable()
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="qwen3:1,qwen3:64,dsv3:1,mixtral:1")
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--quant", help="a quantization scheme of moe.quant.NAMES (default: unquantized)")
    a = ap.parse_args()
    print(f"direct launches: {direct_launch_status()[1]}")
    rows = []
    for case in a.cases.split(","):
        name, m = case.split(":")
        rows.append((case, *measure(name, int(m), a.calls, a.profile, a.quant)))
        torch.cuda.empty_cache()
    print("| case | host us/call, Triton launcher | direct launches | drained us/call (Triton / direct) |")
    print("|---|---:|---:|---:|")
    for case, (h0, t0), (h1, t1) in rows:
        print(f"| {case} | {h0:.1f} | {h1:.1f} | {t0:.1f} / {t1:.1f} |")


if __name__ == "__main__":
    main()
