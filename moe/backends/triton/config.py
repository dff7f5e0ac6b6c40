"""Kernel configs for the Triton backend: validated objects passed to every launch, and the heuristic
that picks one when no tuned config exists."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from ...contract import ExpertsProblem
from ...frozen import Frozen

__all__ = ["BATCH_INVARIANT_CONFIG", "GemmTile", "KernelConfig", "default_config", "fit_smem", "input_bytes",
           "operand_bytes", "with_loads", "workspace_bytes"]

Pow2 = Literal[16, 32, 64, 128, 256]


class GemmTile(Frozen):
    block_n: Pow2 = 64
    block_k: Pow2 = 64
    group_m: int = Field(8, ge=1, le=64)
    num_warps: Literal[1, 2, 4, 8, 16] = 4
    num_stages: int = Field(3, ge=1, le=8)
    # how the weight tiles reach shared memory (GEMM2: its input tiles too): pointer loads (cp.async),
    # or tensor descriptors copied by Hopper's copy engine (TMA; compute capability 9.0 and up)
    loads: Literal["pointer", "tma"] = "pointer"


class KernelConfig(Frozen):
    """One launch's tiles: ``block_m`` is the alignment's row tile, shared by both GEMMs."""

    block_m: Pow2 = 64
    gemm1: GemmTile = GemmTile()
    gemm2: GemmTile = GemmTile()
    combine: Literal["reduce", "atomic"] = "reduce"
    # gated GEMM1: a gate and an up tile with a dot each, or one tile of interleaved gate/up columns
    # (2 x block_n wide) with one dot, split after the loop
    gate_up: Literal["two_dots", "one_dot"] = "two_dots"
    # dynamic W8A8 schemes: GEMM2's input quantized once by a pass between the GEMMs ("pass"), or by
    # GEMM2 as it loads each tile ("load": no launch between the GEMMs, but every output-column tile
    # re-reads the 2-byte rows and quantizes them again. H200, dsv3 at 4096 tokens: fp8_block's GEMM2
    # 5431 us loading vs 3760 us after the pass; fp8_channel's loading GEMM2 2809 us, bf16's 2822).
    # Static schemes always take the pass
    gemm2_input: Literal["pass", "load"] = "pass"
    # weight-only int4 groups: their scales (and zero points) multiply the decoded weight tile in the K
    # loop ("weights"), or each K step's partial product ("accumulator": block_k must divide the group
    # size; one multiply per output element a step instead of one per weight element). Other schemes
    # ignore it
    group_scales: Literal["weights", "accumulator"] = "weights"
    # GEMM2's reduction over N split into this many parts, each a program of its own that stores an fp32
    # partial sum, which the combine adds up in order (deterministic): more programs in flight when few
    # output tiles stream long rows of weights (mixtral at one token: 2 experts x 4096 / block_n). Needs
    # combine="reduce"
    split_k: Literal[1, 2, 4, 8] = 1
    # weight-only 4-bit tiles on the GPU with 16-bit activations: their scale multiply (and zero-point add)
    # one element a bf16/fp16 instruction as Triton emits it ("scalar"), or two a packed fma in inline
    # assembly ("pairs": the same bits; the sm_90 PTX of an mxfp4 GEMM1 852 -> 548 instructions). The heuristic
    # takes "pairs" where it measured faster (PAIRED_DEQUANT)
    dequant_math: Literal["scalar", "pairs"] = "scalar"
    # the same tiles' nibble decode: its four values of a 32-bit word put back in byte order (a byte permute
    # a register pair: "bytes"), or left in the order one mask selects them (bytes 0, 2, 1, 3: "masks"), the
    # input's columns permuted alike inside the tile (the sm_90 SASS of w4a16's decode loops 10-15% shorter;
    # faster on some shapes, slower on others and at 64-row tiles: docs/performance.md)
    decode_order: Literal["bytes", "masks"] = "bytes"

    @model_validator(mode="after")
    def _split_needs_reduce(self) -> KernelConfig:
        if self.split_k > 1 and self.combine != "reduce":
            raise ValueError(f"kernel config: split_k={self.split_k} stores partial sums that the combine adds "
                             f"up, so it needs combine='reduce' (got combine={self.combine!r}); use split_k=1 "
                             f"with the atomic combine")
        return self

    def smem_bytes(self, elt: float, gated: bool, input_elt: tuple[int, int] | None = None) -> tuple[int, int]:
        """Estimated shared memory of the two GEMMs' pipelined operand tiles: ``elt`` bytes a weight
        element, ``input_elt`` bytes an input element of GEMM1 and GEMM2 (default: ``elt``)."""
        g1, g2 = self.gemm1, self.gemm2
        a1, a2 = input_elt or (elt, elt)
        b_tiles = 2 if gated else 1
        s1 = g1.num_stages * (self.block_m * g1.block_k * a1 + b_tiles * g1.block_n * g1.block_k * elt)
        s2 = g2.num_stages * (self.block_m * g2.block_k * a2 + g2.block_n * g2.block_k * elt)
        return int(s1), int(s2)


def with_loads(cfg: KernelConfig, **loads: str) -> KernelConfig:
    """``cfg`` with the named GEMMs' loads replaced, e.g. ``with_loads(cfg, gemm2="tma")``."""
    return cfg.model_copy(update={g: getattr(cfg, g).model_copy(update={"loads": v}) for g, v in loads.items()})


