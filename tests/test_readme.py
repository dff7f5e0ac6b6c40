"""The README is what a newcomer copies: its set-up and commands must be the real ones, its Python must
run as written on a CPU machine, and its links must stay inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TEST_COMMAND = 'python3 -m pytest -m "not gpu" -q -n 2'


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_python_examples_run_as_written_on_cpu():
    blocks = _blocks("python")
    assert blocks
    for i, block in enumerate(blocks):
        assert 'device="cuda"' not in block
        exec(compile(block, f"README.md python block {i}", "exec"), {"__name__": "readme"})


def test_first_block_is_the_setup_and_the_two_commands():
    first = re.search(r"```(\w*)\n(.*?)```", README, re.S)
    assert first is not None and first.group(1) == "bash"
    lines = [ln.split("#")[0].strip() for ln in first.group(2).splitlines()]
    expected = ["python3 -m venv", "pip install torch==2.13.0", 'pip install -e ".[test]"', "moe bench", TEST_COMMAND]
    found = [next(i for i, ln in enumerate(lines) if ln.startswith(e)) for e in expected]
    assert found == sorted(found), lines
    assert "moe bench" in lines  # the main command, with no arguments
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in README


def test_test_command_is_the_one_ci_runs():
    assert TEST_COMMAND in README
    ci = ROOT / ".ci" / "run"
    if ci.exists():
        assert TEST_COMMAND in ci.read_text()


def test_no_link_points_outside_the_repository():
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    assert links
    for target in links:
        path = target.split("#")[0]
        assert "://" not in target and not path.startswith(("/", "../")), target
        if path:
            resolved = (ROOT / path).resolve()
            assert resolved.is_relative_to(ROOT) and resolved.exists(), target
    assert "](../" not in README and "docs/performance.md" in README and "moe backends --target h200" in README
