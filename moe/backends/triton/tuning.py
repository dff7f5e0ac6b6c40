"""``moe tune``: time candidate kernel configs of the Triton backend on the current GPU (small token
counts as CUDA-graph replays) next to the default heuristic, and write the winners as a tuned file.

The file is rewritten after every token count, and a rerun skips the counts it already holds, so a tune
cut off by a time limit resumes where it stopped. ``python -m moe.backends.triton.tuning`` is the older
sweep entry point (prints, writes every measurement with ``--json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import torch

from ...contract import ExpertsArgs
from ...routing import fused_topk
from ...workload import (
    PRESETS,
    Preset,
    graph_time,
    quantize_workload,
    random_biases,
    random_tokens,
    random_weights,
    time_fn,
)
from . import prepared_scales, triton_experts
from .config import (
    SMEM_BUDGET,
    GemmTile,
    KernelConfig,
    default_config,
    fit_smem,
    input_bytes,
    operand_bytes,
    with_loads,
)

TUNE_REP_MS = 40  # do_bench repetitions per candidate: enough to rank them, a third of the benchmark's


def _tiles(rows_per_expert: float, elt: float = 2) -> list[tuple[int, GemmTile]]:
    """(block_m, tile) pairs of a pruned space around the regime: thin row tiles while the weights stream,
    wide ones once it is compute-bound. group_m 64 sweeps every row tile of a column before the next
    column, so an expert's row tiles share its weight tiles through L2. Weight tiles of a byte or less an
    element (fp8, int8; packed 4-bit) try deeper pipelines while streaming: the same bytes in flight take
    twice the stages of a bf16 tile (or more)."""
    if rows_per_expert <= 16:
        stages = [4, 8] if elt <= 1 else [3, 5]
        space = itertools.product([16, 32], [32, 64, 128], [128, 256], [4], stages, [1, 64])
    elif rows_per_expert <= 256:
        space = [(bm, bn, bk, 8 if bm == 128 else 4, stages, group)  # 128-row tiles need 8 warps' registers
                 for bm, bn, bk, stages, group in itertools.product([32, 64, 128], [64, 128], [64, 128], [3, 4],
                                                                    [8, 64])]
    else:
        # 1-byte operands also try 128-wide K tiles: a block-scaled GEMM scales each step's partial product
        space = itertools.product([64, 128], [64, 128, 256], [64, 128] if elt <= 1 else [64], [4, 8], [3, 4], [8])
    return [(bm, GemmTile(block_n=bn, block_k=bk, group_m=group, num_warps=warps, num_stages=stages))
            for bm, bn, bk, warps, stages, group in space]


def _fits(cfg: KernelConfig, elt: float, gated: bool, k_block: int | None = None,
          input_elt: tuple[int, int] | None = None) -> bool:
    """Within the shared-memory budget (``input_elt``: the input tiles' bytes an element, as
    ``config.input_bytes``) and, for block-scaled weights (``k_block`` columns a scale), with K tiles
    that never straddle a scale block."""
    if k_block is not None and (k_block % cfg.gemm1.block_k or k_block % cfg.gemm2.block_k):
        return False
    return max(cfg.smem_bytes(elt, gated, input_elt)) <= SMEM_BUDGET


def candidates(rows_per_expert: float, elt: float, gated: bool = True, k_block: int | None = None,
               input_elt: tuple[int, int] | None = None) -> list[KernelConfig]:
    """The first stage of the search: one tile for both GEMMs."""
    cfgs = (KernelConfig(block_m=bm, gemm1=t, gemm2=t) for bm, t in _tiles(rows_per_expert, elt))
    return [c for c in cfgs if _fits(c, elt, gated, k_block, input_elt)]


def refinements(best: KernelConfig, rows_per_expert: float, elt: float, gated: bool, gemm: str,
                k_block: int | None = None, input_elt: tuple[int, int] | None = None) -> list[KernelConfig]:
    """Later stages: keep the winner's row tile and the other GEMM's tile, vary this GEMM's tile."""
    cfgs = (best.model_copy(update={gemm: t}) for bm, t in _tiles(rows_per_expert, elt) if bm == best.block_m)
    return [c for c in cfgs if _fits(c, elt, gated, k_block, input_elt) and c != best]


def load_variants(best: KernelConfig) -> list[KernelConfig]:
    """The last stage: the winner with each GEMM's loads switched (pointer <-> tensor descriptors)."""
    flip = {"pointer": "tma", "tma": "pointer"}
    return [with_loads(best, **{g: flip[getattr(best, g).loads] for g in gemms})
            for gemms in (("gemm1",), ("gemm2",), ("gemm1", "gemm2"))]


