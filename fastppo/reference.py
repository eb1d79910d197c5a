"""Pure-PyTorch reference of every public function: the documented math (docs/design.md §4),
the oracle of the tests and benchmarks. No op runs it: the PyTorch backend is each family's twin
(fastppo/<family>_torch.py, chosen by fastppo.dispatch), an independent closed form checked against this.

Comments give the memory each eager step reads and writes for N tokens, vocabulary V, logits in
dtype of b bytes (fp32 = 4). They are what the fused kernels avoid.
"""

from __future__ import annotations

import math

import torch

from .modes import AGG_MODES, KL_KINDS, POLICY_LOSSES  # noqa: F401  (AGG_MODES, KL_KINDS re-exported)
from .outputs import PPOLossOutput


def _f(x):
    """Upcast to fp32 (fp64 stays fp64, so the reference can serve as a float64 oracle)."""
    return x.double() if x.dtype == torch.float64 else x.float()


# ----------------------------------------------------------------------------- log-probs
def token_logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False,
                   final_logit_softcapping=None, logit_scale=1.0):
    """logp_t = z'_y - logsumexp(z'), H_t = lse - sum_i p_i z'_i = -sum_i p_i log p_i (computed from
    log_softmax: no cancellation, exact in float64) with z' = softcap(scale * z) / tau,
    softcap(x) = c tanh(x / c) (TRL 1.16's order: scale, softcap, temperature) (fp32; fp64 for fp64)."""
    z = _f(logits)
    if logit_scale != 1.0:
        z = z * logit_scale
    if final_logit_softcapping is not None:
        z = final_logit_softcapping * torch.tanh(z / final_logit_softcapping)
    z = z / temperature                                  # read N*V*b, write N*V*4
    logsm = torch.log_softmax(z, dim=-1)                 # read + write N*V*4
    ignored = labels == ignore_index
    safe = labels.masked_fill(ignored, 0).long()
    logp = logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1).masked_fill(ignored, 0.0)
    if not return_entropy:
        return logp
    p = logsm.exp()                                      # read + write N*V*4
    plogp = p * logsm.masked_fill(p == 0, 0.0)          # read 2, write 1 x N*V*4 (0 log 0 = 0)
    ent = (-plogp.sum(-1)).masked_fill(ignored, 0.0)
    return logp, ent


def linear_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100,
                    return_entropy=False, final_logit_softcapping=None, logit_scale=1.0):
    """token_logprobs of the materialised logits softcap(logit_scale * (hidden @ weight.T + bias)),
    softcap(x) = c tanh(x / c) with c = final_logit_softcapping (identity when None)."""
    dot = torch.promote_types(hidden.dtype, weight.dtype)
    logits = hidden.to(dot) @ weight.to(dot).t()         # write N*V*b
    if bias is not None:
        logits = logits + bias
    logits = logits * logit_scale
    if final_logit_softcapping is not None:
        logits = final_logit_softcapping * torch.tanh(logits / final_logit_softcapping)
    return token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index,
                          return_entropy=return_entropy)


def full_kl(logits, ref_logits, *, temperature=1.0):
    """KL(pi || ref) = sum_i p_i (log p_i - log q_i) per token, over the whole vocabulary."""
    logp = torch.log_softmax(_f(logits) / temperature, -1)
    logq = torch.log_softmax(_f(ref_logits) / temperature, -1)
    p = logp.exp()
    term = p * (logp - logq).masked_fill(p == 0, 0.0)
    return term.sum(-1)


# ----------------------------------------------------------------------------- per-token terms
def kl_penalty(logprobs, ref_logprobs, kind="k3"):
    """d = logp - ref: k1 = d, abs = |d|, k2/mse = d^2/2, k3 = exp(-d) - 1 + d,
    low_var_kl = clamp(k3(clamp(d, -20, 20)), -10, 10)."""
    d = _f(logprobs) - _f(ref_logprobs)
    if kind == "k1":
        return d
    if kind == "abs":
        return d.abs()
    if kind in ("k2", "mse"):
        return 0.5 * d.square()
    if kind == "k3":
        return torch.exp(-d) - 1 + d
    if kind == "low_var_kl":
        d = d.clamp(-20, 20)
        return (torch.exp(-d) - 1 + d).clamp(-10, 10)
    raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")


