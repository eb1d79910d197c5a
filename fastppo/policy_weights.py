"""The policy losses' per-token selections and weights that need more than the token itself, computed with
torch ops on the device from detached values before the aggregation launches (both backends share them):
clip_cov / kl_cov's batch-global covariance selection, TRL's off-policy sequence mask and VESPO's gamma
weight (per sequence); and after it, the entropy term with its own token mean (entropy_agg).
fastppo.losses.loss_terms_from_logprobs calls them; formulas in each docstring."""

from __future__ import annotations

import math

import torch

from .kernels.loss_layout import STATS, AggResult
from .kl_torch import kl_terms
from .losses_torch import agg_weights
from .options import LossOptions
from .packed import Segments, per_token


def cov_selection(logp, old, adv, mask, opts: LossOptions, cu_seqlens=None) -> torch.Tensor:
    """clip_cov / kl_cov's batch-global token selection (bool, the mask's shape), verl 0.9.1's rule, from
    cov_t = (A_t - mean(A)) (logp_t - mean(logp)) over the valid tokens (N of them):
      kl_cov:   the k = max(1, floor(N cov_ratio)) valid tokens of largest cov (none when N = 0); verl's
                torch.topk, here a stable sort on the device (no host sync; ties, which topk leaves
                unspecified, go to the earlier token);
      clip_cov: the candidates are the valid tokens with cov_lb < cov < cov_ub that PPO's clip leaves alone
                (-A clamp(r) <= -A r, r = exp(logp - old)), means over N + 1e-8 as verl's masked_mean;
                when more than k = max(1, int(cov_ratio N)) of them, verl draws k at random with
                torch.randperm on the default CPU generator, and so does this, the same draw on the same
                candidates in the same (row-major) order: the generator state after the call is verl's. That
                draw needs N and the candidate count on the host (2 syncs, as verl's .item() / nonzero).
    Computed in float32 (float64 for float64 inputs) from detached values."""
    acc = torch.float64 if logp.dtype == torch.float64 else torch.float32
    m = (mask != 0).reshape(-1)
    x, o = logp.detach().to(acc).reshape(-1), old.detach().to(acc).reshape(-1)
    if cu_seqlens is not None:
        a = per_token(adv.detach(), cu_seqlens.long(), m.shape[0])
    else:
        a = adv.detach()[:, None].expand(mask.shape) if adv.dim() == 1 and mask.dim() == 2 else adv.detach()
    a = a.to(acc).reshape(-1)
    zero = torch.zeros_like(x)
    n = m.to(acc).sum()
    sel = torch.zeros_like(m)
    if opts.policy_loss == "kl_cov":
        den = n.clamp_min(1)
        cov = (a - torch.where(m, a, zero).sum() / den) * (x - torch.where(m, x, zero).sum() / den)
        order = torch.sort(torch.where(m, cov, torch.full_like(cov, -math.inf)), descending=True, stable=True).indices
        k = torch.floor(n.double() * opts.cov_ratio).clamp_min(1)
        top = torch.arange(m.shape[0], device=m.device, dtype=torch.float64) < k
        return (sel.scatter(0, order, top) & m).reshape(mask.shape)
    cov = (a - torch.where(m, a, zero).sum() / (n + 1e-8)) * (x - torch.where(m, x, zero).sum() / (n + 1e-8))
    ratio = torch.exp(x - o)
    by_clip = -a * ratio.clamp(1 - opts.clip_low, 1 + opts.clip_high) > -a * ratio
    cand = torch.nonzero(m & ~by_clip & (cov < opts.cov_ub) & (cov > opts.cov_lb)).reshape(-1)
    if cand.numel():
        k = max(int(opts.cov_ratio * float(n)), 1)
        pick = cand[torch.randperm(cand.numel())[:min(k, cand.numel())].to(cand.device)]
        sel[pick] = True
    return sel.reshape(mask.shape)


def _sequences(logp, mask, cu_seqlens):
    """(the sequences of the mask's layout ([B, T], [T] as one sequence, or packed by cu_seqlens), the
    accumulation dtype, the valid tokens as bool in that layout)."""
    B, T = (mask.shape[0], mask.shape[1]) if mask.dim() == 2 else (1, mask.shape[0])
    if cu_seqlens is not None:
        B, T = cu_seqlens.shape[0] - 1, mask.shape[0]
    seg = Segments(cu_seqlens, B, T, mask.device)
    acc = torch.float64 if logp.dtype == torch.float64 else torch.float32
    return seg, acc, seg.per_token(mask, acc) != 0


def vespo_weights(logp, old, adv, mask, isw, opts: LossOptions, cu_seqlens=None) -> torch.Tensor:
    """VESPO's gamma weight phi per token (TRL 1.16 GRPOTrainer.get_gamma_weights): with d = logp - old and the
    sequence sums over its valid tokens, log w = clamp(sum_b clamp(d, -20, 20) + sum_b clamp(log isw, log
    1e-8, 20), log 1e-8, 20) (no isw term without weights), (k, lam) = (k_pos, lam_pos) where A >= 0 else
    (k_neg, lam_neg), lam clamped at 1e-4, phi = exp(lam + k log w - lam w) with NaN / inf -> 0. Detached, on
    the device, in float32 (float64 for float64 inputs), the mask's layout as [B, T] / [1, total]. TRL sums
    log isw over every position, its weights being 1 at masked ones; fastppo's are 0 there, so the sum runs
    over the valid tokens."""
    seg, acc, m = _sequences(logp, mask, cu_seqlens)
    zero = torch.zeros(m.shape, dtype=acc, device=mask.device)
    d = (seg.per_token(logp.detach(), acc) - seg.per_token(old.detach(), acc)).clamp(-20.0, 20.0)
    lo = math.log(1e-8)
    seq = seg.sum(torch.where(m, d, zero))
    if isw is not None:
        seq = seq + seg.sum(torch.where(m, torch.log(seg.per_token(isw.detach(), acc)).clamp(lo, 20.0), zero))
    log_w = seg.spread(seq.clamp(lo, 20.0))
    nonneg = seg.per_token(adv.detach(), acc) >= 0
    k = torch.where(nonneg, opts.vespo_k_pos, opts.vespo_k_neg)
    lam = torch.where(nonneg, opts.vespo_lambda_pos, opts.vespo_lambda_neg).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return torch.where(m, phi, zero)


