"""Log-probs and entropy straight from hidden states and the lm_head weight, tile by tile, without
the [N, V] logits.

Forward, per block of BLOCK_N rows: for each vocabulary tile, z = (hidden @ weight_tile^T + bias)
/ tau with `tl.dot` (fp32 accumulation), then the online logsumexp / entropy update per row and the
label logit picked in-tile. Saves lse and H per row.
Backward, per vocabulary chunk [v0, v1): `_linear_dlogits_kernel` recomputes the logit tiles of the
chunk and writes dz (same formula as the logits path: c_logp (onehot - p) - c_ent p (log p + H),
over tau) into a [N, v1 - v0] buffer; the launcher's caller multiplies it into d(hidden),
d(weight), d(bias). No buffer proportional to N x V, no atomics.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import _config as cfg
from ._common import dlogits_block, finish_stats, stats_step
from ._rows import acc_dtype
from .launches import record_launch


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, s_hn, s_hk, s_wv, s_wk, inv_tau,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                ACC: tl.constexpr, PRECISION: tl.constexpr):
    """z' tile [BLOCK_N, BLOCK_V] = (hidden[rows] @ weight[cols]^T + bias[cols]) * inv_tau, -inf past V."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), ACC)
    ks = tl.arange(0, BLOCK_K)
    r64 = rows.to(tl.int64)
    c64 = cols.to(tl.int64)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        h = tl.load(h_ptr + r64[:, None] * s_hn + k[None, :] * s_hk, mask=(rows[:, None] < N) & (k[None, :] < H),
                    other=0.0)
        w = tl.load(w_ptr + c64[:, None] * s_wv + k[None, :] * s_wk, mask=(cols[:, None] < V) & (k[None, :] < H),
                    other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(ACC)[None, :]
    return tl.where(cols[None, :] < V, acc * inv_tau, float("-inf"))


@triton.jit(do_not_specialize=["ignore_index"])
def _linear_fwd_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, logp_ptr, lse_ptr, ent_ptr,
    N, V, H, s_hn, s_hk, s_wv, s_wk, inv_tau, ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    WITH_ENT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    m = tl.full((BLOCK_N,), float("-inf"), ACC)
    s = tl.zeros((BLOCK_N,), ACC)
    t = tl.zeros((BLOCK_N,), ACC)
    z_y = tl.zeros((BLOCK_N,), ACC)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, s_hn, s_hk, s_wv, s_wk, inv_tau,
                        BLOCK_N, BLOCK_V, BLOCK_K, HAS_BIAS, ACC, PRECISION)
        z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
        m, s, t = stats_step(m, s, t, z, WITH_ENT)
    logp, lse, ent = finish_stats(m, s, t, z_y, y, V, ignore_index)
    tl.store(logp_ptr + rows, logp, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    if WITH_ENT:
        tl.store(ent_ptr + rows, ent, mask=row_ok)


@triton.jit(do_not_specialize=["ignore_index", "v0"])
def _linear_dlogits_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, ent_ptr, c_logp_ptr, c_ent_ptr, dz_ptr,
    N, V, H, s_hn, s_hk, s_wv, s_wk, v0, v1, s_dn, inv_tau, ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ENT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = v0 + tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    y = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    keep = (y != ignore_index).to(ACC)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    c_logp = tl.load(c_logp_ptr + rows, mask=row_ok, other=0.0).to(ACC) * keep
    ent = tl.zeros((BLOCK_N,), ACC)
    c_ent = tl.zeros((BLOCK_N,), ACC)
    if HAS_ENT:
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        c_ent = tl.load(c_ent_ptr + rows, mask=row_ok, other=0.0).to(ACC) * keep
    # columns past the chunk end v1 (<= V) are neither loaded nor computed
    z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, v1, H, s_hn, s_hk, s_wv, s_wk, inv_tau,
                    BLOCK_N, BLOCK_V, BLOCK_K, HAS_BIAS, ACC, PRECISION)
    dz = dlogits_block(z, cols[None, :], y, lse, ent, c_logp, c_ent, inv_tau, HAS_ENT)
    out = dz_ptr + rows.to(tl.int64)[:, None] * s_dn + (cols - v0)[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < v1))


