"""Per-token policy / value loss, KL and entropy terms aggregated to a scalar, as a deterministic
multi-program reduction over [B, T] (no atomics, no host sync). Two entry points:
`policy_loss_agg` and `value_loss_agg`.

Aggregation is linear with a per-sequence weight w_b that depends only on the mask:
    token-mean:              w = 1 / N_tok
    seq-mean-token-mean:     w = 1 / (S * n_b)     (0 for sequences with n_b = 0)
    seq-mean-token-sum:      w = 1 / S
    seq-mean-token-sum-norm: w = 1 / (S * T)
    token-sum:               w = 1
with n_b the mask-1 tokens of sequence b, S the sequences with n_b > 0, N_tok = sum n_b, each
replaced by the caller's global count when given (micro-batches then add up to the batch).
    loss = sum_bt m w (L + kl_coef KL - ent_coef H)
The forward also writes the per-token gradient coefficients dloss/dx = m w (dL + kl_coef dKL) and
dloss/dH = -m w ent_coef, so the backward pass needs no reduction at all.

Launches (grid: one program per (sequence, BLOCK_T tile), i.e. B * cdiv(T, BLOCK_T) programs, except
the two one-program finishing steps):
    1. _seq_partials_kernel   per-tile token counts (and the per-sequence sums gspo/gmpo need)
    2. _seq_finish_kernel     1 program: per-sequence table (n_b, w_b, sequence ratio terms) + totals
    3. _policy_terms_kernel / _value_terms_kernel: per-token terms, coefficients, per-tile partial sums
    4. _agg_finish_kernel     1 program: partial sums in a fixed order -> loss and stats
    5. _seq_grad_kernel       gspo only: the sequence ratio's gradient spread back to its tokens
So 4 launches per loss call (5 for gspo), whatever B and T.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..modes import AGG_IDS, KL_KIND_IDS, POLICY_LOSS_IDS
from . import _config as cfg
from ._rows import acc_dtype
from ._terms import (
    cispo_terms,
    clamp_nan,
    clipped_ratio_terms,
    gmpo_log_ratio,
    is_nan,
    kl_terms,
    max_nan,
    ppo_terms,
    sapo_terms,
    value_terms,
)
from .launches import record_launch

# Named layouts of the small buffers that travel between the launches.
SEQ_PART_COLS = ("tokens", "log_ratio_sum", "adv_sum", "log_is_sum")           # launch 1, per (b, tile)
SEQ_COLS = ("tokens", "weight", "log_ratio", "adv_mean", "is_weight")          # launch 2, per sequence
TOTAL_COLS = ("tokens", "seqs")                                                 # launch 2, batch totals
PART_COLS = ("pg_loss", "kl_loss", "entropy_loss", "clipped", "clipped_lower", "approx_kl", "ratio",
             "ratio_max", "entropy", "kl", "kept", "seq_grad")                   # launch 3, per (b, tile)
STATS = ("loss", "pg_loss", "kl_loss", "entropy_loss", "clipfrac", "clipfrac_lower", "approx_kl",
         "ratio_mean", "ratio_max", "entropy", "kl", "entropy_kept_frac", "num_tokens", "num_seqs")
NCOL = 16   # row pitch of every small buffer (>= each layout's length)
RATIO_LOG_MAX = tl.constexpr(10.0)   # gspo / gspo_token clamp the sequence log-ratio from above (verl)


class AggResult(NamedTuple):
    """loss (0-d), stats ([len(STATS)] in STATS order; `stats_dict` names them), coef (dloss/dx per
    token, [B, T]), coef_ent (dloss/dH or None), kl (per-token KL or None). Float32 (float64 for float64 x)."""

    loss: torch.Tensor
    stats: dict
    coef: torch.Tensor
    coef_ent: torch.Tensor | None
    kl: torch.Tensor | None


@triton.jit
def _tile(mask_ptr, T, s_m_b, s_m_t, BLOCK_T: tl.constexpr):
    """The (sequence b, time tile j) of this program on a [B, n_tiles] grid: 64-bit time indices t,
    in-bounds flags and the mask as 0/1 (mask-0 and out-of-range positions False)."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    t = j * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    inb = t < T
    m = (tl.load(mask_ptr + b * s_m_b + t * s_m_t, mask=inb, other=0).to(tl.float32) != 0) & inb
    return b, j, t, inb, m