def aggregate(x, mask, agg="token-mean", *, num_tokens=None, num_seqs=None, horizon=None):
    """Reduce a per-token [B, T] matrix with mask m (docs/design.md §4). Sequences with no
    unmasked token are excluded. Global counts (num_tokens, num_seqs, horizon) replace the local
    ones so that micro-batch losses add up to the whole-batch loss."""
    x = _f(x)
    m = _f(mask)
    if x.dim() == 1:
        x, m = x.unsqueeze(0), m.unsqueeze(0)
    per_seq_tokens = m.sum(-1)
    total = m.sum() if num_tokens is None else torch.tensor(float(num_tokens))
    seqs = (per_seq_tokens > 0).sum().float() if num_seqs is None else torch.tensor(float(num_seqs))
    t_len = x.shape[-1] if horizon is None else horizon
    mx = torch.where(m > 0, x, torch.zeros_like(x))   # masked positions may hold inf/nan
    masked_sum = mx.sum()
    if agg == "token-mean":
        return masked_sum / total.clamp_min(1)
    if agg == "seq-mean-token-mean":
        per_seq = mx.sum(-1) / per_seq_tokens.clamp_min(1)
        return per_seq.sum() / seqs.clamp_min(1)
    if agg == "seq-mean-token-sum":
        return masked_sum / seqs.clamp_min(1)
    if agg == "seq-mean-token-sum-norm":
        return masked_sum / (seqs.clamp_min(1) * t_len)
    if agg == "token-sum":
        return masked_sum
    raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


def _keep(x, m):
    """x where the mask is 1, else 0: masked positions (which may hold NaN/inf) then contribute nothing
    to the value or the gradient (a select, never a multiply)."""
    return torch.where(m > 0, x, torch.zeros_like(x))


def _masked_mean(x, m):
    return torch.where(m > 0, x, torch.zeros_like(x)).sum() / m.sum().clamp_min(1)


def _masked_max(x, m):
    """Max of a positive x over masked entries (0 when there are none)."""
    return torch.where(m > 0, x, torch.zeros_like(x)).amax() if x.numel() else x.new_zeros(())


def _expand_advantages(advantages, like):
    adv = _f(advantages)
    if adv.dim() == like.dim() - 1:
        adv = adv.unsqueeze(-1)
    return adv.expand_as(like)


def _seq_mean(x, m, den):
    return _keep(x, m).sum(-1) / den


def _cov_selection(logp, old, adv, m, policy_loss, clip_low, clip_high, cov_ratio, cov_lb, cov_ub):
    """verl 0.9.1's clip_cov / kl_cov token selection, as its code writes it (nonzero + torch.randperm on the
    default CPU generator; torch.topk), on [B, T] float64 values (mask-0 positions already zeroed)."""
    sel = torch.zeros_like(m, dtype=torch.bool)
    valid = m > 0
    if policy_loss == "kl_cov":
        a, x = adv[valid], logp[valid]
        if a.numel():
            cov = (a - a.mean()) * (x - x.mean())
            top = torch.topk(cov, max(1, int(cov.numel() * cov_ratio)), largest=True).indices
            sel.view(-1)[torch.nonzero(valid.reshape(-1), as_tuple=True)[0][top]] = True
        return sel
    n = m.sum()
    cov = (adv - (adv * m).sum() / (n + 1e-8)) * (logp - (logp * m).sum() / (n + 1e-8))
    ratio = torch.exp(logp - old)
    by_clip = (-adv * ratio.clamp(1 - clip_low, 1 + clip_high) > -adv * ratio) & valid
    cov[~valid] = -math.inf
    cov[by_clip] = -math.inf
    idx = torch.nonzero((cov < cov_ub) & (cov > cov_lb) & valid)
    if len(idx):
        idx = idx[torch.randperm(len(idx))[: min(max(int(cov_ratio * n.item()), 1), len(idx))]]
        sel[idx[:, 0], idx[:, 1]] = True
    return sel


