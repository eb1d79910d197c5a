"""Per-token loss terms as @triton.jit helpers, shared by the loss kernels (docs/design.md §4).

Each returns the value and its derivative with respect to the first argument, elementwise, in
the dtype of its inputs (fp32, or fp64 for float64 checks). Kinds and modes are constexpr
integers (see fastppo.modes).

NaN propagates exactly as in PyTorch: every clamp / max / min here is a `where` select that keeps
a NaN operand (tl.maximum / tl.minimum would drop it), and a branch chosen by a comparison
picks the gradient torch.maximum's backward gives (ties split the gradient in half)."""

import triton
import triton.language as tl


@triton.jit
def is_nan(x):
    return x != x


@triton.jit
def clamp_nan(x, lo, hi):
    """torch.clamp(x, lo, hi): NaN stays NaN."""
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def max_nan(a, b):
    """torch.maximum(a, b): NaN if either is NaN."""
    return tl.where(is_nan(a) | is_nan(b), a + b, tl.where(b > a, b, a))


@triton.jit
def min_nan(a, b):
    """torch.minimum(a, b): NaN if either is NaN."""
    return tl.where(is_nan(a) | is_nan(b), a + b, tl.where(b < a, b, a))


@triton.jit
def max_grad(a, b, da, db):
    """Gradient of torch.maximum(a, b) given the operands' gradients (ties: half each)."""
    return tl.where(a > b, da, tl.where(b > a, db, tl.where(a == b, 0.5 * (da + db), da + db)))


@triton.jit
def min_grad(a, b, da, db):
    """Gradient of torch.minimum(a, b) given the operands' gradients (ties: half each)."""
    return max_grad(b, a, da, db)


@triton.jit
def clip_grad(x, lo, hi):
    """d clamp(x, lo, hi) / dx as torch gives it: 1 on [lo, hi] (bounds included), else 0 (NaN: 0)."""
    return tl.where((x >= lo) & (x <= hi), 1.0, 0.0)


@triton.jit
def kl_terms(logp, ref, KIND: tl.constexpr):
    """d = logp - ref. k1: d (1); abs: |d| (sign d); k2: d^2/2 (d); k3: exp(-d) - 1 + d (1 - exp(-d));
    low_var_kl: k3 of clamp(d, -20, 20) clamped to [-10, 10] (0 outside either clamp)."""
    d = logp - ref
    if KIND == 1:
        kl = d
        dkl = tl.full(d.shape, 1.0, d.dtype)          # autograd of d: 1 even where d is NaN
    elif KIND == 2:
        kl = tl.abs(d)
        dkl = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))   # torch's abs backward: sgn(NaN) = 0
    elif KIND == 3:
        kl = 0.5 * d * d
        dkl = d
    elif KIND == 4:
        e = tl.exp(-d)
        kl = e - 1.0 + d
        dkl = 1.0 - e
    else:
        inside = (d >= -20.0) & (d <= 20.0)
        dc = clamp_nan(d, -20.0, 20.0)
        e = tl.exp(-dc)
        k = e - 1.0 + dc
        kl = clamp_nan(k, -10.0, 10.0)
        dkl = tl.where(inside & (k >= -10.0) & (k <= 10.0), 1.0 - e, 0.0)
    return kl, dkl


