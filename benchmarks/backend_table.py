"""Every backend side by side from `moe bench --backends a,b,...` runs: for each preset, token count and scheme,
each backend's `fused_experts` row (CUDA graphs for M <= 256, eager above) as median us and percent of the
floor, and torch's two bare grouped GEMMs (the "gemms" row, the bound for two separate GEMMs) beside them.
Markdown, as docs/performance.md quotes it.

    python3 benchmarks/backend_table.py OUT/bench_*.json
"""

from __future__ import annotations

import json
import sys

from _rows import fused_rows

GEMMS = "torch._grouped_mm"


def main(paths: list[str]) -> int:
    cells = {(r["preset"], r["m"], r["quant"], r["backend"]): r for r in fused_rows(paths)
             if not r["backend"].startswith("auto->")}
    for path in paths:  # the two-GEMM row is timed eagerly at every M
        with open(path) as f:
            cells.update({(r["preset"], r["m"], r["quant"], GEMMS): r for r in json.load(f)["rows"]
                          if r["mode"] == "gemms" and r["time_us"] is not None})
    names = sorted({k[3] for k in cells} - {GEMMS}, key=lambda b: (b != "triton", b))
    names += [GEMMS] if any(k[3] == GEMMS for k in cells) else []
    heads = ["2 GEMMs (bound)" if b == GEMMS else b for b in names]
    print("| preset | M | scheme | floor us | " + " | ".join(heads) + " |")
    print("|---|---:|---|---:|" + "---:|" * len(names))
    for preset, m, quant in sorted({k[:3] for k in cells}, key=lambda k: (k[0], k[1], k[2])):
        rows = [cells.get((preset, m, quant, b)) for b in names]
        floor = next(r["floor_us"] for r in rows if r)
        shown = [f"{r['time_us']:,.1f} ({r['pct_floor'] or 0:.0f}%)" if r else "-" for r in rows]
        print(f"| {preset} | {m} | {quant} | {floor:,.1f} | " + " | ".join(shown) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
