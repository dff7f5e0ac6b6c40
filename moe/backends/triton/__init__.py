"""The Triton backend: alignment, the first projection with the activation fused, the second projection,
and the weighted combine. Kernels live in _align.py and _gemm.py; this module launches them.

Triton is imported only when this backend is considered (``is_available``) or run.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import TYPE_CHECKING

import torch

from ..base import ExpertsArgs, ExpertsProblem
from .config import (
    BATCH_INVARIANT_CONFIG,
    GemmTile,
    KernelConfig,
    TritonOptions,
    default_config,
    options,
    reset_options,
    set_options,
)
from .host import cdiv, chains, device_index, hopper, next_pow2, pdl_option
from .launch import _smem_limit
from .launch import launch as _launch

if TYPE_CHECKING:
    from .align import Alignment

__all__ = ["BACKEND", "GemmTile", "KernelConfig", "TritonOptions", "clear_config_cache", "default_config", "options",
           "reset_options", "set_options", "triton_experts"]

ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "swigluoai": 3, "relu2": 4, "silu_no_mul": 5, "gelu_no_mul": 6}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def interpreting() -> bool:
    """Whether kernels run under the Triton interpreter. Read once: triton.jit decides it when our kernel
    modules are imported, so a later change of TRITON_INTERPRET would not take effect anyway."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _kernels():
    """The kernel modules, imported at first use (importing them imports triton)."""
    from . import _gemm
    from .align import align

    return _gemm, align


@functools.cache
def _descriptor_type():
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor


@functools.cache
def _import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc}); pip install 'moe-layer[triton]'"
    return None


_fits: set[tuple] = set()


def _check_smem(cfg: KernelConfig, problem: ExpertsProblem, device: torch.device) -> None:
    """Reject a config whose operand tiles cannot fit the device's shared memory, before compiling it."""
    if device.type != "cuda":
        return
    key = (cfg, problem.dtype, problem.activation.gated, device)
    if key in _fits:
        return
    limit = _smem_limit(device_index(device))
    for name, need in zip(("gemm1", "gemm2"), cfg.smem_bytes(problem.dtype.itemsize, problem.activation.gated),
                          strict=True):
        if need > limit:
            raise ValueError(
                f"kernel config {name} needs about {need} bytes of shared memory but this device allows "
                f"{limit}; use smaller block sizes or fewer stages (config: {cfg.model_dump()})"
            )
    _fits.add(key)


def triton_experts(
    args: ExpertsArgs,
    problem: ExpertsProblem,
    out: torch.Tensor,
    config: KernelConfig | None = None,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    allow_tf32: bool = False,
    opts: TritonOptions | None = None,
    alignment: Alignment | None = None,
) -> torch.Tensor:
    """Run the experts with an explicit kernel config (the tuner calls this directly).

    ``w13_scale`` / ``w2_scale``: optional fp32 [E] per-expert weight scales (the result uses
    ``scale[e] * w[e]``). fp32 inputs compute in full fp32 unless ``allow_tf32``. Batches above
    ``opts.chunk_tokens`` run in chunks with one config, so the result equals an unchunked run.
    ``alignment``: the routing already aligned for ``config.block_m`` (``align.align``), to time the
    kernels alone as other projects report them; unchunked batches of more than one token only.
    """
    opts = opts or options()
    chunk, num_tokens = opts.chunk_tokens, problem.num_tokens
    if config is None:
        sized = problem if num_tokens <= chunk else dataclasses.replace(problem, num_tokens=chunk)
        config = _choose_config(sized, args.hidden_states.device, opts)
    if alignment is not None and (num_tokens > chunk or alignment.block_m != config.block_m):
        raise ValueError(f"alignment: aligned for block_m={alignment.block_m} but the config has block_m="
                         f"{config.block_m} (or the batch of {num_tokens} tokens runs in chunks of {chunk})")
    if num_tokens <= chunk:
        return _run(args, problem, out, config, w13_scale, w2_scale, allow_tf32, alignment)
    for start in range(0, num_tokens, chunk):
        stop = min(num_tokens, start + chunk)
        part = dataclasses.replace(args, hidden_states=args.hidden_states[start:stop],
                                   topk_weights=args.topk_weights[start:stop], topk_ids=args.topk_ids[start:stop])
        _run(part, dataclasses.replace(problem, num_tokens=stop - start), out[start:stop], config, w13_scale,
             w2_scale, allow_tf32)
    return out


