"""Runtime options: every MOE_* variable parsed one way, errors that name the variable, scopes, and
reset_caches(). Includes the two regressions of the seams issue: MOE_PDL=false left chained launches on,
MOE_VALIDATE=no turned validation on."""

from __future__ import annotations

import pytest
import torch

import moe
from moe.options import ENV_VARS, options, options_version

SPELLINGS = [("1", True), ("0", False), ("true", True), ("false", False), ("yes", True), ("no", False),
             ("on", True), ("off", False), ("TRUE", True), ("Off", False), (" yes ", True)]


@pytest.mark.parametrize(("raw", "value"), SPELLINGS)
@pytest.mark.parametrize("var", ["MOE_PDL", "MOE_VALIDATE", "MOE_DIRECT_LAUNCH", "MOE_GPU_ROUTING",
                                 "MOE_ROUTE_ALIGN", "MOE_TUNED_CONFIGS", "MOE_BATCH_INVARIANT",
                                 "MOE_DEEP_GEMM_UE8M0"])
def test_every_boolean_variable_takes_every_spelling(var, raw, value, monkeypatch):
    monkeypatch.setenv(var, raw)
    moe.reset_caches()
    field = {v: k for k, v in ENV_VARS.items()}[var]
    assert getattr(options(), field) is value


def test_regression_pdl_false_turns_chained_launches_off(monkeypatch):
    """MOE_PDL=false used to leave chaining on (only "0" was read as off)."""
    import moe.kernels.host as host

    monkeypatch.setattr(host, "current_target", lambda device: moe.TARGETS["h200"])
    cuda = torch.device("cuda", 0)
    moe.reset_caches()
    assert host.chains(cuda)
    monkeypatch.setenv("MOE_PDL", "false")
    moe.reset_caches()
    assert not host.chains(cuda)


def test_regression_validate_no_keeps_validation_off(monkeypatch):
    """MOE_VALIDATE=no used to turn validation on (anything but "", "0" and "false" was on)."""
    from moe.validation import value_checks_enabled

    meta = torch.empty(2, device="meta")  # stands in for a GPU tensor: value checks depend on the option
    monkeypatch.setenv("MOE_VALIDATE", "no")
    moe.reset_caches()
    assert not options().value_checks and not value_checks_enabled(meta)
    monkeypatch.setenv("MOE_VALIDATE", "yes")
    moe.reset_caches()
    assert value_checks_enabled(meta)
    assert value_checks_enabled(torch.empty(2))  # CPU tensors are always checked


@pytest.mark.parametrize(("var", "raw", "match"), [
    ("MOE_PDL", "maybe", r"MOE_PDL='maybe' is not a boolean; use one of 1, true, yes, on or 0, false, no, off"),
    ("MOE_VALIDATE", "2", r"MOE_VALIDATE='2' is not a boolean"),
    ("MOE_CHUNK_TOKENS", "lots", r"MOE_CHUNK_TOKENS='lots' is not an integer"),
    ("MOE_CHUNK_TOKENS", "0", r"MOE_CHUNK_TOKENS=0: Input should be greater than or equal to 1"),
    ("MOE_TUNED_CONFIGS_DIR", "/no/such/folder", r"MOE_TUNED_CONFIGS_DIR='/no/such/folder': .*is not a folder"),
])
def test_bad_values_name_the_variable(var, raw, match, monkeypatch):
    monkeypatch.setenv(var, raw)
    with pytest.raises(ValueError, match=match):
        moe.reset_caches()


def test_empty_variable_means_default(monkeypatch):
    monkeypatch.setenv("MOE_CHUNK_TOKENS", "")
    monkeypatch.setenv("MOE_PDL", "")
    moe.reset_caches()
    assert options().chunk_tokens == 32768 and options().pdl


def test_set_and_override_options():
    before, version = options(), options_version()
    with moe.override_options(chunk_tokens=8, batch_invariant=True) as scoped:
        assert options() is scoped and scoped.chunk_tokens == 8 and scoped.batch_invariant
        assert options_version() != version
    assert options() == before
    with pytest.raises(ValueError, match=r"unknown option.*chunk_token; known: .*chunk_tokens"):
        moe.set_options(chunk_token=8)
    with pytest.raises(ValueError, match="chunk_tokens"):
        moe.set_options(chunk_tokens=0)
    with pytest.raises(ValueError, match="tuned_configs_dir"):
        moe.set_options(tuned_configs_dir="/no/such/folder")
    moe.set_validation(True)
    assert options().value_checks
    with moe.validation(False):
        assert not options().value_checks
    assert options().value_checks


def test_reset_caches_forgets_decisions_and_rereads_the_environment(monkeypatch):
    from moe.registry import _decisions

    cfg = moe.MoEConfig(num_experts=4, top_k=2, hidden_size=16, intermediate_size=8)
    moe.explain(cfg, device="cpu", dtype=torch.float32)
    assert _decisions
    monkeypatch.setenv("MOE_CHUNK_TOKENS", "77")
    assert options().chunk_tokens == 32768  # read once
    moe.reset_caches()
    assert not _decisions and options().chunk_tokens == 77
