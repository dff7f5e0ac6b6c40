from __future__ import annotations

import os
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton kernels run under the interpreter; it must be chosen before they are compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--unverified", action="append", default=[], metavar="BACKEND",
                     help="lift BACKEND's HARDWARE_VERDICT for this run (moe.testing.lift_hardware_verdict): the "
                     "first GPU run of a backend or scheme still behind its off switch")


def pytest_configure(config):
    for name in config.getoption("--unverified"):
        from moe.testing import lift_hardware_verdict

        lift_hardware_verdict(name)


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test (transformers' models: faster than contending for 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed(request):
    # a fresh but reproducible stream per test
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture(autouse=True)
def _fresh_options():
    """Each test starts from the environment's options and ends by restoring them (a test that sets an
    MOE_* variable calls moe.reset_caches() to read it); set up before monkeypatch, so torn down after it."""
    import moe

    moe.reset_caches()
    yield
    moe.reset_caches()


# GPU tests by area (the file they live in) and by backend (their `backend` parameter), so the GPU suite
# runs in parts that each fit one 10-minute command: benchmarks/gpu_suite.sh TESTS=triton,routing,...
_AREAS = {"test_gpu.py": "kernels", "test_routing_kernels.py": "routing", "test_properties.py": "fuzz",
          "test_hf.py": "hf", "test_parallel_gpu.py": "parallel", "test_quant_gpu.py": "quant",
          "test_deep_gemm.py": "native", "test_native_backends.py": "native", "test_sonic.py": "native"}


def _mark_parts(items) -> None:
    for item in items:
        if "gpu" not in item.keywords:
            continue
        area = _AREAS.get(item.path.name)
        if area:
            item.add_marker(getattr(pytest.mark, area))
        backend = getattr(getattr(item, "callspec", None), "params", {}).get("backend")
        if backend in ("triton", "torch_grouped"):
            item.add_marker(getattr(pytest.mark, backend))


def pytest_collection_modifyitems(config, items):
    _mark_parts(items)
    if torch.cuda.is_available():
        return
    # gpu tests are deselected in CI with -m "not gpu"; run by hand without a GPU, they say why they skip
    skip = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a machine with a GPU, a skipped GPU test is a failure."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and "gpu" in item.keywords and torch.cuda.is_available():
        report.outcome = "failed"
        report.longrepr = f"GPU test skipped on a GPU machine: {report.longrepr}"