_chosen: dict[tuple, KernelConfig] = {}


def _choose_config(problem: ExpertsProblem, device: torch.device, opts: TritonOptions) -> KernelConfig:
    """Batch-invariant mode: one config. Otherwise a tuned file for this shape and card, else the heuristic.
    Remembered per (shape, token count, device, options, tuned-file switches): finding a tuned file costs
    more host time than the kernels of a small batch."""
    if opts.batch_invariant:
        return BATCH_INVARIANT_CONFIG
    env, interp = os.environ, interpreting()
    key = (problem, problem.num_tokens, device, opts, interp, env.get("MOE_TUNED_CONFIGS"),
           env.get("MOE_TUNED_CONFIGS_DIR"))
    cfg = _chosen.get(key)
    if cfg is None:
        from .tuned import tuned_config

        cfg = tuned_config(problem, device) or default_config(problem, interp, tma=_has_tma(device, interp))
        if len(_chosen) > 4096:
            _chosen.clear()
        _chosen[key] = cfg
    return cfg


def clear_config_cache() -> None:
    """Forget the remembered configs (after adding or changing tuned files in a running process)."""
    _chosen.clear()


def _run(args: ExpertsArgs, problem: ExpertsProblem, out: torch.Tensor, cfg: KernelConfig,
         w13_scale: torch.Tensor | None, w2_scale: torch.Tensor | None, allow_tf32: bool,
         al: Alignment | None = None) -> torch.Tensor:
    _gemm, align = _kernels()
    interp = interpreting()
    x = args.hidden_states
    dev, dtype = x.device, x.dtype
    _check_smem(cfg, problem, dev)
    x = _row_major(x)
    w13, w2 = _row_major(args.w13), _row_major(args.w2)
    T, K, N, k = problem.num_tokens, problem.hidden_size, problem.intermediate_size, problem.top_k
    num_pairs = T * k
    ids = args.topk_ids.reshape(-1).contiguous()
    topk_w = args.topk_weights.reshape(-1).contiguous()
    emap = args.expert_map
    direct = T == 1
    pdl = chains(dev)  # every launch below waits on the GPU for the one before, which lets it start early
    if direct:
        al = None
        grid_m = num_pairs
    else:
        al = al if al is not None else align(ids, problem.num_experts, cfg.block_m, emap, pdl)
        grid_m = al.max_blocks
    route = (
        (ids, ids, ids) if al is None else (al.sorted_ids, al.block_expert, al.total)
    )  # the DIRECT kernels never read sorted ids, tile experts or the total
    emap_arg = emap if emap is not None else ids
    flags = dict(
        TOP_K=k, DIRECT=direct, HAS_MAP=emap is not None, WEIGHT_ON_INPUT=problem.apply_router_weight_on_input,
        UPCAST=interp and dtype == torch.bfloat16, IEEE=dtype == torch.float32 and not allow_tf32,
    )
    # GEMM1 stores the activated rows in sorted order (padding rows left unwritten), so GEMM2 reads
    # whole row tiles; single-token (direct) tiles hold one pair each, stored at the pair's index
    inter = torch.empty(num_pairs if al is None else al.max_blocks * cfg.block_m, N, dtype=dtype, device=dev)
    atomic = cfg.combine == "atomic"  # GEMM2 adds into fp32 y, zeroed here: no memset between the GEMMs
    y = (torch.zeros(T, K, dtype=torch.float32, device=dev) if atomic
         else torch.empty(num_pairs, K, dtype=dtype, device=dev))
    g1, g2 = cfg.gemm1, cfg.gemm2
    tma1, tma2 = _use_tma(g1, (w13,), dev, interp), _use_tma(g2, (w2, inter), dev, interp)
    one_dot = problem.activation.gated and cfg.gate_up == "one_dot"
    grid1, grid2 = grid_m * cdiv(N, g1.block_n), grid_m * cdiv(K, g2.block_n)
    b13 = args.w13_bias if args.w13_bias is not None else x
    s13 = w13_scale if w13_scale is not None else topk_w
    _launch(
        _gemm.moe_gemm1, (grid1,), dev,
        x, w13, _w13_descriptor(w13, g1, N, one_dot) if tma1 else w13, b13, s13, inter, *route, ids, emap_arg,
        topk_w, N, K, num_pairs, grid_m, x.stride(0), w13.stride(0), w13.stride(1), b13.stride(0), inter.stride(0),
        problem.activation.alpha, problem.activation.limit,
        GATED=problem.activation.gated, ACT=ACT_CODES[problem.activation.name],
        HAS_BIAS=args.w13_bias is not None, W_SCALE=int(w13_scale is not None),
        BLOCK_M=cfg.block_m, BLOCK_N=g1.block_n, BLOCK_K=g1.block_k, GROUP_M=g1.group_m,
        EVEN_K=K % g1.block_k == 0, ONE_DOT=one_dot, W_TMA=tma1, PDL=pdl,
        num_warps=g1.num_warps, num_stages=g1.num_stages, **flags, **pdl_option(pdl),
    )
    b2 = args.w2_bias if args.w2_bias is not None else x
    s2 = w2_scale if w2_scale is not None else topk_w
    if tma2:
        desc = _descriptor_type()
        a_desc = desc(inter, list(inter.shape), list(inter.stride()), [cfg.block_m, g2.block_k])
        w2_desc = desc(w2, list(w2.shape), list(w2.stride()), [1, g2.block_n, g2.block_k])
    else:
        a_desc, w2_desc = inter, w2
    _launch(
        _gemm.moe_gemm2, (grid2,), dev,
        inter, w2, a_desc, w2_desc, b2, s2, y, *route, ids, emap_arg, topk_w,
        N, K, num_pairs, grid_m, inter.stride(0), w2.stride(0), w2.stride(1), b2.stride(0), y.stride(0),
        HAS_BIAS=args.w2_bias is not None, W_SCALE=int(w2_scale is not None), ATOMIC=atomic,
        BLOCK_M=cfg.block_m, BLOCK_N=g2.block_n, BLOCK_K=g2.block_k, GROUP_M=g2.group_m,
        EVEN_K=N % g2.block_k == 0, TMA=tma2, PDL=pdl,
        num_warps=g2.num_warps, num_stages=g2.num_stages, **flags, **pdl_option(pdl),
    )
    if atomic:
        out.copy_(y)
        return out
    combine(y, ids, topk_w, out, problem, emap, pdl)
    return out


