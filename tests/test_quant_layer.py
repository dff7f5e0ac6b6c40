"""Quantized FusedMoE: parameters per scheme, loading (per expert, fused, expert and tensor parallel),
``moe.quant.quantize_``, the forward against ``fused_experts`` and the float layer, state dicts, errors."""

from __future__ import annotations

import copy
import re

import pytest
import torch

import moe
from moe.parallel import ParallelConfig, ParallelFusedMoE
from moe.parallel.config import ParallelRanks
from moe.quant import NAMES, QuantizedWeight, named, quantize, scale_shape
from moe.testing import experts_float64, rel_error

E, TOP_K, K, N = 4, 2, 160, 144  # K and N are not multiples of 128: partial scale blocks
# the W8A8 names (issue 15); the weight-only names have their own file (test_quant_weight_only.py)
W8A8 = [name for name in NAMES if named(name).activations is not None]
DYNAMIC = [name for name in W8A8 if not named(name).activations.static]
STATIC = "fp8_tensor_static"
FP8 = torch.float8_e4m3fn


def _layer(quant=None, dtype=torch.float32, n=N, **kw) -> moe.FusedMoE:
    kw = {"backend": "torch", "gate": False, **kw}
    return moe.FusedMoE(E, TOP_K, K, n, quant=quant, params_dtype=dtype, **kw)


def _float_and_quantized(name: str, dtype=torch.float32, n=N, **kw) -> tuple[moe.FusedMoE, moe.FusedMoE]:
    """A float layer and a copy converted with quantize_ (a static scheme: its dynamic weights, input scales 1)."""
    cfg = named(name)
    dynamic = cfg.model_copy(update={"activations": cfg.activations.model_copy(update={"static": False})})
    ref = _layer(dtype=dtype, n=n, **kw)
    quantized = moe.quant.quantize_(copy.deepcopy(ref), dynamic)
    if cfg == dynamic:
        return ref, quantized
    static = _layer(name, dtype=dtype, n=n, **kw)
    static.load_state_dict(quantized.state_dict(), strict=False)  # no input scales: they stay 1
    return ref, static


def _quantized_params(layer: moe.FusedMoE) -> dict[str, torch.Tensor]:
    return {k: v for k, v in layer.state_dict().items() if k.startswith(("w13_", "w2_"))}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


# ------------------------------------------------------------------------------------ parameters
@pytest.mark.parametrize("name", W8A8)
@pytest.mark.parametrize("activation", ["silu", "relu2"])
def test_parameters_per_scheme(name, activation):
    layer = _layer(name, dtype=torch.bfloat16, activation=activation)
    cfg, parts = named(name), 2 if activation == "silu" else 1
    rows = parts * N
    store = {"fp8": FP8, "int8": torch.int8}[cfg.weights.format]
    want = {"w13_weight": ((E, rows, K), store), "w2_weight": ((E, K, N), store),
            "w13_weight_scale": (scale_shape(cfg.weights, E, rows, K, parts), torch.float32),
            "w2_weight_scale": (scale_shape(cfg.weights, E, K, N, 1), torch.float32)}
    if cfg.activations.static:
        want |= {"w13_input_scale": ((E,), torch.float32), "w2_input_scale": ((E,), torch.float32)}
    got = {k: (tuple(p.shape), p.dtype) for k, p in layer.named_parameters()}
    assert got == want
    assert not any(p.requires_grad for p in layer.parameters())
    assert layer.config.quant == cfg and layer._quant_key == name and layer.params_dtype == torch.bfloat16
    assert f"quant={name}" in repr(layer)
    if cfg.weights.granularity == "block":
        assert want["w13_weight_scale"][0] == (E, parts * 2, 2)  # two 128-row blocks per part, two column blocks
    # reset_parameters quantized random weights: the layer computes something finite and non-zero
    y = layer(torch.randn(3, K, dtype=torch.bfloat16), torch.randn(3, E))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all() and y.abs().sum() > 0


