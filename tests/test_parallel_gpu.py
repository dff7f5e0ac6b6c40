"""The 2-rank parity checks over NCCL on 2 GPUs (the 4-rank cases stay on gloo, in test_parallel.py).

These are ``gpu`` tests only where 2 GPUs exist: the one-GPU suite also runs ``pytest -m gpu`` and
counts a skipped gpu test as a failure, so there they are not selected; elsewhere they skip, saying why.
"""

from __future__ import annotations

import pytest
import torch
from test_parallel import spawn_suite

import moe

_GPUS = torch.cuda.device_count()
pytestmark = (
    pytest.mark.gpu if _GPUS >= 2
    else pytest.mark.skip(reason=f"the NCCL parity checks need 2 CUDA devices, found {_GPUS}")
)


# only the backends that can run here: a skipped gpu test counts as a failure on a GPU machine
@pytest.mark.parametrize("backend", [*(b.name for b in moe.list_backends() if b.is_available()[0]), "auto"])
def test_two_gpus_nccl_match_single_rank(backend, tmp_path):
    spawn_suite(2, "gpu2", backend, "nccl", tmp_path)
