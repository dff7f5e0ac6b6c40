"""moe.checkpoints, the weight-only packed formats (GPTQ v1/v2, AWQ, compressed-tensors pack-quantized,
gpt-oss MXFP4, ModelOpt NVFP4): each loads into FusedMoE's canonical parameters with exactly the values
the format defines (worked out by the test writers in float64), exports bit for bit, decodes like a
third-party decoder (compressed-tensors' unpackers, transformers' MXFP4 dequantizer) or hand-worked
known-answer vectors (GPTQ, AWQ), reads only a rank's experts and slice, and refuses bad checkpoints
naming the file and tensor without touching the layer."""

from __future__ import annotations

import copy

import pytest
import torch

import moe
from moe.checkpoints import CheckpointError, checkpoint_scheme, export_experts, load_experts
from moe.config import ActivationSpec
from moe.parallel import ParallelConfig, ParallelFusedMoE
from moe.parallel.config import ParallelRanks
from moe.quant import dequantize
from moe.testing import experts_float64, rel_error, tolerance
from tests import packed_files as pf
from tests.checkpoint_files import RecordingSource, write_checkpoint

E, TOP_K, K, N = 4, 2, 64, 32
PREFIX = "model.layers.1.mlp.experts"
GPT_OSS_ACT = ActivationSpec(name="swigluoai", alpha=1.702, limit=7.0)

WRITERS = {
    "gptq_v1": lambda e, k, n: pf.gptq(PREFIX, e, k, n),
    "gptq_v1_sym": lambda e, k, n: pf.gptq(PREFIX, e, k, n, sym=True),
    "gptq_v2": lambda e, k, n: pf.gptq(PREFIX, e, k, n, v2=True),
    "gptq_v2_sym_g_idx": lambda e, k, n: pf.gptq(PREFIX, e, k, n, sym=True, v2=True, g_idx=True),
    "gptq_v1_8bit": lambda e, k, n: pf.gptq(PREFIX, e, k, n, bits=8, sym=True),
    "awq": lambda e, k, n: pf.awq(PREFIX, e, k, n),
    "ct_int4": lambda e, k, n: pf.ct_packed(PREFIX, e, k, n),
    "ct_int4_asym_g_idx": lambda e, k, n: pf.ct_packed(PREFIX, e, k, n, sym=False, g_idx=True),
    "ct_int4_asym_fused": lambda e, k, n: pf.ct_packed(PREFIX, e, k, n, sym=False, fused=True),
    "ct_int8": lambda e, k, n: pf.ct_packed(PREFIX, e, k, n, bits=8),
    "nvfp4": lambda e, k, n: pf.nvfp4(PREFIX, e, k, n),
    "nvfp4_fused": lambda e, k, n: pf.nvfp4(PREFIX, e, k, n, fused=True),
    "gpt_oss_mxfp4": lambda e, k, n: pf.gpt_oss_mxfp4(PREFIX, e, k, n),
}


def _layer(packed: pf.Packed, n: int = N, **kw) -> moe.FusedMoE:
    extra = dict(bias=True, activation=GPT_OSS_ACT) if packed.quant == "mxfp4" else {}
    return moe.FusedMoE(E, TOP_K, K, n, quant=packed.quant, backend="torch", gate=False, **extra, **kw)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, t in want.items():
        assert got[key].dtype == t.dtype and got[key].shape == t.shape, (key, got[key].shape, t.shape)
        assert torch.equal(_bits(got[key]), _bits(t)), key


def _values(layer: moe.FusedMoE) -> tuple[torch.Tensor, torch.Tensor]:
    w13, w2 = layer._expert_weights()
    return dequantize(w13, torch.float64), dequantize(w2, torch.float64)


