"""The direct launch path's bookkeeping on CPU, with stand-ins for a Triton kernel and its compiled
kernel: one compile per specialization key, the full argument list in the kernel's order, a 3-D grid,
keys that split where Triton's specialization does, and Triton's launcher on unverified releases."""

from __future__ import annotations

import pytest
import torch

import moe
import moe.kernels.launch as ln


class FakeCompiled:
    def __init__(self, log):
        self.log = log
        self.metadata = type("M", (), {"shared": 1024})()

    def __getitem__(self, grid):
        def run(*args):
            self.log.append(("direct", grid, args))
        return run


class FakeKernel:
    arg_names = ("x_ptr", "n", "alpha", "BLOCK", "FLAG")

    def __init__(self):
        self.log, self.compiles = [], 0

    def warmup(self, *args, grid, **kwargs):
        self.compiles += 1
        return FakeCompiled(self.log)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append(("triton", grid, args, kwargs))


@pytest.fixture
def cuda_like(monkeypatch):
    monkeypatch.setattr(ln, "_smem_limit", lambda index: 232448)
    monkeypatch.setattr(ln, "_compiled", {})
    monkeypatch.setattr(ln, "VERIFIED_TRITON", (ln._triton_version(),))  # this triton counts as verified
    ln._enabled.clear()
    with moe.override_options(direct_launch=True):
        yield torch.device("cuda", 0)
    ln._enabled.clear()


def test_direct_launch_keeps_one_compiled_kernel_per_key(cuda_like):
    k = FakeKernel()
    x = torch.zeros(64)
    for n in (32, 48, 64):  # all multiples of 16: one key
        ln.launch(k, (5,), cuda_like, x, n, 0.5, BLOCK=16, FLAG=True, num_warps=4)
    assert k.compiles == 1
    assert [e[0] for e in k.log] == ["direct"] * 3
    assert k.log[0][1] == (5, 1, 1)  # padded to three dimensions
    assert k.log[2][2] == (x, 64, 0.5, 16, True)  # runtime args, then constexprs in the kernel's order
    ln.launch(k, (5,), cuda_like, x, 33, 0.5, BLOCK=16, FLAG=True, num_warps=4)  # not a multiple of 16
    ln.launch(k, (5,), cuda_like, x, 1, 0.5, BLOCK=16, FLAG=True, num_warps=4)  # Triton specializes 1
    ln.launch(k, (5,), cuda_like, x[1:], 32, 0.5, BLOCK=16, FLAG=True, num_warps=4)  # unaligned pointer
    ln.launch(k, (5,), cuda_like, x.double(), 32, 0.5, BLOCK=16, FLAG=True, num_warps=4)  # another dtype
    ln.launch(k, (5,), cuda_like, x, 32, 0.5, BLOCK=32, FLAG=True, num_warps=4)  # another constexpr
    ln.launch(k, (5,), cuda_like, x, 32, 0.5, BLOCK=16, FLAG=True, num_warps=8)  # another option
    ln.launch(k, (5,), cuda_like, x, 2**40, 0.5, BLOCK=16, FLAG=True, num_warps=4)  # 64-bit integer
    assert k.compiles == 8


def test_direct_launch_off_and_on_cpu(cuda_like):
    k = FakeKernel()
    x = torch.zeros(8)
    ln.launch(k, (2, 3), torch.device("cpu"), x, 8, 1.0, BLOCK=16, FLAG=False)
    assert k.compiles == 0  # the interpreter path keeps nothing
    with moe.override_options(direct_launch=False):
        ln.launch(k, (2, 3), cuda_like, x, 8, 1.0, BLOCK=16, FLAG=False)
    assert [e[0] for e in k.log] == ["triton", "triton"]
    assert k.compiles == 1  # switched off, the first launch still has its shared memory checked
    assert k.log[0][2:] == ((x, 8, 1.0), {"BLOCK": 16, "FLAG": False})


def test_unverified_triton_uses_its_own_launcher(cuda_like, monkeypatch):
    """Direct launches depend on Triton internals: a release not on the verified list launches through
    Triton, and the status says why."""
    monkeypatch.setattr(ln, "VERIFIED_TRITON", ("0.0.1",))
    ln._enabled.clear()
    ok, why = ln.direct_launch_status()
    assert not ok and f"triton {ln._triton_version()} is not a verified release (0.0.1)" in why
    k = FakeKernel()
    ln.launch(k, (1,), cuda_like, torch.zeros(4), 4, 1.0, BLOCK=16, FLAG=False)
    assert [e[0] for e in k.log] == ["triton"] and k.compiles == 1  # still compiled and checked first


@pytest.mark.parametrize("direct", [True, False])
def test_oversized_compiled_kernel_is_refused(cuda_like, monkeypatch, direct):
    monkeypatch.setattr(ln, "_smem_limit", lambda index: 512)
    with moe.override_options(direct_launch=direct), \
            pytest.raises(ValueError, match="needs 1024 bytes of shared memory, the device allows 512"):
        ln.launch(FakeKernel(), (1,), cuda_like, torch.zeros(4), 4, 1.0, BLOCK=16, FLAG=False)
