"""Compile the Triton backend's kernels to Triton IR for a CUDA target on a machine without a GPU: every
launch of a CPU call is turned into a front-end compile (``ASTSource.make_ir``) for ``--arch`` (default
sm_90) instead of an interpreter run. It catches what only the GPU compiler's front end rejects (type
errors the interpreter never sees), with the triton installed here, e.g. the GPU machine's release:

    pip install --no-deps --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36 python3 benchmarks/ttir_check.py [--quant fp8_channel,int8_channel] [--tokens 1,64,512]

Pointer loads only (no TMA descriptors on CPU tensors). ``--asm`` compiles each GEMM launch the whole way
to a cubin instead (with the 16-byte divisibility hints the JIT would add, without which no loop is
software-pipelined) and prints its shared memory, the pending counts of its wgmma waits (``0`` after a dot:
that dot cannot overlap the next) and ptxas' registers and spills.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend

_SIG = {torch.float8_e4m3fn: "*fp8e4nv", torch.int8: "*i8", torch.bfloat16: "*bf16", torch.float16: "*fp16",
        torch.float32: "*fp32", torch.int32: "*i32", torch.int64: "*i64", torch.uint8: "*u8"}
_OPTIONS = ("num_warps", "num_stages", "launch_pdl")
compiled: list[str] = []


def _sig(a) -> str:
    if isinstance(a, torch.Tensor):
        return _SIG[a.dtype]
    if isinstance(a, bool):
        return "i1"
    if isinstance(a, int):
        return "i32" if -2**31 <= a < 2**31 else "i64"
    if isinstance(a, float):
        return "fp32"
    raise TypeError(f"no signature for {type(a).__name__}")


def make_ir(kernel, grid, device, *args, arch: int, **kwargs) -> None:
    fn = kernel  # the JITFunction
    names = fn.arg_names
    consts = {k: v for k, v in kwargs.items() if k not in _OPTIONS}
    sig = {n: _sig(a) for n, a in zip(names, args, strict=False)} | {k: "constexpr" for k in consts}
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    opts = backend.parse_options({k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")})
    from triton._C.libtriton import ir

    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    ASTSource(fn, signature=sig, constexprs=consts).make_ir(target, opts, backend.get_codegen_implementation(opts),
                                                            backend.get_module_map(), ctx)
    compiled.append(fn.fn.__name__)


def _hints(args: tuple) -> dict:
    """The JIT's specialization: pointers and ints divisible by 16 get ``tt.divisibility`` 16 (ints equal
    to 1 become constants: ``compile_asm``)."""
    attrs = {}
    for i, a in enumerate(args):
        aligned = a.data_ptr() % 16 == 0 if isinstance(a, torch.Tensor) else (
            type(a) is int and a != 0 and a % 16 == 0)
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def compile_launch(fn, args: tuple, kwargs: dict, arch: int):
    """A launch's whole compile for sm_``arch`` (a CompiledKernel), specialized as the JIT would."""
    consts = {k: v for k, v in kwargs.items() if k not in _OPTIONS}
    # the JIT compiles an int argument equal to 1 as the constant 1 (unit strides: contiguity it can see)
    ones = {n: 1 for n, a in zip(fn.arg_names, args, strict=False) if type(a) is int and a == 1}
    sig = {n: _sig(a) for n, a in zip(fn.arg_names, args, strict=False)} | {k: "constexpr" for k in consts | ones}
    src = ASTSource(fn, signature=sig, constexprs=consts | ones, attrs=_hints(args))
    opts = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def compile_asm(kernel, grid, device, *args, arch: int, **kwargs) -> None:
    """The whole compile of a GEMM launch for sm_``arch``: shared memory, wgmma waits, registers."""
    fn = kernel
    if not fn.fn.__name__.startswith("moe_gemm"):
        return
    ck = compile_launch(fn, args, kwargs, arch)
    waits = re.findall(r"warp_group_dot_wait .*?pendings = (\d+)", ck.asm["ttgir"])
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    regs = ""
    if os.path.exists(ptxas):
        path = f"/tmp/ttir_check_{os.getpid()}.ptx"
        with open(path, "w") as f:
            f.write(ck.asm["ptx"])
        info = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", path, "-o", os.devnull], capture_output=True,
                              text=True).stderr
        regs = "; ".join(m.strip() for m in re.findall(r"Used [^\n]*", info))
    print(f"  {fn.fn.__name__}: shared {ck.metadata.shared} B, wgmma waits {waits}, {regs}")
    compiled.append(fn.fn.__name__)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quant", default="none,fp8_tensor,fp8_tensor_static,fp8_channel,fp8_block,int8_channel")
    ap.add_argument("--tokens", default="1,64,512")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--asm", action="store_true", help="compile the GEMMs to a cubin: shared memory, wgmma waits, "
                                                      "registers")
    a = ap.parse_args(argv)
    import moe
    import moe.backends.triton as tb
    import moe.kernels.align
    import moe.kernels.combine
    import moe.kernels.launch
    import moe.kernels.quant
    import moe.routing.triton as rt
    from moe.kernels import host

    def fake(kernel, grid, device, *args, **kwargs):
        (compile_asm if a.asm else make_ir)(kernel, grid, device, *args, arch=a.arch, **kwargs)

    for mod in (moe.kernels.launch, tb, moe.kernels.quant, moe.kernels.combine, moe.kernels.align, rt):
        if hasattr(mod, "launch"):
            mod.launch = fake
    host.interpreting.cache_clear() if hasattr(host.interpreting, "cache_clear") else None
    from moe.backends.triton.config import GemmTile, KernelConfig
    from moe.contract import ExpertsArgs
    from moe.quant import named, quantize
    from moe.quant.calibration import calibrate_static_scales

    E, K, N, k = 8, 256, 256, 2
    failures = 0
    for name in a.quant.split(","):
        for T in (int(t) for t in a.tokens.split(",")):
            x = torch.randn(T, K, dtype=torch.bfloat16)
            w13 = torch.randn(E, 2 * N, K, dtype=torch.bfloat16) / 16
            w2 = torch.randn(E, K, N, dtype=torch.bfloat16) / 16
            w, ids = moe.fused_topk(torch.randn(T, E), k)
            prob_quant, kw = None, {}
            if name != "none":
                cfg = named(name)
                if cfg.static_activations:
                    kw = dict(zip(("a13_scale", "a2_scale"), calibrate_static_scales(x, w13, ids, cfg.activations,
                                                                                      "silu"), strict=True))
                w13, w2, prob_quant = quantize(w13, cfg.weights, parts=2), quantize(w2, cfg.weights), cfg
            args = ExpertsArgs(x, w13, w2, w, ids, **kw)
            import dataclasses

            from moe.contract import ExpertsProblem
            prob = ExpertsProblem("cpu", torch.bfloat16, T, E, E, K, N, k)
            if prob_quant is not None:
                prob = dataclasses.replace(prob, quant=prob_quant)
            for gate_up in ("two_dots", "one_dot"):
                tile = GemmTile(block_n=64, block_k=128, group_m=8, num_stages=3)
                cfg_k = KernelConfig(block_m=16 if T < 64 else 64, gemm1=tile, gemm2=tile, gate_up=gate_up)
                try:
                    tb.triton_experts(args, prob, torch.empty_like(x), cfg_k)
                    status = "ok"
                except Exception as exc:  # the compile error, shortened
                    failures += 1
                    cause = exc
                    while cause.__cause__ is not None:
                        cause = cause.__cause__
                    status = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:120]} <- {cause!r}"[:300]
                print(f"{name:<18} T={T:<5} {gate_up:<9} {status}")
    for T in (int(t) for t in a.tokens.split(",")):
        failures += _routing(rt, T, E, k)
    kind = "GEMM cubin" if a.asm else "front-end"
    print(f"triton {triton.__version__}, sm_{a.arch}: {len(compiled)} {kind} compiles, {failures} failed")
    return 1 if failures else 0


def _routing(rt, T: int, E: int, k: int) -> int:
    """The routing kernels (top-k, top-k then softmax, grouped, and top-k that aligns its own ids)."""
    import moe.routing

    logits = torch.randn(T, E)
    emap = torch.arange(E, dtype=torch.int32)
    calls = {"fused_topk": lambda: rt.fused_topk(logits, k),
             "topk_softmax": lambda: rt.topk_softmax(logits, k),
             "grouped_topk": lambda: rt.grouped_topk(logits, k, num_expert_group=4, topk_group=2,
                                                     e_score_correction_bias=torch.zeros(E))}
    if rt.aligns_in_one_launch(T, E, E, k):
        outputs = moe.routing.routing_outputs(logits, k)
        calls["topk_and_align"] = lambda: rt.topk_and_align(logits, k, *outputs, num_local=E, block_m=16,
                                                            expert_map=emap)
    failures = 0
    for name, call in calls.items():
        try:
            call()
            status = "ok"
        except Exception as exc:
            failures += 1
            status = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        print(f"{'routing ' + name:<18} T={T:<5} {status}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
