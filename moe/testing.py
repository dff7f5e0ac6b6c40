"""Testing tools: the one tolerance table, the float64 oracle, and the parity helper for backend authors.

    report = moe.testing.check_backend("my_backend")   # raises AssertionError listing every failing case
    print(report)                                        # passed / skipped (with supports() reasons)

``check_backend`` runs the project's parity cases (odd and zero-sized shapes, every activation, biases,
expert maps, transposed inputs and strided outputs, the ``scaled`` quantization scheme) on a named backend:
fresh random inputs, a NaN-poisoned ``out``, the float64 oracle, and the decision trace (the backend that
was asked for is the one that ran). Cases the backend's ``supports()`` refuses are skipped with its
reason. The project's own parity matrix (tests/test_parity.py) calls the same functions for every
registered backend.

Tolerances are norm-relative against the float64 oracle, ``||out - ref|| / ||ref||``, one row per
(dtype, quantization scheme). Rows and why (measured on the parity cases, CPU and H200):
- float32 1e-5: fp32 accumulation measures 1e-7 to 3e-7 (reference, Triton, torch_grouped); 1e-5 leaves
  headroom for GPU reduction orders at large K without hiding a wrong term (a dropped bias or slot
  moves the error to 1e-2 or more).
- bfloat16 1e-2: bf16 keeps 8 mantissa bits (unit roundoff 3.9e-3); inputs, the activated intermediate
  and the output are each rounded once, which measures 1.8e-3 to 5e-3 (CPU and H200, T up to 16385).
- float16 2e-3: 11 mantissa bits (4.9e-4 roundoff); the same three roundings measure 2.7e-4 to 6.3e-4.
- float64 1e-12: the reference itself.
- ``scaled`` weights (the seam's test scheme: unquantized data times a per-(expert, part) fp32 scale)
  round nothing more, so its rows equal the unquantized ones.
- Quantized schemes (FP8, INT8) have two rows. ``TOLERANCES``: a kernel against the reference's
  emulation of the same scheme (tight: it measures arithmetic, not quantization): both quantize the same
  values, so the only differences are accumulation order and, from it, a value rounded to the other side
  of a quantization step now and then; measured 0 to 5e-5 under the interpreter (T = 33, K = 256, every
  name, bf16/fp16/fp32); the rows (1e-2 bf16, 5e-3 fp16, 1e-3 fp32) leave room for the GPU's longer
  reductions, which flip more steps. ``QUANT_NOISE``: any backend against the unquantized float64 oracle:
  the quantization noise itself on random data, 6.2e-2 to 6.7e-2 for every FP8 name and 2.0e-2 to 2.2e-2
  for int8 (interpreter and reference alike), bounded at 1e-1 and 4e-2. The weight-only names, measured
  on the reference over their parity cases (12 fresh draws each; the activations unquantized): ``w8a16``
  1.0e-2 to 1.4e-2 (bound 4e-2, int8's), ``fp8_w8a16`` 4.1e-2 to 6.1e-2 (1e-1, fp8's), ``w4a16`` 1.8e-1
  to 2.4e-1 and ``w4a16_zp`` 1.4e-1 to 2.2e-1 (3.5e-1), ``nvfp4`` 1.1e-1 to 2.2e-1 (3.5e-1), ``mxfp4``
  1.4e-1 to 3.1e-1 (4.5e-1; its power-of-two scales lose up to a binade, most with swigluoai's wider
  weights): 4 bits on Gaussian data. A wrong decode (nibble order, sign, scale exponent) measures 1 or
  more. Their kernel-vs-emulation rows are the quantized rows above (the kernels dequantize to the
  activation dtype before the dot, the reference to fp32): measured under the interpreter (T = 5, K = 256,
  N = 128) 2.3e-7 to 3.4e-7 in fp32, 3.3e-4 to 5.5e-4 in fp16, 2.7e-3 to 4.7e-3 in bf16 (the int4 names
  highest).
Changing a row needs a measurement that justifies it, written here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .activations import apply_activation
from .backends.torch_ref import torch_ref_experts
from .config import ActivationSpec, MoEConfig
from .contract import ExpertsArgs, ExpertsProblem, gemm1_rounding
from .explain import problem_from_config
from .functional import fused_experts
from .quant import (
    NAMES,
    SCALED,
    QuantConfig,
    QuantizedWeight,
    dequantize,
    named,
    quantize,
)
from .quant.calibration import calibrate_static_scales
from .registry import get_backend, judge, last_decision
from .routing import fused_topk

__all__ = ["ACTIVATIONS", "QUANT_NOISE", "ROUNDED_GEMM1", "TOKEN_COUNTS", "TOLERANCES", "ParityCase", "ParityReport",
           "arithmetic_key", "arithmetic_reference", "assert_close", "check_backend", "experts_float64",
           "lift_hardware_verdict", "make_inputs", "parity_cases", "quant_noise", "quant_shapes", "quantized_inputs",
           "rel_error", "run_case", "tolerance"]

# Token counts every parity sweep covers: users of other MoE libraries most often report wrong results
# that appear for one backend at one batch-size bucket only.
TOKEN_COUNTS = (1, 3, 4, 8, 16, 64, 512, 4096, 16384)
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "swigluoai", "relu2", "silu_no_mul", "gelu_no_mul")

_BASE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
_QUANTIZED = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 5e-3}
TOLERANCES: dict[tuple[torch.dtype, str], float] = {
    **{(dtype, "none"): tol for dtype, tol in _BASE.items()},
    **{(dtype, "scaled"): tol for dtype, tol in _BASE.items()},
    **{(dtype, name): tol for name in NAMES for dtype, tol in _QUANTIZED.items()},
}
# W8A8 against the emulation of a GEMM1 rounded to bf16 (moe.contract.gemm1_rounding, the "+rounded_gemm1" rows):
# a GEMM1 accumulated in another order crosses some of those rounding steps differently, and one crossing can
# move a 128-group's fp8 scale and so a whole row of GEMM2's input. With few tokens one crossing weighs a lot:
# the emulation itself in float32 against float64 differed by up to 1.07e-2 at T=3 (200 seeds, E=16 K=512 N=256
# k=4), DeepGEMM by 1.5e-2 on an H200 (test_gpu_matrix); rounding or not rounding GEMM1 differs by 1.5e-2 at
# the median, 3.6e-2 at most. The quantization-noise check against the float64 oracle applies as everywhere.
ROUNDED_GEMM1 = "+rounded_gemm1"
TOLERANCES.update({(torch.bfloat16, name + ROUNDED_GEMM1): 3e-2 for name, cfg in NAMES.items()
                   if cfg.activations is not None})
# quantized results against the unquantized float64 oracle: the quantization noise (see above)
_NOISE = {"int8": 4e-2, "fp8": 1e-1, "int4": 3.5e-1, "mxfp4": 4.5e-1, "nvfp4": 3.5e-1}
QUANT_NOISE: dict[str, float] = {name: _NOISE[cfg.weights.format] for name, cfg in NAMES.items()}


def quant_noise(scheme: str) -> float:
    """The quantization-noise row of a scheme: a name of ``NAMES``, or a ``QuantConfig`` key (e.g. int4 in
    groups of 64, read from a GPTQ checkpoint), whose row is its weight format's."""
    if scheme in QUANT_NOISE:
        return QUANT_NOISE[scheme]
    weights = QuantConfig.parse(scheme).weights
    if weights is None or weights.format not in _NOISE:
        raise KeyError(f"no quantization-noise row for scheme {scheme!r}; rows: {', '.join(QUANT_NOISE)}")
    return _NOISE[weights.format]