SMEM_BUDGET = 200 * 1024  # below the 227 KB per block of H100/H200, with room for the compiler's scratch


def fit_smem(cfg: KernelConfig, elt: float, gated: bool, budget: int = SMEM_BUDGET,
             input_elt: tuple[int, int] | None = None) -> KernelConfig:
    """Drop pipeline stages (then halve block_k) until both GEMMs fit ``budget`` bytes of shared memory."""
    for name in ("gemm1", "gemm2"):
        while cfg.smem_bytes(elt, gated, input_elt)[0 if name == "gemm1" else 1] > budget:
            tile = getattr(cfg, name)
            if tile.num_stages > 2:
                tile = tile.model_copy(update={"num_stages": tile.num_stages - 1})
            elif tile.block_k > 16:
                tile = tile.model_copy(update={"block_k": tile.block_k // 2})
            else:
                break
            cfg = cfg.model_copy(update={name: tile})
    return cfg


def operand_bytes(problem: ExpertsProblem) -> float:
    """Bytes an element of the GEMMs' pipelined weight tiles: 1 for W8A8 (fp8 or int8); weight-only, the
    stored bytes of the weights the kernels decode in registers (int4 and e2m1: 0.5, int8: 1) and, for
    fp8 weights, whose decoded tile goes through shared memory, the activation dtype's (an upper bound);
    else the activation dtype's."""
    w, act = problem.quant.weights, problem.quant.activations
    if act is not None:
        return 1
    if w is not None and w.format in ("int4", "mxfp4", "nvfp4"):
        return 0.5
    if w is not None and w.format == "int8":
        return 1
    return problem.dtype.itemsize


def input_bytes(problem: ExpertsProblem, gemm2_input: str = "pass") -> tuple[int, int]:
    """Bytes an element of GEMM1's and GEMM2's pipelined input tiles. W8A8 inputs are 1-byte tiles, except
    where a GEMM quantizes them itself from the activation dtype: GEMM1 gathering rows with per-expert
    static scales (any static scheme may), GEMM2 of a dynamic scheme with ``gemm2_input="load"``."""
    dt, act = problem.dtype.itemsize, problem.quant.activations
    if act is None:
        return dt, dt
    if act.static:
        return dt, 1
    return 1, dt if gemm2_input == "load" else 1


def default_config(problem: ExpertsProblem, interpret: bool = False, tma: bool = True) -> KernelConfig:
    """A simple heuristic by rows per expert (tuned configs replace it where they exist). ``tma``: the
    device has a tensor copy engine (Hopper and later); without it, or when the rows of K or N are not
    whole multiples of 16 bytes, every tile uses pointer loads."""
    cfg = _by_rows_per_expert(problem, interpret)
    act = problem.quant.activations
    if (act is not None and not act.static and act.granularity == "tensor"
            and problem.num_tokens * problem.top_k <= LOADING_GEMM2_MAX_PAIRS):
        cfg = cfg.model_copy(update={"gemm2_input": "load"})
    elt = operand_bytes(problem)  # descriptors need 16-byte row strides: K and N rows of whole 16 bytes
    if not tma or (problem.hidden_size * elt) % 16 or (problem.intermediate_size * elt) % 16:
        cfg = with_loads(cfg, gemm1="pointer", gemm2="pointer")
    if _weight_only(problem):
        cfg = _weight_only_tiles(cfg, problem)
    elif act is not None:
        cfg = _w8a8_decode_tiles(cfg, problem)
    return fit_smem(cfg, elt, problem.activation.gated, input_elt=input_bytes(problem, cfg.gemm2_input))


# Up to this many (token, slot) pairs a dynamic per-tensor W8A8 scheme's GEMM2 quantizes its input as it
# loads it (gemm2_input="load"), above it a pass does (H200, 2026-12-02: at 512 pairs the pass was faster,
# dsv3 at 64 tokens by 10%, mixtral at 256 by 10-36%). Per-token and per-group schemes always take the
# pass: their loaded tiles divide by a scale per row, which made GEMM2's loop about twice as long (sm_90
# SASS, mixtral at one token: 1176 instructions against 543 per tensor) and GEMM2 itself 57 us against 33
# after the pass (H200, 2026-12-03, graphs, whole call: mixtral at one token fp8_channel 139.8 -> 119.5
# us, fp8_block 166.0 -> 127.4, int8_channel 155.2 -> 116.0; dsv3 126.1 -> 121.5, 125.8 -> 123.6, 134.0 ->
# 118.8; mixtral at 16 tokens int8_channel 408.8 -> 379.7, fp8_block 385.8 -> 382.0), while per tensor
# loading stayed faster (mixtral at one token 129.4 against 132.8 us, dsv3 129.5 against 137.5, qwen3
# 39.3 against 46.2, mixtral at 16 tokens 381.0 against 403.3)
LOADING_GEMM2_MAX_PAIRS = 64


def _by_rows_per_expert(problem: ExpertsProblem, interpret: bool) -> KernelConfig:
    """Buckets from the tuner's winners on an H200 (bf16; mixtral, qwen3 and dsv3 at 1..16384 tokens,
    2026-11-27): thin row tiles while the weights stream (few rows per expert), wider ones as the work
    turns compute-bound. group_m=64 runs all row tiles of a weight column together, so an expert split
    over several row tiles reads its weights from HBM once (mixtral at 64 tokens: 947 -> 680 us)."""
    if interpret:  # few, wide programs: the interpreter's cost is per operation, not per element
        tile = GemmTile(block_n=64, block_k=64, group_m=1, num_warps=4, num_stages=1)
        return KernelConfig(block_m=16, gemm1=tile, gemm2=tile)
    _, rows_per_expert = _row_tiles(problem)
    short_reduction = problem.intermediate_size <= 1024  # the second GEMM reduces over N
    if rows_per_expert <= 16:
        g1 = GemmTile(block_n=64, block_k=128, group_m=64, num_warps=4, num_stages=5)
        g2 = GemmTile(block_n=128, block_k=128, group_m=64, num_warps=4, num_stages=3 if short_reduction else 5)
        return KernelConfig(block_m=16 if rows_per_expert <= 8 else 32, gemm1=g1, gemm2=g2)
    # Above 16 rows per expert both GEMMs load through tensor descriptors (TMA): GEMM2 3-25% faster from
    # mixtral at 256 tokens to qwen3/dsv3 at 4096-16384, GEMM1 0-10% (2026-11-27, H200); at 16 rows and
    # below it made no difference
    # 64-wide K tiles, except for block-scaled W8A8 weights: each K step's partial product waits for the
    # tensor cores before it is scaled, so a step per scale block (128) halves the waits (H200, 2026-12-02:
    # fp8_block 11-25% faster at dsv3/mixtral 4096 and qwen3 16384 tokens; fp8_channel within 2-4%)
    bk = _block_k_of_scales(problem) or 64
    if rows_per_expert < 128:
        g1 = GemmTile(block_n=128, block_k=bk, group_m=64, num_warps=4, num_stages=4, loads="tma")
        g2 = GemmTile(block_n=128, block_k=128, group_m=8, num_warps=4, num_stages=4, loads="tma")
        return KernelConfig(block_m=64, gemm1=g1, gemm2=g2)
    # From 128 rows: 128-row tiles with 8 warps (qwen3 at 4096 tokens: 1023 -> 986 us), and GEMM1 as one
    # dot over gate and up columns (2-6% faster at 1024-16384 tokens on the presets). Block-scaled W8A8:
    # 64-row tiles, 64 (x2) GEMM1 columns and 4 warps, whose smaller tiles let two programs share an SM,
    # one's tensor-core work overlapping the other's scaling (H200, 2026-12-02: fp8_block at dsv3 4096
    # tokens 8641 -> 6085 us, qwen3 16384 3390 -> 3041 us; the same tiles made fp8_channel 13-25% slower)
    n2 = 128 if rows_per_expert <= 256 else 256
    if bk == 128:
        g1 = GemmTile(block_n=64, block_k=bk, group_m=8, num_warps=4, num_stages=4, loads="tma")
        g2 = GemmTile(block_n=n2, block_k=bk, group_m=8, num_warps=4, num_stages=4, loads="tma")
        return KernelConfig(block_m=64, gemm1=g1, gemm2=g2, gate_up="one_dot")
    g1 = GemmTile(block_n=128, block_k=bk, group_m=8, num_warps=8, num_stages=4, loads="tma")
    g2 = GemmTile(block_n=n2, block_k=bk, group_m=8, num_warps=8, num_stages=4, loads="tma")
    return KernelConfig(block_m=128, gemm1=g1, gemm2=g2, gate_up="one_dot")


def _row_tiles(problem: ExpertsProblem) -> tuple[int, float]:
    """(row tiles while the weights stream: one per expert hit, at most; rows per expert hit)."""
    pairs = problem.num_tokens * problem.top_k
    tiles = min(problem.num_experts, pairs)
    return tiles, pairs / max(1, tiles)


def _gemm2_programs(problem: ExpertsProblem, tiles: int, cfg: KernelConfig) -> int:
    """GEMM2's grid for ``tiles`` row tiles before any split: its output columns (K) by cfg's tile."""
    return tiles * -(-problem.hidden_size // cfg.gemm2.block_n)


def _weight_only(problem: ExpertsProblem) -> bool:
    return problem.quant.weights is not None and problem.quant.activations is None


# Below this many programs a weight-streaming GEMM leaves SMs idle (H200: 132 SMs, two programs each)
MIN_PROGRAMS = 264


def _weight_only_tiles(cfg: KernelConfig, problem: ExpertsProblem) -> KernelConfig:
    """Weight-only schemes: pointer loads, which the compiler turns into tiles decoded in the dot's own
    register layout (it does not carry that through a tensor-descriptor load: the decoded tile would
    round-trip through shared memory), and while the weights stream (up to 16 rows per expert) output
    tiles narrow enough for every SM to have programs (mixtral at one token: 2 experts x 4096 / 128 =
    64 GEMM2 programs on 132 SMs), wider K steps for long GEMM2 reductions, and GEMM2 in parts where its
    grid stays short. Group scales stay on the weight tiles: there the compiler loads the backend's
    prepared scales a stage ahead (``prepared_scales``), which it cannot do for scales of a partial
    product (group_scales="accumulator", whose loads wait each step). H200, 2026-12-02, graphs, prepared
    scales, w4a16 on the weights vs the partial products: mixtral at one token 125 vs 154 us, dsv3 at one
    116 vs 167, at 16 tokens 1101 vs 1118 (on the stored scales the partial products had won: dsv3 at 16
    tokens 1033 vs 1072 us). Loading those scales a step ahead by hand (fewer instructions: mixtral GEMM1's
    loop 459 -> 419) did not change the order: mixtral at one token 120 vs 162 us, dsv3 at one 114 vs 139,
    at 16 tokens 1006 vs 1114 (a later call, same card), so the kernels keep the plain loads."""
    cfg = with_loads(cfg, gemm1="pointer", gemm2="pointer")
    w = problem.quant.weights
    tiles, rows_per_expert = _row_tiles(problem)
    if rows_per_expert > 16:
        return cfg
    update = {name: tile for name in ("gemm1", "gemm2")
              if (tile := _weight_only_decode_tile(name, getattr(cfg, name), problem)) != getattr(cfg, name)}
    if w.format in PAIRED_DEQUANT:
        update["dequant_math"] = "pairs"
    if w.packed and problem.intermediate_size < LONG_REDUCTION:
        update["decode_order"] = "masks"  # measured: the comment of PAIRED_DEQUANT
    cfg = cfg.model_copy(update=update) if update else cfg
    return _split_short_grids(cfg, problem, tiles, WEIGHT_ONLY_SPLIT)


def _weight_only_decode_tile(name: str, tile: GemmTile, problem: ExpertsProblem) -> GemmTile:
    """One GEMM's tile while weight-only weights stream (up to 16 rows an expert): the measured rules
    below, then its output columns narrowed until the grid has MIN_PROGRAMS programs."""
    w = problem.quant.weights
    tiles, rows_per_expert = _row_tiles(problem)
    cols = problem.intermediate_size if name == "gemm1" else problem.hidden_size
    long = problem.intermediate_size >= LONG_REDUCTION
    update = {}
    e2m1 = w.format in ("mxfp4", "nvfp4")
    if name == "gemm2" and long and (e2m1 or (w.format == "int8" and rows_per_expert <= 8)):
        update["block_k"] = 256  # fewer, larger steps of a long reduction
    if name == "gemm1" and w.format == "int4" and not w.zero_point and rows_per_expert <= DEEP_INT4_GEMM1_ROWS:
        update.update(block_k=256, num_stages=4)
    if long and e2m1 and rows_per_expert <= WIDE_E2M1_ROWS:
        update["block_n"] = 128  # no narrowing
        if name == "gemm2":
            update["num_stages"] = 4
        return tile.model_copy(update=update)
    bn, bk = tile.block_n, update.get("block_k", tile.block_k)
    while bn > 32 and tiles * -(-cols // bn) < MIN_PROGRAMS and _scales_pipeline(w, bn // 2, bk, tile.num_warps):
        bn //= 2
    return tile.model_copy(update={**update, "block_n": bn})


# Symmetric int4 GEMM1 tiles take 256-deep K steps in 4 stages up to this many rows an expert (H200,
# 2026-12-03, graphs, us, heuristic -> g1 bk256 s4: w4a16 mixtral at one token 122.4 -> 114.8, dsv3 117.2 ->
# 111.6, qwen3 31.5 -> 29.8, dsv3 at 16 tokens (one row an expert) 1078 -> 1063; mixtral at 16 tokens (4 rows)
# 364.1 -> 368.6, so not there; w4a16_zp mixed (mixtral at one token 134.8 -> 125.2, dsv3 128.8 -> 143.3,
# at 16 tokens 1155 -> 1216), so not with zero points)
DEEP_INT4_GEMM1_ROWS = 2

# e2m1 weights (mxfp4, nvfp4) below a long GEMM2 reduction (LONG_REDUCTION: mixtral) keep 128-wide output
# tiles in both GEMMs, GEMM2 in 4 stages, instead of narrowing them, up to this many rows an expert (H200,
# 2026-12-03, graphs, us, heuristic -> both 128 wide: mxfp4 mixtral at 1 / 16 tokens 139.9 -> 123.3 /
# 413.1 -> 411.8, nvfp4 142.1 -> 126.5 / 431.4 -> 404.6; GEMM1 alone 128 wide 132.8 (mxfp4 at one token),
# GEMM2 alone 132.3; at dsv3 the same tiles were slower: mxfp4 at one token 120.0 -> 138.2; and at mixtral's
# 64 tokens, 16 rows an expert, too: mxfp4 502 -> 566, nvfp4 543 -> 572, a later call)
WIDE_E2M1_ROWS = 4


# Formats whose decode tiles (up to 16 rows an expert) multiply their scales two elements a packed fma
# (dequant_math="pairs"; the same bits). H200, 2026-12-02, graphs, scalar -> pairs, us: mxfp4 mixtral at
# 1 / 16 tokens 140.3 -> 139.4 / 455.7 -> 409.9, dsv3 131.2 -> 125.8 / 1426.0 -> 1269.6; nvfp4 within 1.5%
# either way (141.9 -> 140.0, 430.7 -> 429.6, 126.5 -> 125.1, 1375.1 -> 1379.4), w4a16 and w4a16_zp slower
# at mixtral's one token (122.0 -> 128.1, 134.8 -> 140.6): ptxas already pairs their scalar multiplies.
# The 4-bit decode tiles leave the nibble decode's values in mask order (decode_order="masks") unless GEMM2's
# reduction is long (LONG_REDUCTION): H200, 2026-12-02, graphs, "bytes" -> "masks" (mxfp4 with pairs on both
# sides), us: dsv3 at 1 / 16 tokens w4a16 115.0 -> 116.7 / 1065.3 -> 1052.1, w4a16_zp
# 128.0 -> 127.5 / 1189.9 -> 1152.3, nvfp4 126.8 -> 120.5 / 1335.2 -> 1264.9, mxfp4 125.8 -> 119.6 /
# 1269.6 -> 1183.8; gptoss120b mxfp4 (scalar -> pairs and masks) 78.9 -> 72.7 / 551.9 -> 477.0; but mixtral
# (a 14336-long reduction) slower: w4a16 119.6 -> 132.2 / 364.0 -> 385.7, mxfp4 at 16 tokens 409.9 -> 429.4;
# and 64-row tiles (the wgmma path) far slower (mixtral at 4096 tokens, w4a16 7145 -> 9636 us)
PAIRED_DEQUANT = ("mxfp4",)


# GEMM2 grids shorter than MIN_PROGRAMS at the narrowest tile split their reduction (H200, 2026-12-02,
# mixtral at one token, graphs, GEMM2 2 x 4096 / 32 programs, us at 1 / 2 / 4 / 8 parts: w4a16 201 / 150 /
# 131 / 127, mxfp4 193 / 156 / 156 / 159, nvfp4 184 / 150 / 149 / 152, w8a16 143 / 134 / 128 / 130; bf16
# 187). W8A8 (its GEMM2 tiles 128 wide: 64 programs there) takes the tuned fp8_channel file's decode tiles
# with 2 parts: fp8_tensor 199 -> 128 us, int8_channel 251 -> 155, fp8_channel 224 -> 139 (heuristic tiles
# -> these)
WEIGHT_ONLY_SPLIT = 4
W8A8_SPLIT = 2


# The dtype of each group-scaled weight-only format's scales in the Triton backend's prepared copy
# (``prepared_scales``): int4's bf16/fp16/fp32 scales (and zero points) as fp32, mxfp4's e8m0 exponents as the
# bf16 values the kernels build from them, nvfp4's e4m3 as they are
PREPARED_SCALE_DTYPES = {"int4": torch.float32, "mxfp4": torch.bfloat16, "nvfp4": torch.float8_e4m3fn}


def _scales_pipeline(w, block_n: int, block_k: int, warps: int) -> bool:
    """Whether a K step's tile of prepared group scales (``prepared_scales``: [groups, block_n], the columns
    contiguous; int4 fp32, mxfp4 bf16, nvfp4 e4m3) gives each thread 4 contiguous bytes or more, what the
    compiler needs to load it a pipeline stage ahead (a tile smaller than the threads repeats one element
    a thread). H200, 2026-12-02, dsv3 at one token, GEMM1 32 columns wide (mxfp4: [4, 32] bf16, 2 bytes a
    thread) 143 us, 64 wide 76 us; bf16 112 us."""
    if w.format not in PREPARED_SCALE_DTYPES:
        return True
    size = PREPARED_SCALE_DTYPES[w.format].itemsize
    elems = max(1, block_k // w.group_size) * block_n
    return max(1, elems // (32 * warps)) * size >= 4


def _split_short_grids(cfg: KernelConfig, problem: ExpertsProblem, tiles: int, parts: int) -> KernelConfig:
    """``cfg`` with GEMM2's reduction in ``parts`` when its grid has fewer than MIN_PROGRAMS programs (and
    every part keeps two K steps or more)."""
    steps = -(-problem.intermediate_size // cfg.gemm2.block_k)
    while parts > 1 and steps < 2 * parts:
        parts //= 2
    if _gemm2_programs(problem, tiles, cfg) >= MIN_PROGRAMS or parts == 1:
        return cfg
    return cfg.model_copy(update={"split_k": parts, "combine": "reduce"})


# W8A8 GEMM2 reductions (the intermediate size N) up to this long take 3 pipeline stages while the weights
# stream on a grid of one to two MIN_PROGRAMS: by the shared-memory estimate the smaller pipeline (55
# instead of 92 KB at 16 x 128 x 128 tiles) lets four programs share an SM instead of two, so such a grid
# can run in one wave instead of two (H200, 2026-12-03, graphs, dsv3 at one token, 448
# programs, N = 2048 in 16 K steps of 128: fp8_block 120.0 -> 112.9 us, fp8_channel 118.5 -> 113.5,
# fp8_tensor 118.9 -> 115.8). Longer grids (dsv3 at 16 tokens: 7168 programs) keep their stages;
# qwen3's N = 768 had 3 already
W8A8_SHORT_REDUCTION = 2048


def _w8a8_decode_tiles(cfg: KernelConfig, problem: ExpertsProblem) -> KernelConfig:
    """W8A8 while the weights stream (up to 16 rows an expert): on a GEMM2 grid of one to two MIN_PROGRAMS
    with a reduction up to W8A8_SHORT_REDUCTION, GEMM2 in 3 stages; on a grid short of MIN_PROGRAMS,
    GEMM1 32 x 256 and GEMM2 64 x 256 tiles (128-deep for block scales: a K step never straddles a scale
    block) with GEMM2 in W8A8_SPLIT parts, where the reduction is long enough for them."""
    tiles, rows_per_expert = _row_tiles(problem)
    programs = _gemm2_programs(problem, tiles, cfg)
    if rows_per_expert > 16:
        return cfg
    if programs >= MIN_PROGRAMS:
        if programs <= 2 * MIN_PROGRAMS and problem.intermediate_size <= W8A8_SHORT_REDUCTION:
            cfg = cfg.model_copy(update={"gemm2": cfg.gemm2.model_copy(update={"num_stages": 3})})
        return cfg
    bk = min(256, _block_k_of_scales(problem) or 256)
    decode = cfg.model_copy(update={"gemm1": cfg.gemm1.model_copy(update={"block_n": 32, "block_k": bk}),
                                    "gemm2": cfg.gemm2.model_copy(update={"block_n": 64, "block_k": bk})})
    split = _split_short_grids(decode, problem, tiles, W8A8_SPLIT)
    return split if split.split_k > 1 else cfg  # measured together only


# GEMM2 reductions (the intermediate size N) from this long take 256-wide K steps while weight-only
# weights stream (H200, 2026-12-02, mixtral at one token, graphs: mxfp4 254 -> 194 us, nvfp4 274 -> 213,
# w8a16 151 -> 139; at 64 tokens, 16 rows an expert, mxfp4 647 -> 604 us but w8a16 482 -> 555, so int8
# only up to 8 rows; at dsv3's N = 2048 the 128-wide steps stayed 2-3% faster; fp8 weights, decoded
# through shared memory, measured mixed; int4 keeps the steps of its measured configs)
LONG_REDUCTION = 8192


def _block_k_of_scales(problem: ExpertsProblem) -> int | None:
    """The K width of a W8A8 scheme's weight-scale blocks (None for other schemes)."""
    w, act = problem.quant.weights, problem.quant.activations
    if w is None or act is None or w.granularity != "block":
        return None
    return w.block[1]


# One config for every batch size: with it a token's output does not depend on the rest of the batch.
BATCH_INVARIANT_CONFIG = KernelConfig(
    block_m=64, gemm1=GemmTile(block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=3),
    gemm2=GemmTile(block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=3),
)


def workspace_bytes(num_tokens: int, top_k: int, num_experts: int, hidden: int, inter: int, elt: int,
                    block_m: int) -> int:
    """Device memory one chunk of ``num_tokens`` allocates besides its output: the activated
    intermediate in sorted order, padded to row tiles ([P, N] with P the padded pair count; [k, N] for
    one token), the per-pair expert outputs [T*k, K], both in the input dtype, and the int32 alignment."""
    pairs = num_tokens * top_k
    padded = -(-(pairs + min(num_experts, pairs) * (block_m - 1)) // block_m) * block_m
    inter_rows = pairs if num_tokens == 1 else padded
    return (inter_rows * inter + pairs * hidden) * elt + 4 * (padded + padded // block_m + 4 * num_experts + 1)
