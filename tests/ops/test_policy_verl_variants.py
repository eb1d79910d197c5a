"""verl 0.9.1's further policy losses (dppo_tv, dppo_kl, dro, clip_cov, kl_cov) on both backends against the
float64 reference: non-contiguous inputs, per-sequence advantages, packed sequences, clip_cov's random draw
(verl's torch.randperm on the default generator), kl_cov's top-k, gradcheck and option errors. The
unfused / fused / linear / bf16 sweeps over every aggregation are tests/ops/test_policy_variants.py's."""

import pytest
import torch

import fastppo
from fastppo import reference as ref
from tests.helpers import DEVICE

NEW = {
    "dppo_tv": dict(clip_low=0.1, clip_high=0.02, ratio_max=1.2),
    "dppo_kl": dict(clip_low=0.01, clip_high=0.005),
    "dro": dict(dro_beta=0.7),
    "clip_cov": dict(clip_low=0.1, clip_high=0.2, cov_ratio=1.0, cov_lb=-0.3, cov_ub=0.3),
    "kl_cov": dict(cov_ratio=0.3, kl_cov_coef=0.4),
}


def _inputs(b=4, t=11, seed=0, per_seq_adv=False):
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(b, t, generator=g) * 0.5 - 1.5
    old = logp + torch.randn(b, t, generator=g) * 0.3
    adv = torch.randn(b, generator=g) if per_seq_adv else torch.randn(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[1] = False                      # an empty sequence
    mask[0, :3] = True
    logp[~mask] = float("nan")           # masked positions contribute nothing, NaN included
    return [x.to(DEVICE) for x in (logp, old, adv, mask)]


def _compare(variant, kw, logp, old, adv, mask, rtol=1e-5, seed=None):
    reseed = (lambda: torch.manual_seed(seed)) if seed is not None else (lambda: None)
    x = logp.clone().requires_grad_()
    reseed()
    loss, stats = fastppo.ppo_policy_loss(x, old, adv, mask, policy_loss=variant, **kw)
    (loss * 1.3).backward()
    xr = logp.double().requires_grad_()
    reseed()
    rloss, rstats = ref.ppo_policy_loss(xr, old.double(), adv.double(), mask, policy_loss=variant, **kw)
    (rloss * 1.3).backward()
    torch.testing.assert_close(loss.double(), rloss, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), torch.nan_to_num(xr.grad), rtol=rtol, atol=1e-7)
    assert (x.grad[~mask] == 0).all()
    for k in rstats:
        torch.testing.assert_close(stats[k].double(), rstats[k].double(), rtol=1e-5, atol=1e-6, msg=k)
    return stats


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("variant", list(NEW))
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_matches_reference_both_backends(backend, variant, agg):
    logp, old, adv, mask = _inputs()
    with fastppo.use_backend(backend):
        stats = _compare(variant, dict(NEW[variant], agg=agg), logp, old, adv, mask)
    if variant != "dro":   # the inputs exercise the variant's own branch: some tokens invalid / selected
        assert 0 < float(stats["clipfrac"]) < 1, stats


@pytest.mark.parametrize("variant", list(NEW))
def test_non_contiguous_and_per_sequence_advantages(variant):
    logp, old, adv, mask = _inputs(b=4, t=22, per_seq_adv=True)
    view = lambda z: z[:, ::2]  # noqa: E731
    _compare(variant, NEW[variant], view(logp), view(old), adv, view(mask))


