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


# ----------------------------------------------------------------------------- double backward (issue #21, class 1)
POLICY_VARIANTS = ["ppo", "gspo", "gspo_token", "cispo", "sapo", "gmpo", "gpg"]
STOP_GRADIENT = ("cispo", "gspo_token")   # sg() in the formula: finite differences see through it, autograd not


def _second(fn, x, w):
    """(d fn / dx, d/dx sum(w * d fn / dx)) with autograd (create_graph), fn scalar."""
    x = x.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(x), x, create_graph=True)
    if not g.requires_grad:   # a gradient constant in x (gpg; cispo's sg)
        return g, torch.zeros_like(x)
    (h,) = torch.autograd.grad((g * w).sum(), x)
    return g.detach(), h


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["k1", "abs", "k2", "k3", "low_var_kl"])
def test_kl_penalty_double_backward_is_exact(backend, kind):
    x = torch.randn(7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    r = torch.randn(7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, device=DEVICE)
    with fastppo.use_backend(backend):
        assert torch.autograd.gradgradcheck(lambda a, b: fastppo.kl_penalty(a, b, kind), (x, r))
        got = _second(lambda a: (fastppo.kl_penalty(a, r.detach(), kind) ** 2).sum(), x, w)
    want = _second(lambda a: (ref.kl_penalty(a, r.detach(), kind) ** 2).sum(), x, w)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy_loss", POLICY_VARIANTS)
def test_policy_loss_double_backward_matches_autograd_of_the_formula(backend, policy_loss):
    logp, old, adv, mask = (t.double() if t.is_floating_point() else t for t in _policy_inputs())
    mask[2] = False
    w = torch.randn(B, T, dtype=torch.float64, device=DEVICE)
    kw = dict(policy_loss=policy_loss, agg="seq-mean-token-mean")
    with fastppo.use_backend(backend):
        got = _second(lambda a: fastppo.ppo_policy_loss(a, old, adv, mask, **kw)[0] * 1.7, logp, w)
        if policy_loss not in STOP_GRADIENT:
            assert torch.autograd.gradgradcheck(lambda a: fastppo.ppo_policy_loss(a, old, adv, mask, **kw)[0],
                                                (logp.clone().requires_grad_(),), fast_mode=True)
    want = _second(lambda a: ref.ppo_policy_loss(a, old, adv, mask, **kw)[0] * 1.7, logp, w)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)   # gmpo: n / (n + 1e-8) rounds differently


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_double_backward_is_exact(backend, clip):
    v, old, ret, mask = (t.double() if t.is_floating_point() else t for t in _policy_inputs())
    w = torch.randn(B, T, dtype=torch.float64, device=DEVICE)
    with fastppo.use_backend(backend):
        assert torch.autograd.gradgradcheck(lambda a: fastppo.value_loss(a, old, ret, mask, clip=clip)[0],
                                            (v.clone().requires_grad_(),), fast_mode=True)
        got = _second(lambda a: fastppo.value_loss(a, old, ret, mask, clip=clip)[0], v, w)
    want = _second(lambda a: ref.value_loss(a, old, ret, mask, clip=clip)[0], v, w)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _raises_twice(fn, x):
    x = x.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(x), x, create_graph=True)
    assert g.requires_grad   # else a second backward would fail for another reason
    with pytest.raises(RuntimeError, match="cannot differentiate twice"):
        g.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_fused_losses_double_backward_raises_clear_error(backend, inplace):
    logp, old, adv, mask = _policy_inputs()
    V = 33
    labels = make_labels((B, T), V, holes=0.0)
    with fastppo.use_backend(backend):
        _raises_twice(lambda x: fastppo.fused_ppo_loss(x * 1.0, labels, old, adv, mask, entropy_coef=0.1,
                                                       inplace=inplace).loss, make_logits((B, T, V), torch.float32))
        if not inplace:
            weight = torch.randn(V, 8, device=DEVICE)
            _raises_twice(lambda x: fastppo.fused_linear_ppo_loss(x, weight, labels, old, adv, mask).loss,
                          torch.randn(B, T, 8, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_advantage_ops_are_not_differentiable(backend):
    """gae, masked_whiten, group_advantages, kl_shaped_rewards, rollout_is_weights have no autograd: their
    outputs never carry a (silently wrong) gradient."""
    x, old, _, mask = _policy_inputs()
    x.requires_grad_()
    with fastppo.use_backend(backend):
        outs = [fastppo.gae(x, x, mask)[0], fastppo.masked_whiten(x, mask), fastppo.group_advantages(x[:, 0], 3),
                fastppo.kl_shaped_rewards(x[:, 0], x, mask, kl_coef=0.1), fastppo.rollout_is_weights(x, old, mask)[0]]
    assert not any(o.requires_grad for o in outs)


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


# ----------------------------------------------------------------------------- issue #21: classes 3-7, 9
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["k1", "abs", "k2", "k3", "low_var_kl"])
def test_kl_penalty_nan_gradient_is_autograds(backend, kind):
    x = torch.tensor([NAN, -1.0, INF, 0.5], dtype=torch.float64, device=DEVICE)
    r = torch.tensor([-1.0, NAN, 0.0, -INF], dtype=torch.float64, device=DEVICE)
    with fastppo.use_backend(backend):
        got = _grad_of(lambda a: fastppo.kl_penalty(a, r, kind).sum(), x)
    want = _grad_of(lambda a: ref.kl_penalty(a, r, kind).sum(), x)
    torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy_loss", ["gspo", "gspo_token", "gmpo", "cispo", "sapo"])
@pytest.mark.parametrize("where", ["logp", "old", "adv"])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_policy_nonfinite_gradient_is_autograds(backend, policy_loss, where, value):
    logp, old, adv, mask = (t.double() if t.is_floating_point() else t for t in _policy_inputs())
    {"logp": logp, "old": old, "adv": adv}[where][0, 2] = value
    with fastppo.use_backend(backend):
        got = _grad_of(lambda a: fastppo.ppo_policy_loss(a, old, adv, mask, policy_loss=policy_loss)[0], logp)
    want = _grad_of(lambda a: ref.ppo_policy_loss(a, old, adv, mask, policy_loss=policy_loss)[0], logp)
    torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-6, atol=1e-9)   # sapo: the kernel takes tau as fp32