@triton.jit(do_not_specialize=["T", "n_tiles"])
def _seq_partials_kernel(
    # [B, T] inputs (advantages may be per sequence: time stride 0)
    logp_ptr, old_ptr, adv_ptr, isw_ptr, mask_ptr,
    # output [B * n_tiles, NCOL] in SEQ_PART_COLS order
    part_ptr,
    T, n_tiles,
    s_lp_b, s_lp_t, s_old_b, s_old_t, s_adv_b, s_adv_t, s_isw_b, s_isw_t, s_m_b, s_m_t,
    clip_low, clip_high,
    SEQ: tl.constexpr,        # 0: counts only; 1: sum of d = logp - old (gspo); 2: gmpo sums
    HAS_ISW: tl.constexpr, BLOCK_T: tl.constexpr, NC: tl.constexpr, ACC: tl.constexpr,
):
    b, j, t, inb, m = _tile(mask_ptr, T, s_m_b, s_m_t, BLOCK_T)
    out = part_ptr + (b * n_tiles + j) * NC
    tl.store(out + 0, tl.sum(m.to(ACC), 0))
    if SEQ != 0:
        x = tl.load(logp_ptr + b * s_lp_b + t * s_lp_t, mask=inb, other=0.0).to(ACC)
        o = tl.load(old_ptr + b * s_old_b + t * s_old_t, mask=inb, other=0.0).to(ACC)
        if SEQ == 1:
            tl.store(out + 1, tl.sum(tl.where(m, x - o, 0.0), 0))
        else:
            a = tl.load(adv_ptr + b * s_adv_b + t * s_adv_t, mask=inb, other=0.0).to(ACC)
            val, _g, _c, _dead = gmpo_log_ratio(x, o, a, clip_low, clip_high)
            tl.store(out + 1, tl.sum(tl.where(m, val, 0.0), 0))
            tl.store(out + 2, tl.sum(tl.where(m, a, 0.0), 0))
            if HAS_ISW:
                w = tl.load(isw_ptr + b * s_isw_b + t * s_isw_t, mask=inb, other=1.0).to(ACC)
                tl.store(out + 3, tl.sum(tl.where(m, tl.log(w + 1e-10), 0.0), 0))


@triton.jit(do_not_specialize=["B", "T", "n_tiles"])
def _seq_finish_kernel(
    part_ptr,                 # [B * n_tiles, NCOL] from launch 1
    seq_ptr, total_ptr,       # out: [B, NCOL] in SEQ_COLS order, [NCOL] in TOTAL_COLS order
    B, T, n_tiles,
    num_tokens, num_seqs, horizon,   # global counts (<= 0: use this batch's)
    AGG: tl.constexpr, SEQ: tl.constexpr, HAS_ISW: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, NC: tl.constexpr, ACC: tl.constexpr,
):
    tot = tl.zeros((), ACC)
    nseq = tl.zeros((), ACC)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        rmask = rows < B
        cnt = tl.zeros((BLOCK_B,), ACC)
        q1 = tl.zeros((BLOCK_B,), ACC)
        q2 = tl.zeros((BLOCK_B,), ACC)
        q3 = tl.zeros((BLOCK_B,), ACC)
        for j0 in range(0, n_tiles, BLOCK_J):
            cols = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
            msk = rmask[:, None] & (cols < n_tiles)[None, :]
            base = part_ptr + (rows[:, None] * n_tiles + cols[None, :]) * NC
            cnt += tl.sum(tl.load(base + 0, mask=msk, other=0.0), 1)
            if SEQ != 0:
                q1 += tl.sum(tl.load(base + 1, mask=msk, other=0.0), 1)
            if SEQ == 2:
                q2 += tl.sum(tl.load(base + 2, mask=msk, other=0.0), 1)
                if HAS_ISW:
                    q3 += tl.sum(tl.load(base + 3, mask=msk, other=0.0), 1)
        tot += tl.sum(cnt, 0)
        nseq += tl.sum(tl.where(cnt > 0, 1.0, 0.0), 0)
        out = seq_ptr + rows * NC
        tl.store(out + 0, cnt, mask=rmask)
        if SEQ == 1:      # gspo: mean log-ratio over the sequence's tokens (verl: / clamp(n, 1))
            tl.store(out + 2, q1 / tl.maximum(cnt, 1.0), mask=rmask)
        if SEQ == 2:      # gmpo: means over n + 1e-8 (verl geo_mean)
            tl.store(out + 2, q1 / (cnt + 1e-8), mask=rmask)
            tl.store(out + 3, q2 / (cnt + 1e-8), mask=rmask)
            if HAS_ISW:
                tl.store(out + 4, tl.exp(q3 / (cnt + 1e-8)), mask=rmask)
            else:
                tl.store(out + 4, tl.full((BLOCK_B,), 1.0, ACC), mask=rmask)
    den_tok = tl.maximum(tl.where(num_tokens > 0, num_tokens, tot), 1.0)
    den_seq = tl.maximum(tl.where(num_seqs > 0, num_seqs, nseq), 1.0)
    hor = tl.where(horizon > 0, horizon, tl.cast(T, ACC))
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        rmask = rows < B
        cnt = tl.load(seq_ptr + rows * NC, mask=rmask, other=0.0)
        if AGG == 0:
            w = tl.full((BLOCK_B,), 1.0, ACC) / den_tok
        elif AGG == 1:
            w = tl.where(cnt > 0, 1.0 / (den_seq * tl.maximum(cnt, 1.0)), 0.0)
        elif AGG == 2:
            w = tl.full((BLOCK_B,), 1.0, ACC) / den_seq
        elif AGG == 3:
            w = tl.full((BLOCK_B,), 1.0, ACC) / (den_seq * hor)
        else:
            w = tl.full((BLOCK_B,), 1.0, ACC)
        tl.store(seq_ptr + rows * NC + 1, w, mask=rmask)
    tl.store(total_ptr + 0, tot)
    tl.store(total_ptr + 1, nseq)


