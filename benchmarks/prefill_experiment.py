"""Prefill kernel-config experiment: for each preset:M, GEMM1 and GEMM2 CUDA time (torch.profiler) and
TFLOP/s under variants of the config the backend would pick, with the registers and spills of each
compiled kernel. What limits the prefill rows, measured rather than guessed.

    python3 benchmarks/prefill_experiment.py mixtral:16384 qwen3:4096
"""

from __future__ import annotations

import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from moe.backends.base import ExpertsArgs
from moe.backends.triton import _choose_config, options, triton_experts
from moe.backends.triton.launch import _compiled
from moe.bench import PRESETS, _tokens, _weights
from moe.routing import fused_topk


def variants(cfg):
    g1, g2 = cfg.gemm1, cfg.gemm2
    out = {"chosen": cfg, "flip_gate_up": cfg.model_copy(
        update={"gate_up": "one_dot" if cfg.gate_up == "two_dots" else "two_dots"})}
    for name, t1 in {
        "g1_group16": g1.model_copy(update={"group_m": 16}),
        "g1_group32": g1.model_copy(update={"group_m": 32}),
        "g1_stages3": g1.model_copy(update={"num_stages": 3}),
        "g1_stages5": g1.model_copy(update={"num_stages": 5}),
        "g1_bn64_w4": g1.model_copy(update={"block_n": 64, "num_warps": 4}),
        "g1_bk128_s3": g1.model_copy(update={"block_k": 128, "num_stages": 3}),
    }.items():
        out[name] = cfg.model_copy(update={"gemm1": t1})
    out["g2_group16"] = cfg.model_copy(update={"gemm2": g2.model_copy(update={"group_m": 16})})
    out["g2_bn128_s4"] = cfg.model_copy(update={"gemm2": g2.model_copy(update={"block_n": 128, "num_stages": 4})})
    return out


def kernel_times(call, iters: int = 3) -> dict[str, float]:
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


def run_point(point: str) -> None:
    dev = torch.device("cuda")
    name, m = point.split(":")
    m = int(m)
    p = PRESETS[name]
    gen = torch.Generator(device=dev).manual_seed(0)
    w13, w2 = _weights(p, torch.bfloat16, dev, gen)
    x, logits = _tokens(p, m, torch.bfloat16, dev, gen)
    w, ids = fused_topk(logits, p.top_k)
    args = ExpertsArgs(x, w13, w2, w, ids)
    problem = p.problem("cuda", torch.bfloat16, m)
    out = torch.empty_like(x)
    pairs, K, N = m * p.top_k, p.hidden_size, p.intermediate_size
    f1, f2 = 2 * pairs * K * 2 * N, 2 * pairs * N * K
    base = _choose_config(problem, dev, options())
    print(f"{point}: chosen {base.model_dump()}")
    print(f"{'variant':<14} {'gemm1 us':>9} {'TFLOP/s':>8} {'gemm2 us':>9} {'TFLOP/s':>8} {'all us':>8}  "
          "regs/spills of new kernels")
    for vname, cfg in variants(base).items():
        before = set(_compiled)
        try:
            times = kernel_times(lambda c=cfg: triton_experts(args, problem, out, c))
        except Exception as exc:  # a variant that does not fit says so
            print(f"{vname:<14} failed: {str(exc)[:100]}")
            continue
        t1, t2 = times.get("moe_gemm1", 0.0), times.get("moe_gemm2", 0.0)
        regs = []
        for key in set(_compiled) - before:
            ck = _compiled[key][0]
            regs.append(f"{ck.name}:{getattr(ck, 'n_regs', '?')}/{getattr(ck, 'n_spills', '?')}")
        print(f"{vname:<14} {t1:9.1f} {f1 / t1 / 1e6 if t1 else 0:8.0f} {t2:9.1f} "
              f"{f2 / t2 / 1e6 if t2 else 0:8.0f} {sum(times.values()):8.1f}  {' '.join(sorted(regs))}")


def main(points: list[str]) -> None:
    for point in points or ["mixtral:16384"]:
        run_point(point)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:])
