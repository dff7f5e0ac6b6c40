"""A Mixtral-dimensioned transformers model before and after ``moe.hf.replace_moe_blocks``.

    python benchmarks/hf_gpu.py --out hf_gpu.json                 # H100/H200: bf16, 2 decoder layers
    python benchmarks/hf_gpu.py --tiny --out hf_tiny.json         # CPU smoke test: tiny dims, fp32

The model is ``MixtralForCausalLM`` with hidden 4096, intermediate 14336, 8 experts, top-2 and 2 decoder
layers, random weights (O(1) scale, see ``moe.hf.tiny.randomize``), in bf16. For each batch x sequence
(1x1, 8x1, 1x2048, 8x2048) it times the full forward (all logits) with transformers' default experts
implementation, then replaces the MoE blocks in place and times it again with ``--backend``; it also
times the first MoE block alone on a random input, and reports the logits difference (norm-relative,
the tolerance row of the dtype beside it). Times are medians of CUDA-event (perf_counter on CPU) timings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import transformers

import moe
import moe.hf
from moe.hf.tiny import randomize
from moe.testing import rel_error, tolerance

MIXTRAL = dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
               num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
               max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_local_experts=8, num_experts_per_tok=2,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
            max_position_embeddings=4096)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="auto", help="moe backend of the replaced blocks (default: auto)")
    p.add_argument("--out", metavar="PATH", help="write the results as JSON here")
    p.add_argument("--tiny", action="store_true", help="tiny dims in fp32 on CPU (a smoke test)")
    p.add_argument("--shapes", help="batch x sequence list, e.g. 1x1,8x1,1x2048,8x2048 (tiny: sequences 128)")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    return p.parse_args()


def _shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(v) for v in item.split("x")) for item in text.split(",")]
    except ValueError:
        raise SystemExit(f"--shapes: expected BxS items like 1x1,8x2048, got {text!r}") from None
    if any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise SystemExit(f"--shapes: expected BxS items with B, S >= 1, got {text!r}")
    return shapes  # type: ignore[return-value]


def _timer(device: str, warmup: int, iters: int) -> Callable[[Callable[[], object]], float]:
    def time_ms(fn: Callable[[], object]) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if device.startswith("cuda"):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return time_ms


def _model(dims: dict, dtype: torch.dtype, device: str) -> torch.nn.Module:
    config = transformers.MixtralConfig(**dims, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.MixtralForCausalLM._from_config(config, dtype=dtype)
    model = model.to(device)  # a no-op when the device context was honoured
    randomize(model)
    return model.eval()


def _measure(model: torch.nn.Module, inputs: list[tuple[torch.Tensor, torch.Tensor]],
             time_ms: Callable[[Callable[[], object]], float]) -> tuple[list[torch.Tensor], list[float], list[float]]:
    """Logits, full-forward ms and first-MoE-block ms for each (input ids, block input)."""
    block = model.model.layers[0].mlp
    logits, forward_ms, block_ms = [], [], []
    with torch.no_grad():
        for ids, x in inputs:
            logits.append(model(ids, use_cache=False).logits.float().cpu())
            forward_ms.append(time_ms(lambda ids=ids: model(ids, use_cache=False)))
            block_ms.append(time_ms(lambda x=x: block(x)))
    return logits, forward_ms, block_ms


def main() -> None:
    args = _args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dims, dtype = (TINY, torch.float32) if args.tiny else (MIXTRAL, torch.bfloat16)
    shapes = _shapes(args.shapes or ("1x1,8x1,1x128,8x128" if args.tiny else "1x1,8x1,1x2048,8x2048"))
    time_ms = _timer(device, args.warmup, args.iters)

    model = _model(dims, dtype, device)
    baseline = model.config._experts_implementation
    gen = torch.Generator().manual_seed(1)
    inputs = [(torch.randint(0, dims["vocab_size"], (b, s), generator=gen).to(device),
               torch.randn(b, s, dims["hidden_size"], generator=gen).to(device, dtype)) for b, s in shapes]

    want, before_ms, before_block = _measure(model, inputs, time_ms)
    names = moe.hf.replace_moe_blocks(model, backend=args.backend)
    got, after_ms, after_block = _measure(model, inputs, time_ms)
    decision = moe.last_decision()
    chosen = decision.chosen if decision else "none"

    rows = []
    for (b, s), w, g, t0, t1, k0, k1 in zip(shapes, want, got, before_ms, after_ms, before_block, after_block,
                                            strict=True):
        rows.append(dict(batch=b, seq=s, tokens=b * s, before_ms=t0, after_ms=t1, speedup=t0 / t1,
                         block_before_ms=k0, block_after_ms=k1, block_speedup=k0 / k1,
                         logits_rel_error=rel_error(g, w)))

    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    title = (f"Mixtral-dimensioned x{dims['num_hidden_layers']} layers, {str(dtype).removeprefix('torch.')}, "
             f"{device_name}; "
             f"before: transformers experts_implementation={baseline!r}; after: moe backend {args.backend!r} "
             f"(ran {chosen!r}); replaced {len(names)} blocks")
    print(title)
    print(f"{'B x S':>10} {'before ms':>10} {'after ms':>10} {'speedup':>8} {'block before':>13} "
          f"{'block after':>12} {'speedup':>8} {'logits diff':>12}")
    for r in rows:
        print(f"{r['batch']:>4} x {r['seq']:<4} {r['before_ms']:>10.3f} {r['after_ms']:>10.3f} {r['speedup']:>7.2f}x "
              f"{r['block_before_ms']:>13.3f} {r['block_after_ms']:>12.3f} {r['block_speedup']:>7.2f}x "
              f"{r['logits_rel_error']:>12.2e}")
    print(f"logits diff: norm-relative, after vs before; tolerance row for {dtype}: {tolerance(dtype):.0e}")
    if args.out:
        result = dict(title=title, device=device, device_name=device_name, torch=torch.__version__,
                      transformers=transformers.__version__, dtype=str(dtype), dims=dims,
                      baseline_experts_implementation=baseline, backend_requested=args.backend,
                      backend_chosen=chosen, replaced=names, tolerance=tolerance(dtype), rows=rows)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

if __name__ == "__main__":
    main()
