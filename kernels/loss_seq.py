"""The per-sequence launches of the loss aggregation (kernels/loss_agg.py has the per-token ones):
    1. _seq_partials_kernel   per-(sequence, tile) token counts (and the per-sequence sums gspo/gmpo need)
    2. _seq_finish_kernel     1 program: per-sequence table (n_b, w_b, sequence ratio terms) + totals
    5. _seq_grad_kernel       gspo only: the sequence ratio's gradient spread back to its tokens
with the tile helpers the per-token kernels share. Buffer layouts and ids: kernels/loss_layout.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..modes import AGG_IDS
from . import _config as cfg
from ._terms import gmpo_log_ratio, is_nan
from .launches import record_launch
from .loss_layout import (
    AGG_SEQ_MEAN_TOKEN_MEAN,
    AGG_SEQ_MEAN_TOKEN_SUM,
    AGG_SEQ_MEAN_TOKEN_SUM_NORM,
    AGG_TOKEN_MEAN,
    NCOL,
    P_SEQ_GRAD,
    RATIO_LOG_MAX,
    SEQ_COUNTS,
    SEQ_GMPO,
    SEQ_GSPO,
    SP_ADV,
    SP_LOG_IS,
    SP_LOG_RATIO,
    SP_TOKENS,
    SQ_ADV_MEAN,
    SQ_IS_WEIGHT,
    SQ_LOG_RATIO,
    SQ_TOKENS,
    SQ_WEIGHT,
    TOT_SEQS,
    TOT_TOKENS,
)


@triton.jit
def _span(cu_ptr, T, PACKED: tl.constexpr):
    """The sequence b of this program (grid axis 0) and its tokens: (b, start, length, out_row). Padded
    ([B, T]): start 0, length T, its per-token outputs at b * T; packed (PACKED, cu_ptr the [S + 1]
    offsets): tokens [cu[b], cu[b + 1]) of the packed dimension, its outputs at cu[b]."""
    b = tl.program_id(0).to(tl.int64)
    if PACKED:
        start = tl.load(cu_ptr + b).to(tl.int64)
        length = tl.load(cu_ptr + b + 1).to(tl.int64) - start
        out_row = start
    else:
        start = b * 0
        length = start + T
        out_row = b * T
    return b, start, length, out_row


@triton.jit
def _tile(mask_ptr, b, start, length, jj, s_m_b, s_m_t, BLOCK_T: tl.constexpr):
    """Time tile jj of sequence b: 64-bit time indices t, packed positions start + t, in-bounds flags and
    the mask as 0/1 (mask-0 and out-of-range positions False). Programs (b, j) of a [B, n_tiles] grid take
    the tiles j, j + n_tiles, ... of their sequence (one tile each when padded)."""
    t = jj * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    inb = t < length
    pos = start + t
    m = (tl.load(mask_ptr + b * s_m_b + pos * s_m_t, mask=inb, other=0).to(tl.float32) != 0) & inb
    return t, pos, inb, m


@triton.jit
def _tile_max(x, m):
    """max over the masked entries of a tile of non-negative x (0 when none), NaN if any is NaN."""
    blk = tl.where(m, x, 0.0)
    return tl.where(tl.sum(is_nan(blk).to(tl.int32), 0) > 0, float("nan"), tl.max(blk, 0))


@triton.jit(do_not_specialize=["T", "n_tiles"])
def _seq_partials_kernel(
    # [B, T] (or packed [total]) inputs (advantages may be per sequence: time stride 0)
    logp_ptr, old_ptr, adv_ptr, isw_ptr, mask_ptr, cu_ptr,
    # output [B * n_tiles, NCOL] in SEQ_PART_COLS order
    part_ptr,
    T, n_tiles,
    s_lp_b, s_lp_t, s_old_b, s_old_t, s_adv_b, s_adv_t, s_isw_b, s_isw_t, s_m_b, s_m_t,
    clip_low, clip_high,
    SEQ: tl.constexpr,        # SEQ_COUNTS, SEQ_GSPO or SEQ_GMPO (kernels/loss_layout.py)
    HAS_ISW: tl.constexpr, PACKED: tl.constexpr, BLOCK_T: tl.constexpr, NC: tl.constexpr, ACC: tl.constexpr,
):
    b, start, length, _o = _span(cu_ptr, T, PACKED)
    j = tl.program_id(1).to(tl.int64)
    n_tok = tl.zeros((), ACC)
    q_lr = tl.zeros((), ACC)
    q_adv = tl.zeros((), ACC)
    q_is = tl.zeros((), ACC)
    for jj in range(j, tl.cdiv(length, BLOCK_T), n_tiles):
        t, pos, inb, m = _tile(mask_ptr, b, start, length, jj, s_m_b, s_m_t, BLOCK_T)
        n_tok += tl.sum(m.to(ACC), 0)
        if SEQ != SEQ_COUNTS:
            x = tl.load(logp_ptr + b * s_lp_b + pos * s_lp_t, mask=inb, other=0.0).to(ACC)
            o = tl.load(old_ptr + b * s_old_b + pos * s_old_t, mask=inb, other=0.0).to(ACC)
            if SEQ == SEQ_GSPO:
                q_lr += tl.sum(tl.where(m, x - o, 0.0), 0)
            else:
                a = tl.load(adv_ptr + b * s_adv_b + pos * s_adv_t, mask=inb, other=0.0).to(ACC)
                val, _g, _c, _dead = gmpo_log_ratio(x, o, a, clip_low, clip_high)
                q_lr += tl.sum(tl.where(m, val, 0.0), 0)
                q_adv += tl.sum(tl.where(m, a, 0.0), 0)
                if HAS_ISW:
                    w = tl.load(isw_ptr + b * s_isw_b + pos * s_isw_t, mask=inb, other=1.0).to(ACC)
                    q_is += tl.sum(tl.where(m, tl.log(w + 1e-10), 0.0), 0)
    out = part_ptr + (b * n_tiles + j) * NC
    tl.store(out + SP_TOKENS, n_tok)
    if SEQ != SEQ_COUNTS:
        tl.store(out + SP_LOG_RATIO, q_lr)
    if SEQ == SEQ_GMPO:
        tl.store(out + SP_ADV, q_adv)
        if HAS_ISW:
            tl.store(out + SP_LOG_IS, q_is)


@triton.jit(do_not_specialize=["B", "T", "n_tiles"])
def _seq_finish_kernel(
    part_ptr,                 # [B * n_tiles, NCOL] from launch 1
    cu_ptr,                   # packed: the [B + 1] sequence offsets (the default horizon is the longest)
    seq_ptr, total_ptr,       # out: [B, NCOL] in SEQ_COLS order, [NCOL] in TOTAL_COLS order
    B, T, n_tiles,
    num_tokens, num_seqs, horizon,   # global counts (<= 0: use this batch's)
    AGG: tl.constexpr, SEQ: tl.constexpr, HAS_ISW: tl.constexpr, PACKED: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, NC: tl.constexpr, ACC: tl.constexpr,
):
    tot = tl.zeros((), ACC)
    nseq = tl.zeros((), ACC)
    longest = tl.zeros((), tl.int64)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        rmask = rows < B
        if PACKED:
            lens = (tl.load(cu_ptr + rows + 1, mask=rmask, other=0).to(tl.int64)
                    - tl.load(cu_ptr + rows, mask=rmask, other=0).to(tl.int64))
            longest = tl.maximum(longest, tl.max(lens, 0))
        cnt = tl.zeros((BLOCK_B,), ACC)
        q1 = tl.zeros((BLOCK_B,), ACC)
        q2 = tl.zeros((BLOCK_B,), ACC)
        q3 = tl.zeros((BLOCK_B,), ACC)
        for j0 in range(0, n_tiles, BLOCK_J):
            cols = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
            msk = rmask[:, None] & (cols < n_tiles)[None, :]
            base = part_ptr + (rows[:, None] * n_tiles + cols[None, :]) * NC
            cnt += tl.sum(tl.load(base + SP_TOKENS, mask=msk, other=0.0), 1)
            if SEQ != SEQ_COUNTS:
                q1 += tl.sum(tl.load(base + SP_LOG_RATIO, mask=msk, other=0.0), 1)
            if SEQ == SEQ_GMPO:
                q2 += tl.sum(tl.load(base + SP_ADV, mask=msk, other=0.0), 1)
                if HAS_ISW:
                    q3 += tl.sum(tl.load(base + SP_LOG_IS, mask=msk, other=0.0), 1)
        tot += tl.sum(cnt, 0)
        nseq += tl.sum(tl.where(cnt > 0, 1.0, 0.0), 0)
        out = seq_ptr + rows * NC
        tl.store(out + SQ_TOKENS, cnt, mask=rmask)
        if SEQ == SEQ_GSPO:      # gspo: mean log-ratio over the sequence's tokens (verl: / clamp(n, 1))
            tl.store(out + SQ_LOG_RATIO, q1 / tl.maximum(cnt, 1.0), mask=rmask)
        if SEQ == SEQ_GMPO:      # gmpo: means over n + 1e-8 (verl geo_mean)
            tl.store(out + SQ_LOG_RATIO, q1 / (cnt + 1e-8), mask=rmask)
            tl.store(out + SQ_ADV_MEAN, q2 / (cnt + 1e-8), mask=rmask)
            if HAS_ISW:
                tl.store(out + SQ_IS_WEIGHT, tl.exp(q3 / (cnt + 1e-8)), mask=rmask)
            else:
                tl.store(out + SQ_IS_WEIGHT, tl.full((BLOCK_B,), 1.0, ACC), mask=rmask)
    den_tok = tl.maximum(tl.where(num_tokens > 0, num_tokens, tot), 1.0)
    den_seq = tl.maximum(tl.where(num_seqs > 0, num_seqs, nseq), 1.0)
    if PACKED:
        hor = tl.where(horizon > 0, horizon, longest.to(ACC))
    else:
        hor = tl.where(horizon > 0, horizon, tl.cast(T, ACC))
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        rmask = rows < B
        cnt = tl.load(seq_ptr + rows * NC + SQ_TOKENS, mask=rmask, other=0.0)
        if AGG == AGG_TOKEN_MEAN:
            w = tl.full((BLOCK_B,), 1.0, ACC) / den_tok
        elif AGG == AGG_SEQ_MEAN_TOKEN_MEAN:
            w = tl.where(cnt > 0, 1.0 / (den_seq * tl.maximum(cnt, 1.0)), 0.0)
        elif AGG == AGG_SEQ_MEAN_TOKEN_SUM:
            w = tl.full((BLOCK_B,), 1.0, ACC) / den_seq
        elif AGG == AGG_SEQ_MEAN_TOKEN_SUM_NORM:
            w = tl.full((BLOCK_B,), 1.0, ACC) / (den_seq * hor)
        else:             # token-sum
            w = tl.full((BLOCK_B,), 1.0, ACC)
        tl.store(seq_ptr + rows * NC + SQ_WEIGHT, w, mask=rmask)
    tl.store(total_ptr + TOT_TOKENS, tot)
    tl.store(total_ptr + TOT_SEQS, nseq)


@triton.jit(do_not_specialize=["T", "n_tiles"])
def _seq_grad_kernel(
    mask_ptr, cu_ptr, seq_ptr, part_ptr,  # [B, T] mask, [B + 1] offsets (packed), [B, NCOL], [B * n_tiles, NCOL]
    coef_ptr,                             # in/out [B, T] (packed [total]): += the gspo sequence-ratio gradient
    T, n_tiles, s_m_b, s_m_t,
    PACKED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, NC: tl.constexpr, ACC: tl.constexpr,
):
    """gspo: s_b = exp(min(mean_b(d), 10)); dloss/dlogp_t = m_t s_b [mean <= 10] / n_b * G_b with
    G_b = sum over the sequence's kept tokens of w_b isw_t dL_t/ds_b (the partials' seq_grad column)."""
    b, start, length, out_row = _span(cu_ptr, T, PACKED)
    j = tl.program_id(1).to(tl.int64)
    g_b = tl.zeros((), ACC)
    for j0 in range(0, n_tiles, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        g_b += tl.sum(tl.load(part_ptr + (b * n_tiles + cols) * NC + P_SEQ_GRAD, mask=cols < n_tiles, other=0.0), 0)
    n_b = tl.load(seq_ptr + b * NC + SQ_TOKENS)
    lr = tl.load(seq_ptr + b * NC + SQ_LOG_RATIO)
    s = tl.where(lr <= RATIO_LOG_MAX, tl.exp(lr), 0.0)
    for jj in range(j, tl.cdiv(length, BLOCK_T), n_tiles):
        t, _pos, inb, m = _tile(mask_ptr, b, start, length, jj, s_m_b, s_m_t, BLOCK_T)
        flat = out_row + t
        c = tl.load(coef_ptr + flat, mask=inb, other=0.0)
        tl.store(coef_ptr + flat, c + tl.where(m, g_b * s / tl.maximum(n_b, 1.0), 0.0), mask=inb)


# ----------------------------------------------------------------------------- launchers
def _count(v):
    """A global count for the kernels: -1 (use this batch's) when None."""
    return -1.0 if v is None else float(v)


def seq_tables(grid, x, old, adv, isw, mask, opts, seq_kind, acc, tl_acc):
    """Launches 1 and 2 on `grid` (kernels.loss_layout.Grid): per-sequence table [B, NCOL] and batch
    totals [NCOL]."""
    B, T, n_tiles, cu = grid
    dev = x.device
    part = torch.empty(B * n_tiles, NCOL, dtype=acc, device=dev)
    seq = torch.empty(B, NCOL, dtype=acc, device=dev)
    total = torch.empty(NCOL, dtype=acc, device=dev)
    has_isw = isw is not None
    gmpo = seq_kind == SEQ_GMPO.value
    record_launch("loss_agg_seq", mask, cu, *((x, old) if seq_kind else ()), *((adv, isw) if gmpo else ()), part,
                  grid=(B, n_tiles))
    wrap_triton(_seq_partials_kernel)[(B, n_tiles)](
        x, old, adv, isw if has_isw else x, mask, cu if grid.packed else mask, part, T, n_tiles,
        *grid.strides(x), *grid.strides(old), *grid.strides(adv),
        *(grid.strides(isw) if has_isw else (0, 0)), *grid.strides(mask),
        float(opts.clip_low), float(opts.clip_high),
        SEQ=seq_kind, HAS_ISW=has_isw, PACKED=grid.packed, BLOCK_T=cfg.AGG_BLOCK_T, NC=NCOL, ACC=tl_acc,
        num_warps=cfg.AGG_NUM_WARPS)
    record_launch("loss_agg_seq_finish", part, cu, seq, total, grid=(1,))
    wrap_triton(_seq_finish_kernel)[(1,)](
        part, cu if grid.packed else part, seq, total, B, T, n_tiles, _count(opts.num_tokens),
        _count(opts.num_seqs), _count(opts.horizon),
        AGG=AGG_IDS[opts.agg], SEQ=seq_kind, HAS_ISW=has_isw, PACKED=grid.packed, BLOCK_B=cfg.AGG_FINISH_BLOCK,
        BLOCK_J=cfg.AGG_FINISH_BLOCK_J, NC=NCOL, ACC=tl_acc, num_warps=cfg.AGG_NUM_WARPS)
    return seq, total


def seq_grad(grid, mask, seq, part, coef, tl_acc):
    """Launch 5 (gspo): the sequence ratio's gradient added to coef (grid.out_shape) in place."""
    B, T, n_tiles, cu = grid
    record_launch("loss_agg_seq_grad", mask, cu, seq, part, coef, grid=(B, n_tiles))
    wrap_triton(_seq_grad_kernel)[(B, n_tiles)](mask, cu if grid.packed else mask, seq, part, coef, T, n_tiles,
                                                *grid.strides(mask), PACKED=grid.packed,
                                                BLOCK_T=cfg.AGG_BLOCK_T, BLOCK_J=cfg.AGG_FINISH_BLOCK_J, NC=NCOL,
                                                ACC=tl_acc, num_warps=cfg.AGG_NUM_WARPS)


def aot_specs(AOTSpec, sig):
    """The per-sequence kernels as launched on a GPU (fp32 per-token inputs, bool mask)."""
    f32 = {n: "fp32" for n in ("clip_low", "clip_high", "num_tokens", "num_seqs", "horizon")}

    def ptrs(fn):
        out = {n: "*fp32" for n in fn.arg_names if n.endswith("_ptr")}
        out["mask_ptr"] = "*i1"
        out["cu_ptr"] = "*i64"
        return out

    specs = []
    for kind in (SEQ_COUNTS.value, SEQ_GSPO.value, SEQ_GMPO.value):
        ce = dict(BLOCK_T=cfg.AGG_BLOCK_T, NC=NCOL, ACC=tl.float32, SEQ=kind, HAS_ISW=True, PACKED=kind == 1)
        specs.append(AOTSpec(f"loss_agg_seq[{kind}]", _seq_partials_kernel,
                             sig(_seq_partials_kernel, {**ptrs(_seq_partials_kernel), **f32}, ce), ce, (), False,
                             cfg.AGG_NUM_WARPS))
    ce = dict(NC=NCOL, ACC=tl.float32, AGG=AGG_SEQ_MEAN_TOKEN_MEAN.value, SEQ=SEQ_GMPO.value, HAS_ISW=True,
              PACKED=True, BLOCK_B=cfg.AGG_FINISH_BLOCK, BLOCK_J=cfg.AGG_FINISH_BLOCK_J)
    specs.append(AOTSpec("loss_agg_seq_finish", _seq_finish_kernel,
                         sig(_seq_finish_kernel, {**ptrs(_seq_finish_kernel), **f32}, ce), ce, (), False,
                         cfg.AGG_NUM_WARPS))
    ce = dict(BLOCK_T=cfg.AGG_BLOCK_T, BLOCK_J=cfg.AGG_FINISH_BLOCK_J, NC=NCOL, ACC=tl.float32, PACKED=True)
    specs.append(AOTSpec("loss_agg_seq_grad", _seq_grad_kernel,
                         sig(_seq_grad_kernel, ptrs(_seq_grad_kernel), ce), ce, (), False, cfg.AGG_NUM_WARPS))
    return specs
