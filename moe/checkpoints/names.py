"""Where a layer's expert tensors live in a checkpoint, and how they are named.

Three forms, found by looking for the first local expert's keys under each candidate prefix:

- per expert: ``{prefix}.{e}.{gate_proj,up_proj,down_proj}.{suffix}`` (Qwen, DeepSeek) or
  ``{prefix}.{e}.{w1,w3,w2}.{suffix}`` (Mixtral), each [out, in];
- fused (transformers 5): ``{prefix}.gate_up_proj`` [E, 2N, K] (gate rows, then up rows) and
  ``{prefix}.down_proj`` [E, K, N]; a scale ``weight_scale_inv`` of the per-expert form is
  ``{prefix}.gate_up_proj_scale_inv`` here (the suffix with its leading ``weight`` dropped), with the
  expert dim in front and gate then up along the rows;
- dense (one MLP, e.g. shared experts): ``{prefix}.{gate_proj,up_proj,down_proj}.{suffix}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .source import CheckpointError, TensorSource

__all__ = ["PROJECTION_NAMES", "ExpertNaming", "find_naming"]

PROJECTION_NAMES: tuple[tuple[str, str, str], ...] = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
_FUSED = ("gate_up_proj", "gate_up_proj", "down_proj")

Style = Literal["per_expert", "fused", "dense"]


@dataclass(frozen=True)
class ExpertNaming:
    """The names of one layer's expert tensors. ``proj`` is 0 (gate), 1 (up) or 2 (down)."""

    prefix: str
    style: Style
    names: tuple[str, str, str]

    def module(self, expert: int, proj: int) -> str:
        """The projection's module name (what skip lists and config groups match)."""
        if self.style == "per_expert":
            return f"{self.prefix}.{expert}.{self.names[proj]}"
        return f"{self.prefix}.{self.names[proj]}"

    def key(self, expert: int, proj: int, suffix: str) -> str:
        """The tensor name of ``suffix`` (``weight``, ``weight_scale_inv``, ``input_scale``, ...)."""
        if self.style == "fused":
            return f"{self.prefix}.{_FUSED[proj]}{fused_suffix(suffix)}"
        return f"{self.module(expert, proj)}.{suffix}"


def fused_suffix(suffix: str) -> str:
    """``weight`` -> ``""``, ``weight_scale_inv`` -> ``_scale_inv``, ``input_scale`` -> ``_input_scale``."""
    return suffix.removeprefix("weight") if suffix.startswith("weight") else f"_{suffix}"


def _candidates(prefix: str, expert: int, dense: bool) -> list[ExpertNaming]:
    if dense:
        return [ExpertNaming(prefix, "dense", names) for names in PROJECTION_NAMES]
    return [*(ExpertNaming(prefix, "per_expert", names) for names in PROJECTION_NAMES),
            ExpertNaming(prefix, "fused", _FUSED)]


def find_naming(src: TensorSource, prefixes: Sequence[str], expert: int, *, dense: bool = False,
                suffixes: Sequence[str] = ("weight",)) -> ExpertNaming:
    """The first naming under ``prefixes`` whose gate data of ``expert`` (a tensor of one of ``suffixes``:
    ``weight``, or a format's own such as GPTQ's ``qweight``) is in ``src``."""
    tried = []
    for prefix in prefixes:
        for naming in _candidates(prefix, expert, dense):
            for suffix in suffixes:
                key = naming.key(expert, 0, suffix)
                if key in src:
                    return naming
                tried.append(key)
    where = src.where(tried[0]) if tried else "checkpoint"
    raise CheckpointError(f"{where}: no expert tensors found; looked for {', '.join(tried)}")
