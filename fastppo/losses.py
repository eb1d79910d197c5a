"""Per-token losses on log-probs: ppo_policy_loss (every policy-loss variant), value_loss,
the rollout-correction helper rollout_is_weights, and `loss_terms_from_logprobs`, the one per-token
loss function the fused losses (logits and linear) call. Each op is a torch.library op registered
here (fake and autograd beside its body) and runs on either backend (fastppo.dispatch picks the Triton
launcher or its PyTorch twin, fastppo.losses_torch). Math:
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
    dppo_tv     L = -A sg(min(r, ratio_max)) logp valid, valid = [p - q <= ch] if A > 0 else [p - q >= -cl],
                p = exp(logp), q = exp(old)            (DPPO-Binary-TV, arXiv 2602.04879; verl `dppo_tv`)
    dppo_kl     the same with valid = [bkl <= ch or p <= q] if A > 0 else [bkl <= cl or p >= q],
                bkl = q (old - logp) + (1 - q) log((1 - q + 1e-8) / (1 - p + 1e-8))   (verl `dppo_kl`)
    dro         L = -(A logp - dro_beta / 2 (logp - old)^2)   (Direct Reward Optimization; verl `dro`)
    clip_cov    L = max(-A e^d, -A clamp(e^d, 1 - cl, 1 + ch)) (1 - sel), sel: cov_selection
                                                               (Clip-Cov, arXiv 2505.22617; verl `clip_cov`)
    kl_cov      L = -A e^d + sel kl_cov_coef |d|, sel: cov_selection   (KL-Cov, same paper; verl `kl_cov`)
    vespo       L = -sg(phi) A logp, phi = e^lam w^k e^(-lam w), w = exp(clamp(sum_b clamp(d, -20, 20) + sum_b
                clamp(log isw, log 1e-8, 20), log 1e-8, 20)), (k, lam) = (vespo_k_pos, vespo_lambda_pos) for
                A >= 0 else the _neg pair; the IS weights enter phi only (VESPO; TRL 1.16 `vespo`, vespo_weights)
entropy_quantile = rho keeps in the policy term only the valid tokens whose entropy is >= the
(1 - rho) quantile of the valid tokens' entropies (TRL's top_entropy_quantile); off_policy_mask_threshold
keeps only tokens with A >= 0 or a sequence mean (old - logp) <= it (off_policy_keep, TRL's off-policy
sequence mask); the aggregation's counts stay those of the mask.
Launches per call (Triton): 4 for every variant, 5 for gspo (kernels/loss_agg.py), whatever B and T;
entropy_quantile adds torch's nanquantile (a sort) on the device, no host sync; clip_cov / kl_cov add
cov_selection's torch ops (kl_cov: a sort on the device, no host sync; clip_cov: verl's random draw, which
reads two counts on the host).
"""

from __future__ import annotations

import math

import torch

from . import losses_torch
from ._validation import check_choice, check_float, check_mask, check_number, check_same_shape
from .backend import backend_for
from .dispatch import ops
from .kernels.loss_layout import STATS, AggResult
from .library import acc_dtype, decode, define, encode
from .modes import IS_LEVELS, IS_MODES
from .options import LossOptions
from .packed import check_cu_seqlens, check_packed
from .policy_weights import cov_selection, entropy_token_mean, kl_sequence_correction, off_policy_keep, vespo_weights

POLICY_STATS = ("clipfrac", "clipfrac_lower", "approx_kl", "ratio_mean", "ratio_max")


def stats_dict(buf: torch.Tensor, names) -> dict[str, torch.Tensor]:
    """Views of a stats buffer (kernels.loss_layout.STATS layout) by name: pairs (public name, STATS name)."""
    return {out: buf[STATS.index(src)] for out, src in names}


def policy_stat_names(opts: LossOptions):
    names = [(k, k) for k in POLICY_STATS]
    if opts.entropy_quantile is not None:
        names.append(("entropy_kept_frac", "entropy_kept_frac"))
    return names


