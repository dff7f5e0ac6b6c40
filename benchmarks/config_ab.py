"""Time Triton kernel-config variants of one quantized (or bf16) problem on the GPU, beside the heuristic.

    python3 benchmarks/config_ab.py --cases dsv3:4096,qwen3:16384 --quant fp8_block,fp8_channel \
        --variants bk128,bk128_s3

A variant edits the heuristic's config: ``bkN`` sets both GEMMs' K tile (``g1bkN``, ``g2bkN`` one's), ``sN``
their pipeline stages, ``wN`` their warps, ``gmN`` their group_m (``g1sN``, ``g1gmN``, ... one GEMM's), ``bmN``
the row tile, ``g1nN`` / ``g2nN`` a GEMM's N tile, ``one`` / ``two`` GEMM1's gate/up dots, ``load`` / ``pass``
how GEMM2's input is quantized, ``acc`` / ``wts`` where int4 group scales apply, ``masks`` / ``bytes`` the
4-bit decode order, ``splitN`` GEMM2's reduction in N parts, ``pairs`` / ``scalar`` the 4-bit scale multiplies
(joined with ``_``), then ``fit_smem`` trims it to the shared-memory budget as the heuristic does.
Prints microseconds per call (do_bench median) and the ratio to bf16 from the same run, table last. Up to
``--graph-max-m`` tokens (256) the times are CUDA-graph replays, as ``moe bench``'s rows there (``--no-pdl``:
chained launches off): eager calls at one token measure mostly host time (H200, 2026-12-02: the same mixtral
config 155 and 216 us eager in two calls).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys

import torch

from moe.backends.triton import prepared_scales, triton_experts
from moe.backends.triton.config import (
    KernelConfig,
    default_config,
    fit_smem,
    input_bytes,
    operand_bytes,
    with_loads,
)
from moe.contract import ExpertsArgs
from moe.routing import fused_topk
from moe.workload import (
    PRESETS,
    graph_time,
    quantize_workload,
    random_biases,
    random_tokens,
    random_weights,
    time_fn,
)


def variant(base: KernelConfig, spec: str, prob) -> KernelConfig:
    cfg = base
    for part in spec.split("_"):
        if part in ("load", "pass"):
            cfg = cfg.model_copy(update={"gemm2_input": part})
            continue
        if part in ("pairs", "scalar"):  # 4-bit scale multiplies two elements an instruction, or one
            cfg = cfg.model_copy(update={"dequant_math": part})
            continue
        if part in ("masks", "bytes"):  # the 4-bit decode tile's order (KernelConfig.decode_order)
            cfg = cfg.model_copy(update={"decode_order": part})
            continue
        if part in ("acc", "wts"):  # int4 group scales on the partial products / on the weight tiles
            cfg = cfg.model_copy(update={"group_scales": "accumulator" if part == "acc" else "weights"})
            continue
        if part in ("g1tma", "g2tma", "g1ptr", "g2ptr"):  # a GEMM's loads: tensor descriptors or pointers
            cfg = with_loads(cfg, **{f"gemm{part[1]}": "tma" if part.endswith("tma") else "pointer"})
            continue
        if part in ("one", "two"):
            cfg = cfg.model_copy(update={"gate_up": f"{part}_dot" if part == "one" else "two_dots"})
            continue
        key, val = re.fullmatch(r"([a-z0-9]*?[a-z])(\d+)", part).groups()
        val = int(val)
        if key in ("bk", "s", "w", "gm"):
            field = {"bk": "block_k", "s": "num_stages", "w": "num_warps", "gm": "group_m"}[key]
            cfg = cfg.model_copy(
                update={g: getattr(cfg, g).model_copy(update={field: val}) for g in ("gemm1", "gemm2")}
            )
        elif key == "bm":
            cfg = cfg.model_copy(update={"block_m": val})
        elif key == "split":  # GEMM2's reduction in parts, added up by the combine
            cfg = cfg.model_copy(update={"split_k": val, "combine": "reduce"})
        elif key in ("g1bk", "g2bk", "g1n", "g2n", "g1w", "g2w", "g1s", "g2s", "g1gm", "g2gm"):
            gemm = f"gemm{key[1]}"
            field = {"bk": "block_k", "n": "block_n", "w": "num_warps", "s": "num_stages", "gm": "group_m"}[key[2:]]
            cfg = cfg.model_copy(update={gemm: getattr(cfg, gemm).model_copy(update={field: val})})
        else:
            raise SystemExit(f"--variants: unknown part {part!r} "
                             "(bkN, g1bkN, g2bkN, sN, wN, gmN, g1gmN, g2gmN, bmN, g1nN, g2nN, g1wN, g2wN, g1sN, g2sN, "
                             "splitN, "
                             "g1tma, g2tma, g1ptr, g2ptr, "
                             "one, two, load, pass, acc, wts, pairs, scalar)")
    return fit_smem(cfg, operand_bytes(prob), prob.activation.gated, input_elt=input_bytes(prob, cfg.gemm2_input))


def _profile(args: ExpertsArgs, prob, out: torch.Tensor, cfg: KernelConfig | None, label: str) -> None:
    """Each kernel's CUDA time (us per call), from benchmarks/profile_kernels.py."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from profile_kernels import kernel_times

    times = kernel_times(lambda: triton_experts(args, prob, out, cfg))
    print(f"  {label}: " + ", ".join(f"{k[:24]} {v:.0f}" for k, v in sorted(times.items(), key=lambda kv: -kv[1])))


