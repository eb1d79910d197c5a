"""Exact per-token KL(pi || ref) over the vocabulary, reading both logits rows once.

With z' = z / tau for policy and reference (tau a scalar, or one value per row: HAS_TAU_ROWS),
p = softmax(z'_pi), q = softmax(z'_ref):
    KL = sum_i p_i (log p_i - log q_i) = u / s_p - log s_p + log s_q,
    u = sum_i exp(z'_i - m_p) ((z'_i - m_p) - (r'_i - m_q))
    dKL/dz_j = p_j (log p_j - log q_j - KL) / tau    (policy logits only; the reference gets none)
with m_p, m_q the running row maxima of policy and reference (u is re-referenced when either rises) and
log p = (z' - m_p) - log s_p: no absolute lse is ever formed, so the KL and its gradient are as exact as
fp32 log_softmax at any magnitude. Each row's (m, log s) of both sides is saved for backward ([N, 2] each).
Terms whose probability is exactly 0 (z' - m overflowed to -inf, a -inf logit) contribute nothing.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import _config as cfg
from ._common import keep_nonzero, online_softmax_step, row_inv_tau, row_offset
from ._rows import Rows, acc_dtype, split_float, tau_rows_arg
from .launches import record_launch


@triton.jit
def _full_kl_fwd_kernel(
    p_ptr, q_ptr, tau_ptr, kl_ptr, stats_p_ptr, stats_q_ptr,
    p_inner, p_outer_s, p_inner_s, q_inner, q_outer_s, q_inner_s, V, tau_hi, tau_lo,
    BLOCK_V: tl.constexpr, HAS_TAU_ROWS: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_tau = row_inv_tau(tau_ptr, row, tau_hi, tau_lo, HAS_TAU_ROWS, ACC)
    p_row = p_ptr + row_offset(row, p_inner, p_outer_s, p_inner_s)
    q_row = q_ptr + row_offset(row, q_inner, q_outer_s, q_inner_s)
    cols = tl.arange(0, BLOCK_V)
    m_p = tl.full((), float("-inf"), ACC)
    s_p = tl.zeros((), ACC)
    r_p = tl.zeros((), ACC)
    m_q = tl.full((), float("-inf"), ACC)
    s_q = tl.zeros((), ACC)
    r_q = tl.zeros((), ACC)
    u = tl.zeros((), ACC)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        inb = c < V
        zp = tl.load(p_row + c, mask=inb, other=float("-inf")).to(ACC) * inv_tau
        zq = tl.load(q_row + c, mask=inb, other=float("-inf")).to(ACC) * inv_tau
        s_old = s_p
        m_p, s_p, alpha, e, rp_new = online_softmax_step(m_p, s_p, zp)
        m_q, s_q, _, _, rq_new = online_softmax_step(m_q, s_q, zq)
        shift = keep_nonzero(s_old, (r_p - rp_new) - (r_q - rq_new))
        u = keep_nonzero(alpha, u + shift) + tl.sum(keep_nonzero(e, (zp - rp_new) - (zq - rq_new)), 0)
        r_p = rp_new
        r_q = rq_new
    log_sp = tl.log(s_p)
    log_sq = tl.log(s_q)
    tl.store(kl_ptr + row, (u / s_p - log_sp) + log_sq)
    tl.store(stats_p_ptr + 2 * row, r_p)
    tl.store(stats_p_ptr + 2 * row + 1, log_sp)
    tl.store(stats_q_ptr + 2 * row, r_q)
    tl.store(stats_q_ptr + 2 * row + 1, log_sq)


@triton.jit
def _full_kl_bwd_kernel(
    p_ptr, q_ptr, tau_ptr, kl_ptr, stats_p_ptr, stats_q_ptr, g_ptr, dp_ptr,
    p_inner, p_outer_s, p_inner_s, q_inner, q_outer_s, q_inner_s, V, tau_hi, tau_lo,
    BLOCK_V: tl.constexpr, HAS_TAU_ROWS: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_tau = row_inv_tau(tau_ptr, row, tau_hi, tau_lo, HAS_TAU_ROWS, ACC)
    p_row = p_ptr + row_offset(row, p_inner, p_outer_s, p_inner_s)
    q_row = q_ptr + row_offset(row, q_inner, q_outer_s, q_inner_s)
    out_row = dp_ptr + row * V
    kl = tl.load(kl_ptr + row)
    m_p = tl.load(stats_p_ptr + 2 * row)
    log_sp = tl.load(stats_p_ptr + 2 * row + 1)
    m_q = tl.load(stats_q_ptr + 2 * row)
    log_sq = tl.load(stats_q_ptr + 2 * row + 1)
    g = tl.load(g_ptr + row).to(ACC) * inv_tau
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        inb = c < V
        zp = tl.load(p_row + c, mask=inb, other=float("-inf")).to(ACC) * inv_tau
        zq = tl.load(q_row + c, mask=inb, other=0.0).to(ACC) * inv_tau
        logp = (zp - m_p) - log_sp
        d = keep_nonzero(tl.exp(logp), (logp - ((zq - m_q) - log_sq)) - kl)
        tl.store(out_row + c, (g * d).to(dp_ptr.dtype.element_ty), mask=inb)


def _rows_pair(logits, ref_logits):
    p, q = Rows(logits), Rows(ref_logits)
    return p, q, (*p.args(), *q.args(), p.n_cols)


def full_kl_fwd(logits, ref_logits, *, inv_tau: float, tau=None):
    """Returns (kl [N], stats_p [N, 2], stats_q [N, 2]): KL and each side's row (max, log-sum), fp32
    (fp64 for fp64 logits). `tau`: an optional per-row temperature ([N] elements, in place of inv_tau)."""
    p, q, args = _rows_pair(logits, ref_logits)
    acc, tl_acc = acc_dtype(logits.dtype)
    kl = torch.empty(p.n_rows, dtype=acc, device=logits.device)
    lse_p, lse_q = (torch.empty(p.n_rows, 2, dtype=acc, device=logits.device) for _ in range(2))
    tp, tau_rows = tau_rows_arg(tau, p.n_rows, kl)
    if p.n_rows:
        record_launch("full_kl_fwd", logits, ref_logits, tp if tau_rows else None, kl, lse_p, lse_q)
        wrap_triton(_full_kl_fwd_kernel)[(p.n_rows,)](
            p.tensor, q.tensor, tp, kl, lse_p, lse_q, *args, *split_float(inv_tau),
            BLOCK_V=cfg.ROW_BLOCK_V, HAS_TAU_ROWS=tau_rows, ACC=tl_acc, num_warps=cfg.ROW_NUM_WARPS)
    return kl, lse_p, lse_q


def full_kl_bwd(logits, ref_logits, kl, lse_p, lse_q, g, *, inv_tau: float, tau=None):
    """d(sum g * KL)/d logits, contiguous, in the logits' dtype. (full_kl has no mask argument: every row
    is valid and read; the per-row upstream gradient `g` is any-strided and copied to [N] here.)"""
    p, q, args = _rows_pair(logits, ref_logits)
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    g = g.reshape(-1).contiguous()
    tp, tau_rows = tau_rows_arg(tau, p.n_rows, kl)
    if p.n_rows:
        record_launch("full_kl_bwd", logits, ref_logits, tp if tau_rows else None, kl, lse_p, lse_q, g, out)
        wrap_triton(_full_kl_bwd_kernel)[(p.n_rows,)](
            p.tensor, q.tensor, tp, kl, lse_p, lse_q, g, out, *args, *split_float(inv_tau),
            BLOCK_V=cfg.ROW_BLOCK_V, HAS_TAU_ROWS=tau_rows, ACC=acc_dtype(logits.dtype)[1], num_warps=cfg.ROW_NUM_WARPS)
    return out
