"""Per-token losses on log-probs: kl_penalty, ppo_policy_loss (every policy-loss variant), value_loss,
the rollout-correction helper rollout_is_weights, and `loss_terms_from_logprobs`, the one per-token
loss function the fused losses (logits and linear) call. Each op runs through one autograd Function
on either backend (fastppo.dispatch picks the Triton launcher or its PyTorch twin). Math:
fastppo.reference and docs/design.md §4.

Policy-loss variants (d = logp - old, r = exp(clamp(d, -20, 20)), A the advantage, n_b the valid
tokens of sequence b; each per-token L is multiplied by the rollout IS weight when given, then
aggregated by `agg`):
    ppo         L = max(-A min(r, ratio_max), -A clamp(r, 1 - cl, 1 + ch)); dual clip c: A < 0 ->
                min(L, -c A)                                   (PPO; dual-clip PPO; INTELLECT-2's delta)
    gspo        s_b = exp(min(mean_b(d), 10)), L = max(-A s_b, -A clamp(s_b, 1 - cl, 1 + ch)), the
                gradient flows through the sequence mean (GSPO, arXiv 2507.18071)
    gspo_token  log s_bt = min(logp - sg(logp) + sg(mean_b(d)), 10) per token: gradient s_b dlogp, 0 where
                the mean log-ratio exceeds 10 (verl's `gspo`, clamped per token as verl does)
    cispo       L = -sg(clamp(r, 1 - cl, 1 + ch)) A logp      (MiniMax-M1, arXiv 2506.13585)
    sapo        L = -(4 / tau) sigmoid(tau (r - 1)) A, tau = sapo_tau_pos if A > 0 else sapo_tau_neg
                                                               (SAPO, arXiv 2511.20347)
    gmpo        per sequence: L_b = -mean_b(A) exp(mean_b(sgn(A) min(sgn(A) d, sgn(A) clamp(d, -cl, ch)))),
                means over n_b + 1e-8, counted for each valid token (verl `geo_mean`, arXiv 2507.20673);
                rollout IS weights enter as their geometric mean over the sequence
    gpg         L = -A logp                                    (GPG, arXiv 2504.02546)
entropy_quantile = rho keeps in the policy term only the valid tokens whose entropy is >= the
(1 - rho) quantile of the valid tokens' entropies (TRL's top_entropy_quantile); the aggregation's
counts stay those of the mask.
Launches per call (Triton): 4 for every variant, 5 for gspo (kernels/loss_agg.py), whatever B and T;
entropy_quantile adds torch's nanquantile (a sort) on the device, no host sync.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_choice, check_float, check_mask, check_number, check_same_shape
from .backend import backend_for
from .dispatch import ops
from .kernels.loss_agg import STATS, AggResult
from .library import encode
from .modes import IS_LEVELS, IS_MODES, KL_KINDS
from .options import LossOptions

POLICY_STATS = ("clipfrac", "clipfrac_lower", "approx_kl", "ratio_mean", "ratio_max")


def stats_dict(buf: torch.Tensor, names) -> dict[str, torch.Tensor]:
    """Views of a stats buffer (kernels.loss_agg.STATS layout) by name: pairs (public name, STATS name)."""
    return {out: buf[STATS.index(src)] for out, src in names}


def policy_stat_names(opts: LossOptions):
    names = [(k, k) for k in POLICY_STATS]
    if opts.entropy_quantile is not None:
        names.append(("entropy_kept_frac", "entropy_kept_frac"))
    return names


# ----------------------------------------------------------------------------- checks
def check_token_args(name, shape, old, adv, mask, old_name="old_logprobs", adv_name="advantages"):
    """Shapes of the per-token arguments: `name` has `shape` [B, T] (or [T]); old, mask the same;
    adv [B, T] or per sequence [B]; mask bool or 0/1."""
    shape = tuple(shape)
    if len(shape) not in (1, 2):
        raise ValueError(f"{name} must be [B, T] or [T], got shape {shape}")
    check_float(old_name, old)
    check_float(adv_name, adv)
    check_same_shape(old_name, old, name, shape)
    check_same_shape("mask", mask, name, shape)
    check_mask(mask)
    if tuple(adv.shape) != shape and not (len(shape) == 2 and tuple(adv.shape) == (shape[0],)):
        raise ValueError(f"{adv_name} must be {shape} (per token) or ({shape[0]},) (per "
                         f"sequence), got {tuple(adv.shape)}")


def check_optional(name, x, like_name, shape):
    if x is not None:
        check_float(name, x)
        check_same_shape(name, x, like_name, shape)


def check_policy_tensors(name, shape, old, adv, mask, opts, *, rollout_is_weights=None, entropy=None,
                         entropy_name="entropy"):
    check_token_args(name, shape, old, adv, mask)
    check_optional("rollout_is_weights", rollout_is_weights, name, shape)
    if opts.entropy_quantile is not None and entropy is None:
        raise ValueError(f"entropy_quantile={opts.entropy_quantile} needs the per-token {entropy_name}")


# ----------------------------------------------------------------------------- kl_penalty
def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL estimator between the policy and the reference, with d = logp - ref_logp:
    `k1` d; `abs` |d|; `k2`/`mse` d^2/2; `k3` exp(-d) - 1 + d; `low_var_kl` k3 with d clamped to
    [-20, 20] and the result to [-10, 10] (verl). float32 (float64 for float64 inputs),
    differentiable in both arguments, twice included (double backward is autograd's of the formula)."""
    check_float("logprobs", logprobs)
    check_float("ref_logprobs", ref_logprobs)
    check_same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs.shape)
    check_choice("kind", kind, KL_KINDS)
    return torch.ops.fastppo.kl_penalty(logprobs, ref_logprobs, kind, backend_for(logprobs, ref_logprobs))[0]


