"""Gradient filtering on the linear path (`grad_filter=`; cut-cross-entropy's trick, made batch-invariant):
the gradient launches 3-5 of kernels/linear.py with vocabulary tiles of the gradient GEMMs skipped where the
log-prob gradient is negligible.

The rule (the filtered op's formula; fastppo.linear_torch applies the same one). Vocabulary tile t is the
FILTER_BLOCK_V consecutive columns [t B, (t + 1) B) of the weight (counted from its first row; B =
cfg.LIN_BLOCK_V, a fixed constant, so the formula never depends on the GPU or the batch). For row i,
    keep(i, t) = not ( |onehot(y_i)_j - p_ij| < eps for every column j of tile t )
(cut-cross-entropy's test on its d logits before the upstream gradient; NaN keeps the tile). With
dz~_ij = dz_ij keep(i, tile(j)):
    d hidden = dz~ @ W,   d weight = dz~^T @ hidden,   d bias = sum_i dz_ij   (d bias unfiltered: it costs no GEMM).
What is dropped per entry of a skipped tile: |dz_ij| < eps |c_logp_i| for the log-prob term and
p_ij |log p_ij + H_i| |c_ent_i| <= eps (2 + |log eps| + log V) |c_ent_i| for the entropy term (H <= log V), times
inv_tau, the softcap derivative (<= 1) and logit_scale. The error this makes in d hidden is a sum over the dropped
entries, sum_j dz_ij w_j: not bounded by eps but by the row's dropped probability mass times the weight rows'
norm, largest where the weight rows share a direction (docs/design.md §4.1c has measured figures).

Batch invariance: keep(i, t) is a function of row i alone, and the filtered dz~ is stored (zeros in the
tiles a row drops), so a row's d hidden is the same whatever rows share its GEMM tile. The GEMMs skip a
[BLOCK_N rows, BLOCK_V columns] tile of dz~ (its tl.dot and its weight / hidden tile loads) when no row of the
tile keeps it; a tile that some row keeps is multiplied whole, the other rows' zeros adding exactly 0. So the
FLOPs saved depend on which rows share a tile, the results do not (except that a non-finite weight or hidden
entry reaches, as 0 * inf = NaN, a row that dropped the tile when a neighbour kept it).

`_linear_dz_filter_kernel` is launch 3 (kernels/linear._linear_dz_kernel) plus the rule: it writes dz~ and
one int8 flag per (row tile, vocabulary tile) of the chunk, "some row keeps the tile" (n V / (BLOCK_N
BLOCK_V) bytes, no extra pass over dz); `_linear_dh_filter_kernel` / `_linear_dw_filter_kernel` are launches
4-5 reading that flag before each tile product. Deterministic (no atomics), no host sync.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import _config as cfg
from .launches import record_launch
from .linear import _TL, _chunk_rows, _dw_tile_start, _dz_rows, _transform_args, dtypes

FILTER_BLOCK_V = cfg.LIN_BLOCK_V   # the rule's vocabulary tile (the GEMMs' BLOCK_V, on every device)


@triton.jit(do_not_specialize=["r0", "n_rows"])
def _linear_dz_filter_kernel(
    # data
    z_ptr, dz_ptr, labels_ptr, idx_ptr, nvalid_ptr, tau_ptr, lse_ptr, ent_ptr, c_logp_ptr, c_ent_ptr, db_in_ptr,
    db_ptr, keep_ptr,
    # shapes
    r0, n_rows, V,
    # strides
    s_zn, s_dzn, s_y, s_keep,
    # logit transform, filter threshold
    logit_scale, softcap, inv_tau, eps,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, HAS_ENT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_DB: tl.constexpr, ACC_IN: tl.constexpr, HAS_TAU_ROWS: tl.constexpr, ACC: tl.constexpr,
):
    """dz~ for vocabulary tile program_id(0) (the dz of kernels/linear._linear_dz_kernel, zeroed in the rows
    whose |onehot - p| is below eps on the whole tile); keep[row tile, vocab tile] = some row of the tile keeps
    it; d(bias)_j (+)= sum_i dz_ij (unfiltered) in fp32 over the rows in order."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    n_here = tl.minimum(n_rows, tl.load(nvalid_ptr) - r0)    # valid rows of this chunk (<= 0: none)
    db = tl.zeros((BLOCK_V,), ACC)
    for i0 in range(0, n_here, BLOCK_N):
        dz, z, y, m, log_s, ok, r64 = _dz_rows(z_ptr, labels_ptr, idx_ptr, tau_ptr, lse_ptr, ent_ptr, c_logp_ptr,
                                               c_ent_ptr, r0, i0, n_here, cols, col_ok, s_zn, s_y, logit_scale,
                                               softcap, inv_tau, BLOCK_N, HAS_ENT, HAS_SOFTCAP, HAS_TAU_ROWS, ACC)
        p = tl.exp((z - m[:, None]) - log_s[:, None])
        d = tl.abs(tl.where(cols[None, :] == y[:, None], 1.0, 0.0) - p)
        keep = tl.sum(tl.where(ok & ~(d < eps), 1, 0), 1) > 0     # NaN is not below eps: kept
        tl.store(dz_ptr + r64 * s_dzn + cols[None, :], tl.where(keep[:, None], dz, 0.0).to(dz_ptr.dtype.element_ty),
                 mask=ok)
        tl.store(keep_ptr + (i0 // BLOCK_N) * s_keep + pid, tl.max(keep.to(tl.int32), 0).to(tl.int8))
        if HAS_DB:
            db += tl.sum(dz, 0)
    if HAS_DB:
        if ACC_IN:
            db += tl.load(db_in_ptr + cols, mask=col_ok, other=0.0).to(ACC)
        tl.store(db_ptr + cols, db.to(db_ptr.dtype.element_ty), mask=col_ok)


@triton.jit(do_not_specialize=["r0", "n_rows"])
def _linear_dh_filter_kernel(
    # data
    dz_ptr, w_ptr, idx_ptr, nvalid_ptr, keep_ptr, dh_ptr,
    # shapes
    r0, n_rows, V, H,
    # strides
    s_dzn, s_wv, s_wk, s_dn, s_keep,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """d(hidden)[orig rows, h tile] = dz~[rows, :] @ weight[:, h tile] over the vocabulary tiles that some row
    of the tile keeps (kernels/linear._linear_dh_kernel otherwise)."""
    tile = tl.program_id(0)
    rows_c, rows, row_ok, orig = _chunk_rows(idx_ptr, nvalid_ptr, r0, n_rows, tile, BLOCK_N)
    hk = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    v_end = tl.where(tl.max(row_ok.to(tl.int32), 0) > 0, V, 0)
    r64 = rows_c.to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_H), ACC)
    for v0 in range(0, v_end, BLOCK_V):
        if tl.load(keep_ptr + tile * s_keep + v0 // BLOCK_V) != 0:
            cols = v0 + tl.arange(0, BLOCK_V)
            dz = tl.load(dz_ptr + r64 * s_dzn + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < V),
                         other=0.0)
            w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * s_wv + hk[None, :] * s_wk,
                        mask=(cols[:, None] < V) & (hk[None, :] < H), other=0.0)
            acc = tl.dot(dz.to(DOT), w.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    tl.store(dh_ptr + orig[:, None] * s_dn + hk[None, :], acc.to(dh_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (hk[None, :] < H))


@triton.jit(do_not_specialize=["r0", "n_rows"])
def _linear_dw_filter_kernel(
    # data
    dz_ptr, h_ptr, idx_ptr, nvalid_ptr, keep_ptr, dw_in_ptr, dw_ptr,
    # shapes
    r0, n_rows, V, H,
    # strides
    s_dzn, s_hn, s_hk, s_keep,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, ACC_IN: tl.constexpr,
    IN_PLACE: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """d(weight)[v tile, h tile] (+)= dz~[rows, v tile]^T @ hidden[rows, h tile] over the chunk's row tiles
    that keep this vocabulary tile, in a fixed order (kernels/linear._linear_dw_kernel otherwise)."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    hk = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    n_here = tl.minimum(n_rows, tl.load(nvalid_ptr) - r0)    # valid rows of this chunk (<= 0: none)
    out, ok, acc = _dw_tile_start(dw_in_ptr, cols, hk, V, H, n_here, BLOCK_V, BLOCK_H, ACC_IN, IN_PLACE, ACC)
    for i0 in range(0, n_here, BLOCK_N):
        if tl.load(keep_ptr + (i0 // BLOCK_N) * s_keep + pid) != 0:
            rows_c = i0 + tl.arange(0, BLOCK_N)
            row_ok = rows_c < n_here
            orig = tl.load(idx_ptr + r0 + rows_c, mask=row_ok, other=0).to(tl.int64)
            dz = tl.load(dz_ptr + rows_c.to(tl.int64)[:, None] * s_dzn + cols[None, :],
                         mask=row_ok[:, None] & (cols[None, :] < V), other=0.0)
            h = tl.load(h_ptr + orig[:, None] * s_hn + hk[None, :] * s_hk,
                        mask=row_ok[:, None] & (hk[None, :] < H), other=0.0)
            acc = tl.dot(tl.trans(dz.to(DOT)), h.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    tl.store(dw_ptr + out, acc.to(dw_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launchers
def default_eps(dot_dtype: torch.dtype) -> float:
    """cut-cross-entropy's "auto" threshold for gradients in the GEMMs' dtype: finfo(dtype).eps / 32
    (bf16 2^-12, fp16 2^-15, fp32 2^-28, fp64 2^-57)."""
    return torch.finfo(dot_dtype).eps / 32


def new_keep(step, V, device):
    """The per-chunk flags [row tiles, vocabulary tiles] int8 (filled by dz_chunk before the GEMMs read them)."""
    return torch.empty(triton.cdiv(step, cfg.LIN_BLOCK_N), triton.cdiv(V, FILTER_BLOCK_V), dtype=torch.int8,
                       device=device)


def dz_chunk(z, dz, labels, rows, r0, n_rows, lse, ent, c_logp, c_ent, opts, *, keep, db_out=None, db_in=None,
             tau=None):
    """kernels/linear.dz_chunk with the filter: dz~ into `dz`, the chunk's tile flags into `keep`."""
    V = z.shape[1]
    tl_acc = _TL[lse.dtype]
    has_ent = c_ent is not None
    ent_arg, c_ent_arg = (ent, c_ent) if has_ent else (lse, c_logp)
    record_launch("linear_dz_filter", z, labels[:n_rows], tau, lse[:n_rows], c_logp[:n_rows],
                  c_ent if has_ent else None, dz, keep, db_in, db_out)
    wrap_triton(_linear_dz_filter_kernel)[(triton.cdiv(V, cfg.LIN_BLOCK_V),)](
        z, dz, labels, rows.idx, rows.n_valid, tau if tau is not None else lse, lse, ent_arg, c_logp, c_ent_arg,
        db_in if db_in is not None else lse, db_out if db_out is not None else lse, keep,
        r0, n_rows, V, z.stride(0), dz.stride(0), labels.stride(0), keep.stride(0), *_transform_args(opts),
        float(opts.grad_filter),
        BLOCK_N=cfg.LIN_BLOCK_N, BLOCK_V=FILTER_BLOCK_V, HAS_ENT=has_ent, HAS_SOFTCAP=opts.softcap is not None,
        HAS_DB=db_out is not None, ACC_IN=db_in is not None, HAS_TAU_ROWS=tau is not None, ACC=tl_acc,
        num_warps=cfg.LIN_NUM_WARPS)


def gemm_chunk(dz, hidden, weight, rows, r0, n_rows, opts, *, keep, d_hidden=None, dw_out=None, dw_in=None):
    """kernels/linear.gemm_chunk over the tiles `keep` marks (dz~ from dz_chunk)."""
    N, H = hidden.shape
    V = weight.shape[0]
    _, tl_acc, tl_dot, precision = dtypes(hidden.dtype, weight.dtype, opts.fp32_head)
    gemm = dict(BLOCK_N=cfg.LIN_BLOCK_N, BLOCK_V=FILTER_BLOCK_V, BLOCK_H=cfg.LIN_BLOCK_H, ACC=tl_acc, DOT=tl_dot,
                PRECISION=precision, num_warps=cfg.LIN_NUM_WARPS, num_stages=cfg.LIN_NUM_STAGES)
    if d_hidden is not None:
        record_launch("linear_dh_filter", dz, weight, keep, d_hidden[:n_rows])
        wrap_triton(_linear_dh_filter_kernel)[(triton.cdiv(n_rows, cfg.LIN_BLOCK_N), triton.cdiv(H, cfg.LIN_BLOCK_H))](
            dz, weight, rows.idx, rows.n_valid, keep, d_hidden, r0, n_rows, V, H, dz.stride(0), *weight.stride(),
            d_hidden.stride(0), keep.stride(0), **gemm)
    if dw_out is not None:
        record_launch("linear_dw_filter", dz, hidden[:n_rows], keep, dw_in, dw_out)
        wrap_triton(_linear_dw_filter_kernel)[(triton.cdiv(V, FILTER_BLOCK_V), triton.cdiv(H, cfg.LIN_BLOCK_H))](
            dz, hidden, rows.idx, rows.n_valid, keep, dw_in if dw_in is not None else dw_out, dw_out,
            r0, n_rows, V, H, dz.stride(0), *hidden.stride(), keep.stride(0), ACC_IN=dw_in is not None,
            IN_PLACE=dw_in is dw_out, **gemm)


def aot_specs(AOTSpec, sig):
    f32 = "*fp32"
    ce = dict(BLOCK_N=cfg.LIN_BLOCK_N, BLOCK_V=FILTER_BLOCK_V, HAS_ENT=True, HAS_SOFTCAP=True, HAS_DB=True,
              ACC_IN=True, HAS_TAU_ROWS=True, ACC=tl.float32)
    types = {n: f32 for n in _linear_dz_filter_kernel.arg_names if n.endswith("_ptr")}
    types.update(dz_ptr="*bf16", labels_ptr="*i64", idx_ptr="*i64", nvalid_ptr="*i64", keep_ptr="*i8",
                 logit_scale="fp32", softcap="fp32", inv_tau="fp32", eps="fp32")
    specs = [AOTSpec("linear_dz_filter[bf16]", _linear_dz_filter_kernel, sig(_linear_dz_filter_kernel, types, ce),
                     ce, ("V", "s_zn", "s_dzn"), True, cfg.LIN_NUM_WARPS)]
    gemm = dict(BLOCK_N=cfg.LIN_BLOCK_N, BLOCK_V=FILTER_BLOCK_V, BLOCK_H=cfg.LIN_BLOCK_H, ACC=tl.float32,
                DOT=tl.bfloat16, PRECISION="tf32")
    ce = dict(gemm, s_wk=1)
    types = dict(dz_ptr="*bf16", w_ptr="*bf16", idx_ptr="*i64", nvalid_ptr="*i64", keep_ptr="*i8", dh_ptr="*bf16")
    specs.append(AOTSpec("linear_dh_filter[bf16]", _linear_dh_filter_kernel, sig(_linear_dh_filter_kernel, types, ce),
                         ce, ("H", "V", "s_dzn", "s_wv", "s_dn"), True, cfg.LIN_NUM_WARPS, cfg.LIN_NUM_STAGES,
                         tensor_cores=True))
    ce = dict(gemm, ACC_IN=True, IN_PLACE=False, s_hk=1)
    types = dict(dz_ptr="*bf16", h_ptr="*bf16", idx_ptr="*i64", nvalid_ptr="*i64", keep_ptr="*i8", dw_in_ptr=f32,
                 dw_ptr="*bf16")
    specs.append(AOTSpec("linear_dw_filter[bf16]", _linear_dw_filter_kernel, sig(_linear_dw_filter_kernel, types, ce),
                         ce, ("H", "V", "s_dzn", "s_hn"), True, cfg.LIN_NUM_WARPS, cfg.LIN_NUM_STAGES,
                         tensor_cores=True))
    return specs