def policy_loss_matrix(logprobs, old_logprobs, advantages, mask, *, policy_loss="ppo", clip_low=0.2,
                       clip_high=None, dual_clip=None, ratio_max=None, sapo_tau_pos=1.0, sapo_tau_neg=1.05,
                       rollout_is_weights=None, dro_beta=None, cov_ratio=0.0002, cov_lb=1.0, cov_ub=5.0,
                       kl_cov_coef=0.1, **variant):
    """Per-token policy loss L [B, T] of each variant (fastppo.losses docstring) and its per-token
    (clipped, lower, ratio) for the stats. Follows verl 0.9's compute_policy_loss_<name>: vanilla
    (ppo; ratio_max is TRL's two-sided `delta`), gspo (our gspo_token), cispo, sapo, geo_mean (gmpo),
    gpg; `gspo` is the paper's sequence-level ratio with the gradient through the mean."""
    clip_high = clip_low if clip_high is None else clip_high
    m = _f(mask)
    if logprobs.dim() == 1:
        logprobs, old_logprobs, m = logprobs[None], old_logprobs[None], m[None]
        advantages = advantages[None] if advantages.dim() == 1 else advantages
        rollout_is_weights = None if rollout_is_weights is None else rollout_is_weights[None]
    logp = _keep(_f(logprobs), m)
    adv = _keep(_expand_advantages(advantages, logp), m)
    isw = None if rollout_is_weights is None else _keep(_f(rollout_is_weights), m)
    d = logp - _keep(_f(old_logprobs), m)
    ratio = torch.exp(d.clamp(-20, 20))
    zeros = torch.zeros_like(m)
    lower = zeros.bool()
    n = m.sum(-1)
    if policy_loss == "ppo":
        r1 = ratio if ratio_max is None else ratio.clamp(max=ratio_max)
        l1 = -adv * r1
        l2 = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
        loss = torch.maximum(l1, l2)
        clipped = l2 > l1
        if dual_clip is not None:
            l3 = -adv * dual_clip
            lower = (adv < 0) & (l3 < loss)
            loss = torch.where(adv < 0, torch.minimum(loss, l3), loss)
    elif policy_loss in ("gspo", "gspo_token"):
        lr = _seq_mean(d, m, n.clamp_min(1))[:, None]
        if policy_loss == "gspo_token":
            log_s = logp - logp.detach() + lr.detach()
        else:
            log_s = lr.expand_as(logp)
        ratio = torch.exp(log_s.clamp(max=10.0))
        l1 = -adv * ratio
        l2 = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
        loss = torch.maximum(l1, l2)
        clipped = l2 > l1
    elif policy_loss == "cispo":
        c = ratio.clamp(1 - clip_low, 1 + clip_high).detach()
        loss = -c * adv * logp
        clipped = ratio != c
    elif policy_loss == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, sapo_tau_pos), torch.full_like(adv, sapo_tau_neg))
        loss = -torch.sigmoid(tau * (ratio - 1)) * (4 / tau) * adv
        clipped = zeros.bool()
    elif policy_loss == "gmpo":
        sgn = torch.sign(adv)
        dc = d.clamp(-clip_low, clip_high)
        dmin = sgn * torch.minimum(sgn * d, sgn * dc)
        den = n + 1e-8
        s = torch.exp(_seq_mean(dmin, m, den))
        lb = -_seq_mean(adv, m, den) * s
        if isw is not None:
            lb = lb * torch.exp(_seq_mean(torch.log(isw + 1e-10), m, den))
        loss = lb[:, None].expand_as(logp)
        ratio = s[:, None].expand_as(logp)
        clip_d = d != dc
        clipped, lower = clip_d & (adv > 0), clip_d & (adv < 0)
    elif policy_loss == "gpg":
        loss = -logp * adv
        clipped = zeros.bool()
    elif policy_loss in ("dppo_tv", "dppo_kl"):   # verl compute_policy_loss_dppo_tv / _kl, arXiv 2602.04879
        w = (ratio if ratio_max is None else ratio.clamp(max=ratio_max)).detach()
        p, q = torch.exp(logp), torch.exp(_keep(_f(old_logprobs), m))
        if policy_loss == "dppo_tv":
            v_pos, v_neg = (p - q) <= clip_high, (p - q) >= -clip_low
        else:
            o = _keep(_f(old_logprobs), m)
            bkl = q * (o - logp) + (1 - q) * torch.log((1.0 - q + 1e-8) / (1.0 - p + 1e-8))
            v_pos, v_neg = (bkl <= clip_high) | (p <= q), (bkl <= clip_low) | (p >= q)
        valid = torch.where(adv > 0, v_pos, v_neg).detach()
        loss = -adv * w * logp * valid.double()
        clipped = ~valid
        if ratio_max is not None:
            lower = (ratio > ratio_max) & valid
    elif policy_loss == "vespo":   # TRL 1.16 GRPOTrainer.get_gamma_weights and its vespo loss
        lower_clamp = math.log(1e-8)
        seq_log_ratio = torch.sum(torch.clamp(d, -20.0, 20.0) * m, dim=-1, keepdim=True)
        if isw is not None:
            seq_log_ratio = seq_log_ratio + torch.sum(torch.clamp(torch.log(isw), lower_clamp, 20.0) * m, -1, True)
        log_w = torch.clamp(seq_log_ratio, lower_clamp, 20.0)
        nonneg = adv >= 0
        k = torch.where(nonneg, variant.get("vespo_k_pos", 2.0), variant.get("vespo_k_neg", 3.0))
        lam = torch.where(nonneg, variant.get("vespo_lambda_pos", 3.0), variant.get("vespo_lambda_neg", 2.0))
        lam = lam.clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        loss = -phi.detach() * adv * logp
        clipped = zeros.bool()
    elif policy_loss == "dro":   # verl compute_policy_loss_dro
        loss = -(logp * adv - 0.5 * dro_beta * d.square())
        clipped = zeros.bool()
    elif policy_loss in ("clip_cov", "kl_cov"):   # verl compute_policy_loss_clip_cov / _kl_cov, arXiv 2505.22617
        ratio = torch.exp(d)
        sel = _cov_selection(logp.detach(), (logp - d).detach(), adv, m, policy_loss, clip_low, clip_high, cov_ratio,
                             cov_lb, cov_ub)
        if policy_loss == "kl_cov":
            loss = torch.where(sel, -adv * ratio + kl_cov_coef * d.abs(), -adv * ratio)
        else:
            loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high)) * (~sel).double()
        clipped = sel
    else:
        raise ValueError(f"policy_loss must be one of {POLICY_LOSSES}, got {policy_loss!r}")
    if isw is not None and policy_loss not in ("gmpo", "vespo"):   # vespo: the weights enter phi only
        loss = loss * isw
    return loss, clipped, lower, ratio, d


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None,
                    dual_clip=None, agg="token-mean", num_tokens=None, num_seqs=None, horizon=None,
                    policy_loss="ppo", ratio_max=None, sapo_tau_pos=1.0, sapo_tau_neg=1.05,
                    rollout_is_weights=None, entropy_quantile=None, entropy=None, off_policy_mask_threshold=None,
                    off_policy_logprobs=None, **variant):
    """agg(L) of the policy-loss variant (policy_loss_matrix); entropy_quantile rho keeps the valid
    tokens with entropy >= the (1 - rho) quantile of the valid entropies (torch.quantile, TRL's
    get_high_entropy_mask); off_policy_logprobs: the off-policy mask's behaviour log-probs (TRL's
    sampling_per_token_logps; None: old_logprobs). Returns (agg(L), stats)."""
    loss, clipped, lower, ratio, d = policy_loss_matrix(
        logprobs, old_logprobs, advantages, mask, policy_loss=policy_loss, clip_low=clip_low, clip_high=clip_high,
        dual_clip=dual_clip, ratio_max=ratio_max, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg,
        rollout_is_weights=rollout_is_weights, **variant)
    m = _f(mask).reshape(loss.shape)
    keep = m
    if entropy_quantile is not None:
        h = _f(entropy).reshape(loss.shape)
        valid = h[m > 0]
        if valid.numel():
            thr = torch.quantile(valid, 1 - entropy_quantile)
            keep = m * (h >= thr).to(m.dtype)
        else:
            keep = torch.zeros_like(m)
    if off_policy_mask_threshold is not None:   # TRL 1.16 get_off_policy_mask (sampling log-probs: old by default)
        behaviour = old_logprobs if off_policy_logprobs is None else off_policy_logprobs
        lp2, old2, m2 = (z.reshape(loss.shape) for z in (_f(logprobs), _f(behaviour), m))
        adv2 = _expand_advantages(advantages.reshape(loss.shape[0], -1) if advantages.dim() == 2 or
                                  loss.shape[0] == 1 else advantages, lp2)
        kl_div = torch.nan_to_num(old2 - lp2.detach(), nan=0.0)
        avg = _keep(kl_div, m2).sum(1, keepdim=True) / m2.sum(1, keepdim=True).clamp(min=1.0)
        keep = keep * ((adv2 >= 0) | (avg <= off_policy_mask_threshold)).to(m.dtype)
    total = aggregate(_keep(loss, keep), m, agg, num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon)
    stats = {
        "clipfrac": _masked_mean(clipped.to(m.dtype), m).detach(),
        "clipfrac_lower": _masked_mean(lower.to(m.dtype), m).detach(),
        "approx_kl": _masked_mean(0.5 * d.square(), m).detach(),
        "ratio_mean": _masked_mean(ratio, m).detach(),
        "ratio_max": _masked_max(ratio, m).detach(),
    }
    if entropy_quantile is not None:
        stats["entropy_kept_frac"] = _masked_mean(keep, m).detach()
    return total, stats