def tolerance(dtype: torch.dtype, scheme: str = "none") -> float:
    """The tolerance row of (dtype, quantization scheme key)."""
    key = (dtype, scheme)
    if key not in TOLERANCES:
        raise KeyError(f"no tolerance row for {dtype} with scheme {scheme!r}; rows: "
                       f"{sorted({s for _, s in TOLERANCES})} for {sorted({str(d) for d, _ in TOLERANCES})}")
    return TOLERANCES[key]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-relative error of ``out`` against ``ref`` in float64; inf if ``out`` has NaN or inf."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, what: str = "",
                 scheme: str = "none") -> None:
    """Fail unless ``out`` matches ``ref`` within the tolerance row of (``dtype``, ``scheme``); ``dtype``
    defaults to out's."""
    dtype = dtype or out.dtype
    if out.shape != ref.shape:
        raise AssertionError(f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    tol = tolerance(dtype, scheme)
    err = rel_error(out, ref)
    if not err <= tol:
        raise AssertionError(f"{what}: norm-relative error {err:.3e} > {tol:.0e} ({dtype}, {scheme})")


def experts_float64(x, w13, w2, weights, ids, activation="silu", w13_bias=None, w2_bias=None, on_input=False,
                    expert_map=None, act=None) -> torch.Tensor:
    """The oracle: a plain loop over (token, slot) pairs in float64 on the CPU. ``w13``/``w2`` may be
    ``QuantizedWeight`` (dequantized in float64). ``act``: an activation function of the float64 vector
    ``h`` to use instead of the package's table (tests pass their own formulas)."""
    spec = ActivationSpec.parse(activation)
    act = act or (lambda h: apply_activation(h, spec))
    w13 = dequantize(w13, torch.float64) if isinstance(w13, QuantizedWeight) else w13
    w2 = dequantize(w2, torch.float64) if isinstance(w2, QuantizedWeight) else w2
    x, w13, w2, weights = x.double().cpu(), w13.double().cpu(), w2.double().cpu(), weights.double().cpu()
    ids = ids.cpu()
    emap = expert_map.cpu() if expert_map is not None else None
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if emap is not None:
                e = int(emap[e])
                if e < 0:
                    continue
            xe = x[t] * weights[t, j] if on_input else x[t]
            h = w13[e] @ xe
            if w13_bias is not None:
                h = h + w13_bias[e].double().cpu()
            y = w2[e] @ act(h)
            if w2_bias is not None:
                y = y + w2_bias[e].double().cpu()
            out[t] += y if on_input else weights[t, j] * y
    return out


@dataclass(frozen=True)
class ParityCase:
    """One parity case: shape, options, dtype, input layout and quantization scheme."""

    T: int
    E: int
    K: int
    N: int
    k: int
    activation: str = "silu"
    bias: bool = False
    expert_map: bool = False
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"  # contiguous | transposed (x and out) | strided_out | in_place
    quant: str = "none"  # none | scaled | a name of moe.quant.NAMES
    per_expert_scales: bool = False  # static schemes: one input scale per expert (else one per tensor)

    def __str__(self) -> str:
        extra = (("+bias" if self.bias else "") + ("+emap" if self.expert_map else "")
                 + (f"+{self.layout}" if self.layout != "contiguous" else "")
                 + (f"+{self.quant}" if self.quant != "none" else "")
                 + ("+expert_scales" if self.per_expert_scales else ""))
        return (f"T{self.T}-E{self.E}-K{self.K}-N{self.N}-k{self.k}-{self.activation}{extra}-"
                f"{str(self.dtype).removeprefix('torch.')}")


def make_inputs(case: ParityCase, device: str | torch.device = "cpu") -> dict:
    """Fresh random inputs for ``case`` (never zeros), routing from random logits; keyword arguments of
    ``fused_experts`` (with ``hidden_states``, ``w13``, ``w2``, ``topk_weights``, ``topk_ids``)."""
    gated = ActivationSpec.parse(case.activation).gated
    rows = 2 * case.N if gated else case.N
    local, emap = case.E, None
    if case.expert_map:  # every other global expert is local (round-robin over 2 ranks, this is rank 0)
        emap = torch.full((case.E,), -1, dtype=torch.int32)
        held = torch.arange(0, case.E, 2)
        emap[held] = torch.arange(held.numel(), dtype=torch.int32)
        local, emap = held.numel(), emap.to(device)
    scale = 4.0 if case.activation == "swigluoai" else 1.0  # reach the clamp
    x = torch.randn(case.T, case.K, device=device)
    w13 = torch.randn(local, rows, case.K, device=device) * (scale / case.K**0.5)
    w2 = torch.randn(local, case.K, case.N, device=device) / case.N**0.5
    weights, ids = fused_topk(torch.randn(case.T, case.E, device=device), case.k, renormalize=True)
    inputs = {"hidden_states": x.to(case.dtype), "w13": w13.to(case.dtype), "w2": w2.to(case.dtype),
              "topk_weights": weights, "topk_ids": ids, "activation": case.activation, "w13_bias": None,
              "w2_bias": None, "expert_map": emap}
    if case.bias:
        inputs["w13_bias"] = (torch.randn(local, rows, device=device) * 0.1).to(case.dtype)
        inputs["w2_bias"] = (torch.randn(local, case.K, device=device) * 0.1).to(case.dtype)
    if case.layout == "transposed":  # [T, K] views of [K, T] storage
        inputs["hidden_states"] = inputs["hidden_states"].t().contiguous().t()
    return quantized_inputs(inputs, case, device)


def quantized_inputs(inputs: dict, case: ParityCase, device: str | torch.device = "cpu") -> dict:
    """``inputs`` (unquantized) with the weights stored in ``case.quant``'s scheme (and, for static schemes,
    calibrated input scales): the same values, quantized."""
    inputs = dict(inputs)
    parts = 2 if ActivationSpec.parse(case.activation).gated else 1
    local = inputs["w13"].shape[0]
    if case.quant == "scaled":
        inputs["w13"] = QuantizedWeight(inputs["w13"], torch.rand(local, parts, device=device) + 0.5,
                                        SCALED.weights, parts=parts)
        inputs["w2"] = QuantizedWeight(inputs["w2"], torch.rand(local, 1, device=device) + 0.5, SCALED.weights)
    elif case.quant in NAMES:
        cfg = named(case.quant)
        if cfg.static_activations:
            inputs["a13_scale"], inputs["a2_scale"] = calibrate_static_scales(
                inputs["hidden_states"], inputs["w13"], inputs["topk_ids"], cfg.activations, inputs["activation"],
                w13_bias=inputs["w13_bias"], expert_map=inputs["expert_map"], per_expert=case.per_expert_scales)
        inputs["w13"] = quantize(inputs["w13"], cfg.weights, parts=parts)
        inputs["w2"] = quantize(inputs["w2"], cfg.weights)
        inputs["quant"] = case.quant
    elif case.quant != "none":
        raise ValueError(f"ParityCase.quant: {case.quant!r} is not a parity scheme (none, scaled, {', '.join(NAMES)})")
    return inputs


def _out_for(case: ParityCase, x: torch.Tensor) -> torch.Tensor:
    """The NaN-poisoned ``out`` of the case's layout."""
    if case.layout == "in_place":
        return x
    if case.layout == "transposed":
        return torch.full((x.shape[1], x.shape[0]), float("nan"), dtype=x.dtype, device=x.device).t()
    if case.layout == "strided_out":  # every other column of a wider buffer
        return torch.full((x.shape[0], 2 * x.shape[1]), float("nan"), dtype=x.dtype, device=x.device)[:, ::2]
    return torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)


