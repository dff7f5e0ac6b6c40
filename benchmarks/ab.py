"""A/B of the benchmark table between two source trees, on one card in one command.

Each round runs one worker process per tree (alternating which goes first); a worker times the
``fused_experts`` row of ``moe bench`` for every (preset, M) cell (the Triton backend, CUDA-graph replays
for M <= 256, eager above; the same random weights, tokens and routing in every process). The driver
compares median times, not percentages (whose ceiling moves), and flags a cell where B is slower than A by
more than max(3%, twice A's own round-to-round spread).

    python3 benchmarks/ab.py --tree A=/path/to/before --tree B=. [--rounds 3] [--presets mixtral,qwen3,dsv3]
                             [--ms 1,16,64,256,1024,4096,16384] [--out results.json]

The worker uses only what both trees have (``fused_experts``, ``fused_topk``, torch and triton), so an
older tree can be the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

GRAPH_MAX_M = 256


def _worker(presets: list[str], ms: list[int], rep_ms: int) -> dict:
    import torch
    from triton.testing import do_bench

    import moe

    shapes = {"mixtral": (8, 2, 4096, 14336), "qwen3": (128, 8, 2048, 768), "dsv3": (256, 8, 7168, 2048),
              "gptoss20b": (32, 4, 2880, 2880), "qwen2moe57b": (64, 8, 3584, 2560)}
    dev = torch.device("cuda")
    out: dict[str, dict[int, float]] = {}
    for name in presets:
        e, k, hidden, inter = shapes[name]
        gen = torch.Generator(device=dev).manual_seed(0)
        w13 = torch.randn(e, 2 * inter, hidden, generator=gen, device=dev, dtype=torch.bfloat16).mul_(hidden**-0.5)
        w2 = torch.randn(e, hidden, inter, generator=gen, device=dev, dtype=torch.bfloat16).mul_(inter**-0.5)
        out[name] = {}
        for m in ms:
            x = torch.randn(m, hidden, generator=gen, device=dev, dtype=torch.bfloat16)
            w, ids = moe.fused_topk(torch.randn(m, e, generator=gen, device=dev), k)
            y = torch.empty_like(x)

            def call(x=x, w=w, ids=ids, y=y, w13=w13, w2=w2):
                return moe.fused_experts(x, w13, w2, w, ids, backend="triton", out=y)

            call()
            torch.cuda.synchronize()
            if m <= GRAPH_MAX_M:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    call()
                fn = graph.replay
            else:
                fn = call
            out[name][m] = 1e3 * do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median")
        del w13, w2
        torch.cuda.empty_cache()
    return out


def _run_tree(path: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(path), *filter(None, [env.get("AB_SITE")])])
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--presets", args.presets, "--ms", args.ms,
           "--rep-ms", str(args.rep_ms)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=os.path.abspath(path))
    if proc.returncode:
        raise SystemExit(f"worker for {path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _compare(results: dict[str, list[dict]], names: tuple[str, str]) -> list[dict]:
    a_name, b_name = names
    rows = []
    for preset, cells in results[a_name][0].items():
        for m in cells:
            a = [r[preset][m] for r in results[a_name]]
            b = [r[preset][m] for r in results[b_name]]
            a_med, b_med = statistics.median(a), statistics.median(b)
            spread = (max(a) - min(a)) / a_med
            limit = max(0.03, 2 * spread)
            rows.append({"preset": preset, "m": int(m), "a_us": a_med, "b_us": b_med, "ratio": b_med / a_med,
                         "a_spread": spread, "limit": limit, "slower": b_med / a_med - 1 > limit, "a": a, "b": b})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", action="append", default=[], help="NAME=PATH, twice (A, then B)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--presets", default="mixtral,qwen3,dsv3")
    ap.add_argument("--ms", default="1,16,64,256,1024,4096,16384")
    ap.add_argument("--rep-ms", type=int, default=100)
    ap.add_argument("--out")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    ms = [int(v) for v in args.ms.split(",")]
    if args.worker:
        print(json.dumps(_worker(args.presets.split(","), ms, args.rep_ms)))
        return 0
    if len(args.tree) != 2 or any("=" not in t for t in args.tree):
        raise SystemExit("--tree: give exactly two, NAME=PATH each (A first)")
    trees = [tuple(t.split("=", 1)) for t in args.tree]
    names = (trees[0][0], trees[1][0])
    results: dict[str, list[dict]] = {n: [] for n in names}
    t0 = time.time()
    for r in range(args.rounds):
        order = trees if r % 2 == 0 else trees[::-1]
        for name, path in order:
            results[name].append(_run_tree(path, args))
            print(f"round {r + 1} {name} done at {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    rows = _compare(results, names)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"trees": dict(trees), "rounds": args.rounds, "rows": rows}, f, indent=1)
    print(f"| preset | M | {names[0]} us (median of {args.rounds}) | {names[1]} us | {names[1]}/{names[0]} | "
          f"{names[0]} spread | limit | verdict |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        verdict = "SLOWER" if row["slower"] else "ok"
        print(f"| {row['preset']} | {row['m']} | {row['a_us']:.1f} | {row['b_us']:.1f} | {row['ratio']:.3f} | "
              f"{100 * row['a_spread']:.1f}% | {100 * row['limit']:.1f}% | {verdict} |")
    slower = [r for r in rows if r["slower"]]
    print(f"{len(slower)} of {len(rows)} cells slower than the limit")
    return 1 if slower else 0


if __name__ == "__main__":
    sys.exit(main())