@triton.jit
def _tile_max(x, m):
    """max over the masked entries of a tile of non-negative x (0 when none), NaN if any is NaN."""
    blk = tl.where(m, x, 0.0)
    return tl.where(tl.sum(is_nan(blk).to(tl.int32), 0) > 0, float("nan"), tl.max(blk, 0))


@triton.jit(do_not_specialize=["T", "n_tiles"])
def _policy_terms_kernel(
    # [B, T] inputs
    logp_ptr, old_ptr, adv_ptr, ref_ptr, ent_ptr, isw_ptr, mask_ptr,
    # from launch 2 ([B, NCOL] SEQ_COLS) and the entropy threshold (0-d, entropy_quantile)
    seq_ptr, ent_thr_ptr,
    # outputs: [B, T] coefficients and KL (contiguous), [B * n_tiles, NCOL] partials (PART_COLS)
    coef_ptr, coef_ent_ptr, kl_ptr, part_ptr,
    T, n_tiles,
    s_lp_b, s_lp_t, s_old_b, s_old_t, s_adv_b, s_adv_t, s_ref_b, s_ref_t, s_ent_b, s_ent_t,
    s_isw_b, s_isw_t, s_m_b, s_m_t,
    clip_low, clip_high, dual_clip, ratio_max, tau_pos, tau_neg, kl_coef, entropy_coef,
    POLICY: tl.constexpr, KL_KIND: tl.constexpr, HAS_ENT: tl.constexpr, HAS_ISW: tl.constexpr,
    HAS_DUAL: tl.constexpr, HAS_RMAX: tl.constexpr, HAS_ENT_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr, NC: tl.constexpr, ACC: tl.constexpr,
):
    b, j, t, inb, m = _tile(mask_ptr, T, s_m_b, s_m_t, BLOCK_T)
    seq = seq_ptr + b * NC
    n_b = tl.load(seq + 0)
    w = tl.load(seq + 1)
    x = tl.load(logp_ptr + b * s_lp_b + t * s_lp_t, mask=inb, other=0.0).to(ACC)
    o = tl.load(old_ptr + b * s_old_b + t * s_old_t, mask=inb, other=0.0).to(ACC)
    a = tl.load(adv_ptr + b * s_adv_b + t * s_adv_t, mask=inb, other=0.0).to(ACC)
    lower = tl.zeros((BLOCK_T,), tl.int1)
    dl_ds = tl.zeros((BLOCK_T,), ACC)
    if POLICY == 0:
        loss, dloss, ratio, clipped, lower = ppo_terms(x, o, a, clip_low, clip_high, dual_clip, ratio_max,
                                                       HAS_DUAL, HAS_RMAX)
    elif POLICY == 1 or POLICY == 2:
        # gspo (sequence ratio, gradient through its mean) / gspo_token (verl's stop-gradient token form)
        lr = tl.load(seq + 2)
        if POLICY == 2:
            lr = lr + (x - x)   # log s_bt = logp - sg(logp) + sg(lr): NaN at a non-finite logp, as autograd's
        s = tl.exp(tl.where(lr > RATIO_LOG_MAX, RATIO_LOG_MAX, lr))   # min(lr, 10), NaN kept
        ds = tl.where(lr <= RATIO_LOG_MAX, s, 0.0)   # per token, as verl: 0 where the clamp acts
        ratio = tl.full((BLOCK_T,), 1.0, ACC) * s
        loss, dloss, dl_ds, clipped = clipped_ratio_terms(ratio, ds, a, clip_low, clip_high)
        if POLICY == 1:
            dloss = tl.zeros((BLOCK_T,), ACC)      # launch 5 adds the sequence gradient
    elif POLICY == 3:
        loss, dloss, ratio, clipped = cispo_terms(x, o, a, clip_low, clip_high)
    elif POLICY == 4:
        loss, dloss, ratio = sapo_terms(x, o, a, tau_pos, tau_neg)
        clipped = tl.zeros((BLOCK_T,), tl.int1)
    elif POLICY == 5:
        # gmpo: L_b = -mean_b(A) exp(mean_b(clipped log-ratio)) isw_b, counted once per token with w_b
        _v, g, clip_d, dead = gmpo_log_ratio(x, o, a, clip_low, clip_high)
        s = tl.exp(tl.load(seq + 2))
        lb = -tl.load(seq + 3) * s * tl.load(seq + 4)
        ratio = tl.full((BLOCK_T,), 1.0, ACC) * s
        loss = tl.full((BLOCK_T,), 1.0, ACC) * lb
        dloss = tl.where(dead, 0.0, n_b * lb * g / (n_b + 1e-8))   # a select: clamped tokens stay 0 (NaN lb)
        clipped = clip_d & (a > 0)
        lower = clip_d & (a < 0)
    else:
        # gpg: L = -A logp
        loss = -a * x
        dloss = -a
        ratio = tl.exp(clamp_nan(x - o, -20.0, 20.0))
        clipped = tl.zeros((BLOCK_T,), tl.int1)
    if HAS_ISW and POLICY != 5:
        isw = tl.load(isw_ptr + b * s_isw_b + t * s_isw_t, mask=inb, other=0.0).to(ACC)
        loss = loss * isw
        dloss = dloss * isw
        dl_ds = dl_ds * isw
    keep = m
    if HAS_ENT_MASK:
        h_sel = tl.load(ent_ptr + b * s_ent_b + t * s_ent_t, mask=inb, other=0.0).to(ACC)
        keep = m & (h_sel >= tl.load(ent_thr_ptr).to(ACC))
    out = part_ptr + (b * n_tiles + j) * NC
    tl.store(out + 0, tl.sum(tl.where(keep, w * loss, 0.0), 0))
    if POLICY == 1:
        tl.store(out + 11, tl.sum(tl.where(keep, w * dl_ds, 0.0), 0))
    coef = tl.where(keep, w * dloss, 0.0)
    d = x - o
    tl.store(out + 3, tl.sum(tl.where(m & clipped, 1.0, 0.0), 0))
    tl.store(out + 4, tl.sum(tl.where(m & lower, 1.0, 0.0), 0))
    tl.store(out + 5, tl.sum(tl.where(m, 0.5 * d * d, 0.0), 0))
    tl.store(out + 6, tl.sum(tl.where(m, ratio, 0.0), 0))
    tl.store(out + 7, _tile_max(ratio, m))
    tl.store(out + 10, tl.sum(tl.where(keep, 1.0, 0.0), 0))
    flat = b * T + t
    if KL_KIND != 0:
        r = tl.load(ref_ptr + b * s_ref_b + t * s_ref_t, mask=inb, other=0.0).to(ACC)
        kl, dkl = kl_terms(x, r, KL_KIND)
        tl.store(kl_ptr + flat, kl, mask=inb)
        tl.store(out + 1, tl.sum(tl.where(m, w * kl, 0.0), 0))
        tl.store(out + 9, tl.sum(tl.where(m, kl, 0.0), 0))
        coef += tl.where(m, w * kl_coef * dkl, 0.0)
    else:
        tl.store(out + 1, tl.zeros((), ACC))
        tl.store(out + 9, tl.zeros((), ACC))
    tl.store(coef_ptr + flat, coef, mask=inb)
    if HAS_ENT:
        h = tl.load(ent_ptr + b * s_ent_b + t * s_ent_t, mask=inb, other=0.0).to(ACC)
        tl.store(out + 2, tl.sum(tl.where(m, w * h, 0.0), 0))
        tl.store(out + 8, tl.sum(tl.where(m, h, 0.0), 0))
        tl.store(coef_ent_ptr + flat, tl.where(m, -w * entropy_coef, 0.0), mask=inb)
    else:
        tl.store(out + 2, tl.zeros((), ACC))
        tl.store(out + 8, tl.zeros((), ACC))


