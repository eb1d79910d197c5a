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
the two one-program finishing steps; packed sequences (cu_seqlens) keep the grid of an average sequence,
each program reading its sequence's offsets and taking every n_tiles-th tile of it: loss_layout.Grid);
1, 2 and 5 are in kernels/loss_seq.py, the ids and buffer layouts in kernels/loss_layout.py:
    1. _seq_partials_kernel   per-tile token counts (and the per-sequence sums gspo/gmpo need)
    2. _seq_finish_kernel     1 program: per-sequence table (n_b, w_b, sequence ratio terms) + totals
    3. _policy_terms_kernel / _value_terms_kernel: per-token terms, coefficients, per-tile partial sums
    4. _agg_finish_kernel     1 program: partial sums in a fixed order -> loss and stats
    5. _seq_grad_kernel       gspo only: the sequence ratio's gradient spread back to its tokens
So 4 launches per loss call (5 for gspo), whatever B and T.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..modes import KL_KIND_IDS, POLICY_LOSS_IDS
from . import _config as cfg
from ._rows import acc_dtype
from ._terms import (
    cispo_terms,
    clamp_nan,
    clipped_ratio_terms,
    cov_terms,
    dppo_terms,
    dro_terms,
    gmpo_log_ratio,
    kl_terms,
    max_nan,
    ppo_terms,
    sapo_terms,
    value_terms,
)
from .launches import record_launch
from .loss_layout import (
    KL_NONE,
    NCOL,
    P_APPROX_KL,
    P_CLIPPED,
    P_CLIPPED_LOWER,
    P_ENT_LOSS,
    P_ENTROPY,
    P_KEPT,
    P_KL,
    P_KL_LOSS,
    P_PG,
    P_RATIO,
    P_RATIO_MAX,
    P_SEQ_GRAD,
    P_SUMMED,
    POLICY_CISPO,
    POLICY_CLIP_COV,
    POLICY_DPPO_KL,
    POLICY_DPPO_TV,
    POLICY_DRO,
    POLICY_GMPO,
    POLICY_GSPO,
    POLICY_GSPO_TOKEN,
    POLICY_KL_COV,
    POLICY_PPO,
    POLICY_SAPO,
    RATIO_LOG_MAX,
    SEQ_COUNTS,
    SQ_ADV_MEAN,
    SQ_IS_WEIGHT,
    SQ_LOG_RATIO,
    SQ_TOKENS,
    SQ_WEIGHT,
    ST_APPROX_KL,
    ST_CLIPFRAC,
    ST_CLIPFRAC_LOWER,
    ST_ENT_LOSS,
    ST_ENTROPY,
    ST_KEPT_FRAC,
    ST_KL,
    ST_KL_LOSS,
    ST_LOSS,
    ST_NUM_SEQS,
    ST_NUM_TOKENS,
    ST_PG,
    ST_RATIO_MAX,
    ST_RATIO_MEAN,
    STATS,
    TOT_SEQS,
    TOT_TOKENS,
    AggResult,
    grid_of,
    seq_kind,
)
from .loss_seq import _span, _tile, _tile_max, seq_grad, seq_tables