def split_variants(best: KernelConfig) -> list[KernelConfig]:
    """The winner with GEMM2's reduction in 2, 4 and 8 parts (added up by the reduce combine)."""
    return [best.model_copy(update={"split_k": n, "combine": "reduce"}) for n in (2, 4, 8) if n != best.split_k]


def decode_variants(best: KernelConfig) -> list[KernelConfig]:
    """The winner with the 4-bit decode's other choices: byte or mask order (``decode_order``), scalar or
    paired scale multiplies (``dequant_math``)."""
    return [best.model_copy(update={"decode_order": order, "dequant_math": math})
            for order in ("bytes", "masks") for math in ("scalar", "pairs")
            if (order, math) != (best.decode_order, best.dequant_math)]


def _search(timed, cands: list[KernelConfig], best: list, label: str, limit: int | None) -> None:
    """Time ``cands`` and keep the fastest in ``best`` ([time_us, config], updated in place)."""
    for i, cfg in enumerate(cands[:limit]):
        try:
            t = timed(cfg)
        except Exception as exc:  # a config the compiler rejects is skipped and reported
            print(f"  skip {cfg.model_dump()}: {type(exc).__name__}: {exc}"[:200], file=sys.stderr)
            continue
        if t < best[0]:
            best[:] = [t, cfg]
        print(f"\r  {label} [{i + 1}/{len(cands)}] best {best[0]:.1f} us", end="", file=sys.stderr)
    print(file=sys.stderr)


def _int4_weight_only(prob) -> bool:
    w = prob.quant.weights
    return w is not None and prob.quant.activations is None and w.format == "int4"


def _four_bit_weight_only(prob) -> bool:
    w = prob.quant.weights
    return w is not None and prob.quant.activations is None and w.packed


def _other_group_scales(cfg: KernelConfig, group: int) -> KernelConfig:
    """``cfg`` with int4 group scales in the other place; on the partial products with K steps of at most
    one group."""
    if cfg.group_scales == "accumulator":
        return cfg.model_copy(update={"group_scales": "weights"})
    fit = {g: getattr(cfg, g).model_copy(update={"block_k": min(getattr(cfg, g).block_k, group)})
           for g in ("gemm1", "gemm2")}
    return cfg.model_copy(update={"group_scales": "accumulator", **fit})


