"""Time GEMM1's gate/up variants on this GPU: for each preset and token count, the config the backend
would pick (tuned file, else heuristic) with two dots, with one dot over interleaved gate/up columns,
and one dot at half the column tile. Prints a table; ``--json`` writes every measurement.

    python3 benchmarks/gate_up_experiment.py mixtral:4096 qwen3:4096 [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from moe.backends.base import ExpertsArgs
from moe.backends.triton import _choose_config, options, triton_experts
from moe.bench import GRAPH_MAX_M, PRESETS, _biases, _graph_time, _tokens, _weights, time_fn
from moe.routing import fused_topk
from moe.testing import rel_error


def variants(cfg):
    out = {"two_dots": cfg, "one_dot": cfg.model_copy(update={"gate_up": "one_dot"})}
    if cfg.gemm1.block_n >= 32:
        half = cfg.gemm1.model_copy(update={"block_n": cfg.gemm1.block_n // 2})
        out["one_dot_half_n"] = cfg.model_copy(update={"gate_up": "one_dot", "gemm1": half})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("points", nargs="+", help="preset:M")
    ap.add_argument("--json")
    a = ap.parse_args()
    dev = torch.device("cuda")
    results = []
    loaded: dict = {}
    for point in a.points:
        name, m = point.split(":")
        m = int(m)
        p = PRESETS[name]
        if name not in loaded:
            loaded.clear()
            torch.cuda.empty_cache()
            gen = torch.Generator(device=dev).manual_seed(0)
            loaded[name] = (*_weights(p, torch.bfloat16, dev, gen), *_biases(p, torch.bfloat16, dev, gen))
        w13, w2, b13, b2 = loaded[name]
        gen = torch.Generator(device=dev).manual_seed(m)
        x, logits = _tokens(p, m, torch.bfloat16, dev, gen)
        w, ids = fused_topk(logits, p.top_k)
        args = ExpertsArgs(x, w13, w2, w, ids, b13, b2)
        prob = p.problem("cuda", torch.bfloat16, m)
        base = _choose_config(prob, dev, options())
        ref = None
        row = {"preset": name, "m": m}
        for label, cfg in variants(base).items():
            out = torch.full_like(x, float("nan"))
            fn = lambda cfg=cfg, out=out, args=args, prob=prob: triton_experts(args, prob, out, cfg)
            fn()
            ref = out.clone() if ref is None else ref
            t = (_graph_time(fn, dev) if m <= GRAPH_MAX_M else time_fn(fn, dev)) * 1e6
            row[label] = {"us": t, "diff_vs_two_dots": rel_error(out, ref), "config": cfg.model_dump()}
        results.append(row)
        cells = "  ".join(f"{k} {v['us']:9.1f} us ({v['diff_vs_two_dots']:.1e})" for k, v in row.items()
                          if isinstance(v, dict))
        print(f"{name:<12} M={m:<6} {cells}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
