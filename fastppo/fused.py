"""fused_ppo_loss: log-prob, entropy, KL to the reference and the policy loss (any variant of
fastppo.losses) from the logits, with no host sync. Triton launches, forward + backward together:
  1. logprobs_fwd  (one read of the logits: logp, lse and H per token)
  2-5. the loss aggregation (kernels/loss_agg.py: 4 launches, 5 for gspo; per-token terms,
       aggregation, stats, gradient coefficients)
  6. logprobs_bwd  (one read + one write of the logits, scaled by the upstream gradient on device)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validation import check_float, check_inplace, check_labels, check_temperature
from .backend import backend_for
from .dispatch import ops
from .library import encode
from .logprobs import check_logit_transform
from .losses import check_optional, check_policy_tensors, loss_terms_from_logprobs, policy_stat_names, stats_dict
from .options import LossOptions
from .outputs import PPOLossOutput


@dataclass(frozen=True)
class LogitsOptions:
    """The log-prob op's options in a fused loss (the loss's own options are a LossOptions)."""

    inv_tau: float
    ignore_index: int
    want_entropy: bool
    inplace: bool
    backend: str
    logit_scale: float = 1.0
    softcap: float | None = None

    def transform(self):
        """Keywords of the logprobs launchers for z' = softcap(scale * z) / tau."""
        return dict(inv_tau=self.inv_tau, logit_scale=self.logit_scale, softcap=self.softcap)


def fused_stat_names(opts: LossOptions, has_ref: bool, has_ent: bool):
    names = policy_stat_names(opts) + [("pg_loss", "pg_loss")]
    if has_ref:
        names.append(("kl", "kl"))
    if has_ent:
        names.append(("entropy", "entropy"))
    return names


def loss_options(*, policy_loss, clip_low, clip_high, dual_clip, ratio_max, sapo_tau_pos, sapo_tau_neg,
                 entropy_quantile, agg, kl_kind, kl_coef, entropy_coef, num_tokens, num_seqs, horizon):
    """The LossOptions of a fused loss call (fused_ppo_loss and fused_linear_ppo_loss share it)."""
    return LossOptions.policy(policy_loss=policy_loss, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                              ratio_max=ratio_max, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg,
                              entropy_quantile=entropy_quantile, agg=agg, kl_kind=kl_kind, kl_coef=kl_coef,
                              entropy_coef=entropy_coef, num_tokens=num_tokens, num_seqs=num_seqs,
                              horizon=horizon)


def check_fused_tensors(lead_shape, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights,
                        opts: LossOptions):
    check_policy_tensors("labels", lead_shape, old_logprobs, advantages, mask, opts,
                         rollout_is_weights=rollout_is_weights, entropy=True)
    if ref_logprobs is not None:
        check_float("ref_logprobs", ref_logprobs)
        if tuple(ref_logprobs.shape) != tuple(lead_shape):
            raise ValueError(f"ref_logprobs shape {tuple(ref_logprobs.shape)} must equal {tuple(lead_shape)}")
    elif opts.kl_coef != 0:
        raise ValueError(f"kl_coef={opts.kl_coef} needs ref_logprobs")
    check_optional("rollout_is_weights", rollout_is_weights, "labels", lead_shape)


def fused_outputs(logits, labels, old, adv, mask, ref, isw, lopts: LogitsOptions, opts: LossOptions):
    """Launches 1 and 2 (the body of torch.ops.fastppo.fused_ppo_loss): loss, logp, kl, entropy, stats and
    what the backward launch needs (lse, dloss/dlogp, dloss/dH); None where absent."""
    lp = ops("logprobs", lopts.backend)
    # mask-0 rows are dead: never read (forward or backward), logp = H = 0 there, zero gradient rows
    logp, lse, ent = lp.logprobs_fwd(logits, labels, ignore_index=lopts.ignore_index, with_entropy=lopts.want_entropy,
                                     valid=mask, **lopts.transform())
    shape = labels.shape
    logp = logp.view(shape)
    ent = None if ent is None else ent.view(shape)
    res = loss_terms_from_logprobs(logp, ent, old, adv, mask, opts=opts, backend=lopts.backend, ref=ref,
                                   rollout_is_weights=isw)
    return res.loss, logp, res.kl, ent, res.stats, lse, res.coef, res.coef_ent


