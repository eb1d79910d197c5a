"""Per-token divergence between a student's and a teacher's softmax over the vocabulary (distillation).

With z' = z / tau for both models (tau a scalar, or one value per row shared by both models: HAS_TAU_ROWS, one
load per row), p_s = softmax(z'_s), p_t = softmax(z'_t) and a mixture weight beta (TRL 1.16's convention,
trl/experimental/gkd/gkd_trainer.py `generalized_jsd_loss` and trl/kernels/chunked_divergence.py):
    beta = 0      FORWARD_KL  KL(p_t || p_s) = sum_i p_t,i (log p_t,i - log p_s,i)
    beta = 1      REVERSE_KL  KL(p_s || p_t) = sum_i p_s,i (log p_s,i - log p_t,i)
    0 < beta < 1  JSD         beta KL(p_t || m) + (1 - beta) KL(p_s || m),  m = (1 - beta) p_s + beta p_t
Gradient to the student's logits only (the teacher is a constant):
    FORWARD_KL  d/dz_s,j = (p_s,j - p_t,j) / tau
    REVERSE_KL  d/dz_s,j = p_s,j (log p_s,j - log p_t,j - KL) / tau
    JSD         d/dz_s,j = (1 - beta) p_s,j (log p_s,j - log m_j - K) / tau,  K = KL(p_s || m)
(JSD: d/dp_s,i of the divergence is (1 - beta)(log p_s,i - log m_i), the 1/m terms cancel because
beta p_t,i + (1 - beta) p_s,i = m_i; the softmax Jacobian then subtracts the p_s-weighted mean, which is K.)

Each row keeps its max and log-sum-exp separately (log p = (z' - max) - log sum), so nothing loses digits
at large |z|. The KLs stream in one pass: u = sum_i e_a,i ((z'_a,i - m_a) - (z'_b,i - m_b)) is kept relative to
both running maxima and rescaled when either moves; KL(a || b) = u / s_a - log s_a + log s_b. The JSD needs both
normalisers before log m exists, so its forward sweeps the row twice (statistics, then the mixture terms) within
one launch; its backward, like the KLs', sweeps once. Rows with validity 0 are never read: 0 and a zero gradient.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import _config as cfg
from ._common import online_softmax_step, row_inv_tau, row_offset, scalar_hi_lo
from ._rows import Rows, acc_dtype, flat_rows, split_float, tau_rows_arg
from .launches import record_launch

FORWARD_KL: tl.constexpr = tl.constexpr(0)
REVERSE_KL: tl.constexpr = tl.constexpr(1)
JSD: tl.constexpr = tl.constexpr(2)
# Per-row statistics saved for backward, [N, N_STATS]: the student row's max and log-sum-exp, the teacher's, and
# AUX (REVERSE_KL: the KL itself; JSD: K = KL(p_s || m); FORWARD_KL: 0).
N_STATS: tl.constexpr = tl.constexpr(5)


def mode_of(beta: float) -> int:
    """The kernel's MODE for a mixture weight beta in [0, 1]."""
    mode = FORWARD_KL if beta == 0.0 else REVERSE_KL if beta == 1.0 else JSD
    return mode.value


@triton.jit
def rel_kl_step(u, s_a, m_a, m_a_new, e_a, alpha_a, z_a, m_b, m_b_new, z_b):
    """Fold one block into u = sum_i e_a,i ((z_a,i - r_a) - (z_b,i - r_b)), e_a,i = exp(z_a,i - r_a), where r
    is each row's running max (0 while the row is all -inf). s_a, m_a, m_b are the values before the block,
    m_a_new, m_b_new after it, e_a and alpha_a as online_softmax_step returns them for row a."""
    r_a_old = tl.where(m_a == float("-inf"), 0.0, m_a)
    r_b_old = tl.where(m_b == float("-inf"), 0.0, m_b)
    r_a = tl.where(m_a_new == float("-inf"), 0.0, m_a_new)
    r_b = tl.where(m_b_new == float("-inf"), 0.0, m_b_new)
    term = tl.where(e_a == 0.0, 0.0, e_a * ((z_a - r_a) - (z_b - r_b)))
    return alpha_a * (u + s_a * ((r_a_old - r_a) - (r_b_old - r_b))) + tl.sum(term, 0)


