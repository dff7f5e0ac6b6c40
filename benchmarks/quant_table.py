"""The short table of a `moe bench --quant` sweep: for each preset, token count and scheme, the
`fused_experts` row (CUDA graphs for M <= 256, eager above) of each backend: median us, percent of the
quantized floor, and the speed-up over the same backend's bf16 row of the same run.

    python3 benchmarks/quant_table.py OUT/bench_*.json
"""

from __future__ import annotations

import json
import sys


def rows(paths: list[str]) -> list[dict]:
    out = []
    for path in paths:
        with open(path) as f:
            out += [r for r in json.load(f)["rows"] if r["quant"] != "none"]
    return out


def main(paths: list[str]) -> int:
    table = {}
    for r in rows(paths):
        if r["mode"] != ("graph" if r["m"] <= 256 else "eager") or r["time_us"] is None:
            continue
        table[(r["preset"], r["m"], r["backend"], r["quant"])] = r
    names = sorted({k[3] for k in table})
    print(f"{'preset':<11}{'M':>6} {'backend':<14}" + "".join(f"{n:>26}" for n in names))
    for preset, m, backend in sorted({k[:3] for k in table}, key=lambda k: (k[0], k[1], k[2])):
        cells = []
        for n in names:
            r = table.get((preset, m, backend, n))
            cells.append(f"{r['time_us']:9.1f} {r['pct_floor'] or 0:4.0f}% {r['vs_bf16'] or 0:5.2f}x" if r else "-")
        print(f"{preset:<11}{m:>6} {backend:<14}" + "".join(f"{c:>26}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
