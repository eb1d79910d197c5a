"""fused_ppo_loss: log-prob, entropy, KL to the reference and the clipped surrogate from the
logits in three launches for forward + backward together, with no host sync:
  1. logprobs_fwd  (one read of the logits: logp, lse and H per token)
  2. loss_agg      (one program: per-token terms, aggregation, stats, gradient coefficients)
  3. logprobs_bwd  (one read + one write of the logits, scaled by the upstream gradient on device)
"""

from __future__ import annotations

import torch

from . import library  # noqa: F401  (registers torch.ops.fastppo)
from . import reference as ref_impl
from ._checks import check_choice, check_float, check_labels, check_temperature
from .backend import backend_for
from .logprobs import token_logprobs
from .losses import POLICY_STATS, check_clips, check_token_args, opt_float, stats_dict
from .outputs import PPOLossOutput


def stat_names(has_ref, has_ent):
    names = [(k, k) for k in POLICY_STATS] + [("pg_loss", "main_loss")]
    if has_ref:
        names.append(("kl", "kl"))
    if has_ent:
        names.append(("entropy", "entropy"))
    return names


def check_ppo_args(lead_shape, old_logprobs, advantages, mask, ref_logprobs, kl_kind, kl_coef, entropy_coef,
                   clip_low, clip_high, dual_clip, agg, num_tokens, num_seqs, horizon):
    check_token_args("labels", lead_shape, old_logprobs, advantages, mask, agg, num_tokens, num_seqs, horizon)
    check_clips(clip_low, clip_high, dual_clip)
    check_choice("kl_kind", kl_kind, ref_impl.KL_KINDS)
    if ref_logprobs is not None:
        check_float("ref_logprobs", ref_logprobs)
        if tuple(ref_logprobs.shape) != tuple(lead_shape):
            raise ValueError(f"ref_logprobs shape {tuple(ref_logprobs.shape)} must equal {tuple(lead_shape)}")
    elif kl_coef != 0:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs")
    if not entropy_coef == entropy_coef or not kl_coef == kl_coef:
        raise ValueError("kl_coef and entropy_coef must not be NaN")


def fused_ppo_loss(logits, labels, old_logprobs, advantages, mask, *, ref_logprobs=None, kl_coef=0.0,
                   kl_kind="k3", entropy_coef=0.0, clip_low=0.2, clip_high=None, dual_clip=None,
                   temperature=1.0, agg="token-mean", ignore_index=-100, return_entropy=False,
                   inplace=False, num_tokens=None, num_seqs=None, horizon=None) -> PPOLossOutput:
    """The whole PPO policy objective from the logits in one pass:

        loss = agg(L_clip) + kl_coef * agg(KL(logp, ref_logprobs)) - entropy_coef * agg(H)

    logits [B, T, V] (or [T, V]), labels/old_logprobs/mask [B, T], advantages [B, T] or [B];
    options as in ppo_policy_loss and kl_penalty. Entropy is computed only when entropy_coef != 0
    or return_entropy. `inplace=True` writes dlogits into the logits' storage during backward
    (saves one [B, T, V] buffer; the logits are garbage afterwards, so nothing else may use them).
    Returns PPOLossOutput(loss, logprobs, kl, entropy, stats)."""
    check_float("logits", logits)
    if logits.dim() not in (2, 3) or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [B, T, V] or [T, V], got shape {tuple(logits.shape)}")
    check_labels(labels, logits.shape[:-1], logits.shape[-1], ignore_index)
    check_ppo_args(logits.shape[:-1], old_logprobs, advantages, mask, ref_logprobs, kl_kind, kl_coef,
                   entropy_coef, clip_low, clip_high, dual_clip, agg, num_tokens, num_seqs, horizon)
    tau = check_temperature(temperature)
    clip_high = clip_low if clip_high is None else clip_high
    want_ent = bool(return_entropy or entropy_coef != 0)
    backend = backend_for(logits, labels, old_logprobs, advantages, mask)
    if backend == "torch":
        out = token_logprobs(logits, labels, temperature=tau, ignore_index=ignore_index, return_entropy=want_ent)
        logp, ent = out if want_ent else (out, None)
        return ref_impl.compose_ppo_loss(
            logp, ent, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, kl_coef=kl_coef,
            kl_kind=kl_kind, entropy_coef=entropy_coef, clip_low=clip_low, clip_high=clip_high,
            dual_clip=dual_clip, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon)
    ref = None if ref_logprobs is None else ref_logprobs.detach()
    loss, logp, kl, ent, stats, *_ = torch.ops.fastppo.fused_ppo_loss(
        logits, labels, old_logprobs.detach(), advantages.detach(), mask, ref, 1.0 / tau, int(ignore_index), want_ent,
        kl_kind, float(kl_coef), float(entropy_coef), agg, float(clip_low), float(clip_high), opt_float(dual_clip),
        opt_float(num_tokens), opt_float(num_seqs), opt_float(horizon), bool(inplace))
    return ppo_output(loss, logp, kl, ent, stats, ref is not None, want_ent)


def ppo_output(loss, logp, kl, ent, stats, has_ref, has_ent) -> PPOLossOutput:
    """PPOLossOutput from a fused op's outputs (kl / entropy are empty tensors where absent)."""
    return PPOLossOutput(loss=loss, logprobs=logp, kl=kl if has_ref else None, entropy=ent if has_ent else None,
                         stats=stats_dict(stats, stat_names(has_ref, has_ent)))
