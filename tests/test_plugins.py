"""Backend plugins, installed for real: a distribution (a module and its ``*.dist-info`` with
``entry_points.txt``) written into a temporary folder, used by a fresh interpreter with that folder on
PYTHONPATH. No monkeypatching of entry-point discovery, nothing installed into this environment.

The distribution declares six entry points: a backend object, a factory, one that fails to import, one
whose name clashes with a built-in, one whose ``is_available`` raises and one that returns a bare bool.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = '''
import torch

from moe.backends.torch_ref import torch_ref_experts


class Loop:
    """The reference, under its own name and above every built-in on CPU."""

    name = "toy_loop"
    priority = 1000
    calls = 0

    def is_available(self):
        return True, "ok"

    def supports(self, problem):
        if problem.dtype != torch.float32:
            return False, "toy: float32 only"
        return True, "ok"

    def apply(self, args, problem, out):
        type(self).calls += 1
        out.copy_(torch_ref_experts(args, problem))


class Factory(Loop):
    name = "toy_factory"
    priority = -1000


def make_factory():
    return Factory()


class Clash(Loop):
    name = "torch"


class Raising(Loop):
    name = "toy_raising"
    priority = 2000

    def is_available(self):
        raise RuntimeError("cannot find its library")


class BareBool(Loop):
    name = "toy_bare_bool"
    priority = 3000

    def is_available(self):
        return True


BACKEND = Loop()
CLASH = Clash()
RAISING = Raising()
BARE = BareBool()
'''

ENTRY_POINTS = '''[moe.backends]
toy_loop = toy_moe_plugin:BACKEND
toy_factory = toy_moe_plugin:make_factory
toy_broken = toy_moe_plugin_missing:BACKEND
toy_clash = toy_moe_plugin:CLASH
toy_raising = toy_moe_plugin:RAISING
toy_bare_bool = toy_moe_plugin:BARE
'''

PROBE = '''
import json, sys
import torch
import moe
imported_on_import = "toy_moe_plugin" in sys.modules
names = [b.name for b in moe.list_backends()]
broken = {b.name: b.reason for b in moe.broken_plugins()}
x = torch.randn(5, 16)
w13, w2 = torch.randn(4, 16, 16) / 4, torch.randn(4, 16, 8) / 3
w, ids = moe.fused_topk(torch.randn(5, 4), 2)
ref = moe.fused_experts(x, w13, w2, w, ids, backend="torch")
by_name = moe.fused_experts(x, w13, w2, w, ids, backend="toy_factory")
auto = moe.fused_experts(x, w13, w2, w, ids)
decision = moe.last_decision()
reasons = {c.name: c.reason for c in decision.candidates}
bf16 = moe.fused_experts(x.bfloat16(), w13.bfloat16(), w2.bfloat16(), w, ids)
print(json.dumps({
    "imported_on_import": imported_on_import, "names": names, "broken": broken,
    "by_name_ok": bool(torch.allclose(by_name, ref)), "auto": decision.chosen, "auto_ok": bool(torch.allclose(auto, ref)),
    "reasons": reasons, "bf16_auto": moe.last_decision().chosen,
}))
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    (site / "toy_moe_plugin.py").write_text(PLUGIN)
    info = site / "toy_moe_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-moe-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    (info / "RECORD").write_text("")
    return site


def _run(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]), TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300, cwd=site)


def test_plugins_are_found_selected_and_contained(plugin_path):
    proc = _run(plugin_path, "-c", PROBE)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not got["imported_on_import"]  # import moe never imports a plugin
    assert {"toy_loop", "toy_factory", "toy_raising", "toy_bare_bool"} <= set(got["names"])
    assert "toy_broken" in got["broken"] and "No module named 'toy_moe_plugin_missing'" in got["broken"]["toy_broken"]
    assert "name 'torch' is taken" in got["broken"]["toy_clash"]
    assert got["by_name_ok"]  # selected by name (a factory entry point)
    assert got["auto"] == "toy_loop" and got["auto_ok"]  # and by auto: the highest priority that can run
    assert "is_available() raised RuntimeError: cannot find its library" in got["reasons"]["toy_raising"]
    assert "is_available() returned True; the contract is a tuple" in got["reasons"]["toy_bare_bool"]
    assert got["bf16_auto"] == "torch"  # the plugin said why not (float32 only); auto moved on


def test_moe_backends_lists_broken_plugins(plugin_path):
    proc = _run(plugin_path, "-m", "moe", "backends")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for name in ("toy_loop", "toy_factory", "toy_broken", "toy_clash", "toy_raising"):
        assert name in out, out
    assert "No module named 'toy_moe_plugin_missing'" in out and "is taken" in out
    assert "cannot find its library" in out


def test_a_named_broken_plugin_says_why(plugin_path):
    code = textwrap.dedent('''
        import moe
        try:
            moe.get_backend("toy_broken")
        except ValueError as e:
            print(e)
    ''')
    proc = _run(plugin_path, "-c", code)
    assert "a plugin by that name is broken: failed to load: ModuleNotFoundError" in proc.stdout, proc.stderr
