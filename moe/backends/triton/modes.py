"""The one place that turns (kernel config, problem, launch facts) into the GEMM kernels' constexprs.

A scheme, layout or load path is a mode value (see _gemm.py), never a new boolean: a quantization scheme
is a weight-scale mode (:data:`W_SCALE_MODES`, :data:`WEIGHT_ONLY_SCALE_MODES`), a weight-code mode
(:data:`W_CODES`: how an element is stored), an input-scale mode (:func:`input_mode`) and the int8 switch;
adding one adds entries here and the kernel code for its modes. Dynamic schemes' GEMM2 input is quantized
by a pass between the GEMMs or by GEMM2 as it loads it (the config's ``gemm2_input``, :func:`gemm2_input_mode`).
"""

from __future__ import annotations

import torch

from ...contract import ExpertsProblem
from ...kernels.activation import ACT_CODES
from ...options import register_cache
from . import _gemm
from .config import KernelConfig

__all__ = ["ACT_CODES", "WEIGHT_ONLY_SCALE_MODES", "W_CODES", "W_SCALE_MODES", "gemm2_input_mode", "gemm_modes",
           "input_mode", "weight_code", "weight_scale_mode"]

# (weight format, granularity) -> the weight-scale mode
W_SCALE_MODES = {None: _gemm.NO_SCALE, ("scaled", "tensor"): _gemm.TENSOR_SCALE, ("fp8", "tensor"): _gemm.TENSOR_SCALE,
                 ("fp8", "channel"): _gemm.CHANNEL_SCALE, ("fp8", "block"): _gemm.BLOCK_SCALE,
                 ("int8", "channel"): _gemm.CHANNEL_SCALE}
# weight-only (activations unquantized): block and group scales multiply the weight tile in the K loop
WEIGHT_ONLY_SCALE_MODES = {("scaled", "tensor"): _gemm.TENSOR_SCALE, ("fp8", "tensor"): _gemm.TENSOR_SCALE,
                           ("fp8", "channel"): _gemm.CHANNEL_SCALE, ("fp8", "block"): _gemm.WEIGHT_BLOCK,
                           ("int8", "channel"): _gemm.CHANNEL_SCALE, ("int4", "group"): _gemm.WEIGHT_BLOCK,
                           ("mxfp4", "group"): _gemm.WEIGHT_BLOCK, ("nvfp4", "group"): _gemm.WEIGHT_BLOCK_GLOBAL}
# weight-only: how an element is stored (W8A8 dots the stored 8-bit values themselves: W_NATIVE)
W_CODES = {"scaled": _gemm.W_NATIVE, "fp8": _gemm.W_CONVERT, "int8": _gemm.W_CONVERT, "int4": _gemm.W_INT4,
           "mxfp4": _gemm.W_E2M1, "nvfp4": _gemm.W_E2M1}
_A_DYNAMIC = {"tensor": _gemm.A_TENSOR, "token": _gemm.A_TOKEN, "group": _gemm.A_GROUP}


def weight_scale_mode(problem: ExpertsProblem) -> int | None:
    """The W_SCALE mode of the problem's weight scheme, None when the kernels have none for it."""
    w, a = problem.quant.weights, problem.quant.activations
    if w is None:
        return W_SCALE_MODES[None]
    table = W_SCALE_MODES if a is not None else WEIGHT_ONLY_SCALE_MODES
    return table.get((w.format, w.granularity))


def weight_code(problem: ExpertsProblem) -> int:
    """The W_CODE mode: how the kernels read a weight element (as stored for unquantized and W8A8)."""
    w = problem.quant.weights
    if w is None or problem.quant.activations is not None:
        return _gemm.W_NATIVE
    if w.zero_point:
        return _gemm.W_INT4_ZP
    return W_CODES[w.format]


def input_mode(problem: ExpertsProblem, per_expert_static: bool) -> int:
    """The A_SCALE mode of a GEMM's input: unquantized, dynamic per tensor / token / group, or static per
    tensor (one scale) or per expert."""
    act = problem.quant.activations
    if act is None:
        return _gemm.A_NONE
    if act.static:
        return _gemm.A_EXPERT if per_expert_static else _gemm.A_TENSOR
    return _A_DYNAMIC[act.granularity]


