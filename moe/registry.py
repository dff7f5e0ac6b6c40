"""The backend registry: registration, plugins, selection, and the decision trace that explains it.

``backend="auto"`` walks the registered backends by descending priority (for the call's device target,
where a backend has ``priority_for``) and takes the first that is
available, runs the call's quantization scheme and supports the problem; every other candidate is listed
with its reason. A backend named explicitly runs or raises with its reason: there is never a silent
fallback.

Backends come from three places: the built-in modules under ``moe.backends``, :func:`register_backend`,
and plugins: installed distributions that declare an entry point in the group ``moe.backends`` whose
value is a ``Backend`` object or a zero-argument callable returning one. Plugins are discovered at the
first use of the registry (``import moe`` never imports one). A plugin that fails to import, to build,
to meet the contract or whose name is taken is kept as a :class:`BrokenPlugin` with its reason
(``moe backends`` lists it) and is never selected; a backend whose ``is_available`` or ``supports``
raises or returns something other than ``(bool, str)`` is judged unable to run, with that as its reason.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import threading
from dataclasses import dataclass

from .contract import Backend, ExpertsProblem, backend_schemes
from .options import register_cache
from .selection import bucket_of, table_for
from .target import DeviceTarget

__all__ = [
    "ENTRY_POINT_GROUP",
    "BackendUnavailableError",
    "BrokenPlugin",
    "Decision",
    "broken_plugins",
    "clear_decisions",
    "get_backend",
    "judge",
    "last_decision",
    "list_backends",
    "register_backend",
    "select_backend",
    "unregister_backend",
]

ENTRY_POINT_GROUP = "moe.backends"
# Built-in backends: module path under moe.backends. Adding a backend is one file plus one line here.
_BUILTIN = ("torch_ref", "triton", "torch_grouped", "deep_gemm", "cutlass", "cutlass_fp4", "sonic", "aiter")

_registry: dict[str, Backend] = {}
_broken: dict[str, BrokenPlugin] = {}
_local = threading.local()
_lock = threading.RLock()
# Decisions by (problem shape, requested backend, token-count bucket of a selection table or None);
# cleared when the registry changes.
_decisions: dict[tuple[ExpertsProblem, str, int | None], Decision] = {}
register_cache(_decisions.clear)


class BackendUnavailableError(RuntimeError):
    """A backend named explicitly cannot run this problem on this machine."""


@dataclass(frozen=True)
class Candidate:
    name: str
    ok: bool
    reason: str


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin entry point that did not yield a usable backend, and why."""

    name: str  # the entry point's name
    value: str  # what it points to, ``module:attribute``
    distribution: str
    reason: str


@dataclass(frozen=True)
class Decision:
    """The chosen backend and, for every candidate considered, whether it could run and why not."""

    requested: str
    chosen: str
    candidates: tuple[Candidate, ...]
    why: str = ""  # how auto chose: a measured selection table, or priorities

    def __str__(self) -> str:
        lines = [f"requested={self.requested!r} -> chosen={self.chosen!r}" + (f" ({self.why})" if self.why else "")]
        for c in self.candidates:
            mark = "*" if c.name == self.chosen else ("+" if c.ok else "-")
            lines.append(f"  {mark} {c.name:<14} {c.reason}")
        return "\n".join(lines)


def _ensure_loaded() -> None:
    if getattr(_ensure_loaded, "done", False):
        return
    with _lock:
        if getattr(_ensure_loaded, "done", False):
            return
        for module in _BUILTIN:
            backend = importlib.import_module(f"moe.backends.{module}").BACKEND
            _registry.setdefault(backend.name, backend)
        _load_plugins()
        _ensure_loaded.done = True  # type: ignore[attr-defined]


def _contract_gap(obj: object) -> str | None:
    """What ``obj`` lacks of the Backend contract, or None."""
    missing = [m for m in ("name", "priority", "is_available", "supports", "apply") if not hasattr(obj, m)]
    if missing:
        return f"{type(obj).__name__} does not implement the Backend contract (missing {', '.join(missing)})"
    if not isinstance(obj.name, str) or not obj.name:
        return f"its name must be a non-empty string, got {obj.name!r}"
    if not isinstance(obj.priority, int):
        return f"its priority must be an int, got {obj.priority!r}"
    return None


def _load_plugins() -> None:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(getattr(ep, "dist", None), "name", None) or "?"
        try:
            obj = ep.load()
            if isinstance(obj, type) or (callable(obj) and not isinstance(obj, Backend)):
                obj = obj()  # a factory (or a class): build the backend
        except Exception as exc:  # a broken plugin is reported, never raised at selection time
            _broken[ep.name] = BrokenPlugin(ep.name, ep.value, dist, f"failed to load: {type(exc).__name__}: {exc}")
            continue
        gap = _contract_gap(obj)
        if gap is not None:
            _broken[ep.name] = BrokenPlugin(ep.name, ep.value, dist, gap)
        elif obj.name in _registry:
            _broken[ep.name] = BrokenPlugin(ep.name, ep.value, dist,
                                            f"its name {obj.name!r} is taken by another backend; rename it")
        else:
            _registry[obj.name] = obj


def register_backend(backend: Backend, *, replace: bool = False) -> None:
    """Register a backend object (see moe/contract.py for the contract)."""
    _ensure_loaded()
    gap = _contract_gap(backend)
    if gap is not None:
        raise TypeError(f"backend: {gap}")
    if backend.name in _registry and not replace:
        raise ValueError(f"backend {backend.name!r} is already registered; pass replace=True to override it")
    _registry[backend.name] = backend
    _decisions.clear()


