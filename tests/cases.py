"""Random MoE problems for tests: moe.testing's cases and inputs, with the dtype given per call."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moe
from moe.testing import ParityCase as Case
from moe.testing import experts_float64

__all__ = ["Case", "make_inputs", "oracle", "refused", "run"]


def make_inputs(case: Case, dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict:
    return moe.testing.make_inputs(dataclasses.replace(case, dtype=dtype), device)


def oracle(inputs: dict) -> torch.Tensor:
    return experts_float64(
        inputs["hidden_states"], inputs["w13"], inputs["w2"], inputs["topk_weights"], inputs["topk_ids"],
        inputs["activation"], inputs["w13_bias"], inputs["w2_bias"], expert_map=inputs["expert_map"],
    )


def run(inputs: dict, backend: str, **kw) -> torch.Tensor:
    args = dict(inputs)
    x, w13, w2, w, ids = (args.pop(n) for n in ("hidden_states", "w13", "w2", "topk_weights", "topk_ids"))
    return moe.fused_experts(x, w13, w2, w, ids, backend=backend, **args, **kw)


def refused(capsys, argv: list[str]) -> str:
    """Run ``moe ARGV``; it must exit 2 with one line on stderr and print no table; returns that line."""
    from moe.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2, exc.value
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("moe: error: "), err
    assert "Traceback" not in err and "ceilings (measured now)" not in captured.out
    return err
