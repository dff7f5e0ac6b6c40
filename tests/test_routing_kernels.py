"""The Triton routing kernels (moe/routing/triton.py) against the float64 oracles: exact ids,
fp32-close weights.

On CPU the launch functions run under the Triton interpreter (conftest sets TRITON_INTERPRET=1), one
launch per case. Logits sit on a 1/64 grid, so rows hold many exact ties (which must go to the lower
index) while distinct values stay far apart in fp32. The GPU tests (-m gpu) repeat the parity at large
T, count launches with torch.profiler, trace under torch.compile and replay in a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
from oracle import grouped_route64, topk_route64, topk_softmax64

pytest.importorskip("triton")

import moe
import moe.routing as routing
import moe.routing.triton as kernels

TS = (1, 7, 33)
TOPK_SHAPES = [(e, k) for e in (4, 5, 8, 64, 256, 512) for k in (1, 2, 8) if k <= e]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GROUP_SHAPES = [  # E, groups, kept groups, k
    (4, 2, 1, 1),
    (5, 1, 1, 2),  # one group of 5: plain top-k through the grouped kernel
    (8, 4, 2, 2),
    (64, 8, 3, 8),
    (160, 8, 3, 6),  # DeepSeek-V2: 20 experts a group, not a power of two
    (256, 8, 4, 8),  # DeepSeek-V3
    (512, 16, 4, 8),
]
GROUP_MODES = [  # scoring, bias, renormalize, routed_scaling_factor
    (s, b, r, f) for s in ("softmax", "sigmoid") for b in (False, True) for r, f in ((False, 1.0), (True, 2.5))
]
CPU_TOL = dict(rtol=1e-6, atol=1e-7)
GPU_TOL = dict(rtol=1e-5, atol=1e-6)  # the GPU's exp is an approximation (about 2 ulp) and fuses multiply-adds


@pytest.fixture(autouse=True)
def _gpu_routing_on():
    """The kernels are on by default (MOE_GPU_ROUTING=0 switches them off); these tests make sure they are
    on whatever the environment says, and restore the setting."""
    before = routing.gpu_routing_enabled()
    routing.set_gpu_routing(True)
    yield
    routing.set_gpu_routing(before)


def _grid(*shape: int, lo: int = -192, hi: int = 192) -> torch.Tensor:
    return torch.randint(lo, hi + 1, shape).float() / 64


def _check(got, ref, tol=CPU_TOL, what=""):
    w, ids = got
    ref_w, ref_ids = ref
    assert w.dtype == torch.float32 and ids.dtype == torch.int32, what
    assert torch.equal(ids.cpu().long(), ref_ids.cpu().long()), f"{what}: ids differ\n{ids}\n{ref_ids}"
    torch.testing.assert_close(w.cpu().double(), ref_w.cpu().double(), **tol, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------- CPU (interpreter)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("E,k", TOPK_SHAPES)
def test_fused_topk_matches_oracle(E, k, scoring, renormalize):
    i = TOPK_SHAPES.index((E, k)) + renormalize
    T, dtype = TS[i % 3], DTYPES[i % 3]
    logits = _grid(T, E).to(dtype)
    scale = 1.0 if renormalize else 2.5
    got = kernels.fused_topk(logits, k, renormalize=renormalize, scoring=scoring, routed_scaling_factor=scale)
    ref_w, ref_ids = topk_route64(logits, k, renormalize, scoring)
    _check(got, (ref_w * scale, ref_ids), what=f"T={T} {dtype}")


@pytest.mark.parametrize("E,k", TOPK_SHAPES)
def test_topk_softmax_matches_oracle(E, k):
    T = TS[TOPK_SHAPES.index((E, k)) % 3]
    logits = _grid(T, E)
    _check(kernels.topk_softmax(logits, k), topk_softmax64(logits, k), what=f"T={T}")


@pytest.mark.parametrize("scoring,bias,renormalize,scale", GROUP_MODES)
@pytest.mark.parametrize("E,G,TG,k", GROUP_SHAPES)
def test_grouped_topk_matches_oracle(E, G, TG, k, scoring, bias, renormalize, scale):
    if bias and E // G < 2:
        pytest.skip("a bias scores groups by their top two experts")
    T = TS[(GROUP_SHAPES.index((E, G, TG, k)) + GROUP_MODES.index((scoring, bias, renormalize, scale))) % 3]
    logits = _grid(T, E)
    b = _grid(E, lo=-16, hi=16) if bias else None
    got = kernels.grouped_topk(logits, k, num_expert_group=G, topk_group=TG, renormalize=renormalize,
                               scoring=scoring, e_score_correction_bias=b, routed_scaling_factor=scale)
    _check(got, grouped_route64(logits, k, G, TG, renormalize, scoring, b, scale), what=f"T={T}")


def test_ties_go_to_lower_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0, 3.0], [0.0] * 6, [2.0, 0.0, 5.0, 0.0, 5.0, 5.0]])
    for scoring in ("softmax", "sigmoid"):
        _, ids = kernels.fused_topk(logits, 3, scoring=scoring)
        assert ids.tolist() == [[1, 2, 3], [0, 1, 2], [2, 4, 5]]
    _, ids = kernels.topk_softmax(logits, 2)
    assert ids.tolist() == [[1, 2], [0, 1], [2, 4]]
    # a whole row of ties across the padded width: the first k experts
    _, ids = kernels.fused_topk(torch.zeros(2, 512), 8)
    assert ids.tolist() == [list(range(8))] * 2


@pytest.mark.parametrize("bias", [False, True])
def test_grouped_ties_keep_the_lower_groups(bias):
    """Every group a copy of group 0: group scores tie, so groups 0..TG-1 are kept, and within them
    equal experts go to the lower index."""
    T, G, per, TG, k = 7, 8, 4, 3, 5
    logits = _grid(T, per).repeat(1, G)  # [T, G * per]
    b = _grid(per, lo=-16, hi=16).repeat(G) if bias else None
    got = kernels.grouped_topk(logits, k, num_expert_group=G, topk_group=TG, scoring="sigmoid",
                               e_score_correction_bias=b)
    _check(got, grouped_route64(logits, k, G, TG, True, "sigmoid", b, 1.0))
    assert (got[1] // per < TG).all()
    assert (got[1][:, 0] < per).all()  # the best expert appears in every group: group 0's copy wins


def test_neg_inf_logits_are_a_mask():
    """-inf logits score 0 (and are taken, lowest index first, only when k exceeds the finite ones)."""
    logits = _grid(5, 12)
    logits[:, :9] = float("-inf")
    logits[1, 9:11] = float("-inf")  # one finite expert, k = 2
    logits[2, 3] = 1.0  # finite experts on both sides of masked ones
    for scoring in ("softmax", "sigmoid"):
        got = kernels.fused_topk(logits, 2, scoring=scoring)
        _check(got, topk_route64(logits, 2, True, scoring), what=scoring)
        _check(got, routing.fused_topk_ref(logits, 2, scoring=scoring), what=f"{scoring} vs torch")
    assert kernels.fused_topk(logits, 2)[1][1].tolist() == [11, 0]
    _check(kernels.topk_softmax(logits, 3), topk_softmax64(logits, 3), what="topk_softmax")
    # a masked group: with a bias its masked experts still compete through the bias alone
    logits = _grid(6, 16)
    logits[:, 4:8] = float("-inf")
    logits[3, :] = float("-inf")
    logits[3, 13] = 0.5
    b = _grid(16, lo=-16, hi=16)
    for scoring, bias in (("softmax", None), ("sigmoid", b), ("softmax", b)):
        got = kernels.grouped_topk(logits, 3, num_expert_group=4, topk_group=2, scoring=scoring,
                                   e_score_correction_bias=bias)
        _check(got, grouped_route64(logits, 3, 4, 2, True, scoring, bias, 1.0), what=f"grouped {scoring}")


def test_empty_batch():
    logits = torch.randn(0, 8)
    outs = [kernels.fused_topk(logits, 2), kernels.topk_softmax(logits, 2),
            kernels.grouped_topk(logits, 2, num_expert_group=4, topk_group=2, e_score_correction_bias=torch.zeros(8))]
    for w, ids in outs:
        assert w.shape == (0, 2) and ids.shape == (0, 2) and w.dtype == torch.float32 and ids.dtype == torch.int32


def test_strided_logits_and_explicit_tiles():
    """Row and expert strides are honoured (no copy), and any row tile covers every row once."""
    wide = _grid(33, 128)
    logits = wide[:, ::2]  # stride (128, 2)
    ref = topk_route64(logits, 4, True, "softmax")
    for tile in (None, kernels.RoutingTile(block_t=1, num_warps=1), kernels.RoutingTile(block_t=16, num_warps=4)):
        _check(kernels.fused_topk(logits, 4, tile=tile), ref, what=str(tile))
    transposed = _grid(64, 7).t()  # [7, 64] with stride (1, 7)
    _check(kernels.topk_softmax(transposed, 2), topk_softmax64(transposed, 2), what="transposed")
    got = kernels.grouped_topk(logits, 4, num_expert_group=8, topk_group=2, tile=kernels.RoutingTile(4, 2))
    _check(got, grouped_route64(logits, 4, 8, 2, True, "softmax", None, 1.0), what="grouped, 9 tiles")


def test_input_errors():
    with pytest.raises(ValueError, match="top_k=9 is out of range"):
        kernels.fused_topk(torch.randn(2, 8), 9)
    with pytest.raises(ValueError, match=r"router_logits: 1 NaN or \+inf"):
        kernels.topk_softmax(torch.tensor([[0.0, float("nan"), 1.0]]), 1)
    with pytest.raises(ValueError, match="scoring: expected 'softmax' or 'sigmoid', got 'relu'"):
        kernels.fused_topk(torch.randn(2, 8), 2, scoring="relu")
    with pytest.raises(ValueError, match="e_score_correction_bias: expected 8 values, got 7"):
        kernels.grouped_topk(torch.randn(2, 8), 2, num_expert_group=4, topk_group=2,
                             e_score_correction_bias=torch.zeros(7))
    with pytest.raises(ValueError, match="leaves 1 per group"):
        kernels.grouped_topk(torch.randn(2, 8), 2, num_expert_group=8, topk_group=2,
                             e_score_correction_bias=torch.zeros(8))
    with pytest.raises(ValueError, match="exceeds the routing kernels' limit of 4096"):
        kernels.fused_topk(torch.randn(1, 5000), 2)
    with pytest.raises(ValueError, match="block_t must be a power of two, got 3"):
        kernels.RoutingTile(block_t=3, num_warps=1)


def test_route_through_the_kernels_and_torch_compile(monkeypatch):
    """The CUDA wiring, run on CPU under the interpreter: route() hands the logits to the launch
    functions with the scaling factor fused, and under torch.compile(fullgraph=True) each launch is
    one custom op (traced through its fake implementation)."""

    def always(logits, top_k):
        import moe.routing.triton as launch

        return launch

    monkeypatch.setattr(routing, "_gpu_kernels", always)
    x, b = _grid(7, 16), _grid(16, lo=-16, hi=16)
    cases = [
        (moe.RoutingConfig(routed_scaling_factor=2.0), lambda: topk_route64(x, 4, True, "softmax")),
        (moe.RoutingConfig(method="topk_then_softmax", routed_scaling_factor=0.5), lambda: topk_softmax64(x, 4)),
        (moe.RoutingConfig(method="grouped_topk", scoring="sigmoid", num_expert_group=4, topk_group=2,
                           use_correction_bias=True, routed_scaling_factor=2.0),
         lambda: grouped_route64(x, 4, 4, 2, True, "sigmoid", b, 1.0)),
    ]
    for cfg, oracle in cases:
        fn = lambda logits, bias, cfg=cfg: moe.route(logits, 4, cfg, e_score_correction_bias=bias)
        eager = fn(x, b)
        ref_w, ref_ids = oracle()
        _check(eager, (ref_w * cfg.routed_scaling_factor, ref_ids), what=cfg.method)
        torch._dynamo.reset()
        got = torch.compile(fn, fullgraph=True, backend="eager")(x, b)
        assert torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1]), cfg.method


def test_cpu_logits_take_the_torch_path():
    logits = torch.randn(3, 8)
    assert routing._gpu_kernels(logits, 2) is None
    assert routing.gpu_routing_enabled()  # switched on by this module's fixture
    routing.set_gpu_routing(False)
    try:
        assert not routing.gpu_routing_enabled()
    finally:
        routing.set_gpu_routing(True)


# --------------------------------------------------------------------------------------- GPU
def _device_launches(fn) -> list[str]:
    """Names of the device activities (kernels, memcpys, memsets) of one call, after a warm-up call."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
            and "Sync" not in e.name]


