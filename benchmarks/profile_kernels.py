"""Where the time of one ``fused_experts`` call goes, kernel by kernel (torch.profiler, CUDA time), with
each GEMM's achieved FLOP rate and weight bandwidth: the profile behind the targets the benchmark misses.

    python3 benchmarks/profile_kernels.py mixtral:256 qwen3:4096 dsv3:16384 [--backend deep_gemm] [--quant fp8_block]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import moe
from moe import fused_experts
from moe.routing import fused_topk
from moe.workload import PRESETS, random_tokens, random_weights

ITERS = 5


def kernel_times(call, iters: int = ITERS, warmup: int = 3) -> dict[str, float]:
    """CUDA time per kernel name (us per call) of ``call()``, from torch.profiler over ``iters`` calls.
    Chained launches are off meanwhile (the ``pdl`` option): a chained kernel starts early and waits on
    the GPU, so its profiled duration would include the wait for its predecessor."""
    with moe.override_options(pdl=False):
        for _ in range(warmup):
            call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                call()
            torch.cuda.synchronize()
    times: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            times[ev.name] += ev.time_range.elapsed_us() / iters
    return times


def profile_one(name: str, m: int, w13, w2, backend: str = "triton", quant: str | None = None) -> None:
    p = PRESETS[name]
    gen = torch.Generator(device="cuda").manual_seed(1)
    x, logits = random_tokens(p, m, torch.bfloat16, torch.device("cuda"), gen)
    w, ids = fused_topk(logits, p.top_k)
    hit = int(torch.unique(ids).numel())
    out = torch.empty_like(x)
    times = kernel_times(lambda: fused_experts(x, w13, w2, w, ids, out=out, backend=backend, quant=quant,
                                               activation=p.activation))
    K, N, pairs = p.hidden_size, p.intermediate_size, m * p.top_k
    work = {  # flops, weight bytes
        "moe_gemm1": (2 * pairs * K * 2 * N, hit * 2 * N * K * 2),
        "moe_gemm2": (2 * pairs * N * K, hit * K * N * 2),
    }
    total = sum(times.values())
    print(f"{name} M={m} {backend} {quant or 'bf16'}: {total:.0f} us of kernels per call, {len(times)} kernel kinds")
    for kname, t in sorted(times.items(), key=lambda kv: -kv[1]):
        flops, wbytes = work.get(kname, (0, 0))
        rate = f"  {flops / t / 1e6:6.0f} TFLOP/s  weights {wbytes / t / 1e3:6.0f} GB/s" if flops else ""
        print(f"  {kname[:40]:<40} {t:9.1f} us {100 * t / total:5.1f}%{rate}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", default=["mixtral:256", "qwen3:4096", "dsv3:16384"], help="preset:M ...")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--quant", default=None, help="a name of moe.quant.NAMES (weights quantized once)")
    a = ap.parse_args()
    by_preset: dict[str, list[int]] = defaultdict(list)
    for item in a.cases:
        name, m = item.split(":")
        by_preset[name].append(int(m))
    for name, ms in by_preset.items():
        p = PRESETS[name]
        gen = torch.Generator(device="cuda").manual_seed(0)
        w13, w2 = random_weights(p, torch.bfloat16, torch.device("cuda"), gen)
        if a.quant:
            scheme = moe.quant.named(a.quant).weights
            w13, w2 = moe.quant.quantize(w13, scheme, parts=p.parts), moe.quant.quantize(w2, scheme)
        for m in ms:
            profile_one(name, m, w13, w2, a.backend, a.quant)
        del w13, w2
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
