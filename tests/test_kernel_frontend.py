"""The Triton kernels through the GPU compiler's front end on CPU: every launch of a call compiled to
Triton IR for sm_90 with the installed triton (benchmarks/ttir_check.py). It catches what the interpreter
cannot see: an int8 dot built as a float dot (Triton 3.6 generates the statements after a ``return`` in
a taken constexpr branch) failed only on the H200 before this check existed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ttir_check.py"


def test_every_scheme_compiles_for_sm90():
    run = subprocess.run([sys.executable, str(SCRIPT), "--quant", "none,fp8_tensor_static,fp8_block,int8_channel,w4a16_zp,mxfp4,nvfp4",
                          "--tokens", "1,64"], capture_output=True, text=True, timeout=600)
    lines = [line for line in run.stdout.splitlines() if "FAILED" in line or "front-end compiles" in line]
    assert run.returncode == 0, "\n".join(lines) or run.stderr[-2000:]
    assert "0 failed" in lines[-1] and int(lines[-1].split(":")[1].split()[0]) >= 40, lines[-1]


def test_the_sass_loop_counter_reads_the_longest_loop():
    """benchmarks/sass_loop.py counts the opcodes of the longest backward-branch span of a cuobjdump
    listing (predicated instructions by their opcode), not the code around it or a shorter loop."""
    sys.path.insert(0, str(SCRIPT.parent))
    from sass_loop import loop_counts

    listing = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LOP3.LUT R2, R3, 0xf, RZ, 0xc0, !PT ;
        /*0020*/                   PRMT R4, R2, 0x5410, R3 ;
        /*0030*/              @!P0 HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
        /*0040*/              @P1 BRA 0x10 ;
        /*0050*/                   IADD3 R5, R5, 0x1, RZ ;
        /*0060*/                   BRA 0x50 ;
        /*0070*/                   EXIT ;
    """
    n, counts = loop_counts(listing)
    assert n == 4 and counts == {"LOP3": 1, "PRMT": 1, "HMMA": 1, "BRA": 1}
    assert loop_counts("/*0000*/ EXIT ;") == (0, {})