def _precision(dtype):
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def linear_fwd(hidden, weight, bias, labels, *, inv_tau, ignore_index, with_entropy):
    """hidden [N, H], weight [V, H], bias [V] or None, labels [N] -> (logp, lse, entropy or None) [N]."""
    N, H = hidden.shape
    V = weight.shape[0]
    acc, tl_acc = acc_dtype(hidden.dtype)
    logp, lse = (torch.empty(N, dtype=acc, device=hidden.device) for _ in range(2))
    ent = torch.empty(N, dtype=acc, device=hidden.device) if with_entropy else lse
    if N:
        record_launch("linear_fwd", hidden, weight, bias, labels, logp, lse, ent if with_entropy else None)
        wrap_triton(_linear_fwd_kernel)[(triton.cdiv(N, cfg.LIN_BLOCK_N),)](
            hidden, weight, bias if bias is not None else weight, labels, logp, lse, ent,
            N, V, H, *hidden.stride(), *weight.stride(), float(inv_tau), int(ignore_index),
            BLOCK_N=cfg.LIN_BLOCK_N, BLOCK_V=cfg.LIN_BLOCK_V, BLOCK_K=cfg.LIN_BLOCK_K, HAS_BIAS=bias is not None,
            WITH_ENT=with_entropy, ACC=tl_acc, PRECISION=_precision(hidden.dtype),
            num_warps=cfg.LIN_NUM_WARPS, num_stages=cfg.LIN_NUM_STAGES)
    return logp, lse, (ent if with_entropy else None)


def linear_dlogits_chunk(hidden, weight, bias, labels, lse, ent, c_logp, c_ent, v0, v1, out, *, inv_tau,
                         ignore_index):
    """Write dz[:, v0:v1] (the gradient w.r.t. the logits of vocabulary columns v0..v1) into out
    [N, >= v1 - v0] (row stride out.stride(0), unit column stride)."""
    N, H = hidden.shape
    V = weight.shape[0]
    has_ent = c_ent is not None
    if N and v1 > v0:
        record_launch("linear_dlogits", hidden, weight[v0:v1], None if bias is None else bias[v0:v1], labels,
                      lse, ent, c_logp, c_ent, out[:, : v1 - v0])
        grid = (triton.cdiv(N, cfg.LIN_BLOCK_N), triton.cdiv(v1 - v0, cfg.LIN_BLOCK_V))
        wrap_triton(_linear_dlogits_kernel)[grid](
            hidden, weight, bias if bias is not None else weight, labels, lse, ent if has_ent else lse,
            c_logp, c_ent if has_ent else c_logp, out, N, V, H, *hidden.stride(), *weight.stride(), v0, v1,
            out.stride(0), float(inv_tau), int(ignore_index),
            BLOCK_N=cfg.LIN_BLOCK_N, BLOCK_V=cfg.LIN_BLOCK_V, BLOCK_K=cfg.LIN_BLOCK_K, HAS_BIAS=bias is not None,
            HAS_ENT=has_ent, ACC=acc_dtype(hidden.dtype)[1], PRECISION=_precision(hidden.dtype),
            num_warps=cfg.LIN_NUM_WARPS, num_stages=cfg.LIN_NUM_STAGES)
    return out


def aot_specs(AOTSpec, sig):
    specs = []
    blocks = dict(BLOCK_N=cfg.LIN_BLOCK_N, BLOCK_V=cfg.LIN_BLOCK_V, BLOCK_K=cfg.LIN_BLOCK_K, HAS_BIAS=False,
                  ACC=tl.float32, PRECISION="tf32")
    div = ("H", "s_hn", "s_wv", "V")
    ce = dict(blocks, WITH_ENT=True)
    types = dict(h_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", labels_ptr="*i64", logp_ptr="*fp32",
                 lse_ptr="*fp32", ent_ptr="*fp32", inv_tau="fp32", s_hk="constexpr", s_wk="constexpr")
    ce_unit = dict(ce, s_hk=1, s_wk=1)   # the JIT specialises unit strides
    specs.append(AOTSpec("linear_fwd[bf16]", _linear_fwd_kernel, sig(_linear_fwd_kernel, types, ce_unit), ce_unit,
                         div, True, cfg.LIN_NUM_WARPS, cfg.LIN_NUM_STAGES, tensor_cores=True))
    ce = dict(blocks, HAS_ENT=True, s_hk=1, s_wk=1)
    types = dict(h_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", labels_ptr="*i64", lse_ptr="*fp32", ent_ptr="*fp32",
                 c_logp_ptr="*fp32", c_ent_ptr="*fp32", dz_ptr="*bf16", inv_tau="fp32")
    specs.append(AOTSpec("linear_dlogits[bf16]", _linear_dlogits_kernel, sig(_linear_dlogits_kernel, types, ce), ce,
                         div + ("s_dn", "v1"), True, cfg.LIN_NUM_WARPS, cfg.LIN_NUM_STAGES, tensor_cores=True))
    return specs
