"""patch("verl") serves verl 0.9.1's further registered policy losses (dppo_tv, dppo_kl, dro, clip_cov,
kl_cov, bypass_mode): verl's real compute_policy_loss_<name> via get_policy_loss_fn, patched vs
unpatched, every loss_agg_mode with and without rollout IS weights and global batch info; loss, gradient
(upstream not one) and metrics to 2e-5 relative; every call served (nothing delegated)."""

from __future__ import annotations

import pytest
import torch
import verl.trainer.ppo.core_algos as ca

import fastppo.integrations as fi
from tests.integrations.test_verl import _AGGS, _GLOBAL, _mask

pytestmark = pytest.mark.usefixtures("verl_torch_paths")

_PL = {
    "dppo_tv": {},
    "dppo_kl": {},
    "dro": dict(dro_beta=0.3),
    # a wide window and a small ratio: more candidates than k, so verl's random draw picks among them
    "clip_cov": dict(clip_cov_ratio=0.08, clip_cov_lb=-2.0, clip_cov_ub=2.0),
    "kl_cov": dict(kl_cov_ratio=0.1, ppo_kl_coef=0.5),
}


def _config(name, info=None, rollout_correction=None, **pl):
    from verl.workers.config import ActorConfig, PolicyLossConfig

    extra = {} if rollout_correction is None else {"rollout_correction": rollout_correction}
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                      clip_ratio_low=0.1, clip_ratio_high=0.28, clip_ratio_c=2.5,
                      policy_loss=PolicyLossConfig(loss_mode=name, **pl, **extra))
    cfg.global_batch_info.update(info or {})
    return cfg


def _inputs(B=8, T=9):
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(B, T, generator=g) * 0.4 - 1.0
    old = logp + torch.randn(B, T, generator=g) * 0.3
    logp[3, 0] += 25.0   # beyond verl's [-20, 20] clamp of the token log-ratio
    adv = torch.randn(B, T, generator=g)
    torch.manual_seed(0)
    return logp, old, adv, _mask(B, T)


def _run(fn, old, logp, adv, m, mode, cfg, isw, seed=7):
    lp = logp.clone().requires_grad_()
    args = (old, lp, adv, m) + (() if mode is None else (mode,))
    torch.manual_seed(seed)   # clip_cov's draw: the same generator state for verl and fastppo
    loss, metrics = fn(*args, config=cfg, rollout_is_weights=isw)
    (loss * 0.7).backward()
    return loss.detach(), metrics, lp.grad


def _rel(a, b):
    """Largest |a - b| relative to the largest |a| (the tolerance the issue asks for: 2e-5 relative)."""
    return float((a.double() - b.double()).abs().max() / a.double().abs().max().clamp_min(1e-30))


def _same(want, got):
    (la, ma, ga), (lb, mb, gb) = want, got
    assert lb.dtype == la.dtype and lb.shape == la.shape
    assert _rel(la, lb) <= 2e-5 and _rel(ga, gb) <= 2e-5, (_rel(la, lb), _rel(ga, gb))
    assert mb.keys() == ma.keys() and all(isinstance(v, float) for v in mb.values())
    for k in ma:
        assert mb[k] == pytest.approx(ma[k], rel=2e-5, abs=1e-7), k
    return _rel(la, lb), _rel(ga, gb)


def _cases(m, isw):
    return ([(mode, m, isw, _GLOBAL) for mode in _AGGS] + [(mode, m, None, {}) for mode in _AGGS[:2]]
            + [(None, m.bool(), None, {})])


@pytest.mark.parametrize("name", list(_PL))
def test_registry_losses_patched_vs_verl(name):
    logp, old, adv, m = _inputs()
    isw = torch.rand_like(logp) * 2
    cases = _cases(m, isw)
    original = ca.get_policy_loss_fn(name)
    want = [_run(original, old, logp, adv, mm, mode, _config(name, info, **_PL[name]), w)
            for mode, mm, w, info in cases]
    with fi.patch("verl", ops=[f"policy_loss_{name}"]) as h:
        fn = ca.get_policy_loss_fn(name)
        assert fn.__fastppo_original__ is original
        got = [_run(fn, old, logp, adv, mm, mode, _config(name, info, **_PL[name]), w)
               for mode, mm, w, info in cases]
        assert h.stats.served[f"policy_loss_{name}"] == len(cases) and not h.stats.delegated
    for a, b in zip(want, got):
        _same(a, b)
    if name in ("clip_cov", "dppo_tv"):   # the inputs reach the variant's own branch: some tokens selected / invalid
        assert 0 < want[0][1]["actor/pg_clipfrac"] < 1


def test_clip_cov_draw_depends_on_the_generator_as_verls():
    """Two generator states give two different selections in verl; fastppo follows each."""
    logp, old, adv, m = _inputs()
    cfg = _config("clip_cov", **_PL["clip_cov"])
    fn0 = ca.get_policy_loss_fn("clip_cov")
    want = [_run(fn0, old, logp, adv, m, "token-mean", cfg, None, seed=s) for s in (1, 2)]
    assert not torch.equal(want[0][2], want[1][2])
    with fi.patch("verl", ops=["policy_loss_clip_cov"]):
        got = [_run(ca.get_policy_loss_fn("clip_cov"), old, logp, adv, m, "token-mean", cfg, None, seed=s)
               for s in (1, 2)]
    for a, b in zip(want, got):
        _same(a, b)


@pytest.mark.parametrize("loss_type", ["reinforce", "ppo_clip"])
@pytest.mark.parametrize("rollout_is,rollout_rs", [("token", None), ("sequence", "token_k1"), (None, None)])
def test_bypass_mode_patched_vs_verl(loss_type, rollout_is, rollout_rs):
    from verl.trainer.config.algorithm import RolloutCorrectionConfig

    logp, old, adv, m = _inputs()
    rc = RolloutCorrectionConfig(rollout_is=rollout_is, rollout_is_threshold=2.0, rollout_rs=rollout_rs,
                                 rollout_rs_threshold=None if rollout_rs is None else "0.5_2.0",
                                 loss_type=loss_type)
    cases = [(mode, m, None, _GLOBAL if i % 2 else {}) for i, mode in enumerate(_AGGS)]
    original = ca.get_policy_loss_fn("bypass_mode")
    want = [_run(original, old, logp, adv, mm, mode, _config("bypass_mode", info, rollout_correction=rc), w)
            for mode, mm, w, info in cases]
    with fi.patch("verl", ops=["policy_loss_bypass_mode"]) as h:
        got = [_run(ca.get_policy_loss_fn("bypass_mode"), old, logp, adv, mm, mode,
                    _config("bypass_mode", info, rollout_correction=rc), w) for mode, mm, w, info in cases]
        assert h.stats.served["policy_loss_bypass_mode"] == len(cases) and not h.stats.delegated
    for a, b in zip(want, got):
        _same(a, b)


def test_dro_without_beta_is_verls_error():
    logp, old, adv, m = _inputs()
    with fi.patch("verl", ops=["policy_loss_dro"]) as h:
        with pytest.raises(ValueError, match="dro_beta"):
            ca.get_policy_loss_fn("dro")(old, logp, adv, m, "token-mean", _config("dro"))
        assert h.stats.delegated["policy_loss_dro"] == 1
