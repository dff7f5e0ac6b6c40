"""docs/extending.md runs as written: its Python blocks execute in order in one namespace (the example
backend, the parity helper, a bench row, one-time weight preparation), and its plugin metadata parses."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

import moe

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_python_blocks_run_in_order(capsys):
    blocks = _blocks("python")
    assert len(blocks) >= 5
    namespace: dict = {}
    try:
        for i, code in enumerate(blocks):
            exec(compile(code, f"{DOC.name} block {i + 1}", "exec"), namespace)
    finally:
        for name in ("dense_torch", "dense_torch_t"):
            moe.unregister_backend(name)
    assert "dense_torch" in capsys.readouterr().out  # the decision trace and the report were printed


def test_plugin_metadata_parses():
    (toml,) = _blocks("toml")
    meta = tomllib.loads(toml)
    assert meta["project"]["entry-points"]["moe.backends"] == {"dense_torch": "moe_dense_torch:DenseTorchBackend"}
