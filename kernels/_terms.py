"""Per-token loss terms as @triton.jit helpers, shared by the loss kernels (DESIGN.md section 4).

Each returns the value and its derivative with respect to the first argument, elementwise, in
the dtype of its inputs (fp32, or fp64 for float64 checks). Kinds and modes are constexpr
integers (see KL_KIND_IDS / AGG_IDS)."""

import triton
import triton.language as tl

KL_KIND_IDS = {"k1": 1, "abs": 2, "k2": 3, "mse": 3, "k3": 4, "low_var_kl": 5}
AGG_IDS = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum": 2, "seq-mean-token-sum-norm": 3}


@triton.jit
def kl_terms(logp, ref, KIND: tl.constexpr):
    """d = logp - ref. k1: d (1); abs: |d| (sign d); k2: d^2/2 (d); k3: exp(-d) - 1 + d (1 - exp(-d));
    low_var_kl: k3 of clamp(d, -20, 20) clamped to [-10, 10] (0 outside either clamp)."""
    d = logp - ref
    if KIND == 1:
        kl = d
        dkl = tl.full(d.shape, 1.0, d.dtype)
    elif KIND == 2:
        kl = tl.abs(d)
        dkl = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    elif KIND == 3:
        kl = 0.5 * d * d
        dkl = d
    elif KIND == 4:
        e = tl.exp(-d)
        kl = e - 1.0 + d
        dkl = 1.0 - e
    else:
        inside = (d >= -20.0) & (d <= 20.0)
        dc = tl.minimum(tl.maximum(d, -20.0), 20.0)
        e = tl.exp(-dc)
        k = e - 1.0 + dc
        kl = tl.minimum(tl.maximum(k, -10.0), 10.0)
        dkl = tl.where(inside & (k >= -10.0) & (k <= 10.0), 1.0 - e, 0.0)
    return kl, dkl


@triton.jit
def policy_terms(logp, old, adv, clip_low, clip_high, dual_clip, HAS_DUAL: tl.constexpr):
    """ratio = exp(clamp(logp - old, -20, 20)); L = max(-A r, -A clamp(r, 1 - cl, 1 + ch));
    dual clip: where A < 0, L = min(L, -c A). dL/dlogp = -A r on the active unclipped branch, else 0.
    Returns (L, dL, ratio, clipped, lower, d)."""
    d = logp - old
    inside = (d >= -20.0) & (d <= 20.0)
    ratio = tl.exp(tl.minimum(tl.maximum(d, -20.0), 20.0))
    l1 = -adv * ratio
    l2 = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    loss = tl.maximum(l1, l2)
    clipped = l2 > l1
    dloss = tl.where(clipped | ~inside, 0.0, -adv * ratio)
    lower = tl.zeros(d.shape, tl.int1)
    if HAS_DUAL:
        l3 = -adv * dual_clip
        lower = (adv < 0) & (l3 < loss)
        loss = tl.where(lower, l3, loss)
        dloss = tl.where(lower, 0.0, dloss)
    return loss, dloss, ratio, clipped, lower, d


@triton.jit
def value_terms(v, old, ret, clip, HAS_CLIP: tl.constexpr):
    """L = 0.5 max((v - R)^2, (v_c - R)^2), v_c = old + clamp(v - old, -clip, clip); dL/dv = v - R
    where the unclipped branch is active, else 0. Returns (L, dL, clipped)."""
    l1 = (v - ret) * (v - ret)
    if HAS_CLIP:
        vc = old + tl.minimum(tl.maximum(v - old, -clip), clip)
        l2 = (vc - ret) * (vc - ret)
        clipped = l2 > l1
        loss = 0.5 * tl.maximum(l1, l2)
    else:
        clipped = tl.zeros(l1.shape, tl.int1)
        loss = 0.5 * l1
    dloss = tl.where(clipped, 0.0, v - ret)
    return loss, dloss, clipped
