from __future__ import annotations

import json
import subprocess
import sys

import moe
from moe.cli import main


def test_backends_lists_every_registered_backend(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["backend", "priority", "usable"]
    for b in moe.list_backends():
        ok, reason = b.is_available()
        line = next(ln for ln in out.splitlines() if ln.startswith(b.name + " "))
        assert ("yes" if ok else "no") in line.split() and reason.split()[0] in line


def test_bench_default_runs_and_checks_every_backend(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert main(["bench", "--m", "1,5", "--json", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "ceilings (measured now)" in out and "% floor" in out
    data = json.loads(path.read_text())
    assert data["ceilings"]["copy_gbps"] > 0 and data["ceilings"]["matmul_tflops"] > 0
    rows = data["rows"]
    assert {r["m"] for r in rows} == {1, 5}
    timed = [r for r in rows if r["time_us"] is not None]
    assert {r["mode"] for r in timed} >= {"eager", "layer"}
    for r in timed:
        assert r["rel_err"] <= 1e-5, r  # fp32 on CPU
        assert r["pct_floor"] > 0 and r["floor_us"] > 0
    usable = [b.name for b in moe.list_backends() if b.is_available()[0]]
    assert {r["backend"] for r in timed if r["mode"] == "eager"} == set(usable)


def test_bench_rejects_bad_m(capsys):
    import pytest

    with pytest.raises(SystemExit, match="--m: expected comma-separated token counts"):
        main(["bench", "--m", "1,x"])


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "moe", "--version"], capture_output=True, text=True, check=True)
    assert res.stdout.startswith("moe ")


def test_hf_check_subcommand(capsys):
    assert main(["hf-check", "olmoe", "--backend", "torch", "--repeat", "1", "--seq", "4"]) == 0
    out = capsys.readouterr().out
    assert "replaced 2 blocks" in out and "backend: requested 'torch', ran 'torch'" in out


def test_other_commands_do_not_import_transformers():
    code = "import sys; from moe.cli import main; main(['backends']); print('transformers' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip().splitlines()[-1] == "False"
