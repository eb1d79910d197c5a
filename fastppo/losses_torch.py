"""The pure-PyTorch backend of the per-token losses: the loss aggregation (`policy_loss_agg`,
`value_loss_agg`, the interface of fastppo.kernels.loss_agg) and the body of rollout_is_weights.
Written in the kernels' closed form (values and explicit
gradient coefficients, masked positions selected away before any arithmetic), not by autograd
through the reference, so `fastppo check` and the tests compare two independent computations."""

from __future__ import annotations

import math

import torch

from .kernels.loss_layout import RATIO_LOG_MAX as _RATIO_LOG_MAX
from .kernels.loss_layout import STATS, AggResult
from .kl_torch import clamp_grad, kl_terms
from .packed import Segments

RATIO_LOG_MAX = float(_RATIO_LOG_MAX.value)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _max_grad(a, b, da, db):
    """Gradient of torch.maximum(a, b) (ties: half to each)."""
    return torch.where(a > b, da, torch.where(b > a, db, torch.where(a == b, 0.5 * (da + db), da + db)))


# ----------------------------------------------------------------------------- aggregation
def _segments(mask, cu_seqlens):
    """The Segments of a [B, T] / [T] mask, or of a packed [total] one with its cu_seqlens."""
    B, T = (mask.shape[0], mask.shape[1]) if mask.dim() == 2 else (1, mask.shape[0])
    return Segments(cu_seqlens, B, T, mask.device)


def agg_weights(m, opts, acc, seg):
    """Per-sequence weights w_b of the aggregation (kernels/loss_agg.py docstring), and (N_tok, S)."""
    n = seg.sum(m.to(acc))
    tot = n.sum()
    nseq = (n > 0).sum().to(acc)
    den_tok = tot.clamp_min(1) if opts.num_tokens is None else torch.tensor(opts.num_tokens, dtype=acc)
    den_seq = nseq.clamp_min(1) if opts.num_seqs is None else torch.tensor(opts.num_seqs, dtype=acc)
    den_tok, den_seq = den_tok.to(m.device), den_seq.to(m.device)
    hor = seg.horizon(acc).to(m.device) if opts.horizon is None else float(opts.horizon)
    ones = torch.ones_like(n)
    if opts.agg == "token-mean":
        w = ones / den_tok
    elif opts.agg == "seq-mean-token-mean":
        w = torch.where(n > 0, 1 / (den_seq * n.clamp_min(1)), torch.zeros_like(n))
    elif opts.agg == "seq-mean-token-sum":
        w = ones / den_seq
    elif opts.agg == "seq-mean-token-sum-norm":
        w = ones / (den_seq * hor)
    else:
        w = ones
    return w, n, tot, nseq


def _verl_more(kind, x, o, a, opts, sel):
    """Per-token (L, dL/dlogp, ratio, clipped, lower) of dppo_tv, dppo_kl, dro, clip_cov, kl_cov
    (kernels/_terms.py: dppo_terms, dro_terms, cov_terms)."""
    cl, ch = opts.clip_low, opts.clip_high
    d = x - o
    zero = torch.zeros_like(x)
    lower = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    if kind in ("dppo_tv", "dppo_kl"):
        ratio = torch.exp(d.clamp(-20, 20))
        w = ratio if opts.ratio_max is None else ratio.clamp(max=opts.ratio_max)
        p, q = torch.exp(x), torch.exp(o)
        if kind == "dppo_kl":
            bkl = q * (o - x) + (1 - q) * torch.log((1 - q + 1e-8) / (1 - p + 1e-8))
            v_pos, v_neg = (bkl <= ch) | (p <= q), (bkl <= cl) | (p >= q)
        else:
            v_pos, v_neg = (p - q) <= ch, (p - q) >= -cl
        valid = torch.where(a > 0, v_pos, v_neg)
        vf = valid.to(x.dtype)
        if opts.ratio_max is not None:
            lower = (ratio > opts.ratio_max) & valid
        return -a * w * x * vf, -a * w * vf, ratio, ~valid, lower
    if kind == "dro":
        beta = opts.dro_beta
        return -(x * a - 0.5 * beta * d * d), -(a - beta * d), torch.exp(d.clamp(-20, 20)), lower, lower
    ratio = torch.exp(d)   # clip_cov / kl_cov: unclamped, as verl
    if kind == "kl_cov":
        c = opts.kl_cov_coef
        loss = -a * ratio + torch.where(sel, c * d.abs(), zero)
        return loss, -a * ratio + torch.where(sel, c * torch.sign(d), zero), ratio, sel, lower
    corr = torch.where(sel, zero, torch.ones_like(x))
    l1, l2 = -a * ratio, -a * ratio.clamp(1 - cl, 1 + ch)
    dloss = _max_grad(l1, l2, -a * ratio, -a * ratio * clamp_grad(ratio, 1 - cl, 1 + ch))
    return torch.maximum(l1, l2) * corr, dloss * corr, ratio, sel, lower


