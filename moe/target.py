"""The device a call runs on, described by its features rather than by architecture numbers.

A :class:`DeviceTarget` is a frozen, validated config like the others: backends read its features in
``supports()`` (TMA, programmatic dependent launch, FP8/INT8/FP4 tensor cores, ...), and it is part of
every call's :class:`~moe.contract.ExpertsProblem`, so backend decisions are cached per device kind.
``current_target(device)`` reads the device this process has; :data:`TARGETS` names a few cards, so
``moe backends --target mi300x`` can say what would run on a card this machine does not have.

Architecture numbers appear in one place only: :func:`cuda_target` and :func:`rocm_target`, which derive
the features from a compute capability.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from typing import Literal

import torch
from pydantic import Field, model_validator

from .frozen import Frozen
from .options import register_cache

__all__ = ["TARGETS", "DeviceTarget", "cuda_target", "current_target", "named_target", "rocm_target"]

Vendor = Literal["cuda", "rocm", "cpu", "other"]
# the tensor-core and copy features of a GPU target (CUDA and ROCm), and those only CUDA has
_GPU_FEATURES = ("tma", "pdl", "wgmma", "tcgen05", "fp8_mma", "int8_mma", "fp4_mma")
_CUDA_ONLY = ("tma", "pdl", "wgmma", "tcgen05")


class DeviceTarget(Frozen):
    """What a device can do. Build one with :func:`cuda_target` / :func:`rocm_target` (features derived
    from the compute capability) or by hand for a card with other features."""

    name: str
    vendor: Vendor
    capability: tuple[int, int] | None = Field(None, description="compute capability as torch reports it")
    sm_count: int = Field(0, ge=0, description="multiprocessors (CUDA) or compute units (ROCm)")
    smem_per_block: int = Field(0, ge=0, description="shared memory a block may opt into, bytes")
    tma: bool = Field(False, description="tensor memory accelerator: bulk tensor copies through descriptors")
    pdl: bool = Field(False, description="programmatic dependent launch (a kernel starts before the last ends)")
    wgmma: bool = Field(False, description="Hopper warpgroup MMA (what SM90 grouped GEMMs are built on)")
    tcgen05: bool = Field(False, description="Blackwell datacenter MMA with tensor memory (SM100)")
    fp8_mma: bool = Field(False, description="e4m3fn (OCP FP8) tensor-core dots")
    int8_mma: bool = Field(False, description="int8 tensor-core dots")
    fp4_mma: bool = Field(False, description="block-scaled FP4 tensor-core dots")
    triton_interpreter: bool = Field(False, description="CPU: Triton kernels run under TRITON_INTERPRET=1")
    nvcc: str | None = Field(None, description="version of the nvcc on PATH (CUDA), None when there is none")

    @model_validator(mode="after")
    def _check(self) -> DeviceTarget:
        gpu_features = [f for f in _GPU_FEATURES if getattr(self, f)]
        if self.vendor in ("cpu", "other") and gpu_features:
            raise ValueError(f"a {self.vendor} target has no tensor-core features, got {', '.join(gpu_features)}")
        if self.vendor in ("cuda", "rocm") and self.capability is None:
            raise ValueError(f"a {self.vendor} target needs its capability, e.g. (9, 0)")
        cuda_only = [f for f in _CUDA_ONLY if getattr(self, f)]
        if self.vendor == "rocm" and cuda_only:
            raise ValueError(f"{', '.join(cuda_only)} are CUDA features; a rocm target cannot have them")
        if self.triton_interpreter and self.vendor != "cpu":
            raise ValueError("triton_interpreter describes a CPU target")
        return self

    @property
    def is_gpu(self) -> bool:
        return self.vendor in ("cuda", "rocm")

    def describe(self) -> str:
        feats = [f for f in (*_GPU_FEATURES, "triton_interpreter") if getattr(self, f)]
        cap = f" {self.capability[0]}.{self.capability[1]}" if self.capability else ""
        return f"{self.name} ({self.vendor}{cap}; {', '.join(feats) or 'no tensor-core features'})"


def cuda_target(name: str, capability: tuple[int, int], sm_count: int = 0, smem_per_block: int = 0,
                nvcc: str | None = None) -> DeviceTarget:
    """An NVIDIA device's features from its compute capability."""
    cap = tuple(capability)
    major = cap[0]
    return DeviceTarget(
        name=name, vendor="cuda", capability=cap, sm_count=sm_count, smem_per_block=smem_per_block,
        tma=major >= 9, pdl=major >= 9, wgmma=major == 9, tcgen05=major in (10, 11),
        fp8_mma=cap >= (8, 9), int8_mma=cap >= (7, 5), fp4_mma=major >= 10, nvcc=nvcc,
    )


