"""The kept-only linear path (docs/design.md §4.1b): each row's logits over its kept ids only, never the
[rows, V] logits. fastppo.linear_gather chooses it and drives these launches; the CSR comes in the compacted
rows' order (kernels/linear_kept.py `compact_kept`: valid rows first, ids local to this weight, entries outside
[0, V) skipped).

- `_gather_fwd_kernel` (one program per compacted row): for each kept id j of the row (BLOCK_K ids a step)
      z_j = h_r . W[j] + b_j  (fp32 / fp64 from upcast operands, rounded to logits_dtype when asked),
      z'_j = softcap(logit_scale z_j) / tau_r,
  stored to zk [nnz] (CSR positions), and the kept statistics m_K, log s_K, logp = (z'_y - m_K) - log s_K.
  A label in [0, V) that is not kept gives logp = NaN and log s_K = NaN (so the gradient over K is NaN too);
  a label outside [0, V) (another shard's, sharded) leaves (m_K, log s_K) as they are for the shard combine.
  2 nnz H FLOPs; bytes: each kept entry's weight row (H b) once, the row's hidden once per BLOCK_K ids.
- `_gather_dh_kernel` (grid: rows x H tiles): g_j = c_logp (onehot(y)_j - p_K,j) dz'_j/dz_j,
  p_K,j = exp((z'_j - m_K) - log s_K), into gk [nnz] (by the first H tile), and
  d hidden_r = sum_j g_j W[j] over the row's kept ids in CSR order (no atomics). 2 nnz H FLOPs.
- `_gather_dw_kernel` (grid: blocks of BLOCK_R runs x H tiles): the entries sorted by id with a stable sort
  (their CSR order, i.e. row order, kept within an id) form one run per kept id (run starts packed to the front
  by a second sort, padded with nnz: no host sync); each program sums its runs' entries one step per entry,
  d W[v] = sum_{entries e with id v} g_e h_row(e) in that fixed order, d bias_v = sum g_e (no atomics); rows of
  W never kept stay zero (the launcher zero-fills d W). 2 nnz H FLOPs.
None of these is a tensor-core product (a row's kept ids share no weight rows with its neighbours' in
general): the path is bandwidth-bound, ~H b bytes per kept entry and pass.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import stats_step
from .launches import record_launch

GATHER_BLOCK_K = 16    # kept ids per step
GATHER_BLOCK_H = 128   # hidden features per step / per d(hidden) and d(weight) program
GATHER_BLOCK_R = 16    # runs of one id per d(weight) program
GATHER_DW_BLOCK_H = 64   # hidden features per d(weight) program ([BLOCK_R, 64] fp32 sums and 64-bit offsets)
GATHER_NUM_WARPS = 4

_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _gather_row(idx_ptr, nvalid_ptr, offsets_ptr, labels_ptr, s_y):
    """(valid, compacted row, original row, label, CSR start, CSR end) of program_id(0)."""
    rows = tl.program_id(0)
    valid = rows < tl.load(nvalid_ptr)
    orig = tl.load(idx_ptr + rows, mask=valid, other=0).to(tl.int64)
    y = tl.load(labels_ptr + orig * s_y, mask=valid, other=-1).to(tl.int64)
    start = tl.load(offsets_ptr + rows, mask=valid, other=0).to(tl.int64)
    end = tl.load(offsets_ptr + rows + 1, mask=valid, other=0).to(tl.int64)
    return valid, rows, orig, y, start, end


@triton.jit
def _row_inv(tau_ptr, orig, inv_tau, HAS_TAU_ROWS: tl.constexpr, ACC: tl.constexpr):
    inv = tl.zeros((), ACC) + inv_tau
    if HAS_TAU_ROWS:
        inv = 1.0 / tl.load(tau_ptr + orig).to(ACC)
    return inv


@triton.jit
def _gather_logits(h_ptr, w_ptr, b_ptr, orig, ids, ok, H, s_hn, s_hk, s_wv, s_wk, s_b, logit_scale, softcap, inv,
                   BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   ACC: tl.constexpr, ROUND: tl.constexpr):
    """z' [BLOCK_K] of hidden row `orig` at vocabulary ids `ids` (where `ok`), as kernels/linear.py
    `_logit_tile` forms them (64-bit offsets, every stride honoured)."""
    acc = tl.zeros((BLOCK_K,), ACC)
    hs = tl.arange(0, BLOCK_H).to(tl.int64)
    for k0 in range(0, H, BLOCK_H):
        k = k0 + hs
        k_ok = k < H
        h = tl.load(h_ptr + orig * s_hn + k * s_hk, mask=k_ok, other=0.0).to(ACC)
        w = tl.load(w_ptr + ids[:, None] * s_wv + k[None, :] * s_wk, mask=ok[:, None] & k_ok[None, :],
                    other=0.0).to(ACC)
        acc += tl.sum(w * h[None, :], 1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + ids * s_b, mask=ok, other=0.0).to(ACC)
    z = acc.to(ROUND).to(ACC) * logit_scale
    if HAS_SOFTCAP:
        z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)   # c tanh(z / c)
    return z * inv


@triton.jit
def _gather_fwd_kernel(
    # data: hidden [N, H], weight [V, H], bias [V], labels (by original row), compacted rows, compacted CSR, tau
    h_ptr, w_ptr, b_ptr, labels_ptr, idx_ptr, nvalid_ptr, ids_ptr, offsets_ptr, tau_ptr,
    # outputs: z' [nnz] (CSR positions), (m_K, log s_K) [N, 2] and logp [N] by compacted row, logp [N] by original row
    zk_ptr, kstat_ptr, logp_c_ptr, logp_ptr,
    # shapes and strides
    V, H, s_hn, s_hk, s_wv, s_wk, s_b, s_y,
    # logit transform
    logit_scale, softcap, inv_tau,
    BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_TAU_ROWS: tl.constexpr, ACC: tl.constexpr, ROUND: tl.constexpr,
):
    valid, rows, orig, y, start, end = _gather_row(idx_ptr, nvalid_ptr, offsets_ptr, labels_ptr, s_y)
    if valid:
        inv = _row_inv(tau_ptr, orig, inv_tau, HAS_TAU_ROWS, ACC)
        ks = tl.arange(0, BLOCK_K)
        m = tl.full((), float("-inf"), ACC)
        s = tl.zeros((), ACC)
        z_y = tl.zeros((), ACC)
        hits = tl.zeros((), tl.int32)
        for k0 in range(start, end, BLOCK_K):
            inb = k0 + ks < end
            ids = tl.load(ids_ptr + k0 + ks, mask=inb, other=-1).to(tl.int64)
            ok = inb & (ids >= 0) & (ids < V)
            z = _gather_logits(h_ptr, w_ptr, b_ptr, orig, ids, ok, H, s_hn, s_hk, s_wv, s_wk, s_b, logit_scale,
                               softcap, inv, BLOCK_K, BLOCK_H, HAS_BIAS, HAS_SOFTCAP, ACC, ROUND)
            tl.store(zk_ptr + k0 + ks, z, mask=ok)
            m, s, _ = stats_step(m, s, s, tl.where(ok, z, float("-inf")), False)
            is_y = ok & (ids == y)
            hits += tl.sum(is_y.to(tl.int32))
            z_y += tl.sum(tl.where(is_y, z, 0.0))
        missing = (hits == 0) & (y >= 0) & (y < V)
        log_s = tl.where(missing, float("nan"), tl.log(s))
        logp = tl.where(hits > 0, (z_y - m) - log_s, float("nan"))
        tl.store(kstat_ptr + 2 * rows, m)
        tl.store(kstat_ptr + 2 * rows + 1, log_s)
        tl.store(logp_c_ptr + rows, logp)
        tl.store(logp_ptr + orig, logp)


@triton.jit
def _gather_dh_kernel(
    # data: weight, labels, compacted rows and CSR, tau, z' [nnz], kept stats and c_logp by compacted row
    w_ptr, labels_ptr, idx_ptr, nvalid_ptr, ids_ptr, offsets_ptr, tau_ptr, zk_ptr, kstat_ptr, c_logp_ptr,
    # outputs: gk [nnz] (the kept entries' gradient w.r.t. the raw logits), d(hidden) [N, H]
    gk_ptr, dh_ptr,
    V, H, s_wv, s_wk, s_y, s_dhn, s_dhk,
    logit_scale, softcap, inv_tau,
    BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TAU_ROWS: tl.constexpr,
    NEED_DH: tl.constexpr, ACC: tl.constexpr,
):
    valid, rows, orig, y, start, end = _gather_row(idx_ptr, nvalid_ptr, offsets_ptr, labels_ptr, s_y)
    if valid:
        inv = _row_inv(tau_ptr, orig, inv_tau, HAS_TAU_ROWS, ACC)
        m_k = tl.load(kstat_ptr + 2 * rows)
        logs_k = tl.load(kstat_ptr + 2 * rows + 1)
        c_logp = tl.load(c_logp_ptr + rows).to(ACC)
        ks = tl.arange(0, BLOCK_K)
        k = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H).to(tl.int64)
        k_ok = k < H
        dh = tl.zeros((BLOCK_H,), ACC)
        for k0 in range(start, end, BLOCK_K):
            inb = k0 + ks < end
            ids = tl.load(ids_ptr + k0 + ks, mask=inb, other=-1).to(tl.int64)
            ok = inb & (ids >= 0) & (ids < V)
            z = tl.load(zk_ptr + k0 + ks, mask=ok, other=0.0)
            g = c_logp * (tl.where(ids == y, 1.0, 0.0) - tl.exp((z - m_k) - logs_k)) * inv
            if HAS_SOFTCAP:
                th = z / (softcap * inv)
                g = g * (1.0 - th * th)
            g = tl.where(ok, g * logit_scale, 0.0)
            if tl.program_id(1) == 0:
                tl.store(gk_ptr + k0 + ks, g, mask=ok)
            if NEED_DH:
                w = tl.load(w_ptr + ids[:, None] * s_wv + k[None, :] * s_wk, mask=ok[:, None] & k_ok[None, :],
                            other=0.0).to(ACC)
                dh += tl.sum(g[:, None] * w, 0)
        if NEED_DH:
            tl.store(dh_ptr + orig * s_dhn + k * s_dhk, dh.to(dh_ptr.dtype.element_ty), mask=k_ok)


@triton.jit
def _gather_dw_kernel(
    # data: hidden, compacted rows, the entries sorted by id (sorted ids, their CSR positions), the runs of equal
    # ids (start positions, packed first and padded with nnz; each position's run end), the compacted row of
    # each CSR entry, gk [nnz]
    h_ptr, idx_ptr, nvalid_ptr, sid_ptr, perm_ptr, run_start_ptr, run_end_ptr, erow_ptr, gk_ptr,
    # outputs: d(weight) [V, H], d(bias) [V] (zero-filled by the launcher)
    dw_ptr, db_ptr,
    nnz, V, H, s_hn, s_hk, s_dwv, s_dwk,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
):
    """BLOCK_R runs (ids) per program, their entries summed in sorted order, one entry per run per step."""
    n_valid = tl.load(nvalid_ptr)
    q = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    start = tl.load(run_start_ptr + q, mask=q < nnz, other=nnz).to(tl.int64)
    run_ok = start < nnz
    v = tl.load(sid_ptr + start, mask=run_ok, other=-1).to(tl.int64)
    run_ok = run_ok & (v >= 0) & (v < V)
    end = tl.where(run_ok, tl.load(run_end_ptr + start, mask=run_ok, other=0).to(tl.int64), start)
    k = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H).to(tl.int64)
    k_ok = k < H
    dw = tl.zeros((BLOCK_R, BLOCK_H), ACC)
    db = tl.zeros((BLOCK_R,), ACC)
    for j in range(0, tl.max(end - start, 0)):
        e = start + j
        e_in = e < end
        pos = tl.load(perm_ptr + e, mask=e_in, other=0).to(tl.int64)
        r = tl.load(erow_ptr + pos, mask=e_in, other=n_valid).to(tl.int64)
        ok = e_in & (r < n_valid)
        orig = tl.load(idx_ptr + r, mask=ok, other=0).to(tl.int64)
        g = tl.load(gk_ptr + pos, mask=ok, other=0.0).to(ACC)
        h = tl.load(h_ptr + orig[:, None] * s_hn + k[None, :] * s_hk, mask=ok[:, None] & k_ok[None, :],
                    other=0.0).to(ACC)
        dw += g[:, None] * h
        db += g
    tl.store(dw_ptr + v[:, None] * s_dwv + k[None, :] * s_dwk, dw.to(dw_ptr.dtype.element_ty),
             mask=run_ok[:, None] & k_ok[None, :])
    if HAS_BIAS:   # by the first H tile's program
        first_tile = tl.zeros((BLOCK_R,), tl.int32) + tl.program_id(1) == 0
        tl.store(db_ptr + v, db.to(db_ptr.dtype.element_ty), mask=run_ok & first_tile)


# ----------------------------------------------------------------------------- launchers
def _acc(hidden, weight):
    return torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32


def _transform(opts):
    return float(opts.logit_scale), float(opts.softcap or 1.0), float(opts.inv_tau)


def gather_fwd(hidden, weight, bias, labels, rows, ids_c, offsets_c, out, opts, tau=None):
    """Kept-only forward of all compacted rows: z' [nnz] (returned), out["klse"] (m_K, log s_K) and
    out["logp_c"] by compacted row, out["logp"] by original row."""
    N, H = hidden.shape
    V = weight.shape[0]
    acc = _acc(hidden, weight)
    zk = torch.zeros(ids_c.numel(), dtype=acc, device=hidden.device)
    record_launch("linear_gather_fwd", hidden, weight, bias, labels, ids_c, offsets_c, tau, zk, out["klse"],
                  out["logp_c"], out["logp"], grid=(N,))
    if N == 0:
        return zk
    wrap_triton(_gather_fwd_kernel)[(N,)](
        hidden, weight, bias if bias is not None else weight, labels, rows.idx, rows.n_valid, ids_c, offsets_c,
        tau if tau is not None else zk, zk, out["klse"], out["logp_c"], out["logp"],
        V, H, *hidden.stride(), *weight.stride(), bias.stride(0) if bias is not None else 0, labels.stride(0),
        *_transform(opts),
        BLOCK_K=GATHER_BLOCK_K, BLOCK_H=GATHER_BLOCK_H, HAS_BIAS=bias is not None, HAS_SOFTCAP=opts.softcap is not None,
        HAS_TAU_ROWS=tau is not None, ACC=_TL[acc],
        ROUND=_TL[getattr(torch, opts.logits_dtype)] if opts.logits_dtype is not None else _TL[acc],
        num_warps=GATHER_NUM_WARPS)
    return zk


def entry_rows(offsets_c, nnz):
    """The compacted row of every CSR entry (N for the entries past offsets_c[N]: outside the weight's range)."""
    n = offsets_c.numel() - 1
    counts = torch.cat([offsets_c[1:] - offsets_c[:-1], nnz - offsets_c[-1:]])
    return torch.repeat_interleave(torch.arange(n + 1, device=offsets_c.device), counts, output_size=nnz)


def gather_grads(hidden, weight, bias, labels, rows, ids_c, offsets_c, zk, kstat, c_logp, opts, needs, tau=None):
    """(d_hidden, d_weight, d_bias) of sum_r c_logp_r logp_r over the kept sets (c_logp, kstat by compacted row),
    None where not needed. d_hidden rows of rows not valid and d_weight rows never kept are zero."""
    N, H = hidden.shape
    V = weight.shape[0]
    acc = _acc(hidden, weight)
    dev = hidden.device
    nnz = ids_c.numel()
    dh = torch.zeros(N, H, dtype=hidden.dtype, device=dev) if needs[0] else None
    dw = torch.zeros(V, H, dtype=weight.dtype, device=dev) if needs[1] else None
    db = torch.zeros(V, dtype=bias.dtype, device=dev) if (bias is not None and needs[2]) else None
    gk = torch.zeros(nnz, dtype=acc, device=dev)
    h_tiles = triton.cdiv(H, GATHER_BLOCK_H)
    record_launch("linear_gather_dh", weight if needs[0] else None, labels, ids_c, offsets_c, tau, zk, kstat,
                  c_logp, gk, dh, grid=(N, h_tiles if needs[0] else 1))
    if N:
        wrap_triton(_gather_dh_kernel)[(N, h_tiles if needs[0] else 1)](
            weight, labels, rows.idx, rows.n_valid, ids_c, offsets_c, tau if tau is not None else zk, zk, kstat,
            c_logp, gk, dh if dh is not None else gk, V, H, *weight.stride(), labels.stride(0),
            *(dh.stride() if dh is not None else (0, 0)), *_transform(opts),
            BLOCK_K=GATHER_BLOCK_K, BLOCK_H=GATHER_BLOCK_H, HAS_SOFTCAP=opts.softcap is not None,
            HAS_TAU_ROWS=tau is not None, NEED_DH=dh is not None, ACC=_TL[acc], num_warps=GATHER_NUM_WARPS)
    if (dw is not None or db is not None) and nnz:
        key = torch.where((ids_c >= 0) & (ids_c < V), ids_c, V)
        sid, perm = torch.sort(key, stable=True)
        run_end = torch.searchsorted(sid, sid, right=True)
        pos = torch.arange(nnz, device=dev)
        first = torch.ones(nnz, dtype=torch.bool, device=dev)
        first[1:] = sid[1:] != sid[:-1]
        run_start = torch.sort(torch.where(first, pos, nnz)).values   # the runs' starts first, then nnz
        erow = entry_rows(offsets_c, nnz)
        grid = (triton.cdiv(nnz, GATHER_BLOCK_R), triton.cdiv(H, GATHER_DW_BLOCK_H) if dw is not None else 1)
        record_launch("linear_gather_dw", hidden if dw is not None else None, sid, perm, run_start, run_end, erow,
                      gk, dw, db, grid=grid)
        wrap_triton(_gather_dw_kernel)[grid](
            hidden, rows.idx, rows.n_valid, sid, perm, run_start, run_end, erow, gk, dw if dw is not None else gk,
            db if db is not None else gk, nnz, V, H if dw is not None else 0, *hidden.stride(),
            *(dw.stride() if dw is not None else (0, 0)),
            BLOCK_R=GATHER_BLOCK_R, BLOCK_H=GATHER_DW_BLOCK_H, HAS_BIAS=db is not None, ACC=_TL[acc],
            num_warps=GATHER_NUM_WARPS)
    return dh, dw, db


def aot_specs(AOTSpec, sig):
    """Ahead-of-time compile specs (kernels/aot.py): bf16 hidden / weight, fp32 statistics, bias, softcap,
    per-row tau, bf16 rounding of the logits."""
    i64, f32, bf16 = "*i64", "*fp32", "*bf16"
    ce = dict(BLOCK_K=GATHER_BLOCK_K, BLOCK_H=GATHER_BLOCK_H, HAS_BIAS=True, HAS_SOFTCAP=True, HAS_TAU_ROWS=True,
              ACC=tl.float32, ROUND=tl.bfloat16)
    types = dict(h_ptr=bf16, w_ptr=bf16, b_ptr=bf16, labels_ptr=i64, idx_ptr=i64, nvalid_ptr=i64, ids_ptr=i64,
                 offsets_ptr=i64, tau_ptr=f32, zk_ptr=f32, kstat_ptr=f32, logp_c_ptr=f32, logp_ptr=f32,
                 logit_scale="fp32", softcap="fp32", inv_tau="fp32")
    specs = [AOTSpec("linear_gather_fwd", _gather_fwd_kernel, sig(_gather_fwd_kernel, types, ce), ce,
                     ("V", "H", "s_hn", "s_wv"), False, GATHER_NUM_WARPS)]
    ce = dict(BLOCK_K=GATHER_BLOCK_K, BLOCK_H=GATHER_BLOCK_H, HAS_SOFTCAP=True, HAS_TAU_ROWS=True, NEED_DH=True,
              ACC=tl.float32)
    types = dict(w_ptr=bf16, labels_ptr=i64, idx_ptr=i64, nvalid_ptr=i64, ids_ptr=i64, offsets_ptr=i64,
                 tau_ptr=f32, zk_ptr=f32, kstat_ptr=f32, c_logp_ptr=f32, gk_ptr=f32, dh_ptr=bf16,
                 logit_scale="fp32", softcap="fp32", inv_tau="fp32")
    specs.append(AOTSpec("linear_gather_dh", _gather_dh_kernel, sig(_gather_dh_kernel, types, ce), ce,
                         ("V", "H", "s_wv", "s_dhn"), False, GATHER_NUM_WARPS))
    ce = dict(BLOCK_R=GATHER_BLOCK_R, BLOCK_H=GATHER_DW_BLOCK_H, HAS_BIAS=True, ACC=tl.float32)
    types = dict(h_ptr=bf16, idx_ptr=i64, nvalid_ptr=i64, sid_ptr=i64, perm_ptr=i64, run_start_ptr=i64, run_end_ptr=i64,
                 erow_ptr=i64, gk_ptr=f32, dw_ptr=bf16, db_ptr=bf16)
    specs.append(AOTSpec("linear_gather_dw", _gather_dw_kernel, sig(_gather_dw_kernel, types, ce), ce,
                         ("V", "H", "s_hn", "s_dwv"), False, GATHER_NUM_WARPS))
    return specs