# ----------------------------------------------------------------------------- checks
def check_token_args(name, shape, old, adv, mask, old_name="old_logprobs", adv_name="advantages", cu_seqlens=None):
    """Shapes of the per-token arguments: `name` has `shape` [B, T] (or [T]); old, mask the same;
    adv [B, T] or per sequence [B]; mask bool or 0/1. With cu_seqlens ([S + 1]): shape is packed [total]
    and adv [total] or per sequence [S]."""
    shape = tuple(shape)
    if cu_seqlens is not None:
        if len(shape) != 1:
            raise ValueError(f"with cu_seqlens, {name} must be packed 1-D [total], got shape {shape}")
        S = check_cu_seqlens(cu_seqlens, shape[0], mask.device)
        check_float(old_name, old)
        check_float(adv_name, adv)
        check_same_shape(old_name, old, name, shape)
        check_same_shape("mask", mask, name, shape)
        check_mask(mask)
        if tuple(adv.shape) not in (shape, (S,)):
            raise ValueError(f"with cu_seqlens, {adv_name} must be {shape} (per token) or ({S},) (per "
                             f"sequence), got {tuple(adv.shape)}")
        return
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
                         entropy_name="entropy", cu_seqlens=None, off_policy_logprobs=None):
    check_token_args(name, shape, old, adv, mask, cu_seqlens=cu_seqlens)
    check_optional("rollout_is_weights", rollout_is_weights, name, shape)
    check_optional("off_policy_logprobs", off_policy_logprobs, name, shape)
    if off_policy_logprobs is not None and opts.off_policy_mask_threshold is None:
        raise ValueError("off_policy_logprobs is the behaviour log-probs of the off-policy mask: it needs "
                         "off_policy_mask_threshold")
    if opts.entropy_quantile is not None and entropy is None:
        raise ValueError(f"entropy_quantile={opts.entropy_quantile} needs the per-token {entropy_name}")


# ----------------------------------------------------------------------------- the per-token loss function
# ----------------------------------------------------------------------------- the fused losses' options and tensors
def fused_stat_names(opts: LossOptions, has_ref: bool, has_ent: bool):
    names = policy_stat_names(opts) + [("pg_loss", "pg_loss")]
    if has_ref:
        names.append(("kl", "kl"))
    if has_ent:
        names.append(("entropy", "entropy"))
    return names


def loss_options(*, policy_loss, clip_low, clip_high, dual_clip, ratio_max, sapo_tau_pos, sapo_tau_neg,
                 entropy_quantile, agg, kl_kind, kl_coef, entropy_coef, num_tokens, num_seqs, horizon, **variant):
    """The LossOptions of a fused loss call (fused_ppo_loss and fused_linear_ppo_loss share it); `variant`:
    the VARIANT_OPTIONS the caller was given."""
    return LossOptions.policy(policy_loss=policy_loss, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                              ratio_max=ratio_max, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg,
                              entropy_quantile=entropy_quantile, agg=agg, kl_kind=kl_kind, kl_coef=kl_coef,
                              entropy_coef=entropy_coef, num_tokens=num_tokens, num_seqs=num_seqs,
                              horizon=horizon, **variant)


# the options of verl's further policy losses, keywords of ppo_policy_loss and the fused losses (LossOptions)
VARIANT_OPTIONS = ("dro_beta", "cov_ratio", "cov_lb", "cov_ub", "kl_cov_coef", "kl_bias_correction",
                   "kl_bias_correction_level", "off_policy_mask_threshold", "vespo_k_pos", "vespo_lambda_pos",
                   "vespo_k_neg", "vespo_lambda_neg")


