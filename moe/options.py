"""Runtime options: every ``MOE_*`` environment variable, parsed once into one validated object.

``moe.options()`` returns the options in force; ``moe.set_options(**fields)`` changes them for the
process; ``with moe.override_options(**fields):`` changes them for a block. The environment is read at
the first ``options()`` call and again by ``moe.reset_caches()``, which also empties every cache that
depends on options, devices or files (backend decisions, kernel configs, tuned files, device targets).

Booleans accept ``1/0``, ``true/false``, ``yes/no`` and ``on/off`` (any case); an empty variable means
its default; anything else is an error that names the variable and the allowed values.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import Field, field_validator

from .frozen import ConfigError, Frozen

__all__ = ["ENV_VARS", "Options", "options", "options_version", "override_options", "register_cache",
           "reset_caches", "set_options"]


class Options(Frozen):
    """The runtime options (frozen; build a new one with :func:`set_options`)."""

    value_checks: bool = Field(False, description="value checks (ids in range, finite logits and weights) on "
                                  "GPU tensors; they always run on CPU tensors")
    pdl: bool = Field(True, description="chain kernel launches by programmatic dependent launch where the "
                      "device has it")
    direct_launch: bool = Field(True, description="launch compiled Triton kernels past Triton's launcher, on "
                                "Triton versions whose GPU bitwise test passed")
    gpu_routing: bool = Field(True, description="route CUDA logits with the Triton routing kernels")
    route_align: bool = Field(True, description="FusedMoE.forward: the routing kernel also aligns the pairs of "
                              "small batches for the Triton backend, in the same launch")
    tuned_configs: bool = Field(True, description="use tuned kernel-config files")
    tuned_configs_dir: Path | None = Field(None, description="a folder of tuned files searched before the "
                                           "user cache and the shipped files")
    chunk_tokens: int = Field(32768, ge=1, description="batches above this many tokens run in chunks")
    batch_invariant: bool = Field(False, description="one kernel config for every batch size")
    deep_gemm_ue8m0: bool = Field(False, description="let the deep_gemm backend run fp8_block on SM100, where "
                                  "DeepGEMM rounds fp32 scales to powers of two (UE8M0), which costs accuracy")

    @field_validator("tuned_configs_dir")
    @classmethod
    def _folder_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not Path(v).is_dir():
            raise ValueError(f"{v} is not a folder")
        return v


# field -> environment variable
ENV_VARS = {
    "value_checks": "MOE_VALIDATE",
    "pdl": "MOE_PDL",
    "direct_launch": "MOE_DIRECT_LAUNCH",
    "gpu_routing": "MOE_GPU_ROUTING",
    "route_align": "MOE_ROUTE_ALIGN",
    "tuned_configs": "MOE_TUNED_CONFIGS",
    "tuned_configs_dir": "MOE_TUNED_CONFIGS_DIR",
    "chunk_tokens": "MOE_CHUNK_TOKENS",
    "batch_invariant": "MOE_BATCH_INVARIANT",
    "deep_gemm_ue8m0": "MOE_DEEP_GEMM_UE8M0",
}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse_bool(var: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{var}={raw!r} is not a boolean; use one of {', '.join(_TRUE)} or {', '.join(_FALSE)}")


def _from_env(environ: dict[str, str] | os._Environ) -> Options:
    fields: dict[str, object] = {}
    for name, var in ENV_VARS.items():
        raw = environ.get(var, "")
        if raw.strip() == "":
            continue
        annotation = Options.model_fields[name].annotation
        if annotation is bool:
            fields[name] = _parse_bool(var, raw)
        elif annotation is int:
            try:
                fields[name] = int(raw)
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not an integer; give a positive whole number") from None
        else:
            fields[name] = raw
    try:
        return Options(**fields)
    except ConfigError as exc:
        raise ValueError("; ".join(f"{ENV_VARS.get(field, field)}={received!r}: {msg}"
                                   for field, msg, received in exc.problems)) from None


_lock = threading.Lock()
_state: dict[str, object] = {"options": None, "version": 0}
_caches: list[Callable[[], None]] = []


def options() -> Options:
    """The options in force (read from the environment at the first call)."""
    opts = _state["options"]
    if opts is None:
        with _lock:
            if _state["options"] is None:
                _state["options"] = _from_env(os.environ)
            opts = _state["options"]
    return opts  # type: ignore[return-value]


def options_version() -> int:
    """A number that changes whenever the options change: caches key on it (cheaper than hashing them)."""
    options()
    return _state["version"]  # type: ignore[return-value]


def _install(new: Options) -> None:
    with _lock:
        _state["options"] = new
        _state["version"] = int(_state["version"]) + 1  # type: ignore[arg-type]


def set_options(**fields: object) -> Options:
    """Change options for this process, e.g. ``moe.set_options(pdl=False)``; validated like the model,
    and an unknown name is an error listing the known ones."""
    unknown = sorted(set(fields) - set(Options.model_fields))
    if unknown:
        raise ValueError(f"set_options: unknown option(s) {', '.join(unknown)}; known: "
                         f"{', '.join(Options.model_fields)}")
    new = Options(**{**options().model_dump(), **fields})
    _install(new)
    return new


@contextlib.contextmanager
def override_options(**fields: object) -> Iterator[Options]:
    """Run a block with some options changed (process-wide), then restore the previous ones."""
    old = options()
    new = set_options(**fields)
    try:
        yield new
    finally:
        _install(old)


def register_cache(clear: Callable[[], None]) -> Callable[[], None]:
    """Register a function that empties one of the package's caches; :func:`reset_caches` calls it."""
    _caches.append(clear)
    return clear


def reset_caches() -> None:
    """Read the environment again and empty every cache: backend decisions, call descriptions, kernel
    configs, tuned files, device targets. Call it after changing ``MOE_*`` variables, adding tuned files or
    registering backends by hand in a running process."""
    new = _from_env(os.environ)
    _install(new)
    for clear in list(_caches):
        clear()
