"""Per-token divergence between a student's softmax and a teacher known only by its top-K log-probs, over
K + 1 bins: the teacher's K tokens and one tail bin holding the rest of each distribution's mass (verl RFC
#7856 / PR #7855: the truncated top-k KL is not a divergence and was clamped at 0 on 89 % of steps; with the
tail bin it is the exact divergence of the two (K + 1)-category distributions, a lower bound of the full one).

Bins b = 1..K, tail. Teacher: p_t,k = exp(teacher_logprobs_k), p_t,tail = max(1 - sum_k p_t,k, 0). Student
(z' = z / tau, tau a scalar or one value per row: HAS_TAU_ROWS; p = softmax(z')): q_k = p[id_k], q_tail = sum of
p over the columns that are not teacher ids, summed directly over those columns (never 1 - sum q_k, which loses
every digit of a small tail).
The divergence D(p_t, q) over the bins follows kernels/divergence.py (beta 0: KL(t || s), 1: KL(s || t),
between: TRL's generalised JSD). With G_b = dD/dq_b and dq_b/dz'_j = p_j (1[j in b] - q_b):
    dD/dz'_j = p_j (G_b(j) - C),  C = sum_b q_b G_b
    FORWARD_KL  p_j G_b = -p_t,b p_j / q_b (formed as exp(log p_j - log q_b + log p_t,b)), C = -sum_b p_t,b
    REVERSE_KL  G_b = log q_b - log p_t,b (+1, which cancels), C = D
    JSD         G_b = (1 - beta)(log q_b - log m_b), C = (1 - beta) KL(q || m),  m = (1 - beta) q + beta p_t
all divided by tau. The forward tells a column's bin by comparing it with the row's K ids (K compares per column); the
backward writes every column with the tail's formula in one sweep, then (after a barrier) overwrites the K
teacher columns with theirs. Teacher ids must be distinct and in [0, V).
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import _config as cfg
from ._common import online_softmax_step, row_inv_tau, row_offset, scalar_hi_lo
from ._rows import Rows, acc_dtype, flat_rows, split_float, tau_rows_arg
from .divergence import FORWARD_KL, JSD, REVERSE_KL, log_mixture, mixture_logs, mode_of, row_live, xlogy_diff
from .launches import record_launch

N_STATS: tl.constexpr = tl.constexpr(5)   # per row: max, log-sum-exp, log q_tail, log p_t,tail, C


@triton.jit
def _teacher_bins(ids_ptr, tlp_ptr, row, K, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """(ids [BLOCK_K] (-1 past K), log p_t [BLOCK_K] (-inf past K), log p_t,tail) of one row."""
    kk = tl.arange(0, BLOCK_K)
    inb = kk < K
    ids = tl.load(ids_ptr + row * K + kk, mask=inb, other=-1).to(tl.int64)
    lp_t = tl.load(tlp_ptr + row * K + kk, mask=inb, other=float("-inf")).to(ACC)
    lp_t_tail = tl.log(tl.maximum(1.0 - tl.sum(tl.exp(lp_t), 0), 0.0))
    return ids, lp_t, lp_t_tail


@triton.jit
def _student_bins(s_row, ids, m, ls, inv_tau, V):
    """log q_k = (z'_id_k - max) - log-sum for the teacher ids (-inf for padding ids)."""
    ok = (ids >= 0) & (ids < V)
    z = tl.load(s_row + ids, mask=ok, other=float("-inf")).to(m.dtype) * inv_tau
    return (z - m) - ls


@triton.jit
def _topk_fwd_kernel(
    # data: student logits (row strides, unit column stride), teacher ids / log-probs [N, K], validity, per-row
    # tau, outputs
    s_ptr, ids_ptr, tlp_ptr, valid_ptr, tau_ptr, div_ptr, stats_ptr,
    # shapes and strides
    s_inner, s_outer_s, s_inner_s, V, K,
    # scalars: 1 / tau (unused with HAS_TAU_ROWS) and beta as (hi, lo) fp32 pairs
    tau_hi, tau_lo, beta_hi, beta_lo,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr, HAS_VALID: tl.constexpr,
    HAS_TAU_ROWS: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    live = row_live(valid_ptr, row, HAS_VALID)
    div = tl.zeros((), ACC)
    m = tl.zeros((), ACC)
    ls = tl.zeros((), ACC)
    lq_tail = tl.zeros((), ACC)
    lp_t_tail = tl.zeros((), ACC)
    c_row = tl.zeros((), ACC)
    if live:
        inv_tau = row_inv_tau(tau_ptr, row, tau_hi, tau_lo, HAS_TAU_ROWS, ACC)
        beta = scalar_hi_lo(beta_hi, beta_lo, ACC)
        s_row = s_ptr + row_offset(row, s_inner, s_outer_s, s_inner_s)
        ids, lp_t, lp_t_tail = _teacher_bins(ids_ptr, tlp_ptr, row, K, BLOCK_K, ACC)
        cols = tl.arange(0, BLOCK_V)
        m = tl.full((), float("-inf"), ACC)
        s = tl.zeros((), ACC)
        s_tail = tl.zeros((), ACC)
        for start in range(0, V, BLOCK_V):
            c = start + cols
            z = tl.load(s_row + c, mask=c < V, other=float("-inf")).to(ACC) * inv_tau
            m, s, alpha, e, _ = online_softmax_step(m, s, z)
            is_top = c < 0
            for k in range(0, K):    # K compares per column, on a 1-D block (keeps its loads 128-bit)
                is_top = is_top | (c == tl.load(ids_ptr + row * K + k))
            s_tail = alpha * s_tail + tl.sum(tl.where(is_top, 0.0, e), 0)
        ls = tl.log(s)
        lq_tail = tl.log(s_tail) - ls
        lq = _student_bins(s_row, ids, m, ls, inv_tau, V)
        if MODE == FORWARD_KL:
            div = tl.sum(xlogy_diff(lp_t, lq), 0) + xlogy_diff(lp_t_tail, lq_tail)
            c_row = tl.sum(tl.exp(lp_t), 0) + tl.exp(lp_t_tail)      # -C
        if MODE == REVERSE_KL:
            div = tl.sum(xlogy_diff(lq, lp_t), 0) + xlogy_diff(lq_tail, lp_t_tail)
            c_row = div
        if MODE == JSD:
            log_b = tl.log(beta)
            log_1mb = tl.log(1.0 - beta)
            lm = log_mixture(lq, lp_t, log_1mb, log_b)
            lm_tail = log_mixture(lq_tail, lp_t_tail, log_1mb, log_b)
            kl_s = tl.sum(xlogy_diff(lq, lm), 0) + xlogy_diff(lq_tail, lm_tail)
            kl_t = tl.sum(xlogy_diff(lp_t, lm), 0) + xlogy_diff(lp_t_tail, lm_tail)
            div = beta * kl_t + (1.0 - beta) * kl_s
            c_row = kl_s
    tl.store(div_ptr + row, div)
    st = stats_ptr + row * N_STATS
    tl.store(st + 0, m)
    tl.store(st + 1, ls)
    tl.store(st + 2, lq_tail)
    tl.store(st + 3, lp_t_tail)
    tl.store(st + 4, c_row)


@triton.jit
def _bin_grad(lp, lq_b, lp_t_b, c_row, beta, log_1mb, log_b, MODE: tl.constexpr):
    """dD/dz'_j for columns of log-prob lp in a bin with student / teacher log-mass lq_b, lp_t_b (module doc)."""
    p = tl.exp(lp)
    if MODE == FORWARD_KL:
        d = p * c_row - tl.exp(lp - lq_b + lp_t_b)
    elif MODE == REVERSE_KL:
        d = p * (lq_b - lp_t_b - c_row)
    else:
        d = (1.0 - beta) * p * (lq_b - log_mixture(lq_b, lp_t_b, log_1mb, log_b) - c_row)
    return tl.where(p == 0.0, 0.0, d)


@triton.jit
def _topk_bwd_kernel(
    # data: student logits, teacher ids / log-probs [N, K], validity, per-row tau, saved statistics, upstream [N],
    # output
    s_ptr, ids_ptr, tlp_ptr, valid_ptr, tau_ptr, stats_ptr, g_ptr, ds_ptr,
    # shapes and strides (the output is contiguous [N, V])
    s_inner, s_outer_s, s_inner_s, V, K,
    # scalars: 1 / tau (unused with HAS_TAU_ROWS) and beta as (hi, lo) fp32 pairs
    tau_hi, tau_lo, beta_hi, beta_lo,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr, HAS_VALID: tl.constexpr,
    HAS_TAU_ROWS: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    live = row_live(valid_ptr, row, HAS_VALID)
    out_row = ds_ptr + row * V
    cols = tl.arange(0, BLOCK_V)
    if live:
        inv_tau = row_inv_tau(tau_ptr, row, tau_hi, tau_lo, HAS_TAU_ROWS, ACC)
        beta, log_b, log_1mb = mixture_logs(beta_hi, beta_lo, ACC)
        s_row = s_ptr + row_offset(row, s_inner, s_outer_s, s_inner_s)
        st = stats_ptr + row * N_STATS
        m = tl.load(st + 0)
        ls = tl.load(st + 1)
        lq_tail = tl.load(st + 2)
        lp_t_tail = tl.load(st + 3)
        c_row = tl.load(st + 4)
        g = tl.load(g_ptr + row).to(ACC) * inv_tau
        for start in range(0, V, BLOCK_V):
            c = start + cols
            z = tl.load(s_row + c, mask=c < V, other=float("-inf")).to(ACC) * inv_tau
            d = _bin_grad((z - m) - ls, lq_tail, lp_t_tail, c_row, beta, log_1mb, log_b, MODE)
            tl.store(out_row + c, (g * d).to(ds_ptr.dtype.element_ty), mask=c < V)
        tl.debug_barrier()     # the teacher columns below overwrite what the sweep wrote there
        ids, lp_t, _ = _teacher_bins(ids_ptr, tlp_ptr, row, K, BLOCK_K, ACC)
        lq = _student_bins(s_row, ids, m, ls, inv_tau, V)
        d = _bin_grad(lq, lq, lp_t, c_row, beta, log_1mb, log_b, MODE)
        tl.store(out_row + ids, (g * d).to(ds_ptr.dtype.element_ty), mask=(ids >= 0) & (ids < V))
    else:
        for start in range(0, V, BLOCK_V):
            c = start + cols
            tl.store(out_row + c, tl.zeros((BLOCK_V,), ds_ptr.dtype.element_ty), mask=c < V)


def _launch_args(student, ids, tlp, valid):
    s = Rows(student)
    k = ids.shape[-1]
    ids = ids.reshape(-1, k).contiguous()
    tlp = tlp.reshape(-1, k).contiguous()
    vp = None if valid is None else flat_rows(valid, s.n_rows, "mask")
    return s, ids, tlp, vp, k, dict(BLOCK_V=cfg.TOPK_BLOCK_V, BLOCK_K=max(16, triton.next_power_of_2(k)))


def topk_divergence_fwd(student, ids, tlp, *, inv_tau: float, beta: float, valid=None, tau=None):
    """(div [N], stats [N, N_STATS]) in fp32 (fp64 for fp64 student logits); zeros where valid == 0. `tau`: an
    optional per-row temperature of the student ([N] elements, in place of inv_tau, read at live rows)."""
    s, ids, tlp, vp, k, blocks = _launch_args(student, ids, tlp, valid)
    acc, tl_acc = acc_dtype(student.dtype)
    div = torch.empty(s.n_rows, dtype=acc, device=student.device)
    stats = torch.empty((s.n_rows, N_STATS.value), dtype=acc, device=student.device)
    tp, tau_rows = tau_rows_arg(tau, s.n_rows, div)
    if s.n_rows:
        record_launch("topk_divergence_fwd", student, ids, tlp, vp, tp if tau_rows else None, div, stats,
                      grid=(s.n_rows,))
        wrap_triton(_topk_fwd_kernel)[(s.n_rows,)](
            s.tensor, ids, tlp, div if vp is None else vp, tp, div, stats, *s.args(), s.n_cols, k,
            *split_float(inv_tau), *split_float(beta), MODE=mode_of(beta), HAS_VALID=vp is not None,
            HAS_TAU_ROWS=tau_rows, ACC=tl_acc, num_warps=cfg.TOPK_NUM_WARPS, **blocks)
    return div, stats


def topk_divergence_bwd(student, ids, tlp, stats, g, *, inv_tau: float, beta: float, valid=None, tau=None):
    """g[r] * d div_r / d student_logits, contiguous, in the student's dtype; zero rows where valid == 0. `tau`:
    the per-row temperature of the forward pass, if it had one."""
    s, ids, tlp, vp, k, blocks = _launch_args(student, ids, tlp, valid)
    out = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    g = flat_rows(g, s.n_rows, "grad").to(stats.dtype)
    tp, tau_rows = tau_rows_arg(tau, s.n_rows, g)
    if s.n_rows:
        record_launch("topk_divergence_bwd", student, ids, tlp, vp, tp if tau_rows else None, stats, g, out,
                      grid=(s.n_rows,))
        wrap_triton(_topk_bwd_kernel)[(s.n_rows,)](
            s.tensor, ids, tlp, g if vp is None else vp, tp, stats, g, out, *s.args(), s.n_cols, k,
            *split_float(inv_tau), *split_float(beta), MODE=mode_of(beta), HAS_VALID=vp is not None,
            HAS_TAU_ROWS=tau_rows, ACC=acc_dtype(stats.dtype)[1], num_warps=cfg.TOPK_NUM_WARPS, **blocks)
    return out


def aot_specs(AOTSpec, _sig):
    """Ahead-of-time compile specs (kernels/aot.py): bf16 student logits, K = 32 teacher tokens, each mode; the JSD
    also with per-row temperatures."""
    specs = []
    topk_types = dict(s_ptr="*bf16", ids_ptr="*i64", tlp_ptr="*fp32", valid_ptr="*i1", tau_ptr="*fp32",
                      div_ptr="*fp32", stats_ptr="*fp32", g_ptr="*fp32", ds_ptr="*bf16", tau_hi="fp32", tau_lo="fp32",
                      beta_hi="fp32", beta_lo="fp32")
    variants = ((FORWARD_KL.value, "fwd_kl", False), (REVERSE_KL.value, "rev_kl", False), (JSD.value, "jsd", False),
                (JSD.value, "jsd", True))
    for mode, tag, tau_rows in variants:
        ce = dict(BLOCK_V=cfg.TOPK_BLOCK_V, BLOCK_K=32, MODE=mode, HAS_VALID=True, HAS_TAU_ROWS=tau_rows,
                  ACC=tl.float32)
        for kernel, step in ((_topk_fwd_kernel, "fwd"), (_topk_bwd_kernel, "bwd")):
            specs.append(AOTSpec(f"topk_divergence_{step}[bf16,{tag},k32,valid{',tau' if tau_rows else ''}]", kernel,
                                 _sig(kernel, topk_types, ce), ce, ("s_outer_s", "s_inner_s", "V"), True,
                                 cfg.TOPK_NUM_WARPS))
    return specs