@pytest.mark.parametrize("variant", list(NEW))
def test_packed_equals_padded(variant):
    logp, old, adv, mask = _inputs()
    lens = torch.tensor([11, 4, 7, 9])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(DEVICE)
    pad = torch.arange(11, device=DEVICE)[None] < lens.to(DEVICE)[:, None]
    packed = [z[pad] for z in (logp, old, adv, mask & pad)]
    x = packed[0].clone().requires_grad_()
    loss, _ = fastppo.ppo_policy_loss(x, *packed[1:], cu_seqlens=cu, agg="seq-mean-token-mean", policy_loss=variant,
                                      **NEW[variant])
    loss.backward()
    xp = logp.clone().requires_grad_()
    want, _ = fastppo.ppo_policy_loss(xp, old, adv, mask & pad, agg="seq-mean-token-mean", policy_loss=variant,
                                      **NEW[variant])
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, xp.grad[pad], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_clip_cov_random_draw_is_verls(backend):
    """More candidates than k = int(cov_ratio N): verl draws k of them with torch.randperm on the default
    generator; fastppo makes the same draw (same tokens, same generator state after)."""
    logp, old, adv, mask = _inputs(b=6, t=16, seed=3)
    kw = dict(clip_low=0.2, clip_high=0.2, cov_ratio=0.05, cov_lb=-0.5, cov_ub=0.5)
    picks = []
    for seed in (0, 1, 2):
        with fastppo.use_backend(backend):
            stats = _compare("clip_cov", kw, logp, old, adv, mask, seed=seed)
        torch.manual_seed(seed)
        ref.ppo_policy_loss(logp.double(), old.double(), adv.double(), mask, policy_loss="clip_cov", **kw)
        after = torch.rand(())
        torch.manual_seed(seed)
        fastppo.ppo_policy_loss(logp, old, adv, mask, policy_loss="clip_cov", **kw)
        assert torch.rand(()) == after   # one draw, verl's
        picks.append(float(stats["clipfrac"]))
    n = int(mask.sum())
    assert all(p == pytest.approx(int(0.05 * n) / n) for p in picks)


def test_kl_cov_top_k_and_empty_batch():
    logp, old, adv, mask = _inputs()
    x = logp.clone().requires_grad_()
    fastppo.ppo_policy_loss(x, old, adv, mask, policy_loss="kl_cov", cov_ratio=0.1, kl_cov_coef=0.0)[0].backward()
    y = logp.clone().requires_grad_()
    fastppo.ppo_policy_loss(y, old, adv, mask, policy_loss="kl_cov", cov_ratio=0.1, kl_cov_coef=1.0)[0].backward()
    n = int(mask.sum())
    assert int(((x.grad - y.grad).abs() > 0).sum()) == max(1, int(n * 0.1))   # k tokens get the |d| term
    empty = torch.zeros_like(mask)
    loss, stats = fastppo.ppo_policy_loss(logp, old, adv, empty, policy_loss="kl_cov")
    assert float(loss) == 0 and float(stats["clipfrac"]) == 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("variant", ["dro", "kl_cov", "clip_cov"])   # dppo: a stop-gradient weight (no gradcheck)
def test_gradcheck_float64(backend, variant):
    logp, old, adv, mask = (z.double() if z.is_floating_point() else z for z in _inputs(b=3, t=5))
    logp = torch.nan_to_num(logp, nan=-1.0).requires_grad_()
    kw = dict(NEW[variant], agg="seq-mean-token-mean")
    with fastppo.use_backend(backend):
        assert torch.autograd.gradcheck(lambda z: fastppo.ppo_policy_loss(z, old, adv, mask, policy_loss=variant,
                                                                          **kw)[0], (logp,), fast_mode=True)


def test_option_errors():
    logp, old, adv, mask = _inputs()
    for kw, msg in [(dict(policy_loss="dro"), "needs dro_beta"),
                    (dict(policy_loss="dro", dro_beta=0.0), "dro_beta must be > 0"),
                    (dict(dro_beta=0.1), "dro_beta applies to policy_loss='dro' only"),
                    (dict(policy_loss="kl_cov", cov_ratio=0.0), "cov_ratio must be in"),
                    (dict(policy_loss="clip_cov", cov_lb=5.0, cov_ub=1.0), "cov_lb must be < cov_ub"),
                    (dict(policy_loss="gpg", ratio_max=2.0), "ratio_max applies to policy_loss"),
                    (dict(policy_loss="kl_cov", entropy_quantile=0.5), "not defined for policy_loss='kl_cov'")]:
        with pytest.raises(ValueError, match=msg):
            fastppo.ppo_policy_loss(logp, old, adv, mask, **kw)
