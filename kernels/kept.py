"""Log-probabilities renormalised over each row's kept set K (the sampler's support after top-k / top-p /
min-p), CSR-addressed: row r keeps the vocabulary ids `ids[offsets[r]:offsets[r + 1]]`.

Forward, per live row with z' = softcap(logit_scale z) / tau (softcap(x) = c tanh(x / c), none by default;
tau a scalar or one value per row; kernels/_common.py `transform_logits`):
    m_K = max_{j in K} z'_j,  log s_K = log sum_{j in K} exp(z'_j - m_K),  logp = (z'_y - m_K) - log s_K
Without entropy it reads only the row's kept logits (gathered) and the label's logit (bytes grow with nnz,
not with V). With WITH_ENT it streams the whole row once, for the full-vocabulary entropy H = log s - t / s
(saving lse = m + log s) and, in the same sweep, the kept statistics: the row's ids are ascending, so a
chunk of BLOCK_K of them is held while the tiles pass over it and each tile's kept logits are taken from
the tile in registers (tl.gather): the logits are read once, the only extra bytes are the ids and offsets.
m_K and log s_K are saved separately, so logp is exact at any logit magnitude.
A live row whose label is not in K (or has an empty K, or a label outside [0, V)) gets logp = NaN and
log s_K = NaN (so its gradient over K is NaN too); with raw_stats the kept statistics are stored as they
are (a vocabulary shard's, fastppo.vocab_parallel). Ids outside [0, V) are skipped, forward and backward:
a shard's kernels take the global ids shifted by the shard's start. Ignored rows (label == ignore_index)
are not read: every output is 0 and their gradient row is zeros.

Backward, for upstream c_logp = dL/dlogp and optional c_ent = dL/dH:
    dL/dz_j = [c_logp (onehot(y)_j - p_K,j) 1{j in K} - c_ent p_j (log p_j + H)] dz'_j/dz_j,
    p_K,j = exp((z'_j - m_K) - log s_K),  p_j = exp(z'_j - lse).
The gradient is dense [N, V] (zeros outside K without entropy): one program per row first writes the
dense part (zeros, or the entropy term), then, after a block barrier, overwrites the kept columns with
their full gradient (the entropy term recomputed there, so nothing is read back or rounded twice).
ids must be unique and ascending within a row (fastppo.KeptSet checks the first on CPU and sorts); a
duplicate would be counted twice in s_K.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import _config as cfg
from ._common import row_offset, row_transform, stats_step, transform_logits
from ._rows import LogitTransform, Rows, acc_dtype, flat_labels, flat_rows
from .launches import record_launch

# Kept ids gathered per step (a kept set is typically tens to a few thousand ids).
KEPT_BLOCK_K = 256


@triton.jit
def _kept_chunk_step(m, s, hits, kid, zc, c0, y, V, BLOCK_V: tl.constexpr):
    """Fold the kept ids of the chunk `kid` that fall in the column tile [c0, c0 + BLOCK_V) into the kept
    set's running (m, s) and label hits, taking their logits from the tile already in registers (zc)."""
    sel = (kid >= c0) & (kid < c0 + BLOCK_V) & (kid < V)
    zk = tl.gather(zc, tl.where(sel, kid - c0, 0).to(tl.int32), 0)
    m, s, _ = stats_step(m, s, s, tl.where(sel, zk, float("-inf")), False)
    return m, s, hits + tl.sum(tl.where(sel & (kid == y), 1, 0))


