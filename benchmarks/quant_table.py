"""The short table of a `moe bench --quant` sweep: for each preset, token count and scheme, the
`fused_experts` row (CUDA graphs for M <= 256, eager above) of each backend: median us, percent of the
quantized floor, and the speed-up over the same backend's bf16 row of the same run.

    python3 benchmarks/quant_table.py OUT/bench_*.json
"""

from __future__ import annotations

import sys

from _rows import fused_rows


def main(paths: list[str]) -> int:
    table = {(r["preset"], r["m"], r["backend"], r["quant"]): r for r in fused_rows(paths) if r["quant"] != "none"}
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