def rollout_is_weights(old_logprobs, rollout_logprobs, mask, *, level="token", mode="truncate", max=2.0,
                       min=None):
    """TRL 1.16 GRPOTrainer's vLLM importance-sampling correction (`_generate_and_score_completions`):
    diff = nan_to_num((old - rollout) * mask, nan=0); sequence level: diff summed over the sequence;
    ratio = exp(diff); truncate: clamp(ratio, min, max); mask: ratio where min <= ratio <= max, else 0.
    Weights [B, T] (0 at mask-0 positions)."""
    m = _f(mask)
    diff = torch.nan_to_num((_f(old_logprobs) - _f(rollout_logprobs)) * m, nan=0.0)
    if level == "sequence":
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode == "truncate":
        w = torch.clamp(ratio, min=min, max=max)
    else:
        lo = -float("inf") if min is None else min
        hi = float("inf") if max is None else max
        w = ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)
    return _keep(w.expand_as(m), m)


def value_loss(values, old_values, returns, mask, *, clip=None, agg="token-mean", num_tokens=None,
               num_seqs=None, horizon=None):
    """L = 0.5 max((v - R)^2, (v_c - R)^2), v_c = old + clamp(v - old, -clip, clip); 0.5 (v - R)^2
    without clip. Returns (agg(L), {"vf_clipfrac"})."""
    m = _f(mask)
    v = _keep(_f(values), m)
    r = _keep(_f(returns), m)
    l1 = (v - r).square()
    if clip is None:
        loss, clipped = 0.5 * l1, torch.zeros_like(m)
    else:
        old = _keep(_f(old_values), m)
        vc = old + (v - old).clamp(-clip, clip)
        l2 = (vc - r).square()
        loss, clipped = 0.5 * torch.maximum(l1, l2), (l2 > l1).float()
    total = aggregate(loss, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon)
    return total, {"vf_clipfrac": _masked_mean(clipped, m).detach()}


