"""The ``moe`` command: backends | bench | tune | hf-check."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import __version__
from .validation import DTYPE_NAMES

if TYPE_CHECKING:
    from .config import MoEConfig
    from .contract import ExpertsProblem
    from .quant import QuantConfig

__all__ = ["DTYPES", "CliError", "build_parser", "main"]

DTYPES = DTYPE_NAMES  # every spelling the commands accept, short and long
_DTYPE_METAVAR = "{bf16,fp16,fp32}"  # the long spellings work too; the short list keeps --help readable
# the representative shape ``moe backends`` judges (Mixtral's)
_REPRESENTATIVE = {"num_experts": 8, "top_k": 2, "hidden_size": 4096, "intermediate_size": 14336}


class CliError(SystemExit):
    """A one-line command error: ``main`` prints it to stderr; the exit status is 2 (argparse's)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _dtype_arg(text: str) -> str:
    if text.lower() not in DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a dtype; use one of {', '.join(DTYPES)}")
    return text.lower()


def _parse_ms(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        ms = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise CliError(f"--m: expected comma-separated token counts like 1,16,64, got {text!r}") from None
    if any(m < 1 for m in ms):
        raise CliError(f"--m: token counts must be >= 1, got {text!r}")
    return ms


# ---------------------------------------------------------------- moe backends


def _parse_problem(text: str) -> dict[str, int]:
    parts = text.split(",")
    try:
        values = [int(v) for v in parts]
    except ValueError:
        values = []
    if len(values) != 4 or any(v < 1 for v in values):
        raise CliError(f"--problem: expected E,N,K,TOPK (experts, intermediate size, hidden size, top-k; positive "
                       f"integers) like 8,14336,4096,2, got {text!r}")
    e, n, k, top_k = values
    return {"num_experts": e, "intermediate_size": n, "hidden_size": k, "top_k": top_k}


def _backends_config(args: argparse.Namespace) -> MoEConfig:
    from pydantic import ValidationError

    from . import quant
    from .config import MoEConfig

    shape = _parse_problem(args.problem) if args.problem else _REPRESENTATIVE
    scheme = quant.named(args.quant) if args.quant and args.quant != "none" else quant.QuantConfig()
    try:
        return MoEConfig(**shape, quant=scheme)
    except ValueError as exc:  # pydantic's ValidationError or the package's own config error
        msg = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc).splitlines()[0]
        raise CliError(f"--problem {args.problem}: {msg}") from None


def _priority_on(backend: object, target: object) -> int | None:
    """The backend's priority on ``target`` (``priority_for`` where it has one); None if it misbehaves."""
    try:  # a plugin's property may raise: auto ranks it last, the table shows "?"
        get = getattr(backend, "priority_for", None)
        p = get(target) if callable(get) else backend.priority  # type: ignore[attr-defined]
    except Exception:
        return None
    return p if isinstance(p, int) else None


def _print_broken_plugins() -> None:
    from .registry import broken_plugins

    broken = broken_plugins()
    if not broken:
        print("broken plugins: none")
        return
    print(f"broken plugins ({len(broken)}, never selected):")
    for p in broken:
        print(f"  {p.name} = {p.value} (from {p.distribution}): {p.reason}")


def _print_backend_table(problem: ExpertsProblem) -> None:
    """One line per backend, in the order auto tries them on the problem's target."""
    from .contract import backend_schemes
    from .registry import judge, list_backends

    print(f"{'backend':<16} {'priority':>8}  {'usable':<6}  {'schemes':<14} why")
    ranked = sorted(((_priority_on(b, problem.target), b) for b in list_backends()),
                    key=lambda pb: (-(pb[0] if pb[0] is not None else -(2**31)), pb[1].name))
    for prio, b in ranked:
        c = judge(b, problem)
        schemes = ",".join(sorted(backend_schemes(b)))
        prio_text = "?" if prio is None else str(prio)
        print(f"{b.name:<16} {prio_text:>8}  {'yes' if c.ok else 'no':<6}  {schemes:<14} {c.reason}")


def _cmd_backends(args: argparse.Namespace) -> int:
    from .explain import explain, problem_from_config, resolve_target
    from .kernels.launch import direct_launch_status  # imports nothing heavy
    from .registry import BackendUnavailableError

    target = resolve_target(None, args.target)
    where = (f"--target {args.target}: judged for that card, which this machine need not have; installed "
             "libraries are this machine's" if args.target else "this machine")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if target.is_gpu else torch.float32)
    config = _backends_config(args)
    problem = problem_from_config(config, dtype=dtype, target=target)
    given = args.problem or args.dtype or args.quant
    print(f"target: {target.describe()} ({where})")
    print(f"problem: E={problem.num_experts} N={problem.intermediate_size} K={problem.hidden_size} "
          f"top_k={problem.top_k} {str(dtype).removeprefix('torch.')} quant={problem.quant.key()}"
          f"{'' if given else ' (representative; change with --problem E,N,K,TOPK --dtype --quant)'}")
    _print_backend_table(problem)
    for m in _parse_ms(args.m) or (1,):
        try:
            decision = explain(dataclasses.replace(problem, num_tokens=m))
            head = f"M={m}: " if args.m else ""
            print(head + (str(decision) if given or args.m else f"auto chooses: {decision.chosen} ({decision.why})"))
        except BackendUnavailableError as exc:
            print(f"auto: {exc}")
    _ok, reason = direct_launch_status()
    print(f"direct launcher: {reason}")
    _print_broken_plugins()
    return 0