def test_quant_accepts_a_config_and_refuses_unknown_names():
    assert _layer(named("int8_channel"))._quant_key == "int8_channel"
    assert _layer(None)._quant_key is None and _layer(None).w13_weight_scale is None
    with pytest.raises(ValueError, match="unknown quantization scheme 'fp4'; named schemes: " + ", ".join(NAMES)):
        _layer("fp4")
    with pytest.raises(ValueError, match=", ".join(NAMES)):
        moe.quant.quantize_(_layer(), "fp4")


# ------------------------------------------------------------------------------------ quantize_
@pytest.mark.parametrize("name", DYNAMIC)
def test_quantize_converts_in_place(name):
    layer = _layer(dtype=torch.bfloat16, bias=True)
    w13, w2, b13 = layer.w13_weight, layer.w2_weight, layer.w13_bias.clone()
    qw13 = quantize(w13, named(name).weights, parts=2)
    assert moe.quant.quantize_(layer, name) is layer
    assert layer.config.quant == named(name) and layer._quant_key == name
    assert layer.params_dtype == torch.bfloat16
    assert layer.w13_weight is not w13 and layer.w2_weight is not w2  # new parameters; the float ones are gone
    assert torch.equal(layer.w13_weight, qw13.data) and torch.equal(layer.w13_weight_scale, qw13.scale)
    assert layer.w13_bias.dtype == torch.bfloat16 and torch.equal(layer.w13_bias, b13)
    assert not layer.w13_weight.requires_grad and not layer.w13_weight_scale.requires_grad
    assert layer.w13_input_scale is None


def test_quantize_releases_the_prepared_weights():
    layer = _layer()
    released = []
    layer._prepared.release = lambda: released.append(True)
    layer.quantize_experts_("fp8_channel")
    assert released == [True]


def test_prepared_cache_asks_a_backend_that_prepares_nothing_once():
    """A backend whose prepare() returns None for a problem (nothing to prepare) is asked once for it: the
    cache keeps None without comparing the weights on later calls; a new problem (another scheme, another
    backend) asks again; a PreparedWeights of another backend is refused, naming the contract."""
    from moe.contract import ExpertsArgs
    from moe.functional import PreparedCache, _problem

    class Counting:
        name = "counting"

        def __init__(self, made=None):
            self.calls, self.made = 0, made

        def prepare(self, args, problem):
            self.calls += 1
            return self.made

    x = torch.randn(2, 64)
    w13, w2 = torch.randn(4, 64, 64), torch.randn(4, 64, 32)
    weights, ids = moe.fused_topk(torch.randn(2, 4), 2)
    args = ExpertsArgs(x, w13, w2, weights, ids)
    problem = _problem(args, moe.ActivationSpec.parse("silu"), False, None)
    cache, backend = PreparedCache(), Counting()
    for _ in range(3):
        assert cache.get(backend, args, problem) is None
    assert backend.calls == 1
    other = Counting()
    other.name = "counting_too"  # backends are told apart by name, as the registry does
    assert cache.get(other, args, problem) is None and other.calls == 1
    wrong = Counting(moe.PreparedWeights("someone_else", {}))
    with pytest.raises(TypeError, match=r"prepare\(\) must return PreparedWeights for itself \(or None"):
        PreparedCache().get(wrong, args, problem)


def test_quantize_refuses_twice_static_and_unquantized():
    layer = moe.quant.quantize_(_layer(), "fp8_channel")
    with pytest.raises(ValueError, match=r"already quantized \(fp8_channel\)"):
        moe.quant.quantize_(layer, "int8_channel")
    with pytest.raises(ValueError, match="already quantized"):
        moe.quant.quantize_(_layer("fp8_block"), "fp8_block")
    with pytest.raises(ValueError, match=r"fp8_tensor_static quantizes activations with static input scales, which "
                                         r"come from calibration.*weight_loader.*'fp8_tensor'"):
        moe.quant.quantize_(_layer(), STATIC)
    with pytest.raises(ValueError, match="none is not quantized"):
        _layer().quantize_experts_("none")