def sweep(preset: str | Preset, ms: list[int], graph_max_m: int = 256, limit: int | None = None,
          dtype: torch.dtype = torch.bfloat16, on_result=None, atomic: bool = False,
          quant: str | None = None) -> list[dict]:
    """For each token count: the heuristic, then a joint search (same tile for both GEMMs), then the
    second GEMM's tile, then the first's, then the winner with its loads switched (not for weight-only
    schemes, whose tiles are decoded from pointer loads; for dynamic W8A8,
    GEMM2's input choice; for int4 weight-only, its group scales' place; for 4-bit weight-only, the
    decode's order and scale multiplies; while the weights stream, GEMM2 split in parts), each keeping the
    best so far.
    ``quant``: a name of ``moe.quant.NAMES``; the weights are quantized once (static activation
    scales calibrated as ``moe bench`` does) and the configs timed on the quantized call."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    w13, w2 = random_weights(p, dtype, dev, gen)
    b13, b2 = random_biases(p, dtype, dev, gen)
    q = quantize_workload(quant, p, w13, w2, b13, gen) if quant else None
    if q is not None:
        del w13, w2  # only the quantized copy is timed
        w13, w2 = q.w13, q.w2
    w_scheme = q.config.weights if q is not None else None
    k_block = w_scheme.block[1] if w_scheme is not None and w_scheme.granularity == "block" else None
    results = []
    for m in ms:
        x, logits = random_tokens(p, m, dtype, dev, gen)
        w, ids = fused_topk(logits, p.top_k)
        a13, a2 = (q.a13_scale, q.a2_scale) if q is not None else (None, None)
        args = ExpertsArgs(x, w13, w2, w, ids, b13, b2, a13_scale=a13, a2_scale=a2)
        prob = p.problem(dev, dtype, m)
        if q is not None:
            prob = dataclasses.replace(prob, quant=q.config)
            args = dataclasses.replace(args, prepared=prepared_scales(args, prob))  # as a layer's, made once
        out = torch.empty_like(x)
        pairs = m * p.top_k
        rpe = pairs / max(1, min(p.num_experts, pairs))
        gated = prob.activation.gated
        elt, in_elt = operand_bytes(prob), input_bytes(prob)  # bytes an element: weight tiles, input tiles

        def timed(cfg: KernelConfig, args=args, prob=prob, out=out, m=m) -> float:
            fn = lambda: triton_experts(args, prob, out, cfg)
            if m <= graph_max_m:
                return graph_time(fn, dev, TUNE_REP_MS) * 1e6
            return time_fn(fn, dev, rep_ms=TUNE_REP_MS) * 1e6

        base_cfg = default_config(prob)
        row = {"preset": p.name, "m": m, "heuristic_us": timed(base_cfg), "heuristic": base_cfg.model_dump()}
        best = [row["heuristic_us"], base_cfg]

        label = f"{p.name} M={m}"
        _search(timed, candidates(rpe, elt, gated, k_block, in_elt), best, f"{label} joint", limit)
        for gemm in ("gemm2", "gemm1"):
            _search(timed, refinements(best[1], rpe, elt, gated, gemm, k_block, in_elt), best, f"{label} {gemm}", limit)
        act = q.config.activations if q is not None else None
        if q is None or act is not None:  # not weight-only, whose tiles are decoded from pointer loads
            _search(timed, load_variants(best[1]), best, f"{label} loads", None)
        if act is not None and not act.static:  # dynamic W8A8: GEMM2's input quantized by a pass, or loading
            flip = {"pass": "load", "load": "pass"}[best[1].gemm2_input]
            other = fit_smem(best[1].model_copy(update={"gemm2_input": flip}), elt, gated,
                             input_elt=input_bytes(prob, flip))  # loading holds 2-byte input tiles
            _search(timed, [other], best, f"{label} gemm2 input", None)
        if q is not None and _int4_weight_only(prob):  # the group scales: on the weights, or the partial products
            _search(timed, [_other_group_scales(best[1], prob.quant.weights.group_size)], best,
                    f"{label} group scales", None)
        if q is not None and _four_bit_weight_only(prob):  # the decode's order and scale multiplies
            _search(timed, decode_variants(best[1]), best, f"{label} decode", None)
        if rpe <= 16:  # while the weights stream: GEMM2's reduction in parts, more programs in flight
            _search(timed, split_variants(best[1]), best, f"{label} split", None)
        row.update(best_us=best[0], best=best[1].model_dump())
        if atomic:
            row["atomic_us"] = timed(best[1].model_copy(update={"combine": "atomic"}))
        results.append(row)
        if on_result is not None:
            on_result(row, best[1])
        print(f"{p.name:<8} M={m:<6} heuristic {row['heuristic_us']:9.1f} us  best {best[0]:9.1f} us "
              f"(x{row['heuristic_us'] / best[0]:.2f})  {best[1].model_dump_json()}", flush=True)
    return results


def tune(p: Preset, ms: list[int], dtype: torch.dtype, out_dir: Path, limit: int | None = None,
         force: bool = False, quant: str | None = None) -> Path:
    """Tune ``ms`` for shape ``p`` (quantized with the scheme ``quant``, a name of ``moe.quant.NAMES``)
    and write (or extend) the tuned file in ``out_dir``; returns its path."""
    import triton

    from .tuned import TunedFile, file_name, load_tuned_file

    out_dir.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name()
    path = out_dir / file_name(p.num_experts, p.intermediate_size, device_name, dtype, quant=quant or "none")
    done: dict = {"configs": {}, "timings_us": {}}
    if path.exists():
        old = load_tuned_file(path)
        done = {"configs": dict(old.configs), "timings_us": dict(old.timings_us)}
    todo = [m for m in ms if force or m not in done["configs"]]  # --force retunes ms, keeps the others
    if len(todo) < len(ms):
        print(f"resuming {path.name}: {len(ms) - len(todo)} token counts already tuned", file=sys.stderr)

    def save(row: dict, cfg: KernelConfig) -> None:
        done["configs"][row["m"]] = cfg
        done["timings_us"][row["m"]] = row["best_us"]
        f = TunedFile(num_experts=p.num_experts, intermediate_size=p.intermediate_size, hidden_size=p.hidden_size,
                      top_k=p.top_k, device_name=device_name, dtype=str(dtype).removeprefix("torch."),
                      quant=quant or "none",
                      triton_version=triton.__version__, configs=dict(sorted(done["configs"].items())),
                      timings_us=dict(sorted(done["timings_us"].items())))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f.model_dump_json(indent=1))
        tmp.replace(path)  # atomic: an interrupted write never leaves a broken file

    if todo:
        sweep(p, todo, limit=limit, dtype=dtype, on_result=save, quant=quant)
    return path


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
