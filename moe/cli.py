"""The ``moe`` command: backends | bench | tune | hf-check."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import __version__

__all__ = ["main"]


def _cmd_backends(args: argparse.Namespace) -> int:
    from .registry import list_backends

    print(f"{'backend':<16} {'priority':>8}  {'usable':<6}  why")
    for b in list_backends():
        ok, reason = b.is_available()
        print(f"{b.name:<16} {b.priority:>8}  {'yes' if ok else 'no':<6}  {reason}")
    return 0


def _parse_ms(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        ms = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"--m: expected comma-separated token counts like 1,16,64, got {text!r}") from None
    if any(m < 1 for m in ms):
        raise SystemExit(f"--m: token counts must be >= 1, got {text!r}")
    return ms


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import format_table, plot, run_bench, write_json

    backends = tuple(args.backends.split(",")) if args.backends else None
    ceil, rows = run_bench(args.preset, _parse_ms(args.m), args.device,
                           _DTYPES[args.dtype] if args.dtype else None, backends,
                           progress=not args.no_progress)
    if args.json:
        write_json(args.json, ceil, rows)
    if args.plot:
        plot(args.plot, rows)
    print(format_table(ceil, rows))
    return 0


def _hf_check(argv: list[str]) -> int:
    from .hf import check

    parser = argparse.ArgumentParser(prog="moe hf-check", description="swap a transformers model's MoE blocks "
                                     "for FusedMoE and print the logits difference and forward times")
    check.add_arguments(parser)
    return check.run(parser.parse_args(argv))


def _cmd_tune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .backends.triton.tuning import tune
    from .bench import PRESETS, Preset

    if not torch.cuda.is_available():
        raise SystemExit("moe tune times kernels on a CUDA device; none is available here")
    if args.preset:
        p = PRESETS[args.preset]
    else:
        missing = [f for f in ("E", "N", "K", "top_k") if getattr(args, f) is None]
        if missing:
            raise SystemExit(f"moe tune: give --preset or all of --E --N --K --top-k (missing: {', '.join(missing)})")
        p = Preset("custom", args.E, args.top_k, args.K, args.N, ())
    ms = _parse_ms(args.m) or (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
    out = Path(args.out or os.environ.get("MOE_TUNED_CONFIGS_DIR") or "configs/triton")
    path = tune(p, list(ms), _DTYPES[args.dtype], out, limit=args.limit, force=args.force)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .bench import PRESETS

    parser = argparse.ArgumentParser(prog="moe", description=__doc__)
    parser.add_argument("--version", action="version", version=f"moe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backends", help="list registered backends and whether each can run here")
    p.set_defaults(func=_cmd_backends)
    p = sub.add_parser("bench", help="time every usable backend against the roofline floor")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="workload shape (default: a small one that runs in seconds on a CPU)")
    p.add_argument("--m", help="comma-separated token counts, e.g. 1,16,64 (default: the preset's)")
    p.add_argument("--backends", help="comma-separated backend names (default: every registered one)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PATH.png", help="plot percent of floor against M (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.set_defaults(func=_cmd_bench)
    p = sub.add_parser("tune", help="tune Triton kernel configs on this GPU and write a tuned file")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a preset shape, or give --E --N --K --top-k")
    p.add_argument("--E", type=int, help="number of experts")
    p.add_argument("--N", type=int, help="intermediate size")
    p.add_argument("--K", type=int, help="hidden size")
    p.add_argument("--top-k", dest="top_k", type=int, help="experts per token")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    p.add_argument("--m", help="comma-separated token counts (default: powers of two 1..16384)")
    p.add_argument("--out", help="folder for the file (default: $MOE_TUNED_CONFIGS_DIR or configs/triton)")
    p.add_argument("--limit", type=int, help="at most this many candidates per token count")
    p.add_argument("--force", action="store_true",
                   help="retune the given token counts even where the file has them; keep the rest")
    p.set_defaults(func=_cmd_tune)
    # hf-check's own parser is built when it runs, so other commands never import transformers
    p = sub.add_parser("hf-check", add_help=False, help="swap a transformers model's MoE blocks and compare logits")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hf-check"]:
        return _hf_check(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
