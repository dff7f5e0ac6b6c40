"""``moe tune``: time candidate kernel configs of the Triton backend on the current GPU (small token
counts as CUDA-graph replays) next to the default heuristic, and write the winners as a tuned file.

The file is rewritten after every token count, and a rerun skips the counts it already holds, so a tune
cut off by a time limit resumes where it stopped. ``python -m moe.backends.triton.tuning`` is the older
sweep entry point (prints, writes every measurement with ``--json``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from ...bench import PRESETS, Preset, _graph_time, _tokens, _weights, time_fn
from ...config import ActivationSpec
from ...routing import fused_topk
from ..base import ExpertsArgs, ExpertsProblem
from . import triton_experts
from .config import SMEM_BUDGET, GemmTile, KernelConfig, default_config


def candidates(rows_per_expert: float, elt: int, gated: bool = True) -> list[KernelConfig]:
    """A pruned space around the regime: thin tiles for weight streaming, wide ones for compute."""
    if rows_per_expert <= 16:
        space = itertools.product([16, 32], [32, 64, 128], [128, 256], [4], [3, 4, 5], [1])
    elif rows_per_expert <= 256:
        space = itertools.product([32, 64, 128], [64, 128], [64, 128], [4], [3, 4], [8])
    else:
        space = itertools.product([64, 128], [128, 256], [64], [4, 8], [3, 4], [8])
    out = []
    for bm, bn, bk, warps, stages, group in space:
        tile = GemmTile(block_n=bn, block_k=bk, group_m=group, num_warps=warps, num_stages=stages)
        cfg = KernelConfig(block_m=bm, gemm1=tile, gemm2=tile)
        if max(cfg.smem_bytes(elt, gated)) <= SMEM_BUDGET:
            out.append(cfg)
    return out


def sweep(preset: str | Preset, ms: list[int], graph_max_m: int = 256, limit: int | None = None,
          dtype: torch.dtype = torch.bfloat16, on_result=None) -> list[dict]:
    p = PRESETS[preset] if isinstance(preset, str) else preset
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    w13, w2 = _weights(p, dtype, dev, gen)
    results = []
    for m in ms:
        x, logits = _tokens(p, m, dtype, dev, gen)
        w, ids = fused_topk(logits, p.top_k)
        args = ExpertsArgs(x, w13, w2, w, ids)
        prob = ExpertsProblem("cuda", dtype, m, p.num_experts, p.num_experts, p.hidden_size,
                              p.intermediate_size, p.top_k, ActivationSpec())
        out = torch.empty_like(x)
        pairs = m * p.top_k
        rpe = pairs / max(1, min(p.num_experts, pairs))

        def timed(cfg: KernelConfig, args=args, prob=prob, out=out, m=m) -> float:
            fn = lambda: triton_experts(args, prob, out, cfg)
            return (_graph_time(fn, dev) if m <= graph_max_m else time_fn(fn, dev)) * 1e6

        base_cfg = default_config(prob)
        row = {"preset": preset, "m": m, "heuristic_us": timed(base_cfg), "heuristic": base_cfg.model_dump()}
        best = (row["heuristic_us"], base_cfg)
        cands = candidates(rpe, x.element_size())[:limit]
        for i, cfg in enumerate(cands):
            try:
                t = timed(cfg)
            except Exception as exc:  # a config the compiler rejects is skipped and reported
                print(f"  skip {cfg.model_dump()}: {type(exc).__name__}: {exc}"[:200], file=sys.stderr)
                continue
            if t < best[0]:
                best = (t, cfg)
            print(f"\r  {p.name} M={m} [{i + 1}/{len(cands)}] best {best[0]:.1f} us", end="", file=sys.stderr)
        print(file=sys.stderr)
        atomic = best[1].model_copy(update={"combine": "atomic"})
        row.update(best_us=best[0], best=best[1].model_dump(), atomic_us=timed(atomic))
        results.append(row)
        if on_result is not None:
            on_result(row, best[1])
        print(f"{p.name:<8} M={m:<6} heuristic {row['heuristic_us']:9.1f} us  best {best[0]:9.1f} us "
              f"(x{row['heuristic_us'] / best[0]:.2f})  atomic-combine {row['atomic_us']:9.1f} us  "
              f"{best[1].model_dump_json()}", flush=True)
    return results


def tune(p: Preset, ms: list[int], dtype: torch.dtype, out_dir: Path, limit: int | None = None,
         force: bool = False) -> Path:
    """Tune ``ms`` for shape ``p`` and write (or extend) the tuned file in ``out_dir``; returns its path."""
    import triton

    from .tuned import TunedFile, file_name, load_tuned_file

    out_dir.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name()
    path = out_dir / file_name(p.num_experts, p.intermediate_size, device_name, dtype)
    done: dict = {"configs": {}, "timings_us": {}}
    if path.exists() and not force:
        old = load_tuned_file(path)
        done = {"configs": dict(old.configs), "timings_us": dict(old.timings_us)}
    todo = [m for m in ms if m not in done["configs"]]
    if len(todo) < len(ms):
        print(f"resuming {path.name}: {len(ms) - len(todo)} token counts already tuned", file=sys.stderr)

    def save(row: dict, cfg: KernelConfig) -> None:
        done["configs"][row["m"]] = cfg
        done["timings_us"][row["m"]] = row["best_us"]
        f = TunedFile(num_experts=p.num_experts, intermediate_size=p.intermediate_size, hidden_size=p.hidden_size,
                      top_k=p.top_k, device_name=device_name, dtype=str(dtype).removeprefix("torch."),
                      triton_version=triton.__version__, configs=dict(sorted(done["configs"].items())),
                      timings_us=dict(sorted(done["timings_us"].items())))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f.model_dump_json(indent=1))
        tmp.replace(path)  # atomic: an interrupted write never leaves a broken file

    if todo:
        sweep(p, todo, limit=limit, dtype=dtype, on_result=save)
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