@triton.jit(do_not_specialize=["T", "n_tiles"])
def _policy_terms_kernel(
    # [B, T] (or packed [total]) inputs, the packed [B + 1] offsets
    logp_ptr, old_ptr, adv_ptr, ref_ptr, ent_ptr, isw_ptr, mask_ptr, cu_ptr,
    # clip_cov / kl_cov: the batch-global token selection; off_policy_mask_threshold: the tokens kept (bool, the
    # mask's layout; fastppo.losses.cov_selection / off_policy_keep)
    sel_ptr, keep_ptr,
    # from launch 2 ([B, NCOL] SEQ_COLS) and the entropy threshold (0-d, entropy_quantile)
    seq_ptr, ent_thr_ptr,
    # outputs: [B, T] coefficients and KL (contiguous; packed [total]), [B * n_tiles, NCOL] partials (PART_COLS)
    coef_ptr, coef_ent_ptr, kl_ptr, part_ptr,
    T, n_tiles,
    s_lp_b, s_lp_t, s_old_b, s_old_t, s_adv_b, s_adv_t, s_ref_b, s_ref_t, s_ent_b, s_ent_t,
    s_isw_b, s_isw_t, s_m_b, s_m_t, s_sel_b, s_sel_t, s_keep_b, s_keep_t,
    clip_low, clip_high, dual_clip, ratio_max, tau_pos, tau_neg, kl_coef, entropy_coef, penalty,
    POLICY: tl.constexpr, KL_KIND: tl.constexpr, HAS_ENT: tl.constexpr, HAS_ISW: tl.constexpr,
    HAS_DUAL: tl.constexpr, HAS_RMAX: tl.constexpr, HAS_ENT_MASK: tl.constexpr, PACKED: tl.constexpr,
    KL_IS: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_T: tl.constexpr, NC: tl.constexpr, ACC: tl.constexpr,
):
    b, start, length, out_row = _span(cu_ptr, T, PACKED)
    j = tl.program_id(1).to(tl.int64)
    seq = seq_ptr + b * NC
    n_b = tl.load(seq + SQ_TOKENS)
    w = tl.load(seq + SQ_WEIGHT)
    pg_sum = tl.zeros((), ACC)
    seq_grad_sum = tl.zeros((), ACC)
    n_clipped = tl.zeros((), ACC)
    n_lower = tl.zeros((), ACC)
    approx_kl = tl.zeros((), ACC)
    ratio_sum = tl.zeros((), ACC)
    ratio_mx = tl.zeros((), ACC)
    n_kept = tl.zeros((), ACC)
    kl_loss = tl.zeros((), ACC)
    kl_sum = tl.zeros((), ACC)
    ent_loss = tl.zeros((), ACC)
    ent_sum = tl.zeros((), ACC)
    for jj in range(j, tl.cdiv(length, BLOCK_T), n_tiles):
        t, pos, inb, m = _tile(mask_ptr, b, start, length, jj, s_m_b, s_m_t, BLOCK_T)
        x = tl.load(logp_ptr + b * s_lp_b + pos * s_lp_t, mask=inb, other=0.0).to(ACC)
        o = tl.load(old_ptr + b * s_old_b + pos * s_old_t, mask=inb, other=0.0).to(ACC)
        a = tl.load(adv_ptr + b * s_adv_b + pos * s_adv_t, mask=inb, other=0.0).to(ACC)
        lower = tl.zeros((BLOCK_T,), tl.int1)
        dl_ds = tl.zeros((BLOCK_T,), ACC)
        if POLICY == POLICY_PPO:
            loss, dloss, ratio, clipped, lower = ppo_terms(x, o, a, clip_low, clip_high, dual_clip, ratio_max,
                                                           HAS_DUAL, HAS_RMAX)
        elif POLICY == POLICY_GSPO or POLICY == POLICY_GSPO_TOKEN:  # noqa: SIM109  (constexpr ids, one by one)
            # gspo (sequence ratio, gradient through its mean) / gspo_token (verl's stop-gradient token form)
            lr = tl.load(seq + SQ_LOG_RATIO)
            if POLICY == POLICY_GSPO_TOKEN:
                lr = lr + (x - x)   # log s_bt = logp - sg(logp) + sg(lr): NaN at a non-finite logp, as autograd's
            s = tl.exp(tl.where(lr > RATIO_LOG_MAX, RATIO_LOG_MAX, lr))   # min(lr, 10), NaN kept
            ds = tl.where(lr <= RATIO_LOG_MAX, s, 0.0)   # per token, as verl: 0 where the clamp acts
            ratio = tl.full((BLOCK_T,), 1.0, ACC) * s
            loss, dloss, dl_ds, clipped = clipped_ratio_terms(ratio, ds, a, clip_low, clip_high)
            if POLICY == POLICY_GSPO:
                dloss = tl.zeros((BLOCK_T,), ACC)      # launch 5 adds the sequence gradient
        elif POLICY == POLICY_CISPO:
            loss, dloss, ratio, clipped = cispo_terms(x, o, a, clip_low, clip_high)
        elif POLICY == POLICY_SAPO:
            loss, dloss, ratio = sapo_terms(x, o, a, tau_pos, tau_neg)
            clipped = tl.zeros((BLOCK_T,), tl.int1)
        elif POLICY == POLICY_GMPO:
            # gmpo: L_b = -mean_b(A) exp(mean_b(clipped log-ratio)) isw_b, counted once per token with w_b
            _v, g, clip_d, dead = gmpo_log_ratio(x, o, a, clip_low, clip_high)
            s = tl.exp(tl.load(seq + SQ_LOG_RATIO))
            lb = -tl.load(seq + SQ_ADV_MEAN) * s * tl.load(seq + SQ_IS_WEIGHT)
            ratio = tl.full((BLOCK_T,), 1.0, ACC) * s
            loss = tl.full((BLOCK_T,), 1.0, ACC) * lb
            dloss = tl.where(dead, 0.0, n_b * lb * g / (n_b + 1e-8))   # a select: clamped tokens stay 0 (NaN lb)
            clipped = clip_d & (a > 0)
            lower = clip_d & (a < 0)
        elif POLICY == POLICY_DPPO_TV or POLICY == POLICY_DPPO_KL:  # noqa: SIM109  (constexpr ids)
            loss, dloss, ratio, clipped, lower = dppo_terms(x, o, a, clip_low, clip_high, ratio_max, HAS_RMAX,
                                                            POLICY == POLICY_DPPO_KL)
        elif POLICY == POLICY_DRO:
            loss, dloss, ratio = dro_terms(x, o, a, penalty)   # penalty: dro_beta
            clipped = tl.zeros((BLOCK_T,), tl.int1)
        elif POLICY == POLICY_CLIP_COV or POLICY == POLICY_KL_COV:  # noqa: SIM109  (constexpr ids)
            sel = tl.load(sel_ptr + b * s_sel_b + pos * s_sel_t, mask=inb, other=0).to(tl.int1)
            loss, dloss, ratio, clipped = cov_terms(x, o, a, sel, clip_low, clip_high, penalty, POLICY == POLICY_KL_COV)
        else:
            # POLICY_GPG: L = -A logp; POLICY_VESPO: the same times its weight phi (as isw: losses.vespo_weights)
            loss = -a * x
            dloss = -a
            ratio = tl.exp(clamp_nan(x - o, -20.0, 20.0))
            clipped = tl.zeros((BLOCK_T,), tl.int1)
        if HAS_ISW and POLICY != POLICY_GMPO:
            isw = tl.load(isw_ptr + b * s_isw_b + pos * s_isw_t, mask=inb, other=0.0).to(ACC)
            loss = loss * isw
            dloss = dloss * isw
            dl_ds = dl_ds * isw
        keep = m
        if HAS_ENT_MASK:
            h_sel = tl.load(ent_ptr + b * s_ent_b + pos * s_ent_t, mask=inb, other=0.0).to(ACC)
            keep = m & (h_sel >= tl.load(ent_thr_ptr).to(ACC))
        if HAS_KEEP:
            keep = keep & (tl.load(keep_ptr + b * s_keep_b + pos * s_keep_t, mask=inb, other=0).to(tl.int1))
        pg_sum += tl.sum(tl.where(keep, w * loss, 0.0), 0)
        if POLICY == POLICY_GSPO:
            seq_grad_sum += tl.sum(tl.where(keep, w * dl_ds, 0.0), 0)
        coef = tl.where(keep, w * dloss, 0.0)
        d = x - o
        n_clipped += tl.sum(tl.where(m & clipped, 1.0, 0.0), 0)
        n_lower += tl.sum(tl.where(m & lower, 1.0, 0.0), 0)
        approx_kl += tl.sum(tl.where(m, 0.5 * d * d, 0.0), 0)
        ratio_sum += tl.sum(tl.where(m, ratio, 0.0), 0)
        ratio_mx = max_nan(ratio_mx, _tile_max(ratio, m))
        n_kept += tl.sum(tl.where(keep, 1.0, 0.0), 0)
        flat = out_row + t
        if KL_KIND != KL_NONE:
            r = tl.load(ref_ptr + b * s_ref_b + pos * s_ref_t, mask=inb, other=0.0).to(ACC)
            kl, dkl = kl_terms(x, r, KL_KIND)
            tl.store(kl_ptr + flat, kl, mask=inb)
            kl_sum += tl.sum(tl.where(m, kl, 0.0), 0)
            if KL_IS:   # kl_bias_correction: the term KL r, r = exp(logp - old) (TRL's use_bias_correction_kl)
                r_is = tl.exp(x - o)
                dkl = (dkl + kl) * r_is
                kl = kl * r_is
            kl_loss += tl.sum(tl.where(m, w * kl, 0.0), 0)
            coef += tl.where(m, w * kl_coef * dkl, 0.0)
        tl.store(coef_ptr + flat, coef, mask=inb)
        if HAS_ENT:
            h = tl.load(ent_ptr + b * s_ent_b + pos * s_ent_t, mask=inb, other=0.0).to(ACC)
            ent_loss += tl.sum(tl.where(m, w * h, 0.0), 0)
            ent_sum += tl.sum(tl.where(m, h, 0.0), 0)
            tl.store(coef_ent_ptr + flat, tl.where(m, -w * entropy_coef, 0.0), mask=inb)
    out = part_ptr + (b * n_tiles + j) * NC
    tl.store(out + P_PG, pg_sum)
    if POLICY == POLICY_GSPO:
        tl.store(out + P_SEQ_GRAD, seq_grad_sum)
    tl.store(out + P_CLIPPED, n_clipped)
    tl.store(out + P_CLIPPED_LOWER, n_lower)
    tl.store(out + P_APPROX_KL, approx_kl)
    tl.store(out + P_RATIO, ratio_sum)
    tl.store(out + P_RATIO_MAX, ratio_mx)
    tl.store(out + P_KEPT, n_kept)
    tl.store(out + P_KL_LOSS, kl_loss)
    tl.store(out + P_KL, kl_sum)
    tl.store(out + P_ENT_LOSS, ent_loss)
    tl.store(out + P_ENTROPY, ent_sum)