POLICY_KWARGS = ("policy_loss", "ratio_max", "sapo_tau_pos", "sapo_tau_neg", "rollout_is_weights",
                 "entropy_quantile", "dro_beta", "cov_ratio", "cov_lb", "cov_ub", "kl_cov_coef",
                 "off_policy_mask_threshold", "off_policy_logprobs", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
                 "vespo_lambda_neg")


def fused_ppo_loss(logits, labels, old_logprobs, advantages, mask, *, ref_logprobs=None, kl_coef=0.0,
                   kl_kind="k3", entropy_coef=0.0, clip_low=0.2, clip_high=None, dual_clip=None,
                   temperature=1.0, agg="token-mean", ignore_index=-100, return_entropy=False,
                   num_tokens=None, num_seqs=None, horizon=None, final_logit_softcapping=None, logit_scale=1.0,
                   **policy):
    """agg(L) + kl_coef * agg(KL) - entropy_coef * agg(H), composed from the pieces above
    (`policy`: the POLICY_KWARGS of ppo_policy_loss). Mask-0 rows are treated as ignore_index
    (logprobs and entropy 0 there, no gradient)."""
    want_ent = return_entropy or entropy_coef != 0 or policy.get("entropy_quantile") is not None
    labels = torch.where(_f(mask) != 0, labels, ignore_index)
    out = token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index,
                         return_entropy=want_ent, final_logit_softcapping=final_logit_softcapping,
                         logit_scale=logit_scale)
    logp, ent = out if want_ent else (out, None)
    return compose_ppo_loss(logp, ent, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs,
                            kl_coef=kl_coef, kl_kind=kl_kind, entropy_coef=entropy_coef, clip_low=clip_low,
                            clip_high=clip_high, dual_clip=dual_clip, agg=agg, num_tokens=num_tokens,
                            num_seqs=num_seqs, horizon=horizon, **policy)


