"""Generalised advantage estimation in one launch: a reverse linear-recurrence scan over time.

Mask-aware GAE (docs/design.md §4) walks t = T-1..0 with a carry (G, N) = (advantage, next value):
    unmasked t:  G' = gamma*lam*G + gamma*N + (r_t - V_t),  N' = V_t
    masked t:    G' = G,  N' = N           (the step is skipped)
Each step is an affine map of the carry with an upper-triangular matrix [[a, b], [0, d]] and an
offset (c0, c1); composing affine maps is associative, so a chunk of BLOCK_T steps is one
`tl.associative_scan` (reverse), applied to the carry coming from the chunk on its right.
A_t = G_t and R_t = G_t + V_t where m_t, else 0. One program per sequence, any T (packed sequences:
the program reads its sequence's offsets [cu[b], cu[b + 1]) and scans those tokens). Every offset is 64-bit
(`t * stride_t` of a view with stride 2^30 + 1 would wrap in int32). Values at masked positions are selected
away (NaN/inf there never reach the result).
The scan runs in fp64: with gamma = lam = 1 it sums thousands of terms in tree order, and fp32
would leave errors of ~1e-5 relative on long responses; the data moved is unchanged (fp32 in / out).
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import _config as cfg
from ._common import scalar_hi_lo
from ._rows import split_float
from .launches import record_launch


@triton.jit
def _affine_combine(a1, b1, d1, c01, c11, a2, b2, d2, c02, c12):
    """(map 2) o (map 1): map 1 is applied first (it holds the later time steps)."""
    return a2 * a1, a2 * b1 + b2 * d1, d2 * d1, a2 * c01 + b2 * c11 + c02, d2 * c11 + c12


@triton.jit
def _gae_kernel(
    r_ptr, v_ptr, m_ptr, cu_ptr, adv_ptr, ret_ptr, T,
    sr_b, sr_t, sv_b, sv_t, sm_b, sm_t, gamma_hi, gamma_lo, lam_hi, lam_lo,
    PACKED: tl.constexpr, BLOCK_T: tl.constexpr,
):
    gamma = scalar_hi_lo(gamma_hi, gamma_lo, tl.float64)
    lam = scalar_hi_lo(lam_hi, lam_lo, tl.float64)
    b = tl.program_id(0).to(tl.int64)
    if PACKED:   # sequence b is tokens [cu[b], cu[b + 1]) of 1-D inputs (per-sequence strides 0)
        start = tl.load(cu_ptr + b).to(tl.int64)
        T = tl.load(cu_ptr + b + 1).to(tl.int64) - start
        out_row = start
    else:
        start = b * 0
        out_row = b * T
    lanes = tl.arange(0, BLOCK_T).to(tl.int64)
    g_carry = tl.zeros((), tl.float64)
    n_carry = tl.zeros((), tl.float64)
    n_chunks = tl.cdiv(T, BLOCK_T)
    for i in range(0, n_chunks):
        t = (n_chunks - 1 - i) * BLOCK_T + lanes
        inb = t < T
        pos = start + t
        m = (tl.load(m_ptr + b * sm_b + pos * sm_t, mask=inb, other=0) != 0) & inb
        r = tl.load(r_ptr + b * sr_b + pos * sr_t, mask=inb, other=0.0).to(tl.float64)
        v = tl.load(v_ptr + b * sv_b + pos * sv_t, mask=inb, other=0.0).to(tl.float64)
        one = tl.full(r.shape, 1.0, tl.float64)
        zero = tl.zeros(r.shape, tl.float64)
        a = tl.where(m, gamma * lam * one, one)
        bb = tl.where(m, gamma * one, zero)
        d = tl.where(m, zero, one)
        c0 = tl.where(m, r - v, zero)
        c1 = tl.where(m, v, zero)
        a, bb, d, c0, c1 = tl.associative_scan((a, bb, d, c0, c1), 0, _affine_combine, reverse=True)
        g = a * g_carry + bb * n_carry + c0
        n = d * n_carry + c1
        out = out_row + t
        tl.store(adv_ptr + out, tl.where(m, g, zero).to(adv_ptr.dtype.element_ty), mask=inb)
        tl.store(ret_ptr + out, tl.where(m, g + v, zero).to(ret_ptr.dtype.element_ty), mask=inb)
        g_carry = tl.sum(tl.where(lanes == 0, g, zero), 0)
        n_carry = tl.sum(tl.where(lanes == 0, n, zero), 0)


def gae_fwd(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
            cu_seqlens: torch.Tensor | None = None):
    """Returns (advantages, returns), float32 [B, T] (float64 when rewards or values are), contiguous.
    Any strides (64-bit offsets); gamma and lam reach the fp64 scan as (hi, lo) fp32 pairs. With
    cu_seqlens ([S + 1] offsets) the inputs and outputs are packed 1-D [total]: one program per sequence
    reads its offsets (same launch, same bytes as padded, plus the offsets)."""
    packed = cu_seqlens is not None
    B, T = (cu_seqlens.shape[0] - 1, rewards.shape[0]) if packed else rewards.shape
    strides = [(0, x.stride(0)) if packed else x.stride() for x in (rewards, values, mask)]
    out_dtype = torch.float64 if torch.float64 in (rewards.dtype, values.dtype) else torch.float32
    adv = torch.empty(rewards.shape, dtype=out_dtype, device=rewards.device)
    ret = torch.empty_like(adv)
    if B and T:
        record_launch("gae", rewards, values, mask, cu_seqlens, adv, ret)
        wrap_triton(_gae_kernel)[(B,)](
            rewards, values, mask, cu_seqlens if packed else mask, adv, ret, T, *strides[0], *strides[1], *strides[2],
            *split_float(gamma), *split_float(lam), PACKED=packed, BLOCK_T=cfg.GAE_BLOCK_T,
            num_warps=cfg.GAE_NUM_WARPS)
    return adv, ret


def aot_specs(AOTSpec, sig):
    """Padded (streaming: 128-bit loads) and packed (each sequence starts at a loaded offset, so its loads
    cannot be proven 16-byte aligned: scalar loads, same bytes)."""
    specs = []
    for packed in (False, True):
        ce = dict(BLOCK_T=cfg.GAE_BLOCK_T, sr_t=1, sv_t=1, sm_t=1, PACKED=packed)  # the JIT specialises unit strides
        types = dict(r_ptr="*fp32", v_ptr="*fp32", m_ptr="*i1", cu_ptr="*i64", adv_ptr="*fp32", ret_ptr="*fp32",
                     gamma_hi="fp32", gamma_lo="fp32", lam_hi="fp32", lam_lo="fp32")
        specs.append(AOTSpec("gae[packed]" if packed else "gae", _gae_kernel, sig(_gae_kernel, types, ce), ce,
                             ("T", "sr_b", "sv_b", "sm_b"), not packed, cfg.GAE_NUM_WARPS))
    return specs