@triton.jit(do_not_specialize=["T", "n_tiles"])
def _value_terms_kernel(
    v_ptr, old_ptr, ret_ptr, mask_ptr, cu_ptr,   # [B, T] (or packed [total]) inputs, packed [B + 1] offsets
    seq_ptr,                                     # [B, NCOL] SEQ_COLS from launch 2
    coef_ptr, part_ptr,                          # outputs: [B, T] dloss/dv, [B * n_tiles, NCOL] partials
    T, n_tiles,
    s_v_b, s_v_t, s_old_b, s_old_t, s_ret_b, s_ret_t, s_m_b, s_m_t,
    clip,
    HAS_CLIP: tl.constexpr, PACKED: tl.constexpr, BLOCK_T: tl.constexpr, NC: tl.constexpr, ACC: tl.constexpr,
):
    b, start, length, out_row = _span(cu_ptr, T, PACKED)
    j = tl.program_id(1).to(tl.int64)
    w = tl.load(seq_ptr + b * NC + SQ_WEIGHT)
    loss_sum = tl.zeros((), ACC)
    n_clipped = tl.zeros((), ACC)
    for jj in range(j, tl.cdiv(length, BLOCK_T), n_tiles):
        t, pos, inb, m = _tile(mask_ptr, b, start, length, jj, s_m_b, s_m_t, BLOCK_T)
        v = tl.load(v_ptr + b * s_v_b + pos * s_v_t, mask=inb, other=0.0).to(ACC)
        o = tl.load(old_ptr + b * s_old_b + pos * s_old_t, mask=inb, other=0.0).to(ACC)
        r = tl.load(ret_ptr + b * s_ret_b + pos * s_ret_t, mask=inb, other=0.0).to(ACC)
        loss, dloss, clipped = value_terms(v, o, r, clip, HAS_CLIP)
        loss_sum += tl.sum(tl.where(m, w * loss, 0.0), 0)
        n_clipped += tl.sum(tl.where(m & clipped, 1.0, 0.0), 0)
        tl.store(coef_ptr + out_row + t, tl.where(m, w * dloss, 0.0), mask=inb)
    out = part_ptr + (b * n_tiles + j) * NC
    tl.store(out + P_PG, loss_sum)
    tl.store(out + P_CLIPPED, n_clipped)


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
        valid = (rows < n_parts)[:, None] & (cols < P_SUMMED)[None, :]
        tile = tl.load(part_ptr + rows[:, None] * NC + cols[None, :], mask=valid, other=0.0)
        acc += tl.sum(tile, 0)
        rmax = max_nan(rmax, _tile_max(tile, valid))
    pg = tl.sum(tl.where(cols == P_PG, acc, 0.0), 0)
    kl_loss = tl.sum(tl.where(cols == P_KL_LOSS, acc, 0.0), 0)
    ent_loss = tl.sum(tl.where(cols == P_ENT_LOSS, acc, 0.0), 0)
    tot = tl.load(total_ptr + TOT_TOKENS)
    n_tok = tl.maximum(tot, 1.0)
    total = pg + kl_coef * kl_loss - entropy_coef * ent_loss
    tl.store(loss_ptr, total)
    tl.store(stats_ptr + ST_LOSS, total)
    tl.store(stats_ptr + ST_PG, pg)
    tl.store(stats_ptr + ST_KL_LOSS, kl_loss)
    tl.store(stats_ptr + ST_ENT_LOSS, ent_loss)
    tl.store(stats_ptr + ST_CLIPFRAC, tl.sum(tl.where(cols == P_CLIPPED, acc, 0.0), 0) / n_tok)
    tl.store(stats_ptr + ST_CLIPFRAC_LOWER, tl.sum(tl.where(cols == P_CLIPPED_LOWER, acc, 0.0), 0) / n_tok)
    tl.store(stats_ptr + ST_APPROX_KL, tl.sum(tl.where(cols == P_APPROX_KL, acc, 0.0), 0) / n_tok)
    tl.store(stats_ptr + ST_RATIO_MEAN, tl.sum(tl.where(cols == P_RATIO, acc, 0.0), 0) / n_tok)
    tl.store(stats_ptr + ST_RATIO_MAX, tl.sum(tl.where(cols == P_RATIO_MAX, rmax, 0.0), 0))
    tl.store(stats_ptr + ST_ENTROPY, tl.sum(tl.where(cols == P_ENTROPY, acc, 0.0), 0) / n_tok)
    tl.store(stats_ptr + ST_KL, tl.sum(tl.where(cols == P_KL, acc, 0.0), 0) / n_tok)
    tl.store(stats_ptr + ST_KEPT_FRAC, tl.sum(tl.where(cols == P_KEPT, acc, 0.0), 0) / n_tok)
    tl.store(stats_ptr + ST_NUM_TOKENS, tot)
    tl.store(stats_ptr + ST_NUM_SEQS, tl.load(total_ptr + TOT_SEQS))


