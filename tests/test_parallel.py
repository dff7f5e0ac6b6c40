"""Expert and tensor parallelism: every strategy and EP x TP layout against the single-rank layer.

Each parity test spawns one process group (gloo on CPU; tests/test_parallel_gpu.py reuses this harness
with NCCL) and runs many cases inside it. A case builds the single-rank ``FusedMoE`` with the same seed
on every rank, a ``ParallelFusedMoE`` that loads its weights from it, gives each EP rank its own tokens
(seeded by EP rank, so TP ranks share them) and compares that rank's output with the single-rank layer
run in float64 on the same tokens and the same router logits.
"""

from __future__ import annotations

import copy
import datetime
import json
import re
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

import moe
from moe.contract import ExpertsProblem
from moe.parallel import ParallelConfig, ParallelFusedMoE, expert_counts, expert_map, expert_owners
from moe.testing import assert_close

DISPATCHES = ("allgather", "all_to_all")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class PCase:
    """One parity case. ``tokens``: T of each EP rank (TP ranks of one EP rank share its tokens)."""

    ep: int
    tp: int = 1
    dispatch: str = "allgather"
    placement: str = "contiguous"
    tokens: tuple[int, ...] = (5, 3)
    E: int = 8
    K: int = 32
    N: int = 16
    k: int = 2
    activation: str = "silu"
    # random | skewed (every token's first choice is the last expert) | grouped
    # | first_rank (every choice among the first E // ep experts: all pairs to one EP rank, contiguous placement)
    routing: str = "random"
    bias: bool = False
    shared: bool = False
    gate: bool = False
    on_input: bool = False
    loader: str = "fused"  # fused | per_expert
    batched: bool = False  # pass [1, T, K] instead of [T, K]
    dtype: str = "float32"
    capacity: int | None = None  # dispatch="fixed"
    dispatch_quant: str = "none"

    def __str__(self) -> str:
        default = PCase(ep=1)
        extra = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                 if f.name not in ("ep", "tp", "dispatch") and getattr(self, f.name) != getattr(default, f.name)]
        return f"ep{self.ep}xtp{self.tp}-{self.dispatch}[{', '.join(extra)}]"


# ------------------------------------------------------------------------------------- case lists
def cases_world2(backend: str) -> list[PCase]:
    if backend != "torch":  # Triton kernels run in the interpreter on CPU: tiny shapes, one case per layout
        tiny = dict(E=4, K=16, N=8)
        return [PCase(ep=2, dispatch="allgather", tokens=(3, 0), **tiny),
                PCase(ep=2, dispatch="all_to_all", tokens=(2, 3), routing="skewed", **tiny),
                PCase(ep=1, tp=2, tokens=(3,), **tiny)]
    out = []
    for d in DISPATCHES:
        out += [
            PCase(ep=2, dispatch=d, tokens=(5, 3)),
            PCase(ep=2, dispatch=d, tokens=(4, 6), placement="round_robin", routing="skewed", k=1, on_input=True),
            PCase(ep=2, dispatch=d, tokens=(0, 4), bias=True, loader="per_expert"),
            PCase(ep=2, dispatch=d, tokens=(0, 0)),
            PCase(ep=2, dispatch=d, tokens=(3, 2), E=5, activation="relu2", loader="per_expert"),
            PCase(ep=2, dispatch=d, tokens=(6, 2), routing="grouped", k=3, shared=True, placement="round_robin"),
            PCase(ep=2, dispatch=d, tokens=(3, 3), gate=True, batched=True),
            PCase(ep=2, dispatch=d, tokens=(7, 1), dtype="bfloat16", bias=True),
        ]
    out += [
        PCase(ep=1, tp=2, tokens=(5,), bias=True, shared=True, loader="per_expert"),
        PCase(ep=1, tp=2, tokens=(6,), activation="relu2", bias=True, routing="grouped", k=3),
        PCase(ep=1, tp=2, tokens=(0,)),
    ]
    return out


