"""Property-based tests (hypothesis) of the public API: ``moe.fused_experts``, ``moe.FusedMoE`` and the routing
functions, on every registered backend, against float64 oracles.

Each example is one tiny call built from a frozen description (a dataclass, so explicit ``@example`` cases read
like the findings they reproduce) and a seed; its tensors come from a private generator. A legal call must give
the oracle's answer (``moe.testing`` tolerance table), finite, in the ``out`` it was given, on the backend that
was asked for, without touching memory outside the views it was given. An invalid call must raise
ValueError/TypeError naming the parameter; a backend that cannot run a problem raises BackendUnavailableError
with its reason. The routing functions (torch reference, public functions, ``moe.route`` and the Triton kernels,
under the interpreter on CPU) must agree exactly on ids with a float64 oracle whose order is (score descending,
index ascending), and closely on weights.

Budget: ``MOE_FUZZ_EXAMPLES`` examples per test and backend (200 on CPU, 60 on the GPU by default), derandomized.
The GPU variants (``-m gpu``) run the same property functions on CUDA tensors; there each new shape compiles its
Triton kernels (about 3 s an example on an H200), hence the smaller default.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import pytest
import torch
from hypothesis import HealthCheck, currently_in_test_context, event, example, given, settings
from hypothesis import strategies as st

import moe
from moe.testing import ACTIVATIONS, assert_close, experts_float64, tolerance

BACKENDS = [b.name for b in moe.list_backends()]
GPU_BACKENDS = ["triton", "torch_grouped"]
DTYPES_INT = {"int32": torch.int32, "int64": torch.int64}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
GATED = ("silu", "gelu", "gelu_tanh", "swigluoai")

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]
CPU = settings(max_examples=int(os.environ.get("MOE_FUZZ_EXAMPLES", 200)), derandomize=True, deadline=None,
               suppress_health_check=_HEALTH)
GPU = settings(max_examples=int(os.environ.get("MOE_FUZZ_EXAMPLES", 60)), derandomize=True, deadline=None,
               suppress_health_check=_HEALTH)

# Known package bugs the draws steer around (``_fit`` replaces the field's value on the affected backends):
# field -> (values that trigger it, replacement, backends). Empty: the four the suite found are fixed, and
# each has its regression test at the end of this file.
KNOWN_BUGS: dict[str, tuple[set, str, set]] = {}

NAN, INF = float("nan"), float("inf")
_NO_TUNING_WARNINGS = pytest.mark.filterwarnings("ignore:.*no tuned Triton config:UserWarning")  # every new GPU shape
_ERRORS = (ValueError, TypeError, moe.BackendUnavailableError)


def _event(what: str) -> None:
    """Count an outcome in hypothesis' statistics (``--hypothesis-show-statistics``), inside a property."""
    if currently_in_test_context():
        event(what)


def _examples(*cases):
    """Apply ``@example(case=c)`` for each case."""
    def wrap(fn):
        for c in reversed(cases):
            fn = example(case=c)(fn)
        return fn
    return wrap


# ------------------------------------------------------------------------------------------ shared helpers
def _pick(lo: int, hi: int) -> st.SearchStrategy[int]:
    """An int in [lo, hi], uniformly (``st.integers`` draws its lower bound about a third of the time)."""
    return st.sampled_from(range(lo, hi + 1))


_SEEDS = st.integers(0, 2**16)
_DIMS = _pick(1, 40)
_EXPERTS = st.sampled_from([*range(1, 10), *range(1, 10), 16, 64])  # 16 and 64 one time in 20 each
_PROBE = st.sampled_from(range(8)).map(lambda v: v == 0)  # one example in 8 keeps what was drawn (see _fit)


def _grid(g: torch.Generator, shape: tuple[int, ...], coarse: bool) -> torch.Tensor:
    """Logits on a grid that every float dtype holds exactly: 1/64 steps in [-3, 3] (distinct values stay far
    apart in fp32, equal ones are exact ties), or 1/2 steps in [-2, 2] (mostly ties)."""
    if coarse:
        return torch.randint(-4, 5, shape, generator=g).float() / 2
    return torch.randint(-192, 193, shape, generator=g).float() / 64