def off_policy_keep(logp, old, adv, mask, threshold, cu_seqlens=None) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (TRL 1.16 GRPOTrainer.get_off_policy_mask): keep_t = [A_t >= 0]
    or [sum_b(m nan_to_num(old - logp)) / max(n_b, 1) <= threshold], from detached values, on the device (bool,
    the mask's shape). `old`: the behaviour log-probs the mask measures against: old_logprobs, or the
    caller's off_policy_logprobs (TRL's sampling_per_token_logps from vLLM)."""
    seg, acc, m = _sequences(logp, mask, cu_seqlens)
    kl = torch.nan_to_num(seg.per_token(old.detach(), acc) - seg.per_token(logp.detach(), acc), nan=0.0)
    mean = seg.sum(torch.where(m, kl, torch.zeros_like(kl))) / seg.sum(m.to(acc)).clamp_min(1)
    keep = (seg.per_token(adv.detach(), acc) >= 0) | (seg.spread(mean) <= threshold)
    return keep.reshape(mask.shape)


def entropy_token_mean(res: AggResult, ent, mask, opts: LossOptions, ent_threshold=None) -> AggResult:
    """The entropy term of LossOptions.entropy_agg="token-mean", added to an aggregation `res` run with
    entropy_coef = 0. With e_t = m_t k_t (k_t = [H_t >= the entropy_quantile threshold], 1 without one):
        E = sum_t e_t H_t / max(sum_t e_t, 1),  loss -= entropy_coef E,  dloss/dH_t = -entropy_coef e_t / max(sum e, 1)
    over this call's tokens (TRL 1.16 GRPOTrainer._compute_loss: the entropy bonus over effective_mask = mask *
    entropy_mask, a token mean whatever the loss type's normaliser). Torch ops on the device, no host sync;
    the stats' loss and entropy_loss follow; masked tokens contribute nothing even when they hold NaN."""
    acc = res.loss.dtype
    h = ent.reshape(-1).to(acc)
    e = mask.reshape(-1) != 0
    if ent_threshold is not None:
        e = e & (h >= ent_threshold.to(acc))
    zero = torch.zeros_like(h)
    den = e.to(acc).sum().clamp_min(1)
    term = torch.where(e, h, zero).sum() / den
    coef_ent = torch.where(e, -opts.entropy_coef / den, zero).reshape(res.coef.shape)
    loss = res.loss - opts.entropy_coef * term
    stats = res.stats.clone()
    stats[STATS.index("loss")] = loss
    stats[STATS.index("entropy_loss")] = term
    return AggResult(loss, stats, res.coef, coef_ent, res.kl)


def kl_sequence_correction(res: AggResult, logp, old, ref, mask, opts: LossOptions, cu_seqlens=None) -> AggResult:
    """The sequence-level bias-corrected KL (LossOptions.kl_bias_correction_level="sequence"; TRL 1.16
    GRPOTrainer._compute_loss: per_token_kl * coef_1 with coef_1 = exp(sum_t m (logp - old) / max(n_b, 1)) of
    shape (B, 1), unclamped), put in place of the plain KL term of an aggregation `res` run without the
    correction. With w_t the aggregation weights, k_t the estimator, s_b the sequence ratio:
        term = sum_t m_t w_t k_t s_b,   dterm/dlogp_j = m_j (w_j k'_j s_b + s_b / n_b sum_{t in b} m_t w_t k_t)
    loss += kl_coef (term - sum_t m w k); torch ops on the device, no host sync; the stats' loss and kl_loss
    follow (the reported kl stays k)."""
    seg, acc, m = _sequences(logp, mask, cu_seqlens)
    zero = torch.zeros(m.shape, dtype=acc, device=mask.device)
    x, o, r = (seg.per_token(t.detach(), acc) for t in (logp, old, ref))
    kl, dkl = kl_terms(x, r, opts.kl_kind)
    wt = seg.spread(agg_weights(m, opts, acc, seg)[0])
    n = seg.sum(m.to(acc)).clamp_min(1)
    s = seg.spread(torch.exp(seg.sum(torch.where(m, x - o, zero)) / n))
    wk = torch.where(m, wt * kl, zero)
    term = (wk * s).sum()
    spread = s * seg.spread(seg.sum(wk) / n)
    dcoef = torch.where(m, opts.kl_coef * (wt * dkl * (s - 1) + spread), zero)
    loss = res.loss + opts.kl_coef * (term - wk.sum())
    stats = res.stats.clone()
    stats[STATS.index("loss")] = loss
    stats[STATS.index("kl_loss")] = term
    return AggResult(loss, stats, res.coef + dcoef.reshape(res.coef.shape), res.coef_ent, res.kl)
