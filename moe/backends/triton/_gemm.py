"""Triton kernels for the two expert projections (kernels only; modes.py derives their constexprs and
__init__.py launches them).

Each kernel takes its choices as mode values, never one boolean per format (modes.py names them):
- ROUTE: SORTED row tiles from the alignment (BLOCK_M pairs of one expert each), or DIRECT for a single
  token (one pair a tile, its expert read from the routing ids: a token's k experts are distinct);
- LOADS: weight tiles (GEMM2: its input tiles too) by POINTER loads or through TMA tensor descriptors;
- GATE_UP (gated GEMM1): TWO_DOTS, a gate and an up tile with a dot each, or ONE_DOT, one tile of
  [gate | up] columns (2 x BLOCK_N wide) with one dot, split after the loop;
- W_SCALE: the weights' scales (NO_SCALE; TENSOR_SCALE: one fp32 per expert and part; CHANNEL_SCALE: one
  per output row; BLOCK_SCALE: one per W_BN x W_BK block, applied inside the K loop to the W8A8 dot;
  WEIGHT_BLOCK: one per W_BN x W_BK block (groups: 1 x G), applied inside the K loop to the dequantized
  weight tile before the dot (weight-only); WEIGHT_BLOCK_GLOBAL: the same and one fp32 per expert and
  part in the epilogue (nvfp4's global scale); WEIGHT_GROUP_ACC: int4 groups spanning whole K steps,
  applied to each step's partial product instead, ``acc += (a @ q) * s`` (zero points through the input's
  row sums: ``- z * sum(a)``), which leaves only the code's decoding per weight element);
- W_CODE: how a weight element is stored (W_NATIVE: a dot operand as it is; W_CONVERT: int8 or e4m3
  converted to the activation dtype in the loop; W_INT4 / W_INT4_ZP: two nibbles a byte, ``q - 8`` or
  ``q - zero``; W_E2M1: two e2m1 codes a byte). The 4-bit codes become floats by bit placement, never a
  conversion instruction: int4 by OR-ing the code into the mantissa of a power of two (``0x4300`` is
  bf16 128.0, ``0x6400`` fp16 1024.0, ``0x4B000000`` fp32 2^23) and subtracting it (the zero point
  follows); e2m1 by placing its exponent and mantissa bits. On the GPU, bf16/fp16 activations decode
  four bytes a 32-bit register in one pure unary inline-asm op per nibble half (``_nibble_asm``: packed
  16-bit fma, e2m1 times 2^126 / 2^14), which the compiler hoists its dot-operand layout conversion
  above, so the tile is decoded in the dot's registers; the interpreter (no inline assembly, bf16
  arithmetic not IEEE) and fp32 activations use the fp32 constants and a select for e2m1's subnormal
  0.5 (``_nibble_values``). Packed weights are loaded [BLOCK_K / 2, BLOCK_N] and
  their low (even k) and high (odd k) nibbles meet the even and odd columns of the input tile in two
  dots, so no shuffle interleaves them;
- A_SCALE: the GEMM input's quantization (A_NONE: the activation dtype; A_TENSOR: one scale; A_TOKEN: one
  per row; A_GROUP: one per row and A_GK columns, inside the K loop; A_EXPERT: one per expert, static:
  GEMM1 quantizes its gathered rows with it, GEMM2 reads rows quantized with it; A_GROUP_LOAD, GEMM2 of
  fp8 block scales with BLOCK_K = the group: it reads GEMM1's unquantized rows and quantizes each
  [BLOCK_M, BLOCK_K] tile, one group a row, as it loads it, so no quantization pass runs between the GEMMs;
  A_TOKEN_LOAD / A_TENSOR_LOAD, GEMM2 of dynamic per-token / per-tensor schemes: the same, the scale made
  from the row's (the tensor's) absolute max that GEMM1 gathered (OUT_AMAX: ROW_AMAX / TENSOR_AMAX);
- INT: int8 operands with int32 accumulation (fp8 and the activation dtypes accumulate in fp32);
- INTERP: the one interpreter switch (``moe.kernels._jit``).
Each quantization scheme is a (W_SCALE, A_SCALE, INT) triple (modes.py), never a boolean per format.
"""

import triton
import triton.language as tl

from ...kernels._activation import activate as _activate
from ...kernels._jit import cast, chain, dot, local_expert
from ...kernels._quant import quantize, reciprocal, scale_of

SORTED, DIRECT = 0, 1
POINTER, TMA = 0, 1
TWO_DOTS, ONE_DOT = 0, 1
NO_SCALE, TENSOR_SCALE, CHANNEL_SCALE, BLOCK_SCALE, WEIGHT_BLOCK, WEIGHT_BLOCK_GLOBAL = 0, 1, 2, 3, 4, 5
WEIGHT_GROUP_ACC = 6
W_NATIVE, W_CONVERT, W_INT4, W_INT4_ZP, W_E2M1 = 0, 1, 2, 3, 4
A_NONE, A_TENSOR, A_TOKEN, A_GROUP, A_EXPERT, A_GROUP_LOAD, A_TOKEN_LOAD, A_TENSOR_LOAD = 0, 1, 2, 3, 4, 5, 6, 7
A_LOADED = (A_GROUP_LOAD, A_TOKEN_LOAD, A_TENSOR_LOAD)  # GEMM2 input modes quantized as they are loaded
NO_AMAX, TENSOR_AMAX, ROW_AMAX = 0, 1, 2


@triton.jit
def _rows(pid_m, sorted_ptr, block_expert_ptr, total_ptr, ids_ptr, emap_ptr, num_pairs, num_global, num_local,
          ROUTE: tl.constexpr, HAS_MAP: tl.constexpr, BLOCK_M: tl.constexpr):
    """The pair index of each row of tile ``pid_m`` (num_pairs where empty) and the tile's local expert
    (-1 when the tile has no work: past the end, or a DIRECT pair routed elsewhere or out of range)."""
    r = tl.arange(0, BLOCK_M)
    if ROUTE == 1:
        pair = tl.where(r == 0, pid_m, num_pairs)
        expert = local_expert(ids_ptr, emap_ptr, pid_m, True, num_global, num_local, HAS_MAP)
    else:
        total = tl.load(total_ptr)
        expert = tl.where(pid_m * BLOCK_M < total, tl.load(block_expert_ptr + pid_m), -1)
        pair = tl.load(sorted_ptr + pid_m * BLOCK_M + r)
    return pair, expert


@triton.jit
def _first_row(pid_m, ROUTE: tl.constexpr, BLOCK_M: tl.constexpr):
    """The intermediate row of a tile's first pair: tiles are stored in sorted order, BLOCK_M rows each,
    except DIRECT tiles, one pair each."""
    if ROUTE == 1:
        return pid_m
    return pid_m * BLOCK_M