# GEMM1's gathering of GEMM2's dynamic input scales: the tensor's amax, or each row's
_OUT_AMAX = {"tensor": _gemm.TENSOR_AMAX, "token": _gemm.ROW_AMAX}
_LOADED = {"tensor": _gemm.A_TENSOR_LOAD, "token": _gemm.A_TOKEN_LOAD}


def gemm2_input_mode(problem: ExpertsProblem, cfg: KernelConfig, per_expert_static: bool) -> int:
    """GEMM2's A_SCALE mode. With ``cfg.gemm2_input == "load"`` a dynamic scheme's GEMM2 quantizes its
    input as it loads it, so no pass runs between the GEMMs: per tensor and per token from the amax GEMM1
    gathered, per group when a K tile is one group (otherwise the group pass runs: A_GROUP). Otherwise,
    and for static scales, the pass's quantized rows (A_TENSOR / A_TOKEN / A_GROUP / A_EXPERT)."""
    act = problem.quant.activations
    if act is None or act.static or cfg.gemm2_input == "pass":
        return input_mode(problem, per_expert_static)
    if act.granularity == "group":
        return _gemm.A_GROUP_LOAD if act.group_size == cfg.gemm2.block_k else _gemm.A_GROUP
    return _LOADED[act.granularity]


def gemm1_amax_mode(problem: ExpertsProblem, cfg: KernelConfig) -> int:
    """What GEMM1 gathers of its output for GEMM2's dynamic input scales: the tensor's amax (per tensor:
    the pass after it, or GEMM2's loads, need no amax pass), each row's (per token, GEMM2 loading), or
    nothing (per group; per token with the pass, which finds each row's amax itself)."""
    act = problem.quant.activations
    if act is None or act.static or (act.granularity == "token" and cfg.gemm2_input == "pass"):
        return _gemm.NO_AMAX
    return _OUT_AMAX.get(act.granularity, _gemm.NO_AMAX)


_cache: dict[tuple, tuple[KernelConfig, ExpertsProblem, dict, dict]] = {}
register_cache(_cache.clear)


def gemm_modes(cfg: KernelConfig, problem: ExpertsProblem, *, direct: bool, tma1: bool, tma2: bool, pdl: bool,
               interp: bool, ieee: bool, static1: bool = False, static2: bool = False) -> tuple[dict, dict]:
    """The constexprs and launch options of GEMM1 and GEMM2, remembered: they sit on every call's path.
    Keyed by the identity of the (cached) config and problem objects, checked on a hit, since hashing a
    nested pydantic config costs microseconds per call. ``static1``/``static2``: the static input scales
    are one per expert."""
    key = (id(cfg), id(problem), direct, tma1, tma2, pdl, interp, ieee, static1, static2)
    hit = _cache.get(key)
    if hit is None or hit[0] is not cfg or hit[1] is not problem:
        if len(_cache) > 4096:
            _cache.clear()
        hit = _cache[key] = (cfg, problem, *_derive(cfg, problem, direct, tma1, tma2, pdl, interp, ieee, static1,
                                                    static2))
    return hit[2], hit[3]