def cases_world4() -> list[PCase]:
    out = []
    for d in DISPATCHES:
        out += [
            PCase(ep=4, dispatch=d, tokens=(5, 0, 3, 7)),
            PCase(ep=4, dispatch=d, tokens=(4, 4, 4, 4), routing="skewed", k=1),
            PCase(ep=4, dispatch=d, tokens=(2, 5, 0, 1), E=6, placement="round_robin", bias=True,
                  loader="per_expert"),
            PCase(ep=4, dispatch=d, tokens=(0, 0, 0, 0)),
            PCase(ep=2, tp=2, dispatch=d, tokens=(5, 3), bias=True),
            PCase(ep=2, tp=2, dispatch=d, tokens=(0, 6), routing="skewed", shared=True, loader="per_expert",
                  placement="round_robin"),
            PCase(ep=2, tp=2, dispatch=d, tokens=(4, 0), routing="grouped", k=3, activation="relu2"),
            PCase(ep=2, tp=2, dispatch=d, tokens=(0, 0)),
        ]
    out.append(PCase(ep=1, tp=4, tokens=(5,), shared=True, bias=True))
    return out


def cases_gpu2(backend: str) -> list[PCase]:
    shape = dict(E=16, K=256, N=128, k=4)
    out = []
    for d in DISPATCHES:
        for dtype in ("float32", "bfloat16"):
            out += [
                PCase(ep=2, dispatch=d, tokens=(37, 200), dtype=dtype, **shape),
                PCase(ep=2, dispatch=d, tokens=(0, 64), routing="skewed", placement="round_robin", dtype=dtype,
                      **shape),
                PCase(ep=2, dispatch=d, tokens=(0, 0), dtype=dtype, **shape),
                PCase(ep=2, dispatch=d, tokens=(33, 1), routing="grouped", shared=True, bias=True, gate=True,
                      dtype=dtype, **shape),
            ]
    out += [PCase(ep=1, tp=2, tokens=(100,), dtype=dt, shared=True, bias=True, **shape)
            for dt in ("float32", "bfloat16")]
    return out


@dataclass(frozen=True)
class Suite:
    """Cases to run on every rank (from the backend's name), and checks (run first, with the device and the
    backend) that return failure messages. Pass module-level functions: a Suite given to spawn_suite is
    pickled into the ranks."""

    cases: Callable[[str], list[PCase]]
    checks: Callable[[torch.device, str], list[str]] | None = None


def _world4_cases(backend: str) -> list[PCase]:
    return cases_world4()


def _world4_checks(device: torch.device, backend: str) -> list[str]:
    return _bad_distributed_configs(device)


SUITES = {"cpu2": Suite(cases_world2), "cpu4": Suite(_world4_cases, _world4_checks), "gpu2": Suite(cases_gpu2)}


# ------------------------------------------------------------------------------------- one case
def _routing(case: PCase) -> moe.RoutingConfig:
    if case.routing == "grouped":
        return moe.RoutingConfig(method="grouped_topk", scoring="sigmoid", num_expert_group=4, topk_group=2,
                                 use_correction_bias=True, routed_scaling_factor=2.5)
    return moe.RoutingConfig()


def _layer_kwargs(case: PCase, device: torch.device) -> dict:
    return dict(routing=_routing(case), activation=case.activation, bias=case.bias,
                params_dtype=_DTYPES[case.dtype], device=device, gate=case.gate,
                apply_router_weight_on_input=case.on_input)


def _single_rank_layer(case: PCase, device: torch.device) -> moe.FusedMoE:
    """The reference layer, random in every parameter; the same on every rank (seeded by the case)."""
    torch.manual_seed(zlib.crc32(str(case).encode()))
    dtype = _DTYPES[case.dtype]
    shared = moe.GatedMLP(case.K, 24, dtype=dtype, device=device) if case.shared else None
    layer = moe.FusedMoE(case.E, case.k, case.K, case.N, shared_experts=shared, shared_expert_gate=case.shared,
                         backend="torch", **_layer_kwargs(case, device))
    with torch.no_grad():
        for p in (layer.w13_bias, layer.w2_bias, layer.e_score_correction_bias):
            if p is not None:
                p.normal_(0, 0.1 if p.dim() == 2 else 1.0)
    return layer


