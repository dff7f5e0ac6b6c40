"""Quantized experts on the GPU: every name (W8A8 and weight-only) on the Triton backend over the token-count
list, NaN-poisoned,
against the torch reference's emulation of the scheme (tight) and the unquantized float64 result (the
quantization noise); CUDA-graph replay with new routing; and no bf16 copy of the weights during a call."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moe
from moe.backends.torch_ref import torch_ref_experts
from moe.contract import ExpertsArgs, ExpertsProblem
from moe.quant import NAMES, named, quantize
from moe.quant.calibration import calibrate_static_scales
from moe.testing import QUANT_NOISE, TOKEN_COUNTS, arithmetic_reference, assert_close, experts_float64, rel_error

pytestmark = pytest.mark.gpu
E, K, N, TOPK = 16, 512, 384, 4  # N = 3 blocks of 128: the block scales of several row tiles


def _setup(T: int, name: str, emap: bool = False, per_expert: bool = False, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    local = E // 2 if emap else E
    x = torch.randn(T, K, device="cuda", generator=g).to(torch.bfloat16)
    w13 = (torch.randn(local, 2 * N, K, device="cuda", generator=g) / K**0.5).to(torch.bfloat16)
    w2 = (torch.randn(local, K, N, device="cuda", generator=g) / N**0.5).to(torch.bfloat16)
    weights, ids = moe.fused_topk(torch.randn(T, E, device="cuda", generator=g), TOPK)
    expert_map = None
    if emap:
        expert_map = torch.full((E,), -1, dtype=torch.int32, device="cuda")
        expert_map[::2] = torch.arange(local, dtype=torch.int32, device="cuda")
    cfg = named(name)
    kw = {}
    if cfg.static_activations:
        kw["a13_scale"], kw["a2_scale"] = calibrate_static_scales(x, w13, ids, cfg.activations, "silu",
                                                                  expert_map=expert_map, per_expert=per_expert)
    q13, q2 = quantize(w13, cfg.weights, parts=2), quantize(w2, cfg.weights)
    return dict(x=x, w13=w13, w2=w2, q13=q13, q2=q2, weights=weights, ids=ids, expert_map=expert_map, kw=kw)


def _call(s, name, backend, out=None, weights=None, ids=None):
    return moe.fused_experts(s["x"], s["q13"], s["q2"], s["weights"] if weights is None else weights,
                             s["ids"] if ids is None else ids, expert_map=s["expert_map"], quant=name,
                             backend=backend, out=out, **s["kw"])


def _plain_reference(s) -> torch.Tensor:
    args = ExpertsArgs(s["x"], s["w13"], s["w2"], s["weights"], s["ids"], expert_map=s["expert_map"])
    prob = ExpertsProblem("cuda", torch.bfloat16, s["x"].shape[0], s["w13"].shape[0], E, K, N, TOPK,
                          has_expert_map=s["expert_map"] is not None)
    return torch_ref_experts(args, prob, compute_dtype=torch.float64)


# every backend that declares a scheme, at every token count (and two with an expert map)
BACKEND_SCHEMES = [("triton", name) for name in NAMES] + [("torch_grouped", "fp8_channel")]


def _grouped_emulation(s, name) -> torch.Tensor:
    """torch_grouped's arithmetic: its scaled grouped GEMM writes GEMM1's output in bf16 before the
    activation (the kernels keep it in fp32; that rounding moves GEMM2's fp8 inputs across steps)."""
    x = s["x"]
    args = ExpertsArgs(x, s["q13"], s["q2"], s["weights"], s["ids"], expert_map=s["expert_map"], **s["kw"])
    prob = ExpertsProblem("cuda", torch.bfloat16, x.shape[0], s["w13"].shape[0], E, K, N, TOPK,
                          has_expert_map=s["expert_map"] is not None, quant=named(name))
    return arithmetic_reference("torch_grouped", args, prob)


CASES = [(b, name, T, emap) for b, name in BACKEND_SCHEMES for T in TOKEN_COUNTS for emap in (False, True)
         if not emap or T in (3, 512)]


@pytest.mark.parametrize(("backend", "name", "T", "emap"), CASES,
                         ids=[f"{b}-{n}-T{t}{'-map' if m else ''}" for b, n, t, m in CASES])
def test_gpu_quantized_parity(backend, name, T, emap):
    s = _setup(T, name, emap)
    out = torch.full_like(s["x"], float("nan"))
    assert _call(s, name, backend, out=out) is out
    assert moe.last_decision().chosen == backend
    ref = _call(s, name, "torch") if backend != "torch_grouped" else _grouped_emulation(s, name)
    assert_close(out, ref, scheme=name, what=f"{backend} {name} T={T} vs the emulation")
    err = rel_error(out, _plain_reference(s))
    assert err <= QUANT_NOISE[name], f"{name} T={T}: {err:.3e} from the unquantized result"


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("zero_point", [False, True])
def test_gpu_int4_groups_of_32_and_64(group, zero_point):
    """int4 through a QuantConfig (groups of 32 and 64, the kernels' other declared sizes) on the GPU over
    the token-count list, NaN-poisoned, against the emulation and within the noise of the unquantized
    result (its 128-group name's row: smaller groups quantize more finely)."""
    from moe.quant import QuantConfig, WeightScheme

    name = "w4a16_zp" if zero_point else "w4a16"
    config = QuantConfig(weights=WeightScheme(format="int4", granularity="group", group_size=group,
                                              zero_point=zero_point))
    for T in TOKEN_COUNTS:
        s = _setup(T, name)
        s["q13"], s["q2"] = quantize(s["w13"], config.weights, parts=2), quantize(s["w2"], config.weights)
        out = torch.full_like(s["x"], float("nan"))
        moe.fused_experts(s["x"], s["q13"], s["q2"], s["weights"], s["ids"], backend="triton", out=out)
        assert moe.last_decision().chosen == "triton"
        ref = moe.fused_experts(s["x"], s["q13"], s["q2"], s["weights"], s["ids"], backend="torch")
        assert_close(out, ref, scheme=name, what=f"int4 groups of {group} T={T} vs the emulation")
        assert rel_error(out, _plain_reference(s)) <= QUANT_NOISE[name], f"groups of {group} T={T}"


@pytest.mark.parametrize("name", ["w4a16", "w4a16_zp", "mxfp4", "nvfp4"])
def test_gpu_prepared_group_scales(name):
    """Group scales in the Triton backend's prepared layout (through a PreparedCache, as a layer makes them)
    over the token-count list, with and without an expert map, NaN-poisoned, against the emulation."""
    for T in TOKEN_COUNTS:
        for emap in (False, True) if T in (3, 512) else (False,):
            s = _setup(T, name, emap)
            cache = moe.PreparedCache()
            out = torch.full_like(s["x"], float("nan"))
            moe.fused_experts(s["x"], s["q13"], s["q2"], s["weights"], s["ids"], expert_map=s["expert_map"],
                              backend="triton", out=out, prepared=cache)
            assert cache.current is not None and {"w13_scale", "w2_scale"} <= set(cache.current.tensors)
            assert_close(out, _call(s, name, "torch"), scheme=name, what=f"{name} prepared scales T={T}")


def _direct_case(T: int, name: str, prepared: bool = True):
    """One token count's direct Triton call for ``name`` (an expert map at 3 tokens): the setup, its
    ExpertsArgs (with the backend's prepared group scales unless ``prepared=False``), the problem, and the
    emulation's result."""
    from moe.backends.triton import prepared_scales
    from moe.functional import _problem

    s = _setup(T, name, T == 3)
    args = ExpertsArgs(s["x"], s["q13"], s["q2"], s["weights"], s["ids"], expert_map=s["expert_map"])
    prob = _problem(args, moe.ActivationSpec.parse("silu"), False, name)
    if prepared:
        args = dataclasses.replace(args, prepared=prepared_scales(args, prob))
    return s, args, prob, _call(s, name, "torch")


@pytest.mark.parametrize("name", ["w4a16", "w4a16_zp", "mxfp4", "nvfp4"])
def test_gpu_dequant_pairs_give_the_scalar_bits(name):
    """``dequant_math="pairs"`` (the scale multiply and zero-point add of the 4-bit tiles as packed fmas)
    over the token-count list, on the prepared scales: bitwise equal to the scalar multiplies, NaN-poisoned,
    and within the emulation's tolerance."""
    from moe.backends.triton import triton_experts
    from moe.backends.triton.config import default_config

    for T in TOKEN_COUNTS:
        s, args, prob, ref = _direct_case(T, name)
        cfg = default_config(prob)
        scalar = triton_experts(args, prob, torch.empty_like(s["x"]), cfg.model_copy(update={"dequant_math": "scalar"}))
        out = torch.full_like(s["x"], float("nan"))
        triton_experts(args, prob, out, cfg.model_copy(update={"dequant_math": "pairs"}))
        assert torch.equal(out, scalar), f"{name} T={T}: pairs differ from the scalar multiplies"
        assert_close(out, ref, scheme=name, what=f"{name} pairs T={T}")


@pytest.mark.parametrize("order", ["bytes", "masks"])
@pytest.mark.parametrize("name", ["w4a16", "w4a16_zp", "mxfp4", "nvfp4"])
def test_gpu_decode_orders(name, order):
    """Both orders of the 4-bit decode's values (``decode_order``: byte order, or the mask order with the
    input's columns permuted alike) over the token-count list, with scalar and paired scale multiplies,
    the one-dot gate/up tile too, NaN-poisoned, against the emulation."""
    from moe.backends.triton import triton_experts
    from moe.backends.triton.config import default_config

    for T in TOKEN_COUNTS:
        s, args, prob, ref = _direct_case(T, name)
        for math, gate_up in (("scalar", "two_dots"), ("pairs", "one_dot")):
            cfg = default_config(prob).model_copy(update={"decode_order": order, "dequant_math": math,
                                                          "gate_up": gate_up})
            out = torch.full_like(s["x"], float("nan"))
            triton_experts(args, prob, out, cfg)
            assert_close(out, ref, scheme=name, what=f"{name} decode_order={order} {math} {gate_up} T={T}")


@pytest.mark.parametrize("name", ["w4a16", "w4a16_zp", "mxfp4", "nvfp4"])
def test_gpu_weight_only_decode_tiles(name):
    """The heuristic's measured 4-bit decode tiles, set explicitly (its rules key on model sizes larger than
    the test's): e2m1's 128-wide tiles with GEMM2 256 deep in 4 stages and 4 parts (WIDE_E2M1_ROWS), and
    symmetric int4's 256-deep GEMM1 steps in 4 stages beside a 32-wide GEMM2 in 2 parts
    (DEEP_INT4_GEMM1_ROWS), over the token-count list, NaN-poisoned, against the emulation."""
    from moe.backends.triton import GemmTile, triton_experts
    from moe.backends.triton.config import default_config

    tiles = {"wide": (GemmTile(block_n=128, block_k=128, group_m=64, num_stages=5),
                      GemmTile(block_n=128, block_k=256, group_m=64, num_stages=4), 4),
             "deep": (GemmTile(block_n=64, block_k=256, group_m=64, num_stages=4),
                      GemmTile(block_n=32, block_k=128, group_m=64, num_stages=5), 2)}
    for T in TOKEN_COUNTS:
        s, args, prob, ref = _direct_case(T, name)
        for label, (g1, g2, parts) in tiles.items():
            cfg = default_config(prob).model_copy(update={"block_m": 16, "gemm1": g1, "gemm2": g2, "split_k": parts,
                                                          "combine": "reduce"})
            out = torch.full_like(s["x"], float("nan"))
            triton_experts(args, prob, out, cfg)
            assert_close(out, ref, scheme=name, what=f"{name} {label} decode tiles T={T}")


@pytest.mark.parametrize("name", ["w4a16", "w4a16_zp"])
def test_gpu_group_scales_on_the_partial_products(name):
    """int4 group scales on each K step's partial product (``group_scales="accumulator"``, zero points
    through the input's row sums) over the token-count list, stored and prepared
    scales, both gate/up tiles, NaN-poisoned, against the emulation."""
    from moe.backends.triton import prepared_scales, triton_experts
    from moe.backends.triton.config import default_config

    for T in TOKEN_COUNTS:
        s, args, prob, ref = _direct_case(T, name, prepared=False)
        cfg = default_config(prob)
        tiles = {g: getattr(cfg, g).model_copy(update={"block_k": min(getattr(cfg, g).block_k, 128)})
                 for g in ("gemm1", "gemm2")}
        for prepared, gate_up in ((False, "two_dots"), (True, "one_dot"), (True, "two_dots")):
            run = dataclasses.replace(args, prepared=prepared_scales(args, prob)) if prepared else args
            out = torch.full_like(s["x"], float("nan"))
            triton_experts(run, prob, out, cfg.model_copy(update={"group_scales": "accumulator", "gate_up": gate_up,
                                                                  **tiles}))
            assert_close(out, ref, scheme=name, what=f"{name} accumulator scales prepared={prepared} {gate_up} T={T}")


@pytest.mark.parametrize("name", [n for n in NAMES if n != "fp8_tensor_static"])
def test_gpu_split_k_gemm2(name):
    """The decode configs with GEMM2's reduction in 4 parts (the combine adds their fp32 partial sums) at
    1..64 tokens, with and without an expert map, NaN-poisoned, against the emulation."""
    from moe.backends.triton import triton_experts
    from moe.backends.triton.config import default_config
    from moe.functional import _problem

    for T, emap in ((1, False), (3, True), (16, False), (64, False)):
        s = _setup(T, name, emap)
        args = ExpertsArgs(s["x"], s["q13"], s["q2"], s["weights"], s["ids"], expert_map=s["expert_map"], **s["kw"])
        prob = _problem(args, moe.ActivationSpec.parse("silu"), False, name)
        cfg = default_config(prob).model_copy(update={"split_k": 4, "combine": "reduce"})
        out = torch.full_like(s["x"], float("nan"))
        triton_experts(args, prob, out, cfg)
        assert_close(out, _call(s, name, "torch"), scheme=name, what=f"{name} split_k=4 T={T}")


@pytest.mark.parametrize("name", ["fp8_tensor_static"])
def test_gpu_per_expert_static_scales(name):
    for T in (1, 64, 2048):
        s = _setup(T, name, per_expert=True)
        out = torch.full_like(s["x"], float("nan"))
        _call(s, name, "triton", out=out)
        assert_close(out, _call(s, name, "torch"), scheme=name, what=f"per-expert static scales T={T}")


@pytest.mark.parametrize("name", ["fp8_channel", "fp8_block", "fp8_tensor", "w8a16", "w4a16_zp", "mxfp4", "nvfp4"])
def test_gpu_quantized_cuda_graph(name):
    T = 64
    s = _setup(T, name)
    w, ids = s["weights"].clone(), s["ids"].clone()
    out = torch.empty_like(s["x"])
    _call(s, name, "triton", out=out, weights=w, ids=ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _call(s, name, "triton", out=out, weights=w, ids=ids)
    for seed in (1, 2):
        nw, nids = moe.fused_topk(torch.randn(T, E, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)),
                                  TOPK)
        w.copy_(nw)
        ids.copy_(nids)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, _call(s, name, "torch", weights=nw, ids=nids), scheme=name, what=f"{name} graph replay")


