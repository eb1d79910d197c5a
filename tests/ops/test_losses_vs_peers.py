"""The policy-loss variants against the peers' own code: verl 0.9's compute_policy_loss_<name>
(imported and called) for every aggregation it honours, TRL 1.16's cispo / sapo / delta losses and
its four vLLM importance-sampling modes (reproduced from trl/trainer/grpo_trainer.py, where they live
inside GRPOTrainer methods; get_high_entropy_mask is called for real with a one-process accelerator)."""

import math
import types

import pytest
import torch
import verl.trainer.ppo.core_algos as verl_algos
from trl.trainer.grpo_trainer import GRPOTrainer
from verl.workers.config import ActorConfig

import fastppo
from fastppo.modes import AGG_MODES

B, T = 5, 13
CLIP_LOW, CLIP_HIGH = 0.2, 0.28


def _inputs(seed=0, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(B, T, generator=g) * 0.5 - 2
    old = logp + torch.randn(B, T, generator=g) * 0.3
    adv = torch.randn(B, T, generator=g)
    isw = torch.rand(B, T, generator=g) + 0.5
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, 0] = True
    if empty_row:
        mask[2] = False
    return logp, old, adv, isw, mask


def _verl_config(**kw):
    return ActorConfig(strategy="fsdp", clip_ratio=CLIP_LOW, clip_ratio_low=CLIP_LOW, clip_ratio_high=CLIP_HIGH,
                       ppo_micro_batch_size_per_gpu=1, rollout_n=1, **kw)


# (verl loss_mode, fastppo policy_loss, extra fastppo kwargs, aggregations verl honours)
VERL = [
    ("vanilla", "ppo", dict(dual_clip=3.0), AGG_MODES),
    ("gspo", "gspo_token", {}, AGG_MODES),
    ("cispo", "cispo", {}, AGG_MODES),
    ("gpg", "gpg", {}, AGG_MODES),
    ("sapo", "sapo", {}, ("seq-mean-token-mean",)),          # verl's sapo always uses seq-mean-token-mean
    ("geo_mean", "gmpo", dict(num_seqs=B), ("seq-mean-token-mean",)),   # verl: torch.mean over all B rows
]
CASES = [(v, f, kw, agg, isw) for v, f, kw, aggs in VERL for agg in aggs for isw in (False, True)]


@pytest.mark.parametrize("verl_mode,policy_loss,kw,agg,with_isw", CASES,
                         ids=[f"{c[0]}-{c[3]}-{'isw' if c[4] else 'plain'}" for c in CASES])
def test_matches_verl(verl_mode, policy_loss, kw, agg, with_isw):
    logp, old, adv, isw, mask = _inputs()
    isw = isw if with_isw else None
    x = logp.clone().requires_grad_()
    loss, stats = fastppo.ppo_policy_loss(x, old, adv, mask, policy_loss=policy_loss, clip_low=CLIP_LOW,
                                          clip_high=CLIP_HIGH, agg=agg, rollout_is_weights=isw, **kw)
    loss.backward()
    xv = logp.clone().requires_grad_()
    fn = verl_algos.get_policy_loss_fn(verl_mode)
    vloss, metrics = fn(old, xv, adv, mask.float(), agg, _verl_config(), isw)
    vloss.backward()
    torch.testing.assert_close(loss, vloss, rtol=2e-6, atol=2e-7)
    torch.testing.assert_close(x.grad, xv.grad, rtol=1e-5, atol=1e-8)
    if "actor/pg_clipfrac" in metrics and verl_mode != "geo_mean":
        assert stats["clipfrac"].item() == pytest.approx(metrics["actor/pg_clipfrac"], abs=1e-6)


