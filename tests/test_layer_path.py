"""The layer path (``FusedMoE.forward`` from router logits): on CPU under the Triton interpreter, with the
logits sent to the routing kernels as on a GPU, it launches fewer kernels and dispatches no more torch ops
than routing plus ``fused_experts``, the same number at every batch size, reads nothing back to the host,
and returns bitwise what the two calls return. The GPU test checks the same equality eagerly and under a
CUDA graph."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import moe
import moe.routing as routing

pytest.importorskip("triton")

# ops that read a device value back to the host (a synchronization on a GPU)
SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.unique", "aten._unique", "aten.masked_select",
            "aten.item", "aten.equal", "aten.is_nonzero", "aten.allclose", "aten.repeat_interleave.Tensor")
# Tensor methods that read values to the host without dispatching an op on a CPU tensor
SYNC_METHODS = ("tolist", "numpy", "cpu", "item")


class HostSync(AssertionError):
    pass


class _Recorder(TorchDispatchMode):
    """Torch ops dispatched outside kernel launches; raises on a host read when ``strict``."""

    def __init__(self, strict: bool = False) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.strict = strict

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if self.strict and name.startswith(SYNC_OPS):
            raise HostSync(f"{name} reads a device value on the host")
        self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def gpu_like(monkeypatch):
    """The GPU's host path on CPU: logits go to the routing kernels, value checks run only in validation
    mode (as on CUDA tensors), and every Triton launch is recorded by kernel name and run with the
    recorder and the method guards switched off (the interpreter itself reads tensors)."""
    import sys

    from triton.runtime.interpreter import InterpretedFunction

    import moe.routing.triton as kernels

    monkeypatch.setattr(routing, "_gpu_kernels", lambda logits, top_k: kernels)
    as_on_gpu = lambda t: moe.options().value_checks
    for module in ("moe.validation", "moe.functional", "moe.layer"):  # every module that binds the name
        monkeypatch.setattr(sys.modules[module], "value_checks_enabled", as_on_gpu)
    launches: list[str] = []
    run = InterpretedFunction.run
    state = {"inside": False}

    def recorded(self, *args, **kwargs):
        launches.append(self.__name__)
        state["inside"] = True
        try:
            with _disable_current_modes():
                return run(self, *args, **kwargs)
        finally:
            state["inside"] = False

    monkeypatch.setattr(InterpretedFunction, "run", recorded)
    for method in SYNC_METHODS:
        original = getattr(torch.Tensor, method)

        def guarded(self, *args, _original=original, _method=method, **kwargs):
            if state.get("strict") and not state["inside"]:
                raise HostSync(f"Tensor.{_method}() reads a device value on the host")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, guarded)
    return launches, state


@contextlib.contextmanager
def _counted(gpu_like, strict: bool = False) -> Iterator[tuple[list[str], list[str]]]:
    launches, state = gpu_like
    launches.clear()
    state["strict"] = strict
    rec = _Recorder(strict)
    try:
        with torch.no_grad(), rec:
            yield launches, rec.ops
    finally:
        state["strict"] = False


def _layer(E=8, k=2, method="topk", emap=False, dtype=torch.bfloat16):
    kw = {}
    if emap:
        m = torch.full((E,), -1, dtype=torch.int32)
        m[1::2] = torch.arange(E // 2, dtype=torch.int32)
        kw["expert_map"] = m
    cfg = moe.RoutingConfig(method=method, routed_scaling_factor=1.5)
    return moe.FusedMoE(E, k, 32, 16, routing=cfg, backend="triton", gate=False, params_dtype=dtype, **kw)


def _inputs(layer, T):
    return (torch.randn(T, layer.config.hidden_size, dtype=layer.params_dtype),
            torch.randn(T, layer.config.num_experts))


def _two_calls(layer, x, logits):
    weights, ids = layer.select_experts(x, logits)
    return layer.experts(x, weights, ids)


FUSED = ["topk_align_kernel", "moe_gemm1", "moe_gemm2", "moe_combine"]
TWO_CALLS = ["topk_kernel", "_align_one", "moe_gemm1", "moe_gemm2", "moe_combine"]


@pytest.mark.parametrize("method", ["topk", "topk_then_softmax"])
@pytest.mark.parametrize("T", [2, 16])
def test_layer_routes_and_aligns_in_one_launch(gpu_like, method, T):
    """FusedMoE.forward: one launch for routing and alignment, fewer torch ops than routing then
    fused_experts, and bitwise their result."""
    layer = _layer(method=method)
    x, logits = _inputs(layer, T)
    with _counted(gpu_like) as (launches, ops):
        y = layer(x, logits)
    layer_launches, layer_ops = list(launches), len(ops)
    with _counted(gpu_like) as (launches, ops):
        ref = _two_calls(layer, x, logits)
    assert layer_launches == FUSED, layer_launches
    assert launches == TWO_CALLS, launches
    assert layer_ops <= len(ops), (layer_ops, ops)
    assert torch.equal(y, ref)


def test_route_align_option_off_keeps_the_two_launches(gpu_like):
    """MOE_ROUTE_ALIGN=0: the routing kernel still writes into the call's buffers, the backend aligns."""
    layer = _layer()
    x, logits = _inputs(layer, 6)
    with moe.override_options(route_align=False), _counted(gpu_like) as (launches, _):
        y = layer(x, logits)
    assert launches == TWO_CALLS
    assert torch.equal(y, _two_calls(layer, x, logits))