def _mask_logits(logits: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    """``masked``: some experts of some rows are -inf; ``dead``: whole rows are -inf (row 0 always)."""
    logits = logits.clone()
    if kind == "masked" and logits.numel():
        logits[torch.rand(logits.shape, generator=g) < 0.3] = -INF
    if kind == "dead" and logits.shape[0]:
        rows = torch.rand(logits.shape[0], generator=g) < 0.4
        rows[0] = True
        logits[rows] = -INF
    return logits


def _place(values: torch.Tensor, layout: str, device: str, fill: float | int, off: int = 3):
    """``values`` [R, C] (CPU) copied into a view of ``layout`` on ``device``: (view, whole buffer or None)."""
    rows, cols = values.shape
    kw = {"dtype": values.dtype, "device": device}
    if layout == "contiguous":
        return values.to(device).clone(), None
    if layout == "transposed":
        base = torch.full((cols, rows), fill, **kw)
        view = base.t()
    elif layout == "rows":  # every other row of a bigger tensor
        base = torch.full((2 * rows, cols), fill, **kw)
        view = base[::2]
    elif layout == "cols":  # a column slice, with a storage offset
        base = torch.full((rows, cols + 2), fill, **kw)
        view = base[:, 1:cols + 1]
    elif layout == "strided":  # every other column
        base = torch.full((rows, 2 * cols), fill, **kw)
        view = base[:, ::2]
    elif layout == "offset":  # a non-zero storage offset into a flat buffer
        base = torch.full((off + rows * cols + 3,), fill, **kw)
        view = base[off:off + rows * cols].view(rows, cols)
    else:
        raise AssertionError(f"unknown layout {layout!r}")
    view.copy_(values)
    return view, base


def _outside(view: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The elements of ``base`` that ``view`` does not cover."""
    covered = torch.zeros(base.shape, dtype=torch.bool, device=base.device)
    covered.as_strided(view.shape, view.stride(), view.storage_offset() - base.storage_offset()).fill_(True)
    return base[~covered]


def _fit(case, backend: str, device: str, avoid_known_bugs: bool = True):
    """Unless ``case.probe``, move a drawn case into the domain a built-in backend runs (dtype, 16-byte aligned
    K and N), so that most examples run rather than being refused; probe cases keep what was drawn. Unless told
    otherwise, it also steers clear of the KNOWN_BUGS of ``backend``."""
    if avoid_known_bugs:
        for field, (values, instead, backends) in KNOWN_BUGS.items():
            if getattr(case, field, None) in values and backend in backends:
                case = dataclasses.replace(case, **{field: instead})
    if case.probe:
        return case
    dtype, hidden, inter = case.dtype, case.K, case.N
    if backend == "triton" and dtype == "float64":
        dtype = "float32"
    if backend == "torch_grouped":
        if device == "cuda":
            dtype = "bfloat16"
        elif dtype not in ("float32", "bfloat16"):
            dtype = {"float16": "bfloat16", "float64": "float32"}[dtype]
        hidden, inter = (max(8, -(-v // 8) * 8) for v in (hidden, inter))
    return dataclasses.replace(case, dtype=dtype, K=hidden, N=inter)


def _refusal(backend: str, dtype: torch.dtype, hidden: int, inter: int, device: str) -> list[str] | None:
    """Fragments of the reason a built-in backend must refuse a problem with, or None when it must run it
    (on a GPU, refusals are only required, any other reason is also accepted)."""
    elt = dtype.itemsize
    if backend == "triton" and dtype == torch.float64:
        return [str(dtype).removeprefix("torch.")]
    if backend == "torch_grouped":
        if (hidden * elt) % 16 or (inter * elt) % 16:
            return ["16-byte aligned", f"K={hidden}", f"N={inter}"]
        if dtype not in ((torch.bfloat16,) if device == "cuda" else (torch.float32, torch.bfloat16)):
            return [str(dtype)]
    return None


def _check_refusal(err: moe.BackendUnavailableError, backend: str, want: list[str] | None, device: str,
                   what: str) -> None:
    msg = str(err)
    assert f"backend {backend!r} cannot run this problem: " in msg, f"{what}: {msg}"
    assert msg.split("cannot run this problem: ", 1)[1].strip(), f"{what}: a refusal without a reason: {msg}"
    if want is None:
        assert device == "cuda" or backend not in ("torch", "triton", "torch_grouped"), \
            f"{what}: {backend} refused a problem it runs: {msg}"
        return
    for fragment in want:
        assert fragment in msg, f"{what}: the refusal does not say {fragment!r}: {msg}"


def _fill(g: torch.Generator, shape: tuple[int, ...], scale: float, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def magnitude64(x, w13, w2, weights, ids, activation="silu", w13_bias=None, w2_bias=None, on_input=False,
                expert_map=None) -> torch.Tensor:
    """A float64 bound of the size of the terms each output element sums (the oracle's loop on magnitudes):
    the rounding errors of a correct implementation are a few unit roundoffs of it. ``experts_float64``'s
    norm-relative tolerance means nothing where those terms cancel (K = 1, bf16: an output 1e-4 from terms
    of 0.1), so ``check_close`` falls back to this scale there."""
    n = w2.shape[-1]

    def bound(h: torch.Tensor) -> torch.Tensor:
        if activation in GATED:  # act(gate) * up: both roundings, |act'| <= 1.13, swigluoai adds 1 to up
            gate, up = h[:n], h[n:]
            return 3 * gate * (up + 1 if activation == "swigluoai" else up)
        return 3 * h * (h if activation == "relu2" else 1)

    def size(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().double().cpu().abs()

    return experts_float64(size(x), size(w13), size(w2), size(weights), ids, activation, size(w13_bias),
                           size(w2_bias), on_input, expert_map, act=bound)


def check_close(got: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """``assert_close`` against the oracle (the tolerance table), or, where the output's terms cancel, the same
    tolerance relative to the size of those terms (``magnitude64``)."""
    try:
        assert_close(got, ref, dtype=dtype, what=what)
    except AssertionError as exc:
        diff, scale = (got.detach().double().cpu() - ref).norm().item(), mag.norm().item()
        if not (torch.isfinite(got).all() and diff <= tolerance(dtype) * scale):
            raise AssertionError(f"{exc}; relative to the size of its terms: {diff / max(scale, 1e-300):.3e}") from None


# ============================================================================================ fused_experts
@dataclasses.dataclass(frozen=True)
class Call:
    """One ``fused_experts`` call. ``E`` global experts; with an expert map, ``local`` of them are held."""

    T: int
    E: int
    K: int
    N: int
    k: int
    dtype: str = "float32"
    activation: str = "silu"
    bias: bool = False
    on_input: bool = False
    x_layout: str = "contiguous"  # contiguous | transposed | rows | cols | expanded | offset
    out_layout: str = "none"  # none | contiguous | transposed | strided | alias
    topk_layout: str = "contiguous"  # contiguous | transposed | strided | offset
    ids_dtype: str = "int32"
    weights_dtype: str = "float32"  # float32 | same (as hidden_states)
    w_layout: str = "contiguous"  # contiguous | transposed ([E, cols, rows] storage) | sliced (see _stored)
    bias_layout: str = "contiguous"  # contiguous | transposed | strided (every other column)
    emap: str = "none"  # none | valid | out_of_range | all_remote
    local: int = 0  # held experts with a map
    map_layout: str = "contiguous"  # contiguous | strided
    routing: str = "random"  # random | ties | masked | dead | raw (random ids, duplicates allowed, any weights)
    probe: bool = False  # keep dtype, K and N as drawn (see _fit)
    seed: int = 0


@st.composite
def calls(draw) -> Call:
    T = draw(_pick(0, 9))
    E = draw(_EXPERTS)
    k = draw(_pick(1, min(E, 4)))
    x_layout = draw(st.sampled_from(["contiguous", "transposed", "rows", "cols", "expanded", "offset"]))
    outs = ["none", "contiguous", "transposed", "strided"] + ([] if x_layout == "expanded" else ["alias"])
    emap = draw(st.sampled_from(["none", "none", "none", "valid", "valid", "valid", "out_of_range", "all_remote"]))
    return Call(
        T=T, E=E, K=draw(_DIMS), N=draw(_DIMS), k=k,
        dtype=draw(st.sampled_from(["float32", "bfloat16", "float16", "float32", "bfloat16", "float16", "float64"])),
        activation=draw(st.sampled_from(ACTIVATIONS)), bias=draw(st.booleans()),
        on_input=k == 1 and draw(st.booleans()), x_layout=x_layout, out_layout=draw(st.sampled_from(outs)),
        topk_layout=draw(st.sampled_from(["contiguous", "transposed", "strided", "offset"])),
        ids_dtype=draw(st.sampled_from(["int32", "int64"])), weights_dtype=draw(st.sampled_from(["float32", "same"])),
        w_layout=draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
        bias_layout=draw(st.sampled_from(["contiguous", "transposed", "strided"])), emap=emap,
        local=draw(_pick(1, E)) if emap != "none" else 0,
        map_layout=draw(st.sampled_from(["contiguous", "strided"])) if emap != "none" else "contiguous",
        routing=draw(st.sampled_from(["random", "ties", "masked", "dead", "raw"])),
        probe=draw(_PROBE), seed=draw(_SEEDS),
    )


def _expert_map(c: Call, g: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(the map passed, the map of the oracle: out-of-range values treated as remote), on the CPU."""
    if c.emap == "none":
        return None, None
    emap = torch.full((c.E,), -1, dtype=torch.int64)
    if c.emap != "all_remote":
        held = torch.randperm(c.E, generator=g)[:c.local]
        emap[held] = torch.randperm(c.local, generator=g)
    remote = emap.clone()
    if c.emap == "out_of_range":
        bad = torch.randperm(c.E, generator=g)[:1 + c.seed % min(2, c.E)]
        for i, pos in enumerate(bad.tolist()):
            emap[pos] = c.local + (c.seed >> 2) % 3 if (i + c.seed) % 2 == 0 else -2 - (c.seed >> 4) % 3
            remote[pos] = -1
    return emap.to(DTYPES_INT[c.ids_dtype]), remote


def _routing(c: Call, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 weights and int64 global ids [T, k] (CPU)."""
    if c.routing == "raw":
        return torch.randn(c.T, c.k, generator=g), torch.randint(0, c.E, (c.T, c.k), generator=g)
    logits = _mask_logits(_grid(g, (c.T, c.E), coarse=c.routing == "ties"), c.routing, g)
    weights, ids = moe.fused_topk(logits, c.k)
    return weights, ids.long()


def _stored(w: torch.Tensor, layout: str, device: str) -> torch.Tensor:
    """A weight [E, R, C] on ``device``: contiguous; transposed ([E, C, R] storage); or sliced (every other
    expert of a bigger tensor, a column slice of wider rows: unit column stride, odd row stride, offset)."""
    w = w.to(device)
    if layout == "transposed":
        return w.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "sliced":
        big = torch.full((2 * w.shape[0], w.shape[1], w.shape[2] + 3), NAN, dtype=w.dtype, device=device)
        view = big[::2, :, 1:w.shape[2] + 1]
        view.copy_(w)
        return view
    return w


def build(c: Call, device: str) -> dict:
    """The call's tensors on ``device`` (views in the drawn layouts) and their CPU values for the oracle."""
    g = torch.Generator().manual_seed(c.seed)
    dtype = DTYPES[c.dtype]
    gated = c.activation in GATED
    rows = 2 * c.N if gated else c.N
    local = c.local if c.emap != "none" else c.E
    emap, oracle_map = _expert_map(c, g)
    scale = 4.0 if c.activation == "swigluoai" else 1.0  # reach the clamp
    w13 = _fill(g, (local, rows, c.K), scale / c.K**0.5, dtype)
    w2 = _fill(g, (local, c.K, c.N), 1 / c.N**0.5, dtype)
    b13 = _fill(g, (local, rows), 0.1, dtype) if c.bias else None
    b2 = _fill(g, (local, c.K), 0.1, dtype) if c.bias else None
    if c.x_layout == "expanded":
        row = _fill(g, (c.K,), 1.0, dtype)
        x_vals, x, x_base = row.expand(c.T, c.K).clone(), row.to(device).expand(c.T, c.K), None
    else:
        x_vals = _fill(g, (c.T, c.K), 1.0, dtype)
        x, x_base = _place(x_vals, c.x_layout, device, NAN, off=1 + c.seed % 7)
    weights, ids = _routing(c, g)
    weights = weights.to(dtype if c.weights_dtype == "same" else torch.float32)
    ids = ids.to(DTYPES_INT[c.ids_dtype])
    w_dev, w_base = _place(weights, c.topk_layout, device, NAN)
    ids_dev, ids_base = _place(ids, c.topk_layout, device, -7)
    out, out_base = None, None
    if c.out_layout == "alias":
        out = x
    elif c.out_layout != "none":
        out, out_base = _place(torch.full((c.T, c.K), NAN, dtype=dtype), c.out_layout, device, NAN)

    def bias(b):
        return None if b is None else _place(b, c.bias_layout, device, NAN)[0]

    emap_dev = None
    if emap is not None:
        emap_dev = emap.to(device)
        if c.map_layout == "strided":
            buf = torch.full((2 * c.E,), -1, dtype=emap.dtype, device=device)
            buf[::2] = emap_dev
            emap_dev = buf[::2]
    return {
        "call": {"hidden_states": x, "w13": _stored(w13, c.w_layout, device), "w2": _stored(w2, c.w_layout, device),
                 "topk_weights": w_dev, "topk_ids": ids_dev},
        "kwargs": {"activation": c.activation, "w13_bias": bias(b13), "w2_bias": bias(b2),
                   "apply_router_weight_on_input": c.on_input, "expert_map": emap_dev, "out": out},
        "oracle": (x_vals, w13, w2, weights, ids, c.activation, b13, b2, c.on_input),
        "oracle_map": oracle_map, "x_vals": x_vals,
        "bases": [(v, b) for v, b in ((x, x_base), (w_dev, w_base), (ids_dev, ids_base), (out, out_base))
                  if b is not None],
    }


def _run(inp: dict, backend: str) -> torch.Tensor:
    return moe.fused_experts(**inp["call"], **inp["kwargs"], backend=backend)


def _bad_map_is_remote(c: Call, inp: dict, backend: str, device: str) -> None:
    """Past the value check (which refuses the call on CPU), the backend itself treats an out-of-range local
    id as remote: the ``Backend.apply`` contract, called directly as on a GPU without validation mode."""
    call, kw = inp["call"], inp["kwargs"]
    problem = moe.ExpertsProblem(
        device, DTYPES[c.dtype], c.T, call["w13"].shape[0], c.E, c.K, c.N, c.k,
        activation=moe.ActivationSpec.parse(c.activation), has_w13_bias=c.bias, has_w2_bias=c.bias,
        has_expert_map=True, apply_router_weight_on_input=c.on_input)
    impl = moe.get_backend(backend)
    if c.T == 0 or not impl.supports(problem)[0]:
        return
    args = moe.ExpertsArgs(**call, w13_bias=kw["w13_bias"], w2_bias=kw["w2_bias"], expert_map=kw["expert_map"])
    out = torch.full((c.T, c.K), NAN, dtype=problem.dtype, device=device)
    impl.apply(args, problem, out)
    what = f"{backend} {c} (apply, map values out of range)"
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    ref = experts_float64(*inp["oracle"], expert_map=inp["oracle_map"])
    check_close(out, ref, magnitude64(*inp["oracle"], expert_map=inp["oracle_map"]), problem.dtype, what)


def check_fused_experts(case: Call, backend: str, device: str, avoid_known_bugs: bool = True) -> None:
    c = _fit(case, backend, device, avoid_known_bugs)
    what = f"{backend} {c}"
    dtype = DTYPES[c.dtype]
    inp = build(c, device)
    if c.emap == "out_of_range":
        if device == "cpu":  # the value checks always run on CPU tensors
            with pytest.raises(ValueError, match=r"^expert_map: values must be -1 \(another rank\) or a local id"):
                _run(inp, backend)
            _event("refused: expert_map values")
            _bad_map_is_remote(c, inp, backend, device)
            return
        with moe.validation(), pytest.raises(ValueError, match=r"^expert_map: values must be -1"):
            _run(inp, backend)
        # without validation mode the kernels treat an out-of-range local id as remote
    want_refusal = _refusal(backend, dtype, c.K, c.N, device)
    try:
        got = _run(inp, backend)
    except moe.BackendUnavailableError as err:
        _check_refusal(err, backend, want_refusal, device, what)
        _event("backend refused")
        return
    _event("ran" if c.T else "ran (no token)")
    assert want_refusal is None or device == "cuda" or backend not in ("triton", "torch_grouped"), \
        f"{what}: expected a refusal naming {want_refusal}"
    decision = moe.last_decision()
    assert decision is not None and decision.chosen == backend, f"{what}: ran {decision}"
    out = inp["kwargs"]["out"]
    if out is not None:
        assert got is out, f"{what}: fused_experts did not return the out tensor it was given"
    assert got.shape == (c.T, c.K) and got.dtype == dtype and got.device.type == device, what
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    ref = experts_float64(*inp["oracle"], expert_map=inp["oracle_map"])
    check_close(got, ref, magnitude64(*inp["oracle"], expert_map=inp["oracle_map"]), dtype, what)
    if c.out_layout != "alias":  # the input is read, never written
        assert torch.equal(inp["call"]["hidden_states"].cpu(), inp["x_vals"]), f"{what}: hidden_states changed"
    for view, base in inp["bases"]:  # nothing outside the views is touched (padding keeps its fill)
        rest = _outside(view, base).cpu()
        filled = torch.isnan(rest) if rest.is_floating_point() else rest == -7
        assert filled.all(), f"{what}: wrote outside a {tuple(view.shape)} view with strides {view.stride()}"
    if c.emap == "all_remote":
        assert not got.any(), f"{what}: every expert is remote, yet the output is not 0"
    if c.routing == "dead" and c.T and not (c.on_input and c.bias):  # on_input: the biases still add
        assert not got[0].any(), f"{what}: a fully masked token has a non-zero routed output"


_FE_EXAMPLES = (
    # finding 1: transposed hidden_states; transposed or column-strided out
    Call(T=9, E=8, K=32, N=24, k=2, x_layout="transposed"),
    Call(T=9, E=8, K=32, N=24, k=2, dtype="bfloat16", x_layout="transposed", out_layout="transposed", bias=True),
    Call(T=9, E=8, K=32, N=24, k=2, dtype="bfloat16", out_layout="strided", bias=True),
    Call(T=9, E=8, K=32, N=24, k=2, out_layout="alias", x_layout="transposed"),
    # finding 2: expert_map values out of range (CPU: refused naming expert_map; GPU: treated as remote)
    Call(T=9, E=8, K=32, N=24, k=2, emap="out_of_range", local=4, seed=0),
    Call(T=9, E=8, K=32, N=24, k=2, emap="out_of_range", local=4, seed=1),
    Call(T=9, E=8, K=32, N=24, k=2, emap="all_remote", local=2),
    Call(T=9, E=8, K=32, N=24, k=2, emap="valid", local=3),
    # finding 3: an all -inf router row routes nowhere (weights 0, ids 0..k-1): its routed output is 0
    Call(T=4, E=8, K=16, N=8, k=3, routing="dead", bias=True),
    # shapes at the edges: no token; K and N that are not multiples of 16 (torch_grouped refuses: alignment)
    Call(T=0, E=8, K=32, N=24, k=2, out_layout="contiguous"),
    Call(T=7, E=5, K=33, N=17, k=3, probe=True, activation="swigluoai"),
    Call(T=3, E=4, K=16, N=8, k=2, dtype="float64", probe=True),
    Call(T=5, E=6, K=16, N=8, k=1, on_input=True, x_layout="expanded", topk_layout="transposed"),
)


@pytest.mark.parametrize("backend", BACKENDS)
@CPU
@given(case=calls())
@_examples(*_FE_EXAMPLES)
def test_fused_experts(backend, case):
    check_fused_experts(case, backend, "cpu")


@pytest.mark.gpu
@_NO_TUNING_WARNINGS
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@GPU
@given(case=calls())
@_examples(*_FE_EXAMPLES)
def test_fused_experts_gpu(backend, case):
    check_fused_experts(case, backend, "cuda")


# ---------------------------------------------------------------------------------------- invalid calls
_VALUE_BAD = ("ids_high", "ids_negative", "weights_nan", "weights_inf", "map_high", "map_low")
_META_BAD = ("ids_float", "ids_1d", "ids_rows", "weights_int", "weights_shape", "hidden_int", "hidden_3d",
             "hidden_list", "hidden_dtype", "w13_hidden", "w13_rows", "w13_2d", "w13_list", "w2_transposed",
             "w2_experts", "w2_dtype", "out_shape", "out_dtype", "out_list", "map_2d", "map_float", "b13_shape",
             "b2_dtype", "top_k_big", "on_input_k2", "activation_unknown", "activation_type", "backend_unknown")


@dataclasses.dataclass(frozen=True)
class Bad:
    """A legal call (``base``) with one thing made wrong (``what``)."""

    base: Call
    what: str
    at: int = 0  # which element a value corruption hits


@st.composite
def bad_calls(draw) -> Bad:
    T, E = draw(_pick(1, 9)), draw(_pick(1, 9))
    k = draw(_pick(1, min(E, 4)))
    emap = draw(st.sampled_from(["none", "valid"]))
    base = Call(T=T, E=E, K=draw(_pick(1, 24)), N=draw(_pick(1, 24)), k=k,
                dtype=draw(st.sampled_from(["float32", "bfloat16", "float16"])),
                activation=draw(st.sampled_from(ACTIVATIONS)), bias=draw(st.booleans()),
                x_layout=draw(st.sampled_from(["contiguous", "transposed"])),
                out_layout=draw(st.sampled_from(["none", "contiguous", "strided"])),
                topk_layout=draw(st.sampled_from(["contiguous", "transposed"])),
                ids_dtype=draw(st.sampled_from(["int32", "int64"])), emap=emap,
                local=draw(_pick(1, E)) if emap == "valid" else 0, seed=draw(_SEEDS))
    choices = [w for w in _VALUE_BAD + _META_BAD if not (w == "on_input_k2" and k == 1)]
    return Bad(base, draw(st.sampled_from(choices)), draw(_SEEDS))


def _corrupt(b: Bad, inp: dict, device: str) -> tuple[dict, dict, str | None, type | tuple, str]:
    """(call, kwargs, backend override, expected error types, the parameter the message must name)."""
    call, kw = dict(inp["call"]), dict(inp["kwargs"])
    c, w = b.base, b.what
    x, w13, w2, weights, ids = (call[n] for n in ("hidden_states", "w13", "w2", "topk_weights", "topk_ids"))
    T, k = ids.shape
    t, j = b.at % T, (b.at // T) % k
    other = torch.float32 if x.dtype != torch.float32 else torch.bfloat16
    num_local = w13.shape[0]
    emap = kw["expert_map"] if kw["expert_map"] is not None else torch.arange(c.E, device=device)
    backend = None
    if w in ("ids_high", "ids_negative"):
        ids = ids.clone()
        ids[t, j] = c.E + b.at % 3 if w == "ids_high" else -1 - b.at % 3
        call["topk_ids"], name, err = ids, "topk_ids", ValueError
    elif w in ("weights_nan", "weights_inf"):
        weights = weights.clone()
        weights[t, j] = NAN if w == "weights_nan" else (INF if b.at % 2 else -INF)
        call["topk_weights"], name, err = weights, "topk_weights", ValueError
    elif w in ("map_high", "map_low"):
        emap = emap.clone()
        emap[b.at % c.E] = num_local + b.at % 3 if w == "map_high" else -2 - b.at % 3
        kw["expert_map"], name, err = emap, "expert_map", ValueError
    elif w == "ids_float":
        call["topk_ids"], name, err = ids.float(), "topk_ids", TypeError
    elif w == "ids_1d":
        call["topk_ids"], name, err = ids.reshape(-1), "topk_ids", ValueError
    elif w == "ids_rows":
        call["topk_ids"] = torch.cat([ids, ids[:1]])
        call["topk_weights"], name, err = torch.cat([weights, weights[:1]]), "topk_ids", ValueError
    elif w == "weights_int":
        call["topk_weights"], name, err = weights.long(), "topk_weights", TypeError
    elif w == "weights_shape":
        call["topk_weights"], name, err = torch.cat([weights, weights[:, :1]], 1), "topk_weights", ValueError
    elif w == "hidden_int":
        call["hidden_states"], name, err = x.to(torch.int32), "hidden_states", TypeError
    elif w == "hidden_3d":
        call["hidden_states"], name, err = x.unsqueeze(0), "hidden_states", ValueError
    elif w == "hidden_list":
        call["hidden_states"], name, err = x.tolist(), "hidden_states", TypeError
    elif w == "hidden_dtype":  # the weights and the activations disagree: the message names w13
        call["hidden_states"], name, err = x.to(other), "w13", TypeError
    elif w == "w13_hidden":
        call["w13"], name, err = torch.cat([w13, w13[:, :, :1]], 2), "w13", ValueError
    elif w == "w13_rows":
        call["w13"], name, err = torch.cat([w13, w13[:, :1]], 1), "w13", ValueError
    elif w == "w13_2d":
        call["w13"], name, err = w13[0], "w13", ValueError
    elif w == "w13_list":
        call["w13"], name, err = w13.tolist(), "w13", TypeError
    elif w == "w2_transposed":
        call["w2"] = w2.transpose(1, 2) if c.K != c.N else torch.cat([w2, w2[:, :1]], 1)
        name, err = "w2", ValueError
    elif w == "w2_experts":
        call["w2"], name, err = torch.cat([w2, w2[:1]]), "w2", ValueError
    elif w == "w2_dtype":
        call["w2"], name, err = w2.to(other), "w2", TypeError
    elif w == "out_shape":
        kw["out"], name, err = torch.empty(T, c.K + 1, dtype=x.dtype, device=device), "out", ValueError
    elif w == "out_dtype":
        kw["out"], name, err = torch.empty(T, c.K, dtype=other, device=device), "out", ValueError
    elif w == "out_list":
        kw["out"], name, err = [[0.0] * c.K] * T, "out", ValueError
    elif w == "map_2d":
        kw["expert_map"], name, err = emap.view(1, -1), "expert_map", ValueError
    elif w == "map_float":
        kw["expert_map"], name, err = emap.float(), "expert_map", TypeError
    elif w == "b13_shape":
        b = torch.zeros(num_local, w13.shape[1] + 1, dtype=x.dtype, device=device)
        kw["w13_bias"], name, err = b, "w13_bias", ValueError
    elif w == "b2_dtype":
        kw["w2_bias"], name, err = torch.zeros(num_local, c.K, dtype=other, device=device), "w2_bias", TypeError
    elif w == "top_k_big":  # more slots than (global) experts
        n = c.E + 1
        call["topk_ids"] = torch.arange(n, device=device).repeat(T, 1) % c.E
        call["topk_weights"], name, err = torch.full((T, n), 1 / n, device=device), "top_k", ValueError
    elif w == "on_input_k2":
        kw["apply_router_weight_on_input"], name, err = True, "apply_router_weight_on_input", ValueError
    elif w == "activation_unknown":
        kw["activation"], name, err = "swish", "activation", ValueError
    elif w == "activation_type":
        kw["activation"], name, err = 3, "activation", TypeError
    elif w == "backend_unknown":
        backend, name, err = "nope", "backend", ValueError
    else:
        raise AssertionError(f"unknown corruption {w!r}")
    return call, kw, backend, err, name


def check_invalid(case: Bad, backend: str, device: str) -> None:
    b = dataclasses.replace(case, base=_fit(case.base, backend, device))
    call, kw, override, err, name = _corrupt(b, build(b.base, device), device)
    what = f"{backend} {b}"
    validate = device == "cpu" or b.what in _VALUE_BAD  # on a GPU the value checks need validation mode
    with moe.validation(validate):
        try:
            moe.fused_experts(**call, **kw, backend=override or backend)
        except _ERRORS as exc:
            msg = str(exc)
            assert isinstance(exc, err), f"{what}: raised {type(exc).__name__} (expected {err.__name__}): {msg}"
            assert re.match(rf"{name}\b", msg), f"{what}: the error does not start with {name!r}: {msg}"
            return
        except Exception as exc:  # a crash: a kernel's RuntimeError, an IndexError, ...
            raise AssertionError(f"{what}: crashed with {type(exc).__name__}: {exc}") from exc
    raise AssertionError(f"{what}: an invalid call ({b.what}) returned a result")


_BAD_EXAMPLES = (
    # finding 3: NaN (and infinite) routing weights are refused, naming topk_weights
    Bad(Call(T=9, E=8, K=32, N=24, k=2), "weights_nan", at=3 + 9),
    Bad(Call(T=9, E=8, K=32, N=24, k=2), "weights_inf", at=5),
    # finding 2: expert_map values out of range (7 with 4 local experts; below -1)
    Bad(Call(T=9, E=8, K=32, N=24, k=2, emap="valid", local=4), "map_high", at=2),
    Bad(Call(T=9, E=8, K=32, N=24, k=2, emap="valid", local=4), "map_low", at=4),
    Bad(Call(T=9, E=8, K=32, N=24, k=2), "ids_high", at=0),
    Bad(Call(T=9, E=8, K=32, N=24, k=2), "w2_transposed"),
)


@pytest.mark.parametrize("backend", BACKENDS)
@CPU
@given(case=bad_calls())
@_examples(*_BAD_EXAMPLES)
def test_invalid_calls_name_the_parameter(backend, case):
    check_invalid(case, backend, "cpu")


@pytest.mark.gpu
@_NO_TUNING_WARNINGS
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@GPU
@given(case=bad_calls())
@_examples(*_BAD_EXAMPLES)
def test_invalid_calls_name_the_parameter_gpu(backend, case):
    check_invalid(case, backend, "cuda")


# ================================================================================================= routing
@dataclasses.dataclass(frozen=True)
class Route:
    """One routing call: logits [T, E] in ``dtype`` and ``layout``; ``kind`` says what the logits hold."""

    T: int
    E: int
    k: int
    method: str = "fused_topk"  # fused_topk | topk_softmax | grouped_topk | custom (route only)
    scoring: str = "softmax"
    renormalize: bool = True
    groups: int = 1
    topk_group: int = 1
    bias: bool = False
    bias_strided: bool = False  # e_score_correction_bias as every other element of a bigger tensor
    scale: float = 1.0
    dtype: str = "float32"
    layout: str = "contiguous"  # contiguous | transposed | rows | cols
    kind: str = "random"  # random | ties | masked | dead | nan | posinf | top_k | groups
    seed: int = 0


@st.composite
def routes(draw) -> Route:
    T, E = draw(_pick(0, 9)), draw(_EXPERTS)
    method = draw(st.sampled_from(["fused_topk", "topk_softmax", "grouped_topk", "custom"]))
    groups, topk_group, bias, cap = 1, 1, False, E
    if method == "grouped_topk":
        groups = draw(st.sampled_from([d for d in range(1, E + 1) if E % d == 0]))
        topk_group = draw(_pick(1, groups))
        bias = E // groups >= 2 and draw(st.booleans())
        cap = topk_group * (E // groups)
    kinds = ["random", "ties", "masked", "dead", "random", "ties", "masked", "dead", "nan", "posinf", "top_k"]
    if method == "grouped_topk":
        kinds.append("groups")
    return Route(
        T=T, E=E, k=draw(_pick(1, min(cap, 4))), method=method,
        scoring="softmax" if method == "topk_softmax" else draw(st.sampled_from(["softmax", "sigmoid"])),
        renormalize=draw(st.booleans()), groups=groups, topk_group=topk_group, bias=bias,
        bias_strided=bias and draw(st.booleans()), scale=draw(st.sampled_from([1.0, 2.5])) if method != "custom" else 1.0,
        dtype=draw(st.sampled_from(list(DTYPES))), layout=draw(st.sampled_from(["contiguous", "transposed", "rows",
                                                                                 "cols"])),
        kind=draw(st.sampled_from(kinds)), seed=draw(_SEEDS),
    )


def _sig(v: float) -> float:
    return 0.0 if v == -INF else 1 / (1 + math.exp(-v))


def _soft(row: list[float]) -> list[float]:
    m = max(row)
    if m == -INF:  # a fully masked token scores 0 everywhere
        return [0.0] * len(row)
    ex = [math.exp(v - m) for v in row]
    return [e / sum(ex) for e in ex]


def _order(vals: list[float]) -> list[int]:
    """Indices by descending value, ties to the lower index."""
    return sorted(range(len(vals)), key=lambda i: (-vals[i], i))


def route64(r: Route, logits: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 oracle: plain Python over the rows."""
    out_w, out_ids = [], []
    e = r.E
    for row in logits.double().tolist():
        if r.method == "topk_softmax":
            top = _order(row)[:r.k]
            w = _soft([row[i] for i in top])
        else:
            s = _soft(row) if r.scoring == "softmax" else [_sig(v) for v in row]
            if r.method == "grouped_topk":
                c = [s[i] + (float(bias[i]) if bias is not None else 0.0) for i in range(e)]
                per = e // r.groups
                gscore = []
                for grp in range(r.groups):
                    vals = sorted(c[grp * per:(grp + 1) * per], reverse=True)
                    gscore.append(vals[0] + vals[1] if bias is not None else vals[0])
                keep = set(_order(gscore)[:r.topk_group])
                cand = [c[i] if i // per in keep else -INF for i in range(e)]
                top = _order(cand)[:r.k] if max(row) > -INF else list(range(r.k))
            else:
                top = _order(s)[:r.k]
            w = [s[i] for i in top]
            if r.renormalize and sum(w) != 0:
                w = [v / sum(w) for v in w]
        out_w.append([v * r.scale for v in w])
        out_ids.append(top)
    return (torch.tensor(out_w, dtype=torch.float64).reshape(-1, r.k),
            torch.tensor(out_ids, dtype=torch.int64).reshape(-1, r.k))


def _config(r: Route) -> moe.RoutingConfig:
    method = {"fused_topk": "topk", "topk_softmax": "topk_then_softmax"}.get(r.method, r.method)
    kw = {"scoring": r.scoring} if r.method != "topk_softmax" else {}
    if r.method == "grouped_topk":
        kw.update(num_expert_group=r.groups, topk_group=r.topk_group, use_correction_bias=r.bias)
    return moe.RoutingConfig(method=method, renormalize=r.renormalize, routed_scaling_factor=r.scale, **kw)


def _triton_routing():
    try:
        import moe.routing.triton as kernels
    except ImportError:  # no triton: the kernels are not part of this run
        return None
    return kernels


def _routing_impls(r: Route, logits: torch.Tensor, bias: torch.Tensor | None, k: int, groups: int) -> dict:
    """name -> a function computing (weights, ids) for this case, scaled by ``r.scale``."""
    from moe.routing import reference as ref

    def scaled(f):
        def call():
            w, ids = f()
            return w * r.scale, ids
        return call

    cpu = logits.cpu()
    grouped = {"num_expert_group": groups, "topk_group": r.topk_group, "renormalize": r.renormalize,
               "scoring": r.scoring, "e_score_correction_bias": bias, "routed_scaling_factor": r.scale}
    kernels = _triton_routing()
    impls = {}
    if r.method in ("fused_topk", "custom"):
        impls["reference"] = scaled(lambda: ref.fused_topk_ref(cpu, k, renormalize=r.renormalize, scoring=r.scoring))
        impls["public"] = scaled(lambda: moe.fused_topk(logits, k, renormalize=r.renormalize, scoring=r.scoring))
        if kernels is not None:
            impls["kernel"] = lambda: kernels.fused_topk(logits, k, renormalize=r.renormalize, scoring=r.scoring,
                                                         routed_scaling_factor=r.scale)
    elif r.method == "topk_softmax":
        impls["reference"] = scaled(lambda: ref.topk_softmax_ref(cpu, k))
        impls["public"] = scaled(lambda: moe.topk_softmax(logits, k))
        if kernels is not None:
            impls["kernel"] = lambda: kernels.topk_softmax(logits, k, routed_scaling_factor=r.scale)
    else:
        cpu_bias = bias.cpu() if bias is not None else None
        impls["reference"] = lambda: ref.grouped_topk_ref(cpu, k, **{**grouped, "e_score_correction_bias": cpu_bias})
        impls["public"] = lambda: moe.grouped_topk(logits, k, **grouped)
        if kernels is not None:
            impls["kernel"] = lambda: kernels.grouped_topk(logits, k, **grouped)
    if r.method == "custom":
        config = moe.RoutingConfig(method="custom")
        impls["route"] = lambda: moe.route(logits, k, config, hidden_states=logits.new_zeros(logits.shape[0], 1),
                                           custom_routing_function=lambda h, lg, kk: ref.fused_topk_ref(
                                               lg, kk, renormalize=r.renormalize, scoring=r.scoring))
    else:
        config = _config(r)
        impls["route"] = lambda: moe.route(logits, k, config, e_score_correction_bias=bias)
    return impls


def check_routing(r: Route, device: str) -> None:
    g = torch.Generator().manual_seed(r.seed)
    dtype = DTYPES[r.dtype]
    values = _grid(g, (r.T, r.E), coarse=r.kind == "ties")
    values = _mask_logits(values, r.kind, g)
    if r.kind in ("nan", "posinf") and r.T:
        values[r.seed % r.T, r.seed % r.E] = NAN if r.kind == "nan" else INF
    values = values.to(dtype)
    logits, _ = _place(values, r.layout, device, NAN)
    bias = (torch.randn(r.E, generator=g) * 0.1).to(device) if r.bias else None
    if bias is not None and r.bias_strided:
        bias = torch.stack([bias, torch.full_like(bias, NAN)], dim=1)[:, 0]
    k = r.E + 1 if r.kind == "top_k" else r.k
    groups = r.E + 1 if r.kind == "groups" else r.groups
    impls = _routing_impls(r, logits, bias, k, groups)
    what = f"{r}"
    poisoned = r.kind in ("nan", "posinf") and r.T > 0
    if poisoned or r.kind in ("top_k", "groups"):
        name = {"top_k": "top_k", "groups": "num_expert_group"}.get(r.kind, "router_logits")
        for impl, call in impls.items():
            if r.kind == "groups" and impl == "route":
                continue  # a RoutingConfig cannot hold these groups: it is refused where it is built
            with moe.validation():
                try:
                    call()
                except ValueError as exc:
                    assert name in str(exc), f"{what} {impl}: the error does not name {name!r}: {exc}"
                    continue
                except Exception as exc:
                    raise AssertionError(f"{what} {impl}: crashed with {type(exc).__name__}: {exc}") from exc
            raise AssertionError(f"{what} {impl}: invalid routing ({r.kind}) returned a result")
        return
    ref_w, ref_ids = impls["reference"]()
    oracle_w, oracle_ids = route64(r, values, bias.cpu() if bias is not None else None)
    assert torch.equal(ref_ids.long(), oracle_ids), f"{what}: reference ids {ref_ids.tolist()} != {oracle_ids.tolist()}"
    torch.testing.assert_close(ref_w.double(), oracle_w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")
    dead = torch.isneginf(values).all(dim=-1)
    masked = torch.isneginf(values.double()).gather(1, ref_ids.long())
    for impl, call in impls.items():
        w, ids = call()
        msg = f"{what} {impl}"
        assert w.shape == (r.T, r.k) and ids.shape == (r.T, r.k), msg
        assert w.dtype == torch.float32 and ids.dtype == torch.int32, f"{msg}: {w.dtype}, {ids.dtype}"
        assert w.device.type == (device if impl != "reference" else "cpu"), msg
        w, ids = w.cpu(), ids.cpu()
        assert torch.equal(ids.long(), ref_ids.long()), f"{msg}: ids {ids.tolist()} != reference {ref_ids.tolist()}"
        torch.testing.assert_close(w.double(), ref_w.double(), rtol=1e-5, atol=1e-6, msg=lambda m, s=msg: f"{s}: {m}")
        assert torch.isfinite(w).all(), f"{msg}: non-finite weights {w}"
        assert ((w >= 0) & (w <= r.scale * (1 + 1e-6))).all(), f"{msg}: weights outside [0, {r.scale}]: {w}"
        assert ((ids >= 0) & (ids < r.E)).all(), f"{msg}: ids out of range: {ids}"
        assert (ids.sort(dim=-1).values.diff(dim=-1) > 0).all(), f"{msg}: repeated ids in a row: {ids}"
        assert (w[dead] == 0).all() and (ids[dead] == torch.arange(r.k)).all(), \
            f"{msg}: a fully masked token must get weights 0 and ids 0..k-1: {w[dead]}, {ids[dead]}"
        assert (w[masked] == 0).all(), f"{msg}: a masked (-inf) expert was picked with a non-zero weight"
        if r.renormalize or r.method == "topk_softmax":
            sums = w.double().sum(dim=-1)
            ok = ((sums - r.scale).abs() <= 1e-5 * r.scale) | (sums == 0)
            assert ok.all() and (sums[dead] == 0).all(), f"{msg}: renormalized rows sum to {sums}"


_ROUTE_EXAMPLES = (
    # finding 3: a fully masked token gets weights 0 and ids 0..k-1 (softmax, sigmoid, topk_softmax, grouped+bias)
    Route(T=4, E=8, k=3, kind="dead"),
    Route(T=4, E=8, k=3, kind="dead", scoring="sigmoid"),
    Route(T=4, E=8, k=3, kind="dead", method="topk_softmax"),
    Route(T=4, E=8, k=3, kind="dead", method="grouped_topk", groups=4, topk_group=2, bias=True),
    Route(T=4, E=8, k=3, kind="dead", method="grouped_topk", groups=4, topk_group=2, bias=True, scoring="sigmoid",
          renormalize=False, scale=2.5),
    # ties go to the lower index; fewer unmasked experts than k
    Route(T=9, E=9, k=4, kind="ties", dtype="bfloat16", layout="transposed"),
    Route(T=9, E=8, k=4, kind="ties", method="grouped_topk", groups=4, topk_group=2),
    Route(T=9, E=5, k=4, kind="masked", method="topk_softmax", dtype="float16", layout="cols"),
    Route(T=3, E=8, k=2, kind="nan"),
    Route(T=0, E=8, k=2),
)


@CPU
@given(case=routes())
@_examples(*_ROUTE_EXAMPLES)
def test_routing(case):
    check_routing(case, "cpu")


@pytest.mark.gpu
@_NO_TUNING_WARNINGS
@GPU
@given(case=routes())
@_examples(*_ROUTE_EXAMPLES)
def test_routing_gpu(case):
    check_routing(case, "cuda")


# ================================================================================================ FusedMoE
@dataclasses.dataclass(frozen=True)
class Layer:
    """One ``FusedMoE(gate=False)`` forward: input ``shape`` (T,) or (B, S) tokens of hidden size K."""

    shape: tuple[int, ...]
    E: int
    k: int
    K: int
    N: int
    dtype: str = "float32"
    activation: str = "silu"
    bias: bool = False
    method: str = "topk"  # topk | topk_then_softmax | grouped_topk
    scoring: str = "softmax"
    renormalize: bool = True
    groups: int = 1
    topk_group: int = 1
    correction_bias: bool = False
    scale: float = 1.0
    shared: str = "none"  # none | mlp | gated (with a shared-expert gate)
    shared_N: int = 8
    local: int = 0  # with an expert map: the number of held experts (0: no map)
    x_layout: str = "contiguous"  # contiguous | transposed (2-D input only)
    logits: str = "random"  # random | ties | masked | dead
    probe: bool = False
    seed: int = 0


@st.composite
def layers(draw) -> Layer:
    E = draw(st.sampled_from([*range(1, 10), 16]))
    shape = draw(st.one_of(st.tuples(_pick(0, 9)), st.tuples(_pick(1, 3), _pick(1, 3))))
    method = draw(st.sampled_from(["topk", "topk_then_softmax", "grouped_topk"]))
    groups, topk_group, cb, cap = 1, 1, False, E
    if method == "grouped_topk":
        groups = draw(st.sampled_from([d for d in range(1, E + 1) if E % d == 0]))
        topk_group = draw(_pick(1, groups))
        cb = E // groups >= 2 and draw(st.booleans())
        cap = topk_group * (E // groups)
    return Layer(
        shape=shape, E=E, k=draw(_pick(1, min(cap, 4))), K=draw(_DIMS), N=draw(_DIMS),
        dtype=draw(st.sampled_from(["float32", "bfloat16", "float16"])), activation=draw(st.sampled_from(ACTIVATIONS)),
        bias=draw(st.booleans()), method=method,
        scoring="softmax" if method == "topk_then_softmax" else draw(st.sampled_from(["softmax", "sigmoid"])),
        renormalize=draw(st.booleans()), groups=groups, topk_group=topk_group, correction_bias=cb,
        scale=draw(st.sampled_from([1.0, 2.5])), shared=draw(st.sampled_from(["none", "mlp", "gated"])),
        shared_N=draw(_pick(1, 16)), local=draw(_pick(1, E)) if draw(st.sampled_from([False, False, True])) else 0,
        x_layout=draw(st.sampled_from(["contiguous", "transposed"])) if len(shape) == 1 else "contiguous",
        logits=draw(st.sampled_from(["random", "ties", "masked", "dead"])), probe=draw(_PROBE),
        seed=draw(_SEEDS),
    )


def check_layer(case: Layer, backend: str, device: str) -> None:
    c = _fit(case, backend, device)
    what = f"{backend} {c}"
    dtype = DTYPES[c.dtype]
    g = torch.Generator().manual_seed(c.seed)
    routing = moe.RoutingConfig(
        method=c.method, renormalize=c.renormalize, routed_scaling_factor=c.scale,
        **({"scoring": c.scoring} if c.method != "topk_then_softmax" else {}),
        **({"num_expert_group": c.groups, "topk_group": c.topk_group, "use_correction_bias": c.correction_bias}
           if c.method == "grouped_topk" else {}),
    )
    emap = None
    if c.local:
        emap = torch.full((c.E,), -1, dtype=torch.int64)
        emap[torch.randperm(c.E, generator=g)[:c.local]] = torch.randperm(c.local, generator=g)
    shared = moe.GatedMLP(c.K, c.shared_N, c.activation, bias=c.bias, dtype=dtype, device=device) \
        if c.shared != "none" else None
    layer = moe.FusedMoE(c.E, c.k, c.K, c.N, routing=routing, activation=c.activation, bias=c.bias, params_dtype=dtype,
                         device=device, backend=backend, gate=False, shared_experts=shared,
                         shared_expert_gate=c.shared == "gated", expert_map=emap)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            scale = 1 / p.shape[-1] ** 0.5 if p.dim() >= 2 else 0.1
            if name == "w13_weight" and c.activation == "swigluoai":
                scale *= 4.0
            p.copy_(_fill(g, tuple(p.shape), scale, p.dtype))
    tokens = math.prod(c.shape)
    x_vals = _fill(g, (tokens, c.K), 1.0, dtype)
    if c.x_layout == "transposed":
        x, _ = _place(x_vals, "transposed", device, NAN)
    else:
        x = x_vals.to(device).reshape(*c.shape, c.K)
    logits = _mask_logits(_grid(g, (tokens, c.E), coarse=c.logits == "ties"), c.logits, g)
    logits_in = logits.to(device).reshape(*c.shape, c.E)
    with torch.no_grad():
        try:
            y = layer(x, logits_in)
        except moe.BackendUnavailableError as err:
            _check_refusal(err, backend, _refusal(backend, dtype, c.K, c.N, device), device, what)
            _event("backend refused")
            return
        _event("ran" if tokens else "ran (no token)")
        assert _refusal(backend, dtype, c.K, c.N, device) is None or device == "cuda", f"{what}: expected a refusal"
        decision = moe.last_decision()
        assert decision is not None and decision.chosen == backend, f"{what}: ran {decision}"
        assert y.shape == x.shape and y.dtype == dtype, f"{what}: {tuple(y.shape)} {y.dtype}"
        assert torch.isfinite(y).all(), f"{what}: non-finite output"
        flat = x.reshape(-1, c.K)
        weights, ids = moe.route(logits.to(device), c.k, routing, e_score_correction_bias=layer.e_score_correction_bias)
        routed = moe.fused_experts(flat, layer.w13_weight, layer.w2_weight, weights, ids, activation=c.activation,
                                   w13_bias=layer.w13_bias, w2_bias=layer.w2_bias, expert_map=layer.expert_map,
                                   backend=backend)
        extra = torch.zeros_like(routed)
        if shared is not None:
            extra = shared(flat)
            if layer.shared_expert_gate is not None:
                extra = torch.sigmoid(layer.shared_expert_gate(flat)) * extra
        assert torch.equal(y.reshape(-1, c.K), routed + extra), f"{what}: forward != fused_experts + shared experts"
        oracle = (x_vals, layer.w13_weight, layer.w2_weight, weights, ids, c.activation, layer.w13_bias,
                  layer.w2_bias)
        ref = experts_float64(*oracle, expert_map=layer.expert_map)
        check_close(routed, ref, magnitude64(*oracle, expert_map=layer.expert_map), dtype, what)
        dead = torch.isneginf(logits).all(dim=-1).to(device)
        assert torch.equal(y.reshape(-1, c.K)[dead], extra[dead]), \
            f"{what}: a token with all -inf logits must get the shared experts' output alone"


_LAYER_EXAMPLES = (
    # finding 3: a row of -inf logits gives the shared experts' output alone
    Layer(shape=(4,), E=8, k=2, K=16, N=8, logits="dead", shared="mlp"),
    Layer(shape=(2, 3), E=8, k=2, K=16, N=8, logits="dead", shared="gated", method="grouped_topk", groups=4,
          topk_group=2, correction_bias=True),
    # finding 1: a transposed input to the layer
    Layer(shape=(6,), E=8, k=2, K=32, N=24, x_layout="transposed"),
    Layer(shape=(2, 0), E=4, k=2, K=16, N=8, shared="mlp", local=2),
)


@pytest.mark.parametrize("backend", BACKENDS)
@CPU
@given(case=layers())
@_examples(*_LAYER_EXAMPLES)
def test_fused_moe(backend, case):
    check_layer(case, backend, "cpu")


@pytest.mark.gpu
@_NO_TUNING_WARNINGS
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@GPU
@given(case=layers())
@_examples(*_LAYER_EXAMPLES)
def test_fused_moe_gpu(backend, case):
    check_layer(case, backend, "cuda")


# ============================================================================== found by this suite, fixed
# Each: the explicit case that failed, checked by the property function.
@pytest.mark.parametrize("backend", ["triton", "torch_grouped"])
def test_strided_expert_map(backend):
    """A non-contiguous expert_map (buf[::2]) used to be indexed as if contiguous by the kernels."""
    case = Call(T=4, E=4, K=16, N=8, k=2, emap="valid", local=2, map_layout="strided")
    check_fused_experts(case, backend, "cpu", avoid_known_bugs=False)


@pytest.mark.parametrize("bias_layout", ["transposed", "strided"])
def test_non_contiguous_bias(bias_layout):
    """triton used to read w13_bias/w2_bias with a unit column stride."""
    case = Call(T=5, E=4, K=16, N=8, k=2, bias=True, bias_layout=bias_layout)
    check_fused_experts(case, "triton", "cpu", avoid_known_bugs=False)


def test_unaligned_weight_strides():
    """torch_grouped used to pass weights whose row strides are not 16-byte aligned (a column slice) to
    torch._grouped_mm, which crashed."""
    case = Call(T=5, E=4, K=16, N=8, k=2, w_layout="sliced")
    check_fused_experts(case, "torch_grouped", "cpu", avoid_known_bugs=False)


def test_empty_expert_map_names_expert_map():
    """An empty expert_map used to be blamed on top_k."""
    inp = build(Call(T=3, E=4, K=16, N=8, k=2), "cpu")
    with pytest.raises(ValueError, match=r"^expert_map: empty"):
        moe.fused_experts(**inp["call"], **{**inp["kwargs"], "expert_map": torch.empty(0, dtype=torch.int32)},
                          backend="torch")
