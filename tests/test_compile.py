"""torch.compile and torch.library: every public op is a registered op (torch.ops.fastppo.*) with a
fake implementation and an autograd formula; compiled functions give one graph with no break and the
eager numbers, on the Triton backend (the interpreter here, CUDA on a GPU) and on the PyTorch backend."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastppo
from tests.helpers import DEVICE

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _bt(B=2, T=5, requires_grad=False):
    return torch.randn(B, T, device=DEVICE, requires_grad=requires_grad)


def _mask(B=2, T=5):
    mask = torch.rand(B, T, device=DEVICE) > 0.3
    mask[0, 0] = mask[0, 1] = True
    mask[-1] = False   # an empty row
    return mask


def _op_cases():
    """(op name, args) for opcheck: every op, every backend it runs, tiny shapes, strided views."""
    r, mask = _bt(), _mask()
    v_t = _bt(5, 2).t()   # a transposed (non-contiguous) view
    lp, ref = _bt(requires_grad=True), _bt()
    cases = [
        ("gae", (r, v_t, mask, 0.9, 0.8, "triton")),
        ("gae", (r, v_t, mask, 0.9, 0.8, "torch")),
        ("masked_whiten", (r, mask, False)),
        ("group_advantages", (_bt(1, 6)[0], 3, "grpo", True, 1e-6)),
        ("group_advantages", (_bt(1, 6)[0], 2, "rloo", True, 1e-6)),
        ("kl_shaped_rewards", (_bt(1, 2)[0], ref, mask, 0.1)),
        ("kl_penalty", (lp, ref, "k3")),
        ("kl_penalty", (lp.detach().double().requires_grad_(), ref.double(), "low_var_kl")),
    ]
    return cases


@pytest.mark.parametrize("case", range(len(_op_cases())))
def test_opcheck(case):
    torch.manual_seed(case)
    name, args = _op_cases()[case]
    if DEVICE == "cpu" and "triton" in args and not fastppo.library.OPAQUE_KERNELS:
        pytest.skip("the Triton backend needs CUDA or TRITON_INTERPRET=1")
    result = torch.library.opcheck(getattr(torch.ops.fastppo, name), args, test_utils=OPCHECK_TESTS)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_every_public_op_is_registered():
    names = ("gae", "masked_whiten", "group_advantages", "kl_shaped_rewards", "kl_penalty")
    for name in names:
        assert hasattr(torch.ops.fastppo, name), name


def _rollout_and_kl(r, v, mask, lp, ref):
    adv, ret = fastppo.gae(r, v, mask, gamma=0.9, lam=0.8)
    white = fastppo.masked_whiten(adv, mask)
    grpo = fastppo.group_advantages(r[:, 0], 2)
    shaped = fastppo.kl_shaped_rewards(r[:, 0], ref, mask, kl_coef=0.1)
    kl = fastppo.kl_penalty(lp, ref, kind="k3")
    out = white.sum() + ret.sum() + grpo.sum() + shaped.sum()
    return out + (kl * mask).sum()


def _inputs(B=4, T=7):
    torch.manual_seed(1)
    r, v, mask = _bt(B, T), _bt(B, T), _mask(B, T)
    return r, v, mask, _bt(B, T, requires_grad=True), _bt(B, T)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_graph_break_advantages_and_kl(backend):
    args = _inputs()
    torch._dynamo.reset()
    with fastppo.use_backend(backend):
        explained = torch._dynamo.explain(_rollout_and_kl)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_matches_eager_advantages_and_kl(backend, compiler):
    args = _inputs()
    lp = args[3]
    with fastppo.use_backend(backend):
        want = _rollout_and_kl(*args)
        (want_grad,) = torch.autograd.grad(want, lp)
        torch._dynamo.reset()
        got = torch.compile(_rollout_and_kl, backend=compiler, fullgraph=True)(*args)
        (got_grad,) = torch.autograd.grad(got, lp)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-6)


NO_INTERPRETER = textwrap.dedent("""
    import torch
    import fastppo
    from torch._dynamo.backends.common import aot_autograd

    assert not fastppo.library.OPAQUE_KERNELS
    # the PyTorch backend: the triton_op bodies are the fake implementations
    r, v = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.rand(3, 6) > 0.3
    res = torch.library.opcheck(torch.ops.fastppo.gae, (r, v, mask, 0.9, 0.8, "torch"))
    assert all(x == "SUCCESS" for x in res.values()), res

    # the Triton backend traced (not run: no GPU here): Inductor sees the kernel, not an opaque op
    graphs = []
    def capture(gm, example_inputs):
        graphs.append(gm.code)
        raise RuntimeError("traced")
    def f(r, v, mask, lp, ref):
        adv, ret = torch.ops.fastppo.gae(r, v, mask, 0.9, 0.8, "triton")
        return adv.sum() + ret.sum() + torch.ops.fastppo.kl_penalty(lp, ref, "k3")[0].sum()
    try:
        torch.compile(f, backend=aot_autograd(fw_compiler=capture), fullgraph=True)(
            r, v, mask, torch.randn(3, 6), torch.randn(3, 6))
    except Exception as e:
        assert "traced" in str(e), e
    code = graphs[0]
    assert code.count("triton_kernel_wrapper_functional(") == 2, code
    assert "fastppo" not in code, code
    print("OK")
""")


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU registration without the interpreter")
def test_triton_ops_traced_without_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.getcwd() + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", NO_INTERPRETER], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