@pytest.mark.gpu
@pytest.mark.parametrize("E,k", [(64, 2), (256, 8), (512, 8)])
def test_gpu_topk_parity_large_batch(E, k):
    T = 4096
    logits = _grid(T, E)
    rows = slice(0, 256)  # the float64 oracle loops in Python: a slice
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(dtype).cuda()
        for scoring in ("softmax", "sigmoid"):
            got = moe.fused_topk(x, k, scoring=scoring)
            _check(got, routing.fused_topk_ref(x, k, scoring=scoring), GPU_TOL, f"{dtype} {scoring} vs torch")
            _check((got[0][rows], got[1][rows]), topk_route64(x[rows].cpu(), k, True, scoring), GPU_TOL, "oracle")
        got = moe.topk_softmax(x, k)
        _check(got, routing.topk_softmax_ref(x, k), GPU_TOL, f"{dtype} topk_softmax vs torch")
        _check((got[0][rows], got[1][rows]), topk_softmax64(x[rows].cpu(), k), GPU_TOL, "topk_softmax oracle")


@pytest.mark.gpu
@pytest.mark.parametrize("E,G,TG,k", [(256, 8, 4, 8), (512, 16, 4, 8), (160, 8, 3, 6)])
@pytest.mark.parametrize("scoring,bias,renormalize,scale", [("sigmoid", True, True, 2.5), ("softmax", False, False, 16.0)])
def test_gpu_grouped_parity_large_batch(E, G, TG, k, scoring, bias, renormalize, scale):
    T = 4096
    x = _grid(T, E).cuda()
    b = _grid(E, lo=-16, hi=16).cuda() if bias else None
    kw = dict(num_expert_group=G, topk_group=TG, renormalize=renormalize, scoring=scoring,
              e_score_correction_bias=b, routed_scaling_factor=scale)
    got = moe.grouped_topk(x, k, **kw)
    _check(got, routing.grouped_topk_ref(x, k, **kw), GPU_TOL, "vs torch")
    rows = slice(0, 256)
    ref = grouped_route64(x[rows].cpu(), k, G, TG, renormalize, scoring, None if b is None else b.cpu(), scale)
    _check((got[0][rows], got[1][rows]), ref, GPU_TOL, "oracle")