def rocm_target(name: str, capability: tuple[int, int], sm_count: int = 0, smem_per_block: int = 0) -> DeviceTarget:
    """An AMD device's features from the capability torch reports (gfx942 is 9.4). MI300 (9.4) computes
    FP8 in the e4m3fnuz format, not OCP e4m3fn, so ``fp8_mma`` is set from MI350 (9.5) on."""
    cap = tuple(capability)
    return DeviceTarget(name=name, vendor="rocm", capability=cap, sm_count=sm_count, smem_per_block=smem_per_block,
                        fp8_mma=cap >= (9, 5), int8_mma=True)


TARGETS: dict[str, DeviceTarget] = {
    "a100": cuda_target("NVIDIA A100-SXM4-80GB", (8, 0), 108, 166912),
    "h100": cuda_target("NVIDIA H100 80GB HBM3", (9, 0), 132, 232448),
    "h200": cuda_target("NVIDIA H200", (9, 0), 132, 232448),
    "b200": cuda_target("NVIDIA B200", (10, 0), 148, 232448),
    "mi300x": rocm_target("AMD Instinct MI300X", (9, 4), 304, 65536),
    "cpu": DeviceTarget(name="cpu", vendor="cpu"),
}


def named_target(name: str) -> DeviceTarget:
    """One of :data:`TARGETS` by name."""
    if name not in TARGETS:
        raise ValueError(f"target: unknown target {name!r}; known: {', '.join(TARGETS)}")
    return TARGETS[name]


_current: dict[tuple[str, int | None], DeviceTarget] = {}
_by_device: dict[object, DeviceTarget] = {}  # the same, keyed by the device object or string passed (hot path)
register_cache(_current.clear)
register_cache(_by_device.clear)


def current_target(device: torch.device | str) -> DeviceTarget:
    """The target of a device of this process (cached per device)."""
    found = _by_device.get(device)
    if found is not None:
        return found
    dev = torch.device(device)
    index = dev.index
    if dev.type == "cuda" and index is None:
        index = torch.cuda.current_device()  # "cuda" follows the current device: not cached by object
    key = (dev.type, index)
    found = _current.get(key)
    if found is None:
        found = _current[key] = _read(dev.type, index)
    if dev.type != "cuda" or dev.index is not None:
        _by_device[device] = found
    return found


def _read(kind: str, index: int | None) -> DeviceTarget:
    if kind == "cpu":
        # Triton decides at import whether its kernels run under the interpreter: read once, like it
        return DeviceTarget(name="cpu", vendor="cpu", triton_interpreter=os.environ.get("TRITON_INTERPRET") == "1")
    if kind != "cuda":
        return DeviceTarget(name=kind, vendor="other")
    props = torch.cuda.get_device_properties(index)
    smem = int(getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block)
    cap = (props.major, props.minor)
    if torch.version.hip:
        return rocm_target(props.name, cap, props.multi_processor_count, smem)
    return cuda_target(props.name, cap, props.multi_processor_count, smem, nvcc_version())


@functools.cache
def nvcc_version() -> str | None:
    """The version of the nvcc on PATH (or under CUDA_HOME), e.g. '13.0'; None when there is none."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc") or (os.path.join(home, "bin", "nvcc") if home else None)
    if not nvcc or not os.path.exists(nvcc):
        return None
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", text)
    return m.group(1) if m else None