@pytest.mark.parametrize(("backend", "name"), [("triton", n) for n in ("fp8_block", "int8_channel", "w8a16",
                                                                          "fp8_w8a16", "w4a16", "mxfp4", "nvfp4")]
                         + [("torch_grouped", "fp8_channel")])
def test_gpu_no_bf16_copy_of_the_weights(backend, name):
    """The call's peak extra memory stays far below a bf16 copy of the weights (the quantized weights are
    never dequantized to a full copy)."""
    e, k, n = 64, 2048, 1024
    g = torch.Generator(device="cuda").manual_seed(0)
    cfg = named(name)
    q13 = quantize((torch.randn(e, 2 * n, k, device="cuda", generator=g) / k**0.5).to(torch.bfloat16), cfg.weights,
                   parts=2)
    q2 = quantize((torch.randn(e, k, n, device="cuda", generator=g) / n**0.5).to(torch.bfloat16), cfg.weights)
    x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
    w, ids = moe.fused_topk(torch.randn(16, e, device="cuda"), 8)
    moe.fused_experts(x, q13, q2, w, ids, quant=name, backend=backend)  # compile first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    moe.fused_experts(x, q13, q2, w, ids, quant=name, backend=backend)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    bf16_copy = e * 3 * n * k * 2
    assert extra < 0.05 * bf16_copy, f"{name}: {extra / 2**20:.1f} MiB extra during a call (a bf16 copy: " \
                                     f"{bf16_copy / 2**20:.0f} MiB)"


