"""replace_moe_blocks(model, checkpoint=path) on tiny FP8 DeepSeek-V3 and Qwen3-MoE checkpoints written here:
transformers loads them dequantized (its fallback on CPU), moe loads the experts quantized from the files;
the logits agree within the scheme's quantization-noise row, and moe's dequantized experts are exactly
transformers' dequantized ones."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers' FP8 loader needs accelerate (pip install 'moe-layer[test]')",
                    exc_type=ModuleNotFoundError)

import moe  # noqa: E402
import moe.hf  # noqa: E402
from moe.checkpoints import CheckpointError, QuantizedMLP, export_experts  # noqa: E402
from moe.hf import MoEBlock  # noqa: E402
from moe.hf.tiny import tiny_model  # noqa: E402
from moe.quant import dequantize, named  # noqa: E402
from moe.testing import QUANT_NOISE, rel_error  # noqa: E402
from tests.checkpoint_files import FP8_BLOCK_CONFIG, SPECS, quantize_projection, write_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

transformers.logging.set_verbosity_error()
SPEC = SPECS["deepseek_fp8"]
SKIP = {"deepseek_v3": ["lm_head"], "qwen3_moe": ["lm_head", "mlp.gate"],  # Qwen3's routers stay float
        "mixtral": ["lm_head", "block_sparse_moe.gate"]}


def _mixtral_names(key: str) -> str:
    """Mixtral's original checkpoint names (transformers 5 calls the block ``mlp``, its experts gate/up/down)."""
    key = key.replace(".mlp.", ".block_sparse_moe.")
    if ".experts." in key:
        for ours, theirs in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            key = key.replace(f".{ours}.", f".{theirs}.")
    return key


def _fp8(out: dict, key: str, w: torch.Tensor, spec=SPEC) -> None:
    data, scale = quantize_projection(w, spec)
    out[key] = data
    out[key.removesuffix("weight") + spec.scale] = scale
    if named(spec.quant).static_activations:  # static input scales: room for activations up to ~20 (448 x 0.045)
        out[key.removesuffix("weight") + "input_scale"] = torch.tensor([0.04 + 0.001 * (len(out) % 7)])


def _quantized_state(model: torch.nn.Module, fused: bool, float_experts: str | None,
                     spec=SPEC) -> dict[str, torch.Tensor]:
    """The model's tensors as an FP8 checkpoint: every projection weight in 128x128 blocks, experts per
    expert (or fused as transformers 5 holds them); ``float_experts`` (a layer prefix) stays float."""
    out: dict[str, torch.Tensor] = {}
    for key, v in model.state_dict().items():
        if float_experts and key.startswith(float_experts + ".experts."):
            out[key] = v.contiguous()
        elif key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            stem, proj = key.rsplit(".", 1)
            per = [{}] * v.shape[0]
            for e in range(v.shape[0]):
                per[e] = {}
                if proj == "down_proj":
                    _fp8(per[e], f"{stem}.{e}.down_proj.weight", v[e], spec)
                else:
                    n = v.shape[1] // 2
                    _fp8(per[e], f"{stem}.{e}.gate_proj.weight", v[e, :n], spec)
                    _fp8(per[e], f"{stem}.{e}.up_proj.weight", v[e, n:], spec)
            if not fused:
                for p in per:
                    out |= p
            else:
                names = ("down_proj",) if proj == "down_proj" else ("gate_proj", "up_proj")
                for suffix, fused_suffix in (("weight", ""), ("weight_scale_inv", "_scale_inv")):
                    out[f"{key}{fused_suffix}"] = torch.stack(
                        [torch.cat([per[e][f"{stem}.{e}.{nm}.{suffix}"] for nm in names]) for e in range(v.shape[0])])
        elif key.endswith("_proj.weight") or key.endswith("proj_with_mqa.weight"):
            _fp8(out, key, v, spec)
        else:
            out[key] = v.contiguous()
    return out


def _write(tmp_path, family: str, *, fused: bool = False, float_experts: str | None = None,
           spec: str = "deepseek_fp8") -> str:
    model = tiny_model(family)
    path = tmp_path / f"{family}{'_fused' if fused else ''}_{spec}"
    skip = SKIP[family] + ([float_experts + ".experts"] if float_experts else [])
    model.config.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    state = _quantized_state(model, fused, float_experts, SPECS[spec])
    if family == "mixtral":
        state = {_mixtral_names(k): v for k, v in state.items()}
    if spec == "deepseek_fp8":
        qconfig = {**FP8_BLOCK_CONFIG, "modules_to_not_convert": skip}
    else:  # compressed-tensors: routers by regex, as llm-compressor writes them
        qconfig = {**SPECS[spec].config, "ignore": ["lm_head", "re:.*mlp.gate$"], "quantization_status": "compressed"}
    write_checkpoint(path, state, qconfig, config=config, shards=2)
    return str(path)


