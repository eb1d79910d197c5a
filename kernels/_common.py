"""Shared @triton.jit helpers: row addressing and the online softmax step.

Every streaming kernel in fastppo walks a vocabulary row in blocks and keeps a running max `m`
and a running sum `s = sum_i exp(z_i - m)` in fp32. When a block raises the max, everything
accumulated so far is rescaled by `alpha = exp(m_old - m_new)`. `-inf` logits (masked
vocabulary) are exact: they contribute exp(-inf) = 0 and never produce `inf - inf`.
"""

import triton
import triton.language as tl


@triton.jit
def row_offset(row, n_inner, stride_outer, stride_inner):
    """64-bit element offset of flattened row `row` of a [outer, inner, ...] strided tensor."""
    row = row.to(tl.int64)
    return (row // n_inner) * stride_outer + (row % n_inner) * stride_inner


@triton.jit
def bcast(x):
    """Per-row value -> broadcastable against the row's block: a scalar for a [BLOCK_V] row block,
    [BLOCK_N, 1] for a [BLOCK_N, BLOCK_V] tile."""
    return tl.expand_dims(x, -1)


@triton.jit
def online_softmax_step(m, s, z):
    """One block of the online logsumexp, along the last axis of z.

    m, s: running max and sum of exp(z - m) per row (fp32; m = -inf, s = 0 before the first block):
    scalars for a row block z [BLOCK_V], [BLOCK_N] vectors for a tile z [BLOCK_N, BLOCK_V].
    z: scaled logits, `-inf` where masked.
    Returns (m_new, s_new, alpha, e, m_ref): alpha = exp(m - m_new) rescales older sums,
    e = exp(z - m_ref) per element, m_ref = m_new (or 0 while the row is all -inf so far).
    """
    m_new = tl.maximum(m, tl.max(z, -1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_ref)
    e = tl.exp(z - bcast(m_ref))
    s_new = s * alpha + tl.sum(e, -1)
    return m_new, s_new, alpha, e, m_ref


@triton.jit
def entropy_step(t, s, m, m_ref, alpha, e, z):
    """Online update of t = sum_i exp(z_i - m) (z_i - m) per row, kept relative to the running max so
    that entropy H = log(s) - t / s has no cancellation for large logits. `s`, `m` are the values
    before this block (same call order as online_softmax_step)."""
    shift = tl.where(m == float("-inf"), 0.0, m - m_ref)
    return keep_nonzero(alpha, t + s * shift) + tl.sum(keep_nonzero(e, z - bcast(m_ref)), -1)


@triton.jit
def keep_nonzero(w, x):
    """w * x, but 0 where w == 0: an underflowed weight times an overflowed difference (z - m = -inf for
    logits spanning +-3e38, or a masked -inf logit) contributes exactly nothing, as in float64. NaN w stays NaN."""
    return tl.where(w == 0.0, 0.0, w * x)


@triton.jit
def stats_step(m, s, t, z, WITH_ENT: tl.constexpr):
    """Fold one block z of a row (or tile) into the running (max, sum-exp, entropy sum)."""
    m_new, s_new, alpha, e, m_ref = online_softmax_step(m, s, z)
    if WITH_ENT:
        t = entropy_step(t, s, m, m_ref, alpha, e, z)
    return m_new, s_new, t


@triton.jit
def finish_stats(m, s, t, z_y, y, V, ignore_index):
    """(logp, m_ref, log s, entropy) from the finished statistics and the label's scaled logit z_y:
    logp = (z_y - m) - log s (the row max and the log-sum kept apart, exact at any magnitude as fp32
    log_softmax is; m_ref = m, or 0 for an all -inf row), H = log s - t / s; ignored labels give 0,
    labels outside [0, V) give NaN."""
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    log_s = tl.log(s)
    ignored = y == ignore_index
    in_range = (y >= 0) & (y < V)
    logp = tl.where(ignored, 0.0, tl.where(in_range, (z_y - m_ref) - log_s, float("nan")))
    ent = tl.where(ignored, 0.0, log_s - t / s)
    return logp, m_ref, log_s, ent


@triton.jit
def dlogits_block(z, cols, y, m, log_s, ent, c_logp, c_ent, inv_tau, HAS_ENT: tl.constexpr):
    """Gradient of c_logp * logp_y + c_ent * H with respect to the raw logits z / inv_tau.

    d logp_y / dz_j = (onehot(y)_j - p_j) / tau,  dH / dz_j = -p_j (log p_j + H) / tau,
    with log p_j = (z'_j - m) - log s (saved row max m and log-sum, never an absolute lse). `z` is the
    scaled block z' (-inf where masked); the per-row values (y, m, log_s, ent, c_logp, c_ent) are
    scalars for a row block [BLOCK_V] or [BLOCK_N] vectors for a tile [BLOCK_N, BLOCK_V].
    """
    logp = (z - bcast(m)) - bcast(log_s)
    p = tl.exp(logp)
    g = bcast(c_logp) * (tl.where(cols == bcast(y), 1.0, 0.0) - p)
    if HAS_ENT:
        g -= bcast(c_ent) * keep_nonzero(p, logp + bcast(ent))
    return g * inv_tau


@triton.jit
def tanh_exp(x):
    """tanh(x) = 1 - 2 / (exp(2x) + 1) with exp only (no libdevice, so it also runs in the interpreter).
    Exact limits: +inf -> 1, -inf -> -1, NaN -> NaN. Absolute error ~2 ulp(1) near 0, which is below the
    rounding of the capped logit c * tanh(x) itself."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def scalar_hi_lo(hi, lo, ACC: tl.constexpr):
    """A host float passed as two fp32 kernel arguments (hi = fp32(x), lo = fp32(x - hi)) back in ACC:
    exact to ~2^-48 for an fp64 accumulator, fp32(x) for an fp32 one."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def row_inv_tau(tau_ptr, row, tau_hi, tau_lo, HAS_TAU_ROWS: tl.constexpr, ACC: tl.constexpr):
    """1 / tau of this row: the host's scalar (hi, lo), or 1 / tau[row] (a per-token temperature, one load),
    correctly rounded (fp32: div_rn, as a plain `/` compiles to the approximate div.full.f32), so a tensor equal
    to an fp32 float gives the host's fp32(1 / tau) bit for bit."""
    if HAS_TAU_ROWS:
        tau = tl.load(tau_ptr + row).to(ACC)
        if tau.dtype == tl.float32:
            return tl.math.div_rn(1.0, tau)
        return 1.0 / tau
    return scalar_hi_lo(tau_hi, tau_lo, ACC)


@triton.jit
def transform_logits(z, pre, post, HAS_CAP: tl.constexpr):
    """Scaled logits z' = softcap(scale * z) / tau and dz'/dz, per element (docs/design.md §4.1).

    softcap(x) = c * tanh(x / c). The host folds the scalars (see kernels/_rows.py `LogitTransform`):
    without a cap  pre = scale / tau:            z' = pre * z,              dz'/dz = pre;
    with a cap c   pre = scale / c, post = c / tau: z' = post * tanh(pre z), dz'/dz = pre post (1 - tanh^2).
    -inf stays -inf without a cap (a masked vocabulary entry) and becomes -c / tau with one, as in the model."""
    zt = z * pre
    dz = pre
    if HAS_CAP:
        th = tanh_exp(zt)
        zt = th * post
        dz = pre * post * (1.0 - th * th)
    return zt, dz


@triton.jit
def row_transform(tau_ptr, row, pre_hi, pre_lo, post_hi, post_lo, HAS_TAU_ROWS: tl.constexpr,
                  HAS_CAP: tl.constexpr, ACC: tl.constexpr):
    """(pre, post) of `transform_logits` for this row: the host's folded factors, times 1 / tau[row] with
    per-row temperatures (on pre without a cap, on post with one: the host folded tau = 1 then)."""
    pre = scalar_hi_lo(pre_hi, pre_lo, ACC)
    post = scalar_hi_lo(post_hi, post_lo, ACC)
    if HAS_TAU_ROWS:
        inv_tau = 1.0 / tl.load(tau_ptr + row).to(ACC)
        if HAS_CAP:
            post = post * inv_tau
        else:
            pre = pre * inv_tau
    return pre, post
