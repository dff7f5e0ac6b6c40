"""Quantized-checkpoint models before and after ``moe.hf.replace_moe_blocks(model, checkpoint=...)``.

    python benchmarks/hf_quant_models.py --out hf_quant.json        # H200: both models, bf16
    python benchmarks/hf_quant_models.py --tiny                     # CPU smoke test: tiny dims, fp32

Two 2-layer models with random weights (O(1) scale, ``moe.hf.tiny.randomize``), generated on the machine
(their experts are too large to upload), every decoder layer an MoE layer:

- ``dsv3_fp8``: ``DeepseekV3ForCausalLM`` at DeepSeek-V3's dimensions (hidden 7168, 256 routed experts of
  2048, top-8, one shared expert, MLA), experts and shared experts in DeepSeek's block FP8 (e4m3 data,
  fp32 ``scale_inv`` per 128 x 128; transformers' fused ``gate_up_proj`` form);
- ``gptoss_mxfp4``: ``GptOssForCausalLM`` at gpt-oss-120b's dimensions (hidden 2880, 128 experts of 2880,
  top-4), experts in gpt-oss's MXFP4 (``*_blocks``, ``*_scales``, interleaved gate/up rows, bf16 biases).

The quantized tensors are built in memory in the checkpoint's own layout and names (a
``moe.checkpoints.StateDictSource`` with the checkpoint's ``quantization_config``), and the model's float
experts are overwritten with their dequantized values, so both paths compute with the same weights.

"before" is transformers' own forward: its quantized experts where it can run them without a download
(``FP8Experts`` for the FP8 model, tried first: its kernels come from the Hugging Face hub, so offline it
falls back), else its dequantized path (bf16 experts holding the dequantized values; gpt-oss's MXFP4
kernels always come from the hub). "after" is the model after ``replace_moe_blocks(model, backend=...,
checkpoint=source)``: moe's experts quantized as stored. For each batch x sequence it prints the
full-forward time of both (median of CUDA-event timings; perf_counter on CPU), the backend ``auto``
chose, the logits difference and the first MoE block's difference on one random input (norm-relative;
the block's is held to the scheme's tolerance row, the logits add every layer's activation quantization),
and a short table last.
"""

from __future__ import annotations

import argparse
import gc
import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from hf_gpu import _shapes, _timer

import moe
import moe.hf
from moe.checkpoints import StateDictSource
from moe.hf.tiny import randomize
from moe.quant import QuantizedWeight, WeightScheme, dequantize, named, quantize
from moe.testing import quant_noise, rel_error, tolerance

FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
              "modules_to_not_convert": ["lm_head"]}
MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
# transformers' defaults are the released dims (DeepSeek-V3, gpt-oss-120b); two layers, both MoE
FULL = {
    "dsv3_fp8": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(num_hidden_layers=2, first_k_dense_replace=0)),
    "gptoss_mxfp4": ("GptOssConfig", "GptOssForCausalLM", dict(
        num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])),
}
TINY = {
    "dsv3_fp8": dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=128, n_routed_experts=8,
                     num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, num_attention_heads=4,
                     num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16,
                     qk_nope_head_dim=16, v_head_dim=16, vocab_size=256, max_position_embeddings=512),
    "gptoss_mxfp4": dict(hidden_size=64, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256, sliding_window=8),
}
COMMON = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="dsv3_fp8,gptoss_mxfp4", help="comma-separated: dsv3_fp8, gptoss_mxfp4")
    p.add_argument("--backend", default="auto", help="moe backend of the replaced blocks (default: auto)")
    p.add_argument("--out", metavar="PATH", help="write the results as JSON here")
    p.add_argument("--tiny", action="store_true", help="tiny dims in fp32 on CPU (a smoke test)")
    p.add_argument("--shapes", help="batch x sequence list (default 1x1,8x1,1x1024; tiny: 1x1,4x16)")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    unknown = sorted(set(args.models.split(",")) - set(FULL))
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(unknown)}; known: {', '.join(FULL)}")
    return args


def _model(name: str, tiny: bool, dtype: torch.dtype, device: str) -> torch.nn.Module:
    config_cls, model_cls, dims = FULL[name]
    config = getattr(transformers, config_cls)(**dims, **(TINY[name] if tiny else {}), **COMMON)
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(transformers, model_cls)._from_config(config, dtype=dtype)
    randomize(model)
    return model.eval()