def _derive(cfg: KernelConfig, p: ExpertsProblem, direct: bool, tma1: bool, tma2: bool, pdl: bool, interp: bool,
            ieee: bool, static1: bool, static2: bool) -> tuple[dict, dict]:
    g1, g2, act = cfg.gemm1, cfg.gemm2, p.activation
    w_scale = weight_scale_mode(p)
    if w_scale is None:
        raise ValueError(f"triton: no kernel mode for weights {p.quant.weights}")
    w, a = p.quant.weights, p.quant.activations
    w_bn, w_bk = w.block if w is not None and w.granularity == "block" else (1, 1)
    if w_scale == _gemm.BLOCK_SCALE:  # one weight scale (and one activation group scale) per K tile
        for name, tile in (("gemm1", g1), ("gemm2", g2)):
            if w_bk % tile.block_k:
                raise ValueError(f"kernel config: {name}.block_k={tile.block_k} must divide the {w_bk} columns of "
                                 f"a weight scale block {w.block}; use block_k <= {w_bk}")
    if w is not None and w.granularity == "group":
        w_bn, w_bk = 1, w.group_size
        for name, tile in (("gemm1", g1), ("gemm2", g2)):
            if w_bk % tile.block_k and tile.block_k % w_bk:
                raise ValueError(f"kernel config: {name}.block_k={tile.block_k} and the weights' groups of {w_bk} "
                                 f"input elements: one must divide the other (each K step takes whole groups or "
                                 f"lies within one); use a power-of-two block_k that does")
    code = weight_code(p)
    packed = code in (_gemm.W_INT4, _gemm.W_INT4_ZP, _gemm.W_E2M1)
    if cfg.group_scales == "accumulator" and code in (_gemm.W_INT4, _gemm.W_INT4_ZP):
        for name, tile in (("gemm1", g1), ("gemm2", g2)):
            if w_bk % tile.block_k:
                raise ValueError(f"kernel config: group_scales='accumulator' scales each K step's partial "
                                 f"product by one group's scale, so {name}.block_k={tile.block_k} must divide "
                                 f"the group size {w_bk}; use block_k <= {w_bk} or group_scales='weights'")
        w_scale = _gemm.WEIGHT_GROUP_ACC
    if packed and min(g1.block_k, g2.block_k) < 32:
        raise ValueError(f"triton: packed 4-bit weights need block_k >= 32 (each of the two nibble dots is "
                         f"block_k / 2 deep), got gemm1 {g1.block_k}, gemm2 {g2.block_k}")
    # bf16/fp16 activations build the weights in their own 16-bit dtype on NVIDIA GPUs (two per 32-bit
    # instruction, in PTX inline assembly); fp32 activations, the interpreter (whose bf16 arithmetic is not
    # IEEE) and ROCm GPUs (no PTX) in fp32, in plain Triton
    nvidia = p.target is None or p.target.vendor == "cuda"
    w16 = int(code != _gemm.W_NATIVE and not interp and p.dtype != torch.float32 and nvidia)
    if w16 and packed:  # bit 2: the scales' multiply two elements an instruction (_dequant_pairs); bit 4: the
        w16 |= (2 if cfg.dequant_math == "pairs" else 0) | (4 if cfg.decode_order == "masks" else 0)  # mask order
    common = dict(TOP_K=p.top_k, ROUTE=_gemm.DIRECT if direct else _gemm.SORTED, HAS_MAP=p.has_expert_map,
                  WEIGHT_ON_INPUT=p.apply_router_weight_on_input, W_SCALE=w_scale, W_CODE=code,
                  W_PACK=2 if packed else 1, W16=w16,
                  INT=a is not None and a.format == "int8", BLOCK_M=cfg.block_m, W_BN=w_bn, W_BK=w_bk,
                  INTERP=interp, IEEE=ieee, PDL=pdl)
    mode1 = dict(common, ACT=ACT_CODES[act.name], GATED=act.gated, HAS_BIAS=p.has_w13_bias,
                 A_SCALE=input_mode(p, static1),
                 OUT_AMAX=gemm1_amax_mode(p, cfg),
                 BLOCK_N=g1.block_n, BLOCK_K=g1.block_k, GROUP_M=g1.group_m, EVEN_K=p.hidden_size % g1.block_k == 0,
                 LOADS=_gemm.TMA if tma1 else _gemm.POINTER,
                 GATE_UP=_gemm.ONE_DOT if act.gated and cfg.gate_up == "one_dot" else _gemm.TWO_DOTS,
                 num_warps=g1.num_warps, num_stages=g1.num_stages)
    mode2 = dict(common, HAS_BIAS=p.has_w2_bias, A_SCALE=gemm2_input_mode(p, cfg, static2),
                 ATOMIC=cfg.combine == "atomic",
                 SPLIT_K=cfg.split_k,
                 BLOCK_N=g2.block_n, BLOCK_K=g2.block_k, GROUP_M=g2.group_m,
                 EVEN_K=p.intermediate_size % g2.block_k == 0, LOADS=_gemm.TMA if tma2 else _gemm.POINTER,
                 num_warps=g2.num_warps, num_stages=g2.num_stages)
    if pdl:
        mode1["launch_pdl"] = mode2["launch_pdl"] = True
    return mode1, mode2
