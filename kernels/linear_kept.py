"""Kept sets on the linear ops' chunk buffer: the launches that fastppo.linear_pipeline adds to a chunk of
compacted rows when a row's log-prob is renormalised over its kept set K (docs/design.md §4.1b).

The chunk's z' ([n_rows, V], fp32 / fp64, written by kernels/linear.py's `_linear_fwd_kernel`) is read at the
kept columns only; the CSR is first put in the order of the compacted rows (`compact_kept`, on device, no host
sync), optionally restricted to a vocabulary shard [start, start + size) (ids made local, the others moved past
the last row's end and never read).

- `_linear_kept_stats_kernel` (one program per chunk row): m_K = max_{j in K} z'_j, log s_K = log sum_{j in K}
  exp(z'_j - m_K) (kept apart; an empty K gives m_K = log s_K = -inf) and logp = (z'_y - m_K) - log s_K, NaN
  when the label is not in K; a label in [0, V) not in K also sets log s_K = NaN, so the gradient over K is NaN
  (a label outside [0, V), another shard's, leaves the shard's statistics for the combine). Reads nnz + 1
  values per row.
- `_linear_kept_grad_kernel` (one program per chunk row): the full gradient at the kept columns, into gk [nnz]
  (CSR positions), w.r.t. the raw logits z = h . w + b:
      gk_j = [c_logp (onehot(y)_j - p_K,j) - c_ent p_j (log p_j + H)] inv_tau (1 - th_j^2 with softcap) scale,
      p_K,j = exp((z'_j - m_K) - log s_K),  p_j = exp((z'_j - m) - log s),  th_j = z'_j / (c inv_tau).
  It runs before kernels/linear.py's dz launch (which, with c_logp = 0, writes the dense part: the entropy
  term, or zeros) because that launch may write dz over z' in place.
- `_linear_kept_scatter_kernel`: dz[row, j] = gk_j for j in K (in dz's dtype): the kept columns' full gradient
  overwrites the dense part, so nothing is read back or rounded twice.
- `_linear_colsum_kernel` (grid: V tiles): d(bias)_j (+)= sum_i dz_ij over the chunk's valid rows in order
  (fp32, no atomics): with a kept set d(bias) is summed after the scatter, from dz.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import _config as cfg
from ._common import keep_nonzero, stats_step
from .launches import record_launch

KEPT_BLOCK_K = 256   # kept ids per step (as kernels/kept.py)


@triton.jit
def _kept_row(idx_ptr, nvalid_ptr, offsets_ptr, labels_ptr, s_y, r0):
    """(valid, original row, label, CSR start, CSR end) of chunk row program_id(0)."""
    rows = r0 + tl.program_id(0)
    valid = rows < tl.load(nvalid_ptr)
    orig = tl.load(idx_ptr + rows, mask=valid, other=0).to(tl.int64)
    y = tl.load(labels_ptr + orig * s_y, mask=valid, other=-1).to(tl.int64)
    start = tl.load(offsets_ptr + rows, mask=valid, other=0).to(tl.int64)
    end = tl.load(offsets_ptr + rows + 1, mask=valid, other=0).to(tl.int64)
    return valid, orig, y, start, end


@triton.jit(do_not_specialize=["r0"])
def _linear_kept_stats_kernel(
    # data: chunk z' [n_rows, V], labels (by original row), compacted rows, compacted CSR
    z_ptr, labels_ptr, idx_ptr, nvalid_ptr, ids_ptr, offsets_ptr,
    # outputs: (m_K, log s_K) [N, 2] and logp [N] by compacted position, logp [N] by original row
    kstat_ptr, logp_c_ptr, logp_ptr,
    r0, V, s_zn, s_y,
    BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):
    valid, orig, y, start, end = _kept_row(idx_ptr, nvalid_ptr, offsets_ptr, labels_ptr, s_y, r0)
    if valid:
        rows = r0 + tl.program_id(0)
        row_ptr = z_ptr + tl.program_id(0).to(tl.int64) * s_zn
        ks = tl.arange(0, BLOCK_K)
        m = tl.full((), float("-inf"), ACC)
        s = tl.zeros((), ACC)
        hits = tl.zeros((), tl.int32)
        for k0 in range(start, end, BLOCK_K):
            inb = k0 + ks < end
            ids = tl.load(ids_ptr + k0 + ks, mask=inb, other=0).to(tl.int64)
            z = tl.load(row_ptr + ids, mask=inb, other=float("-inf"))
            m, s, _ = stats_step(m, s, s, z, False)
            hits += tl.sum(tl.where(inb & (ids == y), 1, 0))
        z_y = tl.load(row_ptr + y, mask=(y >= 0) & (y < V), other=0.0)
        log_s = tl.where((hits == 0) & (y >= 0) & (y < V), float("nan"), tl.log(s))
        logp = tl.where(hits > 0, (z_y - m) - log_s, float("nan"))
        tl.store(kstat_ptr + 2 * rows, m)
        tl.store(kstat_ptr + 2 * rows + 1, log_s)
        tl.store(logp_c_ptr + rows, logp)
        tl.store(logp_ptr + orig, logp)


@triton.jit(do_not_specialize=["r0"])
def _linear_kept_grad_kernel(
    # data: chunk z', labels, compacted rows and CSR, per-row tau (by original row)
    z_ptr, labels_ptr, idx_ptr, nvalid_ptr, ids_ptr, offsets_ptr, tau_ptr,
    # per compacted position: kept stats, full (m, log s), entropy, coefficients; output gk [nnz]
    kstat_ptr, lse_ptr, ent_ptr, c_logp_ptr, c_ent_ptr, gk_ptr,
    r0, s_zn, s_y,
    logit_scale, softcap, inv_tau,
    BLOCK_K: tl.constexpr, HAS_ENT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TAU_ROWS: tl.constexpr,
    ACC: tl.constexpr,
):
    valid, orig, y, start, end = _kept_row(idx_ptr, nvalid_ptr, offsets_ptr, labels_ptr, s_y, r0)
    if valid:
        rows = r0 + tl.program_id(0)
        row_ptr = z_ptr + tl.program_id(0).to(tl.int64) * s_zn
        inv = inv_tau
        if HAS_TAU_ROWS:
            inv = 1.0 / tl.load(tau_ptr + orig).to(ACC)
        m_k = tl.load(kstat_ptr + 2 * rows)
        logs_k = tl.load(kstat_ptr + 2 * rows + 1)
        c_logp = tl.load(c_logp_ptr + rows).to(ACC)
        ks = tl.arange(0, BLOCK_K)
        for k0 in range(start, end, BLOCK_K):
            inb = k0 + ks < end
            ids = tl.load(ids_ptr + k0 + ks, mask=inb, other=0).to(tl.int64)
            z = tl.load(row_ptr + ids, mask=inb, other=0.0)
            g = c_logp * (tl.where(ids == y, 1.0, 0.0) - tl.exp((z - m_k) - logs_k))
            if HAS_ENT:      # the dense launch's entropy term, recomputed (kernels/_common.py dlogits_block)
                logp = (z - tl.load(lse_ptr + 2 * rows)) - tl.load(lse_ptr + 2 * rows + 1)
                c_ent = tl.load(c_ent_ptr + rows).to(ACC)
                g -= c_ent * keep_nonzero(tl.exp(logp), logp + tl.load(ent_ptr + rows))
            g = g * inv
            if HAS_SOFTCAP:
                th = z / (softcap * inv)
                g = g * (1.0 - th * th)
            tl.store(gk_ptr + k0 + ks, g * logit_scale, mask=inb)


@triton.jit(do_not_specialize=["r0"])
def _linear_kept_scatter_kernel(gk_ptr, ids_ptr, offsets_ptr, labels_ptr, idx_ptr, nvalid_ptr, dz_ptr,
                                r0, s_dzn, s_y, BLOCK_K: tl.constexpr):
    valid, orig, y, start, end = _kept_row(idx_ptr, nvalid_ptr, offsets_ptr, labels_ptr, s_y, r0)
    if valid:
        row_ptr = dz_ptr + tl.program_id(0).to(tl.int64) * s_dzn
        ks = tl.arange(0, BLOCK_K)
        for k0 in range(start, end, BLOCK_K):
            inb = k0 + ks < end
            ids = tl.load(ids_ptr + k0 + ks, mask=inb, other=0).to(tl.int64)
            g = tl.load(gk_ptr + k0 + ks, mask=inb, other=0.0)
            tl.store(row_ptr + ids, g.to(dz_ptr.dtype.element_ty), mask=inb)


@triton.jit(do_not_specialize=["r0", "n_rows"])
def _linear_colsum_kernel(dz_ptr, nvalid_ptr, db_in_ptr, db_ptr, r0, n_rows, V, s_dzn,
                          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, ACC_IN: tl.constexpr, ACC: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    n_here = tl.minimum(n_rows, tl.load(nvalid_ptr) - r0)
    db = tl.zeros((BLOCK_V,), ACC)
    for i0 in range(0, n_here, BLOCK_N):
        rows_c = i0 + tl.arange(0, BLOCK_N)
        ok = (rows_c < n_here)[:, None] & col_ok[None, :]
        dz = tl.load(dz_ptr + rows_c.to(tl.int64)[:, None] * s_dzn + cols[None, :], mask=ok, other=0.0)
        db += tl.sum(dz.to(ACC), 0)
    if ACC_IN:
        db += tl.load(db_in_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    tl.store(db_ptr + cols, db.to(db_ptr.dtype.element_ty), mask=col_ok)


# ----------------------------------------------------------------------------- launchers
def compact_kept(ids: torch.Tensor, offsets: torch.Tensor, idx: torch.Tensor, start=0, size=None):
    """The CSR (ids, offsets) of a KeptSet in the order of the rows `idx` (a permutation of the N rows, e.g.
    the valid rows first), restricted to the vocabulary range [start, start + size) with ids made local
    (start: an int or a 0-d device tensor). Returns (ids_c int64 [nnz], offsets_c int64 [N + 1]); entries
    outside the range sit past offsets_c[N] and are never read. Device ops only (no host sync): O(nnz log nnz)."""
    n = idx.numel()
    nnz = ids.numel()
    dev = ids.device
    counts = offsets[1:] - offsets[:-1]
    row = torch.repeat_interleave(torch.arange(n, device=dev), counts, output_size=nnz)
    pos = torch.empty_like(idx).scatter_(0, idx, torch.arange(n, device=dev, dtype=idx.dtype))
    local = ids.long() - start
    inside = (local >= 0) & (local < size) if size is not None else torch.ones_like(local, dtype=torch.bool)
    key = torch.where(inside, pos[row], n)
    order = torch.argsort(key, stable=True)
    cnt = torch.zeros(n + 1, dtype=torch.int64, device=dev).index_add_(0, key, torch.ones_like(key))
    offsets_c = torch.cat([cnt.new_zeros(1), torch.cumsum(cnt[:n], 0)])
    return local.index_select(0, order), offsets_c


def new_kept_outputs(N, device, acc):
    """(m_K, log s_K) [N, 2] by compacted position (-inf for rows never written)."""
    return torch.full((N, 2), float("-inf"), dtype=acc, device=device)


def kept_stats_chunk(z, labels, rows, r0, n_rows, ids_c, offsets_c, kstat, logp_c, logp):
    """Launch the kept statistics of compacted rows [r0, r0 + n_rows) from the chunk's z' ([n_rows, V])."""
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    record_launch("linear_kept_stats", labels[:n_rows], ids_c, offsets_c[:n_rows + 1], kstat[:n_rows],
                  logp_c[:n_rows], logp[:n_rows])
    wrap_triton(_linear_kept_stats_kernel)[(n_rows,)](
        z, labels, rows.idx, rows.n_valid, ids_c, offsets_c, kstat, logp_c, logp, r0, z.shape[1], z.stride(0),
        labels.stride(0), BLOCK_K=KEPT_BLOCK_K, ACC=tl.float64 if acc == torch.float64 else tl.float32,
        num_warps=cfg.ELEM_NUM_WARPS)


def kept_grads_chunk(z, labels, rows, r0, n_rows, ids_c, offsets_c, kstat, lse, ent, c_logp, c_ent, gk, opts,
                     tau=None):
    """gk at the kept columns of compacted rows [r0, r0 + n_rows) (module doc), before the dense dz launch."""
    tl_acc = tl.float64 if z.dtype == torch.float64 else tl.float32
    has_ent = c_ent is not None
    record_launch("linear_kept_grad", labels[:n_rows], ids_c, offsets_c[:n_rows + 1], tau, kstat[:n_rows],
                  lse[:n_rows] if has_ent else None, ent[:n_rows] if has_ent else None, c_logp[:n_rows],
                  c_ent[:n_rows] if has_ent else None, gk)
    wrap_triton(_linear_kept_grad_kernel)[(n_rows,)](
        z, labels, rows.idx, rows.n_valid, ids_c, offsets_c, tau if tau is not None else kstat, kstat, lse,
        ent if has_ent else lse, c_logp, c_ent if has_ent else c_logp, gk, r0, z.stride(0), labels.stride(0),
        float(opts.logit_scale), float(opts.softcap or 1.0), float(opts.inv_tau),
        BLOCK_K=KEPT_BLOCK_K, HAS_ENT=has_ent, HAS_SOFTCAP=opts.softcap is not None, HAS_TAU_ROWS=tau is not None,
        ACC=tl_acc, num_warps=cfg.ELEM_NUM_WARPS)


def kept_scatter_chunk(gk, dz, labels, rows, r0, n_rows, ids_c, offsets_c):
    record_launch("linear_kept_scatter", gk, ids_c, offsets_c[:n_rows + 1], labels[:n_rows], dz)
    wrap_triton(_linear_kept_scatter_kernel)[(n_rows,)](
        gk, ids_c, offsets_c, labels, rows.idx, rows.n_valid, dz, r0, dz.stride(0), labels.stride(0),
        BLOCK_K=KEPT_BLOCK_K, num_warps=cfg.ELEM_NUM_WARPS)


def colsum_chunk(dz, rows, r0, n_rows, acc, db_out, db_in=None):
    """db_out = sum over the chunk's valid rows of dz (+ db_in), sums in acc (fp32 / fp64) in row order."""
    V = dz.shape[1]
    record_launch("linear_colsum", dz, db_in, db_out)
    wrap_triton(_linear_colsum_kernel)[(triton.cdiv(V, cfg.LIN_BLOCK_V),)](
        dz, rows.n_valid, db_in if db_in is not None else db_out, db_out, r0, n_rows, V, dz.stride(0),
        BLOCK_N=cfg.LIN_BLOCK_N, BLOCK_V=cfg.LIN_BLOCK_V, ACC_IN=db_in is not None,
        ACC=tl.float64 if acc == torch.float64 else tl.float32, num_warps=cfg.LIN_NUM_WARPS)