# ------------------------------------------------------------------------------------ quantized tensors
@torch.no_grad()
def _fp8(w: torch.Tensor, parts: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One [rows, cols] weight in DeepSeek's block FP8: (e4m3 data, fp32 scale_inv [rows / 128, cols / 128])."""
    q = quantize(w[None].float(), named("fp8_block").weights, parts=parts)
    return q.data[0], q.scale[0]


@torch.no_grad()
def dsv3_fp8_source(model: torch.nn.Module) -> tuple[StateDictSource, dict[str, torch.Tensor]]:
    """Every layer's routed experts (fused, as transformers 5 holds them) and shared experts in block FP8;
    the model's float weights are overwritten with the dequantized values. Also returns transformers'
    ``FP8Experts`` tensors by module name (the same tensors)."""
    fp8 = named("fp8_block").weights
    tensors: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        experts, prefix = layer.mlp.experts, f"model.layers.{i}.mlp"
        for proj, parts in (("gate_up_proj", 2), ("down_proj", 1)):
            w = getattr(experts, proj)  # [E, rows, cols]
            data = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=w.device)
            scale = None
            for e in range(w.shape[0]):
                data[e], s = _fp8(w[e], parts)
                scale = scale if scale is not None else torch.empty(w.shape[0], *s.shape, device=w.device)
                scale[e] = s
                w[e] = dequantize(_one(data[e], s, fp8, parts), w.dtype, expert=0)
            tensors[f"{prefix}.experts.{proj}"], tensors[f"{prefix}.experts.{proj}_scale_inv"] = data, scale
        for proj in ("gate_proj", "up_proj", "down_proj"):
            linear = getattr(layer.mlp.shared_experts, proj)
            data, s = _fp8(linear.weight)
            linear.weight.copy_(dequantize(_one(data, s, fp8, 1), linear.weight.dtype, expert=0))
            tensors[f"{prefix}.shared_experts.{proj}.weight"] = data
            tensors[f"{prefix}.shared_experts.{proj}.weight_scale_inv"] = s
    return StateDictSource(tensors, FP8_CONFIG, name="generated DeepSeek-V3 FP8 tensors"), tensors


def _one(data: torch.Tensor, scale: torch.Tensor, scheme: WeightScheme, parts: int) -> QuantizedWeight:
    return QuantizedWeight(data[None], scale[None], scheme, parts=parts)