# ------------------------------------------------------------------------------------ weight_loader
def _expert_shards(ref: moe.FusedMoE, name: str, e: int) -> dict[str, torch.Tensor]:
    """Expert ``e``'s checkpoint shards, each [N, K] / [K, N] weight quantized on its own."""
    scheme = named(name).weights
    w13 = ref.w13_weight[e]
    shards = {}
    for shard, w in (("w1", w13[:N]), ("w3", w13[N:]), ("w2", ref.w2_weight[e])):
        q = quantize(w[None], scheme)
        shards[shard], shards[f"{shard}_weight_scale"] = q.data[0], q.scale[0]
    if scheme.granularity == "tensor":  # checkpoints store per-tensor scales as scalars
        shards = {k: v.reshape(()) if k.endswith("_scale") else v for k, v in shards.items()}
    return shards


@pytest.mark.parametrize("name", W8A8)
def test_per_expert_shards_equal_quantizing_in_one_go(name):
    """Quantizing w13 with parts=2 equals quantizing w1 and w3 on their own: the per-expert shards loaded
    into a quantized layer give quantize_'s parameters bit for bit."""
    ref, quantized = _float_and_quantized(name)
    layer = _layer(name)
    for e in range(E):
        for shard, t in _expert_shards(ref, name, e).items():
            assert layer.weight_loader(t, e, shard)
    _assert_same(_quantized_params(layer), _quantized_params(quantized))


def test_channel_scales_load_with_a_trailing_size_1_dim():
    ref, quantized = _float_and_quantized("fp8_channel")
    layer = _layer("fp8_channel")
    for e in range(E):
        for shard, t in _expert_shards(ref, "fp8_channel", e).items():
            layer.weight_loader(t[:, None] if shard.endswith("_scale") else t, e, shard)  # [N, 1] as stored
    _assert_same(_quantized_params(layer), _quantized_params(quantized))


def test_input_scales_take_the_larger_of_w1_and_w3():
    layer = _layer(STATIC)
    assert layer.weight_loader(torch.tensor(0.5), 0, "w3_input_scale")
    assert layer.w13_input_scale[0] == 0.5
    layer.weight_loader(torch.tensor([0.25]), 0, "w1_input_scale")  # either order: the larger stays
    assert layer.w13_input_scale[0] == 0.5
    layer.weight_loader(torch.tensor(2.0, dtype=torch.bfloat16), 0, "w1_input_scale")
    assert layer.w13_input_scale[0] == 2.0
    layer.weight_loader(torch.tensor(0.125), 0, "w1_input_scale")  # a reload replaces w1's value
    assert layer.w13_input_scale[0] == 0.5
    layer.weight_loader(torch.tensor(3.0), 1, "w2_input_scale")
    assert layer.w2_input_scale.tolist() == [1.0, 3.0, 1.0, 1.0] and layer.w13_input_scale[1] == 1.0
    assert layer.w2_input_scale.dtype == torch.float32


def test_non_gated_layer_loads_w1_and_w2():
    layer = _layer("fp8_channel", activation="relu2")
    q1 = quantize(torch.randn(1, N, K), named("fp8_channel").weights)
    layer.weight_loader(q1.data[0], 2, "w1")
    layer.weight_loader(q1.scale[0], 2, "w1_weight_scale")
    assert torch.equal(layer.w13_weight[2], q1.data[0]) and torch.equal(layer.w13_weight_scale[2], q1.scale[0])
    with pytest.raises(ValueError, match="w3_weight_scale given but activation 'relu2' is not gated"):
        layer.weight_loader(q1.scale[0], 2, "w3_weight_scale")