def _policy(x, o, a, m, n, opts, isw, seg, chosen=None):
    """Per-token (L, dL/dlogp, dL/ds, ratio, clipped, lower, sequence ratio s, ds) of opts.policy_loss."""
    cl, ch = opts.clip_low, opts.clip_high
    d = x - o
    zero = torch.zeros_like(x)
    lower = torch.zeros_like(m)
    dl_ds = s = ds = None
    kind = opts.policy_loss
    sel = lambda v: torch.where(m, v, zero)  # noqa: E731
    if kind in ("ppo", "cispo", "sapo", "gpg", "vespo"):
        inside = (d >= -20) & (d <= 20)
        ratio = torch.exp(d.clamp(-20, 20))
        dratio = torch.where(inside, ratio, zero)
    if kind == "ppo":
        r1, dr1 = ratio, dratio
        if opts.ratio_max is not None:
            r1 = ratio.clamp(max=opts.ratio_max)
            dr1 = torch.where(ratio <= opts.ratio_max, dratio, zero)
        l1, l2 = -a * r1, -a * ratio.clamp(1 - cl, 1 + ch)
        loss = torch.maximum(l1, l2)
        dloss = _max_grad(l1, l2, -a * dr1, -a * dratio * clamp_grad(ratio, 1 - cl, 1 + ch))
        clipped = l2 > l1
        if opts.dual_clip is not None:
            l3 = -a * opts.dual_clip
            lower = (a < 0) & (loss > l3)
            dloss = torch.where(a < 0, _max_grad(l3, loss, dloss, zero), dloss)   # torch.minimum(loss, l3)
            loss = torch.where(a < 0, torch.minimum(loss, l3), loss)
        dloss = torch.where(inside, dloss, zero)
    elif kind in ("gspo", "gspo_token"):
        lr = seg.sum(sel(d)) / n.clamp_min(1)
        s = torch.exp(lr.clamp(max=RATIO_LOG_MAX))
        ds = torch.where(lr <= RATIO_LOG_MAX, s, torch.zeros_like(s))
        ratio = seg.spread(s)
        if kind == "gspo_token":   # log s_bt = logp - sg(logp) + sg(lr), clamped per token as verl (gradient 0 there)
            lr_t = seg.spread(lr.detach()) + (x - x.detach())   # the value lr (NaN at a non-finite logp), d/dlogp 1
            ratio = torch.exp(lr_t.clamp(max=RATIO_LOG_MAX))
            ds_t = torch.where(lr_t <= RATIO_LOG_MAX, ratio, zero)
        l1, l2 = -a * ratio, -a * ratio.clamp(1 - cl, 1 + ch)
        loss = torch.maximum(l1, l2)
        dl_ds = _max_grad(l1, l2, -a, -a * clamp_grad(ratio, 1 - cl, 1 + ch))
        dloss = dl_ds * ds_t if kind == "gspo_token" else zero
        clipped = l2 > l1
    elif kind == "cispo":
        c = ratio.clamp(1 - cl, 1 + ch).detach()   # sg: a constant under double backward too
        loss, dloss = -c * a * x, -c * a
        clipped = (ratio < 1 - cl) | (ratio > 1 + ch)
    elif kind == "sapo":
        tau = torch.where(a > 0, torch.full_like(a, opts.sapo_tau_pos), torch.full_like(a, opts.sapo_tau_neg))
        g = torch.sigmoid(tau * (ratio - 1))
        loss = -(4 / tau) * g * a
        dloss = torch.where(inside, -4 * g * (1 - g) * ratio * a, zero)
        clipped = torch.zeros_like(m)
    elif kind == "gmpo":
        pos, neg = a > 0, a < 0
        val = torch.where(pos, d.clamp(max=ch), torch.where(neg, d.clamp(min=-cl), torch.where(a.isnan(), a, zero)))
        dead = (pos & (d > ch)) | (neg & (d < -cl))   # the clamp acts: autograd's gradient is an exact 0
        grad = torch.where(pos | neg, (~dead).to(x.dtype), zero)
        den = n + 1e-8
        s = torch.exp(seg.sum(sel(val)) / den)
        adv_b = seg.sum(sel(a)) / den
        isw_b = torch.ones_like(s) if isw is None else torch.exp(seg.sum(sel(torch.log(isw + 1e-10))) / den)
        lb = -adv_b * s * isw_b
        ratio = seg.spread(s)
        loss = seg.spread(lb)
        dloss = torch.where(dead, zero, seg.spread(n * lb / den) * grad)
        clip_d = (d < -cl) | (d > ch)
        clipped, lower = clip_d & pos, clip_d & neg
    elif kind in ("gpg", "vespo"):   # vespo: its weight phi arrives as isw (fastppo.losses.vespo_weights)
        loss, dloss = -a * x, -a
        clipped = torch.zeros_like(m)
    else:
        loss, dloss, ratio, clipped, lower = _verl_more(kind, x, o, a, opts, chosen)
    if isw is not None and kind != "gmpo":
        loss, dloss = loss * isw, dloss * isw
        dl_ds = None if dl_ds is None else dl_ds * isw
    return loss, dloss, dl_ds, ratio, clipped, lower, s, ds


