"""Tuned configs as data: schema validation, lookup, the user folder, shipping inside the wheel."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import zipfile

import pytest
import torch

import moe
from moe.backends.triton import tuned
from moe.backends.triton.config import GemmTile, KernelConfig
from moe.contract import ExpertsProblem

SMALL = KernelConfig(block_m=16, gemm1=GemmTile(block_n=64), gemm2=GemmTile(block_n=64))
BIG = KernelConfig(block_m=128, gemm1=GemmTile(block_n=128, num_warps=8), gemm2=GemmTile(block_n=128, num_warps=8))


def _file(**over):
    data = dict(num_experts=8, intermediate_size=64, hidden_size=32, top_k=2, device_name="Test GPU",
                dtype="bfloat16", configs={"1": SMALL.model_dump(), "16": SMALL.model_dump(),
                                           "1024": BIG.model_dump(), "4096": BIG.model_dump()})
    data.update(over)
    return data


def test_lookup_nearest_on_log_scale_within_reach(tmp_path):
    path = tmp_path / tuned.file_name(8, 64, "Test GPU", torch.bfloat16)
    path.write_text(json.dumps(_file(configs={"1": SMALL.model_dump(), "16": SMALL.model_dump(),
                                              "64": BIG.model_dump(), "4096": BIG.model_dump()})))
    f = tuned.load_tuned_file(path)
    assert tuned.lookup(f, 1) == SMALL and tuned.lookup(f, 2) == SMALL and tuned.lookup(f, 31) == SMALL
    assert tuned.lookup(f, 33) == BIG and tuned.lookup(f, 128) == BIG and tuned.lookup(f, 8192) == BIG
    # no tuned count within 2x: the heuristic decides (4, 256 and 2048 are 4x or more from the nearest)
    assert tuned.lookup(f, 4) is None and tuned.lookup(f, 256) is None and tuned.lookup(f, 1500) is None
    assert tuned.lookup(f, 100_000) is None
    assert path.name == "E=8,N=64,device_name=Test_GPU,dtype=bfloat16.json"


@pytest.mark.parametrize("over,match", [
    ({"configs": {}}, r"TunedFile.configs: configs must map token counts"),
    ({"configs": {"16": {"block_m": 48}}}, r"TunedFile.configs\.16: KernelConfig.block_m: Input should be 16, 32, 64, 128 or 256 \(got 48\)"),
    ({"top_k": 0}, r"top_k: Input should be greater than or equal to 1"),
    ({"colour": "red"}, r"colour: Extra inputs are not permitted"),
])
def test_broken_files_name_file_and_field(tmp_path, over, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_file(**over)))
    with pytest.raises(ValueError, match=rf"tuned config .*bad\.json: .*{match}"):
        tuned.load_tuned_file(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        tuned.load_tuned_file(path)


def test_user_folder_is_searched_first(tmp_path, monkeypatch):
    name = tuned.file_name(8, 64, "Test GPU", torch.bfloat16)
    (tmp_path / name).write_text(json.dumps(_file()))
    monkeypatch.setenv("MOE_TUNED_CONFIGS_DIR", str(tmp_path))
    moe.reset_caches()
    dirs = tuple(tuned.search_dirs())
    assert dirs[0] == tmp_path and dirs[1] == tuned.user_dir() and dirs[-1].name == "triton"
    assert tuned._find(name, dirs).configs[4096] == BIG


def test_no_tuned_file_on_cpu_or_when_switched_off(monkeypatch):
    p = ExpertsProblem("cuda", torch.bfloat16, 64, 8, 8, 32, 64, 2)
    assert tuned.tuned_config(p, torch.device("cpu")) is None
    monkeypatch.setenv("MOE_TUNED_CONFIGS", "0")
    moe.reset_caches()
    assert tuned.tuned_config(p, torch.device("cuda")) is None


def test_shipped_files_are_valid():
    from pathlib import Path

    import moe.configs

    for path in (Path(moe.configs.__file__).parent / "triton").glob("*.json"):
        f = tuned.load_tuned_file(path)
        assert path.name == tuned.file_name(f.num_experts, f.intermediate_size, f.device_name, f.dtype, f.quant)


def test_wheel_ships_tuned_files(tmp_path):
    """Build the wheel, install it into a fresh folder, and load a tuned file from the installed package."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    probe = root / "configs" / "triton" / tuned.file_name(8, 64, "Wheel Probe", torch.bfloat16)
    shipped = sorted((root / "configs" / "triton").glob("*.json"))
    made = not shipped
    if made:  # nothing shipped yet: a probe file stands in for one while the wheel is built
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(json.dumps(_file(device_name="Wheel Probe")))
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(root)], check=True, capture_output=True)
    finally:
        if made:
            probe.unlink()
    wheel = next((tmp_path / "dist").glob("*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.startswith("moe/configs/triton/") and n.endswith(".json")]
        packages = {n.rsplit("/", 1)[0] for n in z.namelist() if n.endswith("/__init__.py")}
    assert names
    source = {str(p.parent.relative_to(root)) for p in (root / "moe").rglob("__init__.py")}
    assert source <= packages, f"packages missing from the wheel (pyproject's list): {sorted(source - packages)}"
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    code = ("import sys, pathlib; sys.path.insert(0, sys.argv[1]); import moe.configs, moe.backends.triton.tuned as t;"
            "d = pathlib.Path(moe.configs.__file__).parent; assert str(d).startswith(sys.argv[1]), d;"
            "f = t.load_tuned_file(next((d / 'triton').glob('*.json'))); print('ok', f.num_experts)")
    res = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok")


def test_source_tree_fallback(monkeypatch):
    """Run from a source tree (PYTHONPATH, no install), the shipped folder is the repo's configs/triton."""
    import importlib.resources

    def missing(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(importlib.resources, "files", missing)
    from pathlib import Path

    assert tuned._shipped_dir() == Path(tuned.__file__).resolve().parents[3] / "configs" / "triton"


def test_missing_file_warns_once_with_the_tune_command(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setenv("MOE_TUNED_CONFIGS_DIR", str(tmp_path))
    moe.reset_caches()
    monkeypatch.setattr(tuned, "_warned", set())
    p = ExpertsProblem("cuda", torch.bfloat16, 32, 7, 7, 96, 80, 3)
    with pytest.warns(UserWarning, match=r"no tuned Triton config E=7,N=80,device_name=Fake_GPU,dtype=bfloat16\.json; "
                                         r"using the default heuristic\. Tune with: moe tune --E 7 --N 80 --K 96 "
                                         r"--top-k 3 --dtype bf16$"):
        assert tuned.tuned_config(p, torch.device("cuda")) is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuned.tuned_config(p, torch.device("cuda")) is None  # once per shape
    name = tuned.file_name(7, 80, "Fake GPU", torch.bfloat16)
    (tmp_path / name).write_text(json.dumps(_file(num_experts=7, intermediate_size=80, device_name="Fake GPU")))
    tuned._find.cache_clear()
    assert tuned.tuned_config(p, torch.device("cuda")) == SMALL  # 32 tokens: within 2x of 16
    big = dataclasses.replace(p, num_tokens=2000)
    assert tuned.tuned_config(big, torch.device("cuda")) == BIG


def test_tune_resumes_and_force_retunes_only_the_given_counts(tmp_path, monkeypatch):
    """``moe tune`` writes after every token count, skips counts the file holds, and --force retunes the
    given counts while keeping the others (the sweep itself needs a GPU: a fake stands in)."""
    from moe.backends.triton import tuning
    from moe.workload import PRESETS

    swept: list[list[int]] = []

    def fake_sweep(p, ms, limit=None, dtype=None, on_result=None, quant=None):
        swept.append(list(ms))
        for m in ms:
            on_result({"m": m, "best_us": float(len(swept))}, SMALL if m < 100 else BIG)

    monkeypatch.setattr(tuning, "sweep", fake_sweep)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    p = PRESETS["default"]
    path = tuning.tune(p, [1, 16], torch.bfloat16, tmp_path)
    tuning.tune(p, [16, 256], torch.bfloat16, tmp_path)  # resumes: 16 is already there
    tuning.tune(p, [16], torch.bfloat16, tmp_path, force=True)
    assert swept == [[1, 16], [256], [16]]
    f = tuned.load_tuned_file(path)
    assert sorted(f.configs) == [1, 16, 256] and f.configs[256] == BIG
    assert f.timings_us == {1: 1.0, 16: 3.0, 256: 2.0}


def test_chosen_config_is_remembered_until_cleared(tmp_path, monkeypatch):
    """The Triton backend remembers its config per shape and token count (host time at small batches);
    moe.reset_caches() makes it read changed tuned files."""
    from moe.backends.triton import choose_config

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setenv("MOE_TUNED_CONFIGS_DIR", str(tmp_path))
    moe.reset_caches()
    name = tuned.file_name(7, 80, "Fake GPU", torch.bfloat16)
    (tmp_path / name).write_text(json.dumps(_file(num_experts=7, intermediate_size=80, device_name="Fake GPU")))
    p = ExpertsProblem("cuda", torch.bfloat16, 32, 7, 7, 96, 80, 3)
    dev = torch.device("cuda")
    assert choose_config(p, dev) == SMALL
    (tmp_path / name).write_text(json.dumps(_file(num_experts=7, intermediate_size=80, device_name="Fake GPU",
                                                  configs={"32": BIG.model_dump()})))
    tuned._find.cache_clear()  # the file is read again, but the chosen config per token count is remembered
    assert choose_config(p, dev) == SMALL  # remembered
    assert choose_config(dataclasses.replace(p, num_tokens=40), dev) == BIG  # new token count
    moe.reset_caches()
    assert choose_config(p, dev) == BIG


def test_quantized_tune_writes_its_own_file_and_hint(tmp_path, monkeypatch):
    """A quantized tune writes the file keyed by the scheme name (never the unquantized one), and the
    missing-file warning of a quantized problem names ``--quant``."""
    from moe.backends.triton import tuning
    from moe.workload import PRESETS

    seen: list = []

    def fake_sweep(p, ms, limit=None, dtype=None, on_result=None, quant=None):
        seen.append(quant)
        for m in ms:
            on_result({"m": m, "best_us": 1.0}, SMALL)

    monkeypatch.setattr(tuning, "sweep", fake_sweep)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    path = tuning.tune(PRESETS["default"], [1], torch.bfloat16, tmp_path, quant="fp8_block")
    assert seen == ["fp8_block"] and path.name.endswith(",quant=fp8_block.json")
    assert tuned.load_tuned_file(path).quant == "fp8_block"
    (tmp_path / "none").mkdir()
    monkeypatch.setenv("MOE_TUNED_CONFIGS_DIR", str(tmp_path / "none"))
    moe.reset_caches()
    monkeypatch.setattr(tuned, "_warned", set())
    p = dataclasses.replace(ExpertsProblem("cuda", torch.bfloat16, 32, 7, 7, 96, 80, 3),
                            quant=moe.quant.named("fp8_channel"))
    with pytest.warns(UserWarning, match=r"dtype=bfloat16,quant=fp8_channel\.json; .* --quant fp8_channel$"):
        assert tuned.tuned_config(p, torch.device("cuda")) is None


def test_tuner_never_proposes_k_tiles_that_straddle_a_scale_block():
    """fp8_block's scales cover 128 columns: every candidate's block_k divides 128 (a 256-wide K tile
    would apply one block's scale to two blocks)."""
    from moe.backends.triton import tuning

    for rpe in (1.0, 64.0, 1024.0):
        cands = tuning.candidates(rpe, 1, True, k_block=128)
        assert cands and all(128 % c.gemm1.block_k == 0 and 128 % c.gemm2.block_k == 0 for c in cands)
        if rpe <= 16:  # the decode space has 256-wide K tiles: the filter removes them
            assert len(cands) < len(tuning.candidates(rpe, 1, True))
        best = cands[0]
        for gemm in ("gemm1", "gemm2"):
            assert all(128 % getattr(c, gemm).block_k == 0 for c in tuning.refinements(best, rpe, 1, True, gemm, 128))


def test_tuner_tries_the_other_4bit_decode_choices():
    """The 4-bit decode stage: the winner's three other (order, scale multiply) pairs, nothing else changed."""
    from moe.backends.triton import tuning
    from moe.backends.triton.config import KernelConfig

    best = KernelConfig(decode_order="masks", dequant_math="pairs", split_k=2)
    variants = tuning.decode_variants(best)
    assert {(c.decode_order, c.dequant_math) for c in variants} == {("bytes", "scalar"), ("bytes", "pairs"),
                                                                    ("masks", "scalar")}
    assert all(c.model_copy(update={"decode_order": "masks", "dequant_math": "pairs"}) == best for c in variants)