# ----------------------------------------------------------------------------- the per-token loss function
def entropy_threshold(entropy, mask, quantile):
    """The (1 - quantile) quantile of the valid tokens' entropies (linear interpolation, as
    torch.quantile), on the device; NaN when no token is valid (then no token is kept)."""
    if quantile is None:
        return None
    acc = torch.float64 if entropy.dtype == torch.float64 else torch.float32
    h = torch.where(mask.reshape(entropy.shape) != 0, entropy.to(acc), torch.full_like(entropy, math.nan, dtype=acc))
    if h.numel() == 0:
        return torch.full((), math.nan, dtype=acc, device=entropy.device)
    return torch.nanquantile(h.reshape(-1), 1.0 - quantile)


def loss_terms_from_logprobs(logp, ent, old, adv, mask, *, opts: LossOptions, backend: str, ref=None,
                             rollout_is_weights=None, ent_threshold=None) -> AggResult:
    """The per-token loss function of the fused losses: policy term of `opts.policy_loss` + kl_coef KL
    - entropy_coef H, aggregated by opts.agg (global counts opts.num_tokens / num_seqs / horizon), from
    per-token log-probs. No autograd: returns AggResult(loss, stats, coef, coef_ent, kl) where
    dloss/dlogp = coef and dloss/dH = coef_ent ([B, T], fp32 or fp64), so the caller's backward
    multiplies them by the upstream gradient and chains through its own log-prob op.

    logp, ent (or None), old, mask, ref (or None), rollout_is_weights (or None): [B, T] or [T];
    adv [B, T] or [B]; all detached. A caller that splits the rows into chunks (the linear path)
    passes the whole batch's counts in opts and, with entropy_quantile, the whole batch's
    `ent_threshold` (entropy_threshold(...)); otherwise it is computed from these rows."""
    if ent_threshold is None and opts.entropy_quantile is not None:
        ent_threshold = entropy_threshold(ent, mask, opts.entropy_quantile)
    return ops("loss_agg", backend).policy_loss_agg(logp, old, adv, mask, opts=opts, ref=ref, ent=ent,
                                                    rollout_is_weights=rollout_is_weights,
                                                    ent_threshold=ent_threshold)


