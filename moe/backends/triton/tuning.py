"""A first config sweep for the Triton backend: time candidate kernel configs on the current GPU for a
preset and token counts (small counts as CUDA-graph replays), next to the default heuristic.

``python -m moe.backends.triton.tuning --preset mixtral --m 1,64,4096`` prints, per token count, the
heuristic's time, the best candidate and its config; ``--json`` keeps every measurement. It is the
measuring half of ``moe tune`` (tuned files and their lookup come with the tuner).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from ...bench import PRESETS, _graph_time, _tokens, _weights, time_fn
from ...config import ActivationSpec
from ...routing import fused_topk
from ..base import ExpertsArgs, ExpertsProblem
from . import triton_experts
from .config import SMEM_BUDGET, GemmTile, KernelConfig, default_config


def candidates(rows_per_expert: float, elt: int, gated: bool = True) -> list[KernelConfig]:
    """A pruned space around the regime: thin tiles for weight streaming, wide ones for compute."""
    if rows_per_expert <= 16:
        space = itertools.product([16], [32, 64, 128], [128, 256], [4], [3, 4, 5], [1])
    elif rows_per_expert <= 256:
        space = itertools.product([32, 64, 128], [64, 128], [64, 128], [4], [3, 4], [8])
    else:
        space = itertools.product([64, 128], [128, 256], [64], [4, 8], [3, 4], [8])
    out = []
    for bm, bn, bk, warps, stages, group in space:
        tile = GemmTile(block_n=bn, block_k=bk, group_m=group, num_warps=warps, num_stages=stages)
        cfg = KernelConfig(block_m=bm, gemm1=tile, gemm2=tile)
        if max(cfg.smem_bytes(elt, gated)) <= SMEM_BUDGET:
            out.append(cfg)
    return out


def sweep(preset: str, ms: list[int], graph_max_m: int = 256, limit: int | None = None) -> list[dict]:
    p = PRESETS[preset]
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    w13, w2 = _weights(p, dtype, dev, gen)
    results = []
    for m in ms:
        x, logits = _tokens(p, m, dtype, dev, gen)
        w, ids = fused_topk(logits, p.top_k)
        args = ExpertsArgs(x, w13, w2, w, ids)
        prob = ExpertsProblem("cuda", dtype, m, p.num_experts, p.num_experts, p.hidden_size,
                              p.intermediate_size, p.top_k, ActivationSpec())
        out = torch.empty_like(x)
        pairs = m * p.top_k
        rpe = pairs / max(1, min(p.num_experts, pairs))

        def timed(cfg: KernelConfig, args=args, prob=prob, out=out, m=m) -> float:
            fn = lambda: triton_experts(args, prob, out, cfg)
            return (_graph_time(fn, dev) if m <= graph_max_m else time_fn(fn, dev)) * 1e6

        base_cfg = default_config(prob)
        row = {"preset": preset, "m": m, "heuristic_us": timed(base_cfg), "heuristic": base_cfg.model_dump()}
        best = (row["heuristic_us"], base_cfg)
        cands = candidates(rpe, x.element_size())[:limit]
        for i, cfg in enumerate(cands):
            try:
                t = timed(cfg)
            except Exception as exc:  # a config the compiler rejects is skipped and reported
                print(f"  skip {cfg.model_dump()}: {type(exc).__name__}: {exc}"[:200], file=sys.stderr)
                continue
            if t < best[0]:
                best = (t, cfg)
            print(f"\r  {preset} M={m} [{i + 1}/{len(cands)}] best {best[0]:.1f} us", end="", file=sys.stderr)
        print(file=sys.stderr)
        atomic = best[1].model_copy(update={"combine": "atomic"})
        row.update(best_us=best[0], best=best[1].model_dump(), atomic_us=timed(atomic))
        results.append(row)
        print(f"{preset:<8} M={m:<6} heuristic {row['heuristic_us']:9.1f} us  best {best[0]:9.1f} us "
              f"(x{row['heuristic_us'] / best[0]:.2f})  atomic-combine {row['atomic_us']:9.1f} us  "
              f"{best[1].model_dump_json()}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="mixtral", choices=sorted(PRESETS))
    ap.add_argument("--m", default="1,16,64,256,1024,4096,16384")
    ap.add_argument("--limit", type=int, default=None, help="at most this many candidates per token count")
    ap.add_argument("--json", help="write every measurement here")
    a = ap.parse_args(argv)
    res = sweep(a.preset, [int(v) for v in a.m.split(",")], limit=a.limit)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
