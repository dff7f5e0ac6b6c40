"""replace_moe_blocks(model, checkpoint=path) with weight-only packed experts written here:

- gpt-oss with MXFP4 experts: transformers loads the checkpoint with its MXFP4 integration, which on a
  CPU dequantizes the experts (its ``convert_moe_packed_tensors``); moe loads them quantized from the
  files (de-interleaving gate/up, with the biases). The dequantized experts are exactly transformers',
  and the logits agree within the mxfp4 kernel-vs-emulation row (same values, other arithmetic).
- Mixtral and Qwen3-MoE with GPTQ and AWQ experts: transformers needs a GPTQ/AWQ kernel package to load
  these, so the reference is the float model holding the format's values (worked out by the test
  writers), and moe reads the experts from the files.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moe  # noqa: E402
import moe.hf  # noqa: E402
from moe.checkpoints import export_experts  # noqa: E402
from moe.hf.tiny import tiny_model  # noqa: E402
from moe.quant import dequantize, named, quantize  # noqa: E402
from moe.testing import rel_error, tolerance  # noqa: E402
from tests import packed_files as pf  # noqa: E402
from tests.checkpoint_files import write_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

transformers.logging.set_verbosity_error()




def _ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------ gpt-oss MXFP4
def _mxfp4_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, cols] floats -> gpt-oss blocks [rows, cols / 32, 16] and e8m0 scales [rows, cols / 32]."""
    q = quantize(w[None].float(), named("mxfp4").weights)
    rows, cols = w.shape
    return q.data[0].reshape(rows, cols // 32, 16), q.scale[0]


def _gpt_oss_checkpoint(tmp_path) -> str:
    """A tiny gpt-oss in its released format: experts as *_blocks / *_scales (MXFP4, gate/up rows interleaved
    as transformers' [E, K, 2N] columns are) and bf16 biases; everything else float."""
    model = tiny_model("gpt_oss", intermediate_size=32)  # K = N = 32: whole MXFP4 blocks
    path = tmp_path / "gpt_oss_mxfp4"
    model.config.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    state = {}
    for key, v in model.state_dict().items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = zip(*(_mxfp4_rows(v[e].T.contiguous()) for e in range(v.shape[0])), strict=True)  # [out, in] rows
            state[f"{key}_blocks"], state[f"{key}_scales"] = torch.stack(blocks), torch.stack(scales)
        elif key.endswith("_bias") and ".experts." in key:
            state[key] = v.to(torch.bfloat16)
        else:
            state[key] = v.contiguous()
    qconfig = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                   "model.embed_tokens", "lm_head"]}
    write_checkpoint(path, state, qconfig, config=config, shards=2)
    return str(path)


def test_gpt_oss_mxfp4_experts_load_quantized_and_match_transformers(tmp_path):
    path = _gpt_oss_checkpoint(tmp_path)
    # dequantize=True: transformers >= 5.25 (which installs the `kernels` package) otherwise fetches a hub
    # kernel for its mxfp4 experts, even on CPU
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                            experts_implementation="eager",
                                                            quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()
    assert type(ref.model.layers[0].mlp.experts).__name__ == "GptOssExperts"  # dequantized by transformers
    new = copy.deepcopy(ref)
    names = moe.hf.replace_moe_blocks(new, backend="torch", checkpoint=path)
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for name in names:
        block, original = new.get_submodule(name).moe, ref.get_submodule(name).experts
        assert block._quant_key == "mxfp4" and block.w13_weight.dtype == torch.uint8
        w13, w2 = (dequantize(w) for w in block._expert_weights())
        gate_up = original.gate_up_proj.transpose(1, 2)  # [E, 2N, K], rows gate0, up0, gate1, ...
        assert torch.equal(w13, torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1)), name
        assert torch.equal(w2, original.down_proj.transpose(1, 2)), name
        bias = original.gate_up_proj_bias
        assert torch.equal(block.w13_bias, torch.cat([bias[:, 0::2], bias[:, 1::2]], dim=1)), name
        assert torch.equal(block.w2_bias, original.down_proj_bias), name
    with torch.no_grad():
        want, got = ref(_ids()).logits, new(_ids()).logits
    assert rel_error(got, want) <= tolerance(torch.float32, "mxfp4")
    assert moe.last_decision().chosen == "torch"
    # the export is the file's experts, bit for bit
    from safetensors.torch import load_file

    files = {}
    for f in sorted((tmp_path / "gpt_oss_mxfp4").glob("*.safetensors")):
        files |= load_file(str(f))
    for key, t in export_experts(new.model.layers[1].mlp.moe).items():
        assert t.dtype == files[key].dtype and torch.equal(t.view(torch.uint8), files[key].view(torch.uint8)), key


# ------------------------------------------------------------------------------------ GPTQ / AWQ
_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}
_BLOCK = {"mixtral": "block_sparse_moe", "qwen3_moe": "mlp"}


def _packed_checkpoint(tmp_path, family: str, fmt: str) -> tuple[str, torch.nn.Module]:
    """The tiny model's experts replaced by random GPTQ (v1) or AWQ experts written in the checkpoint's names;
    returns the path and the float model holding exactly those values."""
    model = tiny_model(family)
    ref = copy.deepcopy(model)
    path = tmp_path / f"{family}_{fmt}"
    model.config.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    state = {k: v.contiguous() for k, v in model.state_dict().items() if ".experts." not in k}
    qconfig = None
    for i, layer in enumerate(ref.model.layers):
        experts = layer.mlp.experts
        e, rows, k = experts.gate_up_proj.shape
        prefix = f"model.layers.{i}.{_BLOCK[family]}.experts"
        packed = (pf.gptq(prefix, e, k, rows // 2, group=8, seed=i) if fmt == "gptq"
                  else pf.awq(prefix, e, k, rows // 2, group=8, seed=i))
        names = _EXPERT_NAMES[family]
        state |= {key.replace(".gate_proj.", f".{names[0]}.").replace(".up_proj.", f".{names[1]}.")
                  .replace(".down_proj.", f".{names[2]}."): t for key, t in packed.tensors.items()}
        with torch.no_grad():
            for x in range(e):
                experts.gate_up_proj[x] = torch.cat([packed.values[x, 0], packed.values[x, 1]]).float()
                experts.down_proj[x] = packed.values[x, 2].float()
        qconfig = packed.config
    write_checkpoint(path, state, qconfig, config=config, shards=2)
    return str(path), ref


@pytest.mark.parametrize(("family", "fmt"), [("mixtral", "gptq"), ("qwen3_moe", "awq"), ("qwen3_moe", "gptq")])
def test_gptq_and_awq_experts_load_from_the_checkpoint(family, fmt, tmp_path):
    path, ref = _packed_checkpoint(tmp_path, family, fmt)
    new = copy.deepcopy(ref)
    names = moe.hf.replace_moe_blocks(new, backend="torch", checkpoint=path)
    assert len(names) == 2
    for name in names:
        block = new.get_submodule(name)
        assert block.moe.w13_weight.dtype == torch.uint8 and block.moe.w13_weight_zero_point is not None
        w13, w2 = (dequantize(w) for w in block.moe._expert_weights())
        original = ref.get_submodule(name).experts
        assert torch.equal(w13, original.gate_up_proj) and torch.equal(w2, original.down_proj), name
    with torch.no_grad():
        assert rel_error(new(_ids()).logits, ref(_ids()).logits) <= tolerance(torch.float32, "w4a16_zp")