# ----------------------------------------------------------------------------- policy / value
def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, dual_clip=None,
                    agg="token-mean", num_tokens=None, num_seqs=None, horizon=None, policy_loss="ppo",
                    ratio_max=None, sapo_tau_pos=1.0, sapo_tau_neg=1.05, rollout_is_weights=None,
                    entropy_quantile=None, entropy=None):
    """Policy-gradient loss `policy_loss` (ppo, gspo, gspo_token, cispo, sapo, gmpo, gpg; formulas in
    this module's docstring), aggregated. For ppo, per token with ratio = exp(clamp(logp - old, -20, 20)):
        L = max(-A min(ratio, ratio_max), -A clamp(ratio, 1 - clip_low, 1 + clip_high))
    and with dual_clip c > 1, where A < 0: L = min(L, -c A).
    logprobs, old_logprobs, mask: [B, T] (or [T]); advantages [B, T] or per sequence [B];
    rollout_is_weights [B, T] (detached, multiplied into L; see `rollout_is_weights`); entropy [B, T]
    (needed by entropy_quantile only). agg: token-mean | seq-mean-token-mean | seq-mean-token-sum |
    seq-mean-token-sum-norm | token-sum; the global counts num_tokens / num_seqs / horizon make
    micro-batch losses sum to the batch loss. Returns (loss, stats) with stats clipfrac,
    clipfrac_lower, approx_kl (mean d^2/2), ratio_mean, ratio_max over mask-1 tokens (the variant's
    importance ratio; + entropy_kept_frac with entropy_quantile), 0-d tensors, no host sync."""
    opts = LossOptions.policy(policy_loss=policy_loss, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                              ratio_max=ratio_max, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg,
                              entropy_quantile=entropy_quantile, agg=agg, num_tokens=num_tokens,
                              num_seqs=num_seqs, horizon=horizon)
    check_float("logprobs", logprobs)
    check_policy_tensors("logprobs", logprobs.shape, old_logprobs, advantages, mask, opts,
                         rollout_is_weights=rollout_is_weights, entropy=entropy)
    check_optional("entropy", entropy, "logprobs", logprobs.shape)
    backend = backend_for(logprobs, old_logprobs, advantages, mask)
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    loss, buf, _ = torch.ops.fastppo.ppo_policy_loss(logprobs, old_logprobs.detach(), advantages.detach(), mask,
                                                     detach(entropy), detach(rollout_is_weights), encode(opts), backend)
    return loss, stats_dict(buf, policy_stat_names(opts))


def value_loss(values, old_values, returns, mask, *, clip=None, agg="token-mean", num_tokens=None,
               num_seqs=None, horizon=None):
    """Critic loss 0.5 (v - R)^2, or with clip: 0.5 max((v - R)^2, (v_c - R)^2) where
    v_c = old + clamp(v - old, -clip, clip). Same shapes and aggregation as ppo_policy_loss
    (returns [B, T]). The gradient is torch.maximum's (verl's compute_value_loss): a value inside
    the clip range keeps its gradient v - R on rounding ties. Returns (loss, {"vf_clipfrac"})."""
    opts = LossOptions.value(clip=clip, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon)
    check_float("values", values)
    check_token_args("values", values.shape, old_values, returns, mask, old_name="old_values", adv_name="returns")
    check_same_shape("returns", returns, "values", values.shape)
    backend = backend_for(values, old_values, returns, mask)
    loss, buf, _ = torch.ops.fastppo.value_loss(values, old_values.detach(), returns.detach(), mask, encode(opts),
                                                backend)
    return loss, stats_dict(buf, [("vf_clipfrac", "clipfrac")])