@triton.jit(do_not_specialize=["ignore_index", "raw_stats"])
def _kept_logprobs_fwd_kernel(
    # data: logits [N, V] (strided rows), labels [N], kept ids [nnz], offsets [N + 1], per-row tau [N]
    logits_ptr, labels_ptr, ids_ptr, offsets_ptr, tau_ptr,
    # outputs [N]: logp, m_K, log s_K, full-vocabulary lse and entropy (WITH_ENT)
    logp_ptr, m_ptr, logs_ptr, lse_ptr, ent_ptr,
    # row addressing and shape
    n_inner, stride_outer, stride_inner, V,
    # the folded transform (kernels/_rows.py LogitTransform, tau = 1 with HAS_TAU_ROWS), ignore_index,
    # raw_stats (1: m_K / log s_K as they are, -inf for a row with no kept id, for the vocabulary shards)
    pre_hi, pre_lo, post_hi, post_lo, ignore_index, raw_stats,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, WITH_ENT: tl.constexpr, HAS_TAU_ROWS: tl.constexpr,
    HAS_CAP: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(labels_ptr + row).to(tl.int64)
    live = y != ignore_index
    logp = tl.zeros((), ACC)
    m_k = tl.zeros((), ACC)
    logs_k = tl.zeros((), ACC)
    lse = tl.zeros((), ACC)
    ent = tl.zeros((), ACC)
    if live:
        pre, post = row_transform(tau_ptr, row, pre_hi, pre_lo, post_hi, post_lo, HAS_TAU_ROWS, HAS_CAP, ACC)
        row_ptr = logits_ptr + row_offset(row, n_inner, stride_outer, stride_inner)
        start = tl.load(offsets_ptr + row).to(tl.int64)
        end = tl.load(offsets_ptr + row + 1).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        m = tl.full((), float("-inf"), ACC)
        s = tl.zeros((), ACC)
        hits = tl.zeros((), tl.int32)
        if WITH_ENT:
            # one sweep: the full-row statistics, and the kept ids (ascending within the row: a chunk of
            # BLOCK_K of them is held until the tiles pass its last id) picked out of each tile in registers
            cols = tl.arange(0, BLOCK_V)
            mf = tl.full((), float("-inf"), ACC)
            sf = tl.zeros((), ACC)
            tf = tl.zeros((), ACC)
            kb = start
            kid = tl.load(ids_ptr + kb + ks, mask=kb + ks < end, other=-1).to(tl.int64)
            for c0 in range(0, V, BLOCK_V):
                c = c0 + cols
                zc = transform_logits(tl.load(row_ptr + c, mask=c < V, other=0.0).to(ACC), pre, post, HAS_CAP)[0]
                zc = tl.where(c < V, zc, float("-inf"))
                mf, sf, tf = stats_step(mf, sf, tf, zc, True)
                m, s, hits = _kept_chunk_step(m, s, hits, kid, zc, c0, y, V, BLOCK_V)
                # the chunk is used up once all its ids lie below this tile's end: take the next one
                more = (tl.max(kid) < c0 + BLOCK_V) & (kb + BLOCK_K < end)        # (pads are -1)
                while more:
                    kb += BLOCK_K
                    kid = tl.load(ids_ptr + kb + ks, mask=kb + ks < end, other=-1).to(tl.int64)
                    m, s, hits = _kept_chunk_step(m, s, hits, kid, zc, c0, y, V, BLOCK_V)
                    more = (tl.max(kid) < c0 + BLOCK_V) & (kb + BLOCK_K < end)
            lse = mf + tl.log(sf)
            ent = tl.log(sf) - tf / sf
        else:
            # the kept logits only (gathered: bytes grow with the kept ids, not with V)
            for k0 in range(start, end, BLOCK_K):
                inb = k0 + ks < end
                ids = tl.load(ids_ptr + k0 + ks, mask=inb, other=0).to(tl.int64)
                inb &= (ids >= 0) & (ids < V)          # ids outside [0, V) (another shard's) are skipped
                z = transform_logits(tl.load(row_ptr + ids, mask=inb, other=0.0).to(ACC), pre, post, HAS_CAP)[0]
                m, s, _ = stats_step(m, s, s, tl.where(inb, z, float("-inf")), False)
                hits += tl.sum(tl.where(inb & (ids == y), 1, 0))
        in_range = (y >= 0) & (y < V)
        z_y = transform_logits(tl.load(row_ptr + y, mask=in_range, other=0.0).to(ACC), pre, post, HAS_CAP)[0]
        found = hits > 0
        keep = found | (raw_stats != 0)
        m_k = tl.where(keep, m, 0.0)
        logs_k = tl.where(keep, tl.log(s), float("nan"))
        logp = tl.where(found, (z_y - m) - tl.log(s), float("nan"))
    tl.store(logp_ptr + row, logp)
    tl.store(m_ptr + row, m_k)
    tl.store(logs_ptr + row, logs_k)
    if WITH_ENT:
        tl.store(lse_ptr + row, lse)
        tl.store(ent_ptr + row, ent)


@triton.jit(do_not_specialize=["ignore_index"])
def _kept_logprobs_bwd_kernel(
    # data: logits, labels, kept ids, offsets, per-row tau; saved m_K, log s_K, lse, entropy; upstream grads
    logits_ptr, labels_ptr, ids_ptr, offsets_ptr, tau_ptr, m_ptr, logs_ptr, lse_ptr, ent_ptr,
    c_logp_ptr, c_ent_ptr,
    # output: dense gradient [N, V], row r at r * V (contiguous)
    dlogits_ptr,
    # row addressing and shape
    n_inner, stride_outer, stride_inner, V,
    pre_hi, pre_lo, post_hi, post_lo, ignore_index,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, HAS_ENT: tl.constexpr, HAS_TAU_ROWS: tl.constexpr,
    HAS_CAP: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(labels_ptr + row).to(tl.int64)
    live = y != ignore_index
    out_ptr = dlogits_ptr + row * V
    cols = tl.arange(0, BLOCK_V)
    out_ty = dlogits_ptr.dtype.element_ty
    if live:
        pre, post = row_transform(tau_ptr, row, pre_hi, pre_lo, post_hi, post_lo, HAS_TAU_ROWS, HAS_CAP, ACC)
        row_ptr = logits_ptr + row_offset(row, n_inner, stride_outer, stride_inner)
        c_logp = tl.load(c_logp_ptr + row).to(ACC)
        lse = tl.zeros((), ACC)
        ent = tl.zeros((), ACC)
        c_ent = tl.zeros((), ACC)
        # dense part: the entropy term over the whole row, or zeros
        if HAS_ENT:
            lse = tl.load(lse_ptr + row).to(ACC)
            ent = tl.load(ent_ptr + row).to(ACC)
            c_ent = tl.load(c_ent_ptr + row).to(ACC)
            for c0 in range(0, V, BLOCK_V):
                c = c0 + cols
                z, dz = transform_logits(tl.load(row_ptr + c, mask=c < V, other=0.0).to(ACC), pre, post, HAS_CAP)
                lp = tl.where(z == float("-inf"), 0.0, z - lse)
                g = -c_ent * tl.exp(z - lse) * (lp + ent) * dz
                tl.store(out_ptr + c, g.to(out_ty), mask=c < V)
        else:
            for c0 in range(0, V, BLOCK_V):
                c = c0 + cols
                tl.store(out_ptr + c, tl.zeros((BLOCK_V,), out_ty), mask=c < V)
        tl.debug_barrier()          # the dense stores above are visible before the kept columns are written
        m_k = tl.load(m_ptr + row).to(ACC)
        logs_k = tl.load(logs_ptr + row).to(ACC)
        start = tl.load(offsets_ptr + row).to(tl.int64)
        end = tl.load(offsets_ptr + row + 1).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        for k0 in range(start, end, BLOCK_K):
            inb = k0 + ks < end
            ids = tl.load(ids_ptr + k0 + ks, mask=inb, other=0).to(tl.int64)
            inb &= (ids >= 0) & (ids < V)              # ids outside [0, V) (another shard's) are skipped
            z, dz = transform_logits(tl.load(row_ptr + ids, mask=inb, other=0.0).to(ACC), pre, post, HAS_CAP)
            p_k = tl.exp((z - m_k) - logs_k)
            g = c_logp * (tl.where(ids == y, 1.0, 0.0) - p_k)
            if HAS_ENT:
                g -= c_ent * tl.exp(z - lse) * (tl.where(z == float("-inf"), 0.0, z - lse) + ent)
            tl.store(out_ptr + ids, (g * dz).to(out_ty), mask=inb)
    else:
        for c0 in range(0, V, BLOCK_V):
            c = c0 + cols
            tl.store(out_ptr + c, tl.zeros((BLOCK_V,), out_ty), mask=c < V)


class KeptStats(NamedTuple):
    """Per-row results of `kept_logprobs_fwd` ([N], fp32; fp64 for fp64 logits). lse / entropy are the
    full-vocabulary ones (None without entropy)."""
    logp: torch.Tensor
    m: torch.Tensor
    log_s: torch.Tensor
    lse: torch.Tensor | None
    entropy: torch.Tensor | None


def _transform_args(temperature, logit_scale, softcap, n_rows: int, fallback: torch.Tensor):
    """(tau tensor for the pointer, the folded LogitTransform, HAS_TAU_ROWS) for a float temperature or a
    per-row tensor (then the host folds tau = 1 and the kernel applies 1 / tau[row])."""
    if isinstance(temperature, torch.Tensor):
        return flat_rows(temperature, n_rows, "temperature"), LogitTransform(1.0, logit_scale, softcap), True
    return fallback, LogitTransform(1.0 / float(temperature), logit_scale, softcap), False


def _csr_args(ids: torch.Tensor, offsets: torch.Tensor, n_rows: int):
    if offsets.numel() != n_rows + 1:
        raise ValueError(f"kept offsets has {offsets.numel()} entries but logits have {n_rows} rows "
                         f"(expected rows + 1 = {n_rows + 1})")
    return ids.reshape(-1).contiguous(), offsets.reshape(-1).contiguous()


def kept_logprobs_fwd(logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, *,
                      temperature=1.0, ignore_index: int = -100, with_entropy: bool = False,
                      logit_scale: float = 1.0, softcap=None, raw_stats: bool = False) -> KeptStats:
    """Log-probs renormalised over each row's kept set (module doc). logits [..., V] (any strides),
    labels with N = logits.numel() // V elements, ids int32/int64 [nnz] ascending within each row (as a
    fastppo.KeptSet holds them; ids outside [0, V) are skipped), offsets int64 [N + 1], temperature a float or
    a tensor of N elements (labels' shape); z' = softcap(logit_scale z) / tau. raw_stats: m_K and log s_K
    as they are for every live row (-inf, -inf with no kept id in [0, V)), not NaN where the label is missing
    (a vocabulary shard's statistics, combined across shards by fastppo.vocab_parallel)."""
    rows = Rows(logits)
    n = rows.n_rows
    y = flat_labels(labels, n)
    ids, offsets = _csr_args(ids, offsets, n)
    acc, tl_acc = acc_dtype(logits.dtype)
    dev = logits.device
    logp, m, log_s = (torch.empty(n, dtype=acc, device=dev) for _ in range(3))
    lse = torch.empty(n, dtype=acc, device=dev) if with_entropy else None
    ent = torch.empty(n, dtype=acc, device=dev) if with_entropy else None
    tau, tf, tau_rows = _transform_args(temperature, logit_scale, softcap, n, logp)
    if n > 0:
        record_launch("kept_logprobs_fwd", logits if with_entropy else None, y, ids, offsets,
                      tau if tau_rows else None, logp, m, log_s, lse, ent)
        wrap_triton(_kept_logprobs_fwd_kernel)[(n,)](
            rows.tensor, y, ids, offsets, tau, logp, m, log_s, lse if with_entropy else logp,
            ent if with_entropy else logp, *rows.args(), rows.n_cols, *tf.args(), int(ignore_index),
            int(bool(raw_stats)), BLOCK_K=KEPT_BLOCK_K, BLOCK_V=cfg.ROW_BLOCK_V, WITH_ENT=with_entropy,
            HAS_TAU_ROWS=tau_rows, HAS_CAP=tf.has_cap, ACC=tl_acc, num_warps=cfg.ROW_NUM_WARPS,
        )
    return KeptStats(logp, m, log_s, lse, ent)


def kept_logprobs_bwd(logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor,
                      stats: KeptStats, c_logp: torch.Tensor, c_ent: torch.Tensor | None = None, *,
                      temperature=1.0, ignore_index: int = -100, logit_scale: float = 1.0,
                      softcap=None) -> torch.Tensor:
    """Dense gradient (logits' shape and dtype) of sum(c_logp * logp + c_ent * H) from `stats` (the forward's
    KeptStats; with c_ent its lse and entropy are needed). Ignored rows get zeros and are not read."""
    rows = Rows(logits)
    n = rows.n_rows
    y = flat_labels(labels, n)
    ids, offsets = _csr_args(ids, offsets, n)
    has_ent = c_ent is not None
    if has_ent and stats.entropy is None:
        raise ValueError("an entropy gradient (c_ent) needs the forward's entropy: run kept_logprobs_fwd "
                         "with with_entropy=True")
    c_logp = flat_rows(c_logp, n, "logp gradient")
    c_ent = flat_rows(c_ent, n, "entropy gradient") if has_ent else None
    out = torch.empty(rows.tensor.shape, dtype=logits.dtype, device=logits.device)
    tau, tf, tau_rows = _transform_args(temperature, logit_scale, softcap, n, stats.m)
    if n > 0:
        record_launch("kept_logprobs_bwd", logits if has_ent else None, y, ids, offsets,
                      tau if tau_rows else None, stats.m, stats.log_s, stats.lse if has_ent else None,
                      stats.entropy if has_ent else None, c_logp, c_ent, out)
        wrap_triton(_kept_logprobs_bwd_kernel)[(n,)](
            rows.tensor, y, ids, offsets, tau, stats.m, stats.log_s,
            stats.lse if has_ent else stats.m, stats.entropy if has_ent else stats.m,
            c_logp, c_ent if has_ent else c_logp, out, *rows.args(), rows.n_cols, *tf.args(),
            int(ignore_index), BLOCK_K=KEPT_BLOCK_K, BLOCK_V=cfg.ROW_BLOCK_V, HAS_ENT=has_ent,
            HAS_TAU_ROWS=tau_rows, HAS_CAP=tf.has_cap, ACC=acc_dtype(logits.dtype)[1], num_warps=cfg.ROW_NUM_WARPS,
        )
    return out.view(logits.shape) if out.shape != logits.shape else out


def aot_specs(AOTSpec, _sig):
    """The kernels' ahead-of-time compile specs (kernels/aot.py): bf16 logits with int32 ids and a scalar
    temperature (with and without the entropy sweep), fp32 logits with int64 ids, per-row temperatures, a
    softcap and the entropy."""
    specs = []
    strides = ("stride_outer", "stride_inner", "V")
    for tag, dt, id_t, ent, tau_rows in (("bf16,i32", "bf16", "*i32", False, False),
                                         ("bf16,i32,ent", "bf16", "*i32", True, False),
                                         ("fp32,i64,ent,tau,cap", "fp32", "*i64", True, True)):
        ce = dict(BLOCK_K=KEPT_BLOCK_K, BLOCK_V=cfg.ROW_BLOCK_V, WITH_ENT=ent, HAS_TAU_ROWS=tau_rows,
                  HAS_CAP=ent, ACC=tl.float32)
        types = dict(logits_ptr=f"*{dt}", labels_ptr="*i64", ids_ptr=id_t, offsets_ptr="*i64", tau_ptr="*fp32",
                     logp_ptr="*fp32", m_ptr="*fp32", logs_ptr="*fp32", lse_ptr="*fp32", ent_ptr="*fp32",
                     pre_hi="fp32", pre_lo="fp32", post_hi="fp32", post_lo="fp32")
        specs.append(AOTSpec(f"kept_logprobs_fwd[{tag}]", _kept_logprobs_fwd_kernel,
                             _sig(_kept_logprobs_fwd_kernel, types, ce), ce, strides, ent, cfg.ROW_NUM_WARPS))
        ce = dict(BLOCK_K=KEPT_BLOCK_K, BLOCK_V=cfg.ROW_BLOCK_V, HAS_ENT=ent, HAS_TAU_ROWS=tau_rows, HAS_CAP=ent,
                  ACC=tl.float32)
        types.update(c_logp_ptr="*fp32", c_ent_ptr="*fp32", dlogits_ptr=f"*{dt}")
        specs.append(AOTSpec(f"kept_logprobs_bwd[{tag}]", _kept_logprobs_bwd_kernel,
                             _sig(_kept_logprobs_bwd_kernel, types, ce), ce, strides, ent, cfg.ROW_NUM_WARPS))
    return specs

