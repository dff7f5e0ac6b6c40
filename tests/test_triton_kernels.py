"""Triton kernel details on CPU (interpreter): scaled weights through the quant seam, explicit kernel
configs, the combine variants, and the config validation."""

from __future__ import annotations

import pytest
import torch
from cases import Case, make_inputs, oracle

import moe
from moe.config import ActivationSpec
from moe.contract import ExpertsArgs, ExpertsProblem
from moe.testing import assert_close

pytest.importorskip("triton")


def _args(case, dtype=torch.float32):
    inp = make_inputs(case, dtype)
    args = ExpertsArgs(inp["hidden_states"], inp["w13"], inp["w2"], inp["topk_weights"], inp["topk_ids"],
                       inp["w13_bias"], inp["w2_bias"], inp["expert_map"])
    local = inp["w13"].shape[0]
    prob = ExpertsProblem("cpu", dtype, case.T, local, case.E, case.K, case.N, case.k,
                          ActivationSpec.parse(case.activation), case.bias, case.bias, case.expert_map)
    return inp, args, prob


def _w8a8_args(name, T, N):
    """bf16 inputs (E = 4, K = 256) with the weights quantized by the W8A8 scheme ``name`` and, for a static
    scheme, activation scales calibrated on them."""
    import dataclasses

    from moe.quant.calibration import calibrate_static_scales

    inp, args, prob = _args(Case(T=T, E=4, K=256, N=N, k=2), torch.bfloat16)
    cfg = moe.quant.named(name)
    static = {}
    if cfg.static_activations:
        a13, a2 = calibrate_static_scales(inp["hidden_states"], inp["w13"], inp["topk_ids"], cfg.activations, "silu")
        static = dict(a13_scale=a13, a2_scale=a2)
    args = dataclasses.replace(args, w13=moe.quant.quantize(inp["w13"], cfg.weights, parts=2),
                               w2=moe.quant.quantize(inp["w2"], cfg.weights), **static)
    return args, dataclasses.replace(prob, quant=cfg)


@pytest.mark.parametrize("act", ["silu", "relu2"])
def test_scaled_weights_through_the_seam(act):
    """The seam's test scheme: weights times a per-(expert, part) fp32 scale, applied in the epilogue (gate
    and up scaled separately), through fused_experts, against the float64 oracle on the dequantized
    weights."""
    from moe.quant import SCALED, QuantizedWeight

    inp = make_inputs(Case(T=6, E=4, K=32, N=16, k=2, activation=act))
    parts = 2 if moe.ActivationSpec.parse(act).gated else 1
    s13, s2 = torch.rand(4, parts) + 0.5, torch.rand(4, 1) + 0.5
    q13 = QuantizedWeight(inp["w13"], s13, SCALED.weights, parts=parts)
    q2 = QuantizedWeight(inp["w2"], s2, SCALED.weights)
    out = torch.full_like(inp["hidden_states"], float("nan"))
    moe.fused_experts(inp["hidden_states"], q13, q2, inp["topk_weights"], inp["topk_ids"], activation=act,
                      backend="triton", out=out)
    assert moe.last_decision().chosen == "triton" and moe.last_decision().requested == "triton"
    scaled = dict(inp, w13=moe.quant.dequantize(q13), w2=moe.quant.dequantize(q2))
    assert_close(out, oracle(scaled))


@pytest.mark.parametrize("combine", ["reduce", "atomic"])
@pytest.mark.parametrize("block_m", [16, 32])
def test_explicit_configs_and_combine_variants(combine, block_m):
    from moe.backends.triton import GemmTile, KernelConfig, triton_experts

    inp, args, prob = _args(Case(T=20, E=5, K=40, N=24, k=2, bias=True))
    cfg = KernelConfig(block_m=block_m, gemm1=GemmTile(block_n=16, block_k=16, group_m=2, num_stages=1),
                       gemm2=GemmTile(block_n=32, block_k=16, group_m=1, num_stages=1), combine=combine)
    out = torch.full_like(args.hidden_states, float("nan"))
    triton_experts(args, prob, out, cfg)
    assert_close(out, oracle(inp))