@triton.jit(do_not_specialize=["T", "n_tiles"])
def _value_terms_kernel(
    v_ptr, old_ptr, ret_ptr, mask_ptr,      # [B, T] inputs
    seq_ptr,                                # [B, NCOL] SEQ_COLS from launch 2
    coef_ptr, part_ptr,                     # outputs: [B, T] dloss/dv, [B * n_tiles, NCOL] partials
    T, n_tiles,
    s_v_b, s_v_t, s_old_b, s_old_t, s_ret_b, s_ret_t, s_m_b, s_m_t,
    clip,
    HAS_CLIP: tl.constexpr, BLOCK_T: tl.constexpr, NC: tl.constexpr, ACC: tl.constexpr,
):
    b, j, t, inb, m = _tile(mask_ptr, T, s_m_b, s_m_t, BLOCK_T)
    w = tl.load(seq_ptr + b * NC + 1)
    v = tl.load(v_ptr + b * s_v_b + t * s_v_t, mask=inb, other=0.0).to(ACC)
    o = tl.load(old_ptr + b * s_old_b + t * s_old_t, mask=inb, other=0.0).to(ACC)
    r = tl.load(ret_ptr + b * s_ret_b + t * s_ret_t, mask=inb, other=0.0).to(ACC)
    loss, dloss, clipped = value_terms(v, o, r, clip, HAS_CLIP)
    out = part_ptr + (b * n_tiles + j) * NC
    tl.store(out + 0, tl.sum(tl.where(m, w * loss, 0.0), 0))
    tl.store(out + 3, tl.sum(tl.where(m & clipped, 1.0, 0.0), 0))
    tl.store(coef_ptr + b * T + t, tl.where(m, w * dloss, 0.0), mask=inb)