# ----------------------------------------------------------------------------- rollout correction
def rollout_is_weights(old_logprobs, rollout_logprobs, mask, *, level="token", mode="truncate", max=2.0,
                       min=None):
    """Importance-sampling weights that correct for the rollout engine's sampling distribution
    (TRL's vllm_importance_sampling_mode = f"{level}_{mode}"), to pass as `rollout_is_weights=`:

        diff_t = old_t - rollout_t on mask-1 tokens (0 elsewhere, NaN -> 0);  level="sequence": the
        sequence's sum of diff_t for every token;  ratio = exp(diff)
        mode="truncate": w = clamp(ratio, min, max)     mode="mask": w = ratio, 0 where outside [min, max]

    old_logprobs, rollout_logprobs, mask: [B, T]. Returns (weights [B, T] float32 (fp64 for fp64), 0 at
    mask-0 positions; stats {"is_mean", "is_min", "is_max", "is_clipped_frac" | "is_masked_frac"} over the
    valid tokens (token level) or the non-empty sequences (sequence level), 0-d tensors, no host sync)."""
    check_float("old_logprobs", old_logprobs)
    check_float("rollout_logprobs", rollout_logprobs)
    check_same_shape("rollout_logprobs", rollout_logprobs, "old_logprobs", old_logprobs.shape)
    check_same_shape("mask", mask, "old_logprobs", old_logprobs.shape)
    check_mask(mask)
    if old_logprobs.dim() != 2:
        raise ValueError(f"old_logprobs must be [B, T], got shape {tuple(old_logprobs.shape)}")
    check_choice("level", level, IS_LEVELS)
    check_choice("mode", mode, IS_MODES)
    max, min = (check_number(name, v, low=0.0, allow_none=True, allow_inf=True) for name, v in (("max", max),
                                                                                                 ("min", min)))
    if max is None and min is None:
        raise ValueError("rollout_is_weights needs max and/or min")
    if max is not None and min is not None and min > max:
        raise ValueError(f"min ({min}) must be <= max ({max})")
    weights, stats = torch.ops.fastppo.rollout_is_weights(old_logprobs.detach(), rollout_logprobs.detach(), mask,
                                                          level, mode, None if max is None else float(max),
                                                          None if min is None else float(min))
    frac = "is_clipped_frac" if mode == "truncate" else "is_masked_frac"
    return weights, dict(zip(("is_mean", "is_min", "is_max", frac), stats.unbind()))


def rollout_is_weights_torch(old_logprobs, rollout_logprobs, mask, level, mode, max, min):
    """The body of torch.ops.fastppo.rollout_is_weights: (weights, stats [4]: mean, min, max, fraction
    clipped / masked)."""
    acc = torch.float64 if old_logprobs.dtype == torch.float64 else torch.float32
    m = mask != 0
    old, roll = old_logprobs.to(acc), rollout_logprobs.to(acc)
    diff = torch.nan_to_num(torch.where(m, old - roll, torch.zeros_like(old)), nan=0.0)
    if level == "sequence":
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    lo = -math.inf if min is None else float(min)
    hi = math.inf if max is None else float(max)
    outside = (ratio < lo) | (ratio > hi)
    w = ratio.clamp(min=min, max=max) if mode == "truncate" else ratio.masked_fill(outside, 0.0)
    if level == "sequence":
        valid = m.any(-1, keepdim=True)
    else:
        valid = m
    n = valid.sum().clamp_min(1).to(acc)
    zero = torch.zeros_like(w)
    has = valid.any()
    stats = {
        "is_mean": torch.where(valid, w, zero).sum() / n,
        "is_min": torch.where(has, torch.where(valid, w, torch.full_like(w, math.inf)).amin(), zero.sum()),
        "is_max": torch.where(has, torch.where(valid, w, torch.full_like(w, -math.inf)).amax(), zero.sum()),
        ("is_clipped_frac" if mode == "truncate" else "is_masked_frac"): (valid & outside).sum().to(acc) / n,
    }
    weights = torch.where(m, w.expand_as(old), torch.zeros_like(old))
    return weights, torch.stack(list(stats.values()))
