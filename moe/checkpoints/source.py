"""Where checkpoint tensors come from: safetensors files (read lazily, slice by slice) or a state dict.

A :class:`TensorSource` answers what a loader asks before it reads anything (is a tensor there, its
shape and dtype, which file holds it) and reads a tensor or a slice of one. Safetensors sources read
through ``safe_open(...).get_slice(key)[index]``, so a rank reads only its experts and its slice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["CheckpointError", "SafetensorsSource", "StateDictSource", "TensorSource", "open_source"]

Index = tuple[int | slice, ...]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: names the file, the tensor, what was found and what
    is allowed."""


@runtime_checkable
class TensorSource(Protocol):
    """Read-only access to named checkpoint tensors."""

    def __contains__(self, key: str) -> bool: ...
    def keys(self) -> Iterator[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> torch.dtype: ...
    def where(self, key: str) -> str: ...
    def read(self, key: str, index: Index = ()) -> torch.Tensor: ...
    @property
    def quantization_config(self) -> dict[str, Any] | None: ...
    @property
    def config_where(self) -> str: ...


class StateDictSource:
    """A mapping of names to tensors (``model.state_dict()``, or tensors built by hand), with an optional
    ``quantization_config`` (the ``config.json`` field of the checkpoint it came from)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], quantization_config: dict[str, Any] | None = None,
                 name: str = "state dict") -> None:
        self._tensors = tensors
        self._config = quantization_config
        self.name = name

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def keys(self) -> Iterator[str]:
        return iter(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def where(self, key: str) -> str:
        return self.name

    def read(self, key: str, index: Index = ()) -> torch.Tensor:
        return self._tensors[key][index] if index else self._tensors[key]

    @property
    def quantization_config(self) -> dict[str, Any] | None:
        return self._config

    @property
    def config_where(self) -> str:
        return f"{self.name} (quantization_config)"


# safetensors' dtype names -> torch
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsSource:
    """The safetensors files of a checkpoint: a directory (``model.safetensors.index.json`` when there is
    one, else every ``*.safetensors`` in it; ``config.json`` for the quantization config) or one file.
    Files are opened once, lazily; nothing is read until :meth:`read`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"checkpoint: {self.path} does not exist; give a directory of safetensors files "
                                  "(with config.json) or one .safetensors file")
        self.root = self.path if self.path.is_dir() else self.path.parent
        self._handles: dict[str, Any] = {}  # file name -> open safetensors handle
        self._config_file = self.root / "config.json"
        self._files = self._weight_map()
        self._config = self._read_config()

    def _weight_map(self) -> dict[str, str]:
        """tensor name -> file name (relative to the root)."""
        if self.path.is_file():
            return dict.fromkeys(self._file_keys(self.path.name), self.path.name)
        index = self.root / "model.safetensors.index.json"
        if index.is_file():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"checkpoint: {index} is not a safetensors index (a weight_map of tensor name "
                                      f"-> file): {exc}") from None
        files = sorted(p.name for p in self.root.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"checkpoint: {self.root} holds no *.safetensors file and no "
                                  "model.safetensors.index.json")
        return {key: name for name in files for key in self._file_keys(name)}

    def _file_keys(self, name: str) -> list[str]:
        return list(self._open(name).keys())

    def _open(self, name: str) -> Any:
        from safetensors import safe_open

        if name not in self._handles:
            file = self.root / name
            if not file.is_file():
                raise CheckpointError(f"checkpoint: {file} is named by the index but does not exist")
            self._handles[name] = safe_open(str(file), framework="pt")
        return self._handles[name]

    def _read_config(self) -> dict[str, Any] | None:
        """``config.json``'s ``quantization_config``; without one, a ModelOpt ``hf_quant_config.json``'s
        ``quantization`` section (as ``quant_method: modelopt``)."""
        config, modelopt = self.root / "config.json", self.root / "hf_quant_config.json"
        found = self._json(config).get("quantization_config") if config.is_file() else None
        if found is None and modelopt.is_file():
            section = self._json(modelopt).get("quantization")
            self._config_file = modelopt
            return {"quant_method": "modelopt", **section} if isinstance(section, dict) else None
        return found

    @staticmethod
    def _json(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise CheckpointError(f"checkpoint: {path} is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"checkpoint: {path} must hold a JSON object, got {type(data).__name__}")
        return data

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def keys(self) -> Iterator[str]:
        return iter(self._files)

    def _slice(self, key: str) -> Any:
        return self._open(self._files[key]).get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        name = self._slice(key).get_dtype()
        if name not in _ST_DTYPES:
            raise CheckpointError(f"{self.where(key)}: tensor {key} has safetensors dtype {name}, which moe does not "
                                  f"read; readable: {', '.join(_ST_DTYPES)}")
        return _ST_DTYPES[name]

    def where(self, key: str) -> str:
        if key in self._files:
            return str(self.root / self._files[key])
        index = self.root / "model.safetensors.index.json"
        files = set(self._files.values())
        # a missing tensor: the index that should name it, or the one file, or the directory
        return str(index if index.is_file() else self.root / files.pop() if len(files) == 1 else self.root)

    def read(self, key: str, index: Index = ()) -> torch.Tensor:
        s = self._slice(key)
        return s[index] if index else s[...]

    @property
    def quantization_config(self) -> dict[str, Any] | None:
        return self._config

    @property
    def config_where(self) -> str:
        return str(self._config_file)


def open_source(source: str | os.PathLike[str] | Mapping[str, torch.Tensor] | TensorSource,
                quantization_config: dict[str, Any] | None = None) -> TensorSource:
    """A :class:`TensorSource` for a path, a state dict or a source; ``quantization_config`` (a
    ``config.json`` field) replaces the one the source carries."""
    if isinstance(source, (str, os.PathLike)):
        src: TensorSource = SafetensorsSource(source)
    elif isinstance(source, TensorSource) and not isinstance(source, Mapping):
        src = source
    elif isinstance(source, Mapping):
        src = StateDictSource(source)
    else:
        raise TypeError(f"checkpoint: expected a path, a state dict or a TensorSource, got {type(source).__name__}")
    if quantization_config is not None:
        return _WithConfig(src, quantization_config)
    return src


class _WithConfig:
    """A source with another quantization config."""

    def __init__(self, src: TensorSource, config: dict[str, Any]) -> None:
        self._src, self._config = src, config

    def __getattr__(self, name: str) -> Any:
        return getattr(self._src, name)

    def __contains__(self, key: str) -> bool:
        return key in self._src

    @property
    def quantization_config(self) -> dict[str, Any] | None:
        return self._config

    @property
    def config_where(self) -> str:
        return "quantization_config argument"
