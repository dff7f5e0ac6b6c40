"""``moe hf-check PATH_OR_FAMILY``: swap a transformers model's MoE blocks for FusedMoE and report the
logits difference and the forward time before and after.

PATH is a local model directory (config + safetensors, as ``save_pretrained`` writes it); FAMILY builds
a tiny random model of that family offline (see ``moe.hf.tiny``). ``--quant`` runs the experts quantized:
loaded from PATH's files in the checkpoint's format, or quantized with a named scheme. The "before" model
keeps the experts implementation it was built with unless ``--experts-implementation`` names one.

Everything that can be checked without the model (flags, backend name, device, the folder) is checked
before it is built; errors are one line (``SystemExit`` with a message).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from ..checkpoints import CheckpointError
from ..layer import FusedMoE
from ..quant import named, quantize_
from ..registry import BackendUnavailableError, get_backend, last_decision, list_backends
from ..testing import QUANT_NOISE, quant_noise, rel_error, tolerance
from ..validation import DTYPE_NAMES as DTYPES  # the spellings every moe command accepts
from .replace import replace_moe_blocks
from .tiny import TINY_FAMILIES, tiny_model

__all__ = ["add_arguments", "run"]

CHECKPOINT = "checkpoint"  # --quant without a name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    families = ", ".join(TINY_FAMILIES)
    parser.add_argument("model", metavar="PATH_OR_FAMILY",
                        help=f"a local model directory, or a family for a tiny random model: {families}")
    parser.add_argument("--backend", default="auto", help="moe backend for the replaced blocks (default: auto)")
    parser.add_argument("--dtype", type=str.lower, choices=list(DTYPES), default="float32",
                        metavar="{fp32,bf16,fp16}", help="default: float32 (float32/bfloat16/float16 work too)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--batch", type=int, default=2, help="batch size of the random input (default: 2)")
    parser.add_argument("--seq", type=int, default=16, help="sequence length of the random input (default: 16)")
    parser.add_argument("--repeat", type=int, default=5, help="timed forwards, median reported (default: 5)")
    parser.add_argument("--experts-implementation", default=None, metavar="NAME",
                        help="transformers experts implementation of the 'before' model, e.g. eager, grouped_mm, "
                             "batched_mm (default: the model's own: what from_pretrained picks for a folder, "
                             "'eager' for a tiny family); a model that does not accept it is an error")
    parser.add_argument("--seed", type=int, default=0, help="seed of the input and of a tiny model (default: 0)")
    parser.add_argument("--quant", nargs="?", const=CHECKPOINT, default=None, metavar="NAME",
                        help="quantized experts: alone, load them from PATH's checkpoint files in their own format "
                             "(moe.checkpoints); with a name of moe.quant.NAMES (dynamic schemes), quantize the "
                             "replaced experts with it. The logits are compared within that scheme's "
                             "quantization-noise row (moe.testing.QUANT_NOISE)")


def _check_args(args: argparse.Namespace) -> str:
    """Everything checkable before the model is built; returns the device."""
    if args.batch < 1 or args.seq < 1 or args.repeat < 1:
        raise SystemExit(f"hf-check: --batch, --seq and --repeat must be >= 1, got {args.batch}, {args.seq}, "
                         f"{args.repeat}")
    if args.backend != "auto":
        try:
            get_backend(args.backend)
        except ValueError:
            names = ", ".join(b.name for b in list_backends())
            raise SystemExit(f"hf-check: --backend {args.backend!r} is not registered; use auto or one of "
                             f"{names} (moe backends says which can run here)") from None
    if os.path.isdir(args.model):
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise SystemExit(f"hf-check: {args.model} is a folder but not a model (no config.json); give a folder "
                             f"save_pretrained wrote, or a family: {', '.join(TINY_FAMILIES)}")
    elif args.model not in TINY_FAMILIES:
        raise SystemExit(f"hf-check: {args.model!r} is neither a directory nor a family; families: "
                         f"{', '.join(TINY_FAMILIES)}")
    _check_quant(args)
    return _check_device(args.device)


def _check_quant(args: argparse.Namespace) -> None:
    if args.quant is None:
        return
    if args.quant == CHECKPOINT:
        if not os.path.isdir(args.model):
            raise SystemExit(f"hf-check: --quant without a name loads the experts from a checkpoint directory, but "
                             f"{args.model!r} is a family; give a scheme ({', '.join(QUANT_NOISE)}) or a directory")
        return
    if args.quant not in QUANT_NOISE or named(args.quant).static_activations:
        dynamic = [n for n in QUANT_NOISE if not named(n).static_activations]
        raise SystemExit(f"hf-check: --quant {args.quant!r}: quantizing the experts takes a dynamic scheme, one of "
                         f"{', '.join(dynamic)} (static input scales come from a checkpoint: --quant alone)")


def _replace(model: nn.Module, args: argparse.Namespace) -> tuple[list[str], str | None]:
    """Replace the blocks (loading or quantizing the experts under --quant); returns the names and the
    experts' scheme (None: float)."""
    checkpoint = args.model if args.quant == CHECKPOINT else None
    names = replace_moe_blocks(model, backend=args.backend, checkpoint=checkpoint)
    if args.quant not in (None, CHECKPOINT):
        quantize_(model, args.quant)
    schemes = {m._quant_key for m in model.modules() if isinstance(m, FusedMoE) and m.config.num_experts > 1}
    if len(schemes) > 1:
        found = ", ".join(sorted(str(s) for s in schemes))
        raise SystemExit(f"hf-check: the layers use several schemes ({found}); compare them one at a time")
    return names, next(iter(schemes), None)


