"""``moe hf-check PATH_OR_FAMILY``: swap a transformers model's MoE blocks for FusedMoE and report the
logits difference and the forward time before and after.

PATH is a local model directory (config + safetensors, as ``save_pretrained`` writes it); FAMILY builds
a tiny random model of that family offline (see ``moe.hf.tiny``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from ..registry import last_decision
from ..testing import TOLERANCES, rel_error
from .replace import replace_moe_blocks
from .tiny import TINY_FAMILIES, tiny_model

__all__ = ["add_arguments", "run"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    families = ", ".join(TINY_FAMILIES)
    parser.add_argument("model", metavar="PATH_OR_FAMILY",
                        help=f"a local model directory, or a family for a tiny random model: {families}")
    parser.add_argument("--backend", default="auto", help="moe backend for the replaced blocks (default: auto)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="default: float32")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--batch", type=int, default=2, help="batch size of the random input (default: 2)")
    parser.add_argument("--seq", type=int, default=16, help="sequence length of the random input (default: 16)")
    parser.add_argument("--repeat", type=int, default=5, help="timed forwards, median reported (default: 5)")
    parser.add_argument("--experts-implementation", default=None,
                        help="transformers experts implementation of the 'before' model (default: transformers' "
                             "default; 'eager' is its reference loop)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the input and of a tiny model (default: 0)")


def _load(args: argparse.Namespace, dtype: torch.dtype, device: str) -> nn.Module:
    if os.path.isdir(args.model):
        import transformers

        kwargs = {"experts_implementation": args.experts_implementation} if args.experts_implementation else {}
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, **kwargs)
    elif args.model in TINY_FAMILIES:
        model = tiny_model(args.model, seed=args.seed, dtype=dtype)
        if args.experts_implementation != "eager":
            model.set_experts_implementation(args.experts_implementation or "grouped_mm")
    else:
        raise SystemExit(f"hf-check: {args.model!r} is neither a directory nor a family; families: "
                         f"{', '.join(TINY_FAMILIES)}")
    return model.to(device).eval()


def _time_ms(fn: Callable[[], torch.Tensor], device: str, repeat: int) -> tuple[torch.Tensor, float]:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out = fn()  # warm-up (and the output we compare)
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return out, statistics.median(times)


def run(args: argparse.Namespace) -> int:
    """Run the check; 0 when the logits agree within the tolerance row of the dtype, 1 otherwise."""
    if args.batch < 1 or args.seq < 1 or args.repeat < 1:
        raise SystemExit(f"hf-check: --batch, --seq and --repeat must be >= 1, got {args.batch}, {args.seq}, "
                         f"{args.repeat}")
    dtype = _DTYPES[args.dtype]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = _load(args, dtype, device)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed))
    ids = ids.to(device)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(ids).logits

    before, t_before = _time_ms(forward, device, args.repeat)
    names = replace_moe_blocks(model, backend=args.backend)
    after, t_after = _time_ms(forward, device, args.repeat)

    err, tol = rel_error(after, before), TOLERANCES[dtype]
    decision = last_decision()
    print(f"model: {args.model} ({type(model).__name__}, {args.dtype}, {device}), input {args.batch} x {args.seq}")
    print(f"replaced {len(names)} blocks: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")
    print(f"backend: requested {args.backend!r}, ran {decision.chosen if decision else 'none'!r}")
    verdict = "ok" if err <= tol else "EXCEEDS"
    print(f"logits: norm-relative difference {err:.2e} (tolerance for {args.dtype}: {tol:.0e}) {verdict}")
    print(f"forward: before {t_before:.2f} ms, after {t_after:.2f} ms ({t_before / t_after:.2f}x)")
    if err > tol and dtype != torch.float32:
        print("note: in low precision a token whose top-k is nearly tied can route differently; "
              "compare per block or in float32 to separate that from a real difference")
    return 0 if err <= tol else 1