@pytest.mark.parametrize("backend", BACKENDS)
def test_gspo_token_saturated_ratio_follows_verl(backend):
    """Mean log-ratio > 10: verl clamps log s per token, so the gradient is 0 there (finite elsewhere)."""
    logp = torch.full((2, 4), -1.0, dtype=torch.float64, device=DEVICE)
    old = logp.clone()
    old[0] -= 12.0
    adv, mask = torch.ones(2, 4, dtype=torch.float64, device=DEVICE), torch.ones(2, 4, dtype=torch.bool, device=DEVICE)
    with fastppo.use_backend(backend):
        got = _grad_of(lambda a: fastppo.ppo_policy_loss(a, old, adv, mask, policy_loss="gspo_token",
                                                         clip_high=1e6)[0], logp)
    want = _grad_of(lambda a: ref.ppo_policy_loss(a, old, adv, mask, policy_loss="gspo_token", clip_high=1e6)[0],
                    logp)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert (got[1][0] == 0).all() and (got[1][1] != 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int32, torch.bfloat16, torch.float16,
                                   torch.float64])
def test_every_mask_dtype_on_every_masked_op(backend, dtype):
    x, old, adv, m = (t.double() if t.is_floating_point() else t for t in _policy_inputs())
    mask = m.to(dtype)
    V = 40
    logits, labels = make_logits((B, T, V), torch.float64), make_labels((B, T), V, holes=0.0)
    calls = {
        "ppo": lambda k, mm: k.ppo_policy_loss(x, old, adv, mm)[0],
        "value": lambda k, mm: k.value_loss(x, old, adv, mm, clip=0.2)[0],
        "fused": lambda k, mm: k.fused_ppo_loss(logits, labels, old, adv, mm, entropy_coef=0.1).loss,
        "gae": lambda k, mm: k.gae(x, old, mm)[0],
        "whiten": lambda k, mm: k.masked_whiten(x, mm),
        "shaped": lambda k, mm: k.kl_shaped_rewards(adv[:, 0], x, mm, kl_coef=0.1),
        "is": lambda k, mm: k.rollout_is_weights(x, old, mm),
    }
    first = lambda r: r[0] if isinstance(r, tuple) else r  # noqa: E731  (the reference returns the weights alone)
    with fastppo.use_backend(backend):
        for name, call in calls.items():
            got, want = first(call(fastppo, mask)).double(), first(call(ref, m)).double()
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_accepts_the_shifted_view_and_writes_into_it(backend):
    logp, old, adv, mask = _policy_inputs()
    V = 30
    full = make_logits((B, T + 1, V), torch.float32)
    labels = make_labels((B, T), V, holes=0.0)
    xr = full.double()[:, :-1].detach().requires_grad_()
    ref.fused_ppo_loss(xr, labels, old, adv, mask).loss.backward()
    with fastppo.use_backend(backend):
        base = full.clone().requires_grad_()
        view = base * 1.0
        shifted = view[:, :-1]
        grad = torch.autograd.grad(fastppo.fused_ppo_loss(shifted, labels, old, adv, mask, inplace=True).loss,
                                   shifted)[0]
    torch.testing.assert_close(grad.double(), xr.grad, rtol=1e-4, atol=1e-6)
    if backend == "triton":
        assert grad.data_ptr() == shifted.data_ptr()   # written over the view's own storage


BAD = {"nan": NAN, "inf": INF, "str": "0.5", "bool": True, "none": None, "neg": -1.0}