def _load(case: PCase, layer: ParallelFusedMoE, single: moe.FusedMoE) -> None:
    if case.loader == "fused":
        layer.load_fused_weights(single.w13_weight, single.w2_weight, single.w13_bias, single.w2_bias)
    else:
        gated = single.config.activation.gated
        loaded = 0
        for e in range(case.E):
            w13 = single.w13_weight[e]
            shards = {"w1": w13[: case.N], "w2": single.w2_weight[e]}
            if gated:
                shards["w3"] = w13[case.N:]
            if case.bias:
                b13 = single.w13_bias[e]
                shards.update(w1_bias=b13[: case.N], w2_bias=single.w2_bias[e])
                if gated:
                    shards["w3_bias"] = b13[case.N:]
            results = {layer.weight_loader(t, e, s) for s, t in shards.items()}
            if len(results) != 1:
                raise AssertionError(f"weight_loader answered {results} for the shards of expert {e}")
            loaded += results.pop()
        if loaded != layer.num_local_experts:
            raise AssertionError(f"weight_loader loaded {loaded} experts, the layer holds {layer.num_local_experts}")
    if single.gate is not None:
        layer.gate.load_state_dict(single.gate.state_dict())
    if single.e_score_correction_bias is not None:
        layer.e_score_correction_bias.data.copy_(single.e_score_correction_bias)


