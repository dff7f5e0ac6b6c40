"""GPU suite (`pytest -m gpu` on a CUDA machine): the parity matrix at real batch sizes with
NaN-poisoned outputs, 64-bit offsets, torch.compile, CUDA graphs, alignment, scales, config checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moe
from moe.backends.torch_ref import torch_ref_experts
from moe.contract import ExpertsArgs, ExpertsProblem
from moe.testing import assert_close

pytestmark = pytest.mark.gpu

GPU_BACKENDS = ["triton", "torch_grouped"]
TS = [1, 7, 33, 256, 4096, 16385]
VARIANTS = [  # activation, bias, expert map
    ("silu", False, False),
    ("swigluoai", True, False),
    ("gelu_tanh", False, True),
    ("relu2", True, True),
]
E, K, N, TOPK = 16, 384, 160, 4


def _inputs(T, dtype, activation="silu", bias=False, emap=False, e=E, k=K, n=N, topk=TOPK, skew=False):
    dev = "cuda"
    gated = moe.ActivationSpec.parse(activation).gated
    rows = 2 * n if gated else n
    expert_map, local = None, e
    if emap:
        expert_map = torch.full((e,), -1, dtype=torch.int32, device=dev)
        held = torch.arange(1, e, 2, device=dev)
        expert_map[held] = torch.arange(held.numel(), dtype=torch.int32, device=dev)
        local = held.numel()
    scale = 4.0 if activation == "swigluoai" else 1.0
    x = torch.randn(T, k, device=dev).to(dtype)
    w13 = (torch.randn(local, rows, k, device=dev) * scale / k**0.5).to(dtype)
    w2 = (torch.randn(local, k, n, device=dev) / n**0.5).to(dtype)
    logits = torch.randn(T, e, device=dev)
    if skew:
        logits[:, 0] += 100.0
    w, ids = moe.fused_topk(logits, topk)
    b13 = (torch.randn(local, rows, device=dev) * 0.1).to(dtype) if bias else None
    b2 = (torch.randn(local, k, device=dev) * 0.1).to(dtype) if bias else None
    args = ExpertsArgs(x, w13, w2, w, ids, b13, b2, expert_map)
    prob = ExpertsProblem("cuda", dtype, T, local, e, k, n, topk, moe.ActivationSpec.parse(activation),
                          bias, bias, emap)
    return args, prob


def _reference(args, prob):
    return torch_ref_experts(args, prob, compute_dtype=torch.float64)


def _call(args, prob, backend, out=None):
    return moe.fused_experts(args.hidden_states, args.w13, args.w2, args.topk_weights, args.topk_ids,
                             activation=prob.activation, w13_bias=args.w13_bias, w2_bias=args.w2_bias,
                             expert_map=args.expert_map, backend=backend, out=out)


def _gpu_matrix():
    cases = []
    for backend in GPU_BACKENDS:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for T in TS:
                for i, (act, bias, emap) in enumerate(VARIANTS):
                    if T >= 4096 and i not in (0, 3):
                        continue
                    cases.append((backend, dtype, T, act, bias, emap))
    return cases


def _supported(backend, dtype, T, act, bias, emap):
    if not torch.cuda.is_available():
        return True  # collected but skipped by conftest without a GPU
    rows = E // 2 if emap else E
    p = ExpertsProblem("cuda", dtype, T, rows, E, K, N, TOPK, moe.ActivationSpec.parse(act), bias, bias, emap)
    return moe.get_backend(backend).supports(p)[0]


MATRIX = [c for c in _gpu_matrix() if _supported(*c)]  # unsupported combinations are not generated


@pytest.mark.parametrize("backend,dtype,T,act,bias,emap", MATRIX,
                         ids=[f"{b}-{str(d)[6:]}-T{t}-{a}{'+b' if bi else ''}{'+map' if m else ''}"
                              for b, d, t, a, bi, m in MATRIX])
def test_gpu_parity(backend, dtype, T, act, bias, emap):
    args, prob = _inputs(T, dtype, act, bias, emap)
    out = torch.full_like(args.hidden_states, float("nan"))
    _call(args, prob, backend, out=out)
    assert moe.last_decision().chosen == backend
    assert_close(out, _reference(args, prob), what=f"{backend} T={T} {act}")


def test_gpu_matrix_covers_both_backends():
    assert {c[0] for c in MATRIX} == set(GPU_BACKENDS)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_64bit_offsets(backend):
    T, topk, k, n, e = 40_000, 8, 7168, 64, 8
    assert T * topk * k > 2**31
    args, prob = _inputs(T, torch.bfloat16, e=e, k=k, n=n, topk=topk)
    out = torch.full_like(args.hidden_states, float("nan"))
    _call(args, prob, backend, out=out)
    ref = _reference(args, prob)
    assert_close(out, ref, what="64-bit offsets")
    assert torch.isfinite(out[-1]).all() and (out[-1] != 0).any()  # the last token was computed


def test_gpu_skewed_routing_and_in_place():
    args, prob = _inputs(300, torch.bfloat16, skew=True)
    ref = _reference(args, prob)
    x = args.hidden_states.clone()
    _call(dataclasses.replace(args, hidden_states=x), prob, "triton", out=x)
    assert_close(x, ref, what="in place, skewed")


def test_gpu_torch_compile_fullgraph():
    layer = moe.FusedMoE(16, 4, 256, 128, params_dtype=torch.bfloat16, device="cuda", backend="triton")
    x = torch.randn(37, 256, device="cuda", dtype=torch.bfloat16)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True)
    got = compiled(x)
    assert_close(got, eager.float(), dtype=torch.bfloat16, what="compiled vs eager")  # inductor fuses the router
    w, ids = moe.fused_topk(layer.gate(x), 4)
    prob = ExpertsProblem("cuda", torch.bfloat16, 37, 16, 16, 256, 128, 4)
    ref = torch_ref_experts(ExpertsArgs(x, layer.w13_weight, layer.w2_weight, w, ids), prob, torch.float64)
    assert_close(got, ref, what="compiled")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_cuda_graph_replays_new_routing(backend):
    T = 64
    args, prob = _inputs(T, torch.bfloat16)
    static_w, static_ids = args.topk_weights.clone(), args.topk_ids.clone()
    out = torch.empty_like(args.hidden_states)

    def step():
        moe.fused_experts(args.hidden_states, args.w13, args.w2, static_w, static_ids, backend=backend, out=out)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for skew in (False, True, False):
        logits = torch.randn(T, E, device="cuda")
        if skew:
            logits[:, 3] += 50  # every token to expert 3: different counts and padded total
        w, ids = moe.fused_topk(logits, TOPK)
        static_w.copy_(w)
        static_ids.copy_(ids)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = _reference(ExpertsArgs(args.hidden_states, args.w13, args.w2, w, ids), prob)
        assert_close(out, ref, what=f"graph replay skew={skew}")


@pytest.mark.parametrize("one_program", [True, False])
def test_gpu_alignment_invariants(one_program, monkeypatch):
    """Both alignment paths on the device, incl. 4096 pairs on 8 experts in one program (atomic contention)
    and an expert map."""
    from test_align import _check

    import moe.kernels.align as align_mod

    if not one_program:
        monkeypatch.setattr(align_mod, "ONE_PROGRAM_PAIRS", 0)
    for T, k, e, bm in [(1, 8, 256, 16), (4096, 8, 128, 64), (333, 2, 8, 128), (50, 8, 512, 16), (2048, 2, 8, 16),
                        (500, 8, 256, 16)]:
        ids = torch.rand(T, e, device="cuda").argsort(dim=1)[:, :k].to(torch.int32)
        _check(ids, e, bm)
    emap = torch.full((12,), -1, dtype=torch.int32, device="cuda")
    emap[1::2] = torch.arange(6, dtype=torch.int32, device="cuda")
    ids = torch.rand(300, 12, device="cuda").argsort(dim=1)[:, :3].to(torch.int32)
    _check(ids, 6, 16, emap)


@pytest.mark.parametrize("T", [1, 7, 600, 2000])
def test_gpu_direct_launch_matches_triton_launcher(T):
    """Direct launches of the kept compiled kernels give bitwise the results of Triton's own launcher
    (one-program and spread alignment, T = 1 direct tiles), and the direct path is the one taken."""
    import moe.kernels.launch as ln

    args, prob = _inputs(T, torch.bfloat16, "swigluoai", bias=True)
    outs = {}
    assert ln.direct_launch_status()[0], ln.direct_launch_status()[1]  # a verified triton on the GPU machine
    for direct in (False, True, True):  # the second direct call launches kept kernels
        with moe.override_options(direct_launch=direct):
            before = ln.launch_counts()
            out = torch.full_like(args.hidden_states, float("nan"))
            _call(args, prob, "triton", out=out)
            torch.cuda.synchronize()
            after = ln.launch_counts()
        assert (after["direct"] > before["direct"]) == direct
        assert (after["triton"] > before["triton"]) == (not direct)
        outs.setdefault(direct, []).append(out)
    assert torch.equal(outs[False][0], outs[True][0]) and torch.equal(outs[True][0], outs[True][1])
    assert_close(outs[True][1], _reference(args, prob), dtype=torch.bfloat16, what=f"direct launch T={T}")


@pytest.mark.parametrize("T", [1, 100, 5000])
def test_gpu_scaled_weights_through_the_seam(T):
    """The seam's test scheme (weights times a per-(expert, part) fp32 scale) eagerly, under
    torch.compile(fullgraph=True) and under CUDA-graph replay with new routing, NaN-poisoned, against the
    float64 reference on the dequantized weights."""
    from moe.quant import SCALED, QuantizedWeight, dequantize

    args, prob = _inputs(T, torch.bfloat16)
    q13 = QuantizedWeight(args.w13, torch.rand(E, 2, device="cuda") + 0.5, SCALED.weights, parts=2)
    q2 = QuantizedWeight(args.w2, torch.rand(E, 1, device="cuda") + 0.5, SCALED.weights)
    deq = dataclasses.replace(args, w13=dequantize(q13, torch.float64), w2=dequantize(q2, torch.float64))

    def call(x, w, ids, out):
        return moe.fused_experts(x, q13, q2, w, ids, backend="triton", out=out)

    out = torch.full_like(args.hidden_states, float("nan"))
    call(args.hidden_states, args.topk_weights, args.topk_ids, out)
    assert_close(out, torch_ref_experts(deq, prob, compute_dtype=torch.float64), dtype=torch.bfloat16,
                 what=f"scaled weights T={T} eager")
    compiled = torch.compile(call, fullgraph=True)
    out.fill_(float("nan"))
    compiled(args.hidden_states, args.topk_weights, args.topk_ids, out)
    assert_close(out, torch_ref_experts(deq, prob, compute_dtype=torch.float64), dtype=torch.bfloat16,
                 what=f"scaled weights T={T} compiled")
    w, ids = args.topk_weights.clone(), args.topk_ids.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(args.hidden_states, w, ids, out)
    nw, nids = moe.fused_topk(torch.randn(T, E, device="cuda"), TOPK)
    w.copy_(nw)
    ids.copy_(nids)
    out.fill_(float("nan"))
    graph.replay()
    ref = torch_ref_experts(dataclasses.replace(deq, topk_weights=nw, topk_ids=nids), prob,
                            compute_dtype=torch.float64)
    assert_close(out, ref, dtype=torch.bfloat16, what=f"scaled weights T={T} graph replay")


def test_gpu_oversized_config_rejected_before_launch():
    from moe.backends.triton import GemmTile, KernelConfig, triton_experts

    args, prob = _inputs(64, torch.bfloat16)
    tile = GemmTile(block_n=256, block_k=256, num_stages=8)
    with pytest.raises(ValueError, match="shared memory"):
        triton_experts(args, prob, torch.empty_like(args.hidden_states), KernelConfig(block_m=256, gemm1=tile, gemm2=tile))


def test_gpu_batch_invariant_mode():
    """With batch_invariant, a token's output is bitwise the same alone and inside batches of 7, 256
    and 4096 (which the default heuristic would give three different configs)."""
    from moe.backends.triton import triton_experts

    args, prob = _inputs(4096, torch.bfloat16, e=64, k=512, n=256, topk=8)
    probe = [0, 5, 3000]
    alone = {}
    for t in probe:
        one = dataclasses.replace(args, hidden_states=args.hidden_states[t:t + 1],
                                  topk_weights=args.topk_weights[t:t + 1], topk_ids=args.topk_ids[t:t + 1])
        with moe.override_options(batch_invariant=True):
            alone[t] = triton_experts(one, dataclasses.replace(prob, num_tokens=1),
                                      torch.empty_like(one.hidden_states))[0]
    for T in (7, 256, 4096):
        idx = torch.arange(T, device="cuda")
        rows = [t for t in probe if t < T] or [0]
        idx[: len(rows)] = torch.tensor(rows, device="cuda")  # the probed tokens at the batch front
        part = dataclasses.replace(args, hidden_states=args.hidden_states[idx].contiguous(),
                                   topk_weights=args.topk_weights[idx].contiguous(),
                                   topk_ids=args.topk_ids[idx].contiguous())
        with moe.override_options(batch_invariant=True):
            out = triton_experts(part, dataclasses.replace(prob, num_tokens=T), torch.empty_like(part.hidden_states))
        for i, t in enumerate(rows):
            assert torch.equal(out[i], alone[t]), f"token {t} differs inside a batch of {T}"


def test_gpu_chunked_equals_unchunked():
    from moe.backends.triton import triton_experts
    from moe.backends.triton.config import default_config

    args, prob = _inputs(5000, torch.bfloat16, emap=True)
    cfg = default_config(dataclasses.replace(prob, num_tokens=1024))
    whole = triton_experts(args, prob, torch.empty_like(args.hidden_states), cfg)
    with moe.override_options(chunk_tokens=1024):
        chunked = triton_experts(args, prob, torch.empty_like(args.hidden_states), cfg)
    assert torch.equal(whole, chunked)


@pytest.mark.parametrize(("T", "act", "bias", "emap", "block_m", "block_n", "warps"), [
    (1, "swigluoai", True, False, 16, 64, 4),
    (33, "silu", False, True, 16, 64, 4),
    (256, "gelu_tanh", True, False, 64, 128, 4),
    (4096, "silu", False, False, 128, 128, 8),
    (16385, "swigluoai", True, True, 128, 64, 8),
])
def test_gpu_gate_up_in_one_dot(T, act, bias, emap, block_m, block_n, warps):
    """The one-dot GEMM1 ([gate | up] columns in one tile) against the float64 reference, NaN-poisoned output."""
    from moe.backends.triton import GemmTile, KernelConfig, triton_experts

    args, prob = _inputs(T, torch.bfloat16, act, bias, emap)
    tile = GemmTile(block_n=block_n, block_k=64, group_m=8, num_warps=warps, num_stages=3)
    cfg = KernelConfig(block_m=block_m, gemm1=tile, gemm2=tile, gate_up="one_dot")
    out = torch.full_like(args.hidden_states, float("nan"))
    triton_experts(args, prob, out, cfg)
    assert_close(out, _reference(args, prob))


@pytest.mark.parametrize(("T", "act", "bias", "emap", "split_k", "loads"), [
    (1, "swigluoai", True, False, 2, "pointer"),
    (3, "silu", False, True, 4, "tma"),
    (16, "gelu_tanh", True, False, 8, "pointer"),
    (64, "silu", True, True, 4, "tma"),
    (512, "relu2", False, False, 2, "tma"),
])
def test_gpu_split_k_gemm2(T, act, bias, emap, split_k, loads):
    """GEMM2's reduction in parts (fp32 partial sums the combine adds up; biases once) against the float64
    reference, NaN-poisoned output, pointer and descriptor loads."""
    from moe.backends.triton import GemmTile, KernelConfig, triton_experts

    args, prob = _inputs(T, torch.bfloat16, act, bias, emap)
    tile = GemmTile(block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=3, loads=loads)
    cfg = KernelConfig(block_m=16, gemm1=tile, gemm2=tile, split_k=split_k)
    out = torch.full_like(args.hidden_states, float("nan"))
    triton_experts(args, prob, out, cfg)
    assert_close(out, _reference(args, prob))


@pytest.mark.parametrize(("T", "act", "bias", "emap", "block_m", "block_n", "warps", "gate_up", "hidden"), [
    (1, "swigluoai", True, False, 16, 64, 4, "two_dots", K),
    (33, "silu", False, True, 16, 64, 4, "one_dot", K),
    (256, "gelu_tanh", True, False, 64, 128, 4, "two_dots", K),
    (600, "relu2", True, False, 64, 128, 4, "two_dots", 400),
    (4096, "silu", False, False, 128, 128, 8, "one_dot", K),
    (16385, "swigluoai", True, True, 128, 64, 8, "one_dot", 400),
])
def test_gpu_tma_loads(T, act, bias, emap, block_m, block_n, warps, gate_up, hidden):
    """loads="tma" (weights, and GEMM2's sorted input, through tensor descriptors) against the float64
    reference with a NaN-poisoned output, and bitwise equal to pointer loads under both launchers."""
    from moe.backends.triton import GemmTile, KernelConfig, triton_experts

    args, prob = _inputs(T, torch.bfloat16, act, bias, emap, k=hidden)
    outs = {}
    for loads, direct in (("pointer", True), ("tma", False), ("tma", True)):
        with moe.override_options(direct_launch=direct):
            tile = GemmTile(block_n=block_n, block_k=64, group_m=8, num_warps=warps, num_stages=3, loads=loads)
            cfg = KernelConfig(block_m=block_m, gemm1=tile, gemm2=tile, gate_up=gate_up)
            out = torch.full_like(args.hidden_states, float("nan"))
            outs[loads, direct] = triton_experts(args, prob, out, cfg)
    assert_close(outs["tma", True], _reference(args, prob), dtype=torch.bfloat16, what=f"tma loads T={T}")
    assert torch.equal(outs["tma", True], outs["tma", False])
    assert torch.equal(outs["tma", True], outs["pointer", True])


@pytest.mark.parametrize(("T", "act", "combine"), [
    (1, "silu", "reduce"), (1, "swigluoai", "reduce"), (7, "silu", "reduce"), (300, "swigluoai", "reduce"),
    (300, "silu", "atomic"), (1100, "gelu_tanh", "reduce"),  # 4400 pairs: the four-launch alignment
])
def test_gpu_chained_launches(T, act, combine, monkeypatch):
    """The kernels chain by programmatic dependent launch (each waits for its predecessor on the GPU):
    from router logits (routing kernel, alignment, GEMM1, GEMM2, combine) eager and under a CUDA graph
    replayed with new logits, equal to the float64 reference with a NaN-poisoned output, and (with the
    deterministic combine) bitwise equal to the unchained launches (MOE_PDL=0)."""
    from moe.backends.triton import GemmTile, KernelConfig, triton_experts
    from moe.kernels.host import chains

    args, prob = _inputs(T, torch.bfloat16, act, bias=act == "swigluoai")
    tile = GemmTile(block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=3)
    cfg = KernelConfig(block_m=16, gemm1=tile, gemm2=tile, combine=combine)
    logits = torch.randn(T, E, device="cuda")

    def step(out):
        w, ids = moe.fused_topk(logits, TOPK)
        return triton_experts(dataclasses.replace(args, topk_weights=w, topk_ids=ids), prob, out, cfg)

    outs = {}
    for flag in ("0", "1"):
        with moe.override_options(pdl=flag == "1"):
            assert chains(torch.device("cuda")) == (flag == "1")  # Hopper
            outs[flag] = step(torch.full_like(args.hidden_states, float("nan")))
    if combine == "reduce":  # atomic adds land in any order: not reproducible bit for bit, chained or not
        assert torch.equal(outs["0"], outs["1"])
    w, ids = moe.fused_topk(logits, TOPK)
    ref = _reference(dataclasses.replace(args, topk_weights=w, topk_ids=ids), prob)
    assert_close(outs["1"], ref, dtype=torch.bfloat16, what=f"chained launches T={T}")
    out = torch.empty_like(args.hidden_states)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(out)
    for _ in range(3):
        logits.copy_(torch.randn(T, E, device="cuda"))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        w, ids = moe.fused_topk(logits, TOPK)
        ref = _reference(dataclasses.replace(args, topk_weights=w, topk_ids=ids), prob)
        assert_close(out, ref, dtype=torch.bfloat16, what=f"chained launches T={T}, graph replay")