@triton.jit(do_not_specialize=["n_parts"])
def _agg_finish_kernel(
    part_ptr, total_ptr,        # [n_parts, NCOL] partials (PART_COLS), [NCOL] totals (TOTAL_COLS)
    loss_ptr, stats_ptr,        # out: 0-d loss, [len(STATS)] stats
    n_parts, kl_coef, entropy_coef,
    BLOCK_P: tl.constexpr, NC: tl.constexpr, ACC: tl.constexpr,
):
    cols = tl.arange(0, NC)
    acc = tl.zeros((NC,), ACC)
    rmax = tl.zeros((NC,), ACC)
    for p0 in range(0, n_parts, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        valid = (rows < n_parts)[:, None] & (cols < 11)[None, :]
        tile = tl.load(part_ptr + rows[:, None] * NC + cols[None, :], mask=valid, other=0.0)
        acc += tl.sum(tile, 0)
        rmax = max_nan(rmax, _tile_max(tile, valid))
    pg = tl.sum(tl.where(cols == 0, acc, 0.0), 0)
    kl_loss = tl.sum(tl.where(cols == 1, acc, 0.0), 0)
    ent_loss = tl.sum(tl.where(cols == 2, acc, 0.0), 0)
    tot = tl.load(total_ptr + 0)
    n_tok = tl.maximum(tot, 1.0)
    total = pg + kl_coef * kl_loss - entropy_coef * ent_loss
    tl.store(loss_ptr, total)
    tl.store(stats_ptr + 0, total)
    tl.store(stats_ptr + 1, pg)
    tl.store(stats_ptr + 2, kl_loss)
    tl.store(stats_ptr + 3, ent_loss)
    tl.store(stats_ptr + 4, tl.sum(tl.where(cols == 3, acc, 0.0), 0) / n_tok)
    tl.store(stats_ptr + 5, tl.sum(tl.where(cols == 4, acc, 0.0), 0) / n_tok)
    tl.store(stats_ptr + 6, tl.sum(tl.where(cols == 5, acc, 0.0), 0) / n_tok)
    tl.store(stats_ptr + 7, tl.sum(tl.where(cols == 6, acc, 0.0), 0) / n_tok)
    tl.store(stats_ptr + 8, tl.sum(tl.where(cols == 7, rmax, 0.0), 0))
    tl.store(stats_ptr + 9, tl.sum(tl.where(cols == 8, acc, 0.0), 0) / n_tok)
    tl.store(stats_ptr + 10, tl.sum(tl.where(cols == 9, acc, 0.0), 0) / n_tok)
    tl.store(stats_ptr + 11, tl.sum(tl.where(cols == 10, acc, 0.0), 0) / n_tok)
    tl.store(stats_ptr + 12, tot)
    tl.store(stats_ptr + 13, tl.load(total_ptr + 1))


@triton.jit(do_not_specialize=["T", "n_tiles"])
def _seq_grad_kernel(
    mask_ptr, seq_ptr, part_ptr,      # [B, T] mask, [B, NCOL] SEQ_COLS, [B * n_tiles, NCOL] PART_COLS
    coef_ptr,                         # in/out [B, T]: += the gspo sequence-ratio gradient
    T, n_tiles, s_m_b, s_m_t,
    BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, NC: tl.constexpr, ACC: tl.constexpr,
):
    """gspo: s_b = exp(min(mean_b(d), 10)); dloss/dlogp_t = m_t s_b [mean <= 10] / n_b * G_b with
    G_b = sum over the sequence's kept tokens of w_b isw_t dL_t/ds_b (the partials' seq_grad column)."""
    b, j, t, inb, m = _tile(mask_ptr, T, s_m_b, s_m_t, BLOCK_T)
    g_b = tl.zeros((), ACC)
    for j0 in range(0, n_tiles, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        g_b += tl.sum(tl.load(part_ptr + (b * n_tiles + cols) * NC + 11, mask=cols < n_tiles, other=0.0), 0)
    n_b = tl.load(seq_ptr + b * NC + 0)
    lr = tl.load(seq_ptr + b * NC + 2)
    s = tl.where(lr <= RATIO_LOG_MAX, tl.exp(lr), 0.0)
    flat = b * T + t
    c = tl.load(coef_ptr + flat, mask=inb, other=0.0)
    tl.store(coef_ptr + flat, c + tl.where(m, g_b * s / tl.maximum(n_b, 1.0), 0.0), mask=inb)


# ----------------------------------------------------------------------------- launchers
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


def _shape(mask):
    return (mask.shape[0], mask.shape[1]) if mask.dim() == 2 else (1, mask.shape[0])


def _seq_tables(B, T, n_tiles, x, old, adv, isw, mask, opts, seq_kind, acc, tl_acc):
    """Launches 1 and 2: per-sequence table [B, NCOL] and batch totals [NCOL]."""
    dev = x.device
    part = torch.empty(B * n_tiles, NCOL, dtype=acc, device=dev)
    seq = torch.empty(B, NCOL, dtype=acc, device=dev)
    total = torch.empty(NCOL, dtype=acc, device=dev)
    has_isw = isw is not None
    record_launch("loss_agg_seq", mask, *((x, old) if seq_kind else ()), *((adv, isw) if seq_kind == 2 else ()),
                  part, grid=(B, n_tiles))
    wrap_triton(_seq_partials_kernel)[(B, n_tiles)](
        x, old, adv, isw if has_isw else x, mask, part, T, n_tiles,
        *bt_strides(x, B, T), *bt_strides(old, B, T), *bt_strides(adv, B, T),
        *(bt_strides(isw, B, T) if has_isw else (0, 0)), *bt_strides(mask, B, T),
        float(opts.clip_low), float(opts.clip_high),
        SEQ=seq_kind, HAS_ISW=has_isw, BLOCK_T=cfg.AGG_BLOCK_T, NC=NCOL, ACC=tl_acc, num_warps=cfg.AGG_NUM_WARPS)
    record_launch("loss_agg_seq_finish", part, seq, total, grid=(1,))
    wrap_triton(_seq_finish_kernel)[(1,)](
        part, seq, total, B, T, n_tiles, _count(opts.num_tokens), _count(opts.num_seqs), _count(opts.horizon),
        AGG=AGG_IDS[opts.agg], SEQ=seq_kind, HAS_ISW=has_isw, BLOCK_B=cfg.AGG_FINISH_BLOCK,
        BLOCK_J=cfg.AGG_FINISH_BLOCK_J, NC=NCOL, ACC=tl_acc, num_warps=cfg.AGG_NUM_WARPS)
    return seq, total


def _finish(part, total, n_parts, kl_coef, entropy_coef, acc, tl_acc, dev):
    loss = torch.empty((), dtype=acc, device=dev)
    stats = torch.empty(len(STATS), dtype=acc, device=dev)
    record_launch("loss_agg_finish", part, total, loss, stats, grid=(1,))
    wrap_triton(_agg_finish_kernel)[(1,)](part, total, loss, stats, n_parts, float(kl_coef), float(entropy_coef),
                             BLOCK_P=cfg.AGG_FINISH_BLOCK, NC=NCOL, ACC=tl_acc, num_warps=cfg.AGG_NUM_WARPS)
    return loss, stats


def stats_dict(stats: torch.Tensor) -> dict:
    """Views of the stats buffer by name (no copy, no sync)."""
    return {name: stats[i] for i, name in enumerate(STATS)}


def policy_loss_agg(logp, old, adv, mask, *, opts, ref=None, ent=None, rollout_is_weights=None,
                    ent_threshold=None) -> AggResult:
    """The policy objective of `opts` (a fastppo.options.LossOptions) on per-token log-probs.
    logp, old, mask: [B, T] (or [T]); adv [B, T] or [B]; ref, ent, rollout_is_weights [B, T] or None;
    ent_threshold: 0-d tensor (entropy_quantile), tokens with ent >= it are kept in the policy term."""
    B, T = _shape(mask)
    acc, tl_acc = acc_dtype(logp.dtype)
    dev = logp.device
    n_tiles = triton.cdiv(max(T, 1), cfg.AGG_BLOCK_T)
    policy = POLICY_LOSS_IDS[opts.policy_loss]
    seq_kind = 1 if policy in (1, 2) else (2 if policy == 5 else 0)
    isw = rollout_is_weights
    seq, total = _seq_tables(B, T, n_tiles, logp, old, adv, isw, mask, opts, seq_kind, acc, tl_acc)
    coef = torch.empty((B, T), dtype=acc, device=dev)
    has_ent = ent is not None
    coef_ent = torch.empty((B, T), dtype=acc, device=dev) if has_ent else None
    kl = torch.empty((B, T), dtype=acc, device=dev) if ref is not None else None
    part = torch.empty(B * n_tiles, NCOL, dtype=acc, device=dev)
    ent_mask = ent_threshold is not None
    record_launch("loss_agg", logp, old, adv, mask, ref, ent, isw, seq, coef, coef_ent, kl, part,
                  grid=(B, n_tiles))
    wrap_triton(_policy_terms_kernel)[(B, n_tiles)](
        logp, old, adv, ref if ref is not None else logp, ent if has_ent else logp, isw if isw is not None else logp,
        mask, seq, ent_threshold if ent_mask else seq,
        coef, coef_ent if has_ent else coef, kl if kl is not None else coef, part,
        T, n_tiles,
        *bt_strides(logp, B, T), *bt_strides(old, B, T), *bt_strides(adv, B, T),
        *(bt_strides(ref, B, T) if ref is not None else (0, 0)), *(bt_strides(ent, B, T) if has_ent else (0, 0)),
        *(bt_strides(isw, B, T) if isw is not None else (0, 0)), *bt_strides(mask, B, T),
        float(opts.clip_low), float(opts.clip_high), float(opts.dual_clip or 0.0), float(opts.ratio_max or 0.0),
        float(opts.sapo_tau_pos), float(opts.sapo_tau_neg), float(opts.kl_coef), float(opts.entropy_coef),
        POLICY=policy, KL_KIND=KL_KIND_IDS[opts.kl_kind] if ref is not None else 0, HAS_ENT=has_ent,
        HAS_ISW=isw is not None, HAS_DUAL=opts.dual_clip is not None, HAS_RMAX=opts.ratio_max is not None,
        HAS_ENT_MASK=ent_mask, BLOCK_T=cfg.AGG_BLOCK_T, NC=NCOL, ACC=tl_acc, num_warps=cfg.AGG_NUM_WARPS)
    if policy == 1:
        record_launch("loss_agg_seq_grad", mask, seq, part, coef, grid=(B, n_tiles))
        wrap_triton(_seq_grad_kernel)[(B, n_tiles)](mask, seq, part, coef, T, n_tiles, *bt_strides(mask, B, T),
                                       BLOCK_T=cfg.AGG_BLOCK_T, BLOCK_J=cfg.AGG_FINISH_BLOCK_J, NC=NCOL,
                                       ACC=tl_acc, num_warps=cfg.AGG_NUM_WARPS)
    loss, stats = _finish(part, total, B * n_tiles, opts.kl_coef if kl is not None else 0.0,
                          opts.entropy_coef if has_ent else 0.0, acc, tl_acc, dev)
    return AggResult(loss, stats, coef, coef_ent, kl)


def value_loss_agg(values, old_values, returns, mask, *, opts) -> AggResult:
    """The clipped value loss of `opts` (value_clip, agg, counts). Stats: loss and clipfrac."""
    B, T = _shape(mask)
    acc, tl_acc = acc_dtype(values.dtype)
    dev = values.device
    n_tiles = triton.cdiv(max(T, 1), cfg.AGG_BLOCK_T)
    seq, total = _seq_tables(B, T, n_tiles, values, old_values, returns, None, mask, opts, 0, acc, tl_acc)
    coef = torch.empty((B, T), dtype=acc, device=dev)
    part = torch.zeros(B * n_tiles, NCOL, dtype=acc, device=dev)
    record_launch("loss_agg", values, old_values, returns, mask, seq, coef, part, grid=(B, n_tiles))
    wrap_triton(_value_terms_kernel)[(B, n_tiles)](
        values, old_values, returns, mask, seq, coef, part, T, n_tiles,
        *bt_strides(values, B, T), *bt_strides(old_values, B, T), *bt_strides(returns, B, T),
        *bt_strides(mask, B, T), float(opts.value_clip or 0.0),
        HAS_CLIP=opts.value_clip is not None, BLOCK_T=cfg.AGG_BLOCK_T, NC=NCOL, ACC=tl_acc,
        num_warps=cfg.AGG_NUM_WARPS)
    loss, stats = _finish(part, total, B * n_tiles, 0.0, 0.0, acc, tl_acc, dev)
    return AggResult(loss, stats, coef, None, None)


def aot_specs(AOTSpec, sig):
    """The aggregation kernels as launched on a GPU (fp32 per-token inputs, bool mask)."""
    ce_common = dict(BLOCK_T=cfg.AGG_BLOCK_T, NC=NCOL, ACC=tl.float32)
    f32 = {n: "fp32" for n in ("clip_low", "clip_high", "dual_clip", "ratio_max", "tau_pos", "tau_neg", "kl_coef",
                               "entropy_coef", "num_tokens", "num_seqs", "horizon", "clip")}

    def ptrs(fn):
        out = {n: "*fp32" for n in fn.arg_names if n.endswith("_ptr")}
        out["mask_ptr"] = "*i1"
        return out

    specs = []
    for seq_kind in (0, 1, 2):
        ce = dict(ce_common, SEQ=seq_kind, HAS_ISW=True)
        specs.append(AOTSpec(f"loss_agg_seq[{seq_kind}]", _seq_partials_kernel,
                             sig(_seq_partials_kernel, {**ptrs(_seq_partials_kernel), **f32}, ce), ce, (), False,
                             cfg.AGG_NUM_WARPS))
    ce = dict(NC=NCOL, ACC=tl.float32, AGG=1, SEQ=2, HAS_ISW=True, BLOCK_B=cfg.AGG_FINISH_BLOCK,
              BLOCK_J=cfg.AGG_FINISH_BLOCK_J)
    specs.append(AOTSpec("loss_agg_seq_finish", _seq_finish_kernel,
                         sig(_seq_finish_kernel, {**ptrs(_seq_finish_kernel), **f32}, ce), ce, (), False,
                         cfg.AGG_NUM_WARPS))
    for name, policy in POLICY_LOSS_IDS.items():
        ce = dict(ce_common, POLICY=policy, KL_KIND=5, HAS_ENT=True, HAS_ISW=True, HAS_DUAL=policy == 0,
                  HAS_RMAX=policy == 0, HAS_ENT_MASK=policy != 5)
        specs.append(AOTSpec(f"loss_agg[{name}]", _policy_terms_kernel,
                             sig(_policy_terms_kernel, {**ptrs(_policy_terms_kernel), **f32}, ce), ce, (), False,
                             cfg.AGG_NUM_WARPS))
    ce = dict(ce_common, HAS_CLIP=True)
    specs.append(AOTSpec("loss_agg[value]", _value_terms_kernel,
                         sig(_value_terms_kernel, {**ptrs(_value_terms_kernel), **f32}, ce), ce, (), False,
                         cfg.AGG_NUM_WARPS))
    ce = dict(BLOCK_P=cfg.AGG_FINISH_BLOCK, NC=NCOL, ACC=tl.float32)
    specs.append(AOTSpec("loss_agg_finish", _agg_finish_kernel,
                         sig(_agg_finish_kernel, {**ptrs(_agg_finish_kernel), **f32}, ce), ce, (), False,
                         cfg.AGG_NUM_WARPS))
    ce = dict(BLOCK_T=cfg.AGG_BLOCK_T, BLOCK_J=cfg.AGG_FINISH_BLOCK_J, NC=NCOL, ACC=tl.float32)
    specs.append(AOTSpec("loss_agg_seq_grad", _seq_grad_kernel,
                         sig(_seq_grad_kernel, ptrs(_seq_grad_kernel), ce), ce, (), False, cfg.AGG_NUM_WARPS))
    return specs
