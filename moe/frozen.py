"""The base of every config: a frozen pydantic model whose errors are short and name what is wrong.

pydantic's own message for a cross-field check repeats the whole input dict; here each error becomes one
line, ``Class.field: what is wrong (got value)``, raised as :class:`ConfigError` (a ``ValueError``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["ConfigError", "Frozen", "config_error", "load_json_file"]


class ConfigError(ValueError):
    """A config that failed validation; ``problems`` holds (field, message, received value) per error."""

    def __init__(self, message: str, problems: list[tuple[str, str, Any]]) -> None:
        super().__init__(message)
        self.problems = problems


def config_error(cls_name: str, exc: ValidationError) -> ConfigError:
    problems = []
    for e in exc.errors():
        field = ".".join(str(p) for p in e["loc"])
        problems.append((field, e["msg"].removeprefix("Value error, "), e.get("input")))
    lines = []
    for field, msg, received in problems:
        where = f"{cls_name}.{field}" if field else cls_name
        got = "" if not field or isinstance(received, dict) else f" (got {received!r})"
        lines.append(f"{where}: {msg}{got}")
    return ConfigError("; ".join(lines), problems)


class Frozen(BaseModel):
    """Frozen, unknown fields refused, errors reported by :func:`config_error`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error(type(self).__name__, exc) from None


_M = TypeVar("_M", bound=BaseModel)


def load_json_file(path: Path | str, model: type[_M], what: str) -> _M:
    """Read and validate one JSON file as ``model``; errors name ``what``, the file and the field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path}: expected a JSON object, got {type(data).__name__}")
    try:
        return model(**data)
    except ConfigError as exc:
        raise ValueError(f"{what} {path}: {exc}") from None