def test_layer_launches_and_ops_do_not_grow_with_tokens(gpu_like):
    """The host work of a forward does not depend on the batch size: the same launches and the same torch
    ops at 3 and at 200 tokens (both routed and aligned in one program)."""
    layer = _layer()
    seen = []
    for T in (3, 200):
        x, logits = _inputs(layer, T)
        with _counted(gpu_like) as (launches, ops):
            layer(x, logits)
        seen.append((list(launches), list(ops)))
    assert seen[0] == seen[1]


def test_large_batches_route_in_place_then_align(gpu_like, monkeypatch):
    """Past the one-program limit the routing kernel still writes into the call's buffers and the backend
    aligns: the two calls' launches, no more torch ops, the same result."""
    import moe.routing.triton as kernels

    monkeypatch.setattr(kernels, "FUSED_MAX_SCORES", 8)  # 2 tokens of 8 experts at most
    layer = _layer()
    x, logits = _inputs(layer, 5)
    with _counted(gpu_like) as (launches, ops):
        y = layer(x, logits)
    layer_launches, layer_ops = list(launches), len(ops)
    with _counted(gpu_like) as (launches, ops):
        ref = _two_calls(layer, x, logits)
    assert layer_launches == launches == TWO_CALLS
    assert layer_ops <= len(ops)
    assert torch.equal(y, ref)


@pytest.mark.parametrize("T", [1, 2, 9, 64])
def test_layer_forward_reads_nothing_back(gpu_like, T):
    """No host synchronization in the forward: no op or Tensor method that reads a device value runs
    outside the kernels (T = 1 takes the single-token path, the others the fused one)."""
    layer = _layer(E=16, k=4, emap=True)
    x, logits = _inputs(layer, T)
    with _counted(gpu_like, strict=True) as (launches, _):
        layer(x, logits)
    assert launches[-1] == "moe_combine"


def test_the_host_read_detector_fires(gpu_like):
    """The detector is real: validation mode reads the logits on the host, and so does a routing function
    that calls .item() or .tolist()."""
    layer = _layer()
    x, logits = _inputs(layer, 4)
    with moe.validation(), pytest.raises(HostSync, match="_local_scalar_dense"), _counted(gpu_like, strict=True):
        layer(x, logits)
    for read in (lambda t: t.max().item(), lambda t: t.tolist()):
        def custom(hidden, lg, k, read=read):
            read(lg)
            return moe.routing.fused_topk_ref(lg, k)

        custom_layer = moe.FusedMoE(8, 2, 32, 16, routing=moe.RoutingConfig(method="custom"), gate=False,
                                    backend="triton", params_dtype=torch.bfloat16, custom_routing_function=custom)
        with pytest.raises(HostSync), _counted(gpu_like, strict=True):
            custom_layer(x, logits)


