"""fused_ppo_loss: log-prob, entropy, KL to the reference and the clipped surrogate from the
logits in three launches for forward + backward together, with no host sync:
  1. logprobs_fwd  (one read of the logits: logp, lse and H per token)
  2. loss_agg      (one program: per-token terms, aggregation, stats, gradient coefficients)
  3. logprobs_bwd  (one read + one write of the logits, scaled by the upstream gradient on device)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import reference as ref_impl
from ._checks import check_choice, check_float, check_inplace, check_labels, check_temperature
from .backend import backend_for
from .library import encode
from .logprobs import check_logit_transform, token_logprobs
from .losses import POLICY_STATS, AggOptions, check_clips, check_token_args, stats_dict
from .outputs import PPOLossOutput


@dataclass(frozen=True)
class PPOOptions:
    """Everything but tensors: hashable, so the Function's backward returns a short tuple."""

    inv_tau: float
    ignore_index: int
    want_entropy: bool
    kl_kind: str
    kl_coef: float
    entropy_coef: float
    inplace: bool
    agg: AggOptions
    logit_scale: float = 1.0
    softcap: float | None = None

    def transform(self):
        """Keywords of the logprobs launchers for z' = softcap(scale * z) / tau."""
        return dict(inv_tau=self.inv_tau, logit_scale=self.logit_scale, softcap=self.softcap)


def stat_names(has_ref, has_ent):
    names = [(k, k) for k in POLICY_STATS] + [("pg_loss", "main_loss")]
    if has_ref:
        names.append(("kl", "kl"))
    if has_ent:
        names.append(("entropy", "entropy"))
    return names


def ppo_terms_from_logprobs(logp, ent, old, adv, mask, ref, opts: PPOOptions):
    """Launch 2 of 3: the aggregation kernel on per-token log-probs (and entropy)."""
    from .kernels.loss_agg import loss_agg

    return loss_agg(logp, old, adv, mask, ref=ref, ent=ent, kl_kind=opts.kl_kind, kl_coef=opts.kl_coef,
                    entropy_coef=opts.entropy_coef, **opts.agg.kwargs())


def fused_outputs(logits, labels, old, adv, mask, ref, opts: PPOOptions):
    """Launches 1 and 2 (the body of torch.ops.fastppo.fused_ppo_loss): loss, logp, kl, entropy, stats and
    what launch 3 needs (lse, the per-token coefficients dloss/dlogp and dloss/dH); None where absent."""
    from .kernels import logprobs as k

    # mask-0 rows are dead: never read (forward or backward), logp = H = 0 there, zero gradient rows
    logp, lse, ent = k.logprobs_fwd(logits, labels, ignore_index=opts.ignore_index, with_entropy=opts.want_entropy,
                                    valid=mask, **opts.transform())
    shape = labels.shape
    logp = logp.view(shape)
    ent = None if ent is None else ent.view(shape)
    loss, stats, coef_x, coef_ent, kl = ppo_terms_from_logprobs(logp, ent, old, adv, mask, ref, opts)
    return loss, logp, kl, ent, stats, lse, coef_x, coef_ent


def fused_grad(logits, labels, mask, lse, ent, coef_x, coef_ent, scale, opts: PPOOptions, inplace: bool):
    """Launch 3: dlogits = scale * (coef_x dlogp/dz + coef_ent dH/dz), written over the logits when inplace."""
    from .kernels import logprobs as k

    return k.logprobs_bwd(logits, labels, lse, ent, coef_x.reshape(-1), None if coef_ent is None else
                          coef_ent.reshape(-1), ignore_index=opts.ignore_index, scale=scale, inplace=inplace,
                          valid=mask, **opts.transform())


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
                   inplace=False, num_tokens=None, num_seqs=None, horizon=None, final_logit_softcapping=None,
                   logit_scale=1.0) -> PPOLossOutput:
    """The whole PPO policy objective from the logits in one pass:

        loss = agg(L_clip) + kl_coef * agg(KL(logp, ref_logprobs)) - entropy_coef * agg(H)

    logits [B, T, V] (or [T, V]), labels/old_logprobs/mask [B, T], advantages [B, T] or [B];
    options as in ppo_policy_loss and kl_penalty. Entropy is computed only when entropy_coef != 0
    or return_entropy. `inplace=True` writes dlogits into the logits' storage during backward
    (saves one [B, T, V] buffer; the logits are garbage afterwards, so nothing else may use them).
    Logits are transformed as in token_logprobs: z' = softcap(logit_scale * z) / temperature.
    Rows where mask is 0 (or the label is ignore_index) are never read, forward or backward: their
    logprobs / entropy are 0, their gradient rows exact zeros (NaN there cannot leak).
    Returns PPOLossOutput(loss, logprobs, kl, entropy, stats)."""
    check_float("logits", logits)
    if logits.dim() not in (2, 3) or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [B, T, V] or [T, V], got shape {tuple(logits.shape)}")
    check_labels(labels, logits.shape[:-1], logits.shape[-1], ignore_index)
    check_ppo_args(logits.shape[:-1], old_logprobs, advantages, mask, ref_logprobs, kl_kind, kl_coef,
                   entropy_coef, clip_low, clip_high, dual_clip, agg, num_tokens, num_seqs, horizon)
    tau = check_temperature(temperature)
    if inplace:
        check_inplace("logits", logits)
    scale, cap = check_logit_transform(logit_scale, final_logit_softcapping)
    clip_high = clip_low if clip_high is None else clip_high
    want_ent = bool(return_entropy or entropy_coef != 0)
    backend = backend_for(logits, labels, old_logprobs, advantages, mask)
    if backend == "torch":
        labels = torch.where(mask != 0, labels, ignore_index)      # mask-0 rows are dead, as on the kernel path
        out = token_logprobs(logits, labels, temperature=tau, ignore_index=ignore_index, return_entropy=want_ent,
                             final_logit_softcapping=cap, logit_scale=scale)
        logp, ent = out if want_ent else (out, None)
        return ref_impl.compose_ppo_loss(
            logp, ent, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, kl_coef=kl_coef,
            kl_kind=kl_kind, entropy_coef=entropy_coef, clip_low=clip_low, clip_high=clip_high,
            dual_clip=dual_clip, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon)
    opts = PPOOptions(1.0 / tau, int(ignore_index), want_ent, kl_kind, float(kl_coef), float(entropy_coef),
                      bool(inplace), AggOptions(0, agg, clip_low, clip_high, dual_clip, None, num_tokens,
                                                num_seqs, horizon), scale, cap)
    ref = None if ref_logprobs is None else ref_logprobs.detach()
    loss, logp, kl, ent, stats, *_ = torch.ops.fastppo.fused_ppo_loss(
        logits, labels, old_logprobs.detach(), advantages.detach(), mask, ref, encode(opts))
    return ppo_output(loss, logp, kl, ent, stats, ref is not None, want_ent)


def ppo_output(loss, logp, kl, ent, stats, has_ref, has_ent) -> PPOLossOutput:
    """PPOLossOutput from a fused op's outputs (kl / entropy are empty tensors where absent)."""
    return PPOLossOutput(loss=loss, logprobs=logp, kl=kl if has_ref else None, entropy=ent if has_ent else None,
                         stats=stats_dict(stats, stat_names(has_ref, has_ent)))