def _load(path: str) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                             experts_implementation="eager").eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))




@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe", "mixtral"])
def test_fp8_experts_load_quantized_and_match_transformers(family, tmp_path):
    path = _write(tmp_path, family)
    ref = _load(path)  # transformers dequantized every FP8 weight (no FP8 kernels on CPU)
    new = copy.deepcopy(ref)
    names = moe.hf.replace_moe_blocks(new, backend="torch", checkpoint=path)
    assert names
    for name in names:
        block, original = new.get_submodule(name), ref.get_submodule(name)
        assert isinstance(block, MoEBlock) and block.moe._quant_key == "fp8_block"
        assert block.moe.w13_weight.dtype == torch.float8_e4m3fn
        w13, w2 = block.moe._expert_weights()
        # transformers' own FP8 dequantizer read the same files: moe's decoding is exactly its result
        assert torch.equal(dequantize(w13), original.experts.gate_up_proj), name
        assert torch.equal(dequantize(w2), original.experts.down_proj), name
        if family == "deepseek_v3":
            shared = block.moe.shared_experts
            assert isinstance(shared, QuantizedMLP) and shared.mlp._quant_key == "fp8_block"
            s13, _ = shared.mlp._expert_weights()
            n = s13.shape[1] // 2
            assert torch.equal(dequantize(s13, expert=0)[:n], original.shared_experts.gate_proj.weight)
    ids = _ids()
    with torch.no_grad():
        want, got = ref(ids).logits, new(ids).logits
    err = rel_error(got, want)
    assert 0 < err <= QUANT_NOISE["fp8_block"], err  # only the activations' 1x128 quantization differs
    assert moe.last_decision().chosen == "torch"