def compose_ppo_loss(logp, ent, old_logprobs, advantages, mask, *, ref_logprobs, kl_coef, kl_kind,
                     entropy_coef, clip_low, clip_high, dual_clip, agg, num_tokens, num_seqs, horizon, **policy):
    """The fused loss from per-token log-probs (and entropy): the unfused composition. kl_bias_correction
    (TRL's use_bias_correction_kl, token level): the KL term is KL exp(logp - old), differentiated through
    both factors; the reported kl stays the plain estimator. entropy_agg="token-mean": the entropy term is
    sum(e H) / max(sum e, 1), e = mask times the entropy_quantile selection (TRL's entropy bonus)."""
    bias_corrected = policy.pop("kl_bias_correction", False)
    bias_level = policy.pop("kl_bias_correction_level", "token")
    entropy_agg = policy.pop("entropy_agg", None)
    unknown = set(policy) - set(POLICY_KWARGS)
    if unknown:
        raise TypeError(f"unknown policy options {sorted(unknown)}")
    counts = dict(num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon)
    loss, stats = ppo_policy_loss(logp, old_logprobs, advantages, mask, clip_low=clip_low,
                                  clip_high=clip_high, dual_clip=dual_clip, agg=agg, entropy=ent, **counts, **policy)
    stats["pg_loss"] = loss.detach()
    m = _f(mask)
    kl = None
    if ref_logprobs is not None:
        kl = kl_penalty(logp.detach(), ref_logprobs, kl_kind)
        kl_kept = kl_penalty(_keep(_f(logp), m), _keep(_f(ref_logprobs), m), kl_kind)
        if bias_corrected:   # TRL's coef_1: the token's ratio, or its sequence's exp(mean log-ratio) (unclamped)
            d = _keep(_f(logp), m) - _keep(_f(old_logprobs), m)
            if bias_level == "sequence":
                d = (d.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)).expand_as(d)
            kl_kept = kl_kept * torch.exp(d)
        loss = loss + kl_coef * aggregate(kl_kept, mask, agg, **counts)
        stats["kl"] = _masked_mean(kl, m).detach()
    if ent is not None and entropy_agg == "token-mean":   # TRL 1.16's bonus: a token mean over mask * entropy_mask
        h, q = _f(ent).reshape(m.shape), policy.get("entropy_quantile")
        e = m if q is None or not (m > 0).any() else m * (h >= torch.quantile(h[m > 0], 1 - q)).to(m.dtype)
        loss = loss - entropy_coef * _keep(h, e).sum() / e.sum().clamp(min=1.0)
    elif ent is not None:
        loss = loss - entropy_coef * aggregate(_keep(_f(ent), m), mask, agg, **counts)
        stats["entropy"] = _masked_mean(ent, m).detach()
    return PPOLossOutput(loss=loss, logprobs=logp.detach(), kl=None if kl is None else kl.detach(),
                         entropy=None if ent is None else ent.detach(), stats=stats)