def unregister_backend(name: str) -> None:
    _ensure_loaded()
    _registry.pop(name, None)
    _decisions.clear()


def list_backends() -> list[Backend]:
    """Registered backends, highest priority first."""
    _ensure_loaded()
    return sorted(_registry.values(), key=lambda b: (-_priority(b), b.name))


def broken_plugins() -> list[BrokenPlugin]:
    """Plugin entry points that yielded no usable backend, with their reasons."""
    _ensure_loaded()
    return list(_broken.values())


def get_backend(name: str) -> Backend:
    _ensure_loaded()
    if name not in _registry:
        hint = f" (a plugin by that name is broken: {_broken[name].reason})" if name in _broken else ""
        raise ValueError(f"backend: unknown backend {name!r}{hint}; registered: {', '.join(sorted(_registry))}, auto")
    return _registry[name]


def _priority(backend: Backend, target: DeviceTarget | None = None) -> int:
    """The backend's priority, for ``target`` when it has ``priority_for`` (lowest if either misbehaves)."""
    try:
        p = backend.priority_for(target) if target is not None and hasattr(backend, "priority_for") \
            else backend.priority
    except Exception:  # a property that raises: last
        return -(2**31)
    return p if isinstance(p, int) else -(2**31)


def _verdict(backend: Backend, method: str, *args: object) -> tuple[bool, str]:
    """Call ``is_available``/``supports``; anything but a (bool, str) is a reason not to run."""
    try:
        result = getattr(backend, method)(*args)
    except Exception as exc:
        return False, f"{method}() raised {type(exc).__name__}: {exc}"
    if (not isinstance(result, tuple) or len(result) != 2 or not isinstance(result[0], bool)
            or not isinstance(result[1], str)):
        return False, f"{method}() returned {result!r}; the contract is a tuple (ok: bool, reason: str)"
    return result


def judge(backend: Backend, problem: ExpertsProblem) -> Candidate:
    """Whether ``backend`` can run ``problem``, and why not."""
    ok, reason = _verdict(backend, "is_available")
    if ok:
        scheme = problem.quant.key()
        schemes = backend_schemes(backend)
        if scheme not in schemes and "*" not in schemes:
            ok, reason = False, f"runs the quantization schemes {', '.join(sorted(schemes))}, not {scheme}"
    if ok:
        ok, reason = _verdict(backend, "supports", problem)
    return Candidate(backend.name, ok, reason if reason else "ok")


def select_backend(problem: ExpertsProblem, backend: str = "auto") -> Decision:
    """Choose a backend for ``problem``; raise with the reason if a named backend cannot run it.

    Decisions are cached per problem shape and device target (the token count aside: ``supports()`` must
    not depend on it), so the hot path pays for one dictionary lookup; the cache is cleared when backends
    change and by ``moe.reset_caches()``."""
    key = (problem, backend, bucket_of(problem) if backend == "auto" else None)  # equality ignores num_tokens
    decision = _decisions.get(key)
    if decision is None:
        decision = _decide(problem, backend)
        _decisions[key] = decision
    _local.last = decision
    return decision


def clear_decisions() -> None:
    """Forget cached decisions (``moe.reset_caches()`` does this and more)."""
    _decisions.clear()


def _decide(problem: ExpertsProblem, backend: str) -> Decision:
    if backend != "auto":
        candidate = judge(get_backend(backend), problem)
        if not candidate.ok:
            raise BackendUnavailableError(f"backend {backend!r} cannot run this problem: {candidate.reason}")
        return Decision(backend, backend, (candidate,))
    _ensure_loaded()
    ranked = sorted(_registry.values(), key=lambda b: (-_priority(b, problem.target), b.name))
    candidates = tuple(judge(b, problem) for b in ranked)
    candidates, chosen, why = _measured(problem, candidates)
    if chosen is None:
        chosen = next((c.name for c in candidates if c.ok), None)
        why = why or "by priority"
    if chosen is None:
        reasons = "; ".join(f"{c.name}: {c.reason}" for c in candidates)
        raise BackendUnavailableError(f"no backend can run this problem ({reasons})")
    return Decision("auto", chosen, candidates, why)


def _measured(problem: ExpertsProblem, candidates: tuple[Candidate, ...],
              ) -> tuple[tuple[Candidate, ...], str | None, str]:
    """A selection table's choice for the call's bucket, when there is a table and that backend can run
    the call; backends that failed parity there are marked unable. (candidates, chosen or None, why)."""
    found = table_for(problem)
    if found is None:
        return candidates, None, ""
    table, path, bucket = found
    entry = table.buckets[bucket]
    card = table.device_name
    failed = set(entry.failed_parity)
    candidates = tuple(Candidate(c.name, False, f"failed its parity check on {card} near M={bucket} (file {path})")
                       if c.name in failed else c for c in candidates)
    if not any(c.name == entry.backend and c.ok for c in candidates):
        return candidates, None, f"by priority: {entry.backend}, measured fastest near M={bucket}, cannot run here"
    second = entry.runner_up()
    versus = f" {second[1]:.2f}x faster than {second[0]}" if second else " the only backend timed"
    return candidates, entry.backend, f"measured on {card}: {entry.backend}{versus} near M={bucket} (file {path})"


def last_decision() -> Decision | None:
    """The decision of the most recent ``fused_experts`` call on this thread."""
    return getattr(_local, "last", None)
