"""Per-token log-probabilities and entropy of a [..., V] logits tensor: one read per live row forward,
one read + one write backward; a dead row (label == ignore_index, or row-validity 0) is never read:
its outputs are 0 and its gradient row is written as zeros once.

Forward, per row with z' = softcap(scale * z) / tau (softcap(x) = c tanh(x / c), none by default):
    logp = (z'_y - m) - log s,  H = lse - sum_i p_i z'_i = log s - t / s
where s = sum exp(z' - m), t = sum exp(z' - m)(z' - m), m the row max (kept online), lse = m + log s.
Backward (for upstream c_logp = dL/dlogp, c_ent = dL/dH, optional scalar `scale`):
    dL/dz_j = scale * [c_logp (onehot(y)_j - p_j) - c_ent p_j (log p_j + H)] * dz'_j/dz_j
    dz'/dz = scale / tau  (no cap),   scale (1 - tanh^2(scale z / c)) / tau  (cap c)
Only the row statistics (m, log s) and H (fp32, three per row; fp64 for fp64 logits) are saved between the
passes: p_j = exp((z'_j - m) - log s) is then as exact as fp32 log_softmax at any magnitude of the logits,
where one absolute fp32 lse would lose ulp(lse) (4e-4 at 1e4). Where z' spans +-3e38, z' - m overflows to
-inf in fp32: those entries get p = 0 and log p = -inf, what float64 log_softmax of the fp32 z' gives once
rounded to fp32, and contribute exactly nothing to the entropy or its gradient.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import _config as cfg
from ._common import dlogits_block, finish_stats, row_offset, row_transform, stats_step, transform_logits
from ._rows import LogitTransform, Rows, acc_dtype, check_inplace_target, flat_labels, flat_rows
from .launches import record_launch


@triton.jit
def _row_live(labels_ptr, valid_ptr, row, ignore_index, HAS_VALID: tl.constexpr):
    """(label, live): a row is live when its label is not ignore_index and its validity is not 0."""
    y = tl.load(labels_ptr + row).to(tl.int64)
    live = y != ignore_index
    if HAS_VALID:
        live = live & (tl.load(valid_ptr + row) != 0)
    return y, live


@triton.jit(do_not_specialize=["ignore_index"])
def _logprobs_fwd_kernel(
    logits_ptr, labels_ptr, valid_ptr, tau_ptr, logp_ptr, stats_ptr, ent_ptr,
    n_inner, stride_outer, stride_inner, V,
    pre_hi, pre_lo, post_hi, post_lo, ignore_index,
    BLOCK_V: tl.constexpr, WITH_ENT: tl.constexpr, HAS_VALID: tl.constexpr, HAS_CAP: tl.constexpr,
    HAS_TAU_ROWS: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y, live = _row_live(labels_ptr, valid_ptr, row, ignore_index, HAS_VALID)
    logp = tl.zeros((), ACC)
    m_ref = tl.zeros((), ACC)
    log_s = tl.zeros((), ACC)
    ent = tl.zeros((), ACC)
    if live:
        pre, post = row_transform(tau_ptr, row, pre_hi, pre_lo, post_hi, post_lo, HAS_TAU_ROWS, HAS_CAP, ACC)
        row_ptr = logits_ptr + row_offset(row, n_inner, stride_outer, stride_inner)
        cols = tl.arange(0, BLOCK_V)
        m = tl.full((), float("-inf"), ACC)
        s = tl.zeros((), ACC)
        t = tl.zeros((), ACC)
        for start in range(0, V, BLOCK_V):
            c = start + cols
            inb = c < V
            z, _ = transform_logits(tl.load(row_ptr + c, mask=inb, other=0.0).to(ACC), pre, post, HAS_CAP)
            m, s, t = stats_step(m, s, t, tl.where(inb, z, float("-inf")), WITH_ENT)
        z_y = tl.load(row_ptr + y, mask=(y >= 0) & (y < V), other=0.0).to(ACC)
        z_y, _ = transform_logits(z_y, pre, post, HAS_CAP)
        logp, m_ref, log_s, ent = finish_stats(m, s, t, z_y, y, V, ignore_index)
    tl.store(logp_ptr + row, logp)
    tl.store(stats_ptr + 2 * row, m_ref)
    tl.store(stats_ptr + 2 * row + 1, log_s)
    if WITH_ENT:
        tl.store(ent_ptr + row, ent)


@triton.jit(do_not_specialize=["ignore_index"])
def _logprobs_bwd_kernel(
    logits_ptr, labels_ptr, valid_ptr, tau_ptr, stats_ptr, ent_ptr, c_logp_ptr, c_ent_ptr, scale_ptr, dlogits_ptr,
    n_inner, stride_outer, stride_inner, d_stride_outer, d_stride_inner, V,
    pre_hi, pre_lo, post_hi, post_lo, ignore_index,
    BLOCK_V: tl.constexpr, HAS_ENT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_VALID: tl.constexpr,
    HAS_CAP: tl.constexpr, HAS_TAU_ROWS: tl.constexpr, SKIP_UNIT: tl.constexpr, ACC: tl.constexpr,
):
    """SKIP_UNIT (with HAS_SCALE): the output already holds the gradient for scale 1 (formed in the forward pass,
    kernels/fused_grad.py) and dead rows hold zeros; the program reads and writes nothing when scale == 1,
    else it rewrites its live row for the scale (rounded once, as the two-pass backward)."""
    row = tl.program_id(0).to(tl.int64)
    y, live = _row_live(labels_ptr, valid_ptr, row, ignore_index, HAS_VALID)
    out_ptr = dlogits_ptr + row_offset(row, n_inner, d_stride_outer, d_stride_inner)
    cols = tl.arange(0, BLOCK_V)
    if SKIP_UNIT:
        live = live & (tl.load(scale_ptr).to(ACC) != 1.0)
    if live:
        pre, post = row_transform(tau_ptr, row, pre_hi, pre_lo, post_hi, post_lo, HAS_TAU_ROWS, HAS_CAP, ACC)
        row_ptr = logits_ptr + row_offset(row, n_inner, stride_outer, stride_inner)
        m = tl.load(stats_ptr + 2 * row).to(ACC)
        log_s = tl.load(stats_ptr + 2 * row + 1).to(ACC)
        c_logp = tl.load(c_logp_ptr + row).to(ACC)
        ent = tl.zeros((), ACC)
        c_ent = tl.zeros((), ACC)
        if HAS_ENT:
            ent = tl.load(ent_ptr + row).to(ACC)
            c_ent = tl.load(c_ent_ptr + row).to(ACC)
        if HAS_SCALE:
            g = tl.load(scale_ptr).to(ACC)
            c_logp = c_logp * g
            c_ent = c_ent * g
        for start in range(0, V, BLOCK_V):
            c = start + cols
            inb = c < V
            z, dz = transform_logits(tl.load(row_ptr + c, mask=inb, other=0.0).to(ACC), pre, post, HAS_CAP)
            g_z = dlogits_block(tl.where(inb, z, float("-inf")), c, y, m, log_s, ent, c_logp, c_ent, dz, HAS_ENT)
            tl.store(out_ptr + c, g_z.to(dlogits_ptr.dtype.element_ty), mask=inb)
    elif not SKIP_UNIT:
        zero = tl.zeros((BLOCK_V,), dlogits_ptr.dtype.element_ty)
        for start in range(0, V, BLOCK_V):
            c = start + cols
            tl.store(out_ptr + c, zero, mask=c < V)


def _valid_arg(valid, n_rows, fallback):
    """(pointer tensor, HAS_VALID) for an optional per-row validity (bool or 0/1, any strides)."""
    if valid is None:
        return fallback, False
    return flat_rows(valid, n_rows, "row validity (mask)"), True


def _tau_arg(tau, inv_tau, logit_scale, softcap, n_rows, fallback):
    """(pointer tensor, LogitTransform, HAS_TAU_ROWS): with a per-row temperature `tau` the host folds
    tau = 1 and the kernel applies 1 / tau[row] (kernels/_common.py row_transform); inv_tau is then unused."""
    if tau is None:
        return fallback, LogitTransform(inv_tau, logit_scale, softcap), False
    return flat_rows(tau, n_rows, "temperature"), LogitTransform(1.0, logit_scale, softcap), True


def logprobs_fwd(logits: torch.Tensor, labels: torch.Tensor, *, inv_tau: float, ignore_index: int,
                 with_entropy: bool, logit_scale: float = 1.0, softcap=None, valid=None, tau=None):
    """Returns (logp [N], stats [N, 2], entropy [N] or None), N = logits.numel() // V, in fp32
    (fp64 for fp64 logits, so that float64 gradcheck is meaningful); stats holds each row's (max m, log s),
    what the backward needs. `tau`: an optional per-row temperature ([N] elements, in place of inv_tau).
    Rows whose label is ignore_index or whose `valid` entry is 0 are not read:
    logp = H = m = log s = 0 there."""
    rows = Rows(logits)
    y = flat_labels(labels, rows.n_rows)
    n = rows.n_rows
    dev = logits.device
    acc, tl_acc = acc_dtype(logits.dtype)
    logp = torch.empty(n, dtype=acc, device=dev)
    stats = torch.empty((n, 2), dtype=acc, device=dev)
    ent = torch.empty(n, dtype=acc, device=dev) if with_entropy else logp
    vp, has_valid = _valid_arg(valid, n, y)
    tp, tf, tau_rows = _tau_arg(tau, inv_tau, logit_scale, softcap, n, logp)
    if n > 0:
        record_launch("logprobs_fwd", logits, y, vp if has_valid else None, tp if tau_rows else None, logp, stats,
                      ent if with_entropy else None)
        wrap_triton(_logprobs_fwd_kernel)[(n,)](
            rows.tensor, y, vp, tp, logp, stats, ent, *rows.args(), rows.n_cols, *tf.args(), int(ignore_index),
            BLOCK_V=cfg.ROW_BLOCK_V, WITH_ENT=with_entropy, HAS_VALID=has_valid, HAS_CAP=tf.has_cap,
            HAS_TAU_ROWS=tau_rows, ACC=tl_acc, num_warps=cfg.ROW_NUM_WARPS,
        )
    return logp, stats, (ent if with_entropy else None)


def logprobs_bwd(logits, labels, stats, ent, c_logp, c_ent, *, inv_tau: float, ignore_index: int,
                 scale=None, inplace: bool = False, logit_scale: float = 1.0, softcap=None, valid=None, tau=None,
                 rescale=None):
    """dlogits from the forward's row `stats` [N, 2] and entropy, for upstream per-row gradients c_logp
    (of logp) and c_ent (of entropy, or None),
    times the optional 0-d tensor `scale` (read on the device: no host sync). With `inplace`
    the gradient overwrites the logits' storage (each block is read before it is written).
    Dead rows (ignore_index label, `valid` 0) are not read; their gradient row is written as zeros.
    `rescale`: a contiguous buffer that already holds this gradient for scale 1 (fused_ppo_loss's gradient
    formed in forward): it is rewritten for `scale` where scale != 1, untouched (no bytes) where scale == 1."""
    rows = Rows(logits)
    y = flat_labels(labels, rows.n_rows)
    if rescale is not None:
        if scale is None or not rescale.is_contiguous() or rescale.shape != logits.shape:
            raise ValueError(f"rescale needs a scale and a contiguous buffer of the logits' shape "
                             f"{tuple(logits.shape)}, got {tuple(rescale.shape)}")
        out = rescale.view(rows.tensor.shape)
        d_outer, d_inner = rows.n_inner * rows.n_cols, rows.n_cols
    elif inplace:
        check_inplace_target(logits)
        out = rows.tensor
        d_outer, d_inner = rows.stride_outer, rows.stride_inner
    else:
        out = torch.empty(rows.tensor.shape, dtype=logits.dtype, device=logits.device)
        d_outer, d_inner = rows.n_inner * rows.n_cols, rows.n_cols
    has_ent = c_ent is not None
    if c_logp is None:   # no log-prob upstream: a zero coefficient (the term costs this memory-bound kernel no bytes)
        c_logp = torch.zeros(rows.n_rows, dtype=stats.dtype, device=stats.device)
    c_logp = flat_rows(c_logp, rows.n_rows, "logp gradient")      # upstream grads of a .sum() have stride 0
    c_ent = flat_rows(c_ent, rows.n_rows, "entropy gradient") if has_ent else None
    vp, has_valid = _valid_arg(valid, rows.n_rows, y)
    tp, tf, tau_rows = _tau_arg(tau, inv_tau, logit_scale, softcap, rows.n_rows, stats)
    if rows.n_rows > 0:
        if rescale is None:
            record_launch("logprobs_bwd", logits, y, vp if has_valid else None, tp if tau_rows else None, stats,
                          ent if has_ent else None, c_logp, c_ent, scale, logits)
        else:   # its [N, V] bytes depend on the scale's value (none when 1): the interpreter's counters see them
            record_launch("fused_grad_rescale", y, vp if has_valid else None, tp if tau_rows else None, stats,
                          ent if has_ent else None, c_logp, c_ent, scale)
        wrap_triton(_logprobs_bwd_kernel)[(rows.n_rows,)](
            rows.tensor, y, vp, tp, stats, ent if has_ent else stats, c_logp, c_ent if has_ent else c_logp,
            scale if scale is not None else stats, out,
            *rows.args(), d_outer, d_inner, rows.n_cols, *tf.args(), int(ignore_index),
            BLOCK_V=cfg.ROW_BLOCK_V, HAS_ENT=has_ent, HAS_SCALE=scale is not None, HAS_VALID=has_valid,
            HAS_CAP=tf.has_cap, HAS_TAU_ROWS=tau_rows, SKIP_UNIT=rescale is not None, ACC=acc_dtype(logits.dtype)[1],
            num_warps=cfg.ROW_NUM_WARPS,
        )
    return out.view(logits.shape) if out.shape != logits.shape else out