def fused_grad(logits, labels, mask, lse, ent, coef, coef_ent, scale, lopts: LogitsOptions, inplace: bool):
    """The backward launch: dlogits = scale (coef dlogp/dz + coef_ent dH/dz), over the logits when inplace."""
    return ops("logprobs", lopts.backend).logprobs_bwd(
        logits, labels, lse, None if ent is None else ent.reshape(-1), coef.reshape(-1),
        None if coef_ent is None else coef_ent.reshape(-1), ignore_index=lopts.ignore_index, scale=scale,
        inplace=inplace, valid=mask, **lopts.transform())


def ppo_output(loss, logp, kl, ent, stats, opts: LossOptions, has_ref, has_ent) -> PPOLossOutput:
    """PPOLossOutput from a fused op's outputs (kl / entropy are empty tensors where absent)."""
    return PPOLossOutput(loss=loss, logprobs=logp, kl=kl if has_ref else None, entropy=ent if has_ent else None,
                         stats=stats_dict(stats, fused_stat_names(opts, has_ref, has_ent)))


def fused_ppo_loss(logits, labels, old_logprobs, advantages, mask, *, ref_logprobs=None, kl_coef=0.0,
                   kl_kind="k3", entropy_coef=0.0, clip_low=0.2, clip_high=None, dual_clip=None,
                   temperature=1.0, agg="token-mean", ignore_index=-100, return_entropy=False,
                   inplace=False, num_tokens=None, num_seqs=None, horizon=None, policy_loss="ppo",
                   ratio_max=None, sapo_tau_pos=1.0, sapo_tau_neg=1.05, rollout_is_weights=None,
                   entropy_quantile=None, final_logit_softcapping=None, logit_scale=1.0) -> PPOLossOutput:
    """The whole policy objective from the logits in one pass:

        loss = agg(L_policy) + kl_coef * agg(KL(logp, ref_logprobs)) - entropy_coef * agg(H)

    logits [B, T, V] (or [T, V]), labels/old_logprobs/mask [B, T], advantages [B, T] or [B];
    policy_loss and its options as in ppo_policy_loss (variants, ratio_max, sapo temperatures,
    rollout_is_weights, entropy_quantile), KL kinds as in kl_penalty. Entropy is computed only when
    entropy_coef != 0, return_entropy or entropy_quantile. `inplace=True` writes dlogits into the
    logits' storage during backward (saves one [B, T, V] buffer; the logits are garbage afterwards,
    and storage that elements share is refused). Logits are transformed as in token_logprobs:
    z' = softcap(logit_scale * z) / temperature. Rows where mask is 0 (or the label is ignore_index) are
    never read, forward or backward: their logprobs / entropy are 0, their gradient rows exact zeros
    (NaN there cannot leak). Returns PPOLossOutput(loss, logprobs, kl, entropy, stats)."""
    opts = loss_options(policy_loss=policy_loss, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                        ratio_max=ratio_max, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg,
                        entropy_quantile=entropy_quantile, agg=agg, kl_kind=kl_kind, kl_coef=kl_coef,
                        entropy_coef=entropy_coef, num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon)
    check_float("logits", logits)
    if logits.dim() not in (2, 3) or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [B, T, V] or [T, V], got shape {tuple(logits.shape)}")
    check_labels(labels, logits.shape[:-1], logits.shape[-1], ignore_index)
    check_fused_tensors(logits.shape[:-1], old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights, opts)
    tau = check_temperature(temperature)
    if inplace:
        check_inplace("logits", logits)
    scale, cap = check_logit_transform(logit_scale, final_logit_softcapping)
    want_ent = bool(return_entropy or entropy_coef != 0 or entropy_quantile is not None)
    backend = backend_for(logits, labels, old_logprobs, advantages, mask)
    lopts = LogitsOptions(1.0 / tau, int(ignore_index), want_ent, bool(inplace), backend, scale, cap)
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    loss, logp, kl, ent, stats, *_ = torch.ops.fastppo.fused_ppo_loss(
        logits, labels, old_logprobs.detach(), advantages.detach(), mask, detach(ref_logprobs),
        detach(rollout_is_weights), encode(lopts), encode(opts), backend)
    return ppo_output(loss, logp, kl, ent, stats, opts, ref_logprobs is not None, want_ent)
