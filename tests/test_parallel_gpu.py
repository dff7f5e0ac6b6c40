"""The parity checks over NCCL on 2 (and 4) GPUs; the CPU suites of 4 ranks stay on gloo (test_parallel.py).

These are ``gpu`` tests only where enough GPUs exist: the one-GPU suite also runs ``pytest -m gpu`` and
counts a skipped gpu test as a failure, so there they are not selected; elsewhere they skip, saying why.

``dispatch="fixed"`` adds, on every rank of the group: the parity cases; the whole forward captured in a
CUDA graph and replayed with new tokens and new routing (random, and every pair to one rank's experts),
bitwise equal to the eager forward on the same inputs, with ``expert_load`` counting the replayed routing;
and ``torch.compile(fullgraph=True)`` (inductor) against eager.
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist
from test_parallel import PCase, Suite, fp8_round_trip, spawn_suite

import moe
from moe.parallel import ParallelConfig, ParallelFusedMoE
from moe.testing import assert_close

_GPUS = torch.cuda.device_count()


def _needs(gpus: int) -> pytest.MarkDecorator:
    if gpus <= _GPUS:
        return pytest.mark.gpu
    return pytest.mark.skip(reason=f"needs {gpus} CUDA devices for {gpus} NCCL ranks, found {_GPUS}")


# only the backends that can run here: a skipped gpu test counts as a failure on a GPU machine
_BACKENDS = [*(b.name for b in moe.list_backends() if b.is_available()[0]), "auto"]
# the backends whose launches capture in a CUDA graph with any routing (docs/backends.md)
_GRAPH_BACKENDS = [b for b in ("triton", "torch_grouped") if moe.get_backend(b).is_available()[0]]


@_needs(2)
@pytest.mark.parametrize("backend", _BACKENDS)
def test_two_gpus_nccl_match_single_rank(backend, tmp_path):
    spawn_suite(2, "gpu2", backend, "nccl", tmp_path)


# ------------------------------------------------------------------------------------ dispatch="fixed"
_SHAPE = dict(E=16, K=256, N=128, k=4)


def cases_fixed_gpu(backend: str) -> list[PCase]:
    """Parity on as many ranks as the group has (2 or 4)."""
    world = dist.get_world_size()
    f = dict(dispatch="fixed", **_SHAPE)
    sizes = {2: [(37, 200), (0, 64), (0, 0), (33, 1)], 4: [(37, 200, 0, 1), (0, 64, 64, 3), (0, 0, 0, 0), (33, 1, 5, 2)]}
    t = sizes[world]
    out = []
    for dtype in ("float32", "bfloat16"):
        out += [
            PCase(ep=world, tokens=t[0], capacity=256, dtype=dtype, **f),
            PCase(ep=world, tokens=t[1], capacity=64, routing="first_rank", placement="contiguous", dtype=dtype, **f),
            PCase(ep=world, tokens=t[1], capacity=64, routing="skewed", placement="round_robin", dtype=dtype, **f),
            PCase(ep=world, tokens=t[2], capacity=1, dtype=dtype, **f),
            PCase(ep=world, tokens=t[3], capacity=40, routing="grouped", shared=True, bias=True, gate=True,
                  dtype=dtype, **f),
        ]
    out.append(PCase(ep=world, tokens=t[0], capacity=256, dispatch_quant="fp8", dtype="bfloat16", **f))
    return out


def _fixed_layer(backend: str, capacity: int, device: torch.device,
                 quant: str = "none") -> tuple[ParallelFusedMoE, moe.FusedMoE]:
    world = dist.get_world_size()
    torch.manual_seed(3)
    e, k, hidden, n = (_SHAPE[c] for c in ("E", "k", "K", "N"))
    single = moe.FusedMoE(e, k, hidden, n, params_dtype=torch.bfloat16, gate=False, backend=backend, device=device)
    cfg = ParallelConfig(ep_size=world, dispatch="fixed", capacity=capacity, dispatch_quant=quant)
    layer = ParallelFusedMoE(e, k, hidden, n, parallel=cfg, params_dtype=torch.bfloat16, gate=False, backend=backend,
                             device=device, expert_load=True)
    layer.load_fused_weights(single.w13_weight, single.w2_weight)
    return layer, single


def _new_inputs(t: int, round_: int, routing: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(1000 * round_ + dist.get_rank())
    x = torch.randn(t, _SHAPE["K"], device=device, generator=g).to(torch.bfloat16)
    logits = torch.randn(t, _SHAPE["E"], device=device, generator=g)
    if routing == "first_rank":
        logits[:, : _SHAPE["E"] // dist.get_world_size()] += 20.0  # every pair to rank 0's experts
    return x, logits


def _graph_replay(device: torch.device, backend: str, quant: str) -> list[str]:
    """Capture ``layer(x, logits)`` once per rank (T differs between ranks), replay it with new tokens and
    routing: bitwise the eager forward's output, and the load counts of the replayed routing."""
    t = (37, 200, 1, 0)[dist.get_rank() % 4]
    layer, single = _fixed_layer(backend, 256, device, quant)
    x_in, logits_in = _new_inputs(t, 0, "random", device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(2):  # warm up: NCCL communicators, Triton compiles, the backend's prepared weights
            layer(x_in, logits_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread_local: NCCL's watchdog thread may query events of earlier work while this thread captures
    with torch.no_grad(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = layer(x_in, logits_in)
    errors = []
    for round_, routing in enumerate(("random", "first_rank", "random"), start=1):
        x, logits = _new_inputs(t, round_, routing, device)
        x_in.copy_(x)
        logits_in.copy_(logits)
        out.fill_(float("nan"))
        before = layer.expert_load.clone()
        graph.replay()
        replayed_load = layer.expert_load - before
        with torch.no_grad():
            eager = layer(x, logits)
            ids = single.select_experts(x, logits)[1] if t else torch.empty(0, _SHAPE["k"], device=device)
            ref = single(fp8_round_trip(x) if quant == "fp8" else x, logits) if t else eager
        torch.cuda.synchronize()
        what = f"rank {dist.get_rank()}, {backend}, dispatch_quant={quant}, replay {round_} ({routing}, T={t})"
        if not torch.equal(out, eager):
            errors.append(f"{what}: graph != eager (max diff {(out.float() - eager.float()).abs().max()})")
        want = torch.bincount(ids.flatten().long(), minlength=_SHAPE["E"])
        if not torch.equal(replayed_load, want):
            errors.append(f"{what}: replay counted {replayed_load.tolist()}, routing has {want.tolist()}")
        try:
            assert_close(eager, ref.float(), dtype=torch.bfloat16, what=what)
        except AssertionError as e:
            errors.append(str(e))
    return errors


def _compiled(device: torch.device, backend: str) -> list[str]:
    """torch.compile(fullgraph=True) with inductor: it fuses the router's ops, so within bf16 tolerance."""
    t = (37, 200, 1, 0)[dist.get_rank() % 4]
    layer, _ = _fixed_layer(backend, 256, device)
    x, logits = _new_inputs(t, 9, "random", device)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            got = torch.compile(layer, fullgraph=True)(x, logits)
            eager = layer(x, logits)
        assert_close(got, eager.float(), dtype=torch.bfloat16, what=f"rank {dist.get_rank()}: compiled vs eager")
    except Exception:
        return [f"compile, {backend}: {traceback.format_exc(limit=-4)}"]
    return []


def checks_fixed_gpu(device: torch.device, backend: str) -> list[str]:
    return _graph_replay(device, backend, "none") + _graph_replay(device, backend, "fp8") + _compiled(device, backend)


FIXED_GPU = Suite(cases_fixed_gpu, checks_fixed_gpu)


@_needs(2)
@pytest.mark.parametrize("backend", _GRAPH_BACKENDS)
def test_fixed_two_gpus_cuda_graph_and_compile(backend, tmp_path):
    spawn_suite(2, FIXED_GPU, backend, "nccl", tmp_path)


@_needs(4)
@pytest.mark.parametrize("backend", _GRAPH_BACKENDS)
def test_fixed_four_gpus_cuda_graph_and_compile(backend, tmp_path):
    spawn_suite(4, FIXED_GPU, backend, "nccl", tmp_path)
