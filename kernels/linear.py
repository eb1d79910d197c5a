"""Log-probs, entropy, TRL's extra per-token outputs and the gradients of the linear ops, from the
hidden states and the lm_head weight, tile by tile, never holding the [N, V] logits.

Rows are addressed through a device index `idx` (the valid rows first, in their original order)
and a device count `n_valid`: a program whose rows all lie past `n_valid` does no work, so FLOPs
scale with the valid rows and no host sync is needed to find them. Rows past `n_valid` are never
read (NaN in a masked row's hidden cannot reach any output or gradient).

The logit of vocabulary column j for row i (TRL's `_ChunkedLogProbFunction` order):
    z_ij  = hidden_i . weight_j + bias_j                      (tl.dot, fp32 accumulation)
    z'_ij = softcap(logit_scale * z_ij) * inv_tau,  softcap(x) = c tanh(x / c)   (identity without c)

Kernels (a "chunk" is a block of consecutive compacted rows [r0, r0 + n_rows)):
- `_linear_fwd_kernel`  grid (row tiles, vocabulary splits): z' tiles, per-split partial row
  statistics (max, sum-exp, entropy sum, sum-exp^2, sum z', max before the label), the label's z'
  and, with STORE_Z, the chunk's z' into an fp32 [n_rows, V] buffer. 2 n H V FLOPs.
- `_linear_finish_kernel`: merges the split partials per row into the row statistics (max m, log s; kept
  apart, never one absolute lse), log-prob, entropy and the extras, scattered to the rows' original positions.
- `_linear_dz_kernel`   grid (V tiles): dz = dloss/dz from the stored z' and the per-row coefficients,
  written once in the GEMM input dtype (in place over z' for fp32/fp64); d(bias) summed in fp32.
- `_linear_dh_kernel`   grid (row tiles, H tiles): d(hidden)[i, :] = sum_j dz_ij weight_j, the
  [BLOCK_N, BLOCK_H] accumulator stays in registers across all vocabulary tiles (d(hidden) is
  written once, no fp32 re-read). 2 n H V FLOPs.
- `_linear_dw_kernel`   grid (V tiles, H tiles): d(weight)_j += sum_i dz_ij hidden_i over the
  chunk's valid rows, fixed order, no atomics. 2 n H V FLOPs.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import _config as cfg
from ._common import dlogits_block, entropy_step, keep_nonzero, online_softmax_step
from .launches import record_launch

N_PARTIALS = 6   # max, sum-exp, entropy sum, sum-exp^2, sum z', max z' before the label


@triton.jit
def _row_inv_tau(tau_ptr, orig, row_ok, inv_tau, HAS_TAU_ROWS: tl.constexpr, ACC: tl.constexpr):
    """1 / temperature per row of the tile, [BLOCK_N, 1]: the scalar inv_tau, or 1 / tau[orig] (per-token)."""
    if HAS_TAU_ROWS:
        inv = 1.0 / tl.load(tau_ptr + orig, mask=row_ok, other=1.0).to(ACC)
    else:
        inv = tl.zeros(orig.shape, ACC) + inv_tau     # one type on both branches (the JIT requires it)
    return inv[:, None]


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, orig, row_ok, cols, V, H, s_hn, s_hk, s_wv, s_wk, s_b,
                logit_scale, softcap, inv_tau,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                ROUND: tl.constexpr):
    """z' tile [BLOCK_N, BLOCK_V] for hidden rows `orig` (int64) and vocabulary columns `cols`; -inf past V.
    z = h . w + b is rounded to ROUND (logits_dtype; ACC: no rounding) before the transform. Every offset is
    64-bit (a stride times an index can pass 2^31)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), ACC)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    c64 = cols.to(tl.int64)
    col_ok = cols < V
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        h = tl.load(h_ptr + orig[:, None] * s_hn + k[None, :] * s_hk, mask=row_ok[:, None] & (k[None, :] < H),
                    other=0.0)
        w = tl.load(w_ptr + c64[:, None] * s_wv + k[None, :] * s_wk, mask=col_ok[:, None] & (k[None, :] < H),
                    other=0.0)
        acc = tl.dot(h.to(DOT), tl.trans(w.to(DOT)), acc, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c64 * s_b, mask=col_ok, other=0.0).to(ACC)[None, :]
    z = acc.to(ROUND).to(ACC) * logit_scale
    if HAS_SOFTCAP:
        z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)   # c tanh(z / c)
    return tl.where(col_ok[None, :], z * inv_tau, float("-inf"))