def _assert_values(layer: moe.FusedMoE, packed: pf.Packed, experts=range(E), n: int = N) -> None:
    """The loaded experts hold exactly the values the format defines."""
    w13, w2 = _values(layer)
    for local, e in enumerate(experts):
        assert torch.equal(w13[local, :n], packed.values[e, 0]), (e, "gate")
        assert torch.equal(w13[local, n:], packed.values[e, 1]), (e, "up")
        assert torch.equal(w2[local], packed.values[e, 2]), (e, "down")
        if packed.biases:
            assert torch.equal(layer.w13_bias[local].double(), torch.cat([packed.biases[e, 0], packed.biases[e, 1]]))
            assert torch.equal(layer.w2_bias[local].double(), packed.biases[e, 2])


# ------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("name", list(WRITERS))
def test_load_then_export_is_the_file(name, tmp_path):
    packed = WRITERS[name](E, K, N)
    path = write_checkpoint(tmp_path, packed.tensors, packed.config, shards=2)
    assert checkpoint_scheme(path, PREFIX, E, hidden_size=K, intermediate_size=N) == packed.quant
    layer = _layer(packed, device="meta", params_dtype=torch.bfloat16)
    info = load_experts(layer, path, PREFIX)
    assert info.naming.style == ("fused" if "fused" in name or "gpt_oss" in name else "per_expert")
    _assert_values(layer, packed)
    _assert_bit_equal(export_experts(layer), packed.tensors)
    again = _layer(packed, params_dtype=torch.bfloat16)  # a real-device layer, from a state dict
    load_experts(again, packed.tensors, PREFIX, quantization_config=packed.config)
    _assert_bit_equal(again.state_dict(), layer.state_dict())


def test_int4_scales_keep_the_checkpoint_dtype():
    """GPTQ's fp16 scales load as they are into a bf16 layer (int4 stores bf16, fp16 or fp32 scales)."""
    packed = WRITERS["gptq_v1"](E, K, N)
    layer = _layer(packed, params_dtype=torch.bfloat16)
    assert layer.w13_weight_scale.dtype == torch.bfloat16
    load_experts(layer, packed.tensors, PREFIX, quantization_config=packed.config)
    assert layer.w13_weight_scale.dtype == torch.float16 and layer.w13_weight_zero_point.dtype == torch.uint8


@pytest.mark.parametrize("name", ["gptq_v1", "awq", "ct_int8", "gpt_oss_mxfp4", "nvfp4"])
def test_forward_matches_the_float64_oracle_of_the_stored_values(name):
    packed = WRITERS[name](E, K, N)
    layer = _layer(packed, params_dtype=torch.float32)
    load_experts(layer, packed.tensors, PREFIX, quantization_config=packed.config)
    w13 = torch.stack([torch.cat([packed.values[e, 0], packed.values[e, 1]]) for e in range(E)])
    w2 = torch.stack([packed.values[e, 2] for e in range(E)])
    x, logits = torch.randn(7, K), torch.randn(7, E)
    weights, ids = layer.select_experts(x, logits)
    bias = {}
    if packed.biases:
        bias = dict(w13_bias=torch.stack([torch.cat([packed.biases[e, 0], packed.biases[e, 1]]) for e in range(E)]),
                    w2_bias=torch.stack([packed.biases[e, 2] for e in range(E)]))
    want = experts_float64(x.double(), w13, w2, weights.double(), ids, activation=layer.config.activation, **bias)
    assert rel_error(layer(x, logits), want) <= tolerance(torch.float32, "none") * 10


# ------------------------------------------------------------------------------------ known answers
def _one_expert(tensors: dict, config: dict, quant: str, k: int = 8, n: int = 8) -> moe.FusedMoE:
    """A two-expert layer (one expert would be read as a dense MLP) of the same expert twice."""
    layer = moe.FusedMoE(2, 1, k, n, quant=quant, backend="torch", gate=False)
    load_experts(layer, tensors, "m.experts", quantization_config=config)
    return layer