def check_fused_tensors(lead_shape, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights,
                        opts: LossOptions, cu_seqlens=None, off_policy_logprobs=None):
    check_policy_tensors("labels", lead_shape, old_logprobs, advantages, mask, opts,
                         rollout_is_weights=rollout_is_weights, entropy=True, cu_seqlens=cu_seqlens,
                         off_policy_logprobs=off_policy_logprobs)
    if ref_logprobs is not None:
        check_float("ref_logprobs", ref_logprobs)
        if tuple(ref_logprobs.shape) != tuple(lead_shape):
            raise ValueError(f"ref_logprobs shape {tuple(ref_logprobs.shape)} must equal {tuple(lead_shape)}")
    elif opts.kl_coef != 0:
        raise ValueError(f"kl_coef={opts.kl_coef} needs ref_logprobs")
    check_optional("rollout_is_weights", rollout_is_weights, "labels", lead_shape)


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
                             rollout_is_weights=None, ent_threshold=None, cu_seqlens=None,
                             off_policy_logprobs=None) -> AggResult:
    """The per-token loss function of the fused losses: policy term of `opts.policy_loss` + kl_coef KL
    - entropy_coef H, aggregated by opts.agg (global counts opts.num_tokens / num_seqs / horizon; the entropy
    term by its own token mean with opts.entropy_agg, policy_weights.entropy_token_mean), from per-token
    log-probs. No autograd: returns AggResult(loss, stats, coef, coef_ent, kl) where
    dloss/dlogp = coef and dloss/dH = coef_ent ([B, T], fp32 or fp64), so the caller's backward
    multiplies them by the upstream gradient and chains through its own log-prob op.

    logp, ent (or None), old, mask, ref (or None), rollout_is_weights (or None): [B, T] or [T];
    adv [B, T] or [B]; all detached. A caller that splits the rows into chunks (the linear path)
    passes the whole batch's counts in opts and, with entropy_quantile, the whole batch's
    `ent_threshold` (entropy_threshold(...)); otherwise it is computed from these rows. cu_seqlens
    ([S + 1] offsets): the per-token tensors are packed [total] (adv [total] or [S]), coef [1, total].
    off_policy_logprobs (or None: old): the behaviour log-probs the off-policy mask measures against."""
    if ent_threshold is None and opts.entropy_quantile is not None:
        ent_threshold = entropy_threshold(ent, mask, opts.entropy_quantile)
    select = cov_selection(logp, old, adv, mask, opts, cu_seqlens) if opts.cov_select else None
    if opts.policy_loss == "vespo":   # its weight phi multiplies gpg's terms as the IS weight would
        rollout_is_weights = vespo_weights(logp, old, adv, mask, rollout_is_weights, opts, cu_seqlens)
        if cu_seqlens is not None:
            rollout_is_weights = rollout_is_weights.reshape(-1)
    thr = opts.off_policy_mask_threshold
    behaviour = old if off_policy_logprobs is None else off_policy_logprobs
    keep = None if thr is None else off_policy_keep(logp, behaviour, adv, mask, thr, cu_seqlens)
    own_ent = opts.entropy_agg is not None and ent is not None   # the entropy term's own token-mean, added after
    seq_kl = opts.kl_sequence_correction and ref is not None     # the KL's sequence weight, put in after
    run = opts.replace(entropy_coef=0.0) if own_ent else opts
    run = run.replace(kl_bias_correction=False) if seq_kl else run
    res = ops("loss_agg", backend).policy_loss_agg(logp, old, adv, mask, opts=run, ref=ref, ent=ent,
                                                   rollout_is_weights=rollout_is_weights, ent_threshold=ent_threshold,
                                                   select=select, keep=keep, cu_seqlens=cu_seqlens)
    res = kl_sequence_correction(res, logp, old, ref, mask, opts, cu_seqlens) if seq_kl else res
    return entropy_token_mean(res, ent, mask, opts, ent_threshold) if own_ent else res


# ----------------------------------------------------------------------------- ops
def loss_options_of(options: str) -> LossOptions:
    """The LossOptions an op received as its encoded string (cached)."""
    return decode(LossOptions, options)


def agg_outputs_fake(x, mask):
    """loss, stats, coef: the aggregation's outputs (coef is [B, T]; [1, T] for a [T] mask)."""
    acc = acc_dtype(x)
    bt = tuple(mask.shape) if mask.dim() == 2 else (1, mask.shape[0])
    return x.new_empty((), dtype=acc), x.new_empty((len(STATS),), dtype=acc), x.new_empty(bt, dtype=acc)


def _ppo_policy_loss_fake(logprobs, old_logprobs, advantages, mask, entropy, rollout_is_weights, cu_seqlens, options,
                          backend, off_policy_logprobs=None):
    return agg_outputs_fake(logprobs, mask)