@triton.jit
def _tile_ids(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def _load_a(ptrs, kmask, rw, s_gather, EVEN_K: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr,
            GATHER_QUANT: tl.constexpr, INT: tl.constexpr, INTERP: tl.constexpr):
    """A [BLOCK_M, BLOCK_K] input tile (columns past the reduction read 0 unless EVEN_K), scaled by the
    router weight ``rw`` when it applies on the input, and with GATHER_QUANT quantized here by the
    expert's static scale ``s_gather`` (after the router weight, as the reference does)."""
    a = tl.load(ptrs) if EVEN_K else tl.load(ptrs, mask=kmask[None, :], other=0.0)
    if WEIGHT_ON_INPUT:
        a = cast(a.to(tl.float32) * rw[:, None], ptrs.dtype.element_ty, INTERP)
    if GATHER_QUANT:
        a = quantize(a.to(tl.float32) * reciprocal(s_gather), INT, INTERP)
    return a


@triton.jit
def _load_w(ptrs, kmask, cmask, EVEN_K: tl.constexpr):
    """A [BLOCK_K, columns] weight tile by pointers: columns outside ``cmask`` read 0, and rows past the
    reduction unless EVEN_K (no tail, no mask along it)."""
    if EVEN_K:
        return tl.load(ptrs, mask=cmask[None, :], other=0.0)
    return tl.load(ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def _zeros(BLOCK_M: tl.constexpr, COLS: tl.constexpr, INT: tl.constexpr):
    if INT:  # noqa: SIM108  (an if: Triton 3.6 does not fold a conditional expression on constexprs here)
        acc = tl.zeros([BLOCK_M, COLS], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, COLS], dtype=tl.float32)
    return acc


@triton.jit
def _nibble_values(q, W_CODE: tl.constexpr):
    """Codes 0..15 (``q``, uint8) as float32 values, built from bits: int4 ``q - 8`` (``q`` where zero
    points follow), or the e2m1 value of the code (the interpreter and fp32 activations; the GPU's
    16-bit path is ``_nibbles_packed``)."""
    u = q.to(tl.uint32)
    if W_CODE == 4:
        mag = tl.where((u & 6) != 0, ((u & 7) << 22) + (126 << 23), (u & 1) * (126 << 23))
        v = (mag | ((u & 8) << 28)).to(tl.uint32).to(tl.float32, bitcast=True)
    elif W_CODE == 3:
        v = (u | 0x4B000000).to(tl.uint32).to(tl.float32, bitcast=True) - 8388608.0  # 2^23
    else:
        v = (u | 0x4B000000).to(tl.uint32).to(tl.float32, bitcast=True) - 8388616.0  # 2^23 + 8
    return v


@triton.jit
def _scale_values(s, W16: tl.constexpr, dt):
    """Weight scales in dt (W16) or float32: e8m0 bytes (uint8: 2^(s - 127)) placed in the exponent field
    (byte 0, 2^-127, reads 0); float scales (fp32, bf16, fp16, e4m3) converted."""
    if s.dtype == tl.uint8:
        if W16 and dt == tl.bfloat16:
            v = (s.to(tl.uint16) << 7).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            v = (s.to(tl.uint32) << 23).to(tl.uint32).to(tl.float32, bitcast=True)
    else:
        v = s.to(tl.float32)
    if W16:
        v = v.to(dt)
    return v


def _nibble_asm(high: bool, code: str, dtype: str, masks: bool) -> str:
    """PTX for one pure unary inline-asm op (``pack=4``): four bytes in ``$2`` -> the low (even k) or high
    (odd k) nibble of each as a 16-bit value, two to a register: ``masks``, the pairs one mask selects
    (``$0``: bytes 0 and 2, ``$1``: 1 and 3; the op's four results are bytes ``NIBBLE_ORDER``, and
    ``_nibble_inputs`` puts the input's columns in that order), else in byte order (``$0``: bytes 0 and 1,
    ``$1``: 2 and 3, a byte permute a register pair).
    Codes are placed in the bits of a 16-bit float and fixed with one packed fma per two elements:
    int4 into the mantissa of 128.0 (bf16) / 1024.0 (fp16), minus that (and 8 unless zero points
    follow); e2m1 magnitude bits into exponent and mantissa, the sign to bit 15, times 2^126 (bf16) /
    2^14 (fp16), which turns the placed bits into the value (0.5, the one subnormal, included)."""
    bf16 = dtype == "bf16"
    sa, sb = (4, 12) if high else (0, 8)  # pair a: bytes 0 and 2, pair b: bytes 1 and 3
    fma = "fma.rn.bf16x2" if bf16 else "fma.rn.f16x2"
    if code == "e2m1":
        shift, mask, mul, add = (6, "0x01C001C0", "0x7E807E80", "0x80008000") if bf16 else (
            9, "0x0E000E00", "0x74007400", "0x80008000")
        place = "".join(f"shr.u32 t{i}, $2, {sh}; shl.b32 s{i}, t{i}, 12; and.b32 s{i}, s{i}, 0x80008000; "
                        f"shl.b32 t{i}, t{i}, {shift}; lop3.b32 t{i}, t{i}, {mask}, s{i}, 0xEA; "
                        for i, sh in ((0, sa), (1, sb)))
    else:
        magic = "0x43004300" if bf16 else "0x64006400"
        mul = "0x3F803F80" if bf16 else "0x3C003C00"  # 1.0
        add = {("bf16", "int4"): "0xC308C308", ("bf16", "int4_zp"): "0xC300C300",  # -136, -128
               ("fp16", "int4"): "0xE408E408", ("fp16", "int4_zp"): "0xE400E400"}[(dtype, code)]  # -1032, -1024
        place = "".join(f"shr.u32 t{i}, $2, {sh}; lop3.b32 t{i}, t{i}, 0x000F000F, {magic}, 0xEA; "
                        for i, sh in ((0, sa), (1, sb)))
    order = ("mov.b32 $0, t0; mov.b32 $1, t1; " if masks else
             "prmt.b32 $0, t0, t1, 0x5410; prmt.b32 $1, t0, t1, 0x7632; ")
    return ("{ .reg .b32 t0, t1, s0, s1, m, c; " + place + order +
            f"mov.b32 m, {mul}; mov.b32 c, {add}; {fma} $0, $0, m, c; {fma} $1, $1, m, c; }}")


# the bytes whose nibbles ``_nibble_asm``'s four results are, in order (pairs a and b)
NIBBLE_ORDER = (0, 2, 1, 3)


_ASM = {(h, c, d, m): tl.constexpr(_nibble_asm(h, c, d, m)) for h in (False, True)
        for c in ("int4", "int4_zp", "e2m1") for d in ("bf16", "fp16") for m in (False, True)}
_INT4_LO_BF16, _INT4_HI_BF16 = _ASM[False, "int4", "bf16", False], _ASM[True, "int4", "bf16", False]
_INT4_LO_FP16, _INT4_HI_FP16 = _ASM[False, "int4", "fp16", False], _ASM[True, "int4", "fp16", False]
_ZP_LO_BF16, _ZP_HI_BF16 = _ASM[False, "int4_zp", "bf16", False], _ASM[True, "int4_zp", "bf16", False]
_ZP_LO_FP16, _ZP_HI_FP16 = _ASM[False, "int4_zp", "fp16", False], _ASM[True, "int4_zp", "fp16", False]
_E2M1_LO_BF16, _E2M1_HI_BF16 = _ASM[False, "e2m1", "bf16", False], _ASM[True, "e2m1", "bf16", False]
_E2M1_LO_FP16, _E2M1_HI_FP16 = _ASM[False, "e2m1", "fp16", False], _ASM[True, "e2m1", "fp16", False]
_MINT4_LO_BF16, _MINT4_HI_BF16 = _ASM[False, "int4", "bf16", True], _ASM[True, "int4", "bf16", True]
_MINT4_LO_FP16, _MINT4_HI_FP16 = _ASM[False, "int4", "fp16", True], _ASM[True, "int4", "fp16", True]
_MZP_LO_BF16, _MZP_HI_BF16 = _ASM[False, "int4_zp", "bf16", True], _ASM[True, "int4_zp", "bf16", True]
_MZP_LO_FP16, _MZP_HI_FP16 = _ASM[False, "int4_zp", "fp16", True], _ASM[True, "int4_zp", "fp16", True]
_ME2M1_LO_BF16, _ME2M1_HI_BF16 = _ASM[False, "e2m1", "bf16", True], _ASM[True, "e2m1", "bf16", True]
_ME2M1_LO_FP16, _ME2M1_HI_FP16 = _ASM[False, "e2m1", "fp16", True], _ASM[True, "e2m1", "fp16", True]


def _pairs_asm(zero_point: bool, dtype: str) -> str:
    """PTX of ``_dequant_pairs`` (``pack=2``: two 16-bit values a register; ``$1`` the scales, then ``$2`` the
    negated zero points and ``$3`` the values, or ``$2`` the values): ``t = v * 1 + z``, then ``s * t + (-0)``
    (packed 1.0: 0x3F80 bf16, 0x3C00 fp16; -0: 0x8000 in both)."""
    op, one = ("fma.rn.bf16x2", "0x3F803F80") if dtype == "bf16" else ("fma.rn.f16x2", "0x3C003C00")
    if zero_point:  # (packed operands take registers, not immediates)
        return (f"{{ .reg .b32 t, u, m; mov.b32 u, {one}; mov.b32 m, 0x80008000; {op} t, $3, u, $2; "
                f"{op} $0, $1, t, m; }}")
    return f"{{ .reg .b32 m; mov.b32 m, 0x80008000; {op} $0, $1, $2, m; }}"


_SCALE_BF16, _SCALE_FP16 = tl.constexpr(_pairs_asm(False, "bf16")), tl.constexpr(_pairs_asm(False, "fp16"))
_ZP_SCALE_BF16, _ZP_SCALE_FP16 = tl.constexpr(_pairs_asm(True, "bf16")), tl.constexpr(_pairs_asm(True, "fp16"))


@triton.jit
def _nibbles_packed(w, HIGH: tl.constexpr, W_CODE: tl.constexpr, MASKS: tl.constexpr, dt):
    """GPU, 16-bit activations: the low or high nibble of each byte of ``w`` as its code's value in dt
    (int4 ``q - 8``, or ``q`` where zero points follow; e2m1), by one pure unary inline-asm op over four
    bytes a register (``_nibble_asm``). Being pure and unary, the compiler moves the conversion to the
    dot-operand layout above it, onto the loaded bytes: the tile is decoded in registers, in the layout
    the dot reads, with no shared-memory round trip of the decoded values."""
    if MASKS:  # the results in mask order (NIBBLE_ORDER)
        if W_CODE == 4:
            v = _asm(w, _ME2M1_LO_BF16, _ME2M1_HI_BF16, _ME2M1_LO_FP16, _ME2M1_HI_FP16, HIGH, dt)
        elif W_CODE == 3:
            v = _asm(w, _MZP_LO_BF16, _MZP_HI_BF16, _MZP_LO_FP16, _MZP_HI_FP16, HIGH, dt)
        else:
            v = _asm(w, _MINT4_LO_BF16, _MINT4_HI_BF16, _MINT4_LO_FP16, _MINT4_HI_FP16, HIGH, dt)
    else:
        if W_CODE == 4:
            v = _asm(w, _E2M1_LO_BF16, _E2M1_HI_BF16, _E2M1_LO_FP16, _E2M1_HI_FP16, HIGH, dt)
        elif W_CODE == 3:
            v = _asm(w, _ZP_LO_BF16, _ZP_HI_BF16, _ZP_LO_FP16, _ZP_HI_FP16, HIGH, dt)
        else:
            v = _asm(w, _INT4_LO_BF16, _INT4_HI_BF16, _INT4_LO_FP16, _INT4_HI_FP16, HIGH, dt)
    return v


@triton.jit
def _asm(w, LO_BF16: tl.constexpr, HI_BF16: tl.constexpr, LO_FP16: tl.constexpr, HI_FP16: tl.constexpr,
         HIGH: tl.constexpr, dt):
    """One pure unary inline-asm op, four bytes of ``w`` a call -> two registers of 16-bit values: the
    program for dt and the nibble (if / else: Triton 3.6 does not fold a conditional expression on
    constexpr strings)."""
    if dt == tl.bfloat16:
        if HIGH:
            v = tl.inline_asm_elementwise(HI_BF16, "=r,=r,r", [w], dtype=tl.bfloat16, is_pure=True, pack=4)
        else:
            v = tl.inline_asm_elementwise(LO_BF16, "=r,=r,r", [w], dtype=tl.bfloat16, is_pure=True, pack=4)
    else:
        if HIGH:
            v = tl.inline_asm_elementwise(HI_FP16, "=r,=r,r", [w], dtype=tl.float16, is_pure=True, pack=4)
        else:
            v = tl.inline_asm_elementwise(LO_FP16, "=r,=r,r", [w], dtype=tl.float16, is_pure=True, pack=4)
    return v


@triton.jit
def _weight_scales(sw, sz, smask, stride_g, k0, K, W_SCALE: tl.constexpr, W_CODE: tl.constexpr, W_BK: tl.constexpr,
                   W_PACK: tl.constexpr, W16: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, dt):
    """Weight-only group/block scales (and zero points) of the K step at ``k0``, over a weight tile of
    BLOCK_K / W_PACK rows: [1, columns] when a group spans the step, else (groups divide the step: modes.py
    checks one divides the other) one row of each group's values per tile row (loaded [groups, columns],
    repeated W_BK / W_PACK times down). Made before the
    weight tile is loaded, so that in the dequantization ``s * (zero + v)`` the weights' own chain is the
    last operand: the compiler's layout hoisting walks that chain first and finds the weight load
    (``sw``, ``sz``: each column's row of scales / zero points, ``smask`` the columns in range, ``stride_g``
    the groups' stride: 1 as stored, the rows' count in the backend's prepared [E, groups, rows] copy,
    whose contiguous columns the compiler loads a stage ahead). Other schemes: ``sw`` as it is."""
    if W_CODE > 0 and W_SCALE >= 4:
        if W_BK % BLOCK_K == 0:
            g = (k0 // W_BK) * stride_g
            s = _scale_values(tl.load(sw + g, mask=smask, other=0.0), W16 and W_SCALE != 6, dt)[None, :]
            if W_CODE == 3:  # noqa: SIM108  (as above)
                z = -(_zero_values(tl.load(sz + g, mask=smask, other=0.0), W16, dt)[None, :])
            else:
                z = 0.0
        else:
            GROUPS: tl.constexpr = BLOCK_K // W_BK
            ROWS: tl.constexpr = W_BK // W_PACK
            g = (k0 // BLOCK_K) * GROUPS + tl.arange(0, GROUPS)  # (a multiple of GROUPS, as the compiler sees)
            if not EVEN_K:  # past K: the last group. Unclamped, the groups of a step are contiguous, so the
                g = tl.minimum(g, tl.cdiv(K, W_BK) - 1)  # compiler pipelines their load (4 bytes or more)
            s = _scale_values(tl.load(sw[None, :] + g[:, None] * stride_g, mask=smask[None, :], other=0.0), W16, dt)
            s = tl.reshape(tl.broadcast_to(s[:, None, :], [GROUPS, ROWS, s.shape[1]]), [GROUPS * ROWS, s.shape[1]])
            if W_CODE == 3:
                z = -_zero_values(tl.load(sz[None, :] + g[:, None] * stride_g, mask=smask[None, :], other=0.0), W16, dt)
                z = tl.reshape(tl.broadcast_to(z[:, None, :], [GROUPS, ROWS, z.shape[1]]),
                               [GROUPS * ROWS, z.shape[1]])
            else:
                z = 0.0
    else:
        s = sw
        z = sz
    return s, z


@triton.jit
def _scale_col(n, nmask, W_CODE: tl.constexpr):
    """The scale row of output column ``n``: weight-only group scales as they are (their loads are masked,
    and an unclamped column keeps its contiguity, which lets the compiler pipeline the load); block and
    channel scales clamped to a column in range (their loads are not masked)."""
    if W_CODE > 0:  # noqa: SIM108  (a constexpr branch: one of the two is compiled)
        c = n
    else:
        c = tl.where(nmask, n, 0)
    return c


@triton.jit
def _zero_values(z, W16: tl.constexpr, dt):
    """Zero points (uint8) as values in dt (W16) or float32."""
    if W16:  # noqa: SIM108  (as above)
        v = z.to(dt)
    else:
        v = z.to(tl.float32)
    return v


@triton.jit
def _to_operand(v, dt, INTERP: tl.constexpr):
    if INTERP:
        v = cast(v.to(tl.float32), dt, INTERP)
    return v.to(dt)


@triton.jit
def _dequant_pairs(s, z, v, ZP: tl.constexpr):
    """``s * (z + v)`` (``s * v`` without zero points) for a 16-bit tile ``v``, two elements an instruction:
    packed fmas in inline assembly (``fma.rn.bf16x2`` / ``f16x2``, on every GPU these kernels decode on),
    ``z + v`` as ``v * 1 + z`` and the product as ``s * t + (-0)``, each rounded once to nearest even: the bits
    of the scalar ``z + v`` and ``s * t`` (a -0 addend keeps a product's sign of zero). Pure, so the
    compiler still moves the dot's layout conversion above it (checked in the sm_90 TTGIR)."""
    s = tl.broadcast_to(s, v.shape).to(v.dtype)
    if ZP:
        z = tl.broadcast_to(z, v.shape).to(v.dtype)
        if v.dtype == tl.bfloat16:
            r = tl.inline_asm_elementwise(_ZP_SCALE_BF16, "=r,r,r,r", [s, z, v], dtype=v.dtype, is_pure=True, pack=2)
        else:
            r = tl.inline_asm_elementwise(_ZP_SCALE_FP16, "=r,r,r,r", [s, z, v], dtype=v.dtype, is_pure=True, pack=2)
    else:
        if v.dtype == tl.bfloat16:
            r = tl.inline_asm_elementwise(_SCALE_BF16, "=r,r,r", [s, v], dtype=v.dtype, is_pure=True, pack=2)
        else:
            r = tl.inline_asm_elementwise(_SCALE_FP16, "=r,r,r", [s, v], dtype=v.dtype, is_pure=True, pack=2)
    return r


@triton.jit
def _nibble_inputs(a, HALF: tl.constexpr, MASKS: tl.constexpr):
    """The input tile's columns for the two nibble dots: even k (the low nibbles), odd k (the high). MASKS: in
    the order of ``_nibble_asm``'s results, whose four values of a 32-bit word are bytes 0, 2, 1, 3: the
    thread's four consecutive rows of a decoded tile in the dot's layout (its operand width is four for
    8-bit sources), so rows 4g + 2i + j hold bytes 4g + 2j + i, and the input's columns are swapped alike
    (a permute in the tile's index space, which the split of the even and odd columns absorbs)."""
    if MASKS:
        a = tl.reshape(a, [a.shape[0], HALF // 4, 2, 2, 2])  # column 8g + 4j + 2i + parity
        a = tl.reshape(tl.permute(a, (0, 1, 3, 2, 4)), [a.shape[0], HALF, 2])  # row 4g + 2i + j
    else:
        a = tl.reshape(a, [a.shape[0], HALF, 2])
    return tl.split(a)


@triton.jit
def _dequant_step(acc, a, w, s, z, W_SCALE: tl.constexpr, W_CODE: tl.constexpr, W16: tl.constexpr,
                  INTERP: tl.constexpr, IEEE: tl.constexpr, BLOCK_K: tl.constexpr, PAIRS: tl.constexpr):
    """A weight-only K step: the stored weight tile dequantized to the activation dtype, then the dot;
    ``s``/``z``: the step's scale and negated zero-point tiles (``_weight_scales``; unused without group
    or block scales and zero points). 8-bit (W_CONVERT): ``w`` [BLOCK_K, columns] converted. 4-bit: ``w`` is
    [BLOCK_K / 2, columns] bytes; the low nibbles (even k) dot the input's even columns, the high (odd k)
    its odd ones. W16 (GPU, 16-bit activations): dequantized in that dtype, the 4-bit codes by
    ``_nibbles_packed``, their scales (and zero points) with PAIRS by ``_dequant_pairs``; otherwise in
    float32 by ``_nibble_values``."""
    dt = a.dtype
    if W_CODE == 1:
        if W16 and w.dtype == tl.int8:  # noqa: SIM108  (as above)
            v = w.to(dt)  # one conversion in the dot's register layout (no truncation to stop the hoisting)
        else:  # e4m3 through fp32, which keeps the shared-memory round trip: decoded in the dot's layout it
            v = w.to(tl.float32)  # measured slower (H200, 2026-12-02: dsv3 at 16 tokens 1198 -> 1628 us)
        if W_SCALE >= 4:
            v = s * v  # the weights' chain last: see _weight_scales
        acc = dot(a, _to_operand(v, dt, INTERP), acc, INTERP, IEEE, False)
    else:
        HALF: tl.constexpr = BLOCK_K // 2
        MASKS: tl.constexpr = (W16 & 4) != 0
        if W16:
            lo = _nibbles_packed(w, False, W_CODE, MASKS, dt)
            hi = _nibbles_packed(w, True, W_CODE, MASKS, dt)
        else:
            lo = _nibble_values(w & 0xF, W_CODE)
            hi = _nibble_values(w >> 4, W_CODE)
        a_even, a_odd = _nibble_inputs(a, HALF, MASKS)
        if W_SCALE == 6:  # the group's scale (and zero point) on the step's partial product
            part = dot(a_even, _to_operand(lo, dt, INTERP), tl.zeros(acc.shape, dtype=tl.float32), INTERP, IEEE,
                       False)
            part = dot(a_odd, _to_operand(hi, dt, INTERP), part, INTERP, IEEE, False)
            if W_CODE == 3:  # z: the negated zero points; a @ (q - zero) = a @ q - zero * sum(a)
                part = part + tl.sum(a.to(tl.float32), axis=1)[:, None] * z.to(tl.float32)
            acc = acc + part * s.to(tl.float32)
        else:
            if PAIRS:  # the same bits, two elements an instruction
                lo = _dequant_pairs(s, z, lo, W_CODE == 3)
                hi = _dequant_pairs(s, z, hi, W_CODE == 3)
            else:
                if W_CODE == 3:
                    lo = z + lo
                    hi = z + hi
                lo = s * lo
                hi = s * hi
            acc = dot(a_even, _to_operand(lo, dt, INTERP), acc, INTERP, IEEE, False)
            acc = dot(a_odd, _to_operand(hi, dt, INTERP), acc, INTERP, IEEE, False)
    return acc


@triton.jit
def _step(acc, a, w, sa, sw, sz, k0, K, W_SCALE: tl.constexpr, W_CODE: tl.constexpr, W_BK: tl.constexpr,
          W16: tl.constexpr, INT: tl.constexpr, INTERP: tl.constexpr, IEEE: tl.constexpr, BLOCK_K: tl.constexpr):
    """One K step: ``acc += a @ w``, or with block scales ``acc += (a @ w) * sa[rows] * sw[cols]`` for the
    K block of ``k0`` (``sa``/``sw`` are base pointers of the row and column scales; + k0 // W_BK), or a
    weight-only step (W_CODE > 0) that dequantizes ``w`` first (``sw``/``sz``: then the step's scale and
    zero-point tiles from ``_weight_scales``)."""
    if W_CODE > 0:  # if / else, not early returns: a return does not stop the other branches compiling
        acc = _dequant_step(acc, a, w, sw, sz, W_SCALE, W_CODE, W16, INTERP, IEEE, BLOCK_K, (W16 & 2) != 0)
    elif W_SCALE == 3:
        kb = k0 // W_BK
        part = dot(a, w, tl.zeros(acc.shape, dtype=tl.float32), INTERP, IEEE, False)
        acc = acc + part * tl.load(sa + kb)[:, None] * tl.load(sw + kb)[None, :]
    else:
        acc = dot(a, w, acc, INTERP, IEEE, INT)
    return acc


@triton.jit
def _gemm1_one_dot(a_ptrs, w_desc, w_base, expert, n0, N, K, stride_wn, rw, s_gather, sa, ws_base, wz_base,
                   stride_wsr, stride_wsg, LOADS: tl.constexpr, EVEN_K: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr,
                   W_SCALE: tl.constexpr, W_CODE: tl.constexpr, W_PACK: tl.constexpr, W16: tl.constexpr,
                   GATHER_QUANT: tl.constexpr, INT: tl.constexpr, W_BN: tl.constexpr, W_BK: tl.constexpr,
                   INTERP: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """The K loop of a gated GEMM1 as one dot per step over [gate | up] columns: [BLOCK_M, 2 * BLOCK_N].
    TMA: one [1, 2, BLOCK_N, BLOCK_K] box of the [E, 2, N, K] view; gate rows past N read up rows, finite
    and never stored."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_kw = tl.arange(0, BLOCK_K // W_PACK)  # the weight tile's columns: bytes, two codes each when packed
    c = tl.arange(0, 2 * BLOCK_N)
    n = n0 + c % BLOCK_N
    cmask = n < N
    wrow = n + (c // BLOCK_N) * N  # columns 0..BLOCK_N: gate rows, then the up rows
    gu_ptrs = w_base + wrow[None, :].to(tl.int64) * stride_wn + offs_kw[:, None]
    # block scales: the gate's block rows, then the up's (a block never straddles the two)
    srow = ((c // BLOCK_N) * tl.cdiv(N, W_BN) + _scale_col(n, cmask, W_CODE) // W_BN) * stride_wsr
    sw, sz = ws_base + srow, wz_base + srow
    acc = _zeros(BLOCK_M, 2 * BLOCK_N, INT)
    for k0 in range(0, K, BLOCK_K):
        kmask = offs_k < K - k0
        a = _load_a(a_ptrs, kmask, rw, s_gather, EVEN_K, WEIGHT_ON_INPUT, GATHER_QUANT, INT, INTERP)
        wsc, wz = _weight_scales(sw, sz, cmask, stride_wsg, k0, K, W_SCALE, W_CODE, W_BK, W_PACK, W16, BLOCK_K,
                                 EVEN_K, a.dtype)
        if LOADS == 1:
            gu = w_desc.load([expert, 0, n0, k0]).reshape(2 * BLOCK_N, BLOCK_K).T
        else:
            gu = _load_w(gu_ptrs, offs_kw < (K - k0) // W_PACK, cmask, EVEN_K)
            gu_ptrs += BLOCK_K // W_PACK
        acc = _step(acc, a, gu, sa, wsc, wz, k0, K, W_SCALE, W_CODE, W_BK, W16, INT, INTERP, IEEE, BLOCK_K)
        a_ptrs += BLOCK_K
    return acc


@triton.jit
def _gemm1_two_dots(a_ptrs, w_desc, w_base, expert, n0, N, K, stride_wn, rw, nmask, s_gather, sa, ws_base,
                    wz_base, stride_wsr, stride_wsg, GATED: tl.constexpr, LOADS: tl.constexpr, EVEN_K: tl.constexpr,
                    WEIGHT_ON_INPUT: tl.constexpr, W_SCALE: tl.constexpr, W_CODE: tl.constexpr,
                    W_PACK: tl.constexpr, W16: tl.constexpr, GATHER_QUANT: tl.constexpr,
                    INT: tl.constexpr, W_BN: tl.constexpr, W_BK: tl.constexpr, INTERP: tl.constexpr,
                    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The K loop of GEMM1 as a gate dot and (gated) an up dot per step: two [BLOCK_M, BLOCK_N]
    accumulators. TMA: [1, BLOCK_N, BLOCK_K] boxes; gate rows past N read up rows, never stored."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_kw = tl.arange(0, BLOCK_K // W_PACK)  # the weight tile's columns: bytes, two codes each when packed
    offs_n = n0 + tl.arange(0, BLOCK_N)
    g_ptrs = w_base + offs_n[None, :].to(tl.int64) * stride_wn + offs_kw[:, None]  # [BLOCK_K / W_PACK, BLOCK_N]
    u_ptrs = g_ptrs + N * stride_wn
    brow = _scale_col(offs_n, nmask, W_CODE) // W_BN
    srow_g, srow_u = brow * stride_wsr, (tl.cdiv(N, W_BN) + brow) * stride_wsr
    sw_g, sw_u, sz_g, sz_u = ws_base + srow_g, ws_base + srow_u, wz_base + srow_g, wz_base + srow_u
    acc_g = _zeros(BLOCK_M, BLOCK_N, INT)
    acc_u = _zeros(BLOCK_M, BLOCK_N, INT)
    for k0 in range(0, K, BLOCK_K):
        kmask = offs_k < K - k0
        kwmask = offs_kw < (K - k0) // W_PACK
        a = _load_a(a_ptrs, kmask, rw, s_gather, EVEN_K, WEIGHT_ON_INPUT, GATHER_QUANT, INT, INTERP)
        wsc, wz = _weight_scales(sw_g, sz_g, nmask, stride_wsg, k0, K, W_SCALE, W_CODE, W_BK, W_PACK, W16, BLOCK_K,
                                 EVEN_K, a.dtype)
        if LOADS == 1:
            g = w_desc.load([expert, n0, k0]).reshape(BLOCK_N, BLOCK_K).T
        else:
            g = _load_w(g_ptrs, kwmask, nmask, EVEN_K)
            g_ptrs += BLOCK_K // W_PACK
        acc_g = _step(acc_g, a, g, sa, wsc, wz, k0, K, W_SCALE, W_CODE, W_BK, W16, INT, INTERP, IEEE, BLOCK_K)
        if GATED:
            wsc, wz = _weight_scales(sw_u, sz_u, nmask, stride_wsg, k0, K, W_SCALE, W_CODE, W_BK, W_PACK, W16,
                                     BLOCK_K, EVEN_K, a.dtype)
            if LOADS == 1:
                u = w_desc.load([expert, N + n0, k0]).reshape(BLOCK_N, BLOCK_K).T
            else:
                u = _load_w(u_ptrs, kwmask, nmask, EVEN_K)
                u_ptrs += BLOCK_K // W_PACK
            acc_u = _step(acc_u, a, u, sa, wsc, wz, k0, K, W_SCALE, W_CODE, W_BK, W16, INT, INTERP, IEEE, BLOCK_K)
        a_ptrs += BLOCK_K
    return acc_g, acc_u


@triton.jit
def _row_scales(as_ptr, arow, valid, stride_as):
    """Pointers to the per-row input scales (A_GROUP: each row's first group), [BLOCK_M]; rows that hold
    no pair point at row 0."""
    return as_ptr + tl.where(valid, arow, 0) * stride_as


@triton.jit
def _epilogue_scale(acc, as_ptr, a_rows, expert, ws_ptr, wg_ptr, cols, cmask, stride_wsr, part,
                    W_SCALE: tl.constexpr, A_SCALE: tl.constexpr, INT: tl.constexpr):
    """The scales not applied inside the K loop: the input's (per tensor, per expert, per row) and the
    weights' (per tensor part, per output row; nvfp4's global scale per part, ``wg_ptr`` the expert's),
    on a [BLOCK_M, cols] accumulator."""
    if INT:
        acc = acc.to(tl.float32)
    if A_SCALE == 1:
        acc = acc * tl.load(as_ptr)
    elif A_SCALE == 4:
        acc = acc * tl.load(as_ptr + expert)
    elif A_SCALE == 2:
        acc = acc * tl.load(a_rows)[:, None]
    if W_SCALE == 1:
        acc = acc * tl.load(ws_ptr + part * stride_wsr)
    elif W_SCALE == 2:
        acc = acc * tl.load(ws_ptr + cols * stride_wsr, mask=cmask, other=1.0)[None, :]
    elif W_SCALE == 5:
        acc = acc * tl.load(wg_ptr + part)
    return acc


@triton.jit
def moe_gemm1(
    x_ptr, w_ptr, w_desc, bias_ptr, ws_ptr, wz_ptr, wg_ptr, as_ptr, amax_ptr, out_ptr,
    sorted_ptr, block_expert_ptr, total_ptr, ids_ptr, emap_ptr, topk_w_ptr,
    N, K, num_pairs, num_pid_m, num_global, num_local,
    stride_xm, stride_we, stride_wn, stride_be, stride_wse, stride_wsr, stride_wsg, stride_wge, stride_as, stride_om,
    alpha, limit,
    TOP_K: tl.constexpr, ROUTE: tl.constexpr, HAS_MAP: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr, W_SCALE: tl.constexpr, W_CODE: tl.constexpr, W_PACK: tl.constexpr, W16: tl.constexpr,
    A_SCALE: tl.constexpr, INT: tl.constexpr,
    OUT_AMAX: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, LOADS: tl.constexpr, GATE_UP: tl.constexpr, W_BN: tl.constexpr, W_BK: tl.constexpr,
    INTERP: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):
    """out[row, n] = act(x[token] @ w13[e, gate rows n].T, x[token] @ w13[e, N + n].T) for the tile's pairs,
    where row is the pair's place in the sorted order (the pair itself for DIRECT tiles).

    TMA loads read ``w_desc``: w13 as [E, 2N, K] with [1, BLOCK_N, BLOCK_K] boxes, or with ONE_DOT as
    [E, 2, N, K] with [1, 2, BLOCK_N, BLOCK_K] boxes. Quantized inputs (A_SCALE) are x's rows quantized
    beforehand (``moe.kernels.quant``), or with A_EXPERT quantized here. OUT_AMAX: the absolute max of the
    stored output joins ``amax_ptr[0]`` (GEMM2's per-tensor dynamic scale). PDL: launched with
    launch_pdl; wait for the previous kernel (the alignment, or whatever ran before), then let the next
    one launch."""
    chain(PDL, PDL)
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    pair, expert = _rows(pid_m, sorted_ptr, block_expert_ptr, total_ptr, ids_ptr, emap_ptr, num_pairs, num_global,
                         num_local, ROUTE, HAS_MAP, BLOCK_M)
    if expert < 0:
        return
    valid = pair < num_pairs
    token = tl.where(valid, pair // TOP_K, 0).to(tl.int64)  # padding rows read token 0, never stored
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    a_ptrs = x_ptr + token[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    ws_base = ws_ptr + expert.to(tl.int64) * stride_wse
    wz_base = wz_ptr + expert.to(tl.int64) * stride_wse  # zero points: the scales' layout
    wg_base = wg_ptr + expert.to(tl.int64) * stride_wge
    if WEIGHT_ON_INPUT:
        rw = tl.load(topk_w_ptr + pair, mask=valid, other=0.0).to(tl.float32)
    else:
        rw = tl.full([BLOCK_M], 1.0, tl.float32)  # unused
    s_gather = tl.load(as_ptr + expert) if A_SCALE == 4 else 1.0
    a_rows = _row_scales(as_ptr, token, valid, stride_as)
    if GATED and GATE_UP == 1:
        acc = _gemm1_one_dot(a_ptrs, w_desc, w_base, expert, n0, N, K, stride_wn, rw, s_gather, a_rows, ws_base,
                             wz_base, stride_wsr, stride_wsg, LOADS, EVEN_K, WEIGHT_ON_INPUT, W_SCALE, W_CODE, W_PACK,
                             W16, A_SCALE == 4, INT, W_BN, W_BK, INTERP, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
        acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, BLOCK_N]), (0, 2, 1)))
    else:
        acc_g, acc_u = _gemm1_two_dots(a_ptrs, w_desc, w_base, expert, n0, N, K, stride_wn, rw, nmask, s_gather,
                                       a_rows, ws_base, wz_base, stride_wsr, stride_wsg, GATED, LOADS, EVEN_K,
                                       WEIGHT_ON_INPUT, W_SCALE, W_CODE, W_PACK, W16, A_SCALE == 4, INT, W_BN, W_BK,
                                       INTERP, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
    acc_g = _epilogue_scale(acc_g, as_ptr, a_rows, expert, ws_base, wg_base, offs_n, nmask, stride_wsr, 0, W_SCALE,
                            A_SCALE, INT)
    if GATED:
        acc_u = _epilogue_scale(acc_u, as_ptr, a_rows, expert, ws_base, wg_base, N + offs_n, nmask, stride_wsr, 1,
                                W_SCALE, A_SCALE, INT)
    if HAS_BIAS:
        b_base = bias_ptr + expert.to(tl.int64) * stride_be
        acc_g += tl.load(b_base + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(b_base + N + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    h = cast(_activate(acc_g.to(tl.float32), acc_u.to(tl.float32), ACT, alpha, limit), out_ptr.dtype.element_ty,
             INTERP)
    orow = _first_row(pid_m, ROUTE, BLOCK_M) + tl.arange(0, BLOCK_M)
    o_ptrs = out_ptr + orow[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    smask = valid[:, None] & nmask[None, :]
    tl.store(o_ptrs, h, mask=smask)
    if OUT_AMAX == 1:
        tl.atomic_max(amax_ptr, tl.max(tl.max(tl.where(smask, tl.abs(h.to(tl.float32)), 0.0), axis=1), axis=0))
    elif OUT_AMAX == 2:  # each row's absolute max over the tile's columns joins amax_ptr[row]
        tl.atomic_max(amax_ptr + orow, tl.max(tl.where(smask, tl.abs(h.to(tl.float32)), 0.0), axis=1), mask=valid)


@triton.jit
def _group_quantized_step(acc, a, w, sw, k0, W_BK: tl.constexpr, INTERP: tl.constexpr, IEEE: tl.constexpr):
    """A_GROUP_LOAD: ``a`` is a [BLOCK_M, BLOCK_K] tile of unquantized rows, one activation group a row
    (BLOCK_K = the group); quantized here to e4m3 by its row amax / 448, exactly as ``quant_rows`` would,
    then one scaled step: ``acc += (q @ w) * s[rows] * sw[cols]``."""
    af = a.to(tl.float32)
    s = scale_of(tl.max(tl.abs(af), axis=1), 0)
    q = quantize(af * reciprocal(s)[:, None], 0, INTERP)
    part = dot(q, w, tl.zeros(acc.shape, dtype=tl.float32), INTERP, IEEE, False)
    return acc + part * s[:, None] * tl.load(sw + k0 // W_BK)[None, :]


@triton.jit
def _loaded_input_scales(as_ptr, a_rows, A_SCALE: tl.constexpr, INT: tl.constexpr):
    """The scales GEMM2 quantizes its input rows with as it loads them, [BLOCK_M, 1] (or one): from each
    row's absolute max (A_TOKEN_LOAD: ``a_rows`` point into the amax GEMM1 gathered) or the tensor's
    (A_TENSOR_LOAD: ``as_ptr[0]``); 1.0 for every other mode."""
    if A_SCALE == 6:
        s = scale_of(tl.load(a_rows), INT)[:, None]
    elif A_SCALE == 7:
        s = scale_of(tl.load(as_ptr), INT)
    else:
        s = 1.0
    return s


@triton.jit
def _loaded_input_reciprocals(s_in, A_SCALE: tl.constexpr):
    """What GEMM2's loaded input tiles are multiplied by before rounding (A_TOKEN_LOAD / A_TENSOR_LOAD: the
    reciprocals of ``s_in``, once a tile, not a division per element); 1.0 for every other mode."""
    if A_SCALE >= 6:  # noqa: SIM108  (Triton 3.6 does not fold a conditional expression on constexprs)
        r = reciprocal(s_in)
    else:
        r = 1.0
    return r


@triton.jit
def _gemm2_loop(a_ptr, a_desc, w_desc, w_base, expert, first, valid, o0, omask, N, k_lo, k_hi, stride_am, stride_wk,
                sa, sw, sz, stride_wsg, r_in, LOADS: tl.constexpr, EVEN_K: tl.constexpr, W_SCALE: tl.constexpr,
                W_CODE: tl.constexpr, W_PACK: tl.constexpr, W16: tl.constexpr, INT: tl.constexpr, W_BK: tl.constexpr,
                A_SCALE: tl.constexpr, INTERP: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The reduction of GEMM2 over the intermediate dim N from k_lo to k_hi (all of it, or one split's
    part): [BLOCK_M, BLOCK_N] output columns o0... TMA:
    the input as [rows, N] with [BLOCK_M, BLOCK_K] boxes (padding rows read whatever GEMM1 left there:
    they reach only their own, unstored, rows) and w2 as [E, K, N] with [1, BLOCK_N, BLOCK_K] boxes.
    The input tiles are quantized as they are loaded with A_GROUP_LOAD (each row of a tile by its own
    amax) and A_TOKEN_LOAD / A_TENSOR_LOAD (times ``r_in``, the reciprocal of the row or tensor scales)."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_kw = tl.arange(0, BLOCK_K // W_PACK)
    offs_o = o0 + tl.arange(0, BLOCK_N)
    # pointer loads: padding rows read the tile's first row (always a pair's), never stored
    row = tl.where(valid, first + tl.arange(0, BLOCK_M), first).to(tl.int64)
    a_ptrs = a_ptr + row[:, None] * stride_am + (k_lo + offs_k)[None, :]
    w_ptrs = w_base + offs_o[None, :].to(tl.int64) * stride_wk + (k_lo // W_PACK + offs_kw)[:, None]
    no_rw = tl.full([BLOCK_M], 1.0, tl.float32)  # GEMM2 never scales its input
    acc = _zeros(BLOCK_M, BLOCK_N, INT)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        wsc, wz = _weight_scales(sw, sz, omask, stride_wsg, k0, N, W_SCALE, W_CODE, W_BK, W_PACK, W16, BLOCK_K,
                                 EVEN_K, a_ptr.dtype.element_ty)
        if LOADS == 1:
            w = w_desc.load([expert, o0, k0]).reshape(BLOCK_N, BLOCK_K).T
            a = a_desc.load([first, k0])
        else:
            kmask = offs_k < N - k0
            a = _load_a(a_ptrs, kmask, no_rw, 1.0, EVEN_K, False, False, INT, INTERP)
            w = _load_w(w_ptrs, offs_kw < (N - k0) // W_PACK, omask, EVEN_K)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K // W_PACK
        if A_SCALE == 5:
            acc = _group_quantized_step(acc, a, w, sw, k0, W_BK, INTERP, IEEE)
        elif A_SCALE >= 6:
            acc = dot(quantize(a.to(tl.float32) * r_in, INT, INTERP), w, acc, INTERP, IEEE, INT)
        else:
            acc = _step(acc, a, w, sa, wsc, wz, k0, N, W_SCALE, W_CODE, W_BK, W16, INT, INTERP, IEEE, BLOCK_K)
    return acc


@triton.jit
def moe_gemm2(
    a_ptr, w_ptr, a_desc, w_desc, bias_ptr, ws_ptr, wz_ptr, wg_ptr, as_ptr, y_ptr,
    sorted_ptr, block_expert_ptr, total_ptr, ids_ptr, emap_ptr, topk_w_ptr,
    N, K, num_pairs, num_pid_m, num_global, num_local,
    stride_am, stride_we, stride_wk, stride_be, stride_wse, stride_wsr, stride_wsg, stride_wge, stride_as, stride_ym,
    TOP_K: tl.constexpr, ROUTE: tl.constexpr, HAS_MAP: tl.constexpr, HAS_BIAS: tl.constexpr,
    W_SCALE: tl.constexpr, W_CODE: tl.constexpr, W_PACK: tl.constexpr, W16: tl.constexpr,
    A_SCALE: tl.constexpr, INT: tl.constexpr, ATOMIC: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, LOADS: tl.constexpr, W_BN: tl.constexpr, W_BK: tl.constexpr,
    SPLIT_K: tl.constexpr, INTERP: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):
    """y[pair, kk] = a[row] @ w2[e, kk].T (+ bias), a's rows in sorted order as GEMM1 stored them (quantized
    with their scales when A_SCALE says so); with ATOMIC, add weight * y into fp32 y[token]. SPLIT_K > 1:
    program p reduces part p % SPLIT_K of N and stores its fp32 partial sum at y[part * num_pairs + pair]
    (the bias in part 0's), which the combine adds up. PDL: launched with launch_pdl; wait for the previous
    kernel, then let the combine launch."""
    chain(PDL, PDL)
    part = tl.program_id(0) % SPLIT_K
    pid_m, pid_n = _tile_ids(tl.program_id(0) // SPLIT_K, num_pid_m, tl.cdiv(K, BLOCK_N), GROUP_M)
    pair, expert = _rows(pid_m, sorted_ptr, block_expert_ptr, total_ptr, ids_ptr, emap_ptr, num_pairs, num_global,
                         num_local, ROUTE, HAS_MAP, BLOCK_M)
    if expert < 0:
        return
    valid = pair < num_pairs
    o0 = pid_n * BLOCK_N
    offs_o = o0 + tl.arange(0, BLOCK_N)  # output columns (hidden dim)
    omask = offs_o < K
    first = _first_row(pid_m, ROUTE, BLOCK_M)
    ws_base = ws_ptr + expert.to(tl.int64) * stride_wse
    a_rows = _row_scales(as_ptr, (first + tl.arange(0, BLOCK_M)).to(tl.int64), valid, stride_as)
    srow = (_scale_col(offs_o, omask, W_CODE) // W_BN) * stride_wsr  # block (group) scale rows of the columns
    sw, sz = ws_base + srow, wz_ptr + expert.to(tl.int64) * stride_wse + srow
    s_in = _loaded_input_scales(as_ptr, a_rows, A_SCALE, INT)  # A_TOKEN_LOAD / A_TENSOR_LOAD, else 1
    chunk = tl.cdiv(tl.cdiv(N, BLOCK_K), SPLIT_K) * BLOCK_K  # a whole number of K steps a part
    k_lo = part * chunk
    acc = _gemm2_loop(a_ptr, a_desc, w_desc, w_ptr + expert.to(tl.int64) * stride_we, expert, first, valid, o0, omask,
                      N, k_lo, tl.minimum(N, k_lo + chunk), stride_am, stride_wk, a_rows, sw, sz, stride_wsg,
                      _loaded_input_reciprocals(s_in, A_SCALE), LOADS, EVEN_K, W_SCALE, W_CODE, W_PACK, W16, INT,
                      W_BK, A_SCALE, INTERP, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
    if A_SCALE >= 6:  # the input scales of a tile quantized as it was loaded
        acc = acc.to(tl.float32) * s_in
    acc = _epilogue_scale(acc, as_ptr, a_rows, expert, ws_base, wg_ptr + expert.to(tl.int64) * stride_wge, offs_o,
                          omask, stride_wsr, 0, W_SCALE, A_SCALE, INT)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert.to(tl.int64) * stride_be + offs_o, mask=omask, other=0.0)
        acc += tl.where(part == 0, bias.to(tl.float32), 0.0)[None, :]  # once: in the first part's sum
    mask = valid[:, None] & omask[None, :]
    # the expert output, rounded to the activations' dtype like the reference's (with ATOMIC, y_ptr is the
    # fp32 [T, K] sum: the bias pointer, the w2 bias or the hidden states, carries that dtype; with SPLIT_K,
    # y_ptr is fp32 too: the combine rounds the parts' sum)
    y = cast(acc, bias_ptr.dtype.element_ty if ATOMIC else y_ptr.dtype.element_ty, INTERP)
    if ATOMIC:
        if WEIGHT_ON_INPUT:
            rw = tl.full([BLOCK_M], 1.0, tl.float32)
        else:
            rw = tl.load(topk_w_ptr + pair, mask=valid, other=0.0).to(tl.float32)
        token = (pair // TOP_K).to(tl.int64)
        tl.atomic_add(y_ptr + token[:, None] * stride_ym + offs_o[None, :], y.to(tl.float32) * rw[:, None], mask=mask)
    else:
        row = pair.to(tl.int64) + part * num_pairs
        tl.store(y_ptr + row[:, None] * stride_ym + offs_o[None, :], y, mask=mask)
