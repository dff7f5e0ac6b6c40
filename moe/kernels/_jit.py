"""Small ``@triton.jit`` helpers shared by every kernel of the package (kernels only).

``INTERP`` is the one interpreter switch: under the Triton interpreter (CPU tests) low-precision dots
are computed in fp32 and fp32 -> bf16 casts round to nearest-even, so CPU tests see the GPU's results.
"""

import triton
import triton.language as tl


@triton.jit
def chain(WAIT: tl.constexpr, TRIGGER: tl.constexpr):
    """Programmatic dependent launch (Hopper+; the host side is ``moe.kernels.host.chains``). WAIT blocks
    until the previous kernel has finished and its writes are visible (this kernel was launched with
    launch_pdl, so it may start before then): it comes before the kernel's first load. TRIGGER lets the
    next kernel launch once every program of this one has passed here; the next one waits on the GPU
    rather than being launched after this one ends."""
    if WAIT:
        tl.extra.cuda.gdc_wait()
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def cast(x, dtype, INTERP: tl.constexpr):
    """Cast fp32 ``x`` to ``dtype``. The interpreter truncates fp32 -> bf16; under it, round to
    nearest-even first (exact afterwards)."""
    if INTERP and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def dot(a, b, acc, INTERP: tl.constexpr, IEEE: tl.constexpr, INT: tl.constexpr):
    """``acc + a @ b``; IEEE: full fp32 (no tf32) for fp32 operands; INT: int8 operands, int32 ``acc``.
    One if-chain, no early return: Triton 3.6 still generates the statements after a ``return`` in a
    taken constexpr branch (a float dot of int8 operands, which fails to compile)."""
    if INT:
        out = tl.dot(a, b, acc, out_dtype=tl.int32)
    else:
        if INTERP:  # the interpreter mishandles low-precision float dots (its int8 dots are exact)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:  # noqa: SIM108  (no conditional expressions on constexprs: see above)
            out = tl.dot(a, b, acc, input_precision="ieee")
        else:
            out = tl.dot(a, b, acc)
    return out


@triton.jit
def local_expert(ids_ptr, emap_ptr, offs, mask, num_global, num_local, HAS_MAP: tl.constexpr):
    """The local expert of the pairs at ``offs`` (global ids read from ``ids_ptr``, mapped through the
    expert map when there is one), -1 for a pair to skip: masked, routed to another rank, or with an id
    outside [0, num_global) or a mapped id outside [0, num_local). A bad id or map never makes a kernel
    read or write out of bounds."""
    e = tl.load(ids_ptr + offs, mask=mask, other=-1).to(tl.int32)
    ok = mask & (e >= 0) & (e < num_global)
    if HAS_MAP:
        e = tl.load(emap_ptr + e, mask=ok, other=-1).to(tl.int32)
    return tl.where(ok & (e >= 0) & (e < num_local), e, -1)