def _tokens(case: PCase, ep_rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This EP rank's tokens and router logits: different on each EP rank, shared by its TP ranks."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{case}/{ep_rank}".encode()))
    t = case.tokens[ep_rank]
    x = torch.randn(t, case.K, generator=g)
    logits = torch.randn(t, case.E, generator=g)
    if case.routing == "skewed":
        logits[:, -1] += 20.0  # every token's first choice: the last expert
    elif case.routing == "first_rank":
        logits[:, : case.E // case.ep] += 20.0  # every choice among EP rank 0's experts
    return x.to(device, _DTYPES[case.dtype]), logits.to(device)


def _supported_everywhere(case: PCase, layer: ParallelFusedMoE, backend: str, device: torch.device) -> str:
    """'' if ``backend`` accepts the local problem on every rank, else the first reason (same on all ranks)."""
    if backend == "auto":
        return ""
    problem = ExpertsProblem(
        device_type=device.type, dtype=_DTYPES[case.dtype], num_tokens=1, num_experts=layer.num_local_experts,
        num_global_experts=case.E, hidden_size=case.K, intermediate_size=layer.config.intermediate_size,
        top_k=case.k, activation=layer.config.activation, has_w13_bias=case.bias, has_w2_bias=case.bias,
        has_expert_map=layer.expert_map is not None, apply_router_weight_on_input=case.on_input,
    )
    ok, reason = moe.get_backend(backend).supports(problem)
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return "" if int(flag) else (reason or "unsupported on another rank")


def run_case(case: PCase, backend: str, device: torch.device, configs: dict) -> str:
    """Run one case on this rank; raise on a mismatch. Returns '' or the reason it was skipped."""
    rank = dist.get_rank()
    if (case.ep, case.tp) not in configs:  # collective, once per layout
        configs[case.ep, case.tp] = ParallelConfig.from_world(case.ep, case.tp)
    base = configs[case.ep, case.tp]
    parallel = ParallelConfig(ep_size=case.ep, tp_size=case.tp, placement=case.placement, dispatch=case.dispatch,
                              capacity=case.capacity, dispatch_quant=case.dispatch_quant, ep_group=base.ep_group,
                              tp_group=base.tp_group)
    ep_rank = rank // case.tp
    single = _single_rank_layer(case, device)
    shared = copy.deepcopy(single.shared_experts)
    shared_gate = copy.deepcopy(single.shared_expert_gate) if case.shared else False
    layer = ParallelFusedMoE(case.E, case.k, case.K, case.N, parallel=parallel, backend=backend,
                             shared_experts=shared, shared_expert_gate=shared_gate, **_layer_kwargs(case, device))
    skip = _supported_everywhere(case, layer, backend, device)
    if skip:
        return skip
    _load(case, layer, single)
    want_local = expert_counts(case.E, case.ep, case.placement)[ep_rank]
    if layer.w13_weight.shape[0] != want_local or layer.config.intermediate_size != case.N // case.tp:
        raise AssertionError(f"rank {rank}: w13 {tuple(layer.w13_weight.shape)}, expected {want_local} experts "
                             f"of intermediate {case.N // case.tp}")

    x, logits = _tokens(case, ep_rank, device)
    with torch.no_grad():
        if case.gate:
            logits = single.gate(x).float()
        xin = x.view(1, *x.shape) if case.batched else x
        out = layer(xin, None if case.gate else logits)  # every collective happens here
        decision = moe.last_decision()
        # (the single-rank layer's grouped_topk cannot route 0 tokens: its output is empty anyway)
        xref = fp8_round_trip(x) if case.dispatch_quant == "fp8" else x  # what the experts receive
        ref = copy.deepcopy(single).double()(xref.double(), logits.double()) if len(x) else x.double()
    if out.shape != xin.shape:
        raise AssertionError(f"rank {rank}: output shape {tuple(out.shape)} != input shape {tuple(xin.shape)}")
    assert_close(out.reshape(x.shape), ref, dtype=_DTYPES[case.dtype], what=f"rank {rank}")
    if backend != "auto" and decision is not None and decision.chosen != backend:
        raise AssertionError(f"rank {rank}: backend {decision.chosen!r} ran, not {backend!r}")
    return ""


def fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """``x`` as FP8 dispatch delivers it: per-token float8_e4m3fn, dequantized to x's dtype."""
    from moe.quant import ActivationScheme
    from moe.quant.activations import dequantize_activations, quantize_activations

    scheme = ActivationScheme(format="fp8", granularity="token")
    return dequantize_activations(*quantize_activations(x, scheme), scheme, x.dtype)


# ----------------------------------------------------------------------------------- processes
def _worker(rank: int, world: int, suite: str | Suite, backend: str, dist_backend: str, out_dir: str) -> None:
    device = torch.device("cpu")
    if dist_backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    torch.set_num_threads(1)
    dist.init_process_group(dist_backend, init_method=f"file://{out_dir}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    report: dict = {"failures": [], "skipped": [], "ran_cases": [], "unavailable": ""}
    try:
        if backend not in ("torch", "auto"):
            ok, reason = moe.get_backend(backend).is_available()
            if not ok:
                report["unavailable"] = reason
                return
        spec = SUITES[suite] if isinstance(suite, str) else suite
        if spec.checks is not None:
            report["failures"] += spec.checks(device, backend)
        configs: dict = {}
        for case in spec.cases(backend):
            try:
                skip = run_case(case, backend, device, configs)
                report["skipped" if skip else "ran_cases"].append(f"{case}: {skip}" if skip else str(case))
            except Exception:  # report every case, not just the first
                report["failures"].append(f"{case}: {traceback.format_exc(limit=-4)}")
            Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))  # survives a later abort
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()


def _expect_error(what: str, exc: type[Exception], match: str, fn) -> list[str]:
    try:
        fn()
    except exc as e:
        return [] if re.search(match, str(e)) else [f"{what}: message {str(e)!r} does not match {match!r}"]
    return [f"{what}: no {exc.__name__} raised"]


def _bad_distributed_configs(device: torch.device) -> list[str]:
    """Errors that need a live 4-rank group (every check raises on all ranks alike, before any collective
    that could leave a rank behind)."""
    base = ParallelConfig.from_world(ep_size=2, tp_size=2)
    layer = lambda cfg: ParallelFusedMoE(8, 2, 32, 16, parallel=cfg, params_dtype=torch.float32, device=device)
    errors = _expect_error("world size", ValueError, r"ep_size=3 x tp_size=1 = 3 must equal the world size 4",
                           lambda: ParallelConfig.from_world(ep_size=3))
    errors += _expect_error("default group", ValueError,
                            r"ep_group is None, which means the default group of 4 ranks, but ep_size=2.*from_world",
                            lambda: layer(ParallelConfig(ep_size=2)))
    errors += _expect_error("group size", ValueError, r"ep_group has 2 ranks .* but ep_size=4",
                            lambda: ParallelConfig(ep_size=4, ep_group=base.ep_group))
    errors += _expect_error("ep ranks with different tp ranks", ValueError,
                            r"ranks of ep_group have tp ranks \[0, 1, 0, 1\]",
                            lambda: layer(ParallelConfig(ep_size=4, tp_size=2, tp_group=base.tp_group)))
    tp_layer = layer(base)
    errors += _expect_error("tp loader shape", ValueError, r"w1 of expert 0 must have shape \(16, 32\) \(the full",
                            lambda: tp_layer.weight_loader(torch.zeros(8, 32), 0, "w1"))
    errors += _expect_error("tp fused loader shape", ValueError, r"w13 must have shape \(8, 32, 32\)",
                            lambda: tp_layer.load_fused_weights(w13=tp_layer.w13_weight))
    return errors


def spawn_suite(world: int, suite: str | Suite, backend: str, dist_backend: str, tmp_path: Path) -> None:
    """Run ``suite`` on ``world`` spawned ranks; fail with every failing case, skip if ``backend`` is
    unavailable there."""
    crash = ""
    try:
        mp.spawn(_worker, args=(world, suite, backend, dist_backend, str(tmp_path)), nprocs=world, join=True)
    except ProcessException as e:  # a failed case can leave the ranks' collectives out of step
        crash = f"\nthe process group crashed: {e}"
    paths = [Path(tmp_path, f"rank{r}.json") for r in range(world)]
    reports = [json.loads(p.read_text()) if p.exists() else {"failures": [], "ran_cases": [], "skipped": [], "unavailable": ""} for p in paths]
    failures = [f"[rank {r}] {f}" for r, rep in enumerate(reports) for f in rep["failures"]]
    assert not (failures or crash), f"{len(failures)} failures:\n" + "\n".join(failures) + crash
    if reports[0]["unavailable"]:
        pytest.skip(f"backend {backend!r}: {reports[0]['unavailable']}")
    assert reports[0]["ran_cases"], f"no case ran; skipped: {reports[0]['skipped']}"


def parity_backends() -> list:
    """Every registered backend; one that cannot run here is skipped with its reason. Without CUDA the
    Triton kernels run in the interpreter (TRITON_INTERPRET=1, set by conftest and inherited by the ranks)."""
    params = []
    for b in moe.list_backends():
        ok, reason = b.is_available()
        marks = () if ok else (pytest.mark.skip(reason=f"{b.name}: {reason}"),)
        params.append(pytest.param(b.name, marks=marks, id=b.name))
    return params


# ------------------------------------------------------------------------------------ the tests
@pytest.mark.parametrize("backend", parity_backends())
def test_two_ranks_match_single_rank(backend, tmp_path):
    spawn_suite(2, "cpu2", backend, "gloo", tmp_path)


def test_four_ranks_match_single_rank(tmp_path):
    spawn_suite(4, "cpu4", "torch", "gloo", tmp_path)


# --------------------------------------------------------------------- in-process: no group needed
def test_expert_maps():
    assert expert_map(8, 2, 1).tolist() == [-1, -1, -1, -1, 0, 1, 2, 3]
    assert expert_map(8, 4, 1, "round_robin").tolist() == [-1, 0, -1, -1, -1, 1, -1, -1]
    assert expert_owners(7, 3).tolist() == [0, 0, 0, 1, 1, 2, 2]  # uneven: the first E % ep ranks get one more
    assert expert_counts(6, 4) == [2, 2, 1, 1] and expert_counts(6, 4, "round_robin") == [2, 2, 1, 1]
    for placement in ("contiguous", "round_robin"):
        maps = torch.stack([expert_map(10, 4, r, placement) for r in range(4)])  # [ep, E]
        assert ((maps >= 0).sum(0) == 1).all(), "every expert lives on exactly one rank"
        for row in maps:
            assert sorted(row[row >= 0].tolist()) == list(range(int((row >= 0).sum())))
    with pytest.raises(ValueError, match=r"ep_size=9 must be between 1 and num_experts=8"):
        expert_owners(8, 9)
    with pytest.raises(ValueError, match=r"ep_rank=2 must be in \[0, ep_size=2\)"):
        expert_map(8, 2, 2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dispatch="alltoall"), r"ParallelConfig.dispatch: Input should be 'allgather', 'all_to_all' or 'fixed' \(got 'alltoall'\)"),
    (dict(placement="striped"), r"ParallelConfig.placement: Input should be 'contiguous' or 'round_robin' \(got 'striped'\)"),
    (dict(ep_size=0), r"ParallelConfig.ep_size: Input should be greater than or equal to 1 \(got 0\)"),
    (dict(tp_size=-2), r"ParallelConfig.tp_size: Input should be greater than or equal to 1 \(got -2\)"),
    (dict(ep_szie=2), r"ParallelConfig.ep_szie: Extra inputs are not permitted"),
    (dict(ep_group="world"), r"ParallelConfig.ep_group: Input should be an instance of ProcessGroup"),
])
def test_bad_parallel_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelConfig(**kwargs)


