"""compressed-tensors checkpoints (``quant_method: compressed-tensors``): ``float-quantized`` FP8 and
``int-quantized`` INT8 (W8A8, here), and ``pack-quantized`` weight-only INT4/INT8
(:mod:`moe.checkpoints.compressed_packed`).

Each projection stores ``weight`` (float8_e4m3fn or int8 [out, in]) and ``weight_scale`` (a multiplier:
per tensor [1], per channel [out, 1], per block [ceil(out/bn), ceil(in/bk)]); static activation schemes
add ``input_scale`` [1]. ``config_groups`` say which modules (``targets``: ``Linear``, exact names or
``re:`` regexes) use which scheme; ``ignore`` lists modules stored unquantized. The supported
combinations are the moe schemes of :data:`SCHEMES`; a ``pack-quantized`` group is read through its
codec.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .base import CheckpointFormat, Encoding, matches_module, register_format
from .codec import Codec
from .compressed_packed import parse_packed_group
from .source import CheckpointError

__all__ = ["SCHEMES", "CompressedTensors"]

FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized")

# (type, weight strategy, weight block, activation strategy, activation group, dynamic) -> moe scheme
SCHEMES: dict[tuple[str, str, tuple[int, ...] | None, str, int | None, bool], str] = {
    ("float", "tensor", None, "tensor", None, True): "fp8_tensor",
    ("float", "tensor", None, "tensor", None, False): "fp8_tensor_static",
    ("float", "channel", None, "token", None, True): "fp8_channel",
    ("float", "block", (128, 128), "group", 128, True): "fp8_block",
    ("int", "channel", None, "token", None, True): "int8_channel",
}


def _describe(key: tuple) -> str:
    kind, ws, wb, acts, ag, dyn = key
    block = f" {list(wb)}" if wb else ""
    group = f" {ag}" if ag else ""
    return f"{kind} weights per {ws}{block} with {'dynamic' if dyn else 'static'} activations per {acts}{group}"


@dataclass(frozen=True)
class _Group:
    name: str
    targets: tuple[str, ...]
    quant: str
    static: bool
    codec: Codec | None = None


@register_format
class CompressedTensors(CheckpointFormat):
    method = "compressed-tensors"
    data_suffixes = ("weight_packed",)

    def __init__(self, config: Mapping[str, Any], groups: tuple[_Group, ...], ignore: tuple[str, ...]) -> None:
        self.config = dict(config)
        self.groups = groups
        self.ignore = ignore

    @classmethod
    def parse(cls, config: Mapping[str, Any], where: str) -> CompressedTensors:
        fmt = config.get("format")
        groups = config.get("config_groups")
        if not isinstance(groups, Mapping) or not groups:
            raise CheckpointError(f"{where}: quantization_config.config_groups must map group names to schemes, got "
                                  f"{groups!r}")
        parsed = tuple(_parse_group(name, g, fmt, where) for name, g in groups.items())
        ignore = config.get("ignore") or []
        if not isinstance(ignore, list) or not all(isinstance(s, str) for s in ignore):
            raise CheckpointError(f"{where}: quantization_config.ignore must be a list of module names, got {ignore!r}")
        return cls(config, parsed, tuple(ignore))

    def encoding(self, module: str) -> Encoding:
        if any(matches_module(module, pattern) for pattern in self.ignore):
            return Encoding(None)
        for group in self.groups:
            if any(_targets(module, t) for t in group.targets):
                if group.codec is not None:
                    return Encoding(group.quant, codec=group.codec)
                return Encoding(group.quant, scale="weight_scale", input_scale="input_scale" if group.static else None)
        return Encoding(None)


def _targets(module: str, target: str) -> bool:
    """compressed-tensors' matching: ``Linear`` (every projection is one), ``re:`` from the start, or the name."""
    if target == "Linear":
        return True
    if target.startswith("re:"):
        return matches_module(module, target)
    return module == target


def _parse_group(name: str, group: Any, fmt: Any, where: str) -> _Group:
    field = f"quantization_config.config_groups.{name}"
    if not isinstance(group, Mapping):
        raise CheckpointError(f"{where}: {field} must be a JSON object, got {group!r}")
    fmt = group.get("format") or fmt
    if fmt not in FORMATS:
        raise CheckpointError(f"{where}: {field}: format {fmt!r} is not supported; supported: {', '.join(FORMATS)}")
    w, a = group.get("weights"), group.get("input_activations")
    if not isinstance(w, Mapping):
        raise CheckpointError(f"{where}: {field}.weights must describe the weight scheme, got {w!r}")
    if fmt == "pack-quantized":
        codec = parse_packed_group(field, w, a, where)
        return _Group(name, _parse_targets(group, field, where), codec.quant, False, codec)
    if not isinstance(a, Mapping):
        raise CheckpointError(f"{where}: {field}.input_activations is {a!r}: weight-only schemes are not supported "
                              f"by the W8A8 reader; supported: {'; '.join(_describe(k) for k in SCHEMES)}")
    for what, args in (("weights", w), ("input_activations", a)):
        if args.get("num_bits") != 8 or args.get("symmetric", True) is not True:
            raise CheckpointError(f"{where}: {field}.{what}: num_bits={args.get('num_bits')!r}, "
                                  f"symmetric={args.get('symmetric')!r}; supported: num_bits 8, symmetric")
    if w.get("actorder") not in (None, False) or w.get("dynamic") not in (None, False):
        raise CheckpointError(f"{where}: {field}.weights: actorder={w.get('actorder')!r}, dynamic={w.get('dynamic')!r};"
                              " supported: static weights without act-order")
    if w.get("type") != a.get("type"):
        raise CheckpointError(f"{where}: {field}: weights of type {w.get('type')!r} with activations of type "
                              f"{a.get('type')!r}; supported: {'; '.join(_describe(k) for k in SCHEMES)}")
    block = w.get("block_structure")
    key = (w.get("type"), w.get("strategy"), tuple(block) if block else None, a.get("strategy"),
           a.get("group_size") if a.get("strategy") == "group" else None, bool(a.get("dynamic")))
    if key not in SCHEMES or a.get("dynamic") == "local":
        raise CheckpointError(f"{where}: {field}: {_describe(key)} is not supported; supported: "
                              f"{'; '.join(_describe(k) for k in SCHEMES)}")
    return _Group(name, _parse_targets(group, field, where), SCHEMES[key], not key[-1])


def _parse_targets(group: Mapping[str, Any], field: str, where: str) -> tuple[str, ...]:
    targets = group.get("targets") or []
    if not isinstance(targets, list) or not targets:
        raise CheckpointError(f"{where}: {field}.targets must list the modules it covers, got {targets!r}")
    return tuple(targets)
