"""fused_ppo_loss's gradient formed in the forward pass: one read of each live logits row, one write of its
gradient (4 bytes per bf16 element instead of the two-pass 2 + 2 + 2), for token-local losses (ppo, cispo,
sapo, gpg; any aggregation, KL kind, rollout IS weights, entropy bonus).

One program per row holds the whole row on chip (BLOCK_V = next_pow2(V) registers): it forms
z' = softcap(scale z) / tau, the row statistics m = max z', s = sum exp(z' - m), t = sum exp(z' - m)(z' - m),
    logp = (z'_y - m) - log s,   H = log s - t / s,
then the token's loss coefficients from its per-token inputs and the aggregation weight w_b of its sequence
(launch 2 of the loss aggregation, kernels/loss_seq.py, reads the mask only):
    c_logp = w_b (isw dL/dlogp + kl_coef dKL/dlogp),   c_H = -w_b entropy_coef,
and writes, from the same registers, the gradient of the unit-upstream loss
    dloss/dz_j = [c_logp (onehot(y)_j - p_j) - c_H p_j (log p_j + H)] dz'_j/dz_j,   p_j = exp((z'_j - m) - log s).
A dead row (mask 0 or ignore_index label) is never read; its gradient row is written as zeros.
The upstream gradient g of the loss is applied in backward, read on the device: when g == 1 (the usual
loss.backward()) no [N, V] byte moves. Else each live row is rewritten for g: from the logits, rounded once
(kernels/logprobs.py logprobs_bwd(rescale=), 2 + 2 bytes per element, as the two-pass backward), or, with
inplace=True, whose logits are gone, by `scale_rows_` (the same bytes; the gradient is then rounded twice to
the logits' dtype, exact when g is a power of two).
Rows longer than `max_vocab()` do not fit on chip (spills): the caller keeps the two-pass path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..modes import KL_KIND_IDS, POLICY_LOSS_IDS
from . import _config as cfg
from ._common import dlogits_block, finish_stats, row_offset, row_transform, stats_step, transform_logits
from ._rows import LogitTransform, Rows, acc_dtype, check_inplace_target, flat_labels, flat_rows
from ._terms import cispo_terms, kl_terms, ppo_terms, sapo_terms
from .launches import record_launch
from .loss_agg import policy_loss_agg, policy_tables
from .loss_layout import (
    KL_NONE,
    NCOL,
    POLICY_CISPO,
    POLICY_PPO,
    POLICY_SAPO,
    SQ_WEIGHT,
    AggResult,
    bt_shape,
    bt_strides,
)

TOKEN_LOCAL_POLICIES = ("ppo", "cispo", "sapo", "gpg")


@triton.jit
def _row_live(labels_ptr, valid_ptr, row, ignore_index):
    """(label, live): live when the label is not ignore_index and the mask entry is not 0."""
    y = tl.load(labels_ptr + row).to(tl.int64)
    return y, (y != ignore_index) & (tl.load(valid_ptr + row) != 0)


@triton.jit
def _token_coef(x, o, a, r, isw, w, clip_low, clip_high, dual_clip, ratio_max, tau_pos, tau_neg, kl_coef,
                POLICY: tl.constexpr, KL_KIND: tl.constexpr, HAS_ISW: tl.constexpr, HAS_DUAL: tl.constexpr,
                HAS_RMAX: tl.constexpr):
    """dloss/dlogp of one live token: w (isw dL/dlogp + kl_coef dKL/dlogp), the coefficient the loss
    aggregation (kernels/loss_agg.py _policy_terms_kernel) writes for it."""
    if POLICY == POLICY_PPO:
        _l, dloss, _r, _c, _lo = ppo_terms(x, o, a, clip_low, clip_high, dual_clip, ratio_max, HAS_DUAL, HAS_RMAX)
    elif POLICY == POLICY_CISPO:
        _l, dloss, _r, _c = cispo_terms(x, o, a, clip_low, clip_high)
    elif POLICY == POLICY_SAPO:
        _l, dloss, _r = sapo_terms(x, o, a, tau_pos, tau_neg)
    else:
        dloss = -a   # POLICY_GPG: L = -A logp
    if HAS_ISW:
        dloss = dloss * isw
    coef = w * dloss
    if KL_KIND != KL_NONE:
        _kl, dkl = kl_terms(x, r, KL_KIND)
        coef += w * kl_coef * dkl
    return coef


@triton.jit(do_not_specialize=["ignore_index", "T"])
def _fused_grad_kernel(
    # [N, V] logits (row strides), [N] labels / mask / per-row temperature
    logits_ptr, labels_ptr, valid_ptr, tau_ptr,
    # per-token loss inputs, addressed as [B, T] (adv may be per sequence), the [B, NCOL] sequence table
    old_ptr, adv_ptr, ref_ptr, isw_ptr, seq_ptr,
    # outputs: [N] logp, [N, 2] (m, log s), [N] entropy, [N] dloss/dlogp, [N, V] gradient (its own row strides)
    logp_ptr, stats_ptr, ent_ptr, coef_ptr, dlogits_ptr,
    # shapes and strides
    n_inner, stride_outer, stride_inner, d_stride_outer, d_stride_inner, V, T,
    s_old_b, s_old_t, s_adv_b, s_adv_t, s_ref_b, s_ref_t, s_isw_b, s_isw_t,
    # logit transform and loss options
    pre_hi, pre_lo, post_hi, post_lo, ignore_index,
    clip_low, clip_high, dual_clip, ratio_max, tau_pos, tau_neg, kl_coef, entropy_coef,
    BLOCK_V: tl.constexpr, WITH_ENT: tl.constexpr, GRAD_ENT: tl.constexpr, HAS_CAP: tl.constexpr,
    HAS_TAU_ROWS: tl.constexpr, POLICY: tl.constexpr, KL_KIND: tl.constexpr, HAS_ISW: tl.constexpr,
    HAS_DUAL: tl.constexpr, HAS_RMAX: tl.constexpr, NC: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y, live = _row_live(labels_ptr, valid_ptr, row, ignore_index)
    out_ptr = dlogits_ptr + row_offset(row, n_inner, d_stride_outer, d_stride_inner)
    cols = tl.arange(0, BLOCK_V)
    inb = cols < V
    logp = tl.zeros((), ACC)
    c_logp = tl.zeros((), ACC)
    m_ref = tl.zeros((), ACC)
    log_s = tl.zeros((), ACC)
    ent = tl.zeros((), ACC)
    if live:
        pre, post = row_transform(tau_ptr, row, pre_hi, pre_lo, post_hi, post_lo, HAS_TAU_ROWS, HAS_CAP, ACC)
        row_ptr = logits_ptr + row_offset(row, n_inner, stride_outer, stride_inner)
        # the one read of the row: it stays in registers until its gradient is written
        z, dz = transform_logits(tl.load(row_ptr + cols, mask=inb, other=0.0).to(ACC), pre, post, HAS_CAP)
        z = tl.where(inb, z, float("-inf"))
        m, s, t = stats_step(tl.full((), float("-inf"), ACC), tl.zeros((), ACC), tl.zeros((), ACC), z,
                             WITH_ENT)
        z_y = tl.sum(tl.where(cols == y, z, 0.0), 0)   # the label's z' from the registers (y in [0, V) checked)
        logp, m_ref, log_s, ent = finish_stats(m, s, t, z_y, y, V, ignore_index)
        b = row // T
        tt = row % T
        x = logp
        o = tl.load(old_ptr + b * s_old_b + tt * s_old_t).to(ACC)
        a = tl.load(adv_ptr + b * s_adv_b + tt * s_adv_t).to(ACC)
        r = x
        if KL_KIND != KL_NONE:
            r = tl.load(ref_ptr + b * s_ref_b + tt * s_ref_t).to(ACC)
        isw = x
        if HAS_ISW:
            isw = tl.load(isw_ptr + b * s_isw_b + tt * s_isw_t).to(ACC)
        w = tl.load(seq_ptr + b * NC + SQ_WEIGHT).to(ACC)
        c_logp = _token_coef(x, o, a, r, isw, w, clip_low, clip_high, dual_clip, ratio_max, tau_pos, tau_neg,
                             kl_coef, POLICY, KL_KIND, HAS_ISW, HAS_DUAL, HAS_RMAX)
        c_ent = -w * entropy_coef
        g_z = dlogits_block(z, cols, y, m_ref, log_s, ent, c_logp, c_ent, dz, GRAD_ENT)
        tl.store(out_ptr + cols, g_z.to(dlogits_ptr.dtype.element_ty), mask=inb)
    else:
        tl.store(out_ptr + cols, tl.zeros((BLOCK_V,), dlogits_ptr.dtype.element_ty), mask=inb)
    tl.store(logp_ptr + row, logp)
    tl.store(coef_ptr + row, c_logp)
    tl.store(stats_ptr + 2 * row, m_ref)
    tl.store(stats_ptr + 2 * row + 1, log_s)
    if WITH_ENT:
        tl.store(ent_ptr + row, ent)


@triton.jit
def _scale_rows_kernel(
    grad_ptr, labels_ptr, valid_ptr, scale_ptr,     # [N, V] gradient (scaled in place), [N] labels / mask, 0-d g
    n_inner, stride_outer, stride_inner, V, ignore_index,
    BLOCK_V: tl.constexpr,
):
    """grad_row *= g for the live rows, in place; nothing is read or written when g == 1 (the usual
    loss.backward()). Dead rows hold exact zeros and stay so, whatever g (as the two-pass backward)."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(scale_ptr).to(tl.float32)
    if g != 1.0:
        y, live = _row_live(labels_ptr, valid_ptr, row, ignore_index)
        if live:
            row_ptr = grad_ptr + row_offset(row, n_inner, stride_outer, stride_inner)
            cols = tl.arange(0, BLOCK_V)
            for start in range(0, V, BLOCK_V):
                c = start + cols
                x = tl.load(row_ptr + c, mask=c < V, other=0.0)
                tl.store(row_ptr + c, (x.to(tl.float32) * g).to(grad_ptr.dtype.element_ty), mask=c < V)