def test_parallel_config_is_frozen():
    cfg = ParallelConfig(ep_size=2)
    with pytest.raises(ValueError, match="frozen"):
        cfg.ep_size = 4


@pytest.mark.parametrize("cfg,kw,exc,match", [
    (ParallelConfig(tp_size=3), {}, ValueError, r"tp_size=3 must divide intermediate_size=16"),
    (ParallelConfig(ep_size=9), {}, ValueError, r"ep_size=9 exceeds num_experts=8: every EP rank must hold"),
    (ParallelConfig(ep_size=2), {}, RuntimeError, r"needs torch.distributed: call torch.distributed.init_process_group"),
    (ParallelConfig(), {"expert_map": torch.arange(8)}, ValueError, r"expert_map: ParallelFusedMoE builds it"),
    ("ep2", {}, TypeError, r"parallel: expected a ParallelConfig, got str"),
])
def test_bad_parallel_layer(cfg, kw, exc, match):
    with pytest.raises(exc, match=match):
        ParallelFusedMoE(8, 2, 32, 16, parallel=cfg, **kw)


def test_from_world_needs_a_process_group():
    with pytest.raises(RuntimeError, match=r"ParallelConfig.from_world needs torch.distributed: call"):
        ParallelConfig.from_world(ep_size=2)


def test_one_rank_is_the_plain_layer():
    """ep_size = tp_size = 1 needs no process group and is FusedMoE exactly."""
    single = moe.FusedMoE(8, 2, 32, 16, params_dtype=torch.float32, gate=False)
    layer = ParallelFusedMoE(8, 2, 32, 16, parallel=ParallelConfig(), params_dtype=torch.float32, gate=False)
    layer.load_fused_weights(single.w13_weight, single.w2_weight)
    x, logits = torch.randn(6, 32), torch.randn(6, 8)
    assert layer.expert_map is None and layer.dispatcher is None
    assert torch.equal(layer(x, logits), single(x, logits))
    assert "ep=0/1" in repr(layer)
