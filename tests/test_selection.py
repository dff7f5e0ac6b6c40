"""Measured backend selection: the table schema (a broken file names the file and the field), the lookup
``auto`` makes per token-count bucket, the parity rule, the decision trace, ``moe tune --backends`` with
stand-in backends and timer, and ``moe backends --m``."""

from __future__ import annotations

import json

import pytest
import torch

import moe
from moe.backends.torch_ref import torch_ref_experts
from moe.selection import BucketChoice, SelectionTable, file_name, load_table, write_table
from moe.tune_backends import tune_selection
from moe.workload import Preset

P = Preset("tiny", 4, 2, 32, 16, ())


class _Ref:
    """A CPU test backend: the reference (times ``factor``: 1 is right, anything else wrong)."""

    priority = -50

    def __init__(self, name: str, factor: float = 1.0, priority: int = -50) -> None:
        self.name, self.factor, self.priority, self.calls = name, factor, priority, 0

    def is_available(self):
        return True, "ok"

    def supports(self, problem):
        return (True, "ok") if problem.dtype == torch.float32 else (False, "float32 only")

    def apply(self, args, problem, out):
        self.calls += 1
        out.copy_(torch_ref_experts(args, problem) * self.factor)


@pytest.fixture
def backends():
    made = {"test_fast": _Ref("test_fast"), "test_slow": _Ref("test_slow", priority=500),
            "test_wrong": _Ref("test_wrong", 1.5, priority=600)}
    for b in made.values():
        moe.register_backend(b)
    yield made
    for name in made:
        moe.unregister_backend(name)


@pytest.fixture
def folder(tmp_path):
    with moe.override_options(tuned_configs_dir=tmp_path):
        yield tmp_path


def _table(**buckets) -> SelectionTable:
    return SelectionTable(num_experts=P.num_experts, intermediate_size=P.intermediate_size, hidden_size=P.hidden_size,
                          top_k=P.top_k, activation="silu", dtype="float32", device_name="cpu",
                          buckets={int(m.removeprefix("m")): c for m, c in buckets.items()})


def _decide(m: int) -> moe.registry.Decision:
    return moe.explain(P.problem("cpu", torch.float32, m))


# ---------------------------------------------------------------- schema


def _write(path, data) -> None:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)


GOOD = {"num_experts": 4, "intermediate_size": 16, "hidden_size": 32, "top_k": 2, "activation": "silu",
        "dtype": "float32", "device_name": "cpu",
        "buckets": {"4": {"backend": "a", "timings_us": {"a": 1.0, "b": 2.0}}}}


@pytest.mark.parametrize(("change", "needle"), [
    ({"buckets": {}}, "buckets"),
    ({"num_experts": 0}, "num_experts"),
    ({"buckets": {"4": {"backend": "b", "timings_us": {"a": 1.0, "b": 2.0}}}}, "not the fastest"),
    ({"buckets": {"4": {"backend": "a", "timings_us": {"a": -1.0}}}}, "positive"),
    ({"buckets": {"4": {"backend": "a", "timings_us": {"a": 1.0}, "failed_parity": ["a"]}}}, "failed_parity"),
    ({"extra": 1}, "extra"),
    ({"schema_version": 9}, "schema_version"),
])
def test_a_broken_table_names_the_file_and_the_field(tmp_path, change, needle):
    path = tmp_path / "t.json"
    _write(path, {**GOOD, **change})
    with pytest.raises(ValueError, match=needle) as exc:
        load_table(path)
    assert str(path) in str(exc.value)


def test_not_json_names_the_file(tmp_path):
    path = tmp_path / "t.json"
    _write(path, "{nope")
    with pytest.raises(ValueError, match="not valid JSON") as exc:
        load_table(path)
    assert str(path) in str(exc.value)


def test_a_written_table_reads_back(tmp_path):
    t = _table(m4=BucketChoice(backend="a", timings_us={"a": 1.0, "b": 1.5}))
    assert load_table(write_table(t, tmp_path)) == t
    assert t.bucket(1) == 4 and t.bucket(100000) == 4


# ---------------------------------------------------------------- auto by measurement


def test_without_a_table_priorities_decide(backends, folder):
    d = _decide(4)
    assert d.chosen == "test_wrong" and d.why == "by priority"


def test_auto_takes_the_measured_backend_per_bucket(backends, folder):
    t = _table(m4=BucketChoice(backend="test_fast", timings_us={"test_fast": 10.0, "test_slow": 13.1}),
               m4096=BucketChoice(backend="test_slow", timings_us={"test_fast": 30.0, "test_slow": 20.0}))
    path = write_table(t, folder / "selection")
    assert path.name == file_name(P.problem("cpu", torch.float32, 1), "cpu")
    moe.reset_caches()
    with moe.override_options(tuned_configs_dir=folder):
        small, large = _decide(3), _decide(5000)
        assert small.chosen == "test_fast" and large.chosen == "test_slow"
        assert small.why == f"measured on cpu: test_fast 1.31x faster than test_slow near M=4 (file {path})"
        assert "near M=4096" in large.why and "1.50x faster than test_fast" in large.why
        assert "measured on cpu" in str(small)
        assert _decide(4).chosen == "test_fast"  # the decision cache keys on the bucket, not the first call