def combine(y: torch.Tensor, ids: torch.Tensor, topk_w: torch.Tensor, out: torch.Tensor, problem: ExpertsProblem,
            expert_map: torch.Tensor | None, pdl: bool = False) -> None:
    """out[t] = sum_j w[t, j] * y[t * k + j] (fp32, fixed order) from per-pair outputs y [T*k, K]; pairs
    whose expert ``expert_map`` marks non-local are skipped. Shared with the torch_grouped backend.
    ``pdl``: launched to wait on the GPU for the previous kernel (a moe_gemm2 that lets it launch early)."""
    _gemm = _kernels()[0]
    interp = interpreting()
    block = min(64 if interp else 1024, next_pow2(problem.hidden_size))
    _launch(
        _gemm.moe_combine, (problem.num_tokens, cdiv(problem.hidden_size, block)), y.device,
        y, ids, expert_map if expert_map is not None else ids, topk_w, out, problem.hidden_size, y.stride(0),
        out.stride(0), TOP_K=problem.top_k, HAS_MAP=expert_map is not None,
        WEIGHT_ON_INPUT=problem.apply_router_weight_on_input, BLOCK=block,
        RNE_BF16=interp and out.dtype == torch.bfloat16, PDL=pdl, **pdl_option(pdl),
    )


