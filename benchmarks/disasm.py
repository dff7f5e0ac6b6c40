"""What the compiled GEMM kernels are made of: for each preset:M, the config the backend picks, then
per kernel its registers and spills, the opcode counts that matter on Hopper (HGMMA = wgmma tensor-core
MMAs, LDGSTS = cp.async loads, UTMALDG = TMA loads, LDL/STL = local-memory spills, BAR/WARPSYNC), and
whether the Triton IR uses warp-group dots and async copies. Full SASS goes to $OUT when set.

    python3 benchmarks/disasm.py mixtral:16384 qwen3:4096 mixtral:256
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter

import torch

from moe.backends.triton import choose_config, triton_experts
from moe.contract import ExpertsArgs
from moe.kernels.launch import compiled_kernels
from moe.routing import fused_topk
from moe.workload import PRESETS, random_tokens, random_weights

OPS = ("HGMMA", "HMMA", "LDGSTS", "UTMALDG", "LDG", "STG", "LDL", "STL", "BAR", "WARPSYNC", "SHFL")


def sass_of(ck) -> str:
    from triton.tools.disasm import get_sass

    return get_sass(ck.asm["cubin"])


def summarize(point: str) -> None:
    name, m = point.split(":")
    p = PRESETS[name]
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    w13, w2 = random_weights(p, torch.bfloat16, dev, gen)
    x, logits = random_tokens(p, int(m), torch.bfloat16, dev, gen)
    w, ids = fused_topk(logits, p.top_k)
    problem = p.problem(dev, torch.bfloat16, int(m))
    cfg = choose_config(problem, dev)
    before = {id(k) for k in compiled_kernels()}
    triton_experts(ExpertsArgs(x, w13, w2, w, ids), problem, torch.empty_like(x), cfg)
    torch.cuda.synchronize()
    print(f"{point}: {cfg.model_dump()}")
    for ck in compiled_kernels():
        if id(ck) in before or not ck.name.startswith("moe_gemm"):
            continue
        try:
            sass = sass_of(ck)
        except Exception as exc:  # no cuobjdump on this machine: the IR counts still print
            sass = f"no SASS: {exc}"
        ops = Counter(re.findall(r"\b(" + "|".join(OPS) + r")\b", sass))
        ttgir = ck.asm.get("ttgir", "")
        ir = {k: ttgir.count(k) for k in ("warp_group_dot", "async_copy_global_to_local", "async_tma")}
        print(f"  {ck.name}: {ck.n_regs} regs, {ck.n_spills} spills, shared {ck.metadata.shared} B; "
              f"sass {dict(ops)}; ttgir {ir}")
        out = os.environ.get("OUT")
        if out:
            with open(os.path.join(out, f"{name}_{m}_{ck.name}.sass"), "w") as f:
                f.write(sass)


if __name__ == "__main__":
    for point in sys.argv[1:] or ["mixtral:16384"]:
        summarize(point)
        torch.cuda.empty_cache()