@pytest.mark.gpu
def test_gpu_one_launch_per_routing_call():
    """Exactly one device launch per routing call, scaling and renormalization included, and it is
    our kernel; with set_gpu_routing(False) the torch path runs instead (several launches)."""
    x = _grid(33, 256).to(torch.bfloat16).cuda()
    b = _grid(256, lo=-16, hi=16).cuda()
    grouped = moe.RoutingConfig(method="grouped_topk", scoring="sigmoid", num_expert_group=8, topk_group=4,
                                routed_scaling_factor=2.5, use_correction_bias=True)
    calls = {
        "fused_topk": (lambda: moe.fused_topk(x, 8), "topk_kernel"),
        "fused_topk sigmoid": (lambda: moe.fused_topk(x, 8, scoring="sigmoid", renormalize=False), "topk_kernel"),
        "topk_softmax": (lambda: moe.topk_softmax(x, 4), "topk_kernel"),
        "grouped_topk": (lambda: moe.grouped_topk(x, 8, num_expert_group=8, topk_group=4, scoring="sigmoid",
                                                  e_score_correction_bias=b, routed_scaling_factor=2.5),
                         "grouped_topk_kernel"),
        "route topk x2.5": (lambda: moe.route(x, 8, moe.RoutingConfig(routed_scaling_factor=2.5)), "topk_kernel"),
        "route topk_then_softmax x2": (lambda: moe.route(x, 4, moe.RoutingConfig(
            method="topk_then_softmax", routed_scaling_factor=2.0)), "topk_kernel"),
        "route grouped_topk": (lambda: moe.route(x, 8, grouped, e_score_correction_bias=b), "grouped_topk_kernel"),
    }
    for what, (fn, kernel) in calls.items():
        names = _device_launches(fn)
        assert len(names) == 1 and kernel in names[0], f"{what}: {names}"
    routing.set_gpu_routing(False)
    try:
        names = _device_launches(lambda: moe.fused_topk(x, 8))
    finally:
        routing.set_gpu_routing(True)
    assert len(names) > 1 and not any("topk_kernel" in n for n in names), names


