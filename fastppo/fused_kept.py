"""fused_ppo_loss(kept=) as a torch.library op: fastppo.fused's loss with the log-probs renormalised over each
row's kept set (fastppo.kept_logprobs), a scalar or per-token temperature. Launches, forward + backward:
  1. kept_logprobs_fwd  (each live row's kept logits; with entropy the whole row once, kept ones included)
  2-5. the loss aggregation (as fastppo.fused)
  6. kept_logprobs_bwd  (the dense dlogits: zeros outside the kept set unless the entropy has a gradient)
Mask-0 rows are dead: their label is replaced by ignore_index (an [N] select, no host sync), so they are
never read, forward or backward, and their logprobs / entropy are 0 and gradient rows exact zeros."""

from __future__ import annotations

import torch

from .dispatch import ops
from .kept_logprobs import token_logprobs_kept_backward_op
from .library import decode, define, empty, or_empty
from .losses import agg_outputs_fake, loss_options_of, loss_terms_from_logprobs
from .options import LogprobOptions

KeptOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                    torch.Tensor, torch.Tensor, torch.Tensor]


def live_labels(labels: torch.Tensor, mask: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """labels with ignore_index where mask is 0: the rows the kept kernels skip."""
    return torch.where(mask != 0, labels, ignore_index)


def _fake(logits, labels, ids, offsets, tau, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights,
          cu_seqlens, temperature, logits_options, options, backend):
    lopts = decode(LogprobOptions, logits_options)
    loss, stats, coef = agg_outputs_fake(logits, mask)
    logp = logits.new_empty(labels.shape, dtype=loss.dtype)
    kl = coef.new_empty(coef.shape) if ref_logprobs is not None else empty(logp)
    ent = torch.empty_like(logp) if lopts.with_entropy else empty(logp)
    rows = logits.new_empty((labels.numel(),), dtype=loss.dtype)
    coef_ent = torch.empty_like(coef) if lopts.with_entropy else empty(coef)
    lse = torch.empty_like(rows) if lopts.with_entropy else empty(rows)
    return loss, logp, kl, ent, stats, rows, torch.empty_like(rows), lse, coef, coef_ent


@define("fused_ppo_loss_kept", _fake, kernels=True)
def fused_ppo_loss_kept_op(logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor,
                           tau: torch.Tensor | None, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                           mask: torch.Tensor, ref_logprobs: torch.Tensor | None,
                           rollout_is_weights: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                           temperature: float, logits_options: str, options: str, backend: str) -> KeptOutputs:
    """(loss, logprobs, kl, entropy, stats, m_K, log s_K, lse, coef_logp, coef_entropy): fastppo.fused's outputs
    with the kept-set statistics in place of the [N, 2] row stats (lse empty without entropy). The temperature
    is `tau` (per token) or the float `temperature` (logits_options' inv_tau is not used). Only loss is
    differentiable. cu_seqlens: packed sequences ([total] per-token tensors, as fastppo.fused): packed rows are
    rows like any other for the kept log-probs, only the aggregation sees the sequences."""
    lopts = decode(LogprobOptions, logits_options)
    opts = loss_options_of(options)
    y = live_labels(labels, mask, lopts.ignore_index)
    st = ops("kept", backend).kept_logprobs_fwd(
        logits, y, ids, offsets, temperature=temperature if tau is None else tau, ignore_index=lopts.ignore_index,
        with_entropy=lopts.with_entropy, logit_scale=lopts.logit_scale, softcap=lopts.softcap)
    logp = st.logp.view(labels.shape)
    ent = None if st.entropy is None else st.entropy.view(labels.shape)
    res = loss_terms_from_logprobs(logp, ent, old_logprobs, advantages, mask, opts=opts, backend=backend,
                                   ref=ref_logprobs, rollout_is_weights=rollout_is_weights, cu_seqlens=cu_seqlens)
    return (res.loss, logp, or_empty(res.kl, logp), or_empty(ent, logp), res.stats, st.m, st.log_s,
            or_empty(st.lse, st.m), res.coef, or_empty(res.coef_ent, res.coef))


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    (logits, labels, ids, offsets, tau, _old, _adv, mask, _ref, _isw, _cu, temperature, logits_options, options,
     backend) = inputs
    loss, logp, kl, ent, stats, m, log_s, lse, coef, coef_ent = output
    ctx.mark_non_differentiable(logp, kl, ent, stats, m, log_s, lse, coef, coef_ent)
    lopts = decode(LogprobOptions, logits_options)
    use_ent = lopts.with_entropy and loss_options_of(options).entropy_coef != 0
    ctx.save_for_backward(logits, labels, mask, ids, offsets, tau, m, log_s, lse if use_ent else None,
                          ent if use_ent else None, coef, coef_ent if use_ent else None)
    ctx.args = (temperature, lopts, backend)


def _backward(ctx, g_loss, *_):
    if g_loss is None:
        return (None,) * 15
    logits, labels, mask, ids, offsets, tau, m, log_s, lse, ent, coef, coef_ent = ctx.saved_tensors
    temperature, lopts, backend = ctx.args
    scale = g_loss.to(m.dtype)
    c_ent = None if ent is None else coef_ent * scale
    d = token_logprobs_kept_backward_op(
        logits, live_labels(labels, mask, lopts.ignore_index), ids, offsets, tau, m, log_s, lse, ent, coef * scale,
        c_ent, temperature, lopts.ignore_index, lopts.logit_scale, lopts.softcap, backend)
    return (d, *([None] * 14))


fused_ppo_loss_kept_op.register_autograd(_backward, setup_context=_setup)
