"""The rows the short tables read from `moe bench --json` files: each backend's `fused_experts` row (CUDA graphs
for M <= 256, eager above), timed."""

from __future__ import annotations

import json
from collections.abc import Iterator

GRAPH_MAX_M = 256


def fused_rows(paths: list[str]) -> Iterator[dict]:
    for path in paths:
        with open(path) as f:
            for r in json.load(f)["rows"]:
                if r["mode"] == ("graph" if r["m"] <= GRAPH_MAX_M else "eager") and r["time_us"] is not None:
                    yield r
