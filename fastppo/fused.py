"""fused_ppo_loss: log-prob, entropy, KL to the reference and the policy loss (any variant of
fastppo.losses) from the logits, with no host sync. Triton launches, forward + backward together, on the
two-pass path:
  1. logprobs_fwd  (one read of the logits: logp, lse and H per token)
  2-5. the loss aggregation (kernels/loss_agg.py: 4 launches, 5 for gspo; per-token terms,
       aggregation, stats, gradient coefficients)
  6. logprobs_bwd  (one read + one write of the logits, scaled by the upstream gradient on device)
Token-level losses with rows that fit on chip form the gradient in the forward pass instead (one read + one
write of the logits, fastppo.fused_grad: `takes_one_pass` decides).
"""

from __future__ import annotations

import torch

from ._validation import check_float, check_inplace, check_labels, check_temperature_rows
from .backend import backend_for
from .dispatch import ops
from .fused_grad import fused_outputs_fake, fused_ppo_loss_one_pass, takes_one_pass
from .fused_kept import fused_ppo_loss_kept_op
from .kept import KeptSet
from .kept_logprobs import check_kept
from .library import decode, define, encode, or_empty
from .logprobs import token_logprobs_backward_inplace_op, token_logprobs_backward_op
from .losses import (
    check_fused_tensors,
    fused_stat_names,
    loss_options,
    loss_options_of,
    loss_terms_from_logprobs,
    stats_dict,
)
from .options import LogprobOptions, LossOptions, VocabParallel
from .outputs import PPOLossOutput
from .vocab_parallel import sharded_fused_ppo_loss


def fused_outputs(logits, labels, old, adv, mask, ref, isw, cu, lopts: LogprobOptions, opts: LossOptions,
                  tau=None):
    """Launches 1 and 2 (the body of torch.ops.fastppo.fused_ppo_loss): loss, logp, kl, entropy, stats and
    what the backward launch needs (lse, dloss/dlogp, dloss/dH); None where absent."""
    lp = ops("logprobs", lopts.backend)
    # mask-0 rows are dead: never read (forward or backward), logp = H = 0 there, zero gradient rows
    logp, lse, ent = lp.logprobs_fwd(logits, labels, ignore_index=lopts.ignore_index, with_entropy=lopts.with_entropy,
                                     valid=mask, tau=tau, **lopts.transform())
    shape = labels.shape
    logp = logp.view(shape)
    ent = None if ent is None else ent.view(shape)
    res = loss_terms_from_logprobs(logp, ent, old, adv, mask, opts=opts, backend=lopts.backend, ref=ref,
                                   rollout_is_weights=isw, cu_seqlens=cu)
    return res.loss, logp, res.kl, ent, res.stats, lse, res.coef, res.coef_ent


def ppo_output(loss, logp, kl, ent, stats, opts: LossOptions, has_ref, has_ent) -> PPOLossOutput:
    """PPOLossOutput from a fused op's outputs (kl / entropy are empty tensors where absent)."""
    return PPOLossOutput(loss=loss, logprobs=logp, kl=kl if has_ref else None, entropy=ent if has_ent else None,
                         stats=stats_dict(stats, fused_stat_names(opts, has_ref, has_ent)))


# ----------------------------------------------------------------------------- op
def _logprob_options(options: str) -> LogprobOptions:
    return decode(LogprobOptions, options)


FusedOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                     torch.Tensor]


def _fused_ppo_loss_fake(logits, labels, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights,
                         cu_seqlens, logits_options, options, backend, tau=None):
    return fused_outputs_fake(logits, labels, mask, ref_logprobs, _logprob_options(logits_options).with_entropy)


