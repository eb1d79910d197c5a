"""Every kernel compiles ahead of time for sm_80 and sm_90 with Triton's own compiler (no GPU):
no register spills, and streaming loads are 128-bit vectors. The compile runs in a subprocess
without TRITON_INTERPRET (interpreted kernels cannot be compiled)."""

import pytest

from fastppo.kernels import aot

SPECS = aot.aot_kernels()


@pytest.fixture(scope="module")
def compiled_rows():
    return {(r["kernel"], r["arch"]): r for r in aot.report_in_subprocess((80, 90))}


@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_compiles_without_spills(compiled_rows, spec, cc):
    row = compiled_rows[(spec.name, f"sm_{cc}")]
    assert row["LOCAL"] == 0, f"{spec.name} spills on sm_{cc}: {row}"
    assert 0 < row["REG"] <= 255
    assert row["shared_bytes"] <= 160 * 1024, f"{spec.name} needs more shared memory than an A100 has: {row}"
    if spec.streaming:
        assert row["v4"] > 0, f"{spec.name} has no 128-bit loads on sm_{cc}: {row}"
    if spec.tensor_cores:
        assert row["mma"] > 0, f"{spec.name} does not use tensor cores on sm_{cc}: {row}"


def test_every_jit_kernel_is_listed():
    import importlib
    import pkgutil

    import triton
    from triton.runtime.interpreter import InterpretedFunction

    import fastppo.kernels as pkg

    listed = {id(s.fn) for s in SPECS}
    kinds = (triton.runtime.JITFunction, InterpretedFunction)
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"fastppo.kernels.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, kinds) and name.endswith("_kernel"):
                assert id(obj) in listed, f"{info.name}.{name} is missing from kernels/aot.py"