# ----------------------------------------------------------------------------- launchers
def _finish(part, total, n_parts, kl_coef, entropy_coef, acc, tl_acc, dev):
    loss = torch.empty((), dtype=acc, device=dev)
    stats = torch.empty(len(STATS), dtype=acc, device=dev)
    record_launch("loss_agg_finish", part, total, loss, stats, grid=(1,))
    wrap_triton(_agg_finish_kernel)[(1,)](part, total, loss, stats, n_parts, float(kl_coef), float(entropy_coef),
                             BLOCK_P=cfg.AGG_FINISH_BLOCK, NC=NCOL, ACC=tl_acc, num_warps=cfg.AGG_NUM_WARPS)
    return loss, stats


def policy_tables(old, adv, mask, *, opts, acc: torch.dtype, rollout_is_weights=None, cu_seqlens=None):
    """Launches 1 and 2 alone: (sequence table [B, NCOL], totals [NCOL]) of a token-level `opts` for
    policy_loss_agg(tables=), in `acc` (the log-probs' dtype). They read the mask only, so a caller can take the
    aggregation weights before the log-probs exist (kernels/fused_grad.py)."""
    if seq_kind(opts.policy_loss) != SEQ_COUNTS.value:
        raise ValueError(f"policy_tables needs a token-level policy loss, got {opts.policy_loss!r}")
    grid = grid_of(mask, cu_seqlens, cfg.AGG_BLOCK_T)
    tl_acc = acc_dtype(acc)[1]
    return seq_tables(grid, old, old, adv, rollout_is_weights, mask, opts, SEQ_COUNTS.value, acc, tl_acc)