@pytest.mark.parametrize("spec", ["ct_fp8_channel_bf16", "ct_fp8_tensor_static"])
def test_compressed_tensors_experts_match_transformers(spec, tmp_path):
    """A compressed-tensors Qwen3-MoE checkpoint: transformers (with compressed-tensors) decompresses it on the
    CPU; moe loads the experts quantized. Its decompressor rounds to the scales' dtype (bf16 here), so the
    experts agree within the bf16 row, and the logits within the scheme's noise row."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (pip install "
                        "'moe-layer[test]')", exc_type=ModuleNotFoundError)
    from moe.testing import tolerance

    path = _write(tmp_path, "qwen3_moe", spec=spec)
    ref = _load(path)
    new = copy.deepcopy(ref)
    moe.hf.replace_moe_blocks(new, backend="torch", checkpoint=path)
    quant = SPECS[spec].quant
    for layer in (0, 1):
        block = new.model.layers[layer].mlp
        assert block.moe._quant_key == quant
        w13 = dequantize(block.moe._expert_weights()[0])
        assert rel_error(w13, ref.model.layers[layer].mlp.experts.gate_up_proj) <= tolerance(torch.bfloat16)
    with torch.no_grad():
        err = rel_error(new(_ids()).logits, ref(_ids()).logits)
    assert 0 < err <= QUANT_NOISE[quant], err


def test_fused_checkpoint_maps_like_the_per_expert_one(tmp_path):
    """transformers 5's fused gate_up_proj/down_proj form (gate rows, then up rows) loads into the same
    parameters as the per-expert form of the same values, and exports as the file."""
    from safetensors.torch import load_file

    per, fused = _write(tmp_path, "qwen3_moe"), _write(tmp_path, "qwen3_moe", fused=True)
    a, b = _load(per), _load(per)
    moe.hf.replace_moe_blocks(a, backend="torch", checkpoint=per)
    moe.hf.replace_moe_blocks(b, backend="torch", checkpoint=fused)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key].view(torch.uint8) if sa[key].dtype == torch.float8_e4m3fn else sa[key],
                           sb[key].view(torch.uint8) if sb[key].dtype == torch.float8_e4m3fn else sb[key]), key
    files = {}
    for f in sorted((tmp_path / "qwen3_moe_fused_deepseek_fp8").glob("*.safetensors")):
        files |= load_file(str(f))
    exported = export_experts(b.model.layers[1].mlp.moe)
    for key, t in exported.items():
        assert torch.equal(t.view(torch.uint8), files[key].view(torch.uint8)), key


def test_float_layer_beside_fp8_layers(tmp_path):
    """Different formats in different layers are normal: a layer in modules_to_not_convert loads float."""
    path = _write(tmp_path, "qwen3_moe", float_experts="model.layers.0.mlp")
    ref = _load(path)
    new = copy.deepcopy(ref)
    moe.hf.replace_moe_blocks(new, backend="torch", checkpoint=path)
    assert new.model.layers[0].mlp.moe._quant_key is None
    assert torch.equal(new.model.layers[0].mlp.moe.w13_weight, ref.model.layers[0].mlp.experts.gate_up_proj)
    assert new.model.layers[1].mlp.moe._quant_key == "fp8_block"
    with torch.no_grad():
        assert rel_error(new(_ids()).logits, ref(_ids()).logits) <= QUANT_NOISE["fp8_block"]


def test_a_bad_checkpoint_leaves_the_model_unchanged(tmp_path):
    path = _write(tmp_path, "qwen3_moe")
    index_file = tmp_path / "qwen3_moe_deepseek_fp8" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    key = "model.layers.1.mlp.experts.5.down_proj.weight_scale_inv"
    del index["weight_map"][key]
    index_file.write_text(json.dumps(index))
    model = tiny_model("qwen3_moe")
    before = [type(m) for m in model.modules()]
    with pytest.raises(CheckpointError, match=re.escape(f"model.safetensors.index.json: tensor {key} (expert 5 "
                                                        "weight scale) is missing")):
        moe.hf.replace_moe_blocks(model, checkpoint=path)
    assert [type(m) for m in model.modules()] == before


def test_hf_check_quant(tmp_path, capsys):
    import argparse

    from moe.hf.check import add_arguments, run

    def args(*extra: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return parser.parse_args([*extra, "--repeat", "1", "--seq", "6", "--backend", "torch"])

    path = _write(tmp_path, "deepseek_v3")
    assert run(args(path, "--quant")) == 0
    out = capsys.readouterr().out
    assert "experts: fp8_block (loaded from the checkpoint files); before: transformers' forward (dequantized" in out
    assert re.search(r"logits: norm-relative difference (\S+) \(the fp8_block quantization-noise row: 1e-01\) ok", out)
    err = float(re.search(r"difference (\S+) ", out).group(1))
    assert 1e-3 < err < 1e-1  # the activations' quantization, not zero and not garbage
    assert run(args("qwen3_moe", "--quant", "int8_channel")) == 0
    assert "experts: int8_channel (quantized after replacement)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--quant without a name loads the experts from a checkpoint "
                                         "directory, but 'qwen3_moe' is a family"):
        run(args("qwen3_moe", "--quant"))
    with pytest.raises(SystemExit, match=r"--quant 'fp8_tensor_static': quantizing the experts takes a dynamic scheme"):
        run(args("qwen3_moe", "--quant", "fp8_tensor_static"))


def test_experts_transformers_kept_in_fp8_stay_quantized(tmp_path):
    """Where transformers has FP8 kernels (a GPU) it keeps FP8 experts (its FP8Experts: fused gate_up_proj and
    gate_up_proj_scale_inv); replace_moe_blocks then reads them from the module in the model's
    quantization_config. Built here by hand on the CPU from the files."""
    from safetensors.torch import load_file
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import FP8Experts

    _write(tmp_path, "qwen3_moe", fused=True)  # the tensors FP8Experts holds
    files = {}
    for f in sorted((tmp_path / "qwen3_moe_fused_deepseek_fp8").glob("*.safetensors")):
        files |= load_file(str(f))
    ref = _load(_write(tmp_path, "qwen3_moe"))  # transformers dequantizes the per-expert form right (not the fused)
    model = copy.deepcopy(ref)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            experts = FP8Experts(model.config, block_size=(128, 128))
            for name, t in experts.named_parameters():
                t.requires_grad_(False).copy_(files[f"model.layers.{i}.mlp.experts.{name}"])
            layer.mlp.experts = experts
    model.config.quantization_config = FineGrainedFP8Config(weight_block_size=(128, 128),
                                                            modules_to_not_convert=SKIP["qwen3_moe"])
    moe.hf.replace_moe_blocks(model, backend="torch")
    assert model.model.layers[1].mlp.moe._quant_key == "fp8_block"
    assert torch.equal(dequantize(model.model.layers[1].mlp.moe._expert_weights()[0]),
                       ref.model.layers[1].mlp.experts.gate_up_proj)
    with torch.no_grad():
        assert rel_error(model(_ids()).logits, ref(_ids()).logits) <= QUANT_NOISE["fp8_block"]