def _check_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind not in ("cuda", "cpu"):
        raise SystemExit(f"hf-check: --device: got {device!r}; allowed: cuda (or cuda:N) and cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"hf-check: --device {device}: this machine has no CUDA device; use --device cpu")
    return device


def _refused(model: str, impl: str, exc: Exception) -> SystemExit:
    return SystemExit(f"hf-check: --experts-implementation {impl!r} is not accepted by {model}: "
                      f"{str(exc).splitlines()[0]}")


def _load(args: argparse.Namespace, dtype: torch.dtype, device: str) -> nn.Module:
    impl = args.experts_implementation
    if os.path.isdir(args.model):
        import transformers

        kwargs = {"experts_implementation": impl} if impl else {}
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, **kwargs)
        except ValueError as exc:
            if impl and "experts" in str(exc):
                raise _refused(args.model, impl, exc) from None
            raise
    else:
        model = tiny_model(args.model, seed=args.seed, dtype=dtype)
        if impl:  # otherwise the model keeps what it was built with
            try:
                model.set_experts_implementation(impl)
            except ValueError as exc:
                raise _refused(type(model).__name__, impl, exc) from None
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
    device = _check_args(args)
    dtype = DTYPES[args.dtype]
    dtype_name = str(dtype).removeprefix("torch.")
    model = _load(args, dtype, device)
    impl = getattr(model.config, "_experts_implementation", None) or "transformers' default"
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed))
    ids = ids.to(device)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(ids).logits

    before, t_before = _time_ms(forward, device, args.repeat)
    try:
        names, scheme = _replace(model, args)
        after, t_after = _time_ms(forward, device, args.repeat)
    except BackendUnavailableError as exc:  # the backend's own reason, e.g. Triton on CPU without its interpreter
        raise SystemExit(f"hf-check: --backend {args.backend}: {exc}") from None
    except CheckpointError as exc:
        raise SystemExit(f"hf-check: --quant: {exc}") from None

    err = rel_error(after, before)
    tol = quant_noise(scheme) if scheme is not None else tolerance(dtype)
    decision = last_decision()
    print(f"model: {args.model} ({type(model).__name__}, {dtype_name}, {device}), input {args.batch} x {args.seq}")
    print(f"replaced {len(names)} blocks: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")
    print(f"backend: requested {args.backend!r}, ran {decision.chosen if decision else 'none'!r}")
    verdict = "ok" if err <= tol else "EXCEEDS"
    if scheme is not None:
        how = "loaded from the checkpoint files" if args.quant == CHECKPOINT else "quantized after replacement"
        print(f"experts: {scheme} ({how}); before: transformers' forward "
              f"({'dequantized' if args.quant == CHECKPOINT else 'float'} experts)")
        print(f"logits: norm-relative difference {err:.2e} (the {scheme} quantization-noise row: {tol:.0e}) {verdict}")
    else:
        print(f"logits: norm-relative difference {err:.2e} (tolerance for {dtype_name}: {tol:.0e}) {verdict}")
    print(f"forward: before {t_before:.2f} ms, after {t_after:.2f} ms ({t_before / t_after:.2f}x; "
          f"experts before: {impl!r})")
    if err > tol and dtype != torch.float32:
        print("note: in low precision a token whose top-k is nearly tied can route differently; "
              "compare per block or in float32 to separate that from a real difference")
    return 0 if err <= tol else 1
