"""The activation functions as ``@triton.jit`` helpers (kernels only): GEMM1's epilogue in the Triton
backend and the standalone row kernel of ``moe.kernels.activation`` use the same code."""

import triton
import triton.language as tl

from ._jit import cast

# ACT: the codes of moe.kernels.activation.ACT_CODES (silu 0, gelu 1, gelu_tanh 2, swigluoai 3, relu2 4,
# silu_no_mul 5, gelu_no_mul 6); codes below 4 are gated


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_tanh(x):
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (2.0 * _sigmoid(2.0 * inner))  # 1 + tanh(y) == 2 * sigmoid(2y)


@triton.jit
def activate(g, u, ACT: tl.constexpr, alpha, limit):
    """The activation of fp32 gate ``g`` and up ``u`` tiles (``u`` unused when not gated)."""
    if ACT == 0:
        out = g * _sigmoid(g) * u
    elif ACT == 1:
        out = _gelu(g) * u
    elif ACT == 2:
        out = _gelu_tanh(g) * u
    elif ACT == 3:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        out = (u + 1.0) * g * _sigmoid(alpha * g)
    elif ACT == 4:
        r = tl.maximum(g, 0.0)
        out = r * r
    elif ACT == 5:
        out = g * _sigmoid(g)
    else:
        out = _gelu(g)
    return out


@triton.jit
def activate_rows(h_ptr, out_ptr, n, stride_h, stride_o, alpha, limit, ACT: tl.constexpr, GATED: tl.constexpr,
                  BLOCK: tl.constexpr, INTERP: tl.constexpr):
    """``out[r, c] = act(h[r, c], h[r, n + c])`` (gated) or ``act(h[r, c])``: one row and BLOCK columns a
    program, fp32 arithmetic, rounded to ``out``'s dtype."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    g = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    u = g
    if GATED:
        u = tl.load(h_ptr + row * stride_h + n + cols, mask=mask, other=0.0).to(tl.float32)
    out = activate(g, u, ACT, alpha, limit)
    tl.store(out_ptr + row * stride_o + cols, cast(out, out_ptr.dtype.element_ty, INTERP), mask=mask)