# ----------------------------------------------------------------------------- advantages
def gae(rewards, values, mask, *, gamma=1.0, lam=1.0):
    """The plain reverse loop of docs/design.md §4.3: masked positions are skipped (carry passes through)."""
    r, v, m = rewards.double(), values.double(), mask.bool()
    B, T = r.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        v_next, g = 0.0, 0.0
        for t in reversed(range(T)):
            if not m[b, t]:
                continue
            delta = r[b, t].item() + gamma * v_next - v[b, t].item()
            g = delta + gamma * lam * g
            v_next = v[b, t].item()
            adv[b, t] = g
    ret = torch.where(m, adv + v, torch.zeros_like(adv))
    out = torch.float64 if torch.float64 in (rewards.dtype, values.dtype) else torch.float32
    return adv.to(rewards.device, out), ret.to(rewards.device, out)


def masked_whiten(x, mask, *, shift_mean=True):
    """(x - mean) / sqrt(var + 1e-8) over masked entries (unbiased var); 0 where mask is 0."""
    out_dtype = x.dtype if x.dtype == torch.float64 else torch.float32
    m = mask != 0
    x = torch.where(m, x.double(), 0.0)                  # float64: squares of ~1e20 do not overflow
    n = m.sum()
    mean = x.sum() / n
    var = torch.where(m, x - mean, 0.0).square().sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, 0.0).to(out_dtype)


def group_advantages(scores, group_size, *, kind="grpo", norm_by_std=True, eps=1e-6):
    """Per group of `group_size` consecutive scores: grpo (R - mean)/(std + eps) (unbiased std,
    or R - mean without norm_by_std); rloo R - mean of the other G - 1. A group of one gets 0."""
    s = scores.double().reshape(-1)
    out = torch.zeros_like(s)
    for start in range(0, s.numel(), group_size):
        g = s[start:start + group_size]
        if g.numel() == 1:
            continue
        if kind == "grpo":
            a = g - g.mean()
            if norm_by_std:
                a = a / (g.std() + eps)
        elif kind == "rloo":
            a = g - (g.sum() - g) / (g.numel() - 1)
        else:
            raise ValueError(f"kind must be 'grpo' or 'rloo', got {kind!r}")
        out[start:start + group_size] = a
    return out.to(scores.dtype if scores.dtype == torch.float64 else torch.float32)


def kl_shaped_rewards(scores, kl, mask, *, kl_coef):
    """-kl_coef * kl on every token (masked), plus the sequence score on its last mask-1 token."""
    m = mask.float()
    out = -kl_coef * kl.float() * m
    for b in range(m.shape[0]):
        idx = torch.nonzero(m[b]).flatten()
        if idx.numel():
            out[b, idx[-1]] += scores[b].float()
    return out
