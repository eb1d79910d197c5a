"""Exact per-token KL(pi || ref) over the vocabulary, reading both logits rows once.

With z' = z / tau for policy and reference, p = softmax(z'_pi), q = softmax(z'_ref):
    KL = sum_i p_i (log p_i - log q_i) = u / s_p - lse_p + lse_q,  u = sum_i exp(z'_i - m)(z'_i - r'_i)
    dKL/dz_j = p_j (log p_j - log q_j - KL) / tau    (policy logits only; the reference gets none)
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import _config as cfg
from ._common import online_softmax_step, row_offset, scalar_hi_lo
from ._rows import Rows, acc_dtype, split_float
from .launches import record_launch


@triton.jit
def _full_kl_fwd_kernel(
    p_ptr, q_ptr, kl_ptr, lse_p_ptr, lse_q_ptr,
    p_inner, p_outer_s, p_inner_s, q_inner, q_outer_s, q_inner_s, V, tau_hi, tau_lo,
    BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_tau = scalar_hi_lo(tau_hi, tau_lo, ACC)
    p_row = p_ptr + row_offset(row, p_inner, p_outer_s, p_inner_s)
    q_row = q_ptr + row_offset(row, q_inner, q_outer_s, q_inner_s)
    cols = tl.arange(0, BLOCK_V)
    m_p = tl.full((), float("-inf"), ACC)
    s_p = tl.zeros((), ACC)
    m_q = tl.full((), float("-inf"), ACC)
    s_q = tl.zeros((), ACC)
    u = tl.zeros((), ACC)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        inb = c < V
        zp = tl.load(p_row + c, mask=inb, other=float("-inf")).to(ACC) * inv_tau
        zq = tl.load(q_row + c, mask=inb, other=float("-inf")).to(ACC) * inv_tau
        m_p, s_p, alpha, e, _ = online_softmax_step(m_p, s_p, zp)
        masked = zp == float("-inf")
        u = alpha * u + tl.sum(e * (tl.where(masked, 0.0, zp) - tl.where(masked, 0.0, zq)), 0)
        m_q, s_q, _, _, _ = online_softmax_step(m_q, s_q, zq)
    lse_p = m_p + tl.log(s_p)
    lse_q = m_q + tl.log(s_q)
    tl.store(kl_ptr + row, u / s_p - lse_p + lse_q)
    tl.store(lse_p_ptr + row, lse_p)
    tl.store(lse_q_ptr + row, lse_q)


@triton.jit
def _full_kl_bwd_kernel(
    p_ptr, q_ptr, kl_ptr, lse_p_ptr, lse_q_ptr, g_ptr, dp_ptr,
    p_inner, p_outer_s, p_inner_s, q_inner, q_outer_s, q_inner_s, V, tau_hi, tau_lo,
    BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_tau = scalar_hi_lo(tau_hi, tau_lo, ACC)
    p_row = p_ptr + row_offset(row, p_inner, p_outer_s, p_inner_s)
    q_row = q_ptr + row_offset(row, q_inner, q_outer_s, q_inner_s)
    out_row = dp_ptr + row * V
    kl = tl.load(kl_ptr + row)
    lse_p = tl.load(lse_p_ptr + row)
    lse_q = tl.load(lse_q_ptr + row)
    g = tl.load(g_ptr + row).to(ACC) * inv_tau
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        inb = c < V
        zp = tl.load(p_row + c, mask=inb, other=float("-inf")).to(ACC) * inv_tau
        zq = tl.load(q_row + c, mask=inb, other=0.0).to(ACC) * inv_tau
        p = tl.exp(zp - lse_p)
        d = tl.where(zp == float("-inf"), 0.0, p * ((zp - lse_p) - (zq - lse_q) - kl))
        tl.store(out_row + c, (g * d).to(dp_ptr.dtype.element_ty), mask=inb)


def _rows_pair(logits, ref_logits):
    p, q = Rows(logits), Rows(ref_logits)
    return p, q, (*p.args(), *q.args(), p.n_cols)


def full_kl_fwd(logits, ref_logits, *, inv_tau: float):
    """Returns (kl, lse_p, lse_q), each [N] fp32 (fp64 for fp64 logits)."""
    p, q, args = _rows_pair(logits, ref_logits)
    acc, tl_acc = acc_dtype(logits.dtype)
    kl, lse_p, lse_q = (torch.empty(p.n_rows, dtype=acc, device=logits.device) for _ in range(3))
    if p.n_rows:
        record_launch("full_kl_fwd", logits, ref_logits, kl, lse_p, lse_q)
        wrap_triton(_full_kl_fwd_kernel)[(p.n_rows,)](
            p.tensor, q.tensor, kl, lse_p, lse_q, *args, *split_float(inv_tau),
            BLOCK_V=cfg.ROW_BLOCK_V, ACC=tl_acc, num_warps=cfg.ROW_NUM_WARPS)
    return kl, lse_p, lse_q


def full_kl_bwd(logits, ref_logits, kl, lse_p, lse_q, g, *, inv_tau: float):
    """d(sum g * KL)/d logits, contiguous, in the logits' dtype. (full_kl has no mask argument: every row
    is valid and read; the per-row upstream gradient `g` is any-strided and copied to [N] here.)"""
    p, q, args = _rows_pair(logits, ref_logits)
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    g = g.reshape(-1).contiguous()
    if p.n_rows:
        record_launch("full_kl_bwd", logits, ref_logits, kl, lse_p, lse_q, g, out)
        wrap_triton(_full_kl_bwd_kernel)[(p.n_rows,)](
            p.tensor, q.tensor, kl, lse_p, lse_q, g, out, *args, *split_float(inv_tau),
            BLOCK_V=cfg.ROW_BLOCK_V, ACC=acc_dtype(logits.dtype)[1], num_warps=cfg.ROW_NUM_WARPS)
    return out
