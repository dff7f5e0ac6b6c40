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