def aot_specs(AOTSpec, sig):
    """Ahead-of-time compile specs (kernels/aot.py): fp32 z' buffer, a bf16 dz, entropy, softcap, per-row tau."""
    i64, f32 = "*i64", "*fp32"
    base = dict(z_ptr=f32, labels_ptr=i64, idx_ptr=i64, nvalid_ptr=i64, ids_ptr=i64, offsets_ptr=i64)
    ce = dict(BLOCK_K=KEPT_BLOCK_K, ACC=tl.float32)
    types = dict(base, kstat_ptr=f32, logp_c_ptr=f32, logp_ptr=f32)
    specs = [AOTSpec("linear_kept_stats", _linear_kept_stats_kernel, sig(_linear_kept_stats_kernel, types, ce), ce,
                     ("V", "s_zn"), False, cfg.ELEM_NUM_WARPS)]
    ce = dict(BLOCK_K=KEPT_BLOCK_K, HAS_ENT=True, HAS_SOFTCAP=True, HAS_TAU_ROWS=True, ACC=tl.float32)
    types = dict(base, tau_ptr=f32, kstat_ptr=f32, lse_ptr=f32, ent_ptr=f32, c_logp_ptr=f32, c_ent_ptr=f32,
                 gk_ptr=f32, logit_scale="fp32", softcap="fp32", inv_tau="fp32")
    specs.append(AOTSpec("linear_kept_grad", _linear_kept_grad_kernel, sig(_linear_kept_grad_kernel, types, ce), ce,
                         ("s_zn",), False, cfg.ELEM_NUM_WARPS))
    ce = dict(BLOCK_K=KEPT_BLOCK_K)
    types = dict(gk_ptr=f32, ids_ptr=i64, offsets_ptr=i64, labels_ptr=i64, idx_ptr=i64, nvalid_ptr=i64,
                 dz_ptr="*bf16")
    specs.append(AOTSpec("linear_kept_scatter[bf16]", _linear_kept_scatter_kernel,
                         sig(_linear_kept_scatter_kernel, types, ce), ce, ("s_dzn",), False, cfg.ELEM_NUM_WARPS))
    ce = dict(BLOCK_N=cfg.LIN_BLOCK_N, BLOCK_V=cfg.LIN_BLOCK_V, ACC_IN=True, ACC=tl.float32)
    types = dict(dz_ptr="*bf16", nvalid_ptr=i64, db_in_ptr=f32, db_ptr="*bf16")
    specs.append(AOTSpec("linear_colsum[bf16]", _linear_colsum_kernel, sig(_linear_colsum_kernel, types, ce), ce,
                         ("V", "s_dzn"), True, cfg.LIN_NUM_WARPS))
    return specs
