"""Kernel-config experiment: for each preset:M, under variants of the config the backend would pick,
GEMM1 and GEMM2 CUDA time (torch.profiler, chained launches off) and TFLOP/s, the whole call timed as
`moe bench` times it (do_bench) with the SM clock and board power sampled meanwhile, and the registers,
spills and shared memory of each new compiled kernel. What limits a row, measured rather than guessed.

    python3 benchmarks/config_experiment.py mixtral:64 mixtral:16384 qwen3:4096
"""

from __future__ import annotations

import sys
import threading
import time

import torch
from profile_kernels import kernel_times  # the script beside this one

from moe.backends.base import ExpertsArgs
from moe.backends.triton import _choose_config, options, triton_experts
from moe.backends.triton.launch import _compiled
from moe.bench import PRESETS, _tokens, _weights, floor_seconds, measure_ceilings, time_fn
from moe.routing import fused_topk

CHANGES = [  # (gemm, field changes) tried on top of the chosen config
    ("gemm1", {"group_m": 16}), ("gemm1", {"group_m": 32}), ("gemm1", {"num_stages": 3}),
    ("gemm1", {"num_stages": 5}), ("gemm1", {"block_n": 64, "num_warps": 4}),
    ("gemm2", {"group_m": 16}), ("gemm2", {"group_m": 1}), ("gemm2", {"block_n": 64}),
    ("gemm2", {"block_n": 128, "num_stages": 4}), ("gemm2", {"num_stages": 4}),
    ("both", {"group_m": 16}), ("gemm2", {"block_n": 256}), ("gemm2", {"block_n": 256, "num_warps": 8}),
    ("gemm2", {"num_warps": 8}), ("gemm1", {"block_n": 128}), ("gemm1", {"num_warps": 8}),
    ("gemm2", {"num_stages": 3}), ("gemm2", {"block_k": 64}), ("gemm2", {"block_k": 64, "num_stages": 6}),
    ("gemm2", {"block_n": 64, "num_stages": 3}), ("gemm2", {"block_n": 256, "block_k": 64}),
]


def variants(cfg):
    out = {"chosen": cfg, "flip_gate_up": cfg.model_copy(
        update={"gate_up": "one_dot" if cfg.gate_up == "two_dots" else "two_dots"})}
    for which, change in CHANGES:
        update = {}
        for g in (("gemm1", "gemm2") if which == "both" else (which,)):
            update[g] = getattr(cfg, g).model_copy(update=change)
        new = cfg.model_copy(update=update)
        if new != cfg:
            out[which + "_" + "_".join(f"{k}{v}" for k, v in change.items())] = new
    tma = {"loads": "tma"}
    for name, update in (("tma_g1", {"gemm1": tma}), ("tma_g2", {"gemm2": tma}),
                         ("tma_both", {"gemm1": tma, "gemm2": tma}),
                         ("tma_both_s4", {"gemm1": {**tma, "num_stages": 4}, "gemm2": {**tma, "num_stages": 4}}),
                         ("tma_both_g1bn64", {"gemm1": {**tma, "block_n": 64}, "gemm2": tma})):
        new = cfg.model_copy(update={g: getattr(cfg, g).model_copy(update=ch) for g, ch in update.items()})
        out[name] = new
        out[name + "_flip"] = new.model_copy(update={"gate_up": "one_dot" if cfg.gate_up == "two_dots" else "two_dots"})
    return out


def sampled(fn, dev: torch.device) -> tuple[float, float, float]:
    """``fn()`` while a thread samples the SM clock (MHz) and board power (W) every 5 ms: the clocks the
    timed runs actually got, and whether the board sat at its power limit."""
    samples: list[tuple[int, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((torch.cuda.clock_rate(dev), torch.cuda.power_draw(dev) / 1000))
            time.sleep(0.005)

    t = threading.Thread(target=sample)
    t.start()
    try:
        result = fn()
    finally:
        done.set()
        t.join()
    n = max(1, len(samples))
    return result, sum(c for c, _ in samples) / n, sum(w for _, w in samples) / n


def run_point(point: str, only: str | None = None) -> None:
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
    ceil, mm_mhz, mm_w = sampled(lambda: measure_ceilings(dev, torch.bfloat16), dev)
    floor = floor_seconds(p, m, int(torch.unique(ids).numel()), 2, ceil) * 1e6
    print(f"{point}: floor {floor:.1f} us (copy {ceil.copy_gbps:.0f} GB/s, matmul {ceil.matmul_tflops:.0f} TFLOP/s, "
          f"measured at {mm_mhz:.0f} MHz, {mm_w:.0f} W); chosen {base.model_dump()}")
    print(f"{'variant':<26} {'gemm1 us':>9} {'TFLOP/s':>8} {'gemm2 us':>9} {'TFLOP/s':>8} {'kernels':>8} "
          f"{'bench us':>9} {'MHz':>5} {'W':>4}  regs/spills/smem of new kernels")
    for vname, cfg in variants(base).items():
        if only and vname != "chosen" and not any(
                vname == part or (part.endswith("*") and vname.startswith(part[:-1])) for part in only.split(",")):
            continue
        before = set(_compiled)
        try:
            times = kernel_times(lambda c=cfg: triton_experts(args, problem, out, c), iters=3, warmup=1)
        except Exception as exc:  # a variant that does not fit says so
            print(f"{vname:<26} failed: {str(exc)[:100]}")
            continue
        t1, t2 = times.get("moe_gemm1", 0.0), times.get("moe_gemm2", 0.0)
        bench, mhz, watts = sampled(  # timed as `moe bench` times it
            lambda c=cfg: time_fn(lambda: triton_experts(args, problem, out, c), dev) * 1e6, dev)
        regs = []
        for key in set(_compiled) - before:
            ck = _compiled[key][0]
            smem = getattr(getattr(ck, "metadata", None), "shared", "?")
            regs.append(f"{ck.name}:{getattr(ck, 'n_regs', '?')}/{getattr(ck, 'n_spills', '?')}/{smem}B")
        print(f"{vname:<26} {t1:9.1f} {f1 / t1 / 1e6 if t1 else 0:8.0f} {t2:9.1f} "
              f"{f2 / t2 / 1e6 if t2 else 0:8.0f} {sum(times.values()):8.1f} {bench:9.1f} {mhz:5.0f} {watts:4.0f}  "
              f"{' '.join(sorted(regs))}")


def main(argv: list[str]) -> None:
    only = None
    if "--only" in argv:  # --only A,B*: the chosen config, variant A and the variants whose name starts with B
        at = argv.index("--only")
        only, argv = argv[at + 1], argv[:at] + argv[at + 2:]
    for point in argv or ["mixtral:16384"]:
        run_point(point, only)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:])