def test_loader_errors_name_the_shard_and_what_was_received():
    layer = _layer("fp8_block")
    data, scale = torch.zeros(N, K, dtype=FP8), torch.ones(2, 2)
    with pytest.raises(ValueError, match=r"shard_id must be w1, w3, w2, w1_bias, .*w1_weight_scale, .*w2_input_scale, "
                                         r"got 'w1_scale'"):
        layer.weight_loader(scale, 0, "w1_scale")
    with pytest.raises(ValueError, match=r"w1_weight_scale of expert 1 must have shape \(2, 2\) .*got \(2, 3\)"):
        layer.weight_loader(torch.ones(2, 3), 1, "w1_weight_scale")
    with pytest.raises(ValueError, match=r"w2 of expert 0 must have shape \(160, 144\), got \(144, 160\)"):
        layer.weight_loader(data, 0, "w2")
    with pytest.raises(TypeError, match=r"w1 of expert 0: dtype torch\.bfloat16, but fp8_block stores weights as "
                                        r"torch\.float8_e4m3fn"):
        layer.weight_loader(torch.zeros(N, K, dtype=torch.bfloat16), 0, "w1")
    with pytest.raises(TypeError, match=r"dtype torch\.int8, but fp8_block stores weights as torch\.float8_e4m3fn"):
        layer.weight_loader(torch.zeros(N, K, dtype=torch.int8), 0, "w3")
    with pytest.raises(TypeError, match=r"w1_weight_scale of expert 0: dtype torch\.int32 is not allowed"):
        layer.weight_loader(torch.ones(2, 2, dtype=torch.int32), 0, "w1_weight_scale")
    with pytest.raises(ValueError, match="w1_input_scale given but fp8_block quantizes activations with scales "
                                         "computed per call"):
        layer.weight_loader(torch.tensor(1.0), 0, "w1_input_scale")
    with pytest.raises(ValueError, match="w1_bias given but this FusedMoE was built with bias=False"):
        layer.weight_loader(torch.zeros(N), 0, "w1_bias")
    with pytest.raises(ValueError, match="w2_input_scale of expert 0: input scales must be finite and > 0"):
        _layer(STATIC).weight_loader(torch.tensor(0.0), 0, "w2_input_scale")


def test_unquantized_layer_refuses_scales_and_quantized_data():
    layer = _layer()
    with pytest.raises(ValueError, match=r"weight_loader: w1_weight_scale given but this FusedMoE is unquantized; "
                                         r"build it with quant=\.\.\. \(one of fp8_tensor, "):
        layer.weight_loader(torch.ones(()), 0, "w1_weight_scale")
    with pytest.raises(ValueError, match="load_fused_weights: w2_scale given but this FusedMoE is unquantized"):
        layer.load_fused_weights(w2_scale=torch.ones(E, 1))
    with pytest.raises(TypeError, match=r"w1 of expert 0: dtype torch.float8_e4m3fn is not allowed; .*need "
                                        r"FusedMoE\(quant=...\)"):
        layer.weight_loader(torch.zeros(N, K, dtype=FP8), 0, "w1")
    with pytest.raises(TypeError, match=r"load_fused_weights: w13: dtype torch\.int8 is not allowed"):
        layer.load_fused_weights(w13=torch.zeros(E, 2 * N, K, dtype=torch.int8))


# ------------------------------------------------------------------------------------ fused loading
@pytest.mark.parametrize("name", W8A8)
def test_fused_loading_round_trips(name):
    _, src = _float_and_quantized(name)
    layer = _layer(name)
    layer.load_fused_weights(src.w13_weight, src.w2_weight, w13_scale=src.w13_weight_scale,
                             w2_scale=src.w2_weight_scale, w13_input_scale=src.w13_input_scale,
                             w2_input_scale=src.w2_input_scale)
    _assert_same(_quantized_params(layer), _quantized_params(src))
    want = re.escape(f"load_fused_weights: w13_scale must have shape {tuple(src.w13_weight_scale.shape)}")
    with pytest.raises(ValueError, match=want):
        layer.load_fused_weights(w13_scale=src.w13_weight_scale[:2])
    with pytest.raises(TypeError, match=r"load_fused_weights: w2: dtype torch\.float32, but"):
        layer.load_fused_weights(w2=src.w2_weight.float())