@define("ppo_policy_loss", _ppo_policy_loss_fake, kernels=True)
def ppo_policy_loss_op(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                       entropy: torch.Tensor | None, rollout_is_weights: torch.Tensor | None,
                       cu_seqlens: torch.Tensor | None, options: str, backend: str,
                       off_policy_logprobs: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, stats, dloss/dlogprobs) of the policy loss of `options` (a LossOptions); packed by cu_seqlens
    when given; off_policy_logprobs: the off-policy mask's behaviour log-probs (None: old_logprobs)."""
    res = loss_terms_from_logprobs(logprobs, entropy, old_logprobs, advantages, mask, opts=loss_options_of(options),
                                   backend=backend, rollout_is_weights=rollout_is_weights, cu_seqlens=cu_seqlens,
                                   off_policy_logprobs=off_policy_logprobs)
    return res.loss, res.stats, res.coef


def _value_loss_fake(values, old_values, returns, mask, cu_seqlens, options, backend):
    return agg_outputs_fake(values, mask)


@define("value_loss", _value_loss_fake, kernels=True)
def value_loss_op(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                  cu_seqlens: torch.Tensor | None, options: str,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, stats, dloss/dvalues) of the value loss of `options` (a LossOptions); packed by cu_seqlens when
    given."""
    res = ops("loss_agg", backend).value_loss_agg(values, old_values, returns, mask, opts=loss_options_of(options),
                                                  cu_seqlens=cu_seqlens)
    return res.loss, res.stats, res.coef


def _token_loss_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)   # outputs without a gradient get no zero-filled tensor
    loss, stats, coef = output
    ctx.mark_non_differentiable(stats, coef)
    k = next(i for i, x in enumerate(inputs) if isinstance(x, str))   # options, then backend, then more tensors
    ctx.save_for_backward(coef, *inputs[:k], *inputs[k + 2:])   # the tensor inputs: only read under create_graph
    ctx.x_meta = (inputs[0].shape, len(inputs), inputs[k])


def _coef_graph(options: str, x, *rest):
    """dloss/dx per token as differentiable torch ops of the inputs (the PyTorch backend's closed form, whose
    own derivative is the loss's second derivative)."""
    opts = loss_options_of(options)
    if opts.loss == "value":
        old, ret, mask, cu = rest
        return ops("loss_agg", "torch").value_loss_agg(x, old, ret, mask, opts=opts, cu_seqlens=cu).coef
    old, adv, mask, ent, isw, cu, behaviour = rest
    return loss_terms_from_logprobs(x, ent, old, adv, mask, opts=opts, backend="torch", rollout_is_weights=isw,
                                    cu_seqlens=cu, off_policy_logprobs=behaviour).coef


def _token_loss_backward(ctx, g_loss, _g_stats, _g_coef):
    shape, n, options = ctx.x_meta
    if g_loss is None:
        return (None,) * n
    coef, x, *rest = ctx.saved_tensors
    g = g_loss.to(coef.dtype)
    d = g * coef
    if torch.is_grad_enabled():   # create_graph: add the coefficient's own derivative (zero in value)
        c = _coef_graph(options, x.to(coef.dtype), *rest)
        d = d + g * (c - c.detach())
    return (d.view(shape), *([None] * (n - 1)))


for _op in (ppo_policy_loss_op, value_loss_op):
    _op.register_autograd(_token_loss_backward, setup_context=_token_loss_setup)


def _rollout_is_weights_fake(old_logprobs, rollout_logprobs, mask, level, mode, max, min, cu_seqlens=None):
    acc = acc_dtype(old_logprobs)
    return old_logprobs.new_empty(old_logprobs.shape, dtype=acc), old_logprobs.new_empty((4,), dtype=acc)


@define("rollout_is_weights", _rollout_is_weights_fake, kernels=False)
def rollout_is_weights_op(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, level: str,
                          mode: str, max: float | None, min: float | None,
                          cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, stats [is_mean, is_min, is_max, clipped / masked fraction]) of fastppo.rollout_is_weights."""
    w, stats = losses_torch.rollout_is_weights_torch(old_logprobs, rollout_logprobs, mask, level, mode, max, min,
                                                     cu_seqlens)
    return w.contiguous(), stats


# ----------------------------------------------------------------------------- policy / value
def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                    clip_low: float = 0.2, clip_high: float | None = None, dual_clip: float | None = None,
                    agg: str = "token-mean", num_tokens: float | None = None, num_seqs: float | None = None,
                    horizon: float | None = None, policy_loss: str = "ppo", ratio_max: float | None = None,
                    sapo_tau_pos: float = 1.0, sapo_tau_neg: float = 1.05,
                    rollout_is_weights: torch.Tensor | None = None, entropy_quantile: float | None = None,
                    entropy: torch.Tensor | None = None, dro_beta: float | None = None, cov_ratio: float = 0.0002,
                    cov_lb: float = 1.0, cov_ub: float = 5.0, kl_cov_coef: float = 0.1,
                    off_policy_mask_threshold: float | None = None, vespo_k_pos: float = 2.0,
                    vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0,
                    cu_seqlens: torch.Tensor | None = None, off_policy_logprobs: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy-gradient loss `policy_loss` (ppo, gspo, gspo_token, cispo, sapo, gmpo, gpg, dppo_tv, dppo_kl,
    dro, clip_cov, kl_cov, vespo; formulas in this module's docstring), aggregated. dro_beta: dro's penalty
    (required there); cov_ratio, cov_lb, cov_ub, kl_cov_coef: clip_cov / kl_cov's selection (cov_selection)
    and penalty, verl's defaults; ratio_max also truncates dppo's IS weight. off_policy_mask_threshold:
    the policy term keeps a token only where A >= 0 or its sequence's mean (old - logp) <= it (off_policy_keep;
    TRL's off-policy sequence mask); off_policy_logprobs (logprobs' shape, detached; needs the threshold): the
    behaviour log-probs the mask measures against instead of old_logprobs (TRL's sampling_per_token_logps
    from vLLM: mean (off_policy_logprobs - logp)). vespo_k_pos / _lambda_pos / _k_neg / _lambda_neg: VESPO's gamma
    weight (vespo_weights; TRL's defaults).
    For ppo, per token with ratio = exp(clamp(logp - old, -20, 20)):
        L = max(-A min(ratio, ratio_max), -A clamp(ratio, 1 - clip_low, 1 + clip_high))
    and with dual_clip c > 1, where A < 0: L = min(L, -c A).
    logprobs, old_logprobs, mask: [B, T] (or [T]); advantages [B, T] or per sequence [B];
    rollout_is_weights [B, T] (detached, multiplied into L; see `rollout_is_weights`); entropy [B, T]
    (needed by entropy_quantile only). agg: token-mean | seq-mean-token-mean | seq-mean-token-sum |
    seq-mean-token-sum-norm | token-sum; the global counts num_tokens / num_seqs / horizon make
    micro-batch losses sum to the batch loss. cu_seqlens (int32/int64 [S + 1] offsets, flash-attention's
    convention): packed sequences, the per-token tensors 1-D [total] (advantages [total] or [S]); every
    result and gradient equals that of the same sequences padded to [S, max length] (horizon's default is
    the longest sequence). Returns (loss, stats) with stats clipfrac,
    clipfrac_lower, approx_kl (mean d^2/2), ratio_mean, ratio_max over mask-1 tokens (the variant's
    importance ratio; + entropy_kept_frac with entropy_quantile), 0-d tensors, no host sync (except
    clip_cov's random draw). clipfrac is dppo's invalid-token fraction (clipfrac_lower: truncated and valid)
    and clip_cov / kl_cov's selected fraction."""
    opts = LossOptions.policy(policy_loss=policy_loss, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                              ratio_max=ratio_max, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg,
                              entropy_quantile=entropy_quantile, agg=agg, num_tokens=num_tokens,
                              num_seqs=num_seqs, horizon=horizon, dro_beta=dro_beta, cov_ratio=cov_ratio,
                              cov_lb=cov_lb, cov_ub=cov_ub, kl_cov_coef=kl_cov_coef,
                              off_policy_mask_threshold=off_policy_mask_threshold, vespo_k_pos=vespo_k_pos,
                              vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
                              vespo_lambda_neg=vespo_lambda_neg)
    check_float("logprobs", logprobs)
    check_policy_tensors("logprobs", logprobs.shape, old_logprobs, advantages, mask, opts,
                         rollout_is_weights=rollout_is_weights, entropy=entropy, cu_seqlens=cu_seqlens,
                         off_policy_logprobs=off_policy_logprobs)
    check_optional("entropy", entropy, "logprobs", logprobs.shape)
    backend = backend_for(logprobs, old_logprobs, advantages, mask, cu_seqlens)
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    loss, buf, _ = torch.ops.fastppo.ppo_policy_loss(logprobs, old_logprobs.detach(), advantages.detach(), mask,
                                                     detach(entropy), detach(rollout_is_weights), cu_seqlens,
                                                     encode(opts), backend, detach(off_policy_logprobs))
    return loss, stats_dict(buf, policy_stat_names(opts))


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
               clip: float | None = None, agg: str = "token-mean", num_tokens: float | None = None,
               num_seqs: float | None = None,
               horizon: float | None = None,
               cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Critic loss 0.5 (v - R)^2, or with clip: 0.5 max((v - R)^2, (v_c - R)^2) where
    v_c = old + clamp(v - old, -clip, clip). Same shapes and aggregation as ppo_policy_loss
    (returns [B, T]; packed [total] with cu_seqlens).
    The gradient is torch.maximum's (verl's compute_value_loss): a value inside
    the clip range keeps its gradient v - R on rounding ties. Returns (loss, {"vf_clipfrac"})."""
    opts = LossOptions.value(clip=clip, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon)
    check_float("values", values)
    check_token_args("values", values.shape, old_values, returns, mask, old_name="old_values", adv_name="returns",
                     cu_seqlens=cu_seqlens)
    check_same_shape("returns", returns, "values", values.shape)
    backend = backend_for(values, old_values, returns, mask, cu_seqlens)
    loss, buf, _ = torch.ops.fastppo.value_loss(values, old_values.detach(), returns.detach(), mask, cu_seqlens,
                                                encode(opts), backend)
    return loss, stats_dict(buf, [("vf_clipfrac", "clipfrac")])


# ----------------------------------------------------------------------------- rollout correction
def rollout_is_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, *,
                       level: str = "token", mode: str = "truncate", max: float | None = 2.0,
                       min: float | None = None,
                       cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance-sampling weights that correct for the rollout engine's sampling distribution
    (TRL's vllm_importance_sampling_mode = f"{level}_{mode}"), to pass as `rollout_is_weights=`:

        diff_t = old_t - rollout_t on mask-1 tokens (0 elsewhere, NaN -> 0);  level="sequence": the
        sequence's sum of diff_t for every token;  ratio = exp(diff)
        mode="truncate": w = clamp(ratio, min, max)     mode="mask": w = ratio, 0 where outside [min, max]

    old_logprobs, rollout_logprobs, mask: [B, T]; or packed 1-D [total] with cu_seqlens (int32/int64 [S + 1]
    offsets, sequence s is tokens [cu[s], cu[s + 1])), every result that of the same sequences padded.
    Returns (weights [B, T] ([total]) float32 (fp64 for fp64), 0 at mask-0 positions; stats {"is_mean",
    "is_min", "is_max", "is_clipped_frac" | "is_masked_frac"} over the valid tokens (token level) or the
    non-empty sequences (sequence level), 0-d tensors, no host sync). No gradient (inputs read detached)."""
    check_float("old_logprobs", old_logprobs)
    check_float("rollout_logprobs", rollout_logprobs)
    check_same_shape("rollout_logprobs", rollout_logprobs, "old_logprobs", old_logprobs.shape)
    check_same_shape("mask", mask, "old_logprobs", old_logprobs.shape)
    check_mask(mask)
    if cu_seqlens is not None:
        check_packed("old_logprobs", old_logprobs, cu_seqlens)
    elif old_logprobs.dim() != 2:
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
                                                          None if min is None else float(min), cu_seqlens)
    frac = "is_clipped_frac" if mode == "truncate" else "is_masked_frac"
    return weights, dict(zip(("is_mean", "is_min", "is_max", frac), stats.unbind()))