@torch.no_grad()
def gptoss_mxfp4_source(model: torch.nn.Module) -> StateDictSource:
    """Every layer's experts in gpt-oss's MXFP4 layout; the float experts get the dequantized values."""
    mx = named("mxfp4").weights
    tensors: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        experts, prefix = layer.mlp.experts, f"model.layers.{i}.mlp.experts"
        for proj in ("gate_up_proj", "down_proj"):
            w = getattr(experts, proj)  # [E, K, rows] (transposed; gate_up's columns interleave gate and up)
            e_, cols, rows = w.shape
            blocks = torch.empty(e_, rows, cols // 32, 16, dtype=torch.uint8, device=w.device)
            scales = torch.empty(e_, rows, cols // 32, dtype=torch.uint8, device=w.device)
            for e in range(e_):
                q = quantize(w[e].T.contiguous()[None].float(), mx)
                blocks[e], scales[e] = q.data[0].view(rows, cols // 32, 16), q.scale[0]
                w[e] = dequantize(q, w.dtype, expert=0).T
            tensors[f"{prefix}.{proj}_blocks"], tensors[f"{prefix}.{proj}_scales"] = blocks, scales
            tensors[f"{prefix}.{proj}_bias"] = getattr(experts, f"{proj}_bias").to(torch.bfloat16)
            getattr(experts, f"{proj}_bias").copy_(tensors[f"{prefix}.{proj}_bias"])
    return StateDictSource(tensors, MXFP4_CONFIG, name="generated gpt-oss MXFP4 tensors")


# ------------------------------------------------------------------------------------ transformers' path
def _transformers_fp8(model: torch.nn.Module, tensors: dict[str, torch.Tensor], probe: Callable[[], object]) -> str:
    """Swap in transformers' FP8Experts (holding the FP8 tensors) and run ``probe``; keep them when they run,
    else put the dequantized experts back. Returns which path transformers is on."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import FP8Experts

    originals = []
    for i, layer in enumerate(model.model.layers):
        device = layer.mlp.experts.gate_up_proj.device
        with torch.device("meta"):
            fp8 = FP8Experts(model.config, block_size=(128, 128))
        for name in ("gate_up_proj", "gate_up_proj_scale_inv", "down_proj", "down_proj_scale_inv"):
            fp8.register_parameter(name, torch.nn.Parameter(tensors[f"model.layers.{i}.mlp.experts.{name}"],
                                                            requires_grad=False))
        fp8.to(device)
        originals.append(layer.mlp.experts)
        layer.mlp.experts = fp8
    # the shared experts stay the model's bf16 Linears (holding the dequantized values) on this path
    model.config.quantization_config = FineGrainedFP8Config(weight_block_size=(128, 128),
                                                            modules_to_not_convert=["lm_head", "shared_experts"])
    try:
        probe()
        return "transformers FP8Experts (quantized)"
    except Exception as exc:  # whichever way its kernels are missing: the reason goes into the table
        for layer, experts in zip(model.model.layers, originals, strict=True):
            layer.mlp.experts = experts
        del model.config.quantization_config
        return f"transformers dequantized bf16 (its FP8 kernels: {str(exc).splitlines()[0][:60]})"


@dataclass
class Row:
    model: str
    batch: int
    seq: int
    before: str
    before_ms: float
    backend: str
    after_ms: float
    logits_rel_error: float
    block_rel_error: float
    bound: float

    @property
    def speedup(self) -> float:
        return self.before_ms / self.after_ms


def run_model(name: str, args: argparse.Namespace, dtype: torch.dtype, device: str,
              shapes: list[tuple[int, int]]) -> list[Row]:
    time_ms = _timer(device, args.warmup, args.iters)
    model = _model(name, args.tiny, dtype, device)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randint(0, vocab, (b, s), generator=gen).to(device) for b, s in shapes]
    block_inputs = [torch.randn(b, s, model.config.hidden_size, generator=gen).to(device, dtype) for b, s in shapes]

    def forward(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(ids, use_cache=False).logits

    def block(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = model.model.layers[0].mlp(x)
        return (out[0] if isinstance(out, tuple) else out).float().cpu()  # gpt-oss also returns router scores

    if name == "dsv3_fp8":
        source, tensors = dsv3_fp8_source(model)
        before = _transformers_fp8(model, tensors, lambda: forward(inputs[0]))
        quant = "fp8_block"
        bound = quant_noise(quant)  # moe quantizes the activations per 1x128 (transformers' dequantized path: not)
    else:
        source = gptoss_mxfp4_source(model)
        before = "transformers dequantized bf16 (its MXFP4 kernels come from the hub)"
        quant = "mxfp4"
        bound = tolerance(dtype, quant)  # weight-only, the same values: the kernel-vs-emulation row
    if before.endswith("(quantized)"):
        bound = tolerance(dtype, quant)
    want, want_block, before_ms = [], [], []
    for ids, x in zip(inputs, block_inputs, strict=True):
        want.append(forward(ids).float().cpu())
        want_block.append(block(x))
        before_ms.append(time_ms(lambda ids=ids: forward(ids)))
    if hasattr(model.config, "quantization_config"):  # the FP8Experts ran: moe reads them from the modules
        moe.hf.replace_moe_blocks(model, backend=args.backend)
    else:
        moe.hf.replace_moe_blocks(model, backend=args.backend, checkpoint=source)
    del source
    gc.collect()
    rows = []
    for (b, s), ids, x, w, wb, t0 in zip(shapes, inputs, block_inputs, want, want_block, before_ms, strict=True):
        got = forward(ids).float().cpu()
        chosen = moe.last_decision()
        t1 = time_ms(lambda ids=ids: forward(ids))
        rows.append(Row(name, b, s, before, t0, chosen.chosen if chosen else "none", t1, rel_error(got, w),
                        rel_error(block(x), wb), bound))
    return rows


def main() -> None:
    args = _args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    shapes = _shapes(args.shapes or ("1x1,4x16" if args.tiny else "1x1,8x1,1x1024"))
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    rows = []
    for name in args.models.split(","):
        found = run_model(name, args, dtype, device, shapes)
        gc.collect()  # the model is gone with run_model's frame: free its memory before the next one
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        for r in found:
            print(f"{r.model} {r.batch}x{r.seq}: before {r.before_ms:.3f} ms [{r.before}], after {r.after_ms:.3f} ms "
                  f"[moe {r.backend}], logits diff {r.logits_rel_error:.2e}, first MoE block diff "
                  f"{r.block_rel_error:.2e} (bound {r.bound:.0e})", flush=True)
            rows.append(r)
    print(f"\n{'tiny' if args.tiny else 'full'} dims, 2 layers, {str(dtype).removeprefix('torch.')}, {device_name}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, moe --backend {args.backend}")
    print(f"{'model':<13} {'B x S':>9} {'before':>24} {'ms':>9} {'moe ran':>12} {'ms':>9} {'speedup':>8} "
          f"{'logits diff':>11} {'block diff':>10} {'bound':>6}")
    for r in rows:
        ok = "" if r.block_rel_error <= r.bound else " EXCEEDS"
        print(f"{r.model:<13} {r.batch:>4} x {r.seq:<4}{r.before[:24]:>24} {r.before_ms:>9.3f} {r.backend:>12} "
              f"{r.after_ms:>9.3f} {r.speedup:>7.2f}x {r.logits_rel_error:>11.2e} {r.block_rel_error:>10.2e} "
              f"{r.bound:>6.0e}{ok}")
    print("diffs: norm-relative, moe vs transformers; bound: the scheme's row for the first MoE block alone (the "
          "logits add every layer's activation-quantization noise, amplified by random weights)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=device, device_name=device_name, torch=torch.__version__,
                           transformers=transformers.__version__, dtype=str(dtype), tiny=args.tiny,
                           backend_requested=args.backend,
                           rows=[{**r.__dict__, "speedup": r.speedup} for r in rows]), f, indent=2)


if __name__ == "__main__":
    main()
