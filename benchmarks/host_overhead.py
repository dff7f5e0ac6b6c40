"""Host-side cost of one eager ``fused_experts`` call on the GPU (small M, where launches and Python
dominate): calls per second with the GPU kept busy, and a cProfile of where the host time goes.

    python3 benchmarks/host_overhead.py [--preset qwen3] [--m 1]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from moe import fused_experts
from moe.bench import PRESETS, _tokens, _weights
from moe.routing import fused_topk


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--calls", type=int, default=2000)
    a = ap.parse_args()
    p = PRESETS[a.preset]
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    w13, w2 = _weights(p, torch.bfloat16, dev, gen)
    x, logits = _tokens(p, a.m, torch.bfloat16, dev, gen)
    w, ids = fused_topk(logits, p.top_k)
    out = torch.empty_like(x)

    def call() -> None:
        fused_experts(x, w13, w2, w, ids, out=out, backend="triton")

    for _ in range(20):
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.calls):
        call()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    per = 1e6 / a.calls
    print(f"{p.name} M={a.m}: host {host * per:.1f} us/call, with the GPU drained {total * per:.1f} us/call")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(500):
        call()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(28)
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