# ----------------------------------------------------------------------------- launchers
def max_vocab(has_cap: bool = False) -> int:
    """The largest vocabulary the one-read row kernel holds on chip without spills on sm_80 / sm_90
    (kernels/_config.py FUSED_GRAD_MAX_V; half of it with a softcap, whose tanh needs more registers)."""
    return cfg.FUSED_GRAD_MAX_V // 2 if has_cap else cfg.FUSED_GRAD_MAX_V


def _num_warps(block_v: int) -> int:
    """Warps for a row of block_v columns: FUSED_GRAD_COLS_PER_THREAD columns per thread, 4 to 32 warps."""
    return max(4, min(32, block_v // (32 * cfg.FUSED_GRAD_COLS_PER_THREAD)))


def fused_grad_fwd(logits, labels, mask, old, adv, ref, isw, seq, *, opts, inv_tau: float, ignore_index: int,
                   with_entropy: bool, logit_scale: float = 1.0, softcap=None, tau=None, out=None):
    """(logp [N], stats [N, 2], entropy [N] or None, coef [N] = dloss/dlogp, dlogits) of the token-local loss
    `opts` (a LossOptions, policy in TOKEN_LOCAL_POLICIES, no entropy_quantile) with the gradient of the
    unit-upstream loss written during the one read of each live row. mask, old, ref, isw: [B, T] or [T]; adv
    also [B]; seq: the [B, NCOL] sequence table of the aggregation (kernels/loss_seq.py seq_tables). `out`:
    where the gradient goes (the logits themselves for inplace=True; a new tensor of the logits' shape and
    dtype when None). fp32 results (fp64 for fp64 logits)."""
    rows = Rows(logits)
    n, V = rows.n_rows, rows.n_cols
    limit = max_vocab(softcap is not None)
    if limit < V:
        raise ValueError(f"fused_grad_fwd holds a row on chip: V={V} is over max_vocab()={limit}")
    y = flat_labels(labels, n)
    valid = flat_rows(mask, n, "mask")
    if out is None:
        out = torch.empty(rows.tensor.shape, dtype=logits.dtype, device=logits.device)
        d_outer, d_inner = rows.n_inner * V, V
    else:
        check_inplace_target(out)
        d_rows = Rows(out)
        if d_rows.tensor.data_ptr() != out.data_ptr() or d_rows.n_rows != n or d_rows.n_cols != V:
            raise ValueError(f"gradient target of shape {tuple(out.shape)} strides {out.stride()} cannot be "
                             f"written row by row in place")
        out, d_outer, d_inner = d_rows.tensor, d_rows.stride_outer, d_rows.stride_inner
    acc, tl_acc = acc_dtype(logits.dtype)
    dev = logits.device
    logp = torch.empty(n, dtype=acc, device=dev)
    stats = torch.empty((n, 2), dtype=acc, device=dev)
    ent = torch.empty(n, dtype=acc, device=dev) if with_entropy else logp
    coef = torch.empty(n, dtype=acc, device=dev)
    B, T = bt_shape(mask)
    tf = LogitTransform(1.0 if tau is not None else inv_tau, logit_scale, softcap)
    tp = flat_rows(tau, n, "temperature") if tau is not None else logp
    has_ref = ref is not None   # kl_coef = 0 still passes a NaN dKL on, as autograd of 0 * agg(KL) does
    kl_kind = KL_KIND_IDS[opts.kl_kind] if has_ref else KL_NONE.value
    grad_ent = with_entropy and opts.entropy_coef != 0
    if n > 0:
        record_launch("fused_grad_fwd", logits, y, valid, tau, old, adv, ref if has_ref else None, isw, seq, logp,
                      stats, ent if with_entropy else None, coef, out, grid=(n,))
        block = triton.next_power_of_2(V)
        wrap_triton(_fused_grad_kernel)[(n,)](
            rows.tensor, y, valid, tp, old, adv, ref if has_ref else old, isw if isw is not None else old, seq,
            logp, stats, ent, coef, out,
            *rows.args(), d_outer, d_inner, V, T,
            *bt_strides(old, B, T), *bt_strides(adv, B, T), *(bt_strides(ref, B, T) if has_ref else (0, 0)),
            *(bt_strides(isw, B, T) if isw is not None else (0, 0)),
            *tf.args(), int(ignore_index),
            float(opts.clip_low), float(opts.clip_high), float(opts.dual_clip or 0.0), float(opts.ratio_max or 0.0),
            float(opts.sapo_tau_pos), float(opts.sapo_tau_neg), float(opts.kl_coef), float(opts.entropy_coef),
            BLOCK_V=block, WITH_ENT=with_entropy, GRAD_ENT=grad_ent, HAS_CAP=tf.has_cap, HAS_TAU_ROWS=tau is not None,
            POLICY=POLICY_LOSS_IDS[opts.policy_loss], KL_KIND=kl_kind, HAS_ISW=isw is not None,
            HAS_DUAL=opts.dual_clip is not None, HAS_RMAX=opts.ratio_max is not None, NC=NCOL, ACC=tl_acc,
            num_warps=_num_warps(block),
        )
    return logp, stats, (ent if with_entropy else None), coef, out.view(logits.shape)


def fused_grad_loss(logits, labels, mask, old, adv, ref, isw, *, opts, with_entropy: bool, inv_tau: float,
                    ignore_index: int, logit_scale: float = 1.0, softcap=None, tau=None, out=None):
    """The whole forward of fused_ppo_loss with its gradient, 4 launches: the aggregation weights (launches 1-2
    of kernels/loss_agg.py, mask only), the row kernel (logp, H, gradient of the unit-upstream loss), the
    per-token terms and the finishing reduction (loss, stats, KL). Returns (AggResult, logp [N], stats [N, 2],
    entropy [N] or None, dlogits); the AggResult's coef is the row kernel's (what its gradient used, so that a
    backward from the logits writes the same numbers)."""
    tables = policy_tables(old, adv, mask, opts=opts, acc=acc_dtype(logits.dtype)[0], rollout_is_weights=isw)
    logp, stats, ent, coef, dlogits = fused_grad_fwd(logits, labels, mask, old, adv, ref, isw, tables[0], opts=opts,
                                               inv_tau=inv_tau, ignore_index=ignore_index, with_entropy=with_entropy,
                                               logit_scale=logit_scale, softcap=softcap, tau=tau, out=out)
    shape = labels.shape
    res: AggResult = policy_loss_agg(logp.view(shape), old, adv, mask, opts=opts, ref=ref,
                                     ent=None if ent is None else ent.view(shape), rollout_is_weights=isw,
                                     tables=tables)
    return res._replace(coef=coef.view(res.coef.shape)), logp, stats, ent, dlogits


def scale_rows_(grad, labels, mask, scale, *, ignore_index: int):
    """grad *= scale (a 0-d device tensor) on the live rows, in place; a no-op on the device when scale == 1."""
    rows = Rows(grad)
    if rows.tensor.data_ptr() != grad.data_ptr() or rows.n_cols != grad.shape[-1]:
        raise ValueError("scale_rows_ needs a gradient whose last dimension is contiguous")
    n = rows.n_rows
    y = flat_labels(labels, n)
    valid = flat_rows(mask, n, "mask")
    if n > 0:
        # bytes: the 0-d scale per program when it is 1; the live rows read and written otherwise
        record_launch("fused_grad_scale", scale, y, valid, grid=(n,))
        wrap_triton(_scale_rows_kernel)[(n,)](rows.tensor, y, valid, scale, *rows.args(), rows.n_cols,
                                              int(ignore_index), BLOCK_V=cfg.ROW_BLOCK_V,
                                              num_warps=cfg.ROW_NUM_WARPS)
    return grad


def aot_specs(AOTSpec, sig):
    """The one-read kernel at the largest row it covers (bf16 / fp32 logits; ppo with dual clip, k3 KL,
    entropy, rollout IS weights, softcap and per-token temperatures), and the scaling kernel."""
    specs = []
    f32 = {n: "fp32" for n in ("pre_hi", "pre_lo", "post_hi", "post_lo", "clip_low", "clip_high", "dual_clip",
                                "ratio_max", "tau_pos", "tau_neg", "kl_coef", "entropy_coef")}
    for dt in ("bf16", "fp32"):
        for cap in (False, True):
            block = triton.next_power_of_2(max_vocab(cap))
            ce = dict(BLOCK_V=block, WITH_ENT=True, GRAD_ENT=True, HAS_CAP=cap, HAS_TAU_ROWS=True,
                      POLICY=POLICY_LOSS_IDS["ppo"], KL_KIND=KL_KIND_IDS["k3"], HAS_ISW=True, HAS_DUAL=True,
                      HAS_RMAX=True, NC=NCOL, ACC=tl.float32)
            types = {n: "*fp32" for n in _fused_grad_kernel.arg_names if n.endswith("_ptr")}
            types.update(logits_ptr=f"*{dt}", dlogits_ptr=f"*{dt}", labels_ptr="*i64", valid_ptr="*i1", **f32)
            specs.append(AOTSpec(f"fused_grad_fwd[{dt}{',cap' if cap else ''},V={max_vocab(cap)}]",
                                 _fused_grad_kernel, sig(_fused_grad_kernel, types, ce), ce,
                                 ("stride_outer", "stride_inner", "d_stride_outer", "d_stride_inner", "V"), True,
                                 _num_warps(block)))
    ce = dict(BLOCK_V=cfg.ROW_BLOCK_V)
    types = dict(grad_ptr="*bf16", labels_ptr="*i64", valid_ptr="*i1", scale_ptr="*fp32")
    specs.append(AOTSpec("fused_grad_scale[bf16]", _scale_rows_kernel, sig(_scale_rows_kernel, types, ce), ce,
                         ("stride_outer", "stride_inner", "V"), True, cfg.ROW_NUM_WARPS))
    return specs
