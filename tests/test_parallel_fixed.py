"""dispatch="fixed": parity with the single-rank layer on 2 and 4 gloo ranks, and what makes it capturable.

The parity cases reuse test_parallel's harness (one spawned process group per test, every case inside
it): T differing per rank, ranks with no tokens, T equal to the capacity, every pair routed to one rank's
experts, EP x TP, FP8 dispatch. The checks that follow need the live group too:

- a forward over the capacity is refused on its rank before anything launches (the next forward on every
  rank still matches the single-rank layer, so no collective was left half done);
- the parallel part of the forward (dispatch, combine, the load counts) runs under ``NoHostSync``, which
  fails on any host read of a tensor value or value-dependent shape; the same guard catches the
  ``allgather`` strategy, so it can fail;
- ``torch.compile(fullgraph=True)`` traces the whole forward (gloo collectives become functional ones) and
  gives the eager result bitwise; the ``allgather`` layer does not trace;
- ``expert_load`` counts this rank's (token, slot) pairs per global expert and accumulates.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from test_parallel import PCase, Suite, _expect_error, run_case, spawn_suite
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import moe
import moe.layer
from moe.parallel import ParallelConfig, ParallelFusedMoE

_T = torch.Tensor
# Python-level calls that read a tensor's values on the host (a device synchronization on a GPU), or build
# a shape from them
_SYNC_FUNCTIONS = {
    _T.tolist, _T.item, _T.cpu, _T.numpy, _T.__bool__, _T.__int__, _T.__float__, _T.__index__, _T.nonzero,
    torch.nonzero, _T.unique, torch.unique, _T.bincount, torch.bincount, _T.masked_select, torch.masked_select,
    _T.argwhere, torch.argwhere, _T.repeat_interleave, torch.repeat_interleave,
}
# the same at the aten level, for calls made inside torch (boolean indexing runs nonzero)
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "_unique2", "unique_dim",
             "unique_consecutive", "repeat_interleave", "is_nonzero", "equal"}


class NoHostSync:
    """Raise ``AssertionError`` on any host read of a tensor value (``.item()``, ``.tolist()``, ``int(t)``,
    ``bool(t)``, ``.cpu()``) or value-dependent shape (``nonzero``, boolean indexing, ``unique``, ...)
    inside the block, except inside :meth:`allowed`."""

    def __init__(self) -> None:
        self.active = True
        guard = self

        class _Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if guard.active and func in _SYNC_FUNCTIONS:
                    raise AssertionError(f"host synchronization: {func.__qualname__}")
                return func(*args, **(kwargs or {}))

        class _Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if guard.active:
                    name = func.overloadpacket.__name__
                    bool_index = name in ("index", "index_put", "index_put_") and any(
                        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
                    if name in _SYNC_OPS or bool_index:
                        raise AssertionError(f"host synchronization: aten.{name}")
                return func(*args, **(kwargs or {}))

        self._modes = (_Functions(), _Ops())

    def __enter__(self) -> NoHostSync:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    @contextlib.contextmanager
    def allowed(self) -> Iterator[None]:
        self.active = False
        try:
            yield
        finally:
            self.active = True


# ------------------------------------------------------------------------------------- case lists
def cases_fixed2(backend: str) -> list[PCase]:
    f = dict(dispatch="fixed")
    return [
        PCase(ep=2, tokens=(5, 3), capacity=8, **f),
        PCase(ep=2, tokens=(4, 6), capacity=6, placement="round_robin", routing="skewed", k=1, on_input=True, **f),
        PCase(ep=2, tokens=(6, 6), capacity=6, routing="first_rank", **f),  # every pair to rank 0's experts
        PCase(ep=2, tokens=(0, 4), capacity=4, bias=True, loader="per_expert", **f),
        PCase(ep=2, tokens=(0, 0), capacity=2, **f),
        PCase(ep=2, tokens=(6, 2), capacity=7, routing="grouped", k=3, shared=True, placement="round_robin", **f),
        PCase(ep=2, tokens=(3, 3), capacity=3, gate=True, batched=True, E=5, activation="relu2", **f),
        PCase(ep=2, tokens=(7, 1), capacity=9, dtype="bfloat16", bias=True, **f),
        PCase(ep=2, tokens=(5, 0), capacity=5, dispatch_quant="fp8", **f),
        PCase(ep=2, tokens=(4, 7), capacity=8, dispatch_quant="fp8", dtype="bfloat16", routing="first_rank", **f),
        PCase(ep=1, tp=2, tokens=(5,), capacity=5, bias=True, **f),  # no EP group: capacity is only a limit
    ]


def cases_fixed4(backend: str) -> list[PCase]:
    f = dict(dispatch="fixed")
    return [
        PCase(ep=4, tokens=(5, 0, 3, 7), capacity=7, **f),
        PCase(ep=4, tokens=(4, 4, 4, 4), capacity=4, routing="first_rank", **f),  # E // 4 = 2 experts, k = 2
        PCase(ep=4, tokens=(2, 5, 0, 1), capacity=6, E=6, placement="round_robin", bias=True, **f),
        PCase(ep=4, tokens=(0, 0, 0, 0), capacity=1, **f),
        PCase(ep=4, tokens=(3, 6, 1, 0), capacity=6, dispatch_quant="fp8", dtype="bfloat16", **f),
        PCase(ep=2, tp=2, tokens=(5, 3), capacity=5, bias=True, **f),
        PCase(ep=2, tp=2, tokens=(0, 6), capacity=6, routing="skewed", shared=True, placement="round_robin", **f),
    ]


# ------------------------------------------------------------------------------ checks in the group
def _layer(dispatch: str = "fixed", capacity: int | None = 4, device: torch.device | None = None,
           expert_load: bool = False) -> tuple[ParallelFusedMoE, moe.FusedMoE]:
    """A 2-expert-a-rank layer over the world group and its single-rank twin (the same on every rank)."""
    world = dist.get_world_size()
    torch.manual_seed(7)
    single = moe.FusedMoE(2 * world, 2, 16, 8, params_dtype=torch.float32, gate=False, backend="torch",
                          device=device)
    cfg = ParallelConfig(ep_size=world, dispatch=dispatch, capacity=capacity if dispatch == "fixed" else None)
    layer = ParallelFusedMoE(2 * world, 2, 16, 8, parallel=cfg, params_dtype=torch.float32, gate=False,
                             backend="torch", device=device, expert_load=expert_load)
    layer.load_fused_weights(single.w13_weight, single.w2_weight)
    return layer, single


def _tokens(t: int, num_experts: int, device: torch.device | None,
            rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """T tokens and router logits of ``rank`` (default: this one)."""
    g = torch.Generator().manual_seed(100 + (dist.get_rank() if rank is None else rank) * 10 + t)
    return torch.randn(t, 16, generator=g).to(device), torch.randn(t, num_experts, generator=g).to(device)


def _matches_single(what: str, layer: ParallelFusedMoE, single: moe.FusedMoE, t: int, device) -> list[str]:
    x, logits = _tokens(t, single.config.num_experts, device)
    with torch.no_grad():
        out, ref = layer(x, logits), single(x, logits)
    return [] if torch.allclose(out, ref, rtol=1e-5, atol=1e-5) else [f"{what}: output differs from single rank"]


def _refusal(device: torch.device) -> list[str]:
    """Rank 0 passes one token too many (as [T, K], as [B, S, K], and to ``experts``); the others pass
    nothing. A refusal that had launched a collective would leave the next forward out of step."""
    layer, single = _layer(capacity=4, device=device)
    errors = []
    if dist.get_rank() == 0:
        x, logits = _tokens(5, single.config.num_experts, device)
        msg = r"hidden_states: 5 tokens on this rank, but ParallelConfig\.capacity=4 .*pass at most 4 tokens"
        errors += _expect_error("over capacity", ValueError, msg, lambda: layer(x, logits))
        errors += _expect_error("over capacity, batched", ValueError, r"6 tokens on this rank, but .*capacity=4",
                                lambda: layer(torch.zeros(2, 3, 16, device=device),
                                              torch.zeros(2, 3, single.config.num_experts, device=device)))
        w, ids = layer.select_experts(x, logits)
        errors += _expect_error("over capacity, experts()", ValueError, msg, lambda: layer.experts(x, w, ids))
    errors += _matches_single("after a refusal", layer, single, 4, device)
    errors += _expect_error("capacity without fixed", ValueError,
                            r"capacity=4 sizes the buffers of dispatch='fixed' only, but dispatch='allgather'",
                            lambda: ParallelConfig(ep_size=2, capacity=4))
    errors += _expect_error("fixed without capacity", ValueError, r"dispatch='fixed' needs capacity",
                            lambda: ParallelConfig(ep_size=2, dispatch="fixed"))
    return errors


def _parallel_part(layer: ParallelFusedMoE, guard: NoHostSync, t: int, device) -> torch.Tensor:
    """``layer.experts`` (dispatch, the local experts, combine, the load counts) under ``guard``; the local
    experts' backend is let through: on CPU it checks values, and under compile it is an opaque custom op
    whose own capturability the backend tests cover."""
    x, logits = _tokens(t, layer.config.num_experts, device)
    w, ids = layer.select_experts(x, logits)  # routing, outside: its CPU value checks read logits
    local = moe.layer.FusedMoE.experts

    def unguarded(self, *args):
        with guard.allowed():
            return local(self, *args)

    moe.layer.FusedMoE.experts = unguarded
    try:
        with torch.no_grad(), guard:
            return layer.experts(x, w, ids)
    finally:
        moe.layer.FusedMoE.experts = local


def _no_host_sync(device: torch.device) -> list[str]:
    errors = []
    guard = NoHostSync()
    with guard:
        for name, fn in (("tolist", lambda: torch.ones(2).tolist()), ("int", lambda: int(torch.ones(()))),
                         ("bool index", lambda: torch.ones(3)[torch.ones(3) > 0])):
            errors += _expect_error(f"the guard ({name})", AssertionError, "host synchronization", fn)
    layer, single = _layer(capacity=5, device=device, expert_load=True)
    for t in (5, 0, 3):  # the same T on every rank here, the same code path whatever it is
        try:
            out = _parallel_part(layer, guard, t, device)
        except AssertionError:
            errors.append(f"fixed dispatch, T={t}: {traceback.format_exc(limit=-3)}")
            continue
        x, logits = _tokens(t, single.config.num_experts, device)
        ref = single.experts(x, *single.select_experts(x, logits)) if t else x
        if not torch.allclose(out, ref, rtol=1e-5, atol=1e-5):
            errors.append(f"fixed dispatch, T={t}: differs from the single-rank layer")
    allgather, _ = _layer("allgather", device=device)
    errors += _expect_error("the guard catches allgather", AssertionError, "host synchronization: .*tolist",
                            lambda: _parallel_part(allgather, guard, 3, device))
    return errors


def _compiled(device: torch.device) -> list[str]:
    """The whole forward under torch.compile(fullgraph=True) (Dynamo's eager backend: the same kernels, so the
    same bits), for the T it was traced with and a new one."""
    layer, single = _layer(capacity=6, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    errors = []
    for t in (6, 2):
        x, logits = _tokens(t, single.config.num_experts, device)
        with torch.no_grad():
            got, eager = compiled(x, logits), layer(x, logits)
        if not torch.equal(got, eager):
            errors.append(f"compiled, T={t}: differs from eager by {(got - eager).abs().max()}")
    allgather, _ = _layer("allgather", device=device)
    x, logits = _tokens(3, single.config.num_experts, device)
    errors += _expect_error("allgather does not trace", Exception, r"(?i)data-dependent|tolist|graph break|unsupported",
                            lambda: torch.compile(allgather, fullgraph=True, backend="eager")(x, logits))
    return errors


def _expert_load(device: torch.device) -> list[str]:
    layer, single = _layer(capacity=6, device=device, expert_load=True)
    x, logits = _tokens(6, single.config.num_experts, device)
    _, ids = single.select_experts(x, logits)
    want = torch.bincount(ids.flatten().long(), minlength=single.config.num_experts)
    with torch.no_grad():
        layer(x, logits)
        layer(x, logits)
    if layer.expert_load is None or not torch.equal(layer.expert_load, 2 * want):
        return [f"expert_load {layer.expert_load}, expected {(2 * want).tolist()} (two forwards)"]
    total = layer.expert_load.clone()
    dist.all_reduce(total, group=layer.ranks.ep_group)
    return [] if int(total.sum()) == 2 * 6 * 2 * dist.get_world_size() else [f"group load {total.tolist()}"]


def _padding_rows(device: torch.device) -> list[str]:
    """What ``dispatch`` hands the local experts: each rank's block of ``capacity`` rows, its tokens and routing
    first, then padding rows of zero weight routed to an expert this rank does not hold (so none computes)."""
    capacity, world = 4, dist.get_world_size()
    layer, single = _layer(capacity=capacity, device=device)
    sizes = [(r * 3) % (capacity + 1) for r in range(world)]  # 0, 3, 1, 4: differs per rank, 0 included
    routed = [single.select_experts(*_tokens(n, single.config.num_experts, device, r)) for r, n in enumerate(sizes)]
    x, _ = _tokens(sizes[dist.get_rank()], single.config.num_experts, device)
    sent = layer.dispatcher.dispatch(x, *routed[dist.get_rank()])
    rows = torch.stack([torch.arange(capacity) < n for n in sizes]).flatten().to(device)  # [P * C] real rows
    errors = []
    if not torch.equal(sent.topk_ids[rows], torch.cat([ids for _, ids in routed])):
        errors.append("the real rows' expert ids are not every rank's routing in rank order")
    if (layer.expert_map[sent.topk_ids[~rows].long()] >= 0).any() or (sent.topk_weights[~rows] != 0).any():
        errors.append(f"padding rows reach a local expert or weigh something: {sent.topk_ids[~rows].tolist()}")
    start = dist.get_rank() * capacity
    if not torch.equal(sent.hidden_states[start: start + len(x)], x):
        errors.append("this rank's tokens are not the first rows of its block")
    layer.dispatcher.combine(torch.zeros_like(sent.hidden_states), sent)  # the reduce-scatter every rank joins
    return errors


def _other_backends(device: torch.device) -> list[str]:
    """One tiny case on each GPU backend that runs here (under the Triton interpreter on CPU): the padding
    rows reach them with an expert id they do not hold."""
    errors = []
    case = PCase(ep=dist.get_world_size(), dispatch="fixed", capacity=3, tokens=(3, 1, 0, 2)[: dist.get_world_size()],
                 E=4, K=16, N=8)
    for b in ("triton", "torch_grouped"):
        if not moe.get_backend(b).is_available()[0]:
            continue
        try:
            skipped = run_case(case, b, device, {})
            if skipped:
                errors.append(f"{b}: the fixed case was skipped ({skipped})")
        except Exception:
            errors.append(f"{b}: {traceback.format_exc(limit=-3)}")
    return errors


def checks_fixed2(device: torch.device, backend: str) -> list[str]:
    return _refusal(device) + _padding_rows(device) + _no_host_sync(device) + _compiled(device) + \
        _expert_load(device) + _other_backends(device)


def checks_fixed4(device: torch.device, backend: str) -> list[str]:
    return _refusal(device) + _padding_rows(device) + _no_host_sync(device) + _expert_load(device)


FIXED2 = Suite(cases_fixed2, checks_fixed2)
FIXED4 = Suite(cases_fixed4, checks_fixed4)


# ------------------------------------------------------------------------------------ the tests
def test_fixed_two_ranks(tmp_path):
    spawn_suite(2, FIXED2, "torch", "gloo", tmp_path)


def test_fixed_four_ranks(tmp_path):
    spawn_suite(4, FIXED4, "torch", "gloo", tmp_path)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dispatch="fixed"), r"ParallelConfig: dispatch='fixed' needs capacity, .* got capacity=None"),
    (dict(dispatch="fixed", capacity=0), r"ParallelConfig.capacity: Input should be greater than or equal to 1 "
                                         r"\(got 0\)"),
    (dict(dispatch="all_to_all", capacity=8), r"capacity=8 sizes the buffers of dispatch='fixed' only, but "
                                              r"dispatch='all_to_all'; drop capacity or use dispatch='fixed'"),
    (dict(dispatch="allgather", dispatch_quant="fp8"), r"dispatch_quant='fp8' is implemented for dispatch='fixed' "
                                                       r"only, but dispatch='allgather'"),
    (dict(dispatch="fixed", capacity=2, dispatch_quant="int8"), r"ParallelConfig.dispatch_quant: Input should be "
                                                                r"'none' or 'fp8' \(got 'int8'\)"),
])
def test_bad_fixed_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelConfig(**kwargs)


def test_one_rank_fixed_refuses_over_capacity():
    """No process group: the limit holds all the same, named with its numbers."""
    layer = ParallelFusedMoE(8, 2, 32, 16, parallel=ParallelConfig(dispatch="fixed", capacity=3),
                             params_dtype=torch.float32, gate=False)
    assert layer(torch.randn(3, 32), torch.randn(3, 8)).shape == (3, 32)
    with pytest.raises(ValueError, match=r"4 tokens on this rank, but ParallelConfig.capacity=3"):
        layer(torch.randn(4, 32), torch.randn(4, 8))
    assert "fixed, capacity 3" in repr(layer)