@triton.jit
def _chunk_rows(idx_ptr, nvalid_ptr, r0, n_rows, tile, BLOCK_N: tl.constexpr):
    """Chunk-local rows of tile `tile`, their global compacted positions, validity and original row ids."""
    rows_c = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = r0 + rows_c
    n_valid = tl.load(nvalid_ptr)
    row_ok = (rows_c < n_rows) & (rows < n_valid)
    orig = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    return rows_c, rows, row_ok, orig


@triton.jit(do_not_specialize=["r0", "n_rows", "ignore_index"])
def _linear_fwd_kernel(
    # data
    h_ptr, w_ptr, b_ptr, labels_ptr, idx_ptr, nvalid_ptr, tau_ptr,
    z_ptr, part_ptr, zy_ptr,
    # shapes
    r0, n_rows, V, H, v_split,
    # strides
    s_hn, s_hk, s_wv, s_wk, s_b, s_y, s_zn,
    # logit transform
    logit_scale, softcap, inv_tau,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, WITH_ENT: tl.constexpr, WITH_EXTRAS: tl.constexpr, STORE_Z: tl.constexpr,
    HAS_TAU_ROWS: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, ROUND: tl.constexpr,
):
    """Partial statistics of rows tile program_id(0) over columns [v_lo, v_hi) of split program_id(1):
    part[k, split, row] for k in (m, s = sum e^(z'-m), t = sum e^(z'-m) (z'-m), sq = sum e^(2(z'-m)),
    sum z', max of z' over columns before the label); zy[row] = z'_label from the split holding it."""
    rows_c, rows, row_ok, orig = _chunk_rows(idx_ptr, nvalid_ptr, r0, n_rows, tl.program_id(0), BLOCK_N)
    split = tl.program_id(1)
    v_lo = split * v_split
    v_hi = tl.minimum(v_lo + v_split, V)
    # a tile with no valid row runs no vocabulary step (no FLOPs), and stores nothing
    v_end = tl.where(tl.max(row_ok.to(tl.int32), 0) > 0, v_hi, v_lo)
    y = tl.load(labels_ptr + orig * s_y, mask=row_ok, other=-1).to(tl.int64)
    inv_rows = _row_inv_tau(tau_ptr, orig, row_ok, inv_tau, HAS_TAU_ROWS, ACC)
    m = tl.full((BLOCK_N,), float("-inf"), ACC)
    s = tl.zeros((BLOCK_N,), ACC)
    t = tl.zeros((BLOCK_N,), ACC)
    sq = tl.zeros((BLOCK_N,), ACC)
    zsum = tl.zeros((BLOCK_N,), ACC)
    before = tl.full((BLOCK_N,), float("-inf"), ACC)
    z_y = tl.zeros((BLOCK_N,), ACC)
    for v0 in range(v_lo, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _logit_tile(h_ptr, w_ptr, b_ptr, orig, row_ok, cols, v_hi, H, s_hn, s_hk, s_wv, s_wk, s_b,
                        logit_scale, softcap, inv_rows, BLOCK_N, BLOCK_V, BLOCK_K, HAS_BIAS, HAS_SOFTCAP, ACC,
                        DOT, PRECISION, ROUND)
        if STORE_Z:
            out = z_ptr + rows_c.to(tl.int64)[:, None] * s_zn + cols[None, :]
            tl.store(out, z, mask=row_ok[:, None] & (cols[None, :] < v_hi))
        is_y = cols[None, :] == y[:, None]
        z_y += tl.sum(tl.where(is_y, z, 0.0), 1)
        m_new, s_new, alpha, e, m_ref = online_softmax_step(m, s, z)
        if WITH_ENT:
            t = entropy_step(t, s, m, m_ref, alpha, e, z)
        if WITH_EXTRAS:
            sq = sq * alpha * alpha + tl.sum(e * e, 1)
            zsum += tl.sum(tl.where(cols[None, :] < v_hi, z, 0.0), 1)
            before = tl.maximum(before, tl.max(tl.where(cols[None, :] < y[:, None], z, float("-inf")), 1))
        m, s = m_new, s_new
    n_splits = tl.num_programs(1)
    base = part_ptr + split.to(tl.int64) * n_rows + rows_c
    plane = n_splits.to(tl.int64) * n_rows
    tl.store(base, m, mask=row_ok)
    tl.store(base + plane, s, mask=row_ok)
    if WITH_ENT:
        tl.store(base + 2 * plane, t, mask=row_ok)
    if WITH_EXTRAS:
        tl.store(base + 3 * plane, sq, mask=row_ok)
        tl.store(base + 4 * plane, zsum, mask=row_ok)
        tl.store(base + 5 * plane, before, mask=row_ok)
    tl.store(zy_ptr + rows_c, z_y, mask=row_ok & (y >= v_lo) & (y < v_hi))


@triton.jit(do_not_specialize=["r0", "n_rows", "ignore_index", "n_splits"])
def _linear_finish_kernel(
    # data
    labels_ptr, idx_ptr, nvalid_ptr, part_ptr, zy_ptr,
    lse_ptr, ent_c_ptr, logp_c_ptr,                       # per compacted row (global position); lse: (m, log s)
    logp_ptr, ent_ptr, sq_ptr, mean_ptr, top1_ptr,        # per original row
    # shapes
    r0, n_rows, V, n_splits, s_y,
    BLOCK: tl.constexpr, WITH_ENT: tl.constexpr, WITH_EXTRAS: tl.constexpr, ACC: tl.constexpr,
):
    """Merge the split partials of each row (logsumexp merge, sums relative to the common max):
    logp = (z'_y - m) - log s, H = log s - t / s, log_sum_sq_probs = log sq - 2 log s,
    mean_logits = sum z' / V, is_top1 = z'_y >= max and z'_y > max before the label (first argmax).
    A label outside [0, V) gives NaN log-prob."""
    rows_c, rows, row_ok, orig = _chunk_rows(idx_ptr, nvalid_ptr, r0, n_rows, tl.program_id(0), BLOCK)
    y = tl.load(labels_ptr + orig * s_y, mask=row_ok, other=0).to(tl.int64)
    m = tl.full((BLOCK,), float("-inf"), ACC)
    s = tl.zeros((BLOCK,), ACC)
    t = tl.zeros((BLOCK,), ACC)
    sq = tl.zeros((BLOCK,), ACC)
    zsum = tl.zeros((BLOCK,), ACC)
    before = tl.full((BLOCK,), float("-inf"), ACC)
    plane = n_splits.to(tl.int64) * n_rows
    for j in range(0, n_splits):
        base = part_ptr + j * n_rows + rows_c
        mj = tl.load(base, mask=row_ok, other=0.0)
        sj = tl.load(base + plane, mask=row_ok, other=0.0)
        m_new = tl.maximum(m, mj)
        a = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_new))
        b = tl.exp(mj - m_new)
        if WITH_ENT:
            tj = tl.load(base + 2 * plane, mask=row_ok, other=0.0)
            t = keep_nonzero(a, t + s * tl.where(m == float("-inf"), 0.0, m - m_new)) \
                + keep_nonzero(b, tj + sj * (mj - m_new))
        if WITH_EXTRAS:
            sq = a * a * sq + b * b * tl.load(base + 3 * plane, mask=row_ok, other=0.0)
            zsum += tl.load(base + 4 * plane, mask=row_ok, other=0.0)
            before = tl.maximum(before, tl.load(base + 5 * plane, mask=row_ok, other=0.0))
        s = a * s + b * sj
        m = m_new
    z_y = tl.load(zy_ptr + rows_c, mask=row_ok, other=0.0)
    s = tl.where(row_ok, s, 1.0)     # rows not stored: keep their (discarded) lanes finite
    sq = tl.where(row_ok, sq, 1.0)
    log_s = tl.log(s)
    logp = tl.where((y >= 0) & (y < V), (z_y - m) - log_s, float("nan"))
    tl.store(lse_ptr + 2 * rows, m, mask=row_ok)
    tl.store(lse_ptr + 2 * rows + 1, log_s, mask=row_ok)
    tl.store(logp_c_ptr + rows, logp, mask=row_ok)
    tl.store(logp_ptr + orig, logp, mask=row_ok)
    if WITH_ENT:
        ent = log_s - t / s
        tl.store(ent_c_ptr + rows, ent, mask=row_ok)
        tl.store(ent_ptr + orig, ent, mask=row_ok)
    if WITH_EXTRAS:
        tl.store(sq_ptr + orig, tl.log(sq) - 2.0 * tl.log(s), mask=row_ok)
        tl.store(mean_ptr + orig, zsum / V, mask=row_ok)
        tl.store(top1_ptr + orig, ((z_y >= m) & (z_y > before)).to(tl.int8), mask=row_ok)