# ---------------------------------------------------------------- moe bench


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    try:  # everything is checked before the first allocation
        req = bench.resolve_request(args.preset, _parse_ms(args.m), args.device,
                                    DTYPES[args.dtype] if args.dtype else None, _split_backends(args.backends),
                                    args.quant)
        if args.json:
            bench.check_output_path("--json", args.json)
        if args.plot:
            bench.check_output_path("--plot", args.plot)
            bench.check_plot_available()
        bench.check_memory(req)
    except bench.BenchError as exc:
        raise CliError(str(exc)) from None
    info = bench.bench_info(req)
    ceil, rows = bench.run_request(req, progress=not args.no_progress)
    print(bench.format_table(ceil, rows, info), flush=True)  # first: a failing write below must not lose it
    try:
        if args.json:
            bench.write_json(args.json, ceil, rows, info)
            print(f"wrote {Path(args.json).resolve()}")
        if args.plot:
            bench.plot(args.plot, rows)
            print(f"wrote {Path(args.plot).resolve()}")
    except OSError as exc:
        raise CliError(f"could not write the results: {exc}; the table above is complete") from None
    return 0


def _split_backends(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(name.strip() for name in text.split(","))


def _bench_epilog() -> str:
    from .quant import NAMES
    from .workload import PRESETS

    lines = ["presets (w13 [E, 2N, K], w2 [E, K, N]):"]
    lines += [f"  {name:<12} {p.describe()}   M={','.join(map(str, p.default_m))}" for name, p in PRESETS.items()]
    lines += ["", "quantization schemes (--quant):"]
    lines += [f"  {name:<18} {_describe_scheme(cfg)}" for name, cfg in NAMES.items()]
    return "\n".join(lines)


def _describe_scheme(cfg: QuantConfig) -> str:
    w, a = cfg.weights, cfg.activations
    if w is None:
        return "unquantized"
    wg = f"{w.block[0]}x{w.block[1]} blocks" if w.granularity == "block" and w.block else f"per {w.granularity}"
    if w.group_size is not None:
        wg = f"groups of {w.group_size}" + (" with zero points" if w.zero_point else "")
    if a is None:
        return f"weights {w.format} {wg}; activations unquantized"
    ag = f"groups of {a.group_size}" if a.granularity == "group" else f"per {a.granularity}"
    return f"weights {w.format} {wg}; activations {a.format} {ag}, {'static' if a.static else 'dynamic'} scales"


# ---------------------------------------------------------------- moe hf-check


def _hf_check(argv: list[str]) -> int:
    try:
        from .hf import check
    except ImportError as exc:  # transformers missing or too old: moe.hf says which, with the install command
        raise CliError(f"hf-check: {exc}" if "pip install" in str(exc)
                       else f"hf-check needs transformers>=5 ({exc}); pip install 'moe-layer[hf]'") from None

    parser = argparse.ArgumentParser(prog="moe hf-check", description="swap a transformers model's MoE blocks "
                                     "for FusedMoE and print the logits difference and forward times")
    check.add_arguments(parser)
    return check.run(parser.parse_args(argv))


# ---------------------------------------------------------------- moe tune


def tune_out_dir(out: str | None) -> Path:
    """Where ``moe tune`` writes: ``--out``, else ``$MOE_TUNED_CONFIGS_DIR``, else the per-user folder
    (both are searched by the lookup, in that order, before the shipped files)."""
    from .backends.triton.tuned import user_dir

    return Path(out or os.environ.get("MOE_TUNED_CONFIGS_DIR") or user_dir()).expanduser()


def _cmd_tune(args: argparse.Namespace) -> int:
    from .workload import PRESETS, Preset

    if not torch.cuda.is_available():
        raise CliError("moe tune times kernels on a CUDA device; none is available here")
    if args.preset:
        p = PRESETS[args.preset]
    else:
        missing = [f for f in ("E", "N", "K", "top_k") if getattr(args, f) is None]
        if missing:
            raise CliError(f"moe tune: give --preset or all of --E --N --K --top-k (missing: {', '.join(missing)})")
        p = Preset("custom", args.E, args.top_k, args.K, args.N, ())
    ms = _parse_ms(args.m) or (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
    if args.backends is not None:
        return _tune_selection(args, p, ms)
    from .backends.triton.tuning import tune

    quant = None if args.quant in (None, "none") else args.quant
    path = tune(p, list(ms), DTYPES[args.dtype], tune_out_dir(args.out), limit=args.limit, force=args.force,
                quant=quant)
    print(f"wrote {Path(path).resolve()}")
    return 0


def _tune_selection(args: argparse.Namespace, p: object, ms: tuple[int, ...]) -> int:
    """``moe tune --backends``: the selection table for ``auto`` (moe.tune_backends)."""
    from . import quant
    from .selection import user_dir
    from .tune_backends import tune_selection

    names = None if args.backends == "all" else _split_backends(args.backends)
    scheme = quant.named(args.quant) if args.quant and args.quant != "none" else quant.QuantConfig()
    env = os.environ.get("MOE_TUNED_CONFIGS_DIR")
    out = Path(args.out) if args.out else (Path(env) / "selection" if env else user_dir())
    try:
        path = tune_selection(p, ms, DTYPES[args.dtype], out.expanduser(), backends=names, quant=scheme,
                              log=lambda line: print(line, flush=True))
    except ValueError as exc:
        raise CliError(f"moe tune --backends: {exc}") from None
    print(f"wrote {Path(path).resolve()}")
    return 0


# ---------------------------------------------------------------- parser


def _add_backends(sub: argparse._SubParsersAction) -> None:
    from .quant import NAMES
    from .target import TARGETS

    p = sub.add_parser("backends", help="list registered backends and whether each can run here (or on --target)")
    p.add_argument("--target", choices=list(TARGETS), help="judge for this card instead of this machine's device")
    p.add_argument("--problem", metavar="E,N,K,TOPK",
                   help="shape to judge: experts, intermediate size, hidden size, top-k (default: 8,14336,4096,2)")
    p.add_argument("--dtype", type=_dtype_arg, metavar=_DTYPE_METAVAR,
                   help="default: bf16 on a GPU target, fp32 on cpu")
    p.add_argument("--quant", choices=["none", *NAMES], help="quantization scheme of the problem (default: none)")
    p.add_argument("--m", help="token counts to decide for (comma-separated; a measured selection table decides "
                   "per token-count bucket; default: 1)")
    p.set_defaults(func=_cmd_backends)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from .quant import NAMES
    from .workload import PRESETS

    p = sub.add_parser("bench", help="time every usable backend against the roofline floor",
                       epilog=_bench_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="default",
                   help="workload shape (default: 'default', a small one that runs in seconds on a CPU)")
    p.add_argument("--m", help="comma-separated token counts, e.g. 1,16,64 (default: the preset's)")
    p.add_argument("--backends", help="comma-separated backend names, or auto (rows 'auto->chosen': what a call "
                   "naming no backend runs); default: every registered one")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", type=_dtype_arg, metavar=_DTYPE_METAVAR, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON (after the table is printed)")
    p.add_argument("--plot", metavar="PATH.png",
                   help="plot percent of floor (CPU: time) against M (needs matplotlib: pip install 'moe-layer[plot]')")
    p.add_argument("--quant", metavar="NAME[,NAME...]",
                   help=f"also time these quantization schemes beside the unquantized rows (measured once): "
                   f"{', '.join(NAMES)} (default: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.set_defaults(func=_cmd_bench)


def _add_tune(sub: argparse._SubParsersAction) -> None:
    from .quant import NAMES
    from .workload import PRESETS

    p = sub.add_parser("tune", help="tune Triton kernel configs on this GPU and write a tuned file")
    p.add_argument("--preset", choices=list(PRESETS), help="a preset shape, or give --E --N --K --top-k")
    p.add_argument("--E", type=int, help="number of experts")
    p.add_argument("--N", type=int, help="intermediate size")
    p.add_argument("--K", type=int, help="hidden size")
    p.add_argument("--top-k", dest="top_k", type=int, help="experts per token")
    p.add_argument("--dtype", type=_dtype_arg, metavar=_DTYPE_METAVAR, default="bf16", help="default: bf16")
    p.add_argument("--m", help="comma-separated token counts (default: powers of two 1..16384)")
    p.add_argument("--out", help="folder for the file (default: $MOE_TUNED_CONFIGS_DIR, else the per-user cache "
                   "folder ~/.cache/moe/configs/triton, which later runs search)")
    p.add_argument("--quant", choices=["none", *NAMES],
                   help="tune the call quantized with this scheme (Triton: its own file, keyed by the name; with "
                   "--backends: the scheme of the selection table; default: none)")
    p.add_argument("--limit", type=int, help="at most this many candidates per token count")
    p.add_argument("--force", action="store_true",
                   help="retune the given token counts even where the file has them; keep the rest")
    p.add_argument("--backends", metavar="NAMES|all",
                   help="instead of Triton configs: time these backends (comma-separated, or all) per token count "
                   "after a parity check and write the selection table auto reads (folder: --out, else "
                   "$MOE_TUNED_CONFIGS_DIR/selection, else ~/.cache/moe/configs/selection)")
    p.set_defaults(func=_cmd_tune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe", description=__doc__)
    parser.add_argument("--version", action="version", version=f"moe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_backends(sub)
    _add_bench(sub)
    _add_tune(sub)
    # hf-check's own parser is built when it runs, so other commands never import transformers
    p = sub.add_parser("hf-check", add_help=False, help="swap a transformers model's MoE blocks and compare logits")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["hf-check"]:
            return _hf_check(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as exc:
        if isinstance(exc, CliError) or isinstance(exc.code, str):  # a message: one line, status 2
            err = exc if isinstance(exc, CliError) else CliError(exc.code)
            print(f"moe: error: {err}", file=sys.stderr)
            raise err from None
        raise  # argparse's own exits (--help, usage errors) keep their status


if __name__ == "__main__":
    sys.exit(main())