@define("fused_ppo_loss", _fused_ppo_loss_fake, kernels=True)
def fused_ppo_loss_op(logits: torch.Tensor, labels: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                   mask: torch.Tensor, ref_logprobs: torch.Tensor | None, rollout_is_weights: torch.Tensor | None,
                   cu_seqlens: torch.Tensor | None, logits_options: str, options: str, backend: str,
                   tau: torch.Tensor | None = None) -> FusedOutputs:
    """(loss, logprobs, kl, entropy, stats, lse, coef_logp, coef_entropy) of fastppo.fused (`logits_options`: a
    LogprobOptions, `options`: a LossOptions; kl / entropy / coef_entropy empty when absent). Only loss is
    differentiable; its backward is one log-prob backward launch (token_logprobs_backward, or written over
    the logits when inplace)."""
    loss, logp, kl, ent, stats, lse, coef, coef_ent = fused_outputs(
        logits, labels, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights, cu_seqlens,
        _logprob_options(logits_options), loss_options_of(options), tau)
    return loss, logp, or_empty(kl, logp), or_empty(ent, logp), stats, lse, coef, or_empty(coef_ent, coef)


def _fused_ppo_loss_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)   # outputs without a gradient get no zero-filled tensor
    logits, labels, old, adv, mask, ref, isw, cu, logits_options, options, backend, *rest = inputs
    loss, logp, kl, ent, stats, lse, coef, coef_ent = output
    ctx.mark_non_differentiable(logp, kl, ent, stats, lse, coef, coef_ent)
    use_ent = _logprob_options(logits_options).with_entropy and loss_options_of(options).entropy_coef != 0
    ctx.save_for_backward(logits, labels, mask, lse, ent if use_ent else None, coef, coef_ent if use_ent else None,
                          rest[0] if rest else None)
    ctx.logits_options = logits_options


def _fused_ppo_loss_backward(ctx, g_loss, *_):
    if g_loss is None:
        return (None,) * 12
    logits, labels, mask, lse, ent, coef, coef_ent, tau = ctx.saved_tensors
    lopts = _logprob_options(ctx.logits_options)
    scale = g_loss.to(lse.dtype)
    transform = (lopts.inv_tau, lopts.ignore_index, lopts.logit_scale, lopts.softcap)
    if lopts.inplace and lopts.backend == "triton" and logits.stride(-1) == 1 and not torch.is_grad_enabled():
        # (else a new buffer: a contiguous copy, or create_graph, whose double backward then raises)
        token_logprobs_backward_inplace_op(logits, labels, lse, ent, coef, coef_ent, scale, mask, *transform, tau)
        d = logits
    else:
        d = token_logprobs_backward_op(logits, labels, lse, ent, coef, coef_ent, scale, mask, *transform,
                                       lopts.backend, tau)
    return (d, *([None] * 11))


fused_ppo_loss_op.register_autograd(_fused_ppo_loss_backward, setup_context=_fused_ppo_loss_setup)