def _ncu(args: ExpertsArgs, prob, out: torch.Tensor, cfg: KernelConfig | None) -> None:
    """One eager call inside the profiler range that ``ncu --profile-from-start off`` measures."""
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    triton_experts(args, prob, out, cfg)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def _us(args: ExpertsArgs, prob, out: torch.Tensor, cfg: KernelConfig | None, dev: torch.device,
        graph: bool) -> float:
    """Median microseconds a call: CUDA-graph replays (as ``moe bench`` times M <= 256, where an eager call
    measures mostly its host time), or eager calls."""
    fn = lambda: triton_experts(args, prob, out, cfg)
    return (graph_time(fn, dev) if graph else time_fn(fn, dev)) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", default="dsv3:4096")
    ap.add_argument("--quant", default="fp8_block")
    ap.add_argument("--variants", default="bk128")
    ap.add_argument("--profile", action="store_true", help="also each kernel's time (torch.profiler)")
    ap.add_argument("--stored-scales", action="store_true",
                    help="weight-only group scales as stored (not prepared: their loads wait every K step)")
    ap.add_argument("--ncu", action="store_true", help="one eager call of each row between cudaProfilerStart and "
                                                   "Stop, for `ncu --profile-from-start off` (stall reasons, DRAM)")
    ap.add_argument("--no-pdl", action="store_true", help="chained launches off (the pdl option) for every row")
    ap.add_argument("--graph-max-m", type=int, default=256, help="time CUDA-graph replays up to this many tokens "
                                                                 "(default 256, as moe bench), eager calls above")
    a = ap.parse_args()
    if a.no_pdl:
        import moe

        moe.set_options(pdl=False)
    dev = torch.device("cuda")
    rows = []
    for case in a.cases.split(","):
        name, m = case.split(":")
        p, m = PRESETS[name], int(m)
        gen = torch.Generator(device=dev).manual_seed(0)
        w13, w2 = random_weights(p, torch.bfloat16, dev, gen)
        b13, b2 = random_biases(p, torch.bfloat16, dev, gen)
        x, logits = random_tokens(p, m, torch.bfloat16, dev, gen)
        w, ids = fused_topk(logits, p.top_k)
        out = torch.empty_like(x)
        prob0 = p.problem(dev, torch.bfloat16, m)
        args0 = ExpertsArgs(x, w13, w2, w, ids, b13, b2)
        graph = m <= a.graph_max_m
        bf16 = _us(args0, prob0, out, None, dev, graph)
        rows.append((case, "bf16", "heuristic", bf16, 1.0))
        if a.profile:
            _profile(args0, prob0, out, None, f"{case} bf16")
        if a.ncu:
            _ncu(args0, prob0, out, None)
        for qn in a.quant.split(","):
            q = quantize_workload(qn, p, w13, w2, b13, gen)
            prob = dataclasses.replace(prob0, quant=q.config)
            args = ExpertsArgs(x, q.w13, q.w2, w, ids, b13, b2, a13_scale=q.a13_scale, a2_scale=q.a2_scale)
            if not a.stored_scales:  # the group scales in the kernels' layout, as a layer prepares them
                args = dataclasses.replace(args, prepared=prepared_scales(args, prob))
            base = default_config(prob)
            for spec in ["heuristic", *(v for v in a.variants.split(",") if v)]:
                cfg = base if spec == "heuristic" else variant(base, spec, prob)
                try:
                    t = _us(args, prob, out, cfg, dev, graph)
                except Exception as exc:  # a variant the compiler rejects is reported, not fatal
                    print(f"{case} {qn} {spec}: {type(exc).__name__}: {str(exc)[:160]}")
                    continue
                print(f"{case} {qn} {spec} {t:.1f} us {cfg.model_dump_json()}", flush=True)
                if a.profile:
                    _profile(args, prob, out, cfg, f"{case} {qn} {spec}")
                if a.ncu:
                    _ncu(args, prob, out, cfg)
                rows.append((case, qn, spec, t, bf16 / t))
            del q
    print(f"\n{'case':<12} {'quant':<12} {'variant':<14} {'us':>9} {'vs bf16':>8}")
    for case, qn, spec, t, r in rows:
        print(f"{case:<12} {qn:<12} {spec:<14} {t:9.1f} {r:7.2f}x")


if __name__ == "__main__":
    main()
