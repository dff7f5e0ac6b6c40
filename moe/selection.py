"""Measured backend selection: tables that say which backend was fastest on a card, per token-count bucket.

One JSON file per (E, N, K, top-k, activation, dtype, quantization scheme, device name), written by
``moe tune --backends`` (``moe.tune_backends``), validated on load: a broken file is an error naming the
file and the field. Looked up in ``<tuned_configs_dir>/selection`` (the ``MOE_TUNED_CONFIGS_DIR`` option),
then the per-user folder ``~/.cache/moe/configs/selection``, then the shipped ``configs/selection/``
(measured on an H200: mixtral, qwen3 and dsv3 in bf16 and ``fp8_block``). ``backend="auto"`` takes a
table's choice for the call's bucket (the nearest measured token count on a log scale) when the backend can
run the call; a backend that failed its parity check on that card is never chosen there; without a table,
priorities decide.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
import os
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from .contract import ExpertsProblem
from .frozen import Frozen, load_json_file
from .options import options, register_cache

__all__ = ["SCHEMA_VERSION", "BucketChoice", "SelectionTable", "bucket_of", "file_name", "find_table",
           "load_table", "search_dirs", "table_file_name", "table_for", "user_dir", "write_table"]

SCHEMA_VERSION = 1


class BucketChoice(Frozen):
    """The measurement of one token count: every timed backend's median, the fastest, and those that failed
    their parity check (never chosen)."""

    backend: str = Field(min_length=1)
    timings_us: dict[str, float] = Field(description="median microseconds of each backend that passed parity")
    failed_parity: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> BucketChoice:
        if self.backend not in self.timings_us:
            raise ValueError(f"backend: {self.backend!r} has no timing in timings_us ({', '.join(self.timings_us)})")
        if any(t <= 0 or not math.isfinite(t) for t in self.timings_us.values()):
            raise ValueError(f"timings_us: every timing must be a positive number, got {self.timings_us}")
        if min(self.timings_us.values()) < self.timings_us[self.backend]:
            raise ValueError(f"backend: {self.backend!r} is not the fastest of timings_us {self.timings_us}")
        failed = set(self.failed_parity) & (set(self.timings_us) | {self.backend})
        if failed:
            raise ValueError(f"failed_parity: {', '.join(sorted(failed))} failed parity but has a timing")
        return self

    def runner_up(self) -> tuple[str, float] | None:
        """The second fastest backend and how many times slower it is, or None when one was timed."""
        others = {b: t for b, t in self.timings_us.items() if b != self.backend}
        if not others:
            return None
        name = min(others, key=others.get)
        return name, others[name] / self.timings_us[self.backend]


class SelectionTable(Frozen):
    """The schema of one selection file."""

    schema_version: int = Field(SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION)
    num_experts: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    top_k: int = Field(ge=1)
    activation: str = Field(min_length=1)
    dtype: str = Field(min_length=1)
    quant: str = "none"
    device_name: str = Field(min_length=1)
    buckets: dict[int, BucketChoice]

    @field_validator("buckets")
    @classmethod
    def _non_empty(cls, v: dict[int, BucketChoice]) -> dict[int, BucketChoice]:
        if not v or min(v) < 1:
            raise ValueError("buckets must map token counts >= 1 to a choice, and not be empty")
        return v

    def bucket(self, num_tokens: int) -> int:
        """The measured token count nearest to ``num_tokens`` on a log scale (the lower on a tie)."""
        m = max(1, num_tokens)
        return min(self.buckets, key=lambda t: (abs(math.log(t) - math.log(m)), t))


def _dtype_name(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


def file_name(problem: ExpertsProblem, device_name: str) -> str:
    """``E=..,N=..,K=..,topk=..,act=..,dtype=..,quant=..,device_name=...json``."""
    quant = problem.quant.key()
    quant = quant if quant.isidentifier() else "custom"  # a JSON key: no such tables are written
    return (f"E={problem.num_experts},N={problem.intermediate_size},K={problem.hidden_size},topk={problem.top_k},"
            f"act={problem.activation.name},dtype={_dtype_name(problem.dtype)},quant={quant},"
            f"device_name={device_name.replace(' ', '_')}.json")


def load_table(path: Path | str) -> SelectionTable:
    """Read and validate one file; errors name the file and the field."""
    return load_json_file(path, SelectionTable, "selection table")


def write_table(table: SelectionTable, folder: Path) -> Path:
    """Write ``table`` under ``folder`` (made if missing) by its canonical name; returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / table_file_name(table)
    path.write_text(json.dumps(table.model_dump(mode="json"), indent=1, sort_keys=True) + "\n")
    return path


def table_file_name(table: SelectionTable) -> str:
    return (f"E={table.num_experts},N={table.intermediate_size},K={table.hidden_size},topk={table.top_k},"
            f"act={table.activation},dtype={table.dtype},quant={table.quant},"
            f"device_name={table.device_name.replace(' ', '_')}.json")


def user_dir() -> Path:
    """``$XDG_CACHE_HOME/moe/configs/selection`` (``~/.cache/moe/configs/selection``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moe" / "configs" / "selection"


def _shipped_dir() -> Path:
    try:
        return Path(str(importlib.resources.files("moe.configs"))) / "selection"
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "configs" / "selection"


def search_dirs() -> list[Path]:
    chosen = options().tuned_configs_dir
    return [*([Path(chosen) / "selection"] if chosen is not None else []), user_dir(), _shipped_dir()]


@functools.lru_cache(maxsize=256)
def _find(name: str, dirs: tuple[Path, ...]) -> tuple[SelectionTable, Path] | None:
    for d in dirs:
        path = d / name
        if path.is_file():
            return load_table(path), path
    return None


_by_problem: dict[ExpertsProblem, tuple[SelectionTable, Path] | None] = {}
register_cache(_find.cache_clear)
register_cache(_by_problem.clear)


def find_table(problem: ExpertsProblem) -> tuple[SelectionTable, Path] | None:
    """The table measured for ``problem``'s shape on its target's card, and its path; None without one
    (remembered per problem: the hot path pays one dictionary lookup)."""
    if problem in _by_problem:
        return _by_problem[problem]
    target, found = problem.target, None
    # CPU targets read tables only from a folder given by option (tests, ``moe tune --backends`` on CPU)
    if options().tuned_configs and target is not None and (target.is_gpu or options().tuned_configs_dir):
        found = _find(file_name(problem, target.name), tuple(search_dirs()))
    _by_problem[problem] = found
    return found


def table_for(problem: ExpertsProblem) -> tuple[SelectionTable, Path, int] | None:
    """(table, its path, the call's bucket) or None."""
    found = find_table(problem)
    if found is None:
        return None
    table, path = found
    return table, path, table.bucket(problem.num_tokens)


def bucket_of(problem: ExpertsProblem) -> int | None:
    """The bucket of the call's token count in its table, None without a table: the decision cache's key."""
    found = find_table(problem)
    return None if found is None else found[0].bucket(problem.num_tokens)