# ----------------------------------------------------------------------------- public function
def fused_ppo_loss(logits: torch.Tensor, labels: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                   mask: torch.Tensor, *, ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0,
                   kl_kind: str = "k3", entropy_coef: float = 0.0, clip_low: float = 0.2,
                   clip_high: float | None = None, dual_clip: float | None = None,
                   temperature: float | torch.Tensor = 1.0,
                   agg: str = "token-mean", ignore_index: int = -100, return_entropy: bool = False,
                   inplace: bool = False, num_tokens: float | None = None, num_seqs: float | None = None,
                   horizon: float | None = None, policy_loss: str = "ppo", ratio_max: float | None = None,
                   sapo_tau_pos: float = 1.0, sapo_tau_neg: float = 1.05,
                   rollout_is_weights: torch.Tensor | None = None, entropy_quantile: float | None = None,
                   final_logit_softcapping: float | None = None, logit_scale: float = 1.0,
                   cu_seqlens: torch.Tensor | None = None,
                   dro_beta: float | None = None, cov_ratio: float = 0.0002, cov_lb: float = 1.0,
                   cov_ub: float = 5.0, kl_cov_coef: float = 0.1,
                   kl_bias_correction: bool = False, kl_bias_correction_level: str = "token",
                   off_policy_mask_threshold: float | None = None,
                   vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
                   vespo_lambda_neg: float = 2.0, entropy_agg: str | None = None,
                   vocab_parallel: VocabParallel | None = None, kept: KeptSet | None = None) -> PPOLossOutput:
    """The whole policy objective from the logits in one pass:

        loss = agg(L_policy) + kl_coef * agg(KL(logp, ref_logprobs)) - entropy_coef * agg(H)

    logits [B, T, V] (or [T, V]), labels/old_logprobs/mask [B, T], advantages [B, T] or [B];
    policy_loss and its options as in ppo_policy_loss (variants, ratio_max, sapo temperatures,
    rollout_is_weights, entropy_quantile, dro_beta, the cov_ options), KL kinds as in kl_penalty;
    kl_bias_correction: the KL term is KL_t exp(logp_t - old_t) (TRL's use_bias_correction_kl, token level);
    kl_bias_correction_level="sequence": KL_t exp(sum_b m (logp - old) / n_b), the sequence's ratio (TRL's
    sequence level; LossOptions).
    entropy_agg="token-mean": the entropy term is -entropy_coef sum(e H) / max(sum e, 1), e = mask (times the
    entropy_quantile selection), whatever `agg` (LossOptions.entropy_agg; TRL 1.16's entropy bonus).
    Entropy is computed only when entropy_coef != 0, return_entropy or entropy_quantile. Gradient formed in
    the forward pass (Triton, a gradient wanted, policy_loss ppo, cispo, sapo or gpg without entropy_quantile,
    off_policy_mask_threshold, kl_bias_correction, entropy_agg, cu_seqlens, kept or vocab_parallel; V <= 16384,
    8192 with a softcap; eager mode): each valid logits row is read once and its gradient written once
    (fastppo.fused_grad, docs/design.md §5); backward only brings it to the upstream gradient (nothing moves
    when that is 1; else each valid row is rewritten once more, from the logits: fold a loss scale into
    num_tokens / num_seqs, or use `fastppo.fused_grad.one_pass(False)`). Backward through such a loss twice
    (retain_graph) recomputes the gradient. `inplace=True` writes dlogits into the logits' storage (saves one
    [B, T, V] buffer; the logits are garbage afterwards, and storage that elements share is refused): during
    forward on that path (a non-unit upstream gradient then rescales it in place, rounded twice; a second
    backward raises), during backward otherwise. Logits are transformed as in token_logprobs:
    z' = softcap(logit_scale * z) / temperature. Rows where mask is 0 (or the label is ignore_index) are
    never read, forward or backward: their logprobs / entropy are 0, their gradient rows exact zeros
    (NaN there cannot leak). cu_seqlens ([S + 1] offsets): packed sequences, logits [total, V], the
    per-token tensors [total] (advantages [total] or [S]), results as padded (ppo_policy_loss).
    `vocab_parallel=fastppo.VocabParallel(group)`: the logits passed are this rank's contiguous vocabulary
    shard, in rank order, of the process group (see VocabParallel and the README's vocabulary-parallel
    section); labels are global ids, the results those of the full vocabulary on every rank; kept (global ids) and
    a per-token temperature are replicated like the labels. (Not with cu_seqlens.)
    `temperature` a positive float or a tensor of labels' shape (per token). `kept`: a fastppo.KeptSet with one
    row per label, as in token_logprobs: the log-probs are renormalised over each row's kept set (the gradient
    reaches kept columns only, plus the entropy term's over the row), the entropy stays the full-vocabulary
    one; a live label (mask != 0, not ignore_index) outside its kept set is a ValueError on CPU, NaN on CUDA.
    inplace has no effect with kept= (its backward writes a new dense buffer); with cu_seqlens the kept set has
    one row per packed token.
    Returns PPOLossOutput(loss, logprobs, kl, entropy, stats)."""
    opts = loss_options(policy_loss=policy_loss, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                        ratio_max=ratio_max, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg,
                        entropy_quantile=entropy_quantile, agg=agg, kl_kind=kl_kind, kl_coef=kl_coef,
                        entropy_coef=entropy_coef, num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon,
                        dro_beta=dro_beta, cov_ratio=cov_ratio, cov_lb=cov_lb, cov_ub=cov_ub, kl_cov_coef=kl_cov_coef,
                        kl_bias_correction=kl_bias_correction, kl_bias_correction_level=kl_bias_correction_level,
                        off_policy_mask_threshold=off_policy_mask_threshold,
                        vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
                        vespo_lambda_neg=vespo_lambda_neg, entropy_agg=entropy_agg)
    if vocab_parallel is not None:
        return sharded_fused_ppo_loss(
            logits, labels, old_logprobs, advantages, mask, vocab_parallel, loss_opts=opts, ref_logprobs=ref_logprobs,
            rollout_is_weights=rollout_is_weights, cu_seqlens=cu_seqlens, temperature=temperature,
            ignore_index=ignore_index, return_entropy=return_entropy, inplace=inplace,
            final_logit_softcapping=final_logit_softcapping, logit_scale=logit_scale, kept=kept)
    check_float("logits", logits)
    if logits.dim() not in (2, 3) or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [B, T, V] or [T, V], got shape {tuple(logits.shape)}")
    check_labels(labels, logits.shape[:-1], logits.shape[-1], ignore_index)
    if cu_seqlens is not None and logits.dim() != 2:
        raise ValueError(f"with cu_seqlens, logits must be packed [total, V], got shape {tuple(logits.shape)}")
    check_fused_tensors(logits.shape[:-1], old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights, opts,
                        cu_seqlens)
    if inplace:
        check_inplace("logits", logits)
    want_ent = bool(return_entropy or entropy_coef != 0 or entropy_quantile is not None)
    backend = backend_for(logits, labels, old_logprobs, advantages, mask, cu_seqlens)
    tau = check_temperature_rows(temperature, labels.shape, logits.device, "fused_ppo_loss", labels,
                                 ignore_index, mask)
    lopts = LogprobOptions.build(temperature=1.0 if tau is not None else temperature, logit_scale=logit_scale,
                                 final_logit_softcapping=final_logit_softcapping, ignore_index=ignore_index,
                                 with_entropy=want_ent, inplace=inplace, backend=backend)
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    if kept is not None:
        check_kept(kept, labels, logits.shape[-1], ignore_index, live=mask)
        loss, logp, kl, ent, stats, *_ = fused_ppo_loss_kept_op(
            logits, labels, kept.ids, kept.offsets, tau, old_logprobs.detach(), advantages.detach(), mask,
            detach(ref_logprobs), detach(rollout_is_weights), cu_seqlens,
            1.0 if tau is not None else float(temperature), encode(lopts), encode(opts), backend)
        return ppo_output(loss, logp, kl, ent, stats, opts, ref_logprobs is not None, want_ent)
    if takes_one_pass(logits, lopts, opts, cu_seqlens, tau):
        loss, logp, kl, ent, stats = fused_ppo_loss_one_pass(
            logits, labels, old_logprobs.detach(), advantages.detach(), mask, detach(ref_logprobs),
            detach(rollout_is_weights), encode(lopts), encode(opts), tau)
        return ppo_output(loss, logp, kl, ent, stats, opts, ref_logprobs is not None, want_ent)
    loss, logp, kl, ent, stats, *_ = torch.ops.fastppo.fused_ppo_loss(
        logits, labels, old_logprobs.detach(), advantages.detach(), mask, detach(ref_logprobs),
        detach(rollout_is_weights), cu_seqlens, encode(lopts), encode(opts), backend, tau)
    return ppo_output(loss, logp, kl, ent, stats, opts, ref_logprobs is not None, want_ent)