@pytest.mark.gpu
def test_gpu_fused_moe_forward_launch_count_at_one_token():
    """FusedMoE.forward at T = 1 (backend="triton", gate=False, router logits given) is exactly 4
    device launches: routing (1), then the experts' GEMM1 + activation, GEMM2 and combine (3; a
    single token skips the alignment). Allocations (torch.empty) launch nothing."""
    layer = moe.FusedMoE(8, 2, 256, 128, params_dtype=torch.bfloat16, device="cuda", backend="triton", gate=False)
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(1, 8, device="cuda", dtype=torch.bfloat16)
    names = _device_launches(lambda: layer(x, logits))
    assert len(names) == 4, names
    for kernel in ("topk_kernel", "moe_gemm1", "moe_gemm2", "moe_combine"):
        assert sum(kernel in n for n in names) == 1, (kernel, names)


@pytest.mark.gpu
def test_gpu_route_under_torch_compile():
    """route() traces with fullgraph=True (the kernels are custom ops) and gives the eager result."""
    x = _grid(37, 256).cuda()
    b = _grid(256, lo=-16, hi=16).cuda()
    for cfg in (moe.RoutingConfig(routed_scaling_factor=2.0), moe.RoutingConfig(method="topk_then_softmax"),
                moe.RoutingConfig(method="grouped_topk", scoring="sigmoid", num_expert_group=8, topk_group=4,
                                  use_correction_bias=True)):
        fn = lambda logits, bias, cfg=cfg: moe.route(logits, 8, cfg, e_score_correction_bias=bias)
        torch._dynamo.reset()
        got = torch.compile(fn, fullgraph=True)(x, b)
        eager = fn(x, b)
        assert torch.equal(got[1], eager[1]) and torch.equal(got[0], eager[0]), cfg