@pytest.mark.parametrize(("activation", "T", "K", "N"), [("silu", 20, 40, 24), ("swigluoai", 1, 48, 20),
                                                        ("gelu", 9, 64, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_up_in_one_dot(activation, T, K, N, dtype):
    """gate_up="one_dot": [gate | up] columns in one tile, one dot per step, split after the loop; K and N
    both with and without tails; equals the reference like the two-dot kernel."""
    from moe.backends.triton import GemmTile, KernelConfig, triton_experts

    inp, args, prob = _args(Case(T=T, E=5, K=K, N=N, k=2, bias=True, activation=activation), dtype)
    tile = GemmTile(block_n=16, block_k=16, group_m=1, num_stages=1)
    cfg = KernelConfig(block_m=16, gemm1=tile, gemm2=tile, gate_up="one_dot")
    out = torch.full_like(args.hidden_states, float("nan"))
    triton_experts(args, prob, out, cfg)
    assert_close(out, oracle(inp))


@pytest.mark.parametrize(("activation", "gate_up", "T", "expert_map"), [
    ("silu", "two_dots", 20, False), ("silu", "one_dot", 20, True), ("relu2", "two_dots", 9, False),
    ("swigluoai", "one_dot", 1, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tma_loads(activation, gate_up, T, expert_map, dtype):
    """loads="tma": weight tiles (and GEMM2's input tiles) through tensor descriptors, with tails in K
    (40) and N (24) zero-filled by the descriptor; equals the reference like the pointer loads (bitwise
    equality of the two is checked on the GPU: the interpreter's fp32 matmul may sum a permuted tile in
    another order)."""
    from moe.backends.triton import GemmTile, KernelConfig, triton_experts

    inp, args, prob = _args(Case(T=T, E=5, K=40, N=24, k=2, bias=True, activation=activation,
                                 expert_map=expert_map), dtype)
    outs = {}
    for loads in ("pointer", "tma"):
        tile = GemmTile(block_n=16, block_k=16, group_m=1, num_stages=1, loads=loads)
        cfg = KernelConfig(block_m=16, gemm1=tile, gemm2=tile, gate_up=gate_up)
        outs[loads] = triton_experts(args, prob, torch.full_like(args.hidden_states, float("nan")), cfg)
    assert_close(outs["tma"], oracle(inp))
    assert_close(outs["pointer"], oracle(inp))


def test_tma_loads_fall_back_on_unaligned_rows():
    """N = 20 bf16 is a 40-byte row stride, which a tensor descriptor cannot take: one warning saying
    so, pointer loads, the same result."""
    from moe.backends.triton import GemmTile, KernelConfig, triton_experts

    inp, args, prob = _args(Case(T=6, E=4, K=32, N=20, k=2), torch.bfloat16)
    tile = GemmTile(block_n=16, block_k=16, group_m=1, num_stages=1, loads="tma")
    cfg = KernelConfig(block_m=16, gemm1=tile, gemm2=tile)
    with pytest.warns(RuntimeWarning, match="not 16-byte aligned"):
        out = triton_experts(args, prob, torch.full_like(args.hidden_states, float("nan")), cfg)
    assert_close(out, oracle(inp))


def test_heuristic_loads_and_tuner_load_stage():
    """The heuristic asks for tensor-descriptor loads above 16 rows per expert, and not without a copy
    engine or with rows that are not whole 16 bytes; the tuner's last stage switches each GEMM's loads."""
    import dataclasses

    from moe.backends.triton.config import default_config
    from moe.backends.triton.tuning import load_variants

    _, _, prob = _args(Case(T=4, E=8, K=64, N=32, k=2), torch.bfloat16)
    loads = lambda cfg: (cfg.gemm1.loads, cfg.gemm2.loads)
    assert loads(default_config(dataclasses.replace(prob, num_tokens=8))) == ("pointer", "pointer")  # 2 rows
    big = dataclasses.replace(prob, num_tokens=4096)  # 1024 rows per expert
    assert loads(default_config(big)) == ("tma", "tma")
    assert loads(default_config(big, tma=False)) == ("pointer", "pointer")
    assert loads(default_config(dataclasses.replace(big, intermediate_size=36))) == ("pointer", "pointer")
    best = default_config(big)
    assert [loads(c) for c in load_variants(best)] == [("pointer", "tma"), ("tma", "pointer"),
                                                       ("pointer", "pointer")]


@pytest.mark.parametrize("T", [1, 5, 20])
@pytest.mark.parametrize("split_k", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_k_gemm2_parts_add_up(T, split_k, dtype):
    """GEMM2's reduction in split_k parts (5 K steps: split 8 leaves parts empty), each an fp32 partial sum
    the combine adds up, with biases (added once) and an expert map, NaN-poisoned, against the float64
    oracle; the combine rounds the sum like an unsplit GEMM2's output, so bf16 matches the unsplit run."""
    from moe.backends.triton import GemmTile, KernelConfig, triton_experts

    inp, args, prob = _args(Case(T=T, E=5, K=40, N=72, k=2, bias=True, expert_map=True), dtype)
    tiles = dict(block_m=16, gemm1=GemmTile(block_n=16, block_k=16, group_m=2, num_stages=1),
                 gemm2=GemmTile(block_n=32, block_k=16, group_m=1, num_stages=1))
    out = torch.full_like(args.hidden_states, float("nan"))
    triton_experts(args, prob, out, KernelConfig(**tiles, split_k=split_k))
    assert_close(out, oracle(inp))
    whole = triton_experts(args, prob, torch.empty_like(out), KernelConfig(**tiles))
    assert_close(out, whole, what="split vs unsplit")


@pytest.mark.parametrize("name", ["fp8_block", "fp8_channel", "fp8_tensor", "int8_channel", "fp8_tensor_static"])
@pytest.mark.parametrize("gemm2_input", ["load", "pass"])
def test_split_k_gemm2_with_w8a8_scales(name, gemm2_input):
    """Each part's partial sum carries the scales of its own K steps (blocks, groups) and the epilogue's
    (channels, tokens, the tensor): the sum equals the reference's emulation, N ragged against 128."""

    from moe.backends.torch_ref import torch_ref_experts
    from moe.backends.triton import GemmTile, KernelConfig, triton_experts

    args, prob = _w8a8_args(name, 3, 392)
    tile = GemmTile(block_n=64, block_k=128, group_m=1, num_stages=1)
    out = torch.full_like(args.hidden_states, float("nan"))
    triton_experts(args, prob, out, KernelConfig(block_m=16, gemm1=tile, gemm2=tile, gemm2_input=gemm2_input,
                                                 split_k=2))
    assert_close(out, torch_ref_experts(args, prob), scheme=name, what=f"{name} split_k=2")


def test_kernel_config_validation():
    from moe.backends.triton import GemmTile, KernelConfig
    from moe.backends.triton.config import fit_smem

    with pytest.raises(ValueError, match="block_n"):
        GemmTile(block_n=48)
    with pytest.raises(ValueError, match="num_stages"):
        GemmTile(num_stages=0)
    with pytest.raises(ValueError, match=r"split_k=2 .* needs combine='reduce' \(got combine='atomic'\)"):
        KernelConfig(split_k=2, combine="atomic")
    with pytest.raises(ValueError, match="split_k"):
        KernelConfig(split_k=3)
    big = KernelConfig(block_m=128, gemm1=GemmTile(block_n=256, block_k=128, num_stages=6))
    fitted = fit_smem(big, 4, True)
    assert max(fitted.smem_bytes(4, True)) <= 200 * 1024 < max(big.smem_bytes(4, True))


def test_chunked_run_is_identical_and_bounded():
    from moe.backends.triton import GemmTile, KernelConfig, triton_experts
    from moe.backends.triton.config import workspace_bytes

    inp, args, prob = _args(Case(T=21, E=6, K=32, N=24, k=2, expert_map=True), torch.bfloat16)
    tile = GemmTile(block_n=32, block_k=32, group_m=1, num_stages=1)
    cfg = KernelConfig(block_m=16, gemm1=tile, gemm2=tile)
    whole = triton_experts(args, prob, torch.full_like(args.hidden_states, float("nan")), cfg)
    with moe.override_options(chunk_tokens=8):
        chunked = triton_experts(args, prob, torch.full_like(args.hidden_states, float("nan")), cfg)
    assert torch.equal(whole, chunked)  # bitwise: chunks change nothing but the workspace
    assert_close(chunked, oracle(inp))
    assert workspace_bytes(8, 2, 6, 32, 24, 2, 16) < workspace_bytes(21, 2, 6, 32, 24, 2, 16)


def test_batch_invariant_mode_on_interpreter():
    """A token alone and inside a batch give bitwise-identical outputs with the one fixed config."""
    import dataclasses

    from moe.backends.triton import triton_experts

    _, args, prob = _args(Case(T=7, E=4, K=32, N=16, k=2), torch.float32)
    with moe.override_options(batch_invariant=True):
        batch = triton_experts(args, prob, torch.empty_like(args.hidden_states))
        for t in (0, 3, 6):
            one = dataclasses.replace(args, hidden_states=args.hidden_states[t:t + 1],
                                      topk_weights=args.topk_weights[t:t + 1], topk_ids=args.topk_ids[t:t + 1])
            alone = triton_experts(one, dataclasses.replace(prob, num_tokens=1), torch.empty_like(one.hidden_states))
            assert torch.equal(alone[0], batch[t])


def test_precomputed_alignment_gives_the_same_result():
    """triton_experts with the routing aligned beforehand (how the benchmark times the kernels alone)
    equals the full run bitwise; an alignment for another row tile is refused."""
    from moe.backends.triton import GemmTile, KernelConfig, triton_experts
    from moe.kernels.align import align

    inp, args, prob = _args(Case(T=12, E=5, K=32, N=16, k=2))
    tile = GemmTile(block_n=16, block_k=16, group_m=1, num_stages=1)
    cfg = KernelConfig(block_m=16, gemm1=tile, gemm2=tile)
    full = triton_experts(args, prob, torch.full_like(args.hidden_states, float("nan")), cfg)
    al = align(args.topk_ids, prob.num_experts, cfg.block_m)
    pre = triton_experts(args, prob, torch.full_like(args.hidden_states, float("nan")), cfg, alignment=al)
    assert torch.equal(full, pre)
    assert_close(pre, oracle(inp))
    with pytest.raises(ValueError, match="alignment: aligned for block_m=16 but the config has block_m=32"):
        triton_experts(args, prob, torch.empty_like(args.hidden_states), cfg.model_copy(update={"block_m": 32}),
                       alignment=al)


def test_block_scaled_weights_refuse_k_tiles_wider_than_a_block():
    """fp8_block: a K tile wider than the 128 columns of a scale block would apply one block's scale to
    two; the config is refused before any GEMM launches, naming the GEMM and the fix."""
    from moe.backends.triton import GemmTile, KernelConfig, triton_experts

    inp, args, prob = _args(Case(T=3, E=2, K=256, N=128, k=1))
    cfg = moe.quant.named("fp8_block")
    args = ExpertsArgs(args.hidden_states, moe.quant.quantize(inp["w13"], cfg.weights, parts=2),
                       moe.quant.quantize(inp["w2"], cfg.weights), args.topk_weights, args.topk_ids)
    import dataclasses

    prob = dataclasses.replace(prob, quant=cfg)
    small = GemmTile(block_n=16, block_k=64, group_m=1, num_stages=1)
    wide = KernelConfig(block_m=16, gemm1=small, gemm2=small.model_copy(update={"block_k": 256}))
    with pytest.raises(ValueError, match=r"gemm2\.block_k=256 must divide the 128 columns of a weight scale block"):
        triton_experts(args, prob, torch.empty_like(args.hidden_states), wide)


def test_w8a8_heuristic_sizes_tiles_by_their_bytes():
    """W8A8 weight tiles are 1 byte an element; an input tile is 1 byte unless its GEMM quantizes it itself
    (GEMM2 of dynamic schemes loading its input, GEMM1 of static ones: 2 bytes); every pipeline of the
    heuristic fits shared memory at those sizes, and a 128-wide K tile of 2-byte inputs costs a pipeline
    stage. Block-scaled weights take 128-wide K tiles (a scale block a step), the rest 64."""
    import dataclasses

    from moe.backends.triton.config import SMEM_BUDGET, default_config, input_bytes, operand_bytes
    from moe.workload import PRESETS

    for preset, m in (("dsv3", 16384), ("qwen3", 4096), ("mixtral", 1024), ("mixtral", 16), ("dsv3", 4)):
        plain = PRESETS[preset].problem("cpu", torch.bfloat16, m)
        loading = m * PRESETS[preset].top_k <= 64  # few pairs: GEMM2 quantizes a per-tensor input as it loads it
        for name, bk, inputs in (("fp8_block", 128, (1, 1)), ("fp8_channel", 64, (1, 1)),
                                 ("int8_channel", 64, (1, 1)), ("fp8_tensor", 64, (1, 2) if loading else (1, 1)),
                                 ("fp8_tensor_static", 64, (2, 1))):
            prob = dataclasses.replace(plain, quant=moe.quant.named(name))
            cfg = default_config(prob)
            assert cfg.gemm2_input == ("load" if loading and name == "fp8_tensor" else "pass")
            assert operand_bytes(prob) == 1 and input_bytes(prob, cfg.gemm2_input) == inputs
            if m >= 1024:  # the compute-bound buckets (decode tiles are 128 deep for every scheme)
                assert cfg.gemm1.block_k == cfg.gemm2.block_k == bk
            assert max(cfg.smem_bytes(1, True, inputs)) <= SMEM_BUDGET
        assert operand_bytes(plain) == 2 and input_bytes(plain) == (2, 2)
        assert default_config(plain).gemm1.block_k == (64 if m >= 1024 else 128)
    # a GEMM2 at 128-wide K tiles of 2-byte inputs and 256-wide N tiles: a stage less than bf16's 4 to fit
    from moe.backends.triton.config import GemmTile, KernelConfig, fit_smem

    wide = GemmTile(block_n=256, block_k=128, num_warps=8, num_stages=4)
    fitted = fit_smem(KernelConfig(block_m=128, gemm1=wide.model_copy(update={"block_n": 128}), gemm2=wide), 1, True,
                      input_elt=(1, 2))
    assert fitted.gemm2.num_stages == 3 and fitted.gemm1.num_stages == 4


def test_w8a8_decode_splits_short_gemm2_grids():
    """W8A8 while the weights stream on a GEMM2 grid short of MIN_PROGRAMS (mixtral at one or two tokens:
    64 or 128 programs of 128 columns) takes 32 x 256 / 64 x 256 tiles (128-deep for block scales) and two
    parts; enough programs (dsv3 at one token: 8 experts x 7168 / 128), or a reduction too short for two
    parts of two steps (qwen3's N = 768 at 256-deep steps), keep the tiles they had."""
    import dataclasses

    from moe.backends.triton.config import default_config
    from moe.workload import PRESETS

    def cfg(preset, name, m):
        p = PRESETS[preset]
        prob = ExpertsProblem("cuda", torch.bfloat16, m, p.num_experts, p.num_experts, p.hidden_size,
                              p.intermediate_size, p.top_k)
        return default_config(dataclasses.replace(prob, quant=moe.quant.named(name)))

    for name, bk in (("fp8_channel", 256), ("int8_channel", 256), ("fp8_tensor", 256), ("fp8_block", 128)):
        for m in (1, 2):
            c = cfg("mixtral", name, m)
            assert (c.gemm1.block_n, c.gemm1.block_k, c.gemm2.block_n, c.gemm2.block_k) == (32, bk, 64, bk)
            assert (c.split_k, c.combine) == (2, "reduce")
        assert cfg("mixtral", name, 16).split_k == 1 and cfg("dsv3", name, 1).split_k == 1
        # GEMM2 in 3 stages on a grid of one to two MIN_PROGRAMS up to a reduction of W8A8_SHORT_REDUCTION
        # (dsv3 at one token: 448 programs, N = 2048); longer grids (dsv3 at 16 tokens) and longer
        # reductions (mixtral) keep 5
        assert cfg("dsv3", name, 1).gemm2.num_stages == 3
        assert cfg("dsv3", name, 16).gemm2.num_stages == cfg("dsv3", name, 64).gemm2.num_stages == 5
        assert cfg("mixtral", name, 16).gemm2.num_stages == 5 and cfg("gptoss120b", name, 1).gemm2.num_stages == 5
        assert cfg("dsv3", name, 1024).gemm2.num_stages == 4  # past 16 rows an expert: the prefill tiles
    plain = cfg("qwen3", "fp8_channel", 1)
    assert plain.split_k == 1 and plain.gemm2.block_n == 128
    bf16 = ExpertsProblem("cuda", torch.bfloat16, 1, 256, 256, 7168, 2048, 8)
    assert default_config(bf16).gemm2.num_stages == 5  # the rule is W8A8's


# (scheme, GEMM2 block_k, gemm2_input, quantize_rows launches): with "load" dynamic schemes quantize GEMM2's
# input as GEMM2 loads it (groups only when a K tile is one group); with "pass", and for static scales, a
# pass between the GEMMs quantizes it (per tensor: from the amax GEMM1 gathered, no amax pass)
_PASSES = [("fp8_block", 128, "load", 1), ("fp8_block", 64, "load", 2), ("fp8_channel", 64, "load", 1),
           ("int8_channel", 128, "load", 1), ("fp8_tensor", 64, "load", 1), ("fp8_tensor_static", 64, "load", 2),
           ("fp8_block", 128, "pass", 2), ("fp8_channel", 64, "pass", 2), ("int8_channel", 128, "pass", 2),
           ("fp8_tensor", 64, "pass", 2), ("fp8_tensor_static", 64, "pass", 2)]


@pytest.mark.parametrize(("T", "N"), [(1, 256), (9, 200), (40, 136)])
@pytest.mark.parametrize(("name", "bk", "gemm2_input", "launches"), _PASSES)
def test_gemm2_input_quantized_by_a_pass_or_as_it_is_loaded(T, N, name, bk, gemm2_input, launches, monkeypatch):
    """GEMM2's input of a dynamic scheme: with gemm2_input="load" no quantization pass between the GEMMs
    (one quantize_rows launch: GEMM1's input), GEMM2 quantizes each tile of GEMM1's rows as it loads it,
    by the row's (tensor's) amax that GEMM1 gathered, or for fp8_block by the tile itself when it is one
    group; with "pass" one pass between the GEMMs. Either way the result equals the reference's
    emulation, N ragged against 128 included."""

    import moe.backends.triton as tb
    from moe.backends.torch_ref import torch_ref_experts
    from moe.backends.triton import GemmTile, KernelConfig, triton_experts

    args, prob = _w8a8_args(name, T, N)
    calls = []
    real = tb.quantize_rows
    monkeypatch.setattr(tb, "quantize_rows", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    tile = GemmTile(block_n=32, block_k=64, group_m=1, num_stages=1)
    kcfg = KernelConfig(block_m=16, gemm1=tile, gemm2=tile.model_copy(update={"block_k": bk}), gemm2_input=gemm2_input)
    out = torch.full_like(args.hidden_states, float("nan"))
    triton_experts(args, prob, out, kcfg)
    assert len(calls) == launches
    assert_close(out, torch_ref_experts(args, prob), scheme=name, what=f"{name} GEMM2 block_k={bk}")


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_one_row_per_tensor_quantization_is_one_launch(fmt, monkeypatch):
    """A dynamic per-tensor input of one row (GEMM1's at one token) is quantized in one launch, by its row's
    scale: the same bits as the amax launch and the per-tensor launch after it, and a scale of shape [1]."""
    import moe.kernels.quant as kq
    from moe.quant import ActivationScheme

    scheme = ActivationScheme(format=fmt, granularity="tensor")
    x = torch.randn(1, 300, dtype=torch.bfloat16) * 3
    calls = []
    real = kq._launch
    monkeypatch.setattr(kq, "_launch", lambda *a, **kw: calls.append(a[5]) or real(*a, **kw))
    one = kq.quantize_rows(x, scheme)
    assert len(calls) == 1
    amax = x.float().abs().amax().reshape(1)
    two = kq.quantize_rows(x, scheme, amax=amax.clone())  # the per-tensor launch from a given amax
    assert one.scale.shape == two.scale.shape == (1,)
    torch.testing.assert_close(one.scale, two.scale, rtol=0, atol=0)
    assert torch.equal(one.data.view(torch.uint8), two.data.view(torch.uint8))
    assert one.scale.item() == pytest.approx(amax.item() / (448.0 if fmt == "fp8" else 127.0), rel=1e-6)


# ---------------------------------------------------------------- the standalone activation kernel


@pytest.mark.parametrize("name", moe.testing.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_rows_match_the_torch_activation(name, dtype):
    """``moe.kernels.activation.activate_rows`` (deep_gemm's activation) against ``moe.activations`` in fp32
    rounded to the dtype, on rows that are a slice of a wider tensor and an N that is not a power of two."""
    from moe.activations import apply_activation
    from moe.kernels.activation import activate_rows

    spec = ActivationSpec.parse(name)
    n = 96
    wide = torch.randn(5, (2 * n if spec.gated else n) + 8, generator=torch.Generator().manual_seed(3)) * 3
    h = wide[:, 8:].to(dtype)  # row stride > columns, offset start
    out = activate_rows(h, spec)
    want = apply_activation(h.float(), spec).to(dtype)
    if dtype == torch.float32:  # erf and exp differ in their last bits from torch's (gelu's 1 + erf cancels)
        assert moe.testing.rel_error(out, want) < moe.testing.tolerance(torch.float32)
    else:  # the same fp32 value rounded: at most one bf16 step apart where the fp32 values differ in the last bits
        torch.testing.assert_close(out.float(), want.float(), rtol=2 ** -7, atol=1e-6)


def test_activation_rows_need_unit_column_strides():
    from moe.kernels.activation import activate_rows

    with pytest.raises(ValueError, match=r"activate_rows: .*unit column strides"):
        activate_rows(torch.randn(8, 4).t(), ActivationSpec.parse("silu"))


def test_combine_through_a_row_index_gives_the_same_bits():
    """``combine(..., rows=)`` reads each pair's output at its row of y (rows grouped by expert, as a library
    GEMM wrote them): the same bits as the pair-ordered rows; pairs that are not local point anywhere."""
    from moe.kernels.combine import combine

    gen = torch.Generator().manual_seed(5)
    T, k, K, E = 6, 2, 40, 4
    ids = torch.randint(0, E, (T * k,), generator=gen, dtype=torch.int32)
    w = torch.rand(T * k, generator=gen)
    emap = torch.tensor([0, -1, 1, -1], dtype=torch.int32)  # experts 1 and 3 are not local
    y = torch.randn(T * k, K, generator=gen)
    order = torch.randperm(T * k, generator=gen)  # y's rows stored in another order, plus 3 spare rows
    stored = torch.cat([y[order], torch.full((3, K), float("nan"))])
    rows = torch.empty(T * k, dtype=torch.int32)
    rows[order] = torch.arange(T * k, dtype=torch.int32)
    rows[emap.long()[ids.long()] < 0] = T * k + 1  # a NaN row: never read for a pair that is not local
    want = combine(y, ids, w, torch.empty(T, K), top_k=k, num_global=E, num_local=2, expert_map=emap)
    got = combine(stored, ids, w, torch.empty(T, K), top_k=k, num_global=E, num_local=2, expert_map=emap, rows=rows)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="rows index one output per pair"):
        combine(stored, ids, w, torch.empty(T, K), top_k=k, num_global=E, num_local=2, rows=rows, splits=2)