def _problem(case: ParityCase, device: str | torch.device) -> ExpertsProblem:
    cfg = MoEConfig(num_experts=case.E, top_k=case.k, hidden_size=case.K, intermediate_size=case.N,
                    activation=ActivationSpec.parse(case.activation), bias=case.bias,
                    quant=QuantConfig.parse(case.quant))
    p = problem_from_config(cfg, dtype=case.dtype, device=device, num_tokens=case.T)
    return dataclasses.replace(p, has_expert_map=case.expert_map,
                               num_experts=(case.E + 1) // 2 if case.expert_map else case.E)


@dataclass(frozen=True)
class CaseResult:
    case: ParityCase
    status: str  # passed | skipped | failed
    detail: str


def run_case(backend: str, case: ParityCase, device: str | torch.device = "cpu") -> CaseResult:
    """Run one case on ``backend``: skipped with the backend's reason when it cannot run it, failed when
    the output differs from the float64 oracle beyond the tolerance row, has NaN (an unwritten element of
    the poisoned ``out``), or another backend ran."""
    verdict = judge(get_backend(backend), _problem(case, device))
    if not verdict.ok:
        return CaseResult(case, "skipped", verdict.reason)
    quantized = case.quant in NAMES
    if quantized:  # the same values before quantization, for the noise check
        unquantized = make_inputs(dataclasses.replace(case, quant="none"), device)
        inputs = quantized_inputs(unquantized, case, device)
    else:
        inputs = make_inputs(case, device)
    args = dict(inputs)
    x = args.pop("hidden_states")
    if quantized:  # the tight check is against the reference of the backend's declared arithmetic
        ref = arithmetic_reference(backend, _experts_args(x, args), _problem(case, device))
    else:
        ref = experts_float64(x, args["w13"], args["w2"], args["topk_weights"], args["topk_ids"], case.activation,
                              args["w13_bias"], args["w2_bias"], expert_map=args["expert_map"])
    out = _out_for(case, x)
    try:
        got = fused_experts(x, args.pop("w13"), args.pop("w2"), args.pop("topk_weights"), args.pop("topk_ids"),
                            backend=backend, out=out, **args)
        ran = last_decision()
        if ran is None or ran.chosen != backend:
            return CaseResult(case, "failed", f"asked for {backend!r}, ran {ran.chosen if ran else None!r}")
        if got is not out:
            return CaseResult(case, "failed", "fused_experts did not return the out tensor it was given")
        if backend != "torch" or not quantized:
            key = arithmetic_key(backend, _problem(case, device)) if quantized else case.quant
            assert_close(got, ref, dtype=case.dtype, scheme=key, what=f"{backend} {case}")
        if quantized:
            _check_noise(got, unquantized, case, backend)
    except AssertionError as exc:
        return CaseResult(case, "failed", str(exc))
    err = rel_error(out, ref)
    return CaseResult(case, "passed", f"error {err:.1e}" if math.isfinite(err) else "")


def _experts_args(x: torch.Tensor, inputs: dict) -> ExpertsArgs:
    """``fused_experts`` keyword arguments (``make_inputs`` without ``hidden_states``) as the contract's args."""
    return ExpertsArgs(x, inputs["w13"], inputs["w2"], inputs["topk_weights"], inputs["topk_ids"],
                       w13_bias=inputs.get("w13_bias"), w2_bias=inputs.get("w2_bias"),
                       expert_map=inputs.get("expert_map"), a13_scale=inputs.get("a13_scale"),
                       a2_scale=inputs.get("a2_scale"))


def arithmetic_reference(backend: str, args: ExpertsArgs, problem: ExpertsProblem) -> torch.Tensor:
    """The reference of ``backend``'s declared arithmetic, in fp32: under a W8A8 scheme GEMM1's output is
    rounded to the activations' dtype first where the backend declares it (``moe.contract.gemm1_rounding``:
    a library GEMM that writes bf16 only), which moves GEMM2's quantized inputs across steps. The tight check
    of a quantized backend, shared by ``run_case``, ``moe bench``'s rel err and ``moe tune --backends``."""
    return torch_ref_experts(args, problem, compute_dtype=torch.float32,
                             gemm1_dtype=gemm1_rounding(get_backend(backend), problem))


def arithmetic_key(backend: str, problem: ExpertsProblem) -> str:
    """The tolerance key of ``backend``'s declared arithmetic on ``problem``: the scheme's key, with
    ``+rounded_gemm1`` where its GEMM1 output is rounded (the row of ``arithmetic_reference``'s check)."""
    key = problem.quant.key()
    return key + ROUNDED_GEMM1 if gemm1_rounding(get_backend(backend), problem) is not None else key


def lift_hardware_verdict(backend: str) -> None:
    """Switch on, for this process only, a backend (or its schemes) still behind its off switch: the
    ``HARDWARE_VERDICT`` of ``moe.backends.<backend>`` (a reason, or a mapping of scheme key to reason), for the
    first GPU run of its parity tests and measurements (``pytest --unverified NAME``, ``benchmarks/unverified.py``).
    The switch is lifted in the source only once those have passed."""
    import importlib

    module = importlib.import_module(f"moe.backends.{backend}")
    if not hasattr(module, "HARDWARE_VERDICT"):
        raise ValueError(f"unverified: moe.backends.{backend} has no HARDWARE_VERDICT to lift")
    module.HARDWARE_VERDICT = {} if isinstance(module.HARDWARE_VERDICT, dict) else None


def _check_noise(got: torch.Tensor, plain: dict, case: ParityCase, backend: str) -> None:
    """A quantized result stays within the scheme's quantization noise of the unquantized float64 oracle
    (``plain``: the same inputs before quantization)."""
    ref = experts_float64(plain["hidden_states"], plain["w13"], plain["w2"], plain["topk_weights"], plain["topk_ids"],
                          case.activation, plain["w13_bias"], plain["w2_bias"], expert_map=plain["expert_map"])
    err, bound = rel_error(got, ref), QUANT_NOISE[case.quant]
    if not err <= bound:
        raise AssertionError(f"{backend} {case}: {err:.3e} from the unquantized result, above the {case.quant} "
                             f"noise bound {bound:.0e}")


def parity_cases(*, quick: bool = False) -> list[ParityCase]:
    """The project's parity cases. One shape runs the full product of activations x biases x expert map
    x dtypes; the other shapes (T = 0 and 1, odd K and N, K and N not multiples of 16, E up to 256, k in
    {1, 2, 3, 8}) cover the options pairwise, plus input layouts and the ``scaled`` scheme."""
    full = (9, 8, 32, 24, 2)
    shapes = [(1, 4, 16, 8, 1), (1, 64, 32, 16, 8), (7, 5, 33, 17, 3), (33, 8, 48, 40, 2), (17, 256, 16, 8, 8),
              (12, 64, 24, 20, 2)]
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    cases = []
    acts = ACTIVATIONS[:2] if quick else ACTIVATIONS
    for act in acts:
        for bias in (False, True):
            for emap in (False, True):
                for dtype in dtypes[:2]:
                    cases.append(ParityCase(*full, activation=act, bias=bias, expert_map=emap, dtype=dtype))
    for i, shape in enumerate(shapes[:2] if quick else shapes):
        for j, act in enumerate(acts):
            cases.append(ParityCase(*shape, activation=act, bias=(i + j) % 2 == 1, expert_map=(i + j // 2) % 2 == 1,
                                    dtype=dtypes[(i + j) % 3]))
    cases.append(ParityCase(0, 8, 32, 24, 2))  # an empty batch
    for layout in ("transposed", "strided_out", "in_place"):
        for dtype in dtypes[:2]:
            cases.append(ParityCase(*full, dtype=dtype, layout=layout, bias=True))
    for act in ("silu", "relu2"):
        for dtype in dtypes[:2]:
            cases.append(ParityCase(*full, activation=act, dtype=dtype, quant="scaled", expert_map=act == "relu2"))
    for i, name in enumerate(NAMES):
        shapes = quant_shapes(named(name))
        for j, shape in enumerate(shapes[:1] if quick else shapes):
            cases.append(ParityCase(*shape, activation=("silu", "swigluoai", "gelu")[j], bias=j == 2,
                                    expert_map=j == 2, dtype=dtypes[(i + j) % 2], quant=name))
        if named(name).static_activations:
            cases.append(ParityCase(*shapes[0], dtype=torch.bfloat16, quant=name, per_expert_scales=True))
    return cases


def quant_shapes(cfg: QuantConfig) -> list[tuple[int, int, int, int, int]]:
    """(T, E, K, N, k) parity shapes of a quantized scheme, K and N ragged against the kernels' K tiles:
    against 128 for per-channel and block scales; for group scales whole groups (a group size must divide
    K and N), an odd number of them where it can (3 x 32 = 96 is no multiple of 64)."""
    g = cfg.weights.group_size if cfg.weights is not None else None
    if g is None:
        return [(9, 8, 256, 136, 2), (1, 8, 256, 128, 2), (5, 6, 200, 136, 3)]
    g = max(g, 32)
    return [(9, 8, 2 * g, g, 2), (1, 8, 3 * g, g, 2), (5, 6, g, 3 * g, 3)]


@dataclass
class ParityReport:
    backend: str
    results: list[CaseResult]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    def __str__(self) -> str:
        lines = [f"{self.backend}: {self.count('passed')} passed, {self.count('skipped')} skipped, "
                 f"{self.count('failed')} failed"]
        lines += [f"  FAILED {r.case}: {r.detail}" for r in self.results if r.status == "failed"]
        reasons = sorted({r.detail for r in self.results if r.status == "skipped"})
        lines += [f"  skipped: {reason}" for reason in reasons]
        return "\n".join(lines)


def check_backend(backend: str, cases: list[ParityCase] | None = None, device: str | torch.device = "cpu",
                  *, quick: bool = False) -> ParityReport:
    """Run the parity cases on ``backend``; raise AssertionError listing the failures (the report
    otherwise). A backend that ran none of them (every case refused by ``supports()``) also fails."""
    report = ParityReport(backend, [run_case(backend, c, device) for c in (cases or parity_cases(quick=quick))])
    if report.count("failed") or not report.count("passed"):
        raise AssertionError(str(report) + ("" if report.count("passed") else "\n  no case ran"))
    return report
