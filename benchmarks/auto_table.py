"""`auto` against the best single backend of the same `moe bench` run (issue 17's must-pass): for each preset,
token count and scheme (bf16 included), the `fused_experts` row (CUDA graphs for M <= 256, eager above) of
`auto` and of every named backend; auto's slowdown against the fastest, and whether it is within 3% or that
cell's spread ((max - min) / median of the two rows, the larger), as the issue allows.

    moe bench --preset dsv3 --m 1,4096 --quant fp8_block --backends triton,deep_gemm,auto --json b.json
    python3 benchmarks/auto_table.py b.json ...
"""

from __future__ import annotations

import sys

from _rows import fused_rows

ALLOWED = 0.03


def cells(paths: list[str]) -> dict[tuple, dict[str, dict]]:
    """(preset, m, quant) -> backend -> row; auto's rows under "auto" with the chosen name kept."""
    out: dict[tuple, dict[str, dict]] = {}
    for r in fused_rows(paths):
        name = "auto" if r["backend"].startswith("auto->") else r["backend"]
        out.setdefault((r["preset"], r["m"], r["quant"]), {})[name] = r
    return out


def spread(r: dict) -> float:
    return (r["max_us"] - r["min_us"]) / r["time_us"] if r.get("max_us") and r.get("min_us") else 0.0


def main(paths: list[str]) -> int:
    print(f"{'preset':<11}{'M':>6} {'scheme':<11} {'auto':<24} {'best single':<24} {'slower':>7} {'allowed':>8}")
    misses = 0
    for (preset, m, quant), by in sorted(cells(paths).items()):
        auto = by.pop("auto", None)
        if auto is None or not by:
            continue
        best = min(by, key=lambda b: by[b]["time_us"])
        slower = auto["time_us"] / by[best]["time_us"] - 1
        allowed = max(ALLOWED, spread(auto), spread(by[best]))
        ok = slower <= allowed
        misses += not ok
        a = f"{auto['backend'].removeprefix('auto->')} {auto['time_us']:.1f}"
        print(f"{preset:<11}{m:>6} {quant:<11} {a:<24} {best + ' ' + format(by[best]['time_us'], '.1f'):<24} "
              f"{slower:>+7.1%} {allowed:>7.0%}{'' if ok else '  MISS'}")
    print(f"auto within the allowance in every cell: {'yes' if not misses else f'no ({misses} misses)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
