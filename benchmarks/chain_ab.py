"""Chained launches (programmatic dependent launch) on and off, A/B in one process: for each preset:M,
the Triton kernels with the alignment done beforehand ("kernels", as `moe bench` times them), the
whole `fused_experts` call under a CUDA graph ("graph"), and routing from logits plus `fused_experts`
under a graph ("routed"), each under every variant of VARIANTS in turn, twice. Percent of floor uses
ceilings measured in the same run.

    python3 benchmarks/chain_ab.py mixtral:64 qwen3:16 qwen3:256
"""

from __future__ import annotations

import os
import sys

import torch

from moe.backends.base import ExpertsArgs
from moe.backends.triton import _choose_config, options, triton_experts
from moe.backends.triton.align import align
from moe.bench import PRESETS, _graph_time, _tokens, _weights, floor_seconds, measure_ceilings, time_fn
from moe.functional import fused_experts
from moe.routing import fused_topk

VARIANTS = {  # name -> environment
    "off": {"MOE_PDL": "0"},
    "on": {"MOE_PDL": "1"},
}


def cases(p, m, dev, gen):
    x, logits = _tokens(p, m, torch.bfloat16, dev, gen)
    w13, w2 = _weights(p, torch.bfloat16, dev, gen)
    w, ids = fused_topk(logits, p.top_k)
    args = ExpertsArgs(x, w13, w2, w, ids)
    problem = p.problem(dev.type, torch.bfloat16, m)
    cfg = _choose_config(problem, dev, options())
    al = align(ids, p.num_experts, cfg.block_m) if m > 1 else None
    out = torch.empty_like(x)
    kernels = lambda: triton_experts(args, problem, out, cfg, alignment=al)
    call = lambda: fused_experts(x, w13, w2, w, ids, activation=p.activation, backend="triton", out=out)

    def routed():
        rw, rids = fused_topk(logits, p.top_k)
        return fused_experts(x, w13, w2, rw, rids, activation=p.activation, backend="triton", out=out)

    hit = int(torch.unique(ids).numel())
    return hit, x.element_size(), {"kernels": kernels, "graph": call, "routed": routed}


def main(specs: list[str]) -> None:
    dev = torch.device("cuda")
    ceil = measure_ceilings(dev, torch.bfloat16)
    print(f"ceilings: copy {ceil.copy_gbps:.0f} GB/s, matmul {ceil.matmul_tflops:.0f} TFLOP/s")
    print(f"{'case':<14} {'mode':<8} " + " ".join(f"{v:>20}" for v in VARIANTS) + "  % floor")
    for spec in specs:
        name, m = spec.split(":")
        p, m = PRESETS[name], int(m)
        gen = torch.Generator(device=dev).manual_seed(0)
        hit, elt, fns = cases(p, m, dev, gen)
        floor = floor_seconds(p, m, hit, elt, ceil) * 1e6
        for mode, fn in fns.items():
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for _ in range(2):
                for v, env in VARIANTS.items():
                    os.environ.update(env)
                    t = time_fn(fn, dev) if mode == "kernels" else _graph_time(fn, dev)
                    times[v].append(t * 1e6)
            cells = " ".join(f"{' / '.join(f'{t:.1f}' for t in ts):>20}" for ts in times.values())
            pct = " -> ".join(f"{100 * floor / min(ts):.1f}" for ts in times.values())
            print(f"{spec:<14} {mode:<8} {cells}  {pct}", flush=True)
        del fns
        torch.cuda.empty_cache()
    for env in VARIANTS.values():
        for k in env:
            os.environ.pop(k, None)


if __name__ == "__main__":
    main(sys.argv[1:] or ["mixtral:64", "qwen3:1", "qwen3:16", "qwen3:256", "mixtral:1", "dsv3:1"])