def policy_loss_agg(logp, old, adv, mask, *, opts, ref=None, ent=None, rollout_is_weights=None,
                    ent_threshold=None, select=None, keep=None, cu_seqlens=None, tables=None) -> AggResult:
    """The policy objective of `opts` (a fastppo.options.LossOptions) on per-token log-probs.
    logp, old, mask: [B, T] (or [T]); adv [B, T] or [B]; ref, ent, rollout_is_weights [B, T] or None;
    ent_threshold: 0-d tensor (entropy_quantile), tokens with ent >= it are kept in the policy term.
    With cu_seqlens ([S + 1] offsets) the per-token tensors are packed [total] (adv [total] or [S]) and
    coef / coef_ent / kl come back [1, total]. select: clip_cov / kl_cov's bool token selection (the
    mask's layout); keep: off_policy_mask_threshold's kept tokens (bool, the mask's layout) or None.
    `tables`: launches 1-2's output (policy_tables) when the caller ran them already."""
    grid = grid_of(mask, cu_seqlens, cfg.AGG_BLOCK_T)
    B, T, n_tiles, cu = grid
    acc, tl_acc = acc_dtype(logp.dtype)
    dev = logp.device
    policy = POLICY_LOSS_IDS[opts.policy_loss]
    isw = rollout_is_weights
    if tables is None:
        tables = seq_tables(grid, logp, old, adv, isw, mask, opts, seq_kind(opts.policy_loss), acc, tl_acc)
    seq, total = tables
    coef = torch.empty(grid.out_shape, dtype=acc, device=dev)
    has_ent = ent is not None
    coef_ent = torch.empty(grid.out_shape, dtype=acc, device=dev) if has_ent else None
    kl = torch.empty(grid.out_shape, dtype=acc, device=dev) if ref is not None else None
    part = torch.empty(B * n_tiles, NCOL, dtype=acc, device=dev)
    ent_mask = ent_threshold is not None
    record_launch("loss_agg", logp, old, adv, mask, cu, ref, ent, isw, seq, coef, coef_ent, kl, part,
                  grid=(B, n_tiles))
    wrap_triton(_policy_terms_kernel)[(B, n_tiles)](
        logp, old, adv, ref if ref is not None else logp, ent if has_ent else logp, isw if isw is not None else logp,
        mask, cu if grid.packed else mask, select if select is not None else mask, keep if keep is not None else mask,
        seq,
        ent_threshold if ent_mask else seq,
        coef, coef_ent if has_ent else coef, kl if kl is not None else coef, part,
        T, n_tiles,
        *grid.strides(logp), *grid.strides(old), *grid.strides(adv),
        *(grid.strides(ref) if ref is not None else (0, 0)), *(grid.strides(ent) if has_ent else (0, 0)),
        *(grid.strides(isw) if isw is not None else (0, 0)), *grid.strides(mask),
        *(grid.strides(select) if select is not None else (0, 0)),
        *(grid.strides(keep) if keep is not None else (0, 0)),
        float(opts.clip_low), float(opts.clip_high), float(opts.dual_clip or 0.0), float(opts.ratio_max or 0.0),
        float(opts.sapo_tau_pos), float(opts.sapo_tau_neg), float(opts.kl_coef), float(opts.entropy_coef),
        float(opts.dro_beta if opts.policy_loss == "dro" else opts.kl_cov_coef),
        POLICY=policy, KL_KIND=KL_KIND_IDS[opts.kl_kind] if ref is not None else KL_NONE.value, HAS_ENT=has_ent,
        HAS_ISW=isw is not None, HAS_DUAL=opts.dual_clip is not None, HAS_RMAX=opts.ratio_max is not None,
        HAS_ENT_MASK=ent_mask, PACKED=grid.packed, KL_IS=opts.kl_bias_correction, HAS_KEEP=keep is not None,
        BLOCK_T=cfg.AGG_BLOCK_T, NC=NCOL, ACC=tl_acc, num_warps=cfg.AGG_NUM_WARPS)
    if policy == POLICY_GSPO.value:
        seq_grad(grid, mask, seq, part, coef, tl_acc)
    loss, stats = _finish(part, total, B * n_tiles, opts.kl_coef if kl is not None else 0.0,
                          opts.entropy_coef if has_ent else 0.0, acc, tl_acc, dev)
    return AggResult(loss, stats, coef, coef_ent, kl)