def policy_loss_agg(logp, old, adv, mask, *, opts, ref=None, ent=None, rollout_is_weights=None,
                    ent_threshold=None, select=None, keep=None, cu_seqlens=None, segments=None) -> AggResult:
    """PyTorch twin of fastppo.kernels.loss_agg.policy_loss_agg (same arguments, same results). `segments`
    replaces the layout's Segments (fastppo.context_parallel passes one whose sums span ranks)."""
    seg = _segments(mask, cu_seqlens) if segments is None else segments
    acc = _acc(logp.dtype)
    _bt = lambda t: seg.per_token(t, acc)  # noqa: E731
    m = _bt(mask) != 0
    zero = torch.zeros(m.shape, dtype=acc, device=logp.device)
    sel = lambda keep, v: torch.where(keep, v, zero)  # noqa: E731
    x, o, a = _bt(logp), _bt(old), _bt(adv)
    isw = None if rollout_is_weights is None else _bt(rollout_is_weights)
    w, n, tot, nseq = agg_weights(m, opts, acc, seg)
    wt = seg.spread(w)
    chosen = None if select is None else seg.per_token(select, acc) != 0
    loss, dloss, dl_ds, ratio, clipped, lower, s, ds = _policy(x, o, a, m, n, opts, isw, seg, chosen)
    kept = m
    if ent_threshold is not None:
        kept = m & (_bt(ent) >= ent_threshold.to(acc))
    if keep is not None:   # off_policy_mask_threshold's kept tokens
        kept = kept & (_bt(keep) != 0)
    keep = kept
    pg = sel(keep, wt * loss).sum()
    coef = sel(keep, wt * dloss)
    if opts.policy_loss == "gspo":
        g_b = seg.sum(sel(keep, wt * dl_ds))
        coef = sel(m, seg.spread(g_b * ds / n.clamp_min(1)))
    kl = None
    kl_loss = kl_mean = torch.zeros((), dtype=acc, device=x.device)
    if ref is not None:
        kl, dkl = kl_terms(x, _bt(ref), opts.kl_kind)
        kl_mean = sel(m, kl).sum()
        kl_term, dkl_term = kl, dkl
        if opts.kl_bias_correction:   # the term KL r, r = exp(logp - old): d/dlogp = (dKL + KL) r
            r_is = torch.exp(x - o)
            kl_term, dkl_term = kl * r_is, (dkl + kl) * r_is
        kl_loss = sel(m, wt * kl_term).sum()
        coef = coef + sel(m, wt * opts.kl_coef * dkl_term)
    coef_ent = None
    ent_loss = ent_mean = torch.zeros((), dtype=acc, device=x.device)
    if ent is not None:
        h = _bt(ent)
        ent_loss, ent_mean = sel(m, wt * h).sum(), sel(m, h).sum()
        coef_ent = sel(m, -wt * opts.entropy_coef)
    kl_coef = opts.kl_coef if ref is not None else 0.0
    ent_coef = opts.entropy_coef if ent is not None else 0.0
    total = pg + kl_coef * kl_loss - ent_coef * ent_loss
    n_tok = tot.clamp_min(1)
    count = lambda b: sel(b, torch.ones_like(zero)).sum()  # noqa: E731
    ratio_max = sel(m, ratio).amax() if m.numel() else torch.zeros((), dtype=acc, device=x.device)
    values = {"loss": total, "pg_loss": pg, "kl_loss": kl_loss, "entropy_loss": ent_loss,
              "clipfrac": count(m & clipped) / n_tok, "clipfrac_lower": count(m & lower) / n_tok,
              "approx_kl": sel(m, 0.5 * (x - o) ** 2).sum() / n_tok, "ratio_mean": sel(m, ratio).sum() / n_tok,
              "ratio_max": ratio_max, "entropy": ent_mean / n_tok, "kl": kl_mean / n_tok,
              "entropy_kept_frac": count(keep) / n_tok, "num_tokens": tot, "num_seqs": nseq}
    stats = torch.stack([values[k].to(acc) for k in STATS])
    return AggResult(total, stats, coef, coef_ent, kl)