@pytest.mark.parametrize("name", [n for n in NAMES if not named(n).static_activations])
def test_gpu_quantized_layer_forward(name):
    """``quantize_`` on a bf16 FusedMoE on the GPU: the layer's forward (auto picks triton) equals
    fused_experts on its own routing and quantized parameters, eager and replayed in a CUDA graph, and is
    within the scheme's noise of the float layer."""
    torch.manual_seed(0)
    layer = moe.FusedMoE(E, TOPK, K, N, params_dtype=torch.bfloat16, device="cuda")
    x = torch.randn(33, K, device="cuda", dtype=torch.bfloat16)
    w13, w2 = layer.w13_weight.detach().clone(), layer.w2_weight.detach().clone()
    moe.quant.quantize_(layer, name)
    assert layer.w13_weight.dtype != torch.bfloat16  # fp8, int8 or packed uint8
    out = layer(x)
    assert moe.last_decision().chosen == "triton"
    weights, ids = layer.select_experts(x, layer.gate(x))
    q13, q2 = layer._expert_weights()
    assert_close(out, moe.fused_experts(x, q13, q2, weights, ids, quant=name, backend="torch"), scheme=name,
                 what=f"{name} layer vs the emulation")
    assert rel_error(out, experts_float64(x, w13, w2, weights, ids)) <= QUANT_NOISE[name]
    static_x = x.clone()
    graph_out = layer(static_x)  # warm outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = layer(static_x)
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(graph_out, layer(static_x), scheme=name, what=f"{name} layer graph replay")


@pytest.mark.parametrize("granularity", ["token", "group", "tensor"])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_gpu_quantization_pass_matches_the_host_bitwise(fmt, granularity):
    """The quantization pass (moe.kernels.quant.quantize_rows) gives the host's values and scales exactly:
    Triton's approximate fp32 division moved 19 of 16384 int8 roundings off the host's on an H200 before
    the pass divided with div_rn (2026-12-04)."""
    from moe.kernels.quant import quantize_rows
    from moe.quant import ActivationScheme
    from moe.quant.activations import quantize_activations

    scheme = ActivationScheme(format=fmt, granularity=granularity, **({"group_size": 128} if granularity == "group"
                                                                      else {}))
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(512, 1024, device="cuda", generator=gen) * 3).to(torch.bfloat16)
    got = quantize_rows(x, scheme)
    want, scale = quantize_activations(x, scheme)
    assert torch.equal(got.scale.reshape(scale.shape), scale), "scales differ from the host's"
    differ = (got.data.view(torch.uint8) != want.view(torch.uint8)).sum().item()
    assert differ == 0, f"{differ} of {want.numel()} {fmt} values differ from the host's"
