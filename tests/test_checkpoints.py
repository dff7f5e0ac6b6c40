"""moe.checkpoints: every W8A8 format loads into FusedMoE's canonical parameters (per expert, fused, from
files or a state dict), exports bit for bit, decodes like a third-party decoder, reads only a rank's
experts and slice, and refuses bad checkpoints without touching the layer."""

from __future__ import annotations

import copy

import pytest
import torch

import moe
from moe.checkpoints import (
    CheckpointError,
    checkpoint_scheme,
    export_experts,
    load_experts,
    load_mlp,
)
from moe.parallel import ParallelConfig, ParallelFusedMoE
from moe.parallel.config import ParallelRanks
from moe.quant import dequantize, named
from moe.testing import experts_float64, rel_error
from tests.checkpoint_files import FP8_BLOCK_CONFIG, SPECS, RecordingSource, ct_config, expert_tensors, write_checkpoint

E, TOP_K, K, N = 4, 2, 160, 144  # not multiples of 128: ragged edge blocks
PREFIX = "model.layers.1.mlp.experts"


def _layer(quant, n=N, **kw) -> moe.FusedMoE:
    return moe.FusedMoE(E, TOP_K, K, n, quant=quant, backend="torch", gate=False, **kw)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """spec name -> (directory, tensors written)."""
    made = {}

    def get(name: str, shards: int = 1):
        if (name, shards) not in made:
            spec = SPECS[name]
            tensors = expert_tensors(PREFIX, spec, E, K, N)
            path = write_checkpoint(tmp_path_factory.mktemp(name), tensors, spec.config, shards=shards)
            made[name, shards] = (path, tensors)
        return made[name, shards]

    return get


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, t in want.items():
        assert got[key].dtype == t.dtype and got[key].shape == t.shape, key
        assert torch.equal(_bits(got[key]), _bits(t)), key


# ------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("name", list(SPECS))
def test_load_then_export_is_the_file(name, files):
    path, tensors = files(name, shards=2)
    spec = SPECS[name]
    assert checkpoint_scheme(path, PREFIX, E) == spec.quant
    layer = _layer(spec.quant, device="meta")
    info = load_experts(layer, path, PREFIX)
    assert info.naming.style == ("fused" if spec.fused else "per_expert")
    assert layer.w13_weight.device.type == "cpu" and layer.config.quant == named(spec.quant)
    _assert_bit_equal(export_experts(layer), tensors)
    again = _layer(spec.quant)
    load_experts(again, tensors, PREFIX, quantization_config=spec.config)  # a state dict loads the same
    _assert_bit_equal(again.state_dict(), layer.state_dict())


@pytest.mark.parametrize("name", ["deepseek_fp8", "ct_fp8_tensor_static", "ct_int8_channel", "ct_fp8_channel_bf16"])
def test_same_parameters_as_weight_loader(name, files):
    """The checkpoint loader and FusedMoE.weight_loader (shard by shard) make the same parameters."""
    path, tensors = files(name)
    spec = SPECS[name]
    ours = _layer(spec.quant)
    load_experts(ours, path, PREFIX)
    theirs = _layer(spec.quant)
    suffix = {"weight": "", spec.scale: "_weight_scale", "input_scale": "_input_scale"}
    for key, t in tensors.items():
        e, proj, kind = key.removeprefix(PREFIX + ".").split(".")
        shard = {spec.names[0]: "w1", spec.names[1]: "w3", spec.names[2]: "w2"}[proj]
        theirs.weight_loader(t.float() if kind != "weight" else t, int(e), shard + suffix[kind])
    _assert_bit_equal(ours.state_dict(), theirs.state_dict())