def value_loss_agg(values, old_values, returns, mask, *, opts, cu_seqlens=None) -> AggResult:
    """The clipped value loss of `opts` (value_clip, agg, counts). Stats: loss and clipfrac. Packed
    inputs with cu_seqlens as in policy_loss_agg."""
    grid = grid_of(mask, cu_seqlens, cfg.AGG_BLOCK_T)
    B, T, n_tiles, cu = grid
    acc, tl_acc = acc_dtype(values.dtype)
    dev = values.device
    seq, total = seq_tables(grid, values, old_values, returns, None, mask, opts, SEQ_COUNTS.value, acc, tl_acc)
    coef = torch.empty(grid.out_shape, dtype=acc, device=dev)
    part = torch.zeros(B * n_tiles, NCOL, dtype=acc, device=dev)
    record_launch("loss_agg", values, old_values, returns, mask, cu, seq, coef, part, grid=(B, n_tiles))
    wrap_triton(_value_terms_kernel)[(B, n_tiles)](
        values, old_values, returns, mask, cu if grid.packed else mask, seq, coef, part, T, n_tiles,
        *grid.strides(values), *grid.strides(old_values), *grid.strides(returns),
        *grid.strides(mask), float(opts.value_clip or 0.0),
        HAS_CLIP=opts.value_clip is not None, PACKED=grid.packed, BLOCK_T=cfg.AGG_BLOCK_T, NC=NCOL, ACC=tl_acc,
        num_warps=cfg.AGG_NUM_WARPS)
    loss, stats = _finish(part, total, B * n_tiles, 0.0, 0.0, acc, tl_acc, dev)
    return AggResult(loss, stats, coef, None, None)