@triton.jit
def policy_terms(logp, old, adv, clip_low, clip_high, dual_clip, HAS_DUAL: tl.constexpr):
    """ratio = exp(clamp(logp - old, -20, 20)); L = max(-A r, -A clamp(r, 1 - cl, 1 + ch));
    dual clip: where A < 0, L = min(L, -c A). dL/dlogp = -A r on the active unclipped branch, else 0.
    Returns (L, dL, ratio, clipped, lower, d)."""
    d = logp - old
    inside = (d >= -20.0) & (d <= 20.0)
    ratio = tl.exp(clamp_nan(d, -20.0, 20.0))
    l1 = -adv * ratio
    l2 = -adv * clamp_nan(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = max_nan(l1, l2)
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
    """L = 0.5 max((v - R)^2, (v_c - R)^2), v_c = old + clamp(v - old, -clip, clip).
    dL/dv is the gradient torch.maximum gives: (v - R) where the unclipped error is larger,
    (v_c - R) [|v - old| <= clip] where the clipped one is, their mean on a tie (so a value inside
    the clip range always gets its full gradient, whichever branch rounding favours).
    Returns (L, dL, clipped)."""
    e1 = v - ret
    l1 = e1 * e1
    if HAS_CLIP:
        dv = v - old
        vc = old + clamp_nan(dv, -clip, clip)
        e2 = vc - ret
        l2 = e2 * e2
        clipped = l2 > l1
        loss = 0.5 * max_nan(l1, l2)
        dloss = max_grad(l1, l2, e1, tl.where((dv >= -clip) & (dv <= clip), e2, 0.0))
    else:
        clipped = tl.zeros(l1.shape, tl.int1)
        loss = 0.5 * l1
        dloss = e1
    return loss, dloss, clipped


# ----------------------------------------------------------------------------- policy-loss variants
# POLICY ids follow fastppo.modes.POLICY_LOSSES: 0 ppo, 1 gspo, 2 gspo_token, 3 cispo, 4 sapo, 5 gmpo, 6 gpg.
@triton.jit
def ppo_terms(logp, old, adv, clip_low, clip_high, dual_clip, ratio_max, HAS_DUAL: tl.constexpr,
              HAS_RMAX: tl.constexpr):
    """ppo: r = exp(clamp(d, -20, 20)), d = logp - old; r1 = min(r, ratio_max) (the two-sided cap);
    L = max(-A r1, -A clamp(r, 1 - cl, 1 + ch)); dual clip: where A < 0, L = min(L, -c A).
    Returns (L, dL/dlogp, ratio, clipped, lower)."""
    d = logp - old
    inside = (d >= -20.0) & (d <= 20.0)
    ratio = tl.exp(clamp_nan(d, -20.0, 20.0))
    dratio = tl.where(inside, ratio, 0.0)
    r1 = ratio
    dr1 = dratio
    if HAS_RMAX:
        r1 = min_nan(ratio, ratio_max)
        dr1 = tl.where(ratio <= ratio_max, dratio, 0.0)
    l1 = -adv * r1
    l2 = -adv * clamp_nan(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = max_nan(l1, l2)
    dloss = max_grad(l1, l2, -adv * dr1, -adv * dratio * clip_grad(ratio, 1.0 - clip_low, 1.0 + clip_high))
    clipped = l2 > l1
    lower = tl.zeros(d.shape, tl.int1)
    if HAS_DUAL:
        l3 = -adv * dual_clip
        lower = (adv < 0) & (loss > l3)
        dloss = tl.where(adv < 0, min_grad(loss, l3, dloss, 0.0), dloss)
        loss = tl.where(adv < 0, min_nan(loss, l3), loss)
    return loss, tl.where(inside, dloss, 0.0), ratio, clipped, lower


@triton.jit
def clipped_ratio_terms(ratio, dratio, adv, clip_low, clip_high):
    """L = max(-A s, -A clamp(s, 1 - cl, 1 + ch)) of a ratio s with ds/dlogp = dratio (GSPO).
    Returns (L, dL/ds * ds/dlogp, dL/ds, clipped)."""
    l1 = -adv * ratio
    l2 = -adv * clamp_nan(ratio, 1.0 - clip_low, 1.0 + clip_high)
    dl_ds = max_grad(l1, l2, -adv, -adv * clip_grad(ratio, 1.0 - clip_low, 1.0 + clip_high))
    return max_nan(l1, l2), dl_ds * dratio, dl_ds, l2 > l1


@triton.jit
def cispo_terms(logp, old, adv, clip_low, clip_high):
    """cispo: L = -sg(clamp(r, 1 - cl, 1 + ch)) A logp, dL/dlogp = -clamp(r) A; clipped where the clamp acts."""
    ratio = tl.exp(clamp_nan(logp - old, -20.0, 20.0))
    c = clamp_nan(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clipped = (ratio < 1.0 - clip_low) | (ratio > 1.0 + clip_high)
    return -c * adv * logp, -c * adv, ratio, clipped


@triton.jit
def sapo_terms(logp, old, adv, tau_pos, tau_neg):
    """sapo: r = exp(clamp(d, -20, 20)), tau = tau_pos if A > 0 else tau_neg, g = sigmoid(tau (r - 1)),
    L = -(4 / tau) g A; dL/dlogp = -4 g (1 - g) r A (0 outside the clamp)."""
    d = logp - old
    ratio = tl.exp(clamp_nan(d, -20.0, 20.0))
    tau = tl.where(adv > 0, tau_pos, tau_neg).to(adv.dtype)   # float64 runs: 4 / tau in float64
    g = 1.0 / (1.0 + tl.exp(-tau * (ratio - 1.0)))
    loss = -(4.0 / tau) * g * adv
    dloss = tl.where((d >= -20.0) & (d <= 20.0), -4.0 * g * (1.0 - g) * ratio * adv, 0.0)
    return loss, dloss, ratio


@triton.jit
def gmpo_log_ratio(logp, old, adv, clip_low, clip_high):
    """gmpo's per-token clipped log-ratio sgn(A) min(sgn(A) d, sgn(A) clamp(d, -cl, ch)) (verl geo_mean)
    = min(d, ch) for A > 0, max(d, -cl) for A < 0, 0 for A = 0; returns (value, d value / d logp,
    clipped = d outside [-cl, ch], dead = the clamp acts on the active side: there autograd's gradient is an
    exact 0 whatever the upstream, NaN included). A NaN d keeps gradient 1 (torch.minimum passes NaN on)."""
    d = logp - old
    pos = adv > 0
    neg = adv < 0
    val = tl.where(pos, min_nan(d, clip_high), tl.where(neg, max_nan(d, -clip_low), tl.where(adv != adv, adv, 0.0)))
    dead = (pos & (d > clip_high)) | (neg & (d < -clip_low))
    grad = tl.where(pos | neg, tl.where(dead, 0.0, 1.0), 0.0)
    clipped = (d < -clip_low) | (d > clip_high)
    return val, grad, clipped, dead


# ----------------------------------------------------------------------------- verl 0.9.1's further losses
# POLICY ids 7 dppo_tv, 8 dppo_kl, 9 dro, 10 clip_cov, 11 kl_cov (fastppo.modes.POLICY_LOSSES).
@triton.jit
def dppo_terms(logp, old, adv, clip_low, clip_high, ratio_max, HAS_RMAX: tl.constexpr, BINARY_KL: tl.constexpr):
    """DPPO-Binary-TV / -KL (arXiv 2602.04879; verl compute_policy_loss_dppo_tv / _kl): r = exp(clamp(d, -20,
    20)), w = sg(min(r, ratio_max)), p = exp(logp), q = exp(old); valid for A > 0: p - q <= ch (TV) /
    bkl <= ch or p <= q (KL); else p - q >= -cl (TV) / bkl <= cl or p >= q (KL), with bkl = q (old - logp)
    + (1 - q) log((1 - q + 1e-8) / (1 - p + 1e-8)); L = -A w logp valid, dL/dlogp = -A w valid (a
    multiply, as verl: NaN / inf stay). Returns (L, dL, ratio, clipped = not valid, lower = r > ratio_max
    and valid)."""
    ratio = tl.exp(clamp_nan(logp - old, -20.0, 20.0))
    w = ratio
    if HAS_RMAX:
        w = min_nan(ratio, ratio_max)
    p = tl.exp(logp)
    q = tl.exp(old)
    if BINARY_KL:
        bkl = q * (old - logp) + (1.0 - q) * tl.log((1.0 - q + 1e-8) / (1.0 - p + 1e-8))
        v_pos = (bkl <= clip_high) | (p <= q)
        v_neg = (bkl <= clip_low) | (p >= q)
    else:
        v_pos = (p - q) <= clip_high
        v_neg = (p - q) >= -clip_low
    valid = tl.where(adv > 0, v_pos, v_neg)
    vf = tl.where(valid, 1.0, 0.0)
    lower = tl.zeros(valid.shape, tl.int1)
    if HAS_RMAX:
        lower = (ratio > ratio_max) & valid
    return -adv * w * logp * vf, -adv * w * vf, ratio, ~valid, lower


@triton.jit
def dro_terms(logp, old, adv, beta):
    """DRO (verl compute_policy_loss_dro): L = -(logp A - beta / 2 (logp - old)^2), dL/dlogp = -(A - beta d).
    Returns (L, dL, ratio = exp(clamp(d, -20, 20)) for the stats)."""
    d = logp - old
    return -(logp * adv - 0.5 * beta * d * d), -(adv - beta * d), tl.exp(clamp_nan(d, -20.0, 20.0))


@triton.jit
def cov_terms(logp, old, adv, sel, clip_low, clip_high, kl_cov_coef, KL_COV: tl.constexpr):
    """Clip-Cov / KL-Cov (arXiv 2505.22617; verl compute_policy_loss_clip_cov / _kl_cov), r = exp(d)
    unclamped as verl, `sel` the batch-global selection (fastppo.losses.cov_selection).
    clip_cov: L = max(-A r, -A clamp(r, 1 - cl, 1 + ch)) (1 - sel) (a multiply, as verl's `* corr`);
    kl_cov:   L = -A r, + kl_cov_coef |d| where sel. Returns (L, dL/dlogp, ratio, clipped = sel)."""
    d = logp - old
    ratio = tl.exp(d)
    if KL_COV:
        loss = -adv * ratio + tl.where(sel, kl_cov_coef * tl.abs(d), 0.0)
        dloss = -adv * ratio + tl.where(sel, kl_cov_coef * tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)), 0.0)
    else:
        corr = tl.where(sel, 0.0, 1.0)
        l1 = -adv * ratio
        l2 = -adv * clamp_nan(ratio, 1.0 - clip_low, 1.0 + clip_high)
        loss = max_nan(l1, l2) * corr
        dloss = max_grad(l1, l2, -adv * ratio, -adv * ratio * clip_grad(ratio, 1.0 - clip_low, 1.0 + clip_high)) * corr
    return loss, dloss, ratio, sel
