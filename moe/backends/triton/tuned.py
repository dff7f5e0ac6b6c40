"""Tuned kernel configs as data: JSON files mapping token counts to :class:`KernelConfig`.

One file per (backend, E, N, device, dtype, quantization scheme), named
``E={E},N={N},device_name={device},dtype={dtype}[,quant={scheme}].json``, shipped in ``configs/triton/``
(the package ``moe.configs``) and validated on load. Looked up in the ``tuned_configs_dir`` option's folder
(``MOE_TUNED_CONFIGS_DIR``), then the per-user folder ``moe tune`` writes to, then the shipped files; the
``tuned_configs`` option (``MOE_TUNED_CONFIGS=0``) switches tuned files off (the heuristic alone). Lookup
takes the nearest token count on a log scale. Tuned files apply to CUDA devices (they are named by the
card); CPU runs use the heuristic.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
import os
import warnings
from pathlib import Path

import torch
from pydantic import Field, field_validator

from ...contract import ExpertsProblem
from ...frozen import Frozen, load_json_file
from ...options import options, register_cache
from .config import KernelConfig

__all__ = ["REACH", "TunedFile", "file_name", "load_tuned_file", "lookup", "tuned_config"]

SCHEMA_VERSION = 1
_CLI_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}  # `moe tune --dtype`
TUNE_HINT = "moe tune --E {E} --N {N} --K {K} --top-k {k} --dtype {dtype}"


class TunedFile(Frozen):
    """The schema of one tuned file."""

    schema_version: int = Field(SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION)
    backend: str = "triton"
    num_experts: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    top_k: int = Field(ge=1)
    device_name: str
    dtype: str
    quant: str = "none"  # the quantization scheme's key (QuantConfig.key())
    triton_version: str = ""
    configs: dict[int, KernelConfig]
    timings_us: dict[int, float] = Field(default_factory=dict)

    @field_validator("configs")
    @classmethod
    def _non_empty(cls, v: dict[int, KernelConfig]) -> dict[int, KernelConfig]:
        if not v or min(v) < 1:
            raise ValueError("configs must map token counts >= 1 to kernel configs, and not be empty")
        return v


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def file_name(num_experts: int, inter: int, device_name: str, dtype: torch.dtype | str, quant: str = "none") -> str:
    """``E=..,N=..,device_name=..,dtype=..[,quant=NAME].json``: quantized files are keyed by our scheme name
    (a per-tensor and a per-channel FP8 file must not collide)."""
    dt = dtype if isinstance(dtype, str) else _dtype_name(dtype)
    name = f"E={num_experts},N={inter},device_name={device_name.replace(' ', '_')},dtype={dt}"
    if quant != "none":
        name += f",quant={quant}"
    return name + ".json"


def load_tuned_file(path: Path | str) -> TunedFile:
    """Read and validate one file; errors name the file and the field."""
    return load_json_file(path, TunedFile, "tuned config")


def user_dir() -> Path:
    """The per-user folder ``moe tune`` writes to by default: ``$XDG_CACHE_HOME/moe/configs/triton``
    (``~/.cache/moe/configs/triton``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moe" / "configs" / "triton"


def search_dirs() -> list[Path]:
    """Where tuned files are looked up, first match wins: the ``tuned_configs_dir`` option
    (``MOE_TUNED_CONFIGS_DIR``), the per-user folder, the shipped files."""
    dirs = []
    chosen = options().tuned_configs_dir
    if chosen is not None:
        dirs.append(Path(chosen))
    return [*dirs, user_dir(), _shipped_dir()]


def _shipped_dir() -> Path:
    """The shipped files: the installed package ``moe.configs``, or ``configs/`` of a source tree run
    through PYTHONPATH (where no install mapped the folder to the package)."""
    try:
        return Path(str(importlib.resources.files("moe.configs"))) / "triton"
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[3] / "configs" / "triton"


@functools.lru_cache(maxsize=256)
def _find(name: str, dirs: tuple[Path, ...]) -> TunedFile | None:
    for d in dirs:
        path = d / name
        if path.is_file():
            return load_tuned_file(path)
    return None


REACH = 2.0  # a tuned token count's config serves counts within this factor of it


def lookup(tuned: TunedFile, num_tokens: int) -> KernelConfig | None:
    """The config of the nearest tuned token count on a log scale, if it is within :data:`REACH` of
    ``num_tokens``; None otherwise (the heuristic decides). A file tuned at 1, 16, ..., 16384 (4x apart)
    covers every count up to 32768; one tuned only at decode counts does not lend its thin row tiles to
    prefill (mixtral fp8_channel at 4096 tokens: 0.30x of bf16 with the M=64 config, 1.69x with the
    heuristic, H200)."""
    m = max(1, num_tokens)
    best = min(tuned.configs, key=lambda t: (abs(math.log(t) - math.log(m)), t))
    return tuned.configs[best] if max(best / m, m / best) <= REACH else None


register_cache(_find.cache_clear)
_warned: set[str] = set()


def tuned_config(problem: ExpertsProblem, device: torch.device) -> KernelConfig | None:
    """The tuned config for ``problem`` on ``device``, or None: with one warning per shape naming the
    tuning command when no file exists; silently when the file has no token count within :data:`REACH`."""
    if not options().tuned_configs or device.type != "cuda":
        return None
    name = file_name(problem.num_experts, problem.intermediate_size, torch.cuda.get_device_name(device),
                     problem.dtype, quant=problem.quant.key())
    tuned = _find(name, tuple(search_dirs()))
    if tuned is None:
        if name not in _warned:
            _warned.add(name)
            hint = TUNE_HINT.format(E=problem.num_experts, N=problem.intermediate_size, K=problem.hidden_size,
                                    k=problem.top_k, dtype=_CLI_DTYPES.get(problem.dtype, "bf16"))
            if problem.quant.key() != "none":
                hint += f" --quant {problem.quant.key()}"
            warnings.warn(f"moe: no tuned Triton config {name}; using the default heuristic. Tune with: {hint}",
                          stacklevel=3)
        return None
    return lookup(tuned, problem.num_tokens)