# ------------------------------------------------------------------------------------ decoding
def _transformers_fp8(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    return Fp8Dequantize(None)._dequantize_one(data, scale, torch.float32)


def _compressed_tensors(data: torch.Tensor, scale: torch.Tensor, quant: str) -> torch.Tensor:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize

    w = ct_config(quant)["config_groups"]["group_0"]["weights"]
    return ct_dequantize(data, scale.float(), args=QuantizationArgs(**w), dtype=torch.float32)


@pytest.mark.parametrize("name", ["deepseek_fp8", "deepseek_fp8_ue8m0", "ct_fp8_tensor", "ct_fp8_channel_bf16",
                                  "ct_fp8_block", "ct_int8_channel"])
def test_decoding_matches_third_party_decoder(name, tmp_path):
    """moe's dequantization of the loaded experts equals transformers' FP8 dequantizer (DeepSeek format) or
    compressed-tensors' own (its formats). transformers' derives the block from the scale grid, so its
    check uses a shape of whole blocks (its rule for ragged edges differs from the format's)."""
    spec = SPECS[name]
    deepseek = spec.config["quant_method"] == "fp8"
    if not deepseek:
        pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (pip install "
                            "'moe-layer[test]')", exc_type=ModuleNotFoundError)
    k, n = (256, 128) if deepseek else (K, N)
    tensors = expert_tensors(PREFIX, spec, E, k, n, seed=3)
    layer = moe.FusedMoE(E, TOP_K, k, n, quant=spec.quant, backend="torch", gate=False)
    load_experts(layer, tensors, PREFIX, quantization_config=spec.config)
    w13, w2 = layer._expert_weights()
    for e in range(E):
        ours = {0: dequantize(w13, expert=e)[:n], 1: dequantize(w13, expert=e)[n:], 2: dequantize(w2, expert=e)}
        for p, proj in enumerate(spec.names):
            data, scale = tensors[f"{PREFIX}.{e}.{proj}.weight"], tensors[f"{PREFIX}.{e}.{proj}.{spec.scale}"]
            theirs = _transformers_fp8(data, scale) if deepseek else _compressed_tensors(data, scale, spec.quant)
            assert torch.equal(ours[p], theirs), f"expert {e} {proj}"


def test_forward_matches_the_float64_oracle_of_the_stored_values(files):
    """The loaded layer computes with the file's values: against the float64 experts of the dequantized
    file, within the scheme's quantization-noise row (only the activations are quantized here)."""
    from moe.testing import QUANT_NOISE

    path, _ = files("deepseek_fp8")
    layer = _layer("fp8_block")
    load_experts(layer, path, PREFIX)
    w13, w2 = (dequantize(w, torch.float64) for w in layer._expert_weights())
    x, logits = torch.randn(7, K), torch.randn(7, E)
    weights, ids = layer.select_experts(x, logits)
    want = experts_float64(x.double(), w13, w2, weights.double(), ids, activation="silu")
    assert rel_error(layer(x, logits), want) <= QUANT_NOISE["fp8_block"]


# ------------------------------------------------------------------------------------ parallel
@pytest.mark.parametrize("name", ["deepseek_fp8", "deepseek_fp8_fused"])
def test_expert_parallel_reads_only_its_experts(name, files):
    path, _ = files(name)
    full = _layer("fp8_block")
    load_experts(full, path, PREFIX)
    src = RecordingSource(path)
    emap = torch.tensor([-1, 0, -1, 1])  # experts 1 and 3 live here
    layer = _layer("fp8_block", expert_map=emap)
    load_experts(layer, src, PREFIX)
    for param in ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale"):
        assert torch.equal(_bits(getattr(layer, param)), _bits(getattr(full, param)[[1, 3]])), param
    if SPECS[name].fused:
        assert {index[0] for _, index in src.reads} == {1, 3}
    else:
        assert {int(key.split(".")[5]) for key, _ in src.reads} == {1, 3}
    if not SPECS[name].fused:
        exported = export_experts(layer)
        assert {int(k.split(".")[5]) for k in exported} == {1, 3}


def _tp_layers(monkeypatch, quant: str, n: int, tp: int = 2) -> list[ParallelFusedMoE]:
    layers = []
    for rank in range(tp):
        ranks = ParallelRanks(1, 0, None, tp, rank, None)
        monkeypatch.setattr(ParallelConfig, "resolve", lambda self, ranks=ranks: ranks)
        layers.append(ParallelFusedMoE(E, TOP_K, K, n, parallel=ParallelConfig(tp_size=tp), quant=quant,
                                       params_dtype=torch.float32, backend="torch", gate=False))
    return layers


@pytest.mark.parametrize("name", ["deepseek_fp8", "deepseek_fp8_fused", "ct_fp8_channel_fused", "ct_fp8_tensor_static"])
def test_tensor_parallel_reads_only_its_slice(monkeypatch, name, tmp_path):
    """Each TP rank holds what ParallelFusedMoE.weight_loader keeps of the full shards, and reads only its
    rows of the data."""
    spec, n = SPECS[name], 256  # whole 128-blocks per rank
    tensors = expert_tensors(PREFIX, spec, E, K, n)
    path = write_checkpoint(tmp_path, tensors, spec.config)
    full = _layer(spec.quant, n=n)
    load_experts(full, path, PREFIX)
    for rank, layer in enumerate(_tp_layers(monkeypatch, spec.quant, n)):
        src = RecordingSource(path)
        load_experts(layer, src, PREFIX)
        want = copy.deepcopy(layer)
        for e in range(E):
            gate, up, down = full.w13_weight[e, :n], full.w13_weight[e, n:], full.w2_weight[e]
            want.weight_loader(gate, e, "w1")
            want.weight_loader(up, e, "w3")
            want.weight_loader(down, e, "w2")
        for param in ("w13_weight", "w2_weight"):
            assert torch.equal(_bits(getattr(layer, param)), _bits(getattr(want, param))), (rank, param)
        data = [(key, index) for key, index in src.reads if key.endswith(("_proj", "proj.weight"))]
        rows = {(r.start, r.stop) for key, index in data
                for r in [index[-1] if "down_proj" in key else index[-2]]}
        half = n // 2
        assert len(data) == E * 3 and rows == {(rank * half, (rank + 1) * half), (n + rank * half, n + (rank + 1) * half)} \
            if SPECS[name].fused else rows == {(rank * half, (rank + 1) * half)}, rows
    with pytest.raises(ValueError, match="export from a layer holding whole experts"):
        export_experts(layer)


def test_tensor_parallel_slice_of_partial_blocks_names_both(files):
    """A TP slice of the intermediate dim that is not whole 128-blocks cannot slice block scales."""
    path, _ = files("deepseek_fp8")
    layer = _layer("fp8_block", n=N // 2)
    layer.ranks = ParallelRanks(1, 0, None, 2, 1, None)  # rank 1 of 2: rows 72..143 of N = 144
    layer.global_intermediate_size = N
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(CheckpointError, match=r"model.safetensors: a tensor-parallel slice of 72 rows at 72 "
                                              r"\(of intermediate size 144\) is not a multiple of the 128x128 scale block"):
        load_experts(layer, path, PREFIX)
    _assert_bit_equal(layer.state_dict(), before)


# ------------------------------------------------------------------------------------ shared experts, ignore lists
def test_shared_experts_load_quantized_and_ignored_modules_stay_float(tmp_path):
    spec = SPECS["deepseek_fp8"]
    shared = {k.replace(f"{PREFIX}.0.", "model.layers.1.mlp.shared_experts."): v
              for k, v in expert_tensors(PREFIX, spec, 1, K, N, seed=5).items()}
    floats = {f"model.layers.2.mlp.experts.{e}.{p}.weight": torch.randn(*shape, dtype=torch.bfloat16)
              for e in range(E) for p, shape in (("gate_proj", (N, K)), ("up_proj", (N, K)), ("down_proj", (K, N)))}
    config = {**FP8_BLOCK_CONFIG, "modules_to_not_convert": ["lm_head", "model.layers.2.mlp.experts"]}
    path = write_checkpoint(tmp_path, {**expert_tensors(PREFIX, spec, E, K, N), **shared, **floats}, config)
    mlp, info = load_mlp(path, "model.layers.1.mlp.shared_experts", K, N)
    assert mlp.mlp._quant_key == "fp8_block" and info.naming.style == "dense"
    _assert_bit_equal(export_experts(mlp.mlp), shared)
    x = torch.randn(5, K)
    w = {p: dequantize(q, expert=0) for p, q in zip(("w13", "w2"), mlp.mlp._expert_weights(), strict=True)}
    ref = experts_float64(x.double(), w["w13"][None].double(), w["w2"][None].double(),
                          torch.ones(5, 1, dtype=torch.float64), torch.zeros(5, 1, dtype=torch.int32), activation="silu")
    assert rel_error(mlp(x), ref) <= moe.testing.QUANT_NOISE["fp8_block"]
    # the ignored layer is float: built unquantized, it loads (cast once to the layer's dtype)
    assert checkpoint_scheme(path, "model.layers.2.mlp.experts", E) is None
    plain = _layer(None, params_dtype=torch.bfloat16)
    load_experts(plain, path, "model.layers.2.mlp.experts")
    assert torch.equal(plain.w13_weight[1, :N], floats["model.layers.2.mlp.experts.1.gate_proj.weight"])
    _assert_bit_equal(export_experts(plain), floats)


def test_mixed_formats_in_one_layer_are_an_error(files):
    path, tensors = files("deepseek_fp8")
    config = {**FP8_BLOCK_CONFIG, "modules_to_not_convert": [f"{PREFIX}.2"]}  # expert 2 said to be float
    with pytest.raises(CheckpointError, match=rf"mixed formats in one layer: {PREFIX}.0.gate_proj is fp8_block but "
                                              rf"{PREFIX}.2.gate_proj is unquantized"):
        load_experts(_layer("fp8_block"), path, PREFIX, quantization_config=config)
    ct = ct_config("fp8_channel", targets=[f"re:{PREFIX}\\.[01]\\."])
    ct["config_groups"]["group_1"] = ct_config("fp8_block")["config_groups"]["group_0"]
    with pytest.raises(CheckpointError, match=r"mixed formats in one layer: .*0.gate_proj is fp8_channel but "
                                              r".*2.gate_proj is fp8_block"):
        checkpoint_scheme(tensors, PREFIX, E, quantization_config=ct)
    bad = dict(tensors)
    bad[f"{PREFIX}.3.up_proj.weight"] = bad[f"{PREFIX}.3.up_proj.weight"].float()  # one expert stored in float
    with pytest.raises(CheckpointError, match=rf"state dict: tensor {PREFIX}.3.up_proj.weight is torch.float32, but "
                                              r"fp8_block stores weights as torch.float8_e4m3fn"):
        load_experts(_layer("fp8_block"), bad, PREFIX, quantization_config=FP8_BLOCK_CONFIG)


# ------------------------------------------------------------------------------------ bad checkpoints
def _loaded(files, name="deepseek_fp8"):
    path, tensors = files(name)
    layer = _layer(SPECS[name].quant)
    load_experts(layer, path, PREFIX)
    return layer, tensors


@pytest.mark.parametrize(("change", "match"), [
    (lambda t: t.pop(f"{PREFIX}.2.down_proj.weight_scale_inv"),
     rf"tensor {PREFIX}.2.down_proj.weight_scale_inv \(expert 2 weight scale\) is missing"),
    (lambda t: t.__setitem__(f"{PREFIX}.1.gate_proj.weight_scale_inv", torch.ones(1, 2)),
     rf"tensor {PREFIX}.1.gate_proj.weight_scale_inv \(expert 1 weight scale\) has shape \[1, 2\], expected \[2, 2\]"),
    (lambda t: t.__setitem__(f"{PREFIX}.0.up_proj.weight", torch.zeros(N, K + 1, dtype=torch.float8_e4m3fn)),
     rf"tensor {PREFIX}.0.up_proj.weight \(expert 0 weight\) has shape \[144, 161\], expected \[144, 160\]"),
    (lambda t: t[f"{PREFIX}.3.gate_proj.weight_scale_inv"].__setitem__((0, 0), -1.0),
     rf"tensor {PREFIX}.3.gate_proj.weight_scale_inv holds scales that are not finite and > 0"),
])
def test_bad_tensors_name_file_and_tensor_and_leave_the_layer(files, tmp_path, change, match):
    layer, tensors = _loaded(files)
    before = copy.deepcopy(layer.state_dict())
    bad = {k: v.clone() for k, v in tensors.items()}
    change(bad)
    path = write_checkpoint(tmp_path, bad, FP8_BLOCK_CONFIG)
    with pytest.raises(CheckpointError, match=rf"{tmp_path}/model.safetensors: {match}"):
        load_experts(layer, path, PREFIX)
    _assert_bit_equal(layer.state_dict(), before)


def test_fused_block_scales_straddling_gate_and_up_are_refused():
    """N = 144: the fused rows' 128-blocks (3 of them) mix gate and up rows; the per-half layout has 2 + 2."""
    spec = SPECS["deepseek_fp8_fused"]
    tensors = expert_tensors(PREFIX, spec, E, K, N)
    tensors[f"{PREFIX}.gate_up_proj_scale_inv"] = torch.ones(E, 3, 2)
    with pytest.raises(CheckpointError, match=rf"state dict: tensor {PREFIX}.gate_up_proj_scale_inv has 3 block rows "
                                              r"over the fused gate and up rows, so with an intermediate size of 144 "
                                              r"\(not a multiple of 128\) a block holds gate and up rows together"):
        load_experts(_layer("fp8_block"), tensors, PREFIX, quantization_config=spec.config)


def test_compressed_tensors_ignore_list(files):
    _, tensors = files("ct_fp8_block")
    config = {**ct_config("fp8_block"), "ignore": ["lm_head", r"re:.*layers\.1\.mlp\.experts\..*"]}
    assert checkpoint_scheme(tensors, PREFIX, E, quantization_config=config) is None
    assert checkpoint_scheme(tensors, PREFIX, E, quantization_config=ct_config("fp8_block")) == "fp8_block"


def test_ue8m0_scales_must_be_powers_of_two(files):
    _, tensors = files("deepseek_fp8")
    with pytest.raises(CheckpointError, match=r"weight_scale_inv holds scales that are not powers of two .* but the "
                                              "config says scale_fmt: ue8m0"):
        load_experts(_layer("fp8_block"), tensors, PREFIX, quantization_config=SPECS["deepseek_fp8_ue8m0"].config)


@pytest.mark.parametrize(("config", "match"), [
    ({"quant_method": "bitsandbytes", "bits": 4},
     r"quant_method='bitsandbytes' is not supported; moe reads awq, compressed-tensors, fp8, gptq, modelopt, mxfp4"),
    ({**FP8_BLOCK_CONFIG, "weight_block_size": [64, 64]},
     r"weight_block_size=\[64, 64\] is not supported for quant_method 'fp8'; allowed: \[128, 128\]"),
    ({**FP8_BLOCK_CONFIG, "activation_scheme": "static"}, r"activation_scheme='static' is not supported"),
    ({**ct_config("fp8_channel"), "format": "pack-quantized"},
     r"config_groups.group_0.input_activations=\{.*\}: pack-quantized weights are read as weight-only"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}}}},
     r"config_groups.g: float weights per channel with static activations per tensor is not supported; supported: "),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}},
     r"input_activations is None: weight-only schemes are not supported"),
])
def test_unsupported_configs_name_the_field(files, config, match):
    path, _ = files("deepseek_fp8")
    with pytest.raises(CheckpointError, match=match):
        load_experts(_layer("fp8_block"), path, PREFIX, quantization_config=config)


