"""``moe bench``: every usable backend on a workload, timed against the roofline floor and checked
against the reference.

Method (shared/ANCHORS.md): fresh random logits -> softmax -> top-k -> renormalize; experts hit are
counted from the ids for the floor; ``fused_experts`` is timed from weights and routing ids with
alignment and allocation inside; a ``FusedMoE.forward`` row times the layer from router logits; on
CUDA small batches are also timed as CUDA-graph replays; both ceilings (copy bandwidth, matmul rate)
are measured in the same run. The reference upcasts one expert at a time.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from .backends.torch_ref import torch_ref_experts
from .contract import ExpertsArgs, ExpertsProblem
from .functional import fused_experts
from .layer import FusedMoE
from .registry import BackendUnavailableError, list_backends, select_backend
from .routing import fused_topk
from .testing import rel_error
from .workload import (
    PRESETS,
    Ceilings,
    Preset,
    floor_seconds,
    graph_time,
    measure_ceilings,
    random_biases,
    random_tokens,
    random_weights,
    time_fn,
)

__all__ = ["GRAPH_MAX_M", "KERNELS_MAX_M", "Row", "run_bench"]


GRAPH_MAX_M = 256
KERNELS_MAX_M = 1024  # "kernels" rows (routing aligned beforehand) up to here, as ANCHORS.md times vLLM
REFERENCE_TIMING_MAX_PAIRS = 8192  # the per-expert reference is an oracle, not a contender


@dataclass
class Row:
    preset: str
    m: int
    backend: str
    mode: str  # eager | graph | layer
    time_us: float | None
    floor_us: float
    pct_floor: float | None
    rel_err: float | None
    note: str = ""
    extra: dict = field(default_factory=dict)


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled, self.t0 = total, 0, enabled, time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        if self.enabled:
            el = time.perf_counter() - self.t0
            print(f"\r[{self.done}/{self.total}] {el:6.1f}s {what:<48}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def run_bench(
    preset: str = "default",
    ms: tuple[int, ...] | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    backends: tuple[str, ...] | None = None,
    progress: bool = True,
) -> tuple[Ceilings, list[Row]]:
    p = PRESETS[preset]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    ms = ms or p.default_m
    ceil = measure_ceilings(dev, dtype)
    gen = torch.Generator(device=dev).manual_seed(0)
    names = backends or tuple(b.name for b in list_backends())
    bar = _Progress(len(ms) * (len(names) + 1), progress)
    rows: list[Row] = []
    w13, w2 = random_weights(p, dtype, dev, gen)
    b13, b2 = random_biases(p, dtype, dev, gen)
    for m in ms:
        x, logits = random_tokens(p, m, dtype, dev, gen)
        weights, ids = fused_topk(logits, p.top_k)
        hit = int(torch.unique(ids).numel())
        floor = floor_seconds(p, m, hit, x.element_size(), ceil)
        args = ExpertsArgs(x, w13, w2, weights, ids, b13, b2)
        problem = p.problem(dev, dtype, m)
        ref = torch_ref_experts(args, problem, compute_dtype=torch.float32)
        for name in names:
            bar.step(f"{preset} M={m} {name}")
            rows.extend(_bench_backend(name, p, m, args, problem, ref, floor, dev))
        bar.step(f"{preset} M={m} FusedMoE.forward")
        rows.append(_bench_layer(p, m, args, logits, ref, floor, dev))
        del x, ref
    bar.close()
    return ceil, rows


def _bench_backend(name: str, p: Preset, m: int, args: ExpertsArgs, problem: ExpertsProblem,
                   ref: torch.Tensor, floor: float, dev: torch.device) -> list[Row]:
    try:
        select_backend(problem, name)
    except BackendUnavailableError as err:
        return [Row(p.name, m, name, "eager", None, floor * 1e6, None, None, f"skipped: {err}")]
    if name == "torch" and dev.type == "cuda" and m * p.top_k > REFERENCE_TIMING_MAX_PAIRS:
        return [Row(p.name, m, name, "eager", None, floor * 1e6, None, None, "reference: not timed at this size")]

    def call() -> torch.Tensor:
        return fused_experts(args.hidden_states, args.w13, args.w2, args.topk_weights, args.topk_ids,
                             activation=p.activation, w13_bias=args.w13_bias, w2_bias=args.w2_bias, backend=name)

    out = call()
    err = rel_error(out, ref)
    t = time_fn(call, dev)
    rows = [Row(p.name, m, name, "eager", t * 1e6, floor * 1e6, 100 * floor / t, err)]
    if dev.type == "cuda" and m <= GRAPH_MAX_M and name != "torch":
        try:
            tg = graph_time(call, dev)
            rows.append(Row(p.name, m, name, "graph", tg * 1e6, floor * 1e6, 100 * floor / tg, err))
        except Exception as exc:  # a backend that cannot be captured says so in the table
            rows.append(Row(p.name, m, name, "graph", None, floor * 1e6, None, err, f"not capturable: {exc}"))
    if name == "triton" and dev.type == "cuda" and m <= KERNELS_MAX_M:
        rows.append(_bench_triton_kernels(p, m, args, problem, ref, floor, dev))
    return rows


def _bench_triton_kernels(p: Preset, m: int, args: ExpertsArgs, problem: ExpertsProblem, ref: torch.Tensor,
                          floor: float, dev: torch.device) -> Row:
    """The Triton kernels alone, eager, with the routing aligned beforehand: how ANCHORS.md times vLLM's
    Triton kernel up to 1024 tokens (mode "kernels")."""
    from .backends.triton import choose_config, triton_experts
    from .kernels.align import align

    cfg = choose_config(problem, dev)
    al = align(args.topk_ids, problem.num_experts, cfg.block_m, args.expert_map) if m > 1 else None
    out = torch.empty_like(args.hidden_states)

    def call() -> torch.Tensor:
        return triton_experts(args, problem, out, cfg, alignment=al)

    call()
    err = rel_error(out, ref)
    t = time_fn(call, dev)
    return Row(p.name, m, "triton", "kernels", t * 1e6, floor * 1e6, 100 * floor / t, err)


def _bench_layer(p: Preset, m: int, args: ExpertsArgs, logits: torch.Tensor, ref: torch.Tensor, floor: float,
                 dev: torch.device) -> Row:
    x = args.hidden_states
    layer = FusedMoE(p.num_experts, p.top_k, p.hidden_size, p.intermediate_size, gate=False,
                     activation=p.activation, bias=p.bias, params_dtype=x.dtype, device="meta")
    layer.w13_weight = torch.nn.Parameter(args.w13, requires_grad=False)
    layer.w2_weight = torch.nn.Parameter(args.w2, requires_grad=False)
    if p.bias:
        layer.w13_bias = torch.nn.Parameter(args.w13_bias, requires_grad=False)
        layer.w2_bias = torch.nn.Parameter(args.w2_bias, requires_grad=False)
    with torch.no_grad():
        out = layer(x, logits)
        chosen = select_backend(p.problem(dev, x.dtype, m)).chosen
        t = time_fn(lambda: layer(x, logits), dev)
    return Row(p.name, m, f"auto->{chosen}", "layer", t * 1e6, floor * 1e6, 100 * floor / t, rel_error(out, ref))


def format_table(ceil: Ceilings, rows: list[Row]) -> str:
    head = (f"device: {ceil.device}   ceilings (measured now): copy {ceil.copy_gbps:,.0f} GB/s, "
            f"matmul {ceil.matmul_tflops:.4g} TFLOP/s")
    lines = [head, f"{'preset':<8} {'M':>6} {'backend':<18} {'mode':<6} {'time us':>10} {'floor us':>10} "
                   f"{'% floor':>8} {'rel err':>9}  note"]
    for r in rows:
        t = f"{r.time_us:10.1f}" if r.time_us is not None else f"{'-':>10}"
        pct = f"{r.pct_floor:7.1f}%" if r.pct_floor is not None else f"{'-':>8}"
        err = f"{r.rel_err:9.2e}" if r.rel_err is not None else f"{'-':>9}"
        lines.append(f"{r.preset:<8} {r.m:>6} {r.backend:<18} {r.mode:<6} {t} {r.floor_us:10.1f} {pct} {err}  {r.note}")
    return "\n".join(lines)


def write_json(path: str, ceil: Ceilings, rows: list[Row]) -> None:
    with open(path, "w") as f:
        json.dump({"ceilings": asdict(ceil), "rows": [asdict(r) for r in rows]}, f, indent=1)


def plot(path: str, rows: list[Row]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install 'moe-layer[plot]'") from exc
    fig, ax = plt.subplots(figsize=(7, 4))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r.pct_floor is not None:
            series.setdefault(f"{r.preset} {r.backend} {r.mode}", []).append((r.m, r.pct_floor))
    for label, pts in series.items():
        ax.plot([m for m, _ in pts], [v for _, v in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens (M)")
    ax.set_ylabel("% of roofline floor")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