@triton.jit
def xlogy_diff(lp_a, lp_b):
    """p_a (log p_a - log p_b) per element, 0 where p_a = exp(lp_a) is 0 (as 0 log 0 = 0)."""
    p = tl.exp(lp_a)
    return tl.where(p == 0.0, 0.0, p * (lp_a - lp_b))


@triton.jit
def log_mixture(lp_s, lp_t, log_1mb, log_b):
    """log m = log((1 - beta) p_s + beta p_t) from log p_s, log p_t (a two-term logsumexp)."""
    a = lp_s + log_1mb
    b = lp_t + log_b
    top = tl.maximum(a, b)
    top = tl.where(top == float("-inf"), 0.0, top)
    return top + tl.log(tl.exp(a - top) + tl.exp(b - top))


@triton.jit
def load_pair(s_row, t_row, c, V, inv_tau, ACC: tl.constexpr):
    """Columns c of the student's and the teacher's row, in ACC and divided by tau (-inf past V)."""
    inb = c < V
    zs = tl.load(s_row + c, mask=inb, other=float("-inf")).to(ACC) * inv_tau
    zt = tl.load(t_row + c, mask=inb, other=float("-inf")).to(ACC) * inv_tau
    return zs, zt


@triton.jit
def row_live(valid_ptr, row, HAS_VALID: tl.constexpr):
    """Whether this row counts: valid[row] != 0, or always without a validity tensor."""
    live = tl.full((), 1, tl.int1)
    if HAS_VALID:
        live = tl.load(valid_ptr + row) != 0
    return live


@triton.jit
def mixture_logs(beta_hi, beta_lo, ACC: tl.constexpr):
    """(beta, log beta, log(1 - beta)) of the JSD mixture m = (1 - beta) p_s + beta p_t."""
    beta = scalar_hi_lo(beta_hi, beta_lo, ACC)
    return beta, tl.log(beta), tl.log(1.0 - beta)