@pytest.mark.gpu
def test_gpu_routing_in_a_cuda_graph():
    """Captured once, the routing replays on new logits (no host synchronization, fixed outputs)."""
    static = _grid(64, 256).cuda()
    b = _grid(256, lo=-16, hi=16).cuda()

    def step():
        return (moe.fused_topk(static, 8),
                moe.grouped_topk(static, 8, num_expert_group=8, topk_group=4, scoring="sigmoid",
                                 e_score_correction_bias=b))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for _ in range(2):
        static.copy_(_grid(64, 256).cuda())
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(outs, step(), strict=True):
            assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@pytest.mark.gpu
def test_gpu_routing_says_when_it_falls_back_to_torch():
    x = torch.randn(3, 5000, device="cuda")
    with pytest.warns(UserWarning, match="routing kernels skipped, using the torch path: num_experts=5000 exceeds"):
        w, ids = moe.fused_topk(x, 2)
    _check((w, ids), routing.fused_topk_ref(x, 2), GPU_TOL, "fallback")


@pytest.mark.parametrize("method", ["topk", "topk_sigmoid_norenorm", "topk_then_softmax", "grouped"])
def test_router_gradients_through_the_kernels(method, monkeypatch):
    """The routing kernels keep the router trainable: their weights carry the gradient of the torch
    semantics (the ids held fixed), eagerly and under torch.compile, equal to autograd through the
    reference implementations."""
    cfgs = {
        "topk": moe.RoutingConfig(routed_scaling_factor=1.5),
        "topk_sigmoid_norenorm": moe.RoutingConfig(scoring="sigmoid", renormalize=False),
        "topk_then_softmax": moe.RoutingConfig(method="topk_then_softmax"),
        "grouped": moe.RoutingConfig(method="grouped_topk", num_expert_group=4, topk_group=2, use_correction_bias=True,
                                     routed_scaling_factor=2.0),
    }
    cfg = cfgs[method]
    logits = torch.randn(6, 16)
    logits[2] = float("-inf")  # a fully masked token: weight 0, gradient 0
    bias = torch.randn(16)
    g = torch.randn(6, 3)

    def grad_of(fn):
        x = logits.clone().requires_grad_()
        w, _ = fn(x, bias)
        (w * g).sum().backward()
        return x.grad

    route = lambda x, b: moe.route(x, 3, cfg, e_score_correction_bias=b)
    ref = grad_of(route)  # CPU logits: the torch implementations, differentiated by autograd
    monkeypatch.setattr(routing, "_gpu_kernels", lambda logits, top_k: kernels)
    eager = grad_of(route)
    torch._dynamo.reset()
    compiled = grad_of(torch.compile(route, fullgraph=True, backend="aot_eager"))
    for got in (eager, compiled):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert (ref[2] == 0).all()