def test_verl_value_loss_gradient_inside_the_clip_range():
    """verl's compute_value_loss (torch.max of the two squared errors) and fastppo's value_loss agree on
    values inside the clip range, where rounding makes the branches tie or nearly tie."""
    g = torch.Generator().manual_seed(5)
    old = torch.randn(4, 257, generator=g) * 50
    v = old + (torch.rand(4, 257, generator=g) - 0.5) * 0.3
    ret = v + torch.randn(4, 257, generator=g) * 1e-3
    mask = torch.ones(4, 257, dtype=torch.bool)
    for agg in AGG_MODES:
        x = v.clone().requires_grad_()
        loss, stats = fastppo.value_loss(x, old, ret, mask, clip=0.2, agg=agg)
        loss.backward()
        xv = v.clone().requires_grad_()
        vloss, clipfrac = verl_algos.compute_value_loss(xv, ret, old, mask.float(), 0.2, agg)
        vloss.backward()
        torch.testing.assert_close(loss, vloss, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(x.grad, xv.grad, rtol=1e-4, atol=1e-9)
        assert stats["vf_clipfrac"].item() == pytest.approx(clipfrac.item(), abs=1e-6)


# ----------------------------------------------------------------------------- TRL
def _trl_policy(per_token_logps, old_per_token_logps, advantages, loss_type, epsilon_low, epsilon_high,
                delta=None, tau_pos=1.0, tau_neg=1.05):
    """TRL 1.16 GRPOTrainer._compute_loss, token-level importance sampling (trl/trainer/grpo_trainer.py)."""
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    if loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
        return -clamped_ratios * advantages * per_token_logps
    if loss_type == "sapo":
        temperatures = torch.where(advantages > 0, tau_pos, tau_neg)
        soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
        return -soft_coef_1 * advantages
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    return -torch.min(coef_1 * advantages, coef_2 * advantages)


TRL_CASES = [
    # TRL loss_type with its kwargs -> fastppo arguments
    (dict(loss_type="grpo", epsilon_low=0.2, epsilon_high=0.28, delta=1.5),
     dict(policy_loss="ppo", clip_low=0.2, clip_high=0.28, ratio_max=1.5)),
    (dict(loss_type="cispo", epsilon_low=0.2, epsilon_high=5.0),
     dict(policy_loss="cispo", clip_low=1.0, clip_high=4.0)),     # TRL caps the ratio at epsilon_high only
    (dict(loss_type="sapo", epsilon_low=0.2, epsilon_high=0.2, tau_pos=1.0, tau_neg=1.05),
     dict(policy_loss="sapo", sapo_tau_pos=1.0, sapo_tau_neg=1.05)),
]


@pytest.mark.parametrize("trl_kw,ours", TRL_CASES, ids=[c[0]["loss_type"] for c in TRL_CASES])
def test_matches_trl_losses(trl_kw, ours):
    logp, old, adv, _, mask = _inputs(seed=3, empty_row=False)
    old = logp + (old - logp) * 3           # ratios well outside the clip ranges and the delta cap
    x = logp.clone().requires_grad_()
    loss, _ = fastppo.ppo_policy_loss(x, old, adv, mask, agg="seq-mean-token-mean", **ours)
    loss.backward()
    xt = logp.clone().requires_grad_()
    per_token = _trl_policy(xt, old, adv, **trl_kw)
    m = mask.float()
    tloss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()   # TRL loss_type grpo/sapo normaliser
    tloss.backward()
    torch.testing.assert_close(loss, tloss, rtol=2e-6, atol=2e-7)
    torch.testing.assert_close(x.grad, xt.grad, rtol=1e-5, atol=1e-8)


def _trl_is_ratio(old, sampling, mask, mode, clip_min, clip_max):
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, vLLM importance-sampling correction."""
    per_token_logps_diff = (old - sampling) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    sequence_level_is = mode in ["sequence_mask", "sequence_truncate"]
    logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True) if sequence_level_is else per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        min_val = clip_min if clip_min is not None else -math.inf
        max_val = clip_max if clip_max is not None else math.inf
        ratio = ratio.masked_fill((ratio < min_val) | (ratio > max_val), value=0.0)
    return ratio


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
@pytest.mark.parametrize("clip_min", [None, 0.5])
def test_rollout_is_weights_match_trl_modes(level, mode, clip_min):
    g = torch.Generator().manual_seed(7)
    old = torch.randn(B, T, generator=g) * 0.5 - 2
    sampling = old + torch.randn(B, T, generator=g) * (0.6 if level == "token" else 0.3)
    sampling[0, 3] = float("nan")           # vLLM had no log-prob: ratio 1
    _, _, _, _, mask = _inputs()
    w, stats = fastppo.rollout_is_weights(old, sampling, mask, level=level, mode=mode, max=2.0, min=clip_min)
    want = _trl_is_ratio(old, sampling, mask.float(), f"{level}_{mode}", clip_min, 2.0).expand(B, T)
    torch.testing.assert_close(w[mask], want[mask], rtol=1e-6, atol=1e-7)
    assert (w[~mask] == 0).all()
    valid = mask if level == "token" else mask.any(-1, keepdim=True).expand(B, 1)
    vals = want if level == "token" else want[:, :1]
    torch.testing.assert_close(stats["is_mean"], vals[valid].mean(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats["is_min"], vals[valid].min())
    torch.testing.assert_close(stats["is_max"], vals[valid].max())
    raw = _trl_is_ratio(old, sampling, mask.float(), f"{level}_truncate", None, math.inf)
    raw = raw if level == "token" else raw[:, :1]
    outside = (raw > 2.0) | (raw < (clip_min or 0.0))
    frac = stats["is_clipped_frac" if mode == "truncate" else "is_masked_frac"]
    torch.testing.assert_close(frac, outside[valid].float().mean())


def test_entropy_quantile_matches_trl_high_entropy_mask():
    """TRL's own GRPOTrainer.get_high_entropy_mask (one process: pad/gather are identities) selects the
    tokens that fastppo's entropy_quantile keeps."""
    g = torch.Generator().manual_seed(11)
    logp, old, adv, _, mask = _inputs(seed=4)
    ent = torch.rand(B, T, generator=g) * 3
    accel = types.SimpleNamespace(pad_across_processes=lambda x, dim, pad_index: x, gather=lambda x: x)
    host = types.SimpleNamespace(accelerator=accel)
    for rho in (0.2, 0.5, 0.8):
        keep = GRPOTrainer.get_high_entropy_mask(host, ent, mask.long(), 1 - rho)
        x = logp.clone().requires_grad_()
        fastppo.ppo_policy_loss(x, old, adv, mask, policy_loss="gpg", agg="token-sum", entropy=ent,
                                entropy_quantile=rho)[0].backward()
        assert torch.equal(x.grad != 0, keep & (adv != 0))