@pytest.mark.parametrize(("T", "E", "k", "emap", "dtype"), [
    (2, 8, 2, False, torch.bfloat16), (7, 16, 4, True, torch.float32), (33, 8, 8, True, torch.bfloat16),
    (32, 128, 8, False, torch.bfloat16),  # 32 x 128 scores: the one-program limit exactly
])
def test_fused_alignment_equals_align(gpu_like, T, E, k, emap, dtype):
    """The alignment the routing kernel makes is the one moe.kernels.align makes from its ids."""
    from moe.kernels.align import align
    from moe.routing import route_and_align, routing_outputs

    layer = _layer(E=E, k=k, emap=emap, dtype=dtype)
    _, logits = _inputs(layer, T)
    w, ids = routing_outputs(logits, k)
    al = route_and_align(logits, k, layer.config.routing, w, ids, num_local=layer.num_local_experts, block_m=4,
                         expert_map=layer.expert_map)
    assert al is not None
    ref_w, ref_ids = moe.route(logits, k, layer.config.routing)
    assert torch.equal(w, ref_w) and torch.equal(ids, ref_ids)
    ref = align(ids, layer.num_local_experts, 4, layer.expert_map)
    for field in ("sorted_ids", "block_expert", "total", "expert_ends"):
        assert torch.equal(getattr(al, field), getattr(ref, field)), field
    assert (al.max_blocks, al.block_m) == (ref.max_blocks, ref.block_m)


def test_an_alignment_for_another_tile_is_not_used(gpu_like):
    """The Triton backend uses args.alignment only when it was made for the call's row tile."""
    from moe.backends.triton import choose_config
    from moe.contract import ExpertsArgs
    from moe.functional import _problem
    from moe.kernels.align import align

    layer = _layer()
    x, logits = _inputs(layer, 6)
    w, ids = layer.select_experts(x, logits)
    args = ExpertsArgs(x, layer.w13_weight, layer.w2_weight, w, ids)
    problem = _problem(args, layer.config.activation, False, None)
    block_m = choose_config(problem, x.device).block_m
    wrong = dataclasses.replace(args, alignment=align(ids, 8, 2 * block_m))
    out = torch.empty_like(x)
    moe.get_backend("triton").apply(wrong, problem, out)
    assert torch.equal(out, layer.experts(x, w, ids))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 2, 16, 32, 64, 1024])
def test_gpu_layer_path_equals_two_calls(T):
    """On the GPU: FusedMoE.forward (routing and alignment in one launch up to the one-program limit)
    is bitwise routing then fused_experts, eagerly and replayed in a CUDA graph with new logits."""
    layer = moe.FusedMoE(128, 8, 256, 128, gate=False, backend="triton", params_dtype=torch.bfloat16,
                         device="cuda")
    x = torch.randn(T, 256, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(T, 128, device="cuda")
    with torch.no_grad():
        assert torch.equal(layer(x, logits), _two_calls(layer, x, logits))
        out = torch.empty_like(x)
        layer(x, logits)  # compiled before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out.copy_(layer(x, logits))
        for _ in range(3):
            logits.copy_(torch.randn(T, 128, device="cuda"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, _two_calls(layer, x, logits))


def test_forward_calls_replaced_select_experts_and_experts():
    """A subclass or an instance that replaces select_experts or experts gets them called by forward (the
    HF tests and ParallelFusedMoE rely on it)."""
    calls = []

    class Counted(moe.FusedMoE):
        def select_experts(self, x, router_logits=None):
            calls.append("subclass")
            return super().select_experts(x, router_logits)

    layer = _layer()
    x, logits = _inputs(layer, 3)
    sub = Counted(8, 2, 32, 16, routing=layer.config.routing, gate=False, backend="triton",
                  params_dtype=torch.bfloat16)
    sub.load_state_dict(layer.state_dict())
    select = layer.select_experts
    layer.select_experts = lambda x, lg=None: (calls.append("instance"), select(x, lg))[1]
    with torch.no_grad():
        assert torch.equal(layer(x, logits), sub(x, logits))
    assert calls == ["instance", "subclass"]


def test_fused_moe_checks_the_logits_rows():
    from moe.functional import fused_moe

    layer = _layer()
    x, logits = _inputs(layer, 4)
    with pytest.raises(ValueError, match=r"router_logits: expected \[4, num_experts\] .* got \(3, 8\)"):
        fused_moe(x, logits[:3], layer.w13_weight, layer.w2_weight, top_k=2)
    weights, ids = moe.fused_topk(logits, 2)
    want = moe.fused_experts(x, layer.w13_weight, layer.w2_weight, weights, ids)
    assert torch.equal(fused_moe(x, logits, layer.w13_weight, layer.w2_weight, top_k=2), want)