def _option_table():
    x, old, adv, mask = _policy_inputs()
    V = 20
    logits, labels = make_logits((B, T, V), torch.float32), make_labels((B, T), V, holes=0.0)
    h, w, lab = torch.randn(B, T, 6), torch.randn(V, 6), labels
    ppo = lambda **k: fastppo.ppo_policy_loss(x, old, adv, mask, **k)  # noqa: E731
    return {
        ("temperature", "token_logprobs"): lambda v: fastppo.token_logprobs(logits, labels, temperature=v),
        ("temperature", "linear_logprobs"): lambda v: fastppo.linear_logprobs(h, w, lab, temperature=v),
        ("temperature", "full_kl"): lambda v: fastppo.full_kl(logits, logits, temperature=v),
        ("temperature", "fused_ppo_loss"): lambda v: fastppo.fused_ppo_loss(logits, labels, old, adv, mask,
                                                                             temperature=v),
        ("logit_scale", "token_logprobs"): lambda v: fastppo.token_logprobs(logits, labels, logit_scale=v),
        ("logit_scale", "linear_logprobs"): lambda v: fastppo.linear_logprobs(h, w, lab, logit_scale=v),
        ("logit_scale", "fused_linear_ppo_loss"): lambda v: fastppo.fused_linear_ppo_loss(
            h, w, lab, old, adv, mask, logit_scale=v),
        ("final_logit_softcapping", "linear_logprobs"): lambda v: fastppo.linear_logprobs(
            h, w, lab, final_logit_softcapping=v),
        ("clip_low", "ppo_policy_loss"): lambda v: ppo(clip_low=v),
        ("clip_high", "ppo_policy_loss"): lambda v: ppo(clip_high=v),
        ("dual_clip", "ppo_policy_loss"): lambda v: ppo(dual_clip=v),
        ("ratio_max", "ppo_policy_loss"): lambda v: ppo(ratio_max=v),
        ("sapo_tau_pos", "ppo_policy_loss"): lambda v: ppo(policy_loss="sapo", sapo_tau_pos=v),
        ("entropy_quantile", "ppo_policy_loss"): lambda v: ppo(entropy_quantile=v, entropy=x),
        ("num_tokens", "ppo_policy_loss"): lambda v: ppo(num_tokens=v),
        ("num_seqs", "ppo_policy_loss"): lambda v: ppo(num_seqs=v, agg="seq-mean-token-sum"),
        ("horizon", "ppo_policy_loss"): lambda v: ppo(horizon=v, agg="seq-mean-token-sum-norm"),
        ("clip", "value_loss"): lambda v: fastppo.value_loss(x, old, adv, mask, clip=v),
        ("kl_coef", "fused_ppo_loss"): lambda v: fastppo.fused_ppo_loss(logits, labels, old, adv, mask,
                                                                         ref_logprobs=old, kl_coef=v),
        ("entropy_coef", "fused_ppo_loss"): lambda v: fastppo.fused_ppo_loss(logits, labels, old, adv, mask,
                                                                              entropy_coef=v),
        ("kl_coef", "kl_shaped_rewards"): lambda v: fastppo.kl_shaped_rewards(adv[:, 0], x, mask, kl_coef=v),
        ("eps", "group_advantages"): lambda v: fastppo.group_advantages(adv[:, 0], 3, eps=v),
        ("gamma", "gae"): lambda v: fastppo.gae(x, old, mask, gamma=v),
        ("lam", "gae"): lambda v: fastppo.gae(x, old, mask, lam=v),
        ("max", "rollout_is_weights"): lambda v: fastppo.rollout_is_weights(x, old, mask, max=v),
        ("kl_coef", "FixedKLController"): lambda v: fastppo.FixedKLController(v),
        ("target", "AdaptiveKLController"): lambda v: fastppo.AdaptiveKLController(0.1, v, 100.0),
    }


# values an option may legitimately take (None: the documented default / off; inf: no clip / no cap)
ALLOWED = {("clip_high", "none"), ("dual_clip", "none"), ("ratio_max", "none"), ("entropy_quantile", "none"),
           ("num_tokens", "none"), ("num_seqs", "none"), ("horizon", "none"), ("clip", "none"), ("clip", "inf"),
           ("final_logit_softcapping", "none"), ("max", "inf"), ("logit_scale", "neg"),
           ("kl_coef", "neg"), ("entropy_coef", "neg")}


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("case", list(_option_table()), ids=lambda c: f"{c[1]}-{c[0]}")
def test_every_numeric_option_is_validated_by_name(case, bad):
    option, _op = case
    call = _option_table()[case]
    if (option, bad) in ALLOWED:
        call(BAD[bad])
        return
    with pytest.raises((ValueError, TypeError), match=option):
        call(BAD[bad])


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_loss_clip_inf_is_no_clip(backend):
    v, old, ret, mask = (t.double() if t.is_floating_point() else t for t in _policy_inputs())
    with fastppo.use_backend(backend):
        got = _grad_of(lambda a: fastppo.value_loss(a, old, ret, mask, clip=INF)[0], v)
    want = _grad_of(lambda a: ref.value_loss(a, old, ret, mask, clip=None)[0], v)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_a_list_mask_is_a_type_error_naming_mask():
    x, old, adv, _ = _policy_inputs()
    with pytest.raises(TypeError, match="mask"):
        fastppo.ppo_policy_loss(x, old, adv, [[1] * T] * B)
