"""The backend registry: registration, selection, and the decision trace that explains it.

``backend="auto"`` walks the registered backends by descending priority and takes the first that is
available and supports the problem; every other candidate is listed with its reason. A backend named
explicitly runs or raises with its reason: there is never a silent fallback.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass

from .backends.base import Backend, ExpertsProblem

__all__ = [
    "BackendUnavailableError",
    "Decision",
    "clear_decisions",
    "get_backend",
    "last_decision",
    "list_backends",
    "register_backend",
    "select_backend",
    "unregister_backend",
]

# Built-in backends: module path under moe.backends. Adding a backend is one file plus one line here.
_BUILTIN = ("torch_ref", "triton", "torch_grouped")

_registry: dict[str, Backend] = {}
_local = threading.local()
# Decisions by (problem shape, requested backend); cleared when the registry changes.
_decisions: dict[tuple[ExpertsProblem, str], Decision] = {}


class BackendUnavailableError(RuntimeError):
    """A backend named explicitly cannot run this problem on this machine."""


@dataclass(frozen=True)
class Candidate:
    name: str
    ok: bool
    reason: str


@dataclass(frozen=True)
class Decision:
    """The chosen backend and, for every candidate considered, whether it could run and why not."""

    requested: str
    chosen: str
    candidates: tuple[Candidate, ...]

    def __str__(self) -> str:
        lines = [f"requested={self.requested!r} -> chosen={self.chosen!r}"]
        for c in self.candidates:
            mark = "*" if c.name == self.chosen else ("+" if c.ok else "-")
            lines.append(f"  {mark} {c.name:<14} {c.reason}")
        return "\n".join(lines)


def _ensure_builtins() -> None:
    if getattr(_ensure_builtins, "done", False):
        return
    _ensure_builtins.done = True  # type: ignore[attr-defined]
    for module in _BUILTIN:
        backend = importlib.import_module(f"moe.backends.{module}").BACKEND
        _registry.setdefault(backend.name, backend)


def register_backend(backend: Backend, *, replace: bool = False) -> None:
    """Register a backend object (see moe/backends/base.py for the contract)."""
    _ensure_builtins()
    if not isinstance(backend, Backend):
        raise TypeError(
            f"backend: {type(backend).__name__} does not implement the Backend contract "
            "(name, priority, is_available, supports, apply)"
        )
    if backend.name in _registry and not replace:
        raise ValueError(f"backend {backend.name!r} is already registered; pass replace=True to override it")
    _registry[backend.name] = backend
    _decisions.clear()


def unregister_backend(name: str) -> None:
    _ensure_builtins()
    _registry.pop(name, None)
    _decisions.clear()


def list_backends() -> list[Backend]:
    """Registered backends, highest priority first."""
    _ensure_builtins()
    return sorted(_registry.values(), key=lambda b: (-b.priority, b.name))


def get_backend(name: str) -> Backend:
    _ensure_builtins()
    if name not in _registry:
        raise ValueError(f"backend: unknown backend {name!r}; registered: {', '.join(sorted(_registry))}, auto")
    return _registry[name]


def _judge(backend: Backend, problem: ExpertsProblem) -> Candidate:
    ok, reason = backend.is_available()
    if ok:
        ok, reason = backend.supports(problem)
    return Candidate(backend.name, ok, reason if reason else "ok")


def select_backend(problem: ExpertsProblem, backend: str = "auto") -> Decision:
    """Choose a backend for ``problem``; raise with the reason if a named backend cannot run it.

    Decisions are cached per problem shape (the token count aside: ``supports()`` must not depend on
    it), so the hot path pays for one dictionary lookup; the cache is cleared when backends change."""
    key = (problem, backend)  # ExpertsProblem equality ignores num_tokens
    decision = _decisions.get(key)
    if decision is None:
        decision = _decide(problem, backend)
        _decisions[key] = decision
    _local.last = decision
    return decision


def clear_decisions() -> None:
    """Forget cached decisions (after changing something ``is_available()`` reads, e.g. the environment)."""
    _decisions.clear()


def _decide(problem: ExpertsProblem, backend: str) -> Decision:
    if backend != "auto":
        candidate = _judge(get_backend(backend), problem)
        if not candidate.ok:
            raise BackendUnavailableError(f"backend {backend!r} cannot run this problem: {candidate.reason}")
        return Decision(backend, backend, (candidate,))
    candidates = tuple(_judge(b, problem) for b in list_backends())
    chosen = next((c.name for c in candidates if c.ok), None)
    if chosen is None:
        reasons = "; ".join(f"{c.name}: {c.reason}" for c in candidates)
        raise BackendUnavailableError(f"no backend can run this problem ({reasons})")
    return Decision("auto", chosen, candidates)


def last_decision() -> Decision | None:
    """The decision of the most recent ``fused_experts`` call on this thread."""
    return getattr(_local, "last", None)