def value_loss_agg(values, old_values, returns, mask, *, opts, cu_seqlens=None, segments=None) -> AggResult:
    """PyTorch twin of fastppo.kernels.loss_agg.value_loss_agg (`segments` as in policy_loss_agg)."""
    seg = _segments(mask, cu_seqlens) if segments is None else segments
    acc = _acc(values.dtype)
    m = seg.per_token(mask, acc) != 0
    zero = torch.zeros(m.shape, dtype=acc, device=values.device)
    v, o, r = (seg.per_token(t, acc) for t in (values, old_values, returns))
    w, n, tot, nseq = agg_weights(m, opts, acc, seg)
    wt = seg.spread(w)
    e1 = v - r
    l1 = e1 * e1
    if opts.value_clip is None:
        loss, dloss, clipped = 0.5 * l1, e1, torch.zeros_like(m)
    else:
        c = opts.value_clip
        e2 = o + (v - o).clamp(-c, c) - r
        l2 = e2 * e2
        dloss = _max_grad(l1, l2, e1, torch.where((v - o).abs() <= c, e2, zero))
        loss, clipped = 0.5 * torch.maximum(l1, l2), l2 > l1
    total = torch.where(m, wt * loss, zero).sum()
    stats = torch.zeros(len(STATS), dtype=acc, device=values.device)
    stats[STATS.index("loss")] = total
    stats[STATS.index("pg_loss")] = total
    stats[STATS.index("clipfrac")] = torch.where(m & clipped, 1.0, 0.0).to(acc).sum() / tot.clamp_min(1)
    stats[STATS.index("num_tokens")] = tot
    stats[STATS.index("num_seqs")] = nseq
    return AggResult(total, stats, torch.where(m, wt * dloss, zero), None, None)


# ----------------------------------------------------------------------------- rollout correction
def rollout_is_weights_torch(old_logprobs, rollout_logprobs, mask, level, mode, max, min, cu_seqlens=None):
    """The body of torch.ops.fastppo.rollout_is_weights: (weights, stats [4]: mean, min, max, fraction
    clipped / masked); [B, T] inputs, or packed 1-D [total] ones with cu_seqlens (sequence sums by
    Segments: a segment reduction and a gather, no unpack copy)."""
    acc = torch.float64 if old_logprobs.dtype == torch.float64 else torch.float32
    seg = _segments(mask, cu_seqlens)
    shape = old_logprobs.shape
    m = seg.per_token(mask, acc) != 0
    old, roll = seg.per_token(old_logprobs, acc), seg.per_token(rollout_logprobs, acc)
    diff = torch.nan_to_num(torch.where(m, old - roll, torch.zeros_like(old)), nan=0.0)
    if level == "sequence":
        diff = seg.sum(diff)                 # per sequence [B] / [S]
        valid = seg.sum(m.to(acc)) > 0
    else:
        valid = m
    ratio = torch.exp(diff)
    lo = -math.inf if min is None else float(min)
    hi = math.inf if max is None else float(max)
    outside = (ratio < lo) | (ratio > hi)
    w = ratio.clamp(min=min, max=max) if mode == "truncate" else ratio.masked_fill(outside, 0.0)
    n = valid.sum().clamp_min(1).to(acc)
    zero = torch.zeros_like(w)
    has = valid.any()
    stats = {
        "is_mean": torch.where(valid, w, zero).sum() / n,
        "is_min": torch.where(has, torch.where(valid, w, torch.full_like(w, math.inf)).amin(), zero.sum()),
        "is_max": torch.where(has, torch.where(valid, w, torch.full_like(w, -math.inf)).amax(), zero.sum()),
        ("is_clipped_frac" if mode == "truncate" else "is_masked_frac"): (valid & outside).sum().to(acc) / n,
    }
    if level == "sequence":
        w = seg.spread(w)
    weights = torch.where(m, w, torch.zeros_like(old)).view(shape)
    return weights, torch.stack(list(stats.values()))