def _hand(**proj: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same tensors for gate, up and down of experts 0 and 1."""
    return {f"m.experts.{e}.{p}.{k}": v for e in (0, 1) for p in pf.NAMES for k, v in proj.items()}


def _group_key(group: int, zero: bool) -> str:
    return pf._int4_key(group, zero)


def test_gptq_v1_known_answer():
    """8 inputs, 8 outputs, one group of 8. qweight[0, o] = 0x76543210: input i has code i (packed along the
    inputs); qzeros[0, 0] = 0xFEDCBA98 stores zero - 1 = 8 + o for output o (packed along the outputs), so
    v1's zero points are 9 + o: 9 .. 16 (the stored 15 is a zero point of 16); scales 0.5. So
    w[o, i] = (i - 9 - o) / 2."""
    config = {"quant_method": "gptq", "bits": 4, "group_size": 8, "sym": False, "checkpoint_format": "gptq"}
    proj = dict(qweight=torch.full((1, 8), 0x76543210, dtype=torch.int32),
                qzeros=torch.tensor([[0xFEDCBA98 - 2**32]], dtype=torch.int32),
                scales=torch.full((1, 8), 0.5, dtype=torch.float16))
    tensors = _hand(**proj)
    layer = _one_expert(tensors, config, _group_key(8, True))
    want = torch.tensor([[(i - 9 - o) / 2 for i in range(8)] for o in range(8)], dtype=torch.float64)
    w13, w2 = _values(layer)
    assert torch.equal(w13[0, :8], want) and torch.equal(w13[0, 8:], want) and torch.equal(w2[0], want)
    assert layer.w13_weight_zero_point[0, :8, 0].tolist() == list(range(9, 17))
    _assert_bit_equal(export_experts(layer), tensors)
    # gptq_v2 stores the zero points themselves: 8 + o
    v2 = _one_expert(tensors, {**config, "checkpoint_format": "gptq_v2"}, _group_key(8, True))
    assert v2.w13_weight_zero_point[0, :8, 0].tolist() == list(range(8, 16))


def test_awq_known_answer():
    """AWQ packs 8 outputs a word in the order 0, 2, 4, 6, 1, 3, 5, 7: qweight[i, 0] = 0x76543210 puts code
    j in slot j, i.e. output ORDER[j] gets code j: outputs 0..7 hold codes 0, 4, 1, 5, 2, 6, 3, 7 at every
    input. qzeros 0x11111111: zero 1 everywhere; scales 0.25. So w[o, i] = ([0, 4, 1, 5, 2, 6, 3, 7][o] - 1) / 4."""
    config = {"quant_method": "awq", "bits": 4, "group_size": 8, "zero_point": True, "version": "GEMM"}
    proj = dict(qweight=torch.full((8, 1), 0x76543210, dtype=torch.int32),
                qzeros=torch.full((1, 1), 0x11111111, dtype=torch.int32),
                scales=torch.full((1, 8), 0.25, dtype=torch.float16))
    tensors = _hand(**proj)
    layer = _one_expert(tensors, config, _group_key(8, True))
    codes = [0, 4, 1, 5, 2, 6, 3, 7]
    want = torch.tensor([[(codes[o] - 1) / 4] * 8 for o in range(8)], dtype=torch.float64)
    w13, w2 = _values(layer)
    assert torch.equal(w13[0, :8], want) and torch.equal(w2[0], want)
    _assert_bit_equal(export_experts(layer), tensors)


def test_gptq_8bit_known_answer():
    """8 bits: 4 inputs a word; qweight[0, o] = 0x83828180 gives inputs 0..3 codes 128..131, v1 zeros 127 (+1 =
    128) packed 4 outputs a word, one scale a row (group_size -1): w[o, i] = i * s[o]."""
    config = {"quant_method": "gptq", "bits": 8, "group_size": -1, "sym": True}
    s = torch.tensor([[0.5, 1.0, 2.0, 4.0]], dtype=torch.float16)
    proj = dict(qweight=torch.full((1, 4), 0x83828180 - 2**32, dtype=torch.int32),
                qzeros=torch.full((1, 1), 0x7F7F7F7F, dtype=torch.int32), scales=s)
    tensors = _hand(**proj)
    layer = _one_expert(tensors, config, "w8a16", k=4, n=4)
    assert layer.w2_weight[0].tolist() == [[0, 1, 2, 3]] * 4
    want = torch.tensor([[i * float(s[0, o]) for i in range(4)] for o in range(4)], dtype=torch.float64)
    assert torch.equal(_values(layer)[1][0], want)
    _assert_bit_equal(export_experts(layer), tensors)


# ------------------------------------------------------------------------------------ third-party decoders
def _ct_helper(name: str, module: str, old: str):
    """A compressed-tensors helper from its module (0.20) or from where releases before it kept it."""
    import importlib

    for path in (f"compressed_tensors.compressors.{module}", f"compressed_tensors.compressors.quantized_compressors.{old}"):
        try:
            return getattr(importlib.import_module(path), name)
        except (ImportError, AttributeError):
            continue
    pytest.skip(f"this compressed-tensors release has no {name} where the test looks for it")


def _ct_args(packed: pf.Packed):
    from compressed_tensors.quantization import QuantizationArgs

    w = dict(packed.config["config_groups"]["group_0"]["weights"])
    w.pop("actorder")  # compressed-tensors 0.20 no longer accepts 'group' (older releases wrote g_idx with it)
    return QuantizationArgs(**w)


@pytest.mark.parametrize("name", ["ct_int4", "ct_int4_asym_g_idx", "ct_int8"])
def test_compressed_tensors_decoding_matches_its_unpackers(name):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (pip install "
                        "'moe-layer[test]')", exc_type=ModuleNotFoundError)
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize

    unpack_from_int32 = _ct_helper("unpack_from_int32", "pack_quantized.helpers", "pack_quantized")

    packed = WRITERS[name](E, K, N)
    args = _ct_args(packed)
    layer = _layer(packed)
    load_experts(layer, packed.tensors, PREFIX, quantization_config=packed.config)
    w13, w2 = layer._expert_weights()
    for e in range(E):
        ours = {0: dequantize(w13, expert=e)[:N], 1: dequantize(w13, expert=e)[N:], 2: dequantize(w2, expert=e)}
        for p, proj in enumerate(pf.NAMES):
            t = {s: packed.tensors[f"{PREFIX}.{e}.{proj}.{s}"] for s in ("weight_packed", "weight_scale",
                                                                          "weight_shape", "weight_zero_point")
                 if f"{PREFIX}.{e}.{proj}.{s}" in packed.tensors}
            shape = torch.Size(t["weight_shape"].tolist())
            q = unpack_from_int32(t["weight_packed"], args.num_bits, shape)
            zp = None
            if "weight_zero_point" in t:
                zp = unpack_from_int32(t["weight_zero_point"], args.num_bits, t["weight_scale"].shape, packed_dim=0)
            scale = t["weight_scale"].float()
            theirs = ct_dequantize(q, scale, zp, args=args, dtype=torch.float32)
            assert torch.equal(ours[p], theirs), (e, proj)


def test_gpt_oss_decoding_matches_transformers_dequantizer():
    pytest.importorskip("transformers")
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    packed = WRITERS["gpt_oss_mxfp4"](E, K, N)
    layer = _layer(packed)
    load_experts(layer, packed.tensors, PREFIX, quantization_config=packed.config)
    w13, w2 = (dequantize(w) for w in layer._expert_weights())
    gate_up = convert_moe_packed_tensors(packed.tensors[f"{PREFIX}.gate_up_proj_blocks"],
                                         packed.tensors[f"{PREFIX}.gate_up_proj_scales"], dtype=torch.float32)
    down = convert_moe_packed_tensors(packed.tensors[f"{PREFIX}.down_proj_blocks"],
                                      packed.tensors[f"{PREFIX}.down_proj_scales"], dtype=torch.float32)
    # transformers' result is [E, in, out] with gpt-oss's interleaved gate/up columns
    assert torch.equal(w13[:, :N], gate_up[:, :, 0::2].transpose(1, 2))
    assert torch.equal(w13[:, N:], gate_up[:, :, 1::2].transpose(1, 2))
    assert torch.equal(w2, down.transpose(1, 2))


def test_nvfp4_decoding_matches_compressed_tensors_e2m1_unpacker():
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (pip install "
                        "'moe-layer[test]')", exc_type=ModuleNotFoundError)
    unpack_fp4_from_uint8 = _ct_helper("unpack_fp4_from_uint8", "nvfp4.helpers", "nvfp4_quantized")

    packed = WRITERS["nvfp4"](E, K, N)
    layer = _layer(packed)
    load_experts(layer, packed.tensors, PREFIX, quantization_config=packed.config)
    w13, w2 = _values(layer)
    for e in range(E):
        for p, proj in enumerate(pf.NAMES):
            t = {s: packed.tensors[f"{PREFIX}.{e}.{proj}.{s}"] for s in ("weight", "weight_scale", "weight_scale_2")}
            rows, cols = t["weight"].shape[0], 2 * t["weight"].shape[1]
            v = unpack_fp4_from_uint8(t["weight"], rows, cols, dtype=torch.float64)
            theirs = v * t["weight_scale"].double().repeat_interleave(16, dim=1) * t["weight_scale_2"].double()
            ours = w2[e] if p == 2 else w13[e, p * N:(p + 1) * N]
            assert torch.equal(ours, theirs), (e, proj)


# ------------------------------------------------------------------------------------ parallel
@pytest.mark.parametrize("name", ["gptq_v1", "ct_int4_asym_fused", "gpt_oss_mxfp4"])
def test_expert_parallel_reads_only_its_experts(name, tmp_path):
    packed = WRITERS[name](E, K, N)
    path = write_checkpoint(tmp_path, packed.tensors, packed.config)
    src = RecordingSource(path)
    layer = _layer(packed, expert_map=torch.tensor([-1, 0, -1, 1]))  # experts 1 and 3 live here
    info = load_experts(layer, src, PREFIX)
    _assert_values(layer, packed, experts=(1, 3))
    if info.naming.style == "fused":
        assert {index[0] for _, index in src.reads} == {1, 3}
    else:
        assert {int(key.split(".")[5]) for key, _ in src.reads} == {1, 3}
        exported = export_experts(layer)
        assert {int(k.split(".")[5]) for k in exported} == {1, 3}
        _assert_bit_equal(exported, {k: v for k, v in packed.tensors.items() if int(k.split(".")[5]) in (1, 3)})


def _tp_layers(monkeypatch, packed: pf.Packed, n: int, tp: int = 2) -> list[ParallelFusedMoE]:
    layers = []
    extra = dict(bias=True, activation=GPT_OSS_ACT) if packed.quant == "mxfp4" else {}
    for rank in range(tp):
        ranks = ParallelRanks(1, 0, None, tp, rank, None)
        monkeypatch.setattr(ParallelConfig, "resolve", lambda self, ranks=ranks: ranks)
        layers.append(ParallelFusedMoE(E, TOP_K, K, n, parallel=ParallelConfig(tp_size=tp), quant=packed.quant,
                                       params_dtype=torch.float32, backend="torch", gate=False, **extra))
    return layers


@pytest.mark.parametrize("name", ["gptq_v1", "gptq_v1_8bit", "awq", "ct_int4_asym_fused", "nvfp4", "gpt_oss_mxfp4"])
def test_tensor_parallel_reads_only_its_slice(monkeypatch, name, tmp_path):
    """Each TP rank holds its rows of w13 (each half) and its columns of w2, with the scales, zero points and
    biases that go with them (w2's bias on rank 0 only), reading only its part of the packed data."""
    n = 2 * N
    packed = WRITERS[name](E, K, n)
    path = write_checkpoint(tmp_path, packed.tensors, packed.config)
    for rank, layer in enumerate(_tp_layers(monkeypatch, packed, n)):
        src = RecordingSource(path)
        load_experts(layer, src, PREFIX)
        w13, w2 = _values(layer)
        rows = slice(rank * N, (rank + 1) * N)
        for e in range(E):
            assert torch.equal(w13[e, :N], packed.values[e, 0][rows]), (rank, e)
            assert torch.equal(w13[e, N:], packed.values[e, 1][rows]), (rank, e)
            assert torch.equal(w2[e], packed.values[e, 2][:, rows]), (rank, e)
            if packed.biases:
                assert torch.equal(layer.w13_bias[e, :N].double(), packed.biases[e, 0][rows])
                assert torch.equal(layer.w2_bias[e].double(), packed.biases[e, 2] if rank == 0 else
                                   torch.zeros_like(packed.biases[e, 2]))
        data = [(key, index) for key, index in src.reads if key.endswith(("qweight", "weight_packed", "_packed",
                                                                          "weight", "_blocks"))]
        assert data and all(any(isinstance(s, slice) and s != slice(None) for s in index) for _, index in data)
    with pytest.raises(ValueError, match="export from a layer holding whole experts"):
        export_experts(layer)


def test_tensor_parallel_slice_off_the_packing_names_tensor_and_packing(monkeypatch, tmp_path):
    """AWQ packs 8 output features a word: a rank holding 20 of 40 gate rows cannot slice qweight."""
    packed = pf.awq(PREFIX, E, K, 40, group=4)
    path = write_checkpoint(tmp_path, packed.tensors, packed.config)
    layer = _tp_layers(monkeypatch, packed, 40)[1]
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(CheckpointError, match=rf"model.safetensors: a tensor-parallel slice of 20 rows at 20 \(of "
                                              rf"intermediate size 40\) is not a multiple of the packing of 8 codes an "
                                              rf"int32 \(along the output features\) of tensor {PREFIX}.0.gate_proj.qweight"):
        load_experts(layer, path, PREFIX)
    _assert_bit_equal(layer.state_dict(), before)


# ------------------------------------------------------------------------------------ bad checkpoints
def _loaded(name: str) -> tuple[moe.FusedMoE, pf.Packed]:
    packed = WRITERS[name](E, K, N)
    layer = _layer(packed)
    load_experts(layer, packed.tensors, PREFIX, quantization_config=packed.config)
    return layer, packed


def _set(key: str, value: torch.Tensor):
    return lambda t: t.__setitem__(key, value)


@pytest.mark.parametrize(("name", "change", "match"), [
    ("gptq_v1", lambda t: t.pop(f"{PREFIX}.2.down_proj.scales"),
     rf"tensor {PREFIX}.2.down_proj.scales \(expert 2 scale\) is missing"),
    ("gptq_v1", _set(f"{PREFIX}.1.up_proj.scales", torch.ones(1, N, dtype=torch.float16)),
     rf"tensor {PREFIX}.1.up_proj.scales \(expert 1 scale\) has shape \[1, 32\], expected \[2, 32\]"),
    ("gptq_v1", _set(f"{PREFIX}.1.up_proj.g_idx", torch.arange(K, dtype=torch.int32).flip(0) // 32),
     rf"tensor {PREFIX}.1.up_proj.g_idx assigns input feature 0 to group 1, not 0 // 32 = 0: act-order "
     r"\(quantization_config.desc_act\) with a g_idx that is not the contiguous grouping is not supported"),
    ("gptq_v1_sym", _set(f"{PREFIX}.0.gate_proj.qzeros", torch.zeros(2, N // 8, dtype=torch.int32)),
     rf"tensor {PREFIX}.0.gate_proj.qzeros holds zero points \[1\], but quantization_config.sym=true \(after v1's "
     r"\+ 1\) stores every zero point as 8"),
    ("gptq_v1", _set(f"{PREFIX}.3.gate_proj.qweight", torch.zeros(K // 8, N, dtype=torch.int64)),
     rf"tensor {PREFIX}.3.gate_proj.qweight \(expert 3 data\) is torch.int64, but .* checkpoints store qweight as "
     r"int32"),
    ("awq", _set(f"{PREFIX}.3.gate_proj.scales", torch.ones(2, N, dtype=torch.bfloat16)),
     rf"tensor {PREFIX}.3.gate_proj.scales \(expert 3 scale\) is torch.bfloat16 but another expert's scales is "
     r"torch.float16; the experts of one layer share one format"),
    ("ct_int4_asym_g_idx", lambda t: t.pop(f"{PREFIX}.0.up_proj.weight_zero_point"),
     rf"tensor {PREFIX}.0.up_proj.weight_zero_point \(expert 0 zero\) is missing"),
    ("ct_int4_asym_g_idx", _set(f"{PREFIX}.2.down_proj.weight_g_idx", (torch.arange(N) % 2).to(torch.int32)),
     rf"tensor {PREFIX}.2.down_proj.weight_g_idx assigns input feature 1 to group 1, not 1 // 32 = 0: act-order "
     r"\(quantization_config.config_groups.group_0.weights.actorder\)"),
    ("nvfp4", lambda t: t.pop(f"{PREFIX}.1.down_proj.weight_scale_2"),
     rf"tensor {PREFIX}.1.down_proj.weight_scale_2 \(expert 1 global_scale\) is missing"),
    ("nvfp4", _set(f"{PREFIX}.1.gate_proj.weight_scale", torch.ones(N, K // 32).to(torch.float8_e4m3fn)),
     rf"tensor {PREFIX}.1.gate_proj.weight_scale \(expert 1 scale\) has shape \[32, 2\], expected \[32, 4\]"),
    ("gpt_oss_mxfp4", lambda t: t.pop(f"{PREFIX}.down_proj_scales"),
     rf"tensor {PREFIX}.down_proj_scales \(expert 0 scale\) is missing"),
    ("gpt_oss_mxfp4", _set(f"{PREFIX}.gate_up_proj_scales", torch.ones(E, N, K // 32, dtype=torch.uint8)),
     rf"tensor {PREFIX}.gate_up_proj_scales \(expert 0 scale\) has shape \[4, 32, 2\], expected \[4, 64, 2\]"),
])
def test_bad_tensors_name_file_and_tensor_and_leave_the_layer(name, change, match, tmp_path):
    layer, packed = _loaded(name)
    before = copy.deepcopy(layer.state_dict())
    bad = {k: v.clone() for k, v in packed.tensors.items()}
    change(bad)
    path = write_checkpoint(tmp_path, bad, packed.config)
    with pytest.raises(CheckpointError, match=rf"{tmp_path}/model.safetensors: {match}"):
        load_experts(layer, path, PREFIX)
    _assert_bit_equal(layer.state_dict(), before)


@pytest.mark.parametrize(("config", "match"), [
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, r"quantization_config.bits=3 is not supported for "
     r"quant_method 'gptq'; allowed: 4 \(w4a16, w4a16_zp\) or 8 \(w8a16\)"),
    ({"quant_method": "gptq", "bits": 4, "group_size": -1}, r"quantization_config.group_size=-1 is not supported"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, r"bits=8 with group_size=128, sym=True is not supported"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"},
     r"quantization_config.checkpoint_format='marlin' is not supported"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"},
     r"quantization_config.version='gemv' is not supported for quant_method 'awq'; allowed: 'gemm'"),
    ({"quant_method": "modelopt", "quant_algo": "FP8"}, r"quantization_config.quant_algo='FP8' is not supported for "
     r"quant_method 'modelopt'; allowed: 'NVFP4'"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "channel"}}}},
     r"config_groups.g.weights: num_bits=4, strategy='channel', symmetric=True is not supported for pack-quantized"),
])
def test_unsupported_configs_name_the_field(config, match):
    packed = WRITERS["gptq_v1"](E, K, N)
    with pytest.raises(CheckpointError, match=match):
        load_experts(_layer(packed), packed.tensors, PREFIX, quantization_config=config)


def test_group_size_that_does_not_divide_names_file_tensor_and_field(tmp_path):
    """GPTQ in groups of 64 over 96 input features: checkpoint_scheme, told the layer's sizes, refuses."""
    packed = pf.gptq(PREFIX, E, 96, N, group=32)
    config = {**packed.config, "group_size": 64}
    path = write_checkpoint(tmp_path, packed.tensors, config)
    with pytest.raises(CheckpointError, match=rf"{tmp_path}/model.safetensors: tensor {PREFIX}.0.gate_proj.qweight: "
                                              r"quantization_config.group_size=64 does not divide the 96 input "
                                              r"features of this \[32, 96\] projection"):
        checkpoint_scheme(path, PREFIX, E, hidden_size=96, intermediate_size=N)


def test_a_layer_without_biases_is_refused_for_gpt_oss():
    packed = WRITERS["gpt_oss_mxfp4"](E, K, N)
    layer = moe.FusedMoE(E, TOP_K, K, N, quant="mxfp4", activation=GPT_OSS_ACT, backend="torch", gate=False)
    with pytest.raises(CheckpointError, match=r"the layer has no expert biases but the checkpoint's experts have "
                                              r"\(mxfp4\); build it with bias=True"):
        load_experts(layer, packed.tensors, PREFIX, quantization_config=packed.config)


def test_compressed_tensors_padding_must_be_zero():
    """36 input features in 5 int32 words of 8: the last word's 4 padding codes must be 0 (export writes 0)."""
    packed = pf.ct_packed(PREFIX, E, 36, N, group=4)
    key = f"{PREFIX}.0.gate_proj.weight_packed"
    layer = moe.FusedMoE(E, TOP_K, 36, N, quant=packed.quant, backend="torch", gate=False)
    load_experts(layer, packed.tensors, PREFIX, quantization_config=packed.config)
    _assert_bit_equal(export_experts(layer), packed.tensors)
    bad = dict(packed.tensors)
    bad[key] = packed.tensors[key].clone()
    bad[key][0, -1] |= 0x7 << 28
    with pytest.raises(CheckpointError, match=rf"state dict: tensor {key} has non-zero padding codes past element 36"):
        load_experts(layer, bad, PREFIX, quantization_config=packed.config)


def test_shared_experts_load_through_the_same_codecs():
    """A dense MLP (DeepSeek's shared experts) in GPTQ v1: a QuantizedMLP with the format's values, exported
    as it was stored."""
    from moe.checkpoints import load_mlp

    stored = pf.gptq("x", 1, K, N, seed=7)
    prefix = "model.layers.1.mlp.shared_experts"
    tensors = {k.replace("x.0.", f"{prefix}."): v for k, v in stored.tensors.items()}
    mlp, info = load_mlp(tensors, prefix, K, N, quantization_config=stored.config)
    assert info.naming.style == "dense" and mlp.mlp._quant_key == stored.quant
    w13, w2 = _values(mlp.mlp)
    assert torch.equal(w13[0], torch.cat([stored.values[0, 0], stored.values[0, 1]]))
    assert torch.equal(w2[0], stored.values[0, 2])
    _assert_bit_equal(export_experts(mlp.mlp), tensors)
