"""The base of every config: a frozen pydantic model whose errors are short and name what is wrong.

pydantic's own message for a cross-field check repeats the whole input dict; here each error becomes one
line, ``Class.field: what is wrong (got value)``, raised as :class:`ConfigError` (a ``ValueError``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["ConfigError", "Frozen", "config_error"]


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