def _w13_descriptor(w13: torch.Tensor, tile: GemmTile, n: int, one_dot: bool):
    """w13 [E, 2N, K] as a tensor descriptor: [1, block_n, block_k] boxes, or for the one-dot GEMM1 a
    [E, 2, N, K] view whose [1, 2, block_n, block_k] boxes hold a gate tile and its up tile."""
    desc = _descriptor_type()
    e, rows, k = w13.shape
    if one_dot:
        return desc(w13, [e, 2, n, k], [w13.stride(0), n * w13.stride(1), w13.stride(1), 1],
                    [1, 2, tile.block_n, tile.block_k])
    return desc(w13, [e, rows, k], list(w13.stride()), [1, tile.block_n, tile.block_k])


_tma_warned: set[str] = set()


def _has_tma(device: torch.device, interp: bool) -> bool:
    """Whether tensor-descriptor loads run on ``device``: Hopper and later, or the interpreter."""
    return interp if device.type != "cuda" else hopper(device)


def _use_tma(tile: GemmTile, tensors: tuple[torch.Tensor, ...], device: torch.device, interp: bool) -> bool:
    """Whether a GEMM loads through tensor descriptors: its config asks for it, the device has a copy
    engine (compute capability 9.0+, or the interpreter) and the operands meet the descriptor rules
    (16-byte aligned base and row strides). A config asking for it on a device or tensors that do not
    qualify runs with pointer loads, with one warning naming the reason."""
    if tile.loads != "tma":
        return False
    reason = None
    if not _has_tma(device, interp):
        reason = "the device has no tensor copy engine (compute capability below 9.0)"
    for t in tensors:
        if t.data_ptr() % 16 or any(s * t.element_size() % 16 for s in t.stride()[:-1]):
            reason = f"a {tuple(t.shape)} operand is not 16-byte aligned (base or row stride)"
    if reason is None:
        return True
    if reason not in _tma_warned:
        _tma_warned.add(reason)
        warnings.warn(f"triton: kernel config asks for loads='tma' but {reason}; using pointer loads",
                      RuntimeWarning, stacklevel=3)
    return False


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """The kernels index rows with a stride and assume unit stride along the last dim."""
    return t if t.stride(-1) == 1 else t.contiguous()


class TritonBackend:
    name = "triton"

    @property
    def priority(self) -> int:
        # On CPU the kernels only run under the interpreter: a test vehicle, never preferred over the reference.
        return 20 if torch.cuda.is_available() else -10

    def is_available(self) -> tuple[bool, str]:
        err = _import_error()
        if err:
            return False, err
        if torch.cuda.is_available():
            return True, "ok"
        if interpreting():
            return True, "CPU under the Triton interpreter (TRITON_INTERPRET=1): correct but slow"
        return False, "no CUDA device; set TRITON_INTERPRET=1 to run the kernels under the Triton interpreter"

    def supports(self, problem: ExpertsProblem) -> tuple[bool, str]:
        if problem.device_type == "cpu" and not interpreting():
            return False, "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
        if problem.device_type not in ("cuda", "cpu"):
            return False, f"device {problem.device_type!r} is not supported (cuda, or cpu under the interpreter)"
        if problem.dtype not in _DTYPES:
            return False, f"dtype {problem.dtype} is not supported (float16, bfloat16, float32)"
        if problem.quant.is_quantized:
            return False, f"quantized schemes are not implemented yet ({problem.quant})"
        from .align import MAX_EXPERTS

        if problem.num_experts > MAX_EXPERTS:
            return False, f"num_experts={problem.num_experts} exceeds {MAX_EXPERTS}"
        return True, "ok"

    def apply(self, args: ExpertsArgs, problem: ExpertsProblem, out: torch.Tensor) -> None:
        triton_experts(args, problem, out)


BACKEND = TritonBackend()
