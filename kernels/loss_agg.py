"""Per-token PPO policy / value loss, KL and entropy terms, aggregated to a scalar in one
single-program launch (deterministic: a fixed summation order, no atomics).

Aggregation is linear with a per-sequence weight w_b that depends only on the mask:
    token-mean:              w = 1 / N_tok
    seq-mean-token-mean:     w = 1 / (S * n_b)     (0 for sequences with n_b = 0)
    seq-mean-token-sum:      w = 1 / S
    seq-mean-token-sum-norm: w = 1 / (S * T)
with n_b the mask-1 tokens of sequence b, S the sequences with n_b > 0, N_tok = sum n_b, each
replaced by the caller's global count when given (micro-batches then add up to the batch).
    loss = sum_bt m w (L + kl_coef KL - ent_coef H)
The kernel also writes the per-token gradient coefficients dloss/dx = m w (dL + kl_coef dKL) and
dloss/dH = -m w ent_coef, so the backward pass needs no reduction at all.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..modes import AGG_IDS, KL_KIND_IDS
from . import _config as cfg
from ._rows import acc_dtype
from ._terms import is_nan, kl_terms, max_nan, policy_terms, value_terms
from .launches import record_launch

STATS = ("loss", "main_loss", "kl_loss", "entropy_loss", "clipfrac", "clipfrac_lower", "approx_kl",
         "ratio_mean", "ratio_max", "entropy", "kl", "num_tokens", "num_seqs")
POLICY, VALUE = 0, 1


@triton.jit
def _row_count(mask_ptr, b, T, sm_b, sm_t, BLOCK_T: tl.constexpr, ACC: tl.constexpr):
    cnt = tl.zeros((), ACC)
    for t0 in range(0, T, BLOCK_T):
        t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        m = tl.load(mask_ptr + b * sm_b + t * sm_t, mask=t < T, other=0)
        cnt += tl.sum((m != 0).to(ACC), 0)
    return cnt


@triton.jit(do_not_specialize=["B", "T"])
def _loss_agg_kernel(
    x_ptr, old_ptr, adv_ptr, ref_ptr, ent_ptr, mask_ptr,
    coef_x_ptr, coef_ent_ptr, kl_ptr, loss_ptr, stats_ptr,
    B, T,
    sx_b, sx_t, so_b, so_t, sa_b, sa_t, sr_b, sr_t, se_b, se_t, sm_b, sm_t,
    clip_low, clip_high, dual_clip, kl_coef, entropy_coef,
    num_tokens, num_seqs, horizon,
    LOSS: tl.constexpr, AGG: tl.constexpr, KL_KIND: tl.constexpr, HAS_ENT: tl.constexpr,
    HAS_CLIP: tl.constexpr, BLOCK_T: tl.constexpr, ACC: tl.constexpr,
):
    # pass 1: token and sequence counts
    tot = tl.zeros((), ACC)
    nseq = tl.zeros((), ACC)
    for b in range(0, B):
        cnt = _row_count(mask_ptr, tl.cast(b, tl.int64), T, sm_b, sm_t, BLOCK_T, ACC)
        tot += cnt
        nseq += tl.where(cnt > 0, 1.0, 0.0)
    den_tok = tl.maximum(tl.where(num_tokens > 0, num_tokens, tot), 1.0)
    den_seq = tl.maximum(tl.where(num_seqs > 0, num_seqs, nseq), 1.0)
    hor = tl.where(horizon > 0, horizon, tl.cast(T, ACC))

    # pass 2: per-token terms, weighted sums, gradient coefficients, stats
    acc_main = tl.zeros((), ACC)
    acc_kl = tl.zeros((), ACC)
    acc_ent = tl.zeros((), ACC)
    s_clip = tl.zeros((), ACC)
    s_lower = tl.zeros((), ACC)
    s_akl = tl.zeros((), ACC)
    s_ratio = tl.zeros((), ACC)
    r_max = tl.zeros((), ACC)
    s_ent = tl.zeros((), ACC)
    s_kl = tl.zeros((), ACC)
    for b in range(0, B):
        b = tl.cast(b, tl.int64)
        if AGG == 0:
            w = 1.0 / den_tok
        elif AGG == 1:
            cnt = _row_count(mask_ptr, b, T, sm_b, sm_t, BLOCK_T, ACC)
            w = tl.where(cnt > 0, 1.0 / (den_seq * tl.maximum(cnt, 1.0)), 0.0)
        elif AGG == 2:
            w = 1.0 / den_seq
        elif AGG == 3:
            w = 1.0 / (den_seq * hor)
        else:
            w = tl.full((), 1.0, ACC)
        row_main = tl.zeros((), ACC)
        row_kl = tl.zeros((), ACC)
        row_ent = tl.zeros((), ACC)
        for t0 in range(0, T, BLOCK_T):
            t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
            inb = t < T
            m = (tl.load(mask_ptr + b * sm_b + t * sm_t, mask=inb, other=0) != 0) & inb
            x = tl.load(x_ptr + b * sx_b + t * sx_t, mask=inb, other=0.0).to(ACC)
            old = tl.load(old_ptr + b * so_b + t * so_t, mask=inb, other=0.0).to(ACC)
            adv = tl.load(adv_ptr + b * sa_b + t * sa_t, mask=inb, other=0.0).to(ACC)
            if LOSS == 0:
                loss, dloss, ratio, clipped, lower, d = policy_terms(x, old, adv, clip_low, clip_high,
                                                                     dual_clip, HAS_CLIP)
                s_lower += tl.sum(tl.where(m & lower, 1.0, 0.0), 0)
                s_akl += tl.sum(tl.where(m, 0.5 * d * d, 0.0), 0)
                s_ratio += tl.sum(tl.where(m, ratio, 0.0), 0)
                r_blk = tl.where(m, ratio, 0.0)
                r_blk_max = tl.where(tl.sum(is_nan(r_blk).to(tl.int32), 0) > 0, float("nan"), tl.max(r_blk, 0))
                r_max = max_nan(r_max, r_blk_max)
            else:
                loss, dloss, clipped = value_terms(x, old, adv, clip_low, HAS_CLIP)
            s_clip += tl.sum(tl.where(m & clipped, 1.0, 0.0), 0)
            row_main += tl.sum(tl.where(m, loss, 0.0), 0)
            flat = b * T + t
            if KL_KIND != 0:
                ref = tl.load(ref_ptr + b * sr_b + t * sr_t, mask=inb, other=0.0).to(ACC)
                kl, dkl = kl_terms(x, ref, KL_KIND)
                row_kl += tl.sum(tl.where(m, kl, 0.0), 0)
                s_kl += tl.sum(tl.where(m, kl, 0.0), 0)
                dloss += kl_coef * dkl
                tl.store(kl_ptr + flat, kl, mask=inb)
            tl.store(coef_x_ptr + flat, tl.where(m, w * dloss, 0.0), mask=inb)
            if HAS_ENT:
                h = tl.load(ent_ptr + b * se_b + t * se_t, mask=inb, other=0.0).to(ACC)
                row_ent += tl.sum(tl.where(m, h, 0.0), 0)
                s_ent += tl.sum(tl.where(m, h, 0.0), 0)
                tl.store(coef_ent_ptr + flat, tl.where(m, -w * entropy_coef, 0.0), mask=inb)
        acc_main += w * row_main
        acc_kl += w * row_kl
        acc_ent += w * row_ent
    n_tok = tl.maximum(tot, 1.0)
    total = acc_main + kl_coef * acc_kl - entropy_coef * acc_ent
    tl.store(loss_ptr, total)
    tl.store(stats_ptr + 0, total)
    tl.store(stats_ptr + 1, acc_main)
    tl.store(stats_ptr + 2, acc_kl)
    tl.store(stats_ptr + 3, acc_ent)
    tl.store(stats_ptr + 4, s_clip / n_tok)
    tl.store(stats_ptr + 5, s_lower / n_tok)
    tl.store(stats_ptr + 6, s_akl / n_tok)
    tl.store(stats_ptr + 7, s_ratio / n_tok)
    tl.store(stats_ptr + 8, r_max)
    tl.store(stats_ptr + 9, s_ent / n_tok)
    tl.store(stats_ptr + 10, s_kl / n_tok)
    tl.store(stats_ptr + 11, tot)
    tl.store(stats_ptr + 12, nseq)


def bt_strides(x: torch.Tensor, B: int, T: int):
    """Strides that address x as [B, T]: x may be [B, T], [T] (B == 1) or per-sequence [B]."""
    if x.dim() == 2:
        return x.stride(0), x.stride(1)
    if x.dim() == 1 and x.shape[0] == T and B == 1:
        return 0, x.stride(0)
    if x.dim() == 1 and x.shape[0] == B:
        return x.stride(0), 0
    raise ValueError(f"cannot address a tensor of shape {tuple(x.shape)} as [B={B}, T={T}]")


def _count(v):
    return -1.0 if v is None else float(v)


def loss_agg(x, old, adv, mask, *, loss_kind=POLICY, ref=None, ent=None, agg="token-mean",
             kl_kind=None, clip_low=0.2, clip_high=0.2, dual_clip=None, value_clip=None, kl_coef=0.0,
             entropy_coef=0.0, num_tokens=None, num_seqs=None, horizon=None):
    """Launch the aggregation kernel. x, old, mask: [B, T] (or [T]); adv: [B, T] or [B].
    Returns (loss 0-d, stats [len(STATS)], coef_x [B, T], coef_ent [B, T] or None, kl [B, T] or None),
    all float32 (float64 for float64 x) on x's device; the gradient of loss w.r.t. x is upstream * coef_x."""
    B, T = (mask.shape[0], mask.shape[1]) if mask.dim() == 2 else (1, mask.shape[0])
    acc, tl_acc = acc_dtype(x.dtype)
    f32 = dict(dtype=acc, device=x.device)
    loss = torch.empty((), **f32)
    stats = torch.empty(len(STATS), **f32)
    coef_x = torch.empty((B, T), **f32)
    coef_ent = torch.empty((B, T), **f32) if ent is not None else None
    kl = torch.empty((B, T), **f32) if ref is not None else None
    has_clip = (dual_clip is not None) if loss_kind == POLICY else (value_clip is not None)
    first_clip = clip_low if loss_kind == POLICY else (value_clip or 0.0)
    record_launch("loss_agg", x, old, adv, mask, ref, ent, coef_x, coef_ent, kl, loss, stats)
    wrap_triton(_loss_agg_kernel)[(1,)](
        x, old, adv, ref if ref is not None else x, ent if ent is not None else x, mask,
        coef_x, coef_ent if ent is not None else coef_x, kl if kl is not None else coef_x, loss, stats,
        B, T,
        *bt_strides(x, B, T), *bt_strides(old, B, T), *bt_strides(adv, B, T),
        *(bt_strides(ref, B, T) if ref is not None else (0, 0)),
        *(bt_strides(ent, B, T) if ent is not None else (0, 0)), *bt_strides(mask, B, T),
        float(first_clip), float(clip_high), float(dual_clip or 0.0), float(kl_coef), float(entropy_coef),
        _count(num_tokens), _count(num_seqs), _count(horizon),
        LOSS=loss_kind, AGG=AGG_IDS[agg], KL_KIND=KL_KIND_IDS[kl_kind] if ref is not None else 0,
        HAS_ENT=ent is not None, HAS_CLIP=has_clip, BLOCK_T=cfg.AGG_BLOCK_T, ACC=tl_acc,
        num_warps=cfg.AGG_NUM_WARPS,
    )
    return loss, stats, coef_x, coef_ent, kl