# ------------------------------------------------------------------------------------ forward
def _static_scales(ref: moe.FusedMoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrated input scales: the largest GEMM input over every token, per expert, over 448."""
    x64 = x.double()
    h = torch.einsum("tk,erk->etr", x64, ref.w13_weight.double())
    a = torch.nn.functional.silu(h[..., :N]) * h[..., N:]
    return (x64.abs().amax() / 448).float().expand(E).clone(), (a.abs().amax(dim=(1, 2)) / 448).float()


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("name", W8A8)
def test_forward_equals_fused_experts_and_is_close_to_the_float_layer(name, backend):
    ref, layer = _float_and_quantized(name, dtype=torch.bfloat16)
    layer.backend = backend
    x, logits = torch.randn(9, K, dtype=torch.bfloat16), torch.randn(9, E)
    if layer.w13_input_scale is not None:
        a13, a2 = _static_scales(ref, x)
        layer.load_fused_weights(w13_input_scale=a13, w2_input_scale=a2)
    out = layer(x, logits)
    assert moe.last_decision().chosen == "torch"
    weights, ids = layer.select_experts(x, logits)
    scheme = named(name).weights
    q13 = QuantizedWeight(layer.w13_weight, layer.w13_weight_scale, scheme, parts=2)
    q2 = QuantizedWeight(layer.w2_weight, layer.w2_weight_scale, scheme)
    want = moe.fused_experts(x, q13, q2, weights, ids, quant=name, a13_scale=layer.w13_input_scale,
                             a2_scale=layer.w2_input_scale, backend="torch")
    assert torch.equal(out, want)
    float64 = experts_float64(x, ref.w13_weight, ref.w2_weight, weights, ids)
    assert rel_error(out, float64) < 0.1
    assert rel_error(out, experts_float64(x, q13, q2, weights, ids)) < 0.1  # the dequantized weights in float64


def test_forward_checks_the_activation_dtype():
    layer = _layer("fp8_channel", dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"hidden_states: dtype torch.float32 differs from the layer's parameters "
                                        r"\(torch.bfloat16\); cast the input \(x.to\(torch.bfloat16\)\)$"):
        layer(torch.randn(2, K), torch.randn(2, E))


def test_quantized_weights_are_made_once_and_follow_replaced_parameters():
    layer = _layer("fp8_channel")
    first = layer._expert_weights()
    layer(torch.randn(2, K), torch.randn(2, E))
    assert layer._expert_weights() is first
    layer.load_fused_weights(w13_scale=torch.full_like(layer.w13_weight_scale, 2.0))  # in place: same objects
    assert layer._expert_weights() is first
    layer.w2_weight_scale = torch.nn.Parameter(layer.w2_weight_scale * 2, requires_grad=False)
    layer.prepare()  # what to call before torch.compile after replacing a parameter
    q13, q2 = layer._qweights
    assert q2.scale is layer.w2_weight_scale and q13.data is layer.w13_weight


def test_torch_compile_fullgraph_traces_a_quantized_layer():
    layer = _layer(STATIC)
    layer.load_fused_weights(w13_input_scale=torch.full((E,), 0.01), w2_input_scale=torch.full((E,), 0.002))
    x, logits = torch.randn(2, 5, K), torch.randn(2, 5, E)
    eager = layer(x, logits)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x, logits), eager)


# ------------------------------------------------------------------------------------ state dict
@pytest.mark.parametrize("name", W8A8)
def test_state_dict_round_trips_bit_for_bit(name):
    layer = _layer(name, gate=True)
    if layer.w13_input_scale is not None:
        layer.load_fused_weights(w13_input_scale=torch.rand(E) + 0.5, w2_input_scale=torch.rand(E) + 0.5)
    state = layer.state_dict()
    keys = {"gate.weight", "w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"}
    assert set(state) == keys | ({"w13_input_scale", "w2_input_scale"} if name == STATIC else set())
    fresh = _layer(name, gate=True)
    fresh.load_state_dict(state)
    _assert_same(fresh.state_dict(), state)
    x = torch.randn(4, K)
    assert torch.equal(fresh(x), layer(x))


# ------------------------------------------------------------------------------------ expert parallelism
@pytest.mark.parametrize("name", ["fp8_block", STATIC, "int8_channel"])
@pytest.mark.parametrize("loader", ["fused", "per_expert"])
def test_expert_map_loads_the_local_experts(name, loader):
    """Two complementary expert maps hold the even and the odd experts; each loads its experts' data and
    scales, and the two partial outputs sum to the whole layer's (activation scales per row, group or
    static: the same on every rank)."""
    ref, full = _float_and_quantized(name)
    if full.w13_input_scale is not None:
        full.load_fused_weights(w13_input_scale=torch.rand(E) * 0.01 + 0.01, w2_input_scale=torch.rand(E) * 0.01 + 0.01)
    x = torch.randn(7, K)
    logits = torch.randn(7, E)
    total = torch.zeros_like(x, dtype=torch.float64)
    for held in (0, 1):
        emap = torch.full((E,), -1, dtype=torch.int32)
        emap[held::2] = torch.arange(E // 2, dtype=torch.int32)
        layer = _layer(name, expert_map=emap)
        if loader == "fused":
            layer.load_fused_weights(full.w13_weight, full.w2_weight, w13_scale=full.w13_weight_scale,
                                     w2_scale=full.w2_weight_scale, w13_input_scale=full.w13_input_scale,
                                     w2_input_scale=full.w2_input_scale)
        else:
            _load_per_expert(layer, ref, full, name)
        for key, value in _quantized_params(layer).items():
            assert torch.equal(value, _quantized_params(full)[key][held::2]), key
        total += layer(x, logits).double()
    assert rel_error(total, full(x, logits)) < 1e-6


def _load_per_expert(layer: moe.FusedMoE, ref: moe.FusedMoE, full: moe.FusedMoE, name: str) -> None:
    for e in range(E):
        shards = _expert_shards(ref, name, e)
        if full.w13_input_scale is not None:
            shards |= {"w1_input_scale": full.w13_input_scale[e], "w3_input_scale": full.w13_input_scale[e] / 2,
                       "w2_input_scale": full.w2_input_scale[e]}
        loaded = {layer.weight_loader(t, e, shard) for shard, t in shards.items()}
        assert loaded == {layer.local_expert_id(e) >= 0}


# ------------------------------------------------------------------------------------ tensor parallelism
def _tp_layers(monkeypatch, name: str, n: int, tp: int = 2) -> list[ParallelFusedMoE]:
    """The TP ranks of one layer, built without a process group (no all-reduce: the test sums them)."""
    layers = []
    for rank in range(tp):
        ranks = ParallelRanks(1, 0, None, tp, rank, None)
        monkeypatch.setattr(ParallelConfig, "resolve", lambda self, ranks=ranks: ranks)
        layers.append(ParallelFusedMoE(E, TOP_K, K, n, parallel=ParallelConfig(tp_size=tp), quant=name,
                                       params_dtype=torch.float32, backend="torch", gate=False))
    return layers


def _tp_piece(full: torch.Tensor, rank: int, dim: int, halves: bool) -> torch.Tensor:
    t = full.unflatten(1, (2, -1)) if halves else full
    size = t.shape[dim] // 2
    return t.narrow(dim, rank * size, size).flatten(1, 2) if halves else t.narrow(dim, rank * size, size)


@pytest.mark.parametrize("name", ["fp8_block", STATIC, "fp8_channel", "int8_channel"])
@pytest.mark.parametrize("loader", ["fused", "per_expert"])
def test_tensor_parallel_slices_data_and_scales(monkeypatch, name, loader):
    n = 256  # the fp8_block slice must be whole 128-blocks
    _, full = _float_and_quantized(name, n=n)
    if full.w13_input_scale is not None:
        full.load_fused_weights(w13_input_scale=torch.rand(E) * 0.01 + 0.01, w2_input_scale=torch.rand(E) * 0.01 + 0.01)
    scheme = named(name).weights
    x, logits = torch.randn(6, K), torch.randn(6, E)
    total = torch.zeros_like(x, dtype=torch.float64)
    for rank, layer in enumerate(_tp_layers(monkeypatch, name, n)):
        if loader == "fused":
            layer.load_fused_weights(full.w13_weight, full.w2_weight, w13_scale=full.w13_weight_scale,
                                     w2_scale=full.w2_weight_scale, w13_input_scale=full.w13_input_scale,
                                     w2_input_scale=full.w2_input_scale)
        else:
            for e in range(E):
                for shard, t in _tp_shards(full, e, n).items():
                    assert layer.weight_loader(t, e, shard)
        assert torch.equal(layer.w13_weight, _tp_piece(full.w13_weight, rank, 2, halves=True))
        assert torch.equal(layer.w2_weight, _tp_piece(full.w2_weight, rank, 2, halves=False))
        scale13, scale2 = full.w13_weight_scale, full.w2_weight_scale
        if scheme.granularity != "tensor":
            scale13 = _tp_piece(scale13, rank, 2, halves=True)
        if scheme.granularity == "block":
            scale2 = _tp_piece(scale2, rank, 2, halves=False)
        assert torch.equal(layer.w13_weight_scale, scale13) and torch.equal(layer.w2_weight_scale, scale2)
        if full.w13_input_scale is not None:
            assert torch.equal(layer.w13_input_scale, full.w13_input_scale)
        total += layer(x, logits).double()
    # per-group and static activation scales are the same on every rank; per-token ones of GEMM2's input
    # cover a rank's slice only
    assert rel_error(total, full(x, logits)) < (1e-6 if name in ("fp8_block", STATIC) else 0.1)


def _tp_shards(full: moe.FusedMoE, e: int, n: int) -> dict[str, torch.Tensor]:
    """Expert ``e``'s full (unsliced) checkpoint shards, cut from a quantized layer."""
    s13 = full.w13_weight_scale[e]
    half = s13.shape[0] // 2
    shards = {"w1": full.w13_weight[e, :n], "w3": full.w13_weight[e, n:], "w2": full.w2_weight[e],
              "w1_weight_scale": s13[:half], "w3_weight_scale": s13[half:], "w2_weight_scale": full.w2_weight_scale[e]}
    if full.w13_input_scale is not None:
        shards |= {"w1_input_scale": full.w13_input_scale[e], "w3_input_scale": full.w13_input_scale[e],
                   "w2_input_scale": full.w2_input_scale[e]}
    return shards


