"""Training-vs-rollout log-prob mismatch diagnostics in one deterministic two-launch reduction (no atomics,
no host sync), following verl's `compute_offpolicy_metrics` (verl/trainer/ppo/rollout_corr_helper.py, 0.9.1).

Per token, with d = train_logprobs - rollout_logprobs (log rho, rho = pi_train / pi_rollout) where mask is 1:
    k3        exp(d) - d - 1                        (verl `k3_kl`: KL(pi_rollout || pi_train), unclamped;
                                                     its Taylor series for |d| < 1/4, where the formula cancels)
    rho^2     exp(2 clamp(d, -20, 20))              (verl `chi2_token` = E[rho^2] - 1, SAFETY_BOUND = 20)
    rho       exp(clamp(d, -20, 20))
    outside   exp(d) < 1 - eps or exp(d) > 1 + eps  (the ratio band; unclamped)
    |d|
Per sequence b, with D_b = sum_t m d over its valid tokens (log of the sequence ratio prod_t rho_t), the same five
with d replaced by D_b (verl `chi2_seq` = E_seq[exp(2 clamp(D_b, -20, 20))] - 1).
Token statistics are means (max for |d|) over valid tokens, sequence statistics over sequences with at least
one valid token; with none, they are NaN.

Launch 1, one program per sequence (streaming its row in BLOCK_T steps): the sequence's partial sums
PART_COLS. Launch 2, one program: the partials summed in a fixed order -> STATS.
Packed sequences (cu_seqlens, [S + 1] offsets of 1-D [total] inputs): program s reads its offsets and streams
tokens [cu[s], cu[s + 1]) itself (no unpack copy); the launches and bytes per token are those of the padded layout.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import _config as cfg
from ._common import scalar_hi_lo
from ._rows import acc_dtype, split_float
from .launches import record_launch

PART_COLS = ("tokens", "k3", "rho2", "rho", "outside", "max_abs", "log_ratio")
N_PART: tl.constexpr = tl.constexpr(len(PART_COLS))
STATS = ("k3_kl_token", "chi2_token", "max_abs_diff_token", "ratio_mean_token", "frac_outside_token",
         "k3_kl_seq", "chi2_seq", "max_abs_diff_seq", "ratio_mean_seq", "frac_outside_seq", "num_tokens", "num_seqs")
LOG_RATIO_BOUND = 20.0      # verl SAFETY_BOUND: log ratios are clamped to +-20 before exp in rho and rho^2
_BOUND: tl.constexpr = tl.constexpr(LOG_RATIO_BOUND)

K3_SERIES_BELOW: tl.constexpr = tl.constexpr(0.25)
K3_SERIES_TERMS: tl.constexpr = tl.constexpr(12)


@triton.jit
def _k3_series(d):
    """exp(d) - d - 1 = sum_{k >= 0} d^(k + 2) / (k + 2)! to K3_SERIES_TERMS terms: below |d| = 1/4 the formula
    cancels and the truncated series is exact to fp64 (the first term left out is < 1e-18 relative)."""
    term = d * d * 0.5
    total = term
    for k in tl.static_range(1, K3_SERIES_TERMS):
        term = term * d / (k + 2)
        total += term
    return total


@triton.jit
def _ratio_terms(d, lo, hi):
    """(k3, rho^2, rho, outside) of log ratios d (see the module docstring); lo, hi the band edges on rho."""
    r = tl.exp(d)
    dc = tl.where(d != d, d, tl.minimum(tl.maximum(d, -_BOUND), _BOUND))    # clamp, NaN kept (as torch.clamp)
    rc = tl.exp(dc)
    outside = tl.where((r < lo) | (r > hi), 1.0, 0.0)
    k3 = tl.where(tl.abs(d) < K3_SERIES_BELOW, _k3_series(d), r - d - 1.0)
    return k3, rc * rc, rc, outside


@triton.jit
def _nan_max_step(acc, x):
    """Running elementwise max that keeps a NaN once seen (tl.maximum alone would drop it)."""
    return tl.where((acc != acc) | (x != x), float("nan"), tl.maximum(acc, x))


@triton.jit
def _nan_max(x):
    """max over a vector, NaN when any entry is NaN."""
    return tl.where(tl.sum(tl.where(x != x, 1, 0), 0) > 0, float("nan"), tl.max(x, 0))


@triton.jit(do_not_specialize=["T"])
def _mismatch_seq_kernel(
    # data: [B, T] train / rollout log-probs and mask (any strides; packed: 1-D [total], row strides 0),
    # packed [B + 1] offsets (PACKED), partials [B, N_PART]
    train_ptr, roll_ptr, mask_ptr, cu_ptr, part_ptr,
    # shapes and strides
    T, tr_s0, tr_s1, ro_s0, ro_s1, m_s0, m_s1,
    # scalars: band edges 1 - eps, 1 + eps as (hi, lo) fp32 pairs
    lo_hi, lo_lo, hi_hi, hi_lo,
    PACKED: tl.constexpr, BLOCK_T: tl.constexpr, ACC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    if PACKED:   # sequence b is tokens [cu[b], cu[b + 1]) of the 1-D inputs
        first = tl.load(cu_ptr + b).to(tl.int64)
        T = tl.load(cu_ptr + b + 1).to(tl.int64) - first
    else:
        first = b * 0
    lo = scalar_hi_lo(lo_hi, lo_lo, ACC)
    hi = scalar_hi_lo(hi_hi, hi_lo, ACC)
    offs = tl.arange(0, BLOCK_T).to(tl.int64)
    n = tl.zeros((BLOCK_T,), ACC)
    k3 = tl.zeros((BLOCK_T,), ACC)
    rho2 = tl.zeros((BLOCK_T,), ACC)
    rho = tl.zeros((BLOCK_T,), ACC)
    out = tl.zeros((BLOCK_T,), ACC)
    dsum = tl.zeros((BLOCK_T,), ACC)
    amax = tl.zeros((BLOCK_T,), ACC)
    for start in range(0, T, BLOCK_T):
        t = start + offs
        inb = t < T
        t = first + t
        m = tl.load(mask_ptr + b * m_s0 + t * m_s1, mask=inb, other=0) != 0
        x = tl.load(train_ptr + b * tr_s0 + t * tr_s1, mask=m, other=0.0).to(ACC)     # masked: never read
        y = tl.load(roll_ptr + b * ro_s0 + t * ro_s1, mask=m, other=0.0).to(ACC)
        d = tl.where(m, x - y, 0.0)
        t_k3, t_rho2, t_rho, t_out = _ratio_terms(d, lo, hi)
        n += tl.where(m, 1.0, 0.0)
        k3 += tl.where(m, t_k3, 0.0)
        rho2 += tl.where(m, t_rho2, 0.0)
        rho += tl.where(m, t_rho, 0.0)
        out += tl.where(m, t_out, 0.0)
        dsum += d
        amax = _nan_max_step(amax, tl.abs(d))
    p = part_ptr + b * N_PART
    tl.store(p + 0, tl.sum(n, 0))
    tl.store(p + 1, tl.sum(k3, 0))
    tl.store(p + 2, tl.sum(rho2, 0))
    tl.store(p + 3, tl.sum(rho, 0))
    tl.store(p + 4, tl.sum(out, 0))
    tl.store(p + 5, _nan_max(amax))
    tl.store(p + 6, tl.sum(dsum, 0))


@triton.jit(do_not_specialize=["B"])
def _mismatch_finish_kernel(
    part_ptr, stats_ptr, B, lo_hi, lo_lo, hi_hi, hi_lo,
    BLOCK_B: tl.constexpr, ACC: tl.constexpr,
):
    lo = scalar_hi_lo(lo_hi, lo_lo, ACC)
    hi = scalar_hi_lo(hi_hi, hi_lo, ACC)
    offs = tl.arange(0, BLOCK_B).to(tl.int64)
    n = tl.zeros((BLOCK_B,), ACC)
    k3 = tl.zeros((BLOCK_B,), ACC)
    rho2 = tl.zeros((BLOCK_B,), ACC)
    rho = tl.zeros((BLOCK_B,), ACC)
    out = tl.zeros((BLOCK_B,), ACC)
    amax = tl.zeros((BLOCK_B,), ACC)
    seqs = tl.zeros((BLOCK_B,), ACC)
    s_k3 = tl.zeros((BLOCK_B,), ACC)
    s_rho2 = tl.zeros((BLOCK_B,), ACC)
    s_rho = tl.zeros((BLOCK_B,), ACC)
    s_out = tl.zeros((BLOCK_B,), ACC)
    s_amax = tl.zeros((BLOCK_B,), ACC)
    for start in range(0, B, BLOCK_B):
        rows = start + offs
        p = part_ptr + rows * N_PART
        inb = rows < B
        tok = tl.load(p + 0, mask=inb, other=0.0)
        live = tok > 0
        n += tok
        k3 += tl.load(p + 1, mask=inb, other=0.0)
        rho2 += tl.load(p + 2, mask=inb, other=0.0)
        rho += tl.load(p + 3, mask=inb, other=0.0)
        out += tl.load(p + 4, mask=inb, other=0.0)
        amax = _nan_max_step(amax, tl.load(p + 5, mask=inb, other=0.0))
        dsum = tl.load(p + 6, mask=live, other=0.0)
        q_k3, q_rho2, q_rho, q_out = _ratio_terms(dsum, lo, hi)
        seqs += tl.where(live, 1.0, 0.0)
        s_k3 += tl.where(live, q_k3, 0.0)
        s_rho2 += tl.where(live, q_rho2, 0.0)
        s_rho += tl.where(live, q_rho, 0.0)
        s_out += tl.where(live, q_out, 0.0)
        s_amax = _nan_max_step(s_amax, tl.abs(dsum))
    nt = tl.sum(n, 0)
    ns = tl.sum(seqs, 0)
    has_t = nt > 0
    has_s = ns > 0
    nan = float("nan")
    tl.store(stats_ptr + 0, tl.where(has_t, tl.sum(k3, 0) / nt, nan))
    tl.store(stats_ptr + 1, tl.where(has_t, tl.sum(rho2, 0) / nt - 1.0, nan))
    tl.store(stats_ptr + 2, tl.where(has_t, _nan_max(amax), nan))
    tl.store(stats_ptr + 3, tl.where(has_t, tl.sum(rho, 0) / nt, nan))
    tl.store(stats_ptr + 4, tl.where(has_t, tl.sum(out, 0) / nt, nan))
    tl.store(stats_ptr + 5, tl.where(has_s, tl.sum(s_k3, 0) / ns, nan))
    tl.store(stats_ptr + 6, tl.where(has_s, tl.sum(s_rho2, 0) / ns - 1.0, nan))
    tl.store(stats_ptr + 7, tl.where(has_s, _nan_max(s_amax), nan))
    tl.store(stats_ptr + 8, tl.where(has_s, tl.sum(s_rho, 0) / ns, nan))
    tl.store(stats_ptr + 9, tl.where(has_s, tl.sum(s_out, 0) / ns, nan))
    tl.store(stats_ptr + 10, nt)
    tl.store(stats_ptr + 11, ns)


def mismatch_stats(train, rollout, mask, *, eps: float, cu_seqlens=None):
    """The STATS vector [12] (fp32; fp64 when a log-prob input is fp64) of [B, T] inputs (any strides), or of
    packed 1-D [total] inputs with cu_seqlens ([B + 1] offsets)."""
    acc, tl_acc = acc_dtype(torch.float64 if torch.float64 in (train.dtype, rollout.dtype) else train.dtype)
    packed = cu_seqlens is not None
    if packed:
        B, T = cu_seqlens.shape[0] - 1, train.shape[0]
        strides = [(0, x.stride(0)) for x in (train, rollout, mask)]
    else:
        B, T = train.shape
        strides = [x.stride() for x in (train, rollout, mask)]
    band = (*split_float(1.0 - eps), *split_float(1.0 + eps))
    parts = torch.empty((B, N_PART.value), dtype=acc, device=train.device)
    stats = torch.empty(len(STATS), dtype=acc, device=train.device)
    if B:
        record_launch("mismatch_seq", train, rollout, mask, cu_seqlens, parts, grid=(B,))
        wrap_triton(_mismatch_seq_kernel)[(B,)](
            train, rollout, mask, cu_seqlens if packed else mask, parts, T, *strides[0], *strides[1], *strides[2],
            *band, PACKED=packed, BLOCK_T=cfg.MISMATCH_BLOCK_T, ACC=tl_acc, num_warps=cfg.MISMATCH_NUM_WARPS)
    record_launch("mismatch_finish", parts, stats, grid=(1,))
    wrap_triton(_mismatch_finish_kernel)[(1,)](
        parts, stats, B, *band, BLOCK_B=cfg.MISMATCH_FINISH_BLOCK, ACC=tl_acc, num_warps=cfg.MISMATCH_NUM_WARPS)
    return stats


def aot_specs(AOTSpec, _sig):
    """Ahead-of-time compile specs (kernels/aot.py): the per-sequence partials and the finishing program."""
    band = dict(lo_hi="fp32", lo_lo="fp32", hi_hi="fp32", hi_lo="fp32")
    seqs = []
    for packed in (False, True):
        ce = dict(BLOCK_T=cfg.MISMATCH_BLOCK_T, ACC=tl.float32, PACKED=packed)
        seqs.append(AOTSpec("mismatch_seq_packed" if packed else "mismatch_seq", _mismatch_seq_kernel,
                            _sig(_mismatch_seq_kernel, dict(train_ptr="*fp32", roll_ptr="*fp32", mask_ptr="*i1",
                                                            cu_ptr="*i64" if packed else "*i1", part_ptr="*fp32",
                                                            **band), ce), ce,
                            ("tr_s0", "ro_s0", "m_s0"), False,
                            cfg.MISMATCH_NUM_WARPS))
    ce = dict(BLOCK_B=cfg.MISMATCH_FINISH_BLOCK, ACC=tl.float32)
    finish = AOTSpec("mismatch_finish", _mismatch_finish_kernel,
                     _sig(_mismatch_finish_kernel, dict(part_ptr="*fp32", stats_ptr="*fp32", **band), ce),
                     ce, (), False, cfg.MISMATCH_NUM_WARPS)
    return [*seqs, finish]
