"""Test rig: without CUDA the Triton kernels run in Triton's interpreter on CPU.

TRITON_INTERPRET must be set before triton is imported, so this happens at collection time,
before any test module imports fastppo.
"""

import atexit
import os
import shutil
import tempfile

# torch.compile's on-disk caches outlive code changes: a cache written by another checkout of this repo handed a
# compiled graph a custom op's old output shape (linear_logprobs' saved statistics, [N] before they became
# [N, 2]). Every test session compiles into its own folder, removed at exit.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastppo-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], True)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Absolute slack on top of the dtype's own rounding error (see assert_close_by_dtype).
ATOL = {torch.float64: 1e-10, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}


def assert_close_by_dtype(actual, expected, dtype, atol=None, scale=1.0):
    """The error of `actual` against an fp64 `expected` may be at most twice the error of simply
    rounding `expected` to `dtype` (what the best same-dtype computation would achieve), plus a small
    absolute slack (scaled by the magnitude of the values)."""
    expected = expected.double()
    actual = actual.double()
    atol = ATOL[dtype] * scale if atol is None else atol
    rounding = (expected.to(dtype).double() - expected).abs()
    err = (actual - expected).abs()
    bad = err > 2 * rounding + atol
    if bool(bad.any()):
        i = bad.nonzero()[0].tolist()
        raise AssertionError(f"{int(bad.sum())} of {bad.numel()} elements off; first at {i}: actual "
                             f"{actual[tuple(i)].item()} expected {expected[tuple(i)].item()} "
                             f"(max err {err.max().item():.3g})")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)



# The suite runs on pytest-xdist workers when it is installed (the test extra) and the run covers more than one test
# file: one worker per core, at most 4 (each imports torch and the three hosts), one test file per worker at a time
# (--dist loadfile: a module's fixtures are built once). A run of one file stays in-process, as does any run given
# -n (`-n 0`: no workers) or -p no:xdist. Set here, not in addopts, so that `pytest bench/ --benchmark-only`
# (which xdist would turn off) and one-file runs are left alone.
MAX_WORKERS = 4


def _test_files(args):
    """The test files a run names (a folder counts as many)."""
    files = set()
    for arg in args:
        path = arg.split("::")[0]
        if os.path.isdir(path):
            return None
        files.add(path)
    return files


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    if hasattr(config, "workerinput") or "PYTEST_XDIST_WORKER" in os.environ:   # a worker: it runs tests itself
        _no_benchmarks(config)
        return
    if not config.pluginmanager.hasplugin("xdist") or config.getoption("numprocesses", None) is not None:
        return
    files = _test_files(config.args)
    if files is not None and len(files) <= 1:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if min(cores, MAX_WORKERS) > 1:
        config.option.numprocesses = min(cores, MAX_WORKERS)
        _no_benchmarks(config)
        if config.option.dist == "no":
            config.option.dist = "loadfile"


def _no_benchmarks(config):
    """tests/ has no pytest-benchmark benchmarks (bench/ has): say so, rather than have the plugin warn in every
    process that xdist turned them off."""
    if hasattr(config.option, "benchmark_disable"):
        config.option.benchmark_disable = True
