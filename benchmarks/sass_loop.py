"""The SASS of the Triton backend's K loops for one preset's config, compiled for sm_90a on a machine
without a GPU: per GEMM, ptxas' registers, the shared memory, and the instructions of its longest loop
counted by opcode (what an issue-bound decode spends its cycles on: H200, 2026-12-02, mixtral's 4-bit
GEMM1 at one token issued on 58% of its cycles, Nsight Compute, docs/performance.md).

    pip install --no-deps --target /tmp/t36 triton==3.6.0   # the GPU machine's release
    PYTHONPATH=/tmp/t36:. python3 benchmarks/sass_loop.py --preset mixtral --quant w4a16 --tokens 1 \
        [--set decode_order=masks] [--gemm1 num_warps=8] [--dump DIR]

The config is the heuristic's for the preset's real shape on an H200 (``--set`` / ``--gemm1`` / ``--gemm2``
edit it, values as JSON); the kernels are compiled on a small problem of the same kind (the loop's code
does not depend on the sizes, only on the config and the strides' divisibility).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys

import torch
import triton

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def loop_counts(sass: str) -> tuple[int, collections.Counter]:
    """The longest loop (a backward branch's span) of a cuobjdump listing: its length and opcode counts."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(m.group(1), 16), addr) for addr, text in ins
             if (m := re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)) and int(m.group(1), 16) < addr]
    if not loops:
        return 0, collections.Counter()
    lo, hi = max(loops, key=lambda span: span[1] - span[0])
    body = [text for addr, text in ins if lo <= addr <= hi]
    ops = [t.split()[1] if t.startswith("@") else t.split()[0] for t in body]
    return len(body), collections.Counter(op.split(".")[0] for op in ops)


def compile_gemm(kernel, grid, device, *args, dump: str | None = None, **kwargs) -> None:
    """A launch of the backend turned into an sm_90a compile of its GEMMs (others are skipped)."""
    from ttir_check import _OPTIONS, compile_launch  # (ttir_check turns the interpreter off: imported here)

    name = kernel.fn.__name__
    if not name.startswith("moe_gemm"):
        return
    ck = compile_launch(kernel, args, kwargs, 90)
    consts = {k: v for k, v in kwargs.items() if k not in _OPTIONS}
    opts = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
    ptx = f"/tmp/sass_loop_{os.getpid()}.ptx"
    with open(ptx, "w") as f:
        f.write(ck.asm["ptx"])
    info = subprocess.run([f"{_BIN}/ptxas", "-arch=sm_90a", "-v", ptx, "-o", ptx + ".cubin"], capture_output=True,
                          text=True).stderr
    sass = subprocess.run([f"{_BIN}/cuobjdump", "-sass", ptx + ".cubin"], capture_output=True, text=True).stdout
    if dump:
        os.makedirs(dump, exist_ok=True)
        for ext, text in (("ttgir", ck.asm["ttgir"]), ("ptx", ck.asm["ptx"]), ("sass", sass)):
            with open(os.path.join(dump, f"{name}.{ext}"), "w") as f:
                f.write(text)
    regs = ", ".join(re.findall(r"Used (\d+) registers", info))
    n, counts = loop_counts(sass)
    tiles = {k: consts[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "W16") if k in consts}
    print(f"{name}: {regs} registers, shared {ck.metadata.shared} B, {opts} {tiles}")
    print(f"  loop: {n} instructions: " + ", ".join(f"{op} {c}" for op, c in counts.most_common(16)))


def _edit(obj, pairs: list[str]):
    for kv in pairs:
        key, val = kv.split("=", 1)
        with contextlib.suppress(json.JSONDecodeError):  # else a bare string: decode_order=masks
            val = json.loads(val)
        obj = obj.model_copy(update={key: val})
    return obj


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mixtral")
    ap.add_argument("--quant", default="w4a16", help="a name of moe.quant.NAMES, or none")
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE of the KernelConfig")
    ap.add_argument("--gemm1", action="append", default=[], help="KEY=VALUE of its GEMM1 tile")
    ap.add_argument("--gemm2", action="append", default=[], help="KEY=VALUE of its GEMM2 tile")
    ap.add_argument("--dump", help="write each GEMM's TTGIR, PTX and SASS into this folder")
    a = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # GPU compiles, not interpreter runs
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import moe
    import moe.backends.triton as tb
    import moe.kernels.align
    import moe.kernels.combine
    import moe.kernels.launch
    import moe.kernels.quant
    from moe.backends.triton.config import KernelConfig, default_config
    from moe.contract import ExpertsArgs, ExpertsProblem
    from moe.quant import named, quantize
    from moe.target import TARGETS
    from moe.workload import PRESETS

    def fake(kernel, grid, device, *args, **kwargs):
        compile_gemm(kernel, grid, device, *args, dump=a.dump, **kwargs)

    for mod in (moe.kernels.launch, tb, moe.kernels.align, moe.kernels.combine, moe.kernels.quant):
        if hasattr(mod, "launch"):
            mod.launch = fake
    p, quant = PRESETS[a.preset], (None if a.quant == "none" else named(a.quant))
    extra = {"quant": quant} if quant is not None else {}
    real = ExpertsProblem("cuda", torch.bfloat16, a.tokens, p.num_experts, p.num_experts, p.hidden_size,
                          p.intermediate_size, p.top_k, target=TARGETS["h200"], **extra)
    cfg = _edit(default_config(real), a.set)
    cfg = cfg.model_copy(update={"gemm1": _edit(cfg.gemm1, a.gemm1), "gemm2": _edit(cfg.gemm2, a.gemm2)})
    cfg = KernelConfig.model_validate(cfg.model_dump())  # the edits validated
    print(f"config: {cfg.model_dump_json()}")
    E, K, N, k = 8, 512, 512, min(p.top_k, 8)
    x = torch.randn(a.tokens, K, dtype=torch.bfloat16)
    w13, w2 = torch.randn(E, 2 * N, K, dtype=torch.bfloat16) / 16, torch.randn(E, K, N, dtype=torch.bfloat16) / 16
    if quant is not None:
        w13, w2 = quantize(w13, quant.weights, parts=2), quantize(w2, quant.weights)
    weights, ids = moe.fused_topk(torch.randn(a.tokens, E), k)
    small = ExpertsProblem("cpu", torch.bfloat16, a.tokens, E, E, K, N, k, target=TARGETS["h200"], **extra)
    args = ExpertsArgs(x, w13, w2, weights, ids)
    if quant is not None:  # the prepared group scales a layer runs on
        args = dataclasses.replace(args, prepared=tb.prepared_scales(args, small))
    try:
        tb.triton_experts(args, small, torch.empty_like(x), cfg)
    except RuntimeError as exc:  # past the compiles: the CPU has no CUDA driver to run the rest
        if "driver" not in str(exc):
            raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