@triton.jit
def _dz_rows(z_ptr, labels_ptr, idx_ptr, tau_ptr, lse_ptr, ent_ptr, c_logp_ptr, c_ent_ptr, r0, i0, n_here, cols,
             col_ok, s_zn, s_y, logit_scale, softcap, inv_tau, BLOCK_N: tl.constexpr, HAS_ENT: tl.constexpr,
             HAS_SOFTCAP: tl.constexpr, HAS_TAU_ROWS: tl.constexpr, ACC: tl.constexpr):
    """dz of the compacted rows r0 + i0 + [0, BLOCK_N) on the columns `cols` (_linear_dz_kernel's formula), zero
    outside the valid rows and columns; with z', the labels, m, log s, the in-range mask and the rows' 64-bit
    chunk offsets, which the callers' stores (and kernels/linear_filter.py's rule) read."""
    rows_c = i0 + tl.arange(0, BLOCK_N)
    rows = r0 + rows_c
    row_ok = rows_c < n_here
    orig = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    y = tl.load(labels_ptr + orig * s_y, mask=row_ok, other=-1).to(tl.int64)
    m = tl.load(lse_ptr + 2 * rows, mask=row_ok, other=0.0)
    log_s = tl.load(lse_ptr + 2 * rows + 1, mask=row_ok, other=0.0)
    c_logp = tl.load(c_logp_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    ent = tl.zeros_like(m)
    c_ent = tl.zeros_like(m)
    if HAS_ENT:
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        c_ent = tl.load(c_ent_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    ok = row_ok[:, None] & col_ok[None, :]
    r64 = rows_c.to(tl.int64)[:, None]
    z = tl.load(z_ptr + r64 * s_zn + cols[None, :], mask=ok, other=0.0)
    inv_rows = _row_inv_tau(tau_ptr, orig, row_ok, inv_tau, HAS_TAU_ROWS, ACC)
    g = dlogits_block(z, cols[None, :], y, m, log_s, ent, c_logp, c_ent, inv_rows, HAS_ENT)
    if HAS_SOFTCAP:
        th = z / (softcap * inv_rows)
        g = g * (1.0 - th * th)
    dz = tl.where(ok, g * logit_scale, 0.0)     # selected: nothing from rows or columns outside
    return dz, z, y, m, log_s, ok, r64


@triton.jit
def _dw_tile_start(dw_in_ptr, cols, hk, V, H, n_here, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                   ACC_IN: tl.constexpr, IN_PLACE: tl.constexpr, ACC: tl.constexpr):
    """(offsets, store mask, accumulator) of a d(weight) tile; the accumulator starts from the earlier chunks'
    fp32 sum (ACC_IN) or 0. IN_PLACE with no valid row in the chunk masks every load and store (no bytes)."""
    out = cols.to(tl.int64)[:, None] * H + hk[None, :]
    v_lim = V
    if IN_PLACE:
        v_lim = tl.where(n_here > 0, V, 0)
    ok = (cols[:, None] < v_lim) & (hk[None, :] < H)
    if ACC_IN:
        acc = tl.load(dw_in_ptr + out, mask=ok, other=0.0).to(ACC)
    else:
        acc = tl.zeros((BLOCK_V, BLOCK_H), ACC)
    return out, ok, acc


@triton.jit(do_not_specialize=["r0", "n_rows"])
def _linear_dz_kernel(
    # data
    z_ptr, dz_ptr, labels_ptr, idx_ptr, nvalid_ptr, tau_ptr, lse_ptr, ent_ptr, c_logp_ptr, c_ent_ptr, db_in_ptr,
    db_ptr,
    # shapes
    r0, n_rows, V,
    # strides
    s_zn, s_dzn, s_y,
    # logit transform
    logit_scale, softcap, inv_tau,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, HAS_ENT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_DB: tl.constexpr, ACC_IN: tl.constexpr, HAS_TAU_ROWS: tl.constexpr, ACC: tl.constexpr,
):
    """dz = dloss/dz (w.r.t. the raw logits hidden . weight + bias) of the chunk's valid rows, for the
    vocabulary tile program_id(0), from the stored z':
        dz_ij = [c_logp_i (onehot(y_i)_j - p_ij) - c_ent_i p_ij (log p_ij + H_i)] inv_tau
                * (1 - (z'_ij / (c inv_tau))^2 with softcap) * logit_scale,   p_ij = exp((z'_ij - m_i) - log s_i),
    written in the gradient GEMMs' input dtype; d(bias)_j (+)= sum_i dz_ij in fp32 over the rows in order."""
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    n_here = tl.minimum(n_rows, tl.load(nvalid_ptr) - r0)    # valid rows of this chunk (<= 0: none)
    db = tl.zeros((BLOCK_V,), ACC)
    for i0 in range(0, n_here, BLOCK_N):
        dz, _, _, _, _, ok, r64 = _dz_rows(z_ptr, labels_ptr, idx_ptr, tau_ptr, lse_ptr, ent_ptr, c_logp_ptr,
                                           c_ent_ptr, r0, i0, n_here, cols, col_ok, s_zn, s_y, logit_scale,
                                           softcap, inv_tau, BLOCK_N, HAS_ENT, HAS_SOFTCAP, HAS_TAU_ROWS, ACC)
        tl.store(dz_ptr + r64 * s_dzn + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=ok)
        if HAS_DB:
            db += tl.sum(dz, 0)
    if HAS_DB:
        if ACC_IN:
            db += tl.load(db_in_ptr + cols, mask=col_ok, other=0.0).to(ACC)
        tl.store(db_ptr + cols, db.to(db_ptr.dtype.element_ty), mask=col_ok)


@triton.jit(do_not_specialize=["r0", "n_rows"])
def _linear_dh_kernel(
    # data
    dz_ptr, w_ptr, idx_ptr, nvalid_ptr, dh_in_ptr, dh_ptr,
    # shapes
    r0, n_rows, V, H,
    # strides (dh_in: dh's)
    s_dzn, s_wv, s_wk, s_dn,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, ACC_IN: tl.constexpr, ACC: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """d(hidden)[orig rows, h tile] = dz[rows, :] @ weight[:, h tile], the accumulator kept in registers
    over the chunk's vocabulary columns; written once, at the rows' original positions. With ACC_IN (a
    vocabulary chunk after the first) the accumulator starts from the earlier chunks' fp32 sum in dh_in: the
    same additions in the same order as one chunk over the whole vocabulary (bitwise the same d(hidden))."""
    rows_c, rows, row_ok, orig = _chunk_rows(idx_ptr, nvalid_ptr, r0, n_rows, tl.program_id(0), BLOCK_N)
    hk = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    v_end = tl.where(tl.max(row_ok.to(tl.int32), 0) > 0, V, 0)
    r64 = rows_c.to(tl.int64)[:, None]
    out = orig[:, None] * s_dn + hk[None, :]
    ok = row_ok[:, None] & (hk[None, :] < H)
    if ACC_IN:
        acc = tl.load(dh_in_ptr + out, mask=ok, other=0.0).to(ACC)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_H), ACC)
    for v0 in range(0, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        dz = tl.load(dz_ptr + r64 * s_dzn + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < V), other=0.0)
        w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * s_wv + hk[None, :] * s_wk,
                    mask=(cols[:, None] < V) & (hk[None, :] < H), other=0.0)
        acc = tl.dot(dz.to(DOT), w.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    tl.store(dh_ptr + out, acc.to(dh_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["r0", "n_rows"])
def _linear_dw_kernel(
    # data
    dz_ptr, h_ptr, idx_ptr, nvalid_ptr, dw_in_ptr, dw_ptr,
    # shapes
    r0, n_rows, V, H,
    # strides
    s_dzn, s_hn, s_hk,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, ACC_IN: tl.constexpr,
    IN_PLACE: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """d(weight)[v tile, h tile] (+)= dz[rows, v tile]^T @ hidden[rows, h tile] over the chunk's valid rows in
    a fixed order (no atomics). With ACC_IN the earlier chunks' fp32 sums are read from dw_in; the result is
    stored in dw's dtype. IN_PLACE (dw_in is dw): a chunk without valid rows moves no bytes. The earlier sum
    starts the accumulator: the same additions in the same order as one chunk over all the rows (chunks start
    at multiples of BLOCK_N), so d(weight) is bitwise the same whatever the row chunking."""
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    hk = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    n_here = tl.minimum(n_rows, tl.load(nvalid_ptr) - r0)    # valid rows of this chunk (<= 0: none)
    out, ok, acc = _dw_tile_start(dw_in_ptr, cols, hk, V, H, n_here, BLOCK_V, BLOCK_H, ACC_IN, IN_PLACE, ACC)
    for i0 in range(0, n_here, BLOCK_N):
        rows_c = i0 + tl.arange(0, BLOCK_N)
        row_ok = rows_c < n_here
        orig = tl.load(idx_ptr + r0 + rows_c, mask=row_ok, other=0).to(tl.int64)
        dz = tl.load(dz_ptr + rows_c.to(tl.int64)[:, None] * s_dzn + cols[None, :],
                     mask=row_ok[:, None] & (cols[None, :] < V), other=0.0)
        h = tl.load(h_ptr + orig[:, None] * s_hn + hk[None, :] * s_hk, mask=row_ok[:, None] & (hk[None, :] < H),
                    other=0.0)
        acc = tl.dot(tl.trans(dz.to(DOT)), h.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    tl.store(dw_ptr + out, acc.to(dw_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launchers
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


def dtypes(hidden_dtype, weight_dtype, fp32_head=False):
    """(accumulator torch dtype, accumulator tl dtype, dot tl dtype, input precision) for a hidden / weight
    pair. The dot runs in their promoted dtype (fp32 hidden with a bf16 head: fp32, the bf16 weight tile
    upcast exactly; bf16 with fp16: fp32), in fp32 at least with fp32_head; fp32 dots are IEEE fp32, fp64
    stays fp64, 16-bit dots use the tensor cores with fp32 accumulation."""
    dot = torch.promote_types(hidden_dtype, weight_dtype)
    dot = torch.float32 if fp32_head and dot != torch.float64 else dot
    acc = torch.float64 if dot == torch.float64 else torch.float32
    precision = "ieee" if dot in (torch.float32, torch.float64) else "tf32"
    return acc, _TL[acc], _TL[dot], precision


class CompactRows:
    """Compacted rows shared by the launches of one op call: `idx` [N] int64 (valid rows first, in
    order), `n_valid` a 0-d int64 device tensor. Built on device, no host sync."""

    def __init__(self, valid: torch.Tensor):
        self.n = valid.numel()
        self.idx = torch.argsort((~valid).to(torch.int8), stable=True)
        self.n_valid = valid.sum()


def _split_cols(V):
    return cfg.LIN_BLOCK_V * cfg.LIN_SPLIT_TILES if V > cfg.LIN_BLOCK_V * cfg.LIN_SPLIT_TILES else V


def _transform_args(opts):
    return (float(opts.logit_scale), float(opts.softcap or 1.0), float(opts.inv_tau))


def stats_chunk(hidden, weight, bias, labels, rows: CompactRows, r0, n_rows, out, opts, z=None, finish=True,
                tau=None):
    """Row statistics of compacted rows [r0, r0 + n_rows) (launches 1 and 2); with `z` ([n_rows, V] fp32)
    also stores the chunk's z'. `out` holds the per-row buffers (see `new_outputs`); without `finish`
    only z' is wanted (launch 2 is skipped, `out` may be None). `tau`: per-row temperatures [N] by original
    row, in place of opts.inv_tau."""
    N, H = hidden.shape
    V = weight.shape[0]
    acc, tl_acc, tl_dot, precision = dtypes(hidden.dtype, weight.dtype, opts.fp32_head)
    v_split = _split_cols(V)
    n_splits = triton.cdiv(V, v_split)
    part = torch.empty(N_PARTIALS, n_splits, n_rows, dtype=acc, device=hidden.device)
    zy = torch.empty(n_rows, dtype=acc, device=hidden.device)
    with_ent, extras = (out["ent_c"] is not None, out["sq"] is not None) if finish else (False, False)
    record_launch("linear_fwd", hidden[:n_rows], weight, bias, labels[:n_rows], tau, part, zy, z)
    wrap_triton(_linear_fwd_kernel)[(triton.cdiv(n_rows, cfg.LIN_BLOCK_N), n_splits)](
        hidden, weight, bias if bias is not None else weight, labels, rows.idx, rows.n_valid,
        tau if tau is not None else zy, z if z is not None else zy, part, zy,
        r0, n_rows, V, H, v_split,
        *hidden.stride(), *weight.stride(), bias.stride(0) if bias is not None else 0, labels.stride(0),
        z.stride(0) if z is not None else 0, *_transform_args(opts),
        BLOCK_N=cfg.LIN_BLOCK_N, BLOCK_V=cfg.LIN_BLOCK_V, BLOCK_K=cfg.LIN_BLOCK_K, HAS_BIAS=bias is not None,
        HAS_SOFTCAP=opts.softcap is not None, WITH_ENT=with_ent, WITH_EXTRAS=extras, STORE_Z=z is not None,
        HAS_TAU_ROWS=tau is not None, ACC=tl_acc, DOT=tl_dot, PRECISION=precision,
        ROUND=_TL[getattr(torch, opts.logits_dtype)] if opts.logits_dtype is not None else tl_acc,
        num_warps=cfg.LIN_NUM_WARPS, num_stages=cfg.LIN_NUM_STAGES)
    if not finish:
        return
    record_launch("linear_finish", part, zy, labels[:n_rows], out["lse"][:n_rows], out["logp"][:n_rows],
                  None if not with_ent else out["ent"][:n_rows])
    logp_c = out["logp_c"]
    wrap_triton(_linear_finish_kernel)[(triton.cdiv(n_rows, cfg.LIN_FINISH_BLOCK),)](
        labels, rows.idx, rows.n_valid, part, zy, out["lse"], out["ent_c"] if with_ent else zy, logp_c,
        out["logp"], out["ent"] if with_ent else zy, out["sq"] if extras else zy, out["mean"] if extras else zy,
        out["top1"] if extras else zy, r0, n_rows, V, n_splits, labels.stride(0),
        BLOCK=cfg.LIN_FINISH_BLOCK, WITH_ENT=with_ent, WITH_EXTRAS=extras, ACC=tl_acc,
        num_warps=cfg.ELEM_NUM_WARPS)


def new_outputs(N, device, acc, with_entropy, extras):
    """Per-row buffers: outputs by original row (zero where a row is not valid) and, by compacted
    position, the row statistics lse = (m, log s) [N, 2], entropy and log-prob that the gradient launches read."""
    zeros = dict(dtype=acc, device=device)
    return {
        "logp": torch.zeros(N, **zeros), "ent": torch.zeros(N, **zeros) if with_entropy else None,
        "sq": torch.zeros(N, **zeros) if extras else None, "mean": torch.zeros(N, **zeros) if extras else None,
        "top1": torch.zeros(N, dtype=torch.int8, device=device) if extras else None,
        "lse": torch.zeros(N, 2, **zeros), "ent_c": torch.zeros(N, **zeros) if with_entropy else None,
        "logp_c": torch.zeros(N, **zeros),
    }


def dz_chunk(z, dz, labels, rows: CompactRows, r0, n_rows, lse, ent, c_logp, c_ent, opts, *, db_out=None,
             db_in=None, tau=None):
    """Gradient launch 3 for compacted rows [r0, r0 + n_rows) whose z' is in `z` ([n_rows, V]): dz into `dz`
    (the GEMM dtype; may be `z` itself) and the chunk's d(bias) into db_out, plus the earlier chunks' fp32 sums
    db_in when given. lse, ent, c_logp, c_ent: by compacted position; tau (per-row temperatures, or None) by
    original row."""
    V = z.shape[1]
    tl_acc = _TL[lse.dtype]
    has_ent = c_ent is not None
    ent_arg, c_ent_arg = (ent, c_ent) if has_ent else (lse, c_logp)
    record_launch("linear_dz", z, labels[:n_rows], tau, lse[:n_rows], c_logp[:n_rows], c_ent if has_ent else None,
                  dz, db_in, db_out)
    wrap_triton(_linear_dz_kernel)[(triton.cdiv(V, cfg.LIN_BLOCK_V),)](
        z, dz, labels, rows.idx, rows.n_valid, tau if tau is not None else lse, lse, ent_arg, c_logp, c_ent_arg,
        db_in if db_in is not None else lse, db_out if db_out is not None else lse,
        r0, n_rows, V, z.stride(0), dz.stride(0), labels.stride(0), *_transform_args(opts),
        BLOCK_N=cfg.LIN_BLOCK_N, BLOCK_V=cfg.LIN_BLOCK_V, HAS_ENT=has_ent, HAS_SOFTCAP=opts.softcap is not None,
        HAS_DB=db_out is not None, ACC_IN=db_in is not None, HAS_TAU_ROWS=tau is not None, ACC=tl_acc,
        num_warps=cfg.LIN_NUM_WARPS)


def gemm_chunk(dz, hidden, weight, rows: CompactRows, r0, n_rows, opts, *, d_hidden=None, dw_out=None, dw_in=None,
               dh_in=None):
    """Gradient launches 4-5 for the chunk's dz ([n_rows, C] over the C vocabulary rows of `weight`, a slice of the
    head): d_hidden's rows written once, plus the earlier vocabulary chunks' fp32 sums dh_in (d_hidden's layout)
    when given; d(weight) of the chunk written to dw_out, plus the earlier row chunks' fp32 sums dw_in when given."""
    N, H = hidden.shape
    V = weight.shape[0]
    _, tl_acc, tl_dot, precision = dtypes(hidden.dtype, weight.dtype, opts.fp32_head)
    gemm = dict(BLOCK_N=cfg.LIN_BLOCK_N, BLOCK_V=cfg.LIN_BLOCK_V, BLOCK_H=cfg.LIN_BLOCK_H, ACC=tl_acc, DOT=tl_dot,
                PRECISION=precision, num_warps=cfg.LIN_NUM_WARPS, num_stages=cfg.LIN_NUM_STAGES)
    if d_hidden is not None:
        if dh_in is not None and dh_in.stride() != d_hidden.stride():
            raise ValueError(f"dh_in strides {dh_in.stride()} must be d_hidden's {d_hidden.stride()}")
        record_launch("linear_dh", dz, weight, d_hidden[:n_rows], None if dh_in is None else dh_in[:n_rows])
        wrap_triton(_linear_dh_kernel)[(triton.cdiv(n_rows, cfg.LIN_BLOCK_N), triton.cdiv(H, cfg.LIN_BLOCK_H))](
            dz, weight, rows.idx, rows.n_valid, dh_in if dh_in is not None else d_hidden, d_hidden, r0, n_rows, V, H,
            dz.stride(0), *weight.stride(), d_hidden.stride(0), ACC_IN=dh_in is not None, **gemm)
    if dw_out is not None:
        record_launch("linear_dw", dz, hidden[:n_rows], dw_in, dw_out)   # (a chunk past n_valid moves none)
        wrap_triton(_linear_dw_kernel)[(triton.cdiv(V, cfg.LIN_BLOCK_V), triton.cdiv(H, cfg.LIN_BLOCK_H))](
            dz, hidden, rows.idx, rows.n_valid, dw_in if dw_in is not None else dw_out, dw_out,
            r0, n_rows, V, H, dz.stride(0), *hidden.stride(), ACC_IN=dw_in is not None, IN_PLACE=dw_in is dw_out,
            **gemm)
