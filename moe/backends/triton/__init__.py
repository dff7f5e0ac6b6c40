"""The Triton backend: alignment, the first projection with the activation fused, the second projection,
and the weighted combine. GEMM kernels live in _gemm.py, their modes in modes.py; the alignment, combine
and launcher are the shared plumbing of ``moe.kernels``.

Triton is imported only when this backend is run (``is_available`` looks it up without importing it).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import warnings

import torch

from ...contract import ExpertsArgs, ExpertsProblem, PreparedWeights
from ...kernels.align import MAX_EXPERTS, Alignment, align
from ...kernels.combine import combine
from ...kernels.host import cdiv, chains, device_index, interpreting, tensor_copies
from ...kernels.launch import _smem_limit, launch
from ...kernels.quant import RowLayout, quantize_rows
from ...options import options, options_version, register_cache
from ...quant import QuantConfig, QuantizedWeight, WeightScheme
from .config import (
    BATCH_INVARIANT_CONFIG,
    PREPARED_SCALE_DTYPES,
    GemmTile,
    KernelConfig,
    default_config,
    input_bytes,
    operand_bytes,
)

__all__ = ["BACKEND", "GemmTile", "KernelConfig", "choose_config", "default_config", "triton_experts"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def _kernels():
    """The kernel modules, imported at first use (importing them imports triton)."""
    from . import _gemm, modes

    return _gemm, modes


@functools.cache
def _descriptor_type():
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor


_fits: set[tuple] = set()
register_cache(_fits.clear)


def _check_smem(cfg: KernelConfig, problem: ExpertsProblem, device: torch.device) -> None:
    """Reject a config whose operand tiles cannot fit the device's shared memory, before compiling it."""
    if device.type != "cuda":
        return
    key = (cfg, operand_bytes(problem), input_bytes(problem), problem.activation.gated, device)
    if key in _fits:
        return
    limit = _smem_limit(device_index(device))
    sizes = cfg.smem_bytes(operand_bytes(problem), problem.activation.gated, input_bytes(problem, cfg.gemm2_input))
    for name, need in zip(("gemm1", "gemm2"), sizes,
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
    allow_tf32: bool = False,
    alignment: Alignment | None = None,
) -> torch.Tensor:
    """Run the experts with an explicit kernel config (the tuner calls this directly).

    fp32 inputs compute in full fp32 unless ``allow_tf32``. Batches above the ``chunk_tokens`` option run
    in chunks with one config, so the result equals an unchunked run. ``alignment``: the routing already
    aligned for ``config.block_m`` (``moe.kernels.align.align``), to time the kernels alone as other
    projects report them; unchunked batches of more than one token only. Without it, ``args.alignment``
    (made with the routing for :meth:`TritonBackend.alignment_tile`) is used when its row tile is the config's.
    """
    chunk, num_tokens = options().chunk_tokens, problem.num_tokens
    if config is None:
        sized = problem if num_tokens <= chunk else dataclasses.replace(problem, num_tokens=chunk)
        config = choose_config(sized, args.hidden_states.device)
    if alignment is None and args.alignment is not None and num_tokens <= chunk \
            and args.alignment.block_m == config.block_m:
        alignment = args.alignment
    if alignment is not None and (num_tokens > chunk or alignment.block_m != config.block_m):
        raise ValueError(f"alignment: aligned for block_m={alignment.block_m} but the config has block_m="
                         f"{config.block_m} (or the batch of {num_tokens} tokens runs in chunks of {chunk})")
    if num_tokens <= chunk:
        return _run(args, problem, out, config, allow_tf32, alignment)
    for start in range(0, num_tokens, chunk):
        stop = min(num_tokens, start + chunk)
        part = dataclasses.replace(args, hidden_states=args.hidden_states[start:stop],
                                   topk_weights=args.topk_weights[start:stop], topk_ids=args.topk_ids[start:stop])
        _run(part, dataclasses.replace(problem, num_tokens=stop - start), out[start:stop], config, allow_tf32)
    return out