def aot_specs(AOTSpec, sig):
    """The aggregation kernels as launched on a GPU (fp32 per-token inputs, bool mask)."""
    ce_common = dict(BLOCK_T=cfg.AGG_BLOCK_T, NC=NCOL, ACC=tl.float32)
    f32 = {n: "fp32" for n in ("clip_low", "clip_high", "dual_clip", "ratio_max", "tau_pos", "tau_neg", "kl_coef",
                               "entropy_coef", "penalty", "clip")}

    def ptrs(fn):
        out = {n: "*fp32" for n in fn.arg_names if n.endswith("_ptr")}
        out["mask_ptr"] = "*i1"
        for name in ("sel_ptr", "keep_ptr"):
            if name in out:
                out[name] = "*i1"
        out["cu_ptr"] = "*i64"
        return out

    specs = []
    for name, policy in POLICY_LOSS_IDS.items():
        ce = dict(ce_common, POLICY=policy, KL_KIND=5, HAS_ENT=True, HAS_ISW=True, HAS_DUAL=name == "ppo",
                  HAS_RMAX=name in ("ppo", "dppo_tv", "dppo_kl"),
                  HAS_ENT_MASK=name not in ("gmpo", "clip_cov", "kl_cov"), PACKED=name != "ppo", KL_IS=name == "ppo",
                  HAS_KEEP=name != "gmpo")
        specs.append(AOTSpec(f"loss_agg[{name}]", _policy_terms_kernel,
                             sig(_policy_terms_kernel, {**ptrs(_policy_terms_kernel), **f32}, ce), ce, (), False,
                             cfg.AGG_NUM_WARPS))
    ce = dict(ce_common, HAS_CLIP=True, PACKED=True)
    specs.append(AOTSpec("loss_agg[value]", _value_terms_kernel,
                         sig(_value_terms_kernel, {**ptrs(_value_terms_kernel), **f32}, ce), ce, (), False,
                         cfg.AGG_NUM_WARPS))
    ce = dict(BLOCK_P=cfg.AGG_FINISH_BLOCK, NC=NCOL, ACC=tl.float32)
    specs.append(AOTSpec("loss_agg_finish", _agg_finish_kernel,
                         sig(_agg_finish_kernel, {**ptrs(_agg_finish_kernel), **f32}, ce), ce, (), False,
                         cfg.AGG_NUM_WARPS))
    return specs