@triton.jit
def _divergence_fwd_kernel(
    # data: student / teacher logits (any row strides, unit column stride), row validity, per-row tau, outputs
    s_ptr, t_ptr, valid_ptr, tau_ptr, div_ptr, stats_ptr,
    # shapes and strides
    s_inner, s_outer_s, s_inner_s, t_inner, t_outer_s, t_inner_s, V,
    # scalars: 1 / tau (unused with HAS_TAU_ROWS) and beta as (hi, lo) fp32 pairs
    tau_hi, tau_lo, beta_hi, beta_lo,
    BLOCK_V: tl.constexpr, MODE: tl.constexpr, HAS_VALID: tl.constexpr, HAS_TAU_ROWS: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    live = row_live(valid_ptr, row, HAS_VALID)
    div = tl.zeros((), ACC)
    m_s = tl.zeros((), ACC)
    ls_s = tl.zeros((), ACC)
    m_t = tl.zeros((), ACC)
    ls_t = tl.zeros((), ACC)
    aux = tl.zeros((), ACC)
    if live:
        inv_tau = row_inv_tau(tau_ptr, row, tau_hi, tau_lo, HAS_TAU_ROWS, ACC)
        s_row = s_ptr + row_offset(row, s_inner, s_outer_s, s_inner_s)
        t_row = t_ptr + row_offset(row, t_inner, t_outer_s, t_inner_s)
        cols = tl.arange(0, BLOCK_V)
        m_s = tl.full((), float("-inf"), ACC)
        m_t = tl.full((), float("-inf"), ACC)
        sum_s = tl.zeros((), ACC)
        sum_t = tl.zeros((), ACC)
        u = tl.zeros((), ACC)
        for start in range(0, V, BLOCK_V):
            c = start + cols
            zs, zt = load_pair(s_row, t_row, c, V, inv_tau, ACC)
            m_s_new, sum_s_new, alpha_s, e_s, _ = online_softmax_step(m_s, sum_s, zs)
            m_t_new, sum_t_new, alpha_t, e_t, _ = online_softmax_step(m_t, sum_t, zt)
            if MODE == REVERSE_KL:
                u = rel_kl_step(u, sum_s, m_s, m_s_new, e_s, alpha_s, zs, m_t, m_t_new, zt)
            if MODE == FORWARD_KL:
                u = rel_kl_step(u, sum_t, m_t, m_t_new, e_t, alpha_t, zt, m_s, m_s_new, zs)
            m_s, sum_s, m_t, sum_t = m_s_new, sum_s_new, m_t_new, sum_t_new
        ls_s = tl.log(sum_s)
        ls_t = tl.log(sum_t)
        if MODE == REVERSE_KL:
            div = u / sum_s - ls_s + ls_t
            aux = div
        if MODE == FORWARD_KL:
            div = u / sum_t - ls_t + ls_s
        if MODE == JSD:
            beta, log_b, log_1mb = mixture_logs(beta_hi, beta_lo, ACC)
            kl_s = tl.zeros((), ACC)
            kl_t = tl.zeros((), ACC)
            for start in range(0, V, BLOCK_V):
                c = start + cols
                zs, zt = load_pair(s_row, t_row, c, V, inv_tau, ACC)
                lp_s = (zs - m_s) - ls_s
                lp_t = (zt - m_t) - ls_t
                lm = log_mixture(lp_s, lp_t, log_1mb, log_b)
                kl_s += tl.sum(xlogy_diff(lp_s, lm), 0)
                kl_t += tl.sum(xlogy_diff(lp_t, lm), 0)
            div = beta * kl_t + (1.0 - beta) * kl_s
            aux = kl_s
    tl.store(div_ptr + row, div)
    st = stats_ptr + row * N_STATS
    tl.store(st + 0, m_s)
    tl.store(st + 1, ls_s)
    tl.store(st + 2, m_t)
    tl.store(st + 3, ls_t)
    tl.store(st + 4, aux)


@triton.jit
def _divergence_bwd_kernel(
    # data: student / teacher logits, row validity, per-row tau, saved statistics, upstream gradient [N], output
    s_ptr, t_ptr, valid_ptr, tau_ptr, stats_ptr, g_ptr, ds_ptr,
    # shapes and strides (the output is contiguous [N, V])
    s_inner, s_outer_s, s_inner_s, t_inner, t_outer_s, t_inner_s, V,
    # scalars: 1 / tau (unused with HAS_TAU_ROWS) and beta as (hi, lo) fp32 pairs
    tau_hi, tau_lo, beta_hi, beta_lo,
    BLOCK_V: tl.constexpr, MODE: tl.constexpr, HAS_VALID: tl.constexpr, HAS_TAU_ROWS: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    live = row_live(valid_ptr, row, HAS_VALID)
    out_row = ds_ptr + row * V
    cols = tl.arange(0, BLOCK_V)
    if live:
        inv_tau = row_inv_tau(tau_ptr, row, tau_hi, tau_lo, HAS_TAU_ROWS, ACC)
        beta, log_b, log_1mb = mixture_logs(beta_hi, beta_lo, ACC)
        s_row = s_ptr + row_offset(row, s_inner, s_outer_s, s_inner_s)
        t_row = t_ptr + row_offset(row, t_inner, t_outer_s, t_inner_s)
        st = stats_ptr + row * N_STATS
        m_s = tl.load(st + 0)
        ls_s = tl.load(st + 1)
        m_t = tl.load(st + 2)
        ls_t = tl.load(st + 3)
        aux = tl.load(st + 4)
        g = tl.load(g_ptr + row).to(ACC) * inv_tau
        for start in range(0, V, BLOCK_V):
            c = start + cols
            zs, zt = load_pair(s_row, t_row, c, V, inv_tau, ACC)
            lp_s = (zs - m_s) - ls_s
            lp_t = (zt - m_t) - ls_t
            p_s = tl.exp(lp_s)
            if MODE == FORWARD_KL:
                d = p_s - tl.exp(lp_t)
            elif MODE == REVERSE_KL:
                d = tl.where(p_s == 0.0, 0.0, p_s * (lp_s - lp_t - aux))
            else:
                lm = log_mixture(lp_s, lp_t, log_1mb, log_b)
                d = tl.where(p_s == 0.0, 0.0, (1.0 - beta) * p_s * (lp_s - lm - aux))
            tl.store(out_row + c, (g * d).to(ds_ptr.dtype.element_ty), mask=c < V)
    else:
        for start in range(0, V, BLOCK_V):
            c = start + cols
            tl.store(out_row + c, tl.zeros((BLOCK_V,), ds_ptr.dtype.element_ty), mask=c < V)


def _launch_args(student, teacher, valid):
    s, t = Rows(student), Rows(teacher)
    vp = None if valid is None else flat_rows(valid, s.n_rows, "mask")
    return s, t, vp, (*s.args(), *t.args(), s.n_cols)


def divergence_fwd(student, teacher, *, inv_tau: float, beta: float, valid=None, tau=None):
    """(div [N], stats [N, N_STATS]) in fp32 (fp64 when either logits are fp64); rows with valid == 0 give zeros.
    `tau`: an optional per-row temperature ([N] elements, both models; in place of inv_tau, read at live rows)."""
    s, t, vp, args = _launch_args(student, teacher, valid)
    acc, tl_acc = acc_dtype(torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else student.dtype)
    div = torch.empty(s.n_rows, dtype=acc, device=student.device)
    stats = torch.empty((s.n_rows, N_STATS.value), dtype=acc, device=student.device)
    tp, tau_rows = tau_rows_arg(tau, s.n_rows, div)
    if s.n_rows:
        record_launch("divergence_fwd", student, teacher, vp, tp if tau_rows else None, div, stats, grid=(s.n_rows,))
        wrap_triton(_divergence_fwd_kernel)[(s.n_rows,)](
            s.tensor, t.tensor, div if vp is None else vp, tp, div, stats, *args, *split_float(inv_tau),
            *split_float(beta), BLOCK_V=cfg.DIV_BLOCK_V, MODE=mode_of(beta), HAS_VALID=vp is not None,
            HAS_TAU_ROWS=tau_rows, ACC=tl_acc, num_warps=cfg.DIV_NUM_WARPS)
    return div, stats


def divergence_bwd(student, teacher, stats, g, *, inv_tau: float, beta: float, valid=None, tau=None):
    """g[r] * d div_r / d student_logits, contiguous, in the student's dtype; zero rows where valid == 0.
    `tau`: the per-row temperature of the forward pass, if it had one."""
    s, t, vp, args = _launch_args(student, teacher, valid)
    out = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    g = flat_rows(g, s.n_rows, "grad").to(stats.dtype)
    tp, tau_rows = tau_rows_arg(tau, s.n_rows, g)
    if s.n_rows:
        record_launch("divergence_bwd", student, teacher, vp, tp if tau_rows else None, stats, g, out,
                      grid=(s.n_rows,))
        wrap_triton(_divergence_bwd_kernel)[(s.n_rows,)](
            s.tensor, t.tensor, g if vp is None else vp, tp, stats, g, out, *args, *split_float(inv_tau),
            *split_float(beta), BLOCK_V=cfg.DIV_BLOCK_V, MODE=mode_of(beta), HAS_VALID=vp is not None,
            HAS_TAU_ROWS=tau_rows, ACC=acc_dtype(stats.dtype)[1], num_warps=cfg.DIV_NUM_WARPS)
    return out


def aot_specs(AOTSpec, _sig):
    """Ahead-of-time compile specs (kernels/aot.py): bf16 logits with a valid mask, each divergence mode; the JSD
    (the most registers) also with per-row temperatures."""
    specs = []
    div_types = dict(s_ptr="*bf16", t_ptr="*bf16", valid_ptr="*i1", tau_ptr="*fp32", div_ptr="*fp32",
                     stats_ptr="*fp32", g_ptr="*fp32", ds_ptr="*bf16", tau_hi="fp32", tau_lo="fp32", beta_hi="fp32",
                     beta_lo="fp32")
    div_div = ("s_outer_s", "s_inner_s", "t_outer_s", "t_inner_s", "V")
    variants = ((FORWARD_KL.value, "fwd_kl", False), (REVERSE_KL.value, "rev_kl", False), (JSD.value, "jsd", False),
                (JSD.value, "jsd", True))
    for mode, tag, tau_rows in variants:
        ce = dict(BLOCK_V=cfg.DIV_BLOCK_V, MODE=mode, HAS_VALID=True, HAS_TAU_ROWS=tau_rows, ACC=tl.float32)
        for kernel, step in ((_divergence_fwd_kernel, "fwd"), (_divergence_bwd_kernel, "bwd")):
            specs.append(AOTSpec(f"divergence_{step}[bf16,{tag},valid{',tau' if tau_rows else ''}]", kernel,
                                 _sig(kernel, div_types, ce), ce, div_div, True, cfg.DIV_NUM_WARPS))
    return specs
