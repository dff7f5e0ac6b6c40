"""The CUTLASS backend: our own SM90 grouped-GEMM extension (CUTLASS 3.x pointer-array grouped GEMM, TMA,
warp-specialized), compiled at first use with nvcc through ``torch.utils.cpp_extension``.

State of this release: registered, not runnable. What is here is what decides whether and where it could be
built: the CUTLASS headers (from the ``nvidia-cutlass`` package, ``cutlass_library/source/include``, or
``$CUTLASS_HOME/include``), nvcc, and the build cache folder, keyed by everything that changes the binary
(:func:`cache_key`). The extension's CUDA source is not written yet, so ``is_available()`` says so even
where headers and nvcc are present; ``supports()`` gives the hardware and shape reasons.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from ..contract import ExpertsArgs, ExpertsProblem
from ..target import nvcc_version

__all__ = ["BACKEND", "build_folder", "cache_key", "cutlass_include", "cutlass_version"]

INSTALL = "pip install 'nvidia-cutlass==4.2.0.0' (used only for its C++ headers), or set CUTLASS_HOME"
ALIGN_NK = 128


def cutlass_include() -> Path | None:
    """The folder holding ``cutlass/cutlass.h``: ``$CUTLASS_HOME/include``, else the ``nvidia-cutlass``
    package's ``cutlass_library/source/include`` (found without importing it); None when neither has it."""
    candidates = []
    home = os.environ.get("CUTLASS_HOME")
    if home:
        candidates.append(Path(home) / "include")
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "source" / "include")
    return next((c for c in candidates if (c / "cutlass" / "cutlass.h").is_file()), None)


def cutlass_version() -> str:
    """The ``nvidia-cutlass`` distribution's version, or ``CUTLASS_HOME``'s folder name when it is not installed."""
    try:
        return importlib.metadata.version("nvidia-cutlass")
    except importlib.metadata.PackageNotFoundError:
        return Path(os.environ.get("CUTLASS_HOME", "unknown")).name


def cache_key(arch: str, cutlass: str, torch_version: str, cxx11_abi: bool, nvcc: str, flags: Sequence[str],
              sources: Sequence[Path]) -> str:
    """A folder name for one build: readable fields, then a hash of every input that changes the binary
    (the architecture, CUTLASS, torch and its C++ ABI, nvcc, the flags in order, each source's bytes)."""
    for name, value in (("arch", arch), ("cutlass", cutlass), ("torch_version", torch_version), ("nvcc", nvcc)):
        if not value:
            raise ValueError(f"{name}: expected a non-empty version string, got {value!r}")
    h = hashlib.sha256()
    for part in (arch, cutlass, torch_version, str(int(cxx11_abi)), nvcc, *flags):
        h.update(part.encode() + b"\0")
    for src in sources:
        h.update(Path(src).read_bytes() + b"\0")
    safe_torch = torch_version.replace("+", "_")
    return f"{arch}-cutlass{cutlass}-torch{safe_torch}-abi{int(cxx11_abi)}-nvcc{nvcc}-{h.hexdigest()[:16]}"


def build_folder(key: str) -> Path:
    """``$XDG_CACHE_HOME/moe/cutlass/<key>`` (``~/.cache/moe/cutlass/<key>``)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "moe" / "cutlass" / key


def _toolchain_problem() -> str | None:
    if cutlass_include() is None:
        return f"the CUTLASS C++ headers are not found; {INSTALL}"
    if nvcc_version() is None:
        return "nvcc is not on PATH (nor under CUDA_HOME): the extension compiles with nvcc at first use"
    if shutil.which("ninja") is None:
        return "ninja is not on PATH: torch.utils.cpp_extension builds with it; pip install ninja"
    return None


class CutlassBackend:
    name = "cutlass"
    schemes = ("none", "fp8_tensor", "fp8_channel", "fp8_block")

    @property
    def priority(self) -> int:
        return 11 if torch.cuda.is_available() else -30

    def priority_for(self, target) -> int:
        return 11 if target.vendor == "cuda" else -30  # below triton until measured

    def is_available(self) -> tuple[bool, str]:
        problem = _toolchain_problem()
        if problem is not None:
            return False, problem
        return False, ("headers, nvcc and ninja are here, but the SM90 grouped-GEMM extension's source is not "
                       "in this release (registered only)")

    def supports(self, problem: ExpertsProblem) -> tuple[bool, str]:
        target = problem.target
        if target is None or target.vendor != "cuda" or not target.wgmma:
            where = target.describe() if target is not None else "no device target"
            return False, f"the extension is built for Hopper warpgroup MMA (wgmma, SM90); {where}"
        if problem.dtype != torch.bfloat16:
            return False, f"bfloat16 activations only, got {problem.dtype}"
        n, k = problem.intermediate_size, problem.hidden_size
        if n % ALIGN_NK or k % ALIGN_NK:
            return False, f"N and K must be multiples of {ALIGN_NK} (the tile and FP8 block), got N={n}, K={k}"
        if problem.has_w13_bias or problem.has_w2_bias:
            return False, "expert biases are not implemented"
        return True, "ok"

    def apply(self, args: ExpertsArgs, problem: ExpertsProblem, out: torch.Tensor) -> None:
        raise NotImplementedError(f"cutlass: {self.is_available()[1]}")


BACKEND = CutlassBackend()
