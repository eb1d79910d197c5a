"""Hostile inputs for the loss ops (issue #11), on both backends, against the float64 reference:
NaN propagation through every clamp / branch, NaN/inf at masked positions contributing exactly
nothing, value-loss rounding ties, fp64 end to end, mask semantics, in-place refusal, double
backward, 64-bit offsets."""

import os
import subprocess
import sys

import pytest
import torch

import fastppo
from fastppo import reference as ref
from tests.helpers import DEVICE, make_labels, make_logits, make_mask

BACKENDS = ["triton", "torch"]
B, T = 3, 11
NAN, INF = float("nan"), float("inf")


def _policy_inputs(dtype=torch.float32):
    logp = (torch.randn(B, T, device=DEVICE) * 0.3 - 2).to(dtype)
    old = (logp.double() + torch.randn(B, T, device=DEVICE, dtype=torch.float64) * 0.3).to(dtype)
    adv = torch.randn(B, T, device=DEVICE, dtype=dtype)
    return logp, old, adv, make_mask((B, T))


def _grad_of(fn, x, upstream=1.7):
    x = x.detach().clone().requires_grad_()
    loss = fn(x)
    (loss * upstream).backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["logp", "old", "adv"])
@pytest.mark.parametrize("dual", [None, 3.0])
def test_policy_nan_at_valid_position_propagates(backend, where, dual):
    logp, old, adv, mask = _policy_inputs()
    mask[0, 2] = True
    t = dict(logp=logp, old=old, adv=adv)
    t[where] = t[where].clone()
    t[where][0, 2] = NAN
    with fastppo.use_backend(backend):
        loss, g = _grad_of(lambda x: fastppo.ppo_policy_loss(x, t["old"], t["adv"], mask, dual_clip=dual)[0],
                           t["logp"])
        stats = fastppo.ppo_policy_loss(t["logp"], t["old"], t["adv"], mask, dual_clip=dual)[1]
    rloss, rg = _grad_of(lambda x: ref.ppo_policy_loss(x, t["old"].double(), t["adv"].double(), mask,
                                                       dual_clip=dual)[0], t["logp"].double())
    assert torch.isnan(loss) and torch.isnan(rloss)
    torch.testing.assert_close(g.double(), rg, rtol=1e-5, atol=1e-7, equal_nan=True)
    if where != "adv":
        assert torch.isnan(stats["ratio_mean"]) and torch.isnan(stats["ratio_max"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["values", "old", "returns"])
def test_value_nan_at_valid_position_propagates(backend, where):
    v = torch.randn(B, T, device=DEVICE)
    t = dict(values=v, old=v + 0.3 * torch.randn(B, T, device=DEVICE), returns=torch.randn(B, T, device=DEVICE))
    mask = make_mask((B, T))
    mask[1, 4] = True
    t[where] = t[where].clone()
    t[where][1, 4] = NAN
    with fastppo.use_backend(backend):
        loss, g = _grad_of(lambda x: fastppo.value_loss(x, t["old"], t["returns"], mask, clip=0.2)[0], t["values"])
    rloss, rg = _grad_of(lambda x: ref.value_loss(x, t["old"].double(), t["returns"].double(), mask, clip=0.2)[0],
                         t["values"].double())
    assert torch.isnan(loss) and torch.isnan(rloss)
    torch.testing.assert_close(g.double(), rg, rtol=1e-5, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["k1", "abs", "k2", "k3", "low_var_kl"])
def test_kl_penalty_nan_propagates(backend, kind):
    logp = torch.tensor([NAN, -1.0, -30.0, 0.0], device=DEVICE)
    refp = torch.tensor([-1.0, NAN, 0.0, -30.0], device=DEVICE)
    with fastppo.use_backend(backend):
        kl = fastppo.kl_penalty(logp, refp, kind)
    rk = ref.kl_penalty(logp.double(), refp.double(), kind)
    torch.testing.assert_close(kl.double(), rk, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", fastppo.modes.AGG_MODES)
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_policy_masked_positions_contribute_nothing(backend, agg, bad):
    logp, old, adv, mask = _policy_inputs()
    dirty = [x.masked_fill(~mask, bad) for x in (logp, old, adv)]
    with fastppo.use_backend(backend):
        loss, g = _grad_of(lambda x: fastppo.ppo_policy_loss(x, dirty[1], dirty[2], mask, dual_clip=2.0,
                                                             agg=agg)[0], dirty[0])
        stats = fastppo.ppo_policy_loss(*dirty, mask, dual_clip=2.0, agg=agg)[1]
    rloss, rg = _grad_of(lambda x: ref.ppo_policy_loss(x, old.double(), adv.double(), mask, dual_clip=2.0,
                                                       agg=agg)[0], logp.double())
    torch.testing.assert_close(loss.double(), rloss, rtol=1e-5, atol=1e-6)
    assert (g[~mask] == 0).all()
    torch.testing.assert_close(g.double(), rg, rtol=1e-5, atol=1e-7)
    assert all(torch.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [NAN, INF])
def test_value_masked_positions_contribute_nothing(backend, bad):
    v = torch.randn(B, T, device=DEVICE)
    old, ret = v + 0.3 * torch.randn(B, T, device=DEVICE), torch.randn(B, T, device=DEVICE)
    mask = make_mask((B, T))
    dirty = [x.masked_fill(~mask, bad) for x in (v, old, ret)]
    with fastppo.use_backend(backend):
        loss, g = _grad_of(lambda x: fastppo.value_loss(x, dirty[1], dirty[2], mask, clip=0.2)[0], dirty[0])
    rloss, rg = _grad_of(lambda x: ref.value_loss(x, old.double(), ret.double(), mask, clip=0.2)[0], v.double())
    torch.testing.assert_close(loss.double(), rloss, rtol=1e-5, atol=1e-6)
    assert (g[~mask] == 0).all()
    torch.testing.assert_close(g.double(), rg, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_masked_nan_in_per_token_inputs(backend):
    V = 257
    logits = make_logits((B, T, V), torch.float32)
    labels = make_labels((B, T), V, holes=0.0)
    mask = make_mask((B, T))
    lp = ref.token_logprobs(logits, labels)
    old, refp, adv = lp + 0.2, lp - 0.1, torch.randn(B, T, device=DEVICE)
    dirty = [x.masked_fill(~mask, NAN) for x in (old, refp, adv)]
    kw = dict(kl_coef=0.1, entropy_coef=0.01, agg="seq-mean-token-mean")
    with fastppo.use_backend(backend):
        x = logits.clone().requires_grad_()
        out = fastppo.fused_ppo_loss(x, labels, dirty[0], dirty[2], mask, ref_logprobs=dirty[1], **kw)
        out.loss.backward()
    xr = logits.double().requires_grad_()
    rout = ref.fused_ppo_loss(xr, labels, old, adv, mask, ref_logprobs=refp, **kw)
    rout.loss.backward()
    torch.testing.assert_close(out.loss.double(), rout.loss, rtol=1e-5, atol=1e-6)
    assert (x.grad[~mask] == 0).all()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_loss_rounding_ties_keep_the_gradient(backend):
    # values inside the clip range: both branches equal up to rounding; the gradient must be v - R
    g = torch.Generator().manual_seed(3)
    n = 4096
    old = torch.randn(1, n, generator=g) * 100
    v = old + (torch.rand(1, n, generator=g) - 0.5) * 0.3          # |v - old| < clip = 0.2
    ret = v + torch.randn(1, n, generator=g) * 1e-3
    v, old, ret = v.to(DEVICE), old.to(DEVICE), ret.to(DEVICE)
    mask = torch.ones(1, n, dtype=torch.bool, device=DEVICE)
    with fastppo.use_backend(backend):
        _, grad = _grad_of(lambda x: fastppo.value_loss(x, old, ret, mask, clip=0.2, agg="token-sum")[0], v, 1.0)
    inside = ((v - old).abs() <= 0.2)
    torch.testing.assert_close(grad[inside].double(), (v - ret)[inside].double(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_loss_matches_verl_tie_rule(backend):
    # an exact tie (v_c == v): torch.maximum's backward splits the gradient in half per branch
    v = torch.tensor([[0.5, 1.0, -2.0]], device=DEVICE, dtype=torch.float64)
    old = torch.tensor([[0.45, 0.0, -2.1]], device=DEVICE, dtype=torch.float64)
    ret = torch.tensor([[0.0, 3.0, 1.0]], device=DEVICE, dtype=torch.float64)
    mask = torch.ones_like(v, dtype=torch.bool)
    with fastppo.use_backend(backend):
        _, grad = _grad_of(lambda x: fastppo.value_loss(x, old, ret, mask, clip=0.2, agg="token-sum")[0], v, 1.0)
    _, rgrad = _grad_of(lambda x: ref.value_loss(x, old, ret, mask, clip=0.2, agg="token-sum")[0], v, 1.0)
    torch.testing.assert_close(grad, rgrad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_penalty_float64_end_to_end(backend):
    x = torch.randn(2, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = torch.randn(2, 5, dtype=torch.float64, device=DEVICE)
    with fastppo.use_backend(backend):
        assert fastppo.kl_penalty(x, y, "k3").dtype == torch.float64
        assert torch.autograd.gradcheck(lambda a: fastppo.kl_penalty(a, y, "low_var_kl"), (x,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_float64_backward_is_float64_accurate(backend):
    V = 67
    logits = make_logits((2, 4, V), torch.float64)
    labels = make_labels((2, 4), V, holes=0.0)
    mask = make_mask((2, 4), empty_rows=())
    old = ref.token_logprobs(logits, labels) + 0.1
    adv = torch.randn(2, 4, dtype=torch.float64, device=DEVICE)
    kw = dict(ref_logprobs=old - 0.05, kl_coef=0.1, entropy_coef=0.03)
    with fastppo.use_backend(backend):
        x = logits.clone().requires_grad_()
        out = fastppo.fused_ppo_loss(x, labels, old, adv, mask, **kw)
        (out.loss * 1.3).backward()
    xr = logits.clone().requires_grad_()
    (ref.fused_ppo_loss(xr, labels, old, adv, mask, **kw).loss * 1.3).backward()
    assert x.grad.dtype == torch.float64
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_must_be_binary(backend):
    logp, old, adv, _ = _policy_inputs()
    bad = torch.tensor([0.5, 1, 0, -1, 1, 1, 0, 1, 1, 1, 1], device=DEVICE).expand(B, T)
    with fastppo.use_backend(backend), pytest.raises(ValueError, match="mask must be bool or hold only 0 and 1"):
        fastppo.ppo_policy_loss(logp, old, adv, bad)
    with fastppo.use_backend(backend), pytest.raises(ValueError, match="mask must be bool"):
        fastppo.value_loss(logp, old, adv, bad * 2)
    ok = torch.ones(B, T, dtype=torch.int64, device=DEVICE)      # 0/1 in any dtype is fine
    with fastppo.use_backend(backend):
        fastppo.ppo_policy_loss(logp, old, adv, ok)


def test_inplace_refuses_expanded_logits():
    V = 64
    row = make_logits((1, 1, V), torch.float32)
    logits = row.expand(B, T, V)
    labels = make_labels((B, T), V, holes=0.0)
    lp = ref.token_logprobs(logits, labels)
    with pytest.raises(ValueError, match="inplace=True needs logits whose elements do not share memory"):
        fastppo.fused_ppo_loss(logits, labels, lp, torch.ones(B, T), torch.ones(B, T), inplace=True)


def _double_backward(fn, x):
    x = x.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(x), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises_clear_error(backend):
    logp, old, adv, mask = _policy_inputs()
    V = 33
    logits = make_logits((B, T, V), torch.float32)
    labels = make_labels((B, T), V, holes=0.0)
    with fastppo.use_backend(backend):
        _double_backward(lambda x: fastppo.ppo_policy_loss(x, old, adv, mask, policy_loss="sapo")[0], logp)
        _double_backward(lambda x: fastppo.value_loss(x, old, adv, mask, clip=0.2)[0], logp)
        _double_backward(lambda x: fastppo.kl_penalty(x, old, "k3").sum(), logp)
        _double_backward(lambda x: fastppo.fused_ppo_loss(x, labels, old, adv, mask, entropy_coef=0.1).loss, logits)
        _double_backward(lambda x: fastppo.fused_linear_ppo_loss(x, torch.randn(V, 8, device=DEVICE), labels, old,
                                                                 adv, mask).loss, torch.randn(B, T, 8, device=DEVICE))


_BIG_STRIDE = """
import torch, fastppo, fastppo.reference
S = 2**30 + 1                                   # t * stride overflows int32 from t = 2
base = torch.empty(2 * S + 1)                   # virtual memory: only the touched pages are committed
x = base.as_strided((1, 3), (0, S))
x.copy_(torch.tensor([[-1.0, -2.0, -3.0]]))
old, adv, m = x.clone() * 0.9, torch.tensor([[1.0, -1.0, 0.5]]), torch.ones(1, 3, dtype=torch.bool)
got = fastppo.ppo_policy_loss(x, old, adv, m)[0]
want = fastppo.reference.ppo_policy_loss(x.clone().double(), old.double(), adv.double(), m)[0]
assert abs(got.item() - want.item()) < 1e-6, (got, want)
"""


@pytest.mark.skipif(DEVICE != "cpu", reason="the strided view trick needs CPU overcommit (host test)")
def test_64bit_offsets_in_loss_aggregation():
    """A [1, 3] view with time stride 2^30 + 1 over 8 GiB of untouched virtual memory (overcommit):
    32-bit `t * stride` offsets read out of bounds (a segfault before the fix)."""
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", _BIG_STRIDE], env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0 and "MemoryError" in out.stderr + out.stdout or "can't allocate" in out.stderr:
        pytest.skip("this machine refuses an 8 GiB virtual allocation (no overcommit)")
    assert out.returncode == 0, out.stderr[-2000:]