def test_tensor_parallel_block_scales_need_whole_blocks(monkeypatch):
    with pytest.raises(ValueError, match=r"tp_size=2: each TP rank holds 72 of intermediate_size=144, not a multiple "
                                         r"of the fp8_block scale block 128x128"):
        ParallelFusedMoE(E, TOP_K, K, N, parallel=ParallelConfig(tp_size=2), quant="fp8_block")
    layer = _tp_layers(monkeypatch, "fp8_block", 256)[0]
    with pytest.raises(ValueError, match=r"w1_weight_scale of expert 0 must have shape \(2, 2\) \(the full checkpoint "
                                         r"shape\).*got \(1, 2\)"):
        layer.weight_loader(torch.ones(1, 2), 0, "w1_weight_scale")


def test_casting_a_quantized_layer_keeps_its_storage_dtypes():
    """layer.to(bf16) / .half() cast the layer's float parts but move quantized data and scales without
    converting them (a bf16 scale would lose precision; bf16 data would no longer be fp8)."""
    layer = moe.FusedMoE(4, 2, 32, 16, params_dtype=torch.float32, quant="fp8_channel", backend="torch")
    data, scale = layer.w13_weight, layer.w13_weight_scale
    x = torch.randn(3, 32)
    before = layer(x.clone()).detach()
    layer.to(torch.bfloat16)
    assert layer.w13_weight is data and layer.w13_weight.dtype == torch.float8_e4m3fn
    assert layer.w13_weight_scale is scale and scale.dtype == torch.float32
    assert layer.gate.weight.dtype == torch.bfloat16 and layer.params_dtype == torch.bfloat16
    assert layer(x.bfloat16()).dtype == torch.bfloat16  # the activations follow the cast
    layer.to(torch.float32)
    torch.testing.assert_close(layer(x).detach(), before, rtol=2e-2, atol=2e-2)  # the gate made a bf16 round trip