def test_layer_scheme_must_match_and_prefix_must_exist(files):
    path, _ = files("deepseek_fp8")
    with pytest.raises(CheckpointError, match=r"config.json: the experts under .* are fp8_block but the layer is built "
                                              r"with quant='fp8_channel'; build FusedMoE\(..., quant='fp8_block'\)"):
        load_experts(_layer("fp8_channel"), path, PREFIX)
    with pytest.raises(CheckpointError, match=r"no expert tensors found; looked for model.layers.9.mlp.experts.0."
                                              r"gate_proj.weight, .*model.layers.9.mlp.experts.gate_up_proj"):
        load_experts(_layer("fp8_block"), path, "model.layers.9.mlp.experts")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_experts(_layer("fp8_block"), path / "nope", PREFIX)
    with pytest.raises(ValueError, match=r"was not loaded by moe\.checkpoints\.load_experts"):
        export_experts(_layer("fp8_block"))


def test_swap_refuses_a_wrong_tensor_and_changes_nothing():
    layer = _layer("fp8_block")
    before = copy.deepcopy(layer.state_dict())
    good = torch.zeros_like(layer.w13_weight)
    with pytest.raises(ValueError, match=r"w2_weight must be \(4, 160, 144\) torch.float8_e4m3fn, got \(4, 160, 143\)"):
        layer.swap_expert_tensors_({"w13_weight": good, "w2_weight": torch.zeros(4, 160, 143, dtype=good.dtype)})
    with pytest.raises(ValueError, match="w13_bias is not a parameter of this FusedMoE"):
        layer.swap_expert_tensors_({"w13_bias": good})
    _assert_bit_equal(layer.state_dict(), before)
