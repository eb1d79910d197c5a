"""Per-token log-probabilities and entropy of a [..., V] logits tensor: one read per row forward,
one read + one write backward.

Forward, per row with z' = z / tau:
    lse = logsumexp(z'),  logp = z'_y - lse,  H = lse - sum_i p_i z'_i = log s - t / s
where s = sum exp(z' - m), t = sum exp(z' - m)(z' - m), m the row max (kept online).
Backward (for upstream c_logp = dL/dlogp, c_ent = dL/dH, optional scalar `scale`):
    dL/dz_j = scale * [c_logp (onehot(y)_j - p_j) - c_ent p_j (log p_j + H)] / tau
Only lse and H (fp32, one per row) are saved between the passes.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import _config as cfg
from ._common import dlogits_block, finish_stats, row_offset, stats_step
from ._rows import Rows, acc_dtype, flat_labels
from .launches import record_launch


@triton.jit(do_not_specialize=["ignore_index"])
def _logprobs_fwd_kernel(
    logits_ptr, labels_ptr, logp_ptr, lse_ptr, ent_ptr,
    n_inner, stride_outer, stride_inner, V,
    inv_tau, ignore_index,
    BLOCK_V: tl.constexpr, WITH_ENT: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row_offset(row, n_inner, stride_outer, stride_inner)
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), ACC)
    s = tl.zeros((), ACC)
    t = tl.zeros((), ACC)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        z = tl.load(row_ptr + c, mask=c < V, other=float("-inf")).to(ACC) * inv_tau
        m, s, t = stats_step(m, s, t, z, WITH_ENT)
    y = tl.load(labels_ptr + row).to(tl.int64)
    z_y = tl.load(row_ptr + y, mask=(y >= 0) & (y < V) & (y != ignore_index), other=0.0).to(ACC) * inv_tau
    logp, lse, ent = finish_stats(m, s, t, z_y, y, V, ignore_index)
    tl.store(logp_ptr + row, logp)
    tl.store(lse_ptr + row, lse)
    if WITH_ENT:
        tl.store(ent_ptr + row, ent)


@triton.jit(do_not_specialize=["ignore_index"])
def _logprobs_bwd_kernel(
    logits_ptr, labels_ptr, lse_ptr, ent_ptr, c_logp_ptr, c_ent_ptr, scale_ptr, dlogits_ptr,
    n_inner, stride_outer, stride_inner, d_stride_outer, d_stride_inner, V,
    inv_tau, ignore_index,
    BLOCK_V: tl.constexpr, HAS_ENT: tl.constexpr, HAS_SCALE: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row_offset(row, n_inner, stride_outer, stride_inner)
    out_ptr = dlogits_ptr + row_offset(row, n_inner, d_stride_outer, d_stride_inner)
    y = tl.load(labels_ptr + row).to(tl.int64)
    keep = (y != ignore_index).to(ACC)
    lse = tl.load(lse_ptr + row)
    c_logp = tl.load(c_logp_ptr + row) * keep
    ent = tl.zeros((), ACC)
    c_ent = tl.zeros((), ACC)
    if HAS_ENT:
        ent = tl.load(ent_ptr + row)
        c_ent = tl.load(c_ent_ptr + row) * keep
    if HAS_SCALE:
        g = tl.load(scale_ptr).to(ACC)
        c_logp = c_logp * g
        c_ent = c_ent * g
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        inb = c < V
        z = tl.load(row_ptr + c, mask=inb, other=float("-inf")).to(ACC) * inv_tau
        g_z = dlogits_block(z, c, y, lse, ent, c_logp, c_ent, inv_tau, HAS_ENT)
        tl.store(out_ptr + c, g_z.to(dlogits_ptr.dtype.element_ty), mask=inb)


def logprobs_fwd(logits: torch.Tensor, labels: torch.Tensor, *, inv_tau: float, ignore_index: int,
                 with_entropy: bool):
    """Returns (logp [N], lse [N], entropy [N] or None), N = logits.numel() // V, in fp32
    (fp64 for fp64 logits, so that float64 gradcheck is meaningful)."""
    rows = Rows(logits)
    y = flat_labels(labels, rows.n_rows)
    n = rows.n_rows
    dev = logits.device
    acc, tl_acc = acc_dtype(logits.dtype)
    logp = torch.empty(n, dtype=acc, device=dev)
    lse = torch.empty(n, dtype=acc, device=dev)
    ent = torch.empty(n, dtype=acc, device=dev) if with_entropy else lse
    if n > 0:
        record_launch("logprobs_fwd", logits, y, logp, lse, ent if with_entropy else None)
        wrap_triton(_logprobs_fwd_kernel)[(n,)](
            rows.tensor, y, logp, lse, ent, *rows.args(), rows.n_cols, float(inv_tau), int(ignore_index),
            BLOCK_V=cfg.ROW_BLOCK_V, WITH_ENT=with_entropy, ACC=tl_acc, num_warps=cfg.ROW_NUM_WARPS,
        )
    return logp, lse, (ent if with_entropy else None)


def logprobs_bwd(logits, labels, lse, ent, c_logp, c_ent, *, inv_tau: float, ignore_index: int,
                 scale=None, inplace: bool = False):
    """dlogits for upstream per-row gradients c_logp (of logp) and c_ent (of entropy, or None),
    times the optional 0-d tensor `scale` (read on the device: no host sync). With `inplace`
    the gradient overwrites the logits' storage (each block is read before it is written)."""
    rows = Rows(logits)
    y = flat_labels(labels, rows.n_rows)
    if inplace:
        out = rows.tensor
        d_outer, d_inner = rows.stride_outer, rows.stride_inner
    else:
        out = torch.empty(rows.tensor.shape, dtype=logits.dtype, device=logits.device)
        d_outer, d_inner = rows.n_inner * rows.n_cols, rows.n_cols
    has_ent = c_ent is not None
    c_logp = c_logp.reshape(-1).contiguous()      # upstream grads of a .sum() arrive with stride 0
    c_ent = c_ent.reshape(-1).contiguous() if has_ent else None
    if rows.n_rows > 0:
        record_launch("logprobs_bwd", logits, y, lse, ent if has_ent else None, c_logp, c_ent, scale, logits)
        wrap_triton(_logprobs_bwd_kernel)[(rows.n_rows,)](
            rows.tensor, y, lse, ent if has_ent else lse, c_logp, c_ent if has_ent else c_logp,
            scale if scale is not None else lse, out,
            *rows.args(), d_outer, d_inner, rows.n_cols, float(inv_tau), int(ignore_index),
            BLOCK_V=cfg.ROW_BLOCK_V, HAS_ENT=has_ent, HAS_SCALE=scale is not None,
            ACC=acc_dtype(logits.dtype)[1], num_warps=cfg.ROW_NUM_WARPS,
        )
    return out.view(logits.shape) if out.shape != logits.shape else out
