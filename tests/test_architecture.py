"""The import graph of the package against the layer table of docs/architecture.md: no cycle, and no
module imports from a higher layer. Every import statement counts, those inside functions too, and an
import of ``a.b.c`` also runs the ``__init__`` of ``a.b`` (an edge to it), except for the importer's own
packages and the root ``moe``, which every submodule import passes through."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "moe"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The package modules one import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == "moe" or a.name.startswith("moe.")]
    base = node.module or ""
    if node.level:
        pkg = importer if _is_package(importer) else importer.rsplit(".", 1)[0]
        for _ in range(node.level - 1):
            pkg = pkg.rsplit(".", 1)[0]
        base = f"{pkg}.{base}" if base else pkg
    if not (base == "moe" or base.startswith("moe.")):
        return []
    found = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        found.append(sub if sub in MODULES else base)  # `from pkg import module` or `from module import name`
    return found


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        own = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 2)}
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in _resolve(mod, node):
                if target not in MODULES:
                    raise AssertionError(f"{mod} imports {target}, which is not a module of the package")
                parts = target.split(".")
                for i in range(2, len(parts) + 1):  # the packages an import runs, past the root
                    name = ".".join(parts[:i])
                    if name not in own or name == target:
                        graph[mod].add(name)
            graph[mod].discard(mod)
    return graph


def _layers() -> dict[str, int]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    layers = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if m:
            for name in re.findall(r"`([\w.]+)`", m.group(2)):
                layers[name] = int(m.group(1))
    assert layers, "docs/architecture.md has no layer table"
    return layers


LAYERS = _layers()


def _layer(mod: str) -> int:
    if mod == "moe":
        return LAYERS["moe"]
    best = max((n for n in LAYERS if n != "moe" and (mod == n or mod.startswith(n + "."))), key=len, default=None)
    if best is None:
        raise AssertionError(f"{mod} has no row in the layer table of docs/architecture.md")
    return LAYERS[best]


def test_every_module_has_a_layer():
    for mod in MODULES:
        _layer(mod)


def test_no_upward_import():
    bad = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
           for a, targets in _edges().items() for b in targets if _layer(b) > _layer(a)]
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for mod in sorted(graph):
        if mod not in state:
            cycle = visit(mod)
            if cycle:
                return cycle
    return None


def test_no_cycle():
    cycle = _find_cycle(_edges())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _reads(source: str, importer: str) -> set[str]:
    own = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 2)}
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            for target in _resolve(importer, node):
                parts = target.split(".")
                found |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)
                          if ".".join(parts[:i]) not in own or ".".join(parts[:i]) == target}
    return found


@pytest.mark.parametrize(("source", "importer", "expect"), [
    ("from .routing import route", "moe.layer", {"moe.routing"}),
    ("from ..kernels.align import align", "moe.backends.torch_grouped", {"moe.kernels", "moe.kernels.align"}),
    ("def f():\n    from . import triton\n", "moe.routing", {"moe.routing.triton"}),
    ("from moe.quant.schemes import NAMES", "moe.config", {"moe.quant", "moe.quant.schemes"}),
])
def test_the_graph_reader_sees_each_kind_of_import(source, importer, expect):
    """The reader catches relative, absolute and in-function imports and the package inits they run (a
    reader that missed them would pass everything)."""
    assert _reads(source, importer) == expect


def test_the_checks_can_fail():
    """An upward import and a cycle are reported."""
    graph = {k: set(v) for k, v in _edges().items()}
    graph["moe.config"].add("moe.layer")
    assert any(_layer(b) > _layer(a) for a, targets in graph.items() for b in targets)
    assert _find_cycle({"moe.a": {"moe.b"}, "moe.b": {"moe.c"}, "moe.c": {"moe.a"}}) == ["moe.a", "moe.b", "moe.c",
                                                                                          "moe.a"]
