import itertools

import pytest
import torch

import fastppo
from fastppo import reference as ref
from tests.helpers import DEVICE, make_mask

B, T = 5, 23
KINDS = ["k1", "abs", "k2", "mse", "k3", "low_var_kl"]


def _inputs(dtype=torch.float32, per_seq_adv=False):
    logp = (torch.randn(B, T, device=DEVICE) * 0.3 - 2).to(dtype)
    old = (logp.float() + torch.randn(B, T, device=DEVICE) * 0.25).to(dtype)
    adv = torch.randn(B, device=DEVICE) if per_seq_adv else torch.randn(B, T, device=DEVICE)
    return logp, old, adv, make_mask((B, T))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_penalty(kind, dtype):
    logp = (torch.randn(B, T, device=DEVICE) * 4).to(dtype).requires_grad_()   # |d| > 20 reaches the clamps
    refp = (torch.randn(B, T, device=DEVICE) * 4).to(dtype).requires_grad_()
    kl = fastppo.kl_penalty(logp, refp, kind)
    assert kl.dtype == torch.float32
    g = torch.randn_like(kl)
    (kl * g).sum().backward()
    x, y = logp.detach().float().requires_grad_(), refp.detach().float().requires_grad_()
    rk = ref.kl_penalty(x, y, kind)
    (rk * g).sum().backward()
    torch.testing.assert_close(kl, rk, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp.grad.float(), x.grad.to(dtype).float(), rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(refp.grad.float(), y.grad.to(dtype).float(), rtol=1e-2, atol=1e-5)


def test_kl_penalty_bad_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        fastppo.kl_penalty(torch.zeros(3), torch.zeros(3), "k4")


MODES = list(itertools.product(ref.AGG_MODES, [(0.2, None), (0.2, 0.28)], [None, 1.05], [False, True]))


@pytest.mark.parametrize("agg,clips,dual,per_seq", MODES)
def test_policy_loss_matches_reference(agg, clips, dual, per_seq):
    logp, old, adv, mask = _inputs(per_seq_adv=per_seq)
    x = logp.clone().requires_grad_()
    loss, stats = fastppo.ppo_policy_loss(x, old, adv, mask, clip_low=clips[0], clip_high=clips[1],
                                          dual_clip=dual, agg=agg)
    (loss * 1.3).backward()
    xr = logp.clone().requires_grad_()
    rloss, rstats = ref.ppo_policy_loss(xr, old, adv, mask, clip_low=clips[0], clip_high=clips[1],
                                        dual_clip=dual, agg=agg)
    (rloss * 1.3).backward()
    torch.testing.assert_close(loss, rloss, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-7)
    assert set(stats) == set(rstats)
    for k in stats:
        torch.testing.assert_close(stats[k], rstats[k], rtol=1e-5, atol=1e-6, msg=k)


def test_policy_loss_clipping_is_exercised():
    logp, old, adv, mask = _inputs()
    _, stats = fastppo.ppo_policy_loss(logp, old, adv, mask, dual_clip=1.05)
    assert 0 < stats["clipfrac"] < 1 and stats["clipfrac_lower"] > 0


@pytest.mark.parametrize("agg", ref.AGG_MODES)
def test_microbatches_add_up_to_the_batch(agg):
    logp, old, adv, mask = _inputs()
    counts = dict(num_tokens=int(mask.sum()), num_seqs=int((mask.sum(-1) > 0).sum()), horizon=T)
    x = logp.clone().requires_grad_()
    full, _ = fastppo.ppo_policy_loss(x, old, adv, mask, agg=agg)
    full.backward()
    xm = logp.clone().requires_grad_()
    parts = [fastppo.ppo_policy_loss(xm[s], old[s], adv[s], mask[s], agg=agg, **counts)[0]
             for s in (slice(0, 2), slice(2, 3), slice(3, 5))]
    total = sum(parts)
    total.backward()
    torch.testing.assert_close(total, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xm.grad, x.grad, rtol=1e-6, atol=1e-8)


def test_fully_masked_batch_gives_zero():
    logp, old, adv, _ = _inputs()
    mask = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
    x = logp.clone().requires_grad_()
    loss, stats = fastppo.ppo_policy_loss(x, old, adv, mask, agg="seq-mean-token-mean")
    loss.backward()
    assert loss.item() == 0 and (x.grad == 0).all() and stats["ratio_max"] == 0


def test_nan_at_masked_positions_does_not_leak():
    logp, old, adv, mask = _inputs()
    old = old.masked_fill(~mask, float("nan"))
    loss, _ = fastppo.ppo_policy_loss(logp, old, adv, mask)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("agg", ref.AGG_MODES)
@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss(agg, clip):
    v = torch.randn(B, T, device=DEVICE)
    old = v + 0.3 * torch.randn(B, T, device=DEVICE)
    ret = torch.randn(B, T, device=DEVICE)
    mask = make_mask((B, T))
    x = v.clone().requires_grad_()
    loss, stats = fastppo.value_loss(x, old, ret, mask, clip=clip, agg=agg)
    loss.backward()
    xr = v.clone().requires_grad_()
    rloss, rstats = ref.value_loss(xr, old, ret, mask, clip=clip, agg=agg)
    rloss.backward()
    torch.testing.assert_close(loss, rloss, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats["vf_clipfrac"], rstats["vf_clipfrac"])


def test_bf16_inputs_and_1d():
    logp, old, adv, mask = _inputs(torch.bfloat16)
    x = logp[0].clone().requires_grad_()
    loss, _ = fastppo.ppo_policy_loss(x, old[0], adv[0], mask[0])
    loss.backward()
    xr = logp[0].float().requires_grad_()
    rloss, _ = ref.ppo_policy_loss(xr, old[0], adv[0], mask[0])
    rloss.backward()
    torch.testing.assert_close(loss, rloss, rtol=1e-5, atol=1e-6)
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), xr.grad.to(torch.bfloat16).float())


def test_gradcheck_float64():
    logp, old, adv, mask = _inputs(torch.float64)
    x = logp.clone().requires_grad_()
    f = lambda y: fastppo.ppo_policy_loss(y, old, adv, mask, clip_high=0.3, dual_clip=2.0,
                                          agg="seq-mean-token-mean")[0]
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_bad_arguments():
    logp, old, adv, mask = _inputs()
    with pytest.raises(ValueError, match="agg must be one of"):
        fastppo.ppo_policy_loss(logp, old, adv, mask, agg="mean")
    with pytest.raises(ValueError, match="old_logprobs shape"):
        fastppo.ppo_policy_loss(logp, old[:, 1:], adv, mask)
    with pytest.raises(ValueError, match="advantages must be"):
        fastppo.ppo_policy_loss(logp, old, adv[:, :3], mask)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        fastppo.ppo_policy_loss(logp, old, adv, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="clip_low"):
        fastppo.ppo_policy_loss(logp, old, adv, mask, clip_low=1.5)
    with pytest.raises(ValueError, match="num_tokens"):
        fastppo.ppo_policy_loss(logp, old, adv, mask, num_tokens=0)
    with pytest.raises(ValueError, match="clip must be a positive"):
        fastppo.value_loss(logp, old, adv, mask, clip=-1.0)


def test_torch_backend_same_as_kernel():
    logp, old, adv, mask = _inputs()
    a, sa = fastppo.ppo_policy_loss(logp, old, adv, mask, dual_clip=3.0)
    with fastppo.use_backend("torch"):
        b, sb = fastppo.ppo_policy_loss(logp, old, adv, mask, dual_clip=3.0)
    torch.testing.assert_close(a, b)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k])