def test_a_backend_that_failed_parity_is_never_chosen(backends, folder):
    t = _table(m4=BucketChoice(backend="test_fast", timings_us={"test_fast": 10.0}, failed_parity=("test_wrong",)))
    write_table(t, folder / "selection")
    moe.reset_caches()
    with moe.override_options(tuned_configs_dir=folder):
        d = _decide(4)
    assert d.chosen == "test_fast"
    wrong = {c.name: c for c in d.candidates}["test_wrong"]
    assert not wrong.ok and "failed its parity check on cpu near M=4" in wrong.reason
    assert "the only backend timed" in d.why


def test_a_measured_backend_that_cannot_run_falls_back_to_priorities(backends, folder):
    t = _table(m4=BucketChoice(backend="not_registered_here", timings_us={"not_registered_here": 1.0}))
    write_table(t, folder / "selection")
    moe.reset_caches()
    with moe.override_options(tuned_configs_dir=folder):
        d = _decide(4)
    assert d.chosen == "test_wrong" and "cannot run here" in d.why


def test_a_named_backend_ignores_the_table(backends, folder):
    write_table(_table(m4=BucketChoice(backend="test_fast", timings_us={"test_fast": 1.0})), folder / "selection")
    moe.reset_caches()
    with moe.override_options(tuned_configs_dir=folder):
        d = moe.explain(P.problem("cpu", torch.float32, 4), backend="test_slow")
    assert d.chosen == "test_slow"


# ---------------------------------------------------------------- the tuner


def test_tune_checks_parity_first_then_times(backends, tmp_path):
    seen = []

    def timer(name, m, call, device):
        seen.append((name, m))
        call()
        return {"test_fast": 1e-5, "test_slow": 2e-5}[name]

    path = tune_selection(P, (2, 64), torch.float32, tmp_path, device="cpu",
                          backends=("test_fast", "test_slow", "test_wrong"), timer=timer)
    t = load_table(path)
    assert set(t.buckets) == {2, 64}
    for choice in t.buckets.values():
        assert choice.backend == "test_fast" and choice.failed_parity == ("test_wrong",)
        assert choice.timings_us == pytest.approx({"test_fast": 10.0, "test_slow": 20.0})
    assert ("test_wrong", 2) not in seen  # a backend that fails parity is not timed
    assert t.device_name == "cpu" and t.dtype == "float32"


def test_a_resumed_tune_merges_its_buckets_and_logs_each(backends, tmp_path):
    """Written after every token count and merged with an earlier run's file: a run stopped part way keeps
    what it measured; a token count measured again replaces its bucket."""
    def timer(fast, slow):
        return lambda name, m, call, device: {"test_fast": fast, "test_slow": slow}[name]

    tune_selection(P, (2, 64), torch.float32, tmp_path, device="cpu", backends=("test_fast", "test_slow"),
                   timer=timer(1e-5, 2e-5))
    lines = []
    path = tune_selection(P, (64, 512), torch.float32, tmp_path, device="cpu",
                          backends=("test_fast", "test_slow"), timer=timer(3e-5, 2e-5), log=lines.append)
    t = load_table(path)
    assert sorted(t.buckets) == [2, 64, 512]
    assert t.buckets[2].backend == "test_fast"
    assert t.buckets[64].backend == t.buckets[512].backend == "test_slow"
    assert len(lines) == 2 and "M=64" in lines[0] and "test_slow 20.0 us" in lines[0]


def test_tune_refuses_when_every_backend_fails(backends, tmp_path):
    with pytest.raises(ValueError, match="every backend failed its parity check"):
        tune_selection(P, (2,), torch.float32, tmp_path, device="cpu", backends=("test_wrong",),
                       timer=lambda *a: 1.0)


def test_tune_refuses_what_it_cannot_key(tmp_path):
    with pytest.raises(ValueError, match="biases"):
        tune_selection(Preset("b", 4, 2, 32, 16, (), bias=True), (2,), torch.float32, tmp_path, device="cpu")
    with pytest.raises(ValueError, match="static"):
        tune_selection(P, (2,), torch.float32, tmp_path, device="cpu", quant=moe.quant.named("fp8_tensor_static"))


# ---------------------------------------------------------------- the CLI


def test_moe_backends_prints_the_measured_choice(backends, tmp_path, monkeypatch, capsys):
    t = _table(m4=BucketChoice(backend="test_fast", timings_us={"test_fast": 10.0, "test_slow": 13.1}))
    path = write_table(t, tmp_path / "selection")
    monkeypatch.setenv("MOE_TUNED_CONFIGS_DIR", str(tmp_path))
    moe.reset_caches()
    from moe.cli import main

    main(["backends", "--problem", "4,16,32,2", "--dtype", "fp32", "--m", "4"])
    out = capsys.readouterr().out
    assert f"M=4: requested='auto' -> chosen='test_fast' (measured on cpu: test_fast 1.31x faster than test_slow " \
           f"near M=4 (file {path}))" in out


def test_moe_tune_backends_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the command would run")
    from cases import refused

    err = refused(capsys, ["tune", "--preset", "default", "--backends", "all"])
    assert "CUDA" in err