_chosen: dict[tuple, KernelConfig] = {}
register_cache(_chosen.clear)


def choose_config(problem: ExpertsProblem, device: torch.device) -> KernelConfig:
    """Batch-invariant mode: one config. Otherwise a tuned file for this shape and card, else the heuristic.
    Remembered per (shape, token count, device, options): finding a tuned file costs more host time than
    the kernels of a small batch."""
    opts = options()
    if opts.batch_invariant:
        return BATCH_INVARIANT_CONFIG
    key = (problem, problem.num_tokens, device, options_version())
    cfg = _chosen.get(key)
    if cfg is None:
        from .tuned import tuned_config

        cfg = tuned_config(problem, device) or default_config(problem, interpreting(), tma=tensor_copies(device))
        if len(_chosen) > 4096:
            _chosen.clear()
        _chosen[key] = cfg
    return cfg


def _split(w: torch.Tensor | QuantizedWeight, prepared: PreparedWeights | None, name: str
           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(data, scale, zero, global scale) of weight operand ``name`` ("w13", "w2"): the prepared group
    scales and zero points when there are (``prepared_scales``), else the stored ones, contiguous (the
    kernels index them by strides, zero points by the scales' strides: the same layout)."""
    if not isinstance(w, QuantizedWeight):
        return w, None, None, None
    if prepared is not None and f"{name}_scale" in prepared.tensors:
        zero = prepared.tensors.get(f"{name}_zero")
        return w.data, prepared.tensors[f"{name}_scale"], zero, w.global_scale
    contiguous = (t.contiguous() if t is not None else None for t in (w.scale, w.zero, w.global_scale))
    return (w.data, *contiguous)


def _strides(t: torch.Tensor | None) -> tuple[int, int, int]:
    """(expert or row stride, next stride, the one after) of a scale tensor; zeros where there is none."""
    if t is None:
        return 0, 0, 0
    return tuple(t.stride(d) if t.dim() > d else 0 for d in range(3))


def _group_scaled(problem: ExpertsProblem) -> bool:
    """Weight-only int4, mxfp4 or nvfp4: group scales loaded every K step."""
    w = problem.quant.weights
    return w is not None and problem.quant.activations is None and w.format in PREPARED_SCALE_DTYPES


_unprepared_warned: list[bool] = []


def _warn_unprepared() -> None:
    if not _unprepared_warned:
        _unprepared_warned.append(True)
        warnings.warn("triton: weight-only group scales in their stored layout (fused_experts without prepared=): "
                      "each K step waits for its scale loads; FusedMoE prepares them once, or pass "
                      "prepared=moe.PreparedCache() (one per set of weights) to fused_experts",
                      RuntimeWarning, stacklevel=4)


def prepared_scales(args: ExpertsArgs, problem: ExpertsProblem) -> PreparedWeights | None:
    """Weight-only group scales (int4, mxfp4, nvfp4) and zero points in the kernels' own layout, or None
    for other schemes: [E, groups, rows] storage (a column's groups ``rows`` apart, the columns of a
    group contiguous), as [E, rows, groups] views; int4's scales and zero points in fp32, mxfp4's e8m0
    exponents as the bf16 values the kernels build from them. A K step's scale tile then holds contiguous
    4-byte (or wider) runs a thread, which the compiler loads a pipeline stage ahead; the stored layout
    (each column's groups contiguous) is loaded synchronously every step."""
    if not _group_scaled(problem):
        return None
    fmt = problem.quant.weights.format
    dtype = PREPARED_SCALE_DTYPES[fmt]
    tensors = {}
    for name in ("w13", "w2"):
        q = getattr(args, name)
        # mxfp4: 2^(s - 127) with byte 0 read as 0, as the kernels decode it
        scale = (q.scale.to(torch.int16) << 7).view(dtype) if fmt == "mxfp4" else q.scale.to(dtype)
        tensors[f"{name}_scale"] = scale.transpose(1, 2).contiguous().transpose(1, 2)
        if q.zero is not None:
            tensors[f"{name}_zero"] = q.zero.to(dtype).transpose(1, 2).contiguous().transpose(1, 2)
    return PreparedWeights("triton", tensors)


def _run(args: ExpertsArgs, problem: ExpertsProblem, out: torch.Tensor, cfg: KernelConfig, allow_tf32: bool,
         al: Alignment | None = None) -> torch.Tensor:
    _gemm, modes = _kernels()
    interp = interpreting()
    x = _row_major(args.hidden_states)
    dev, dtype = x.device, x.dtype
    _check_smem(cfg, problem, dev)
    if args.prepared is None and dev.type == "cuda" and _group_scaled(problem):
        _warn_unprepared()
    w13, s13, z13, g13 = _split(args.w13, args.prepared, "w13")
    w2, s2, z2, g2s = _split(args.w2, args.prepared, "w2")
    w13, w2 = _row_major(w13), _row_major(w2)
    T, K, N, k = problem.num_tokens, problem.hidden_size, problem.intermediate_size, problem.top_k
    num_pairs = T * k
    num_global, num_local = problem.num_global_experts, problem.num_experts
    ids = args.topk_ids.reshape(-1).contiguous()
    topk_w = args.topk_weights.reshape(-1).contiguous()
    emap = args.expert_map.contiguous() if args.expert_map is not None else None  # indexed as a flat array
    direct = T == 1
    pdl = chains(dev)  # every launch below waits on the GPU for the one before, which lets it start early
    if direct:
        al = None
        grid_m = num_pairs
    else:
        al = al if al is not None else align(ids, num_local, cfg.block_m, emap, pdl)
        grid_m = al.max_blocks
    route = (ids, ids, ids) if al is None else (al.sorted_ids, al.block_expert, al.total)  # DIRECT reads none
    emap_arg = emap if emap is not None else ids
    act = problem.quant.activations
    static1 = args.a13_scale is not None and args.a13_scale.numel() > 1
    static2 = args.a2_scale is not None and args.a2_scale.numel() > 1
    x_in, sx = x, args.a13_scale  # GEMM1's input: x, or its rows quantized (a per-expert static scale: in GEMM1)
    if act is not None and not static1:
        qx = quantize_rows(x, act, static=args.a13_scale, pdl=pdl)
        x_in, sx = qx.data, qx.scale
    # GEMM1 stores the activated rows in sorted order (padding rows left unwritten), so GEMM2 reads
    # whole row tiles; single-token (direct) tiles hold one pair each, stored at the pair's index
    inter = torch.empty(num_pairs if al is None else al.max_blocks * cfg.block_m, N, dtype=dtype, device=dev)
    atomic = cfg.combine == "atomic"  # GEMM2 adds into fp32 y, zeroed here: no memset between the GEMMs
    splits = cfg.split_k  # > 1: GEMM2 stores each part's fp32 partial sums, the combine adds them up
    if atomic:
        y = torch.zeros(T, K, dtype=torch.float32, device=dev)
    else:
        y = torch.empty(splits * num_pairs, K, dtype=dtype if splits == 1 else torch.float32, device=dev)
    g1, g2 = cfg.gemm1, cfg.gemm2
    native = modes.weight_code(problem) == _gemm.W_NATIVE  # weight-only codes load their tiles by pointers
    tma1 = _use_tma(g1, (w13,), dev, interp, native)
    # GEMM2's input through descriptors: the activated rows, or their 1-byte quantized copy (16-byte rows)
    tma2 = _use_tma(g2, (w2, inter), dev, interp, native) and (act is None or N % 16 == 0)
    ieee = dtype == torch.float32 and not allow_tf32 and act is None  # fp32 dots (quantized inputs: 8-bit dots)
    mode1, mode2 = modes.gemm_modes(cfg, problem, direct=direct, tma1=tma1, tma2=tma2, pdl=pdl, interp=interp,
                                    ieee=ieee, static1=static1, static2=static2)
    one_dot = mode1["GATE_UP"] == _gemm.ONE_DOT
    # GEMM2's dynamic per-tensor or per-row input scales come from the absolute max GEMM1 gathers here
    gathered = {_gemm.TENSOR_AMAX: 1, _gemm.ROW_AMAX: inter.shape[0]}.get(mode1["OUT_AMAX"])
    amax = torch.zeros(gathered, dtype=torch.float32, device=dev) if gathered else None
    b13 = _row_major(args.w13_bias) if args.w13_bias is not None else x
    s13 = s13 if s13 is not None else topk_w  # unread without a scale mode
    z13 = z13 if z13 is not None else s13  # unread without zero points
    g13 = g13 if g13 is not None else topk_w  # unread without global scales
    sx = sx if sx is not None else topk_w
    launch(
        _gemm.moe_gemm1, (grid_m * cdiv(N, g1.block_n),), dev,
        x_in, w13, _w13_descriptor(w13, g1, N, one_dot) if tma1 else w13, b13, s13, z13, g13, sx,
        amax if amax is not None else topk_w, inter, *route, ids, emap_arg, topk_w, N, K, num_pairs, grid_m,
        num_global, num_local, x_in.stride(0), w13.stride(0), w13.stride(1), b13.stride(0), *_strides(s13),
        _strides(g13)[0], sx.stride(0) if sx.dim() else 0, inter.stride(0), problem.activation.alpha,
        problem.activation.limit, **mode1,
    )
    # GEMM2's input: the activated rows (quantized as GEMM2 loads them, from their amax), or them quantized
    a2, sa2 = inter, amax if amax is not None else topk_w
    if act is not None and mode2["A_SCALE"] not in _gemm.A_LOADED:
        layout = RowLayout(None if al is None else al.sorted_ids, None if al is None else al.block_expert,
                           cfg.block_m, ids, emap, num_pairs, num_global, num_local)
        qi = quantize_rows(inter, act, static=args.a2_scale, amax=amax, layout=layout, pdl=pdl)
        a2, sa2 = qi.data, qi.scale
    b2 = _row_major(args.w2_bias) if args.w2_bias is not None else x
    s2 = s2 if s2 is not None else topk_w
    z2 = z2 if z2 is not None else s2
    g2s = g2s if g2s is not None else topk_w
    if tma2:
        desc = _descriptor_type()
        a_desc = desc(a2, list(a2.shape), list(a2.stride()), [cfg.block_m, g2.block_k])
        w2_desc = desc(w2, list(w2.shape), list(w2.stride()), [1, g2.block_n, g2.block_k])
    else:
        a_desc, w2_desc = a2, w2
    launch(
        _gemm.moe_gemm2, (grid_m * cdiv(K, g2.block_n) * splits,), dev,
        a2, w2, a_desc, w2_desc, b2, s2, z2, g2s, sa2, y, *route, ids, emap_arg, topk_w,
        N, K, num_pairs, grid_m, num_global, num_local, a2.stride(0), w2.stride(0), w2.stride(1), b2.stride(0),
        *_strides(s2), _strides(g2s)[0], sa2.stride(0) if sa2.dim() else 0, y.stride(0), **mode2,
    )
    if atomic:
        out.copy_(y)
        return out
    combine(y, ids, topk_w, out, top_k=k, num_global=num_global, num_local=num_local, expert_map=emap,
            weight_on_input=problem.apply_router_weight_on_input, pdl=pdl, splits=splits)
    return out


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


def _use_tma(tile: GemmTile, tensors: tuple[torch.Tensor, ...], device: torch.device, interp: bool,
             native: bool = True) -> bool:
    """Whether a GEMM loads through tensor descriptors: its config asks for it, the weights are read as
    stored (``native``: not a weight-only code, whose tiles are decoded in registers from pointer loads),
    the device has a tensor memory accelerator (or this is the interpreter) and the operands meet the
    descriptor rules (16-byte aligned base and row strides). A config asking for it where one of these
    fails runs with pointer loads, with one warning naming the reason."""
    if tile.loads != "tma":
        return False
    reason = None
    if not native:
        reason = "weight-only weights are decoded in registers from pointer loads"
    elif not tensor_copies(device):
        reason = "the device has no tensor memory accelerator (TMA)"
    for t in tensors if reason is None else ():
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


def _supports_quant(problem: ExpertsProblem) -> tuple[bool, str]:
    """The quantized schemes the kernels run, on devices that have the dots they need."""
    w, a, target = problem.quant.weights, problem.quant.activations, problem.target
    if w is None or w.format == "scaled":
        return True, "ok"
    if a is None:  # weight-only: every format, dequantized in the K loop to the activation dtype
        return True, "ok"
    if target.is_gpu and a.format == "fp8" and not target.fp8_mma:
        return False, (f"{target.describe()} has no e4m3 FP8 tensor cores (fp8_mma); run FP8 checkpoints there "
                       "with FP8 weights and bf16 activations (weight-only), or on the torch backend")
    if target.is_gpu and a.format == "int8" and not target.int8_mma:
        return False, f"{target.describe()} has no int8 tensor cores (int8_mma)"
    if w.granularity == "block" and (a.granularity != "group" or a.group_size != w.block[1]):
        return False, (f"block weights {w.block} need activation groups of {w.block[1]} columns, got "
                       f"{a.granularity} {a.group_size or ''}".rstrip())
    return True, "ok"


# int4 weight-only with the other common group sizes (through a QuantConfig; the names use 128)
_INT4_GROUPS = tuple(QuantConfig(weights=WeightScheme(format="int4", granularity="group", group_size=g,
                                                      zero_point=zp)).key() for g in (32, 64) for zp in (False, True))


class TritonBackend:
    name = "triton"
    schemes = ("none", "scaled", "fp8_tensor", "fp8_tensor_static", "fp8_channel", "fp8_block", "int8_channel",
               "w8a16", "w4a16", "w4a16_zp", "fp8_w8a16", "mxfp4", "nvfp4", *_INT4_GROUPS)

    @property
    def priority(self) -> int:
        return 20 if torch.cuda.is_available() else -10

    def priority_for(self, target) -> int:
        # On CPU the kernels only run under the interpreter: a test vehicle, never preferred over the reference.
        return -10 if target.vendor == "cpu" else 20

    def is_available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed; pip install 'moe-layer[triton]'"
        return True, "ok"

    def supports(self, problem: ExpertsProblem) -> tuple[bool, str]:
        target = problem.target
        if target is None:
            return False, "no device target: the device's features decide (give one, e.g. moe.target.TARGETS['h200'])"
        if target.vendor == "cpu" and not target.triton_interpreter:
            return False, "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
        if target.vendor not in ("cuda", "rocm", "cpu"):
            return False, f"{target.describe()}: Triton runs on CUDA and ROCm GPUs, or on CPU under its interpreter"
        if problem.dtype not in _DTYPES:
            return False, f"dtype {problem.dtype} is not supported (float16, bfloat16, float32)"
        if problem.num_experts > MAX_EXPERTS:
            return False, f"num_experts={problem.num_experts} exceeds {MAX_EXPERTS}"
        return _supports_quant(problem)

    def alignment_tile(self, args: ExpertsArgs, problem: ExpertsProblem) -> int | None:
        """The row tile the call's kernel config aligns for; None for a single token (its GEMMs read the
        pairs directly) and for batches that run in chunks."""
        if problem.num_tokens <= 1 or problem.num_tokens > options().chunk_tokens:
            return None
        return choose_config(problem, args.hidden_states.device).block_m

    def prepare(self, args: ExpertsArgs, problem: ExpertsProblem) -> PreparedWeights | None:
        """Weight-only group scales in the kernels' layout (``prepared_scales``); None for other schemes."""
        return prepared_scales(args, problem)

    def apply(self, args: ExpertsArgs, problem: ExpertsProblem, out: torch.Tensor) -> None:
        triton_experts(args, problem, out)


BACKEND = TritonBackend()
