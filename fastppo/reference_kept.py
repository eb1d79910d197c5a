"""Float64 reference of the kept-set log-probs (the documented math, dense; the oracle for tests):

    z' = softcap(logit_scale z) / tau (softcap(x) = c tanh(x / c), none when c is None),
    logp = z'_y - logsumexp_{j in K} z'_j,  H = full-vocabulary entropy of softmax(z'),
    d logp / dz_j = (onehot(y)_j - p_K,j) dz'_j/dz_j for j in K, 0 elsewhere (autograd of the formula).

A label that is not in its row's kept set (an empty set included) gives NaN; ignore_index labels give 0 and
zero gradient (their logits never enter the computation). Traffic: reads [N, V] once, holds several fp64
[N, V] intermediates (a reference, not a kernel)."""

import torch

from .reference import compose_ppo_loss


def kept_token_logprobs(logits, labels, kept, *, temperature=1.0, ignore_index=-100, return_entropy=False,
                        logit_scale=1.0, final_logit_softcapping=None):
    """logits [..., V], labels [...], kept a fastppo.KeptSet with one row per label; temperature a float or
    a tensor of labels' shape. Returns float64 logp [...] (and entropy [...] with return_entropy)."""
    V = logits.shape[-1]
    z = logits.double().reshape(-1, V)
    y = labels.reshape(-1)
    live = y != ignore_index
    z = torch.where(live[:, None], z, torch.zeros((), dtype=z.dtype, device=z.device)) * float(logit_scale)
    if final_logit_softcapping is not None:
        c = float(final_logit_softcapping)
        z = c * torch.tanh(z / c)
    if isinstance(temperature, torch.Tensor):
        z = z / temperature.double().reshape(-1, 1)
    else:
        z = z / float(temperature)
    mask = kept.to_mask(V).to(z.device)
    safe_y = torch.where(live & (y >= 0) & (y < V), y, 0)
    in_k = mask.gather(1, safe_y.unsqueeze(1)).squeeze(1) & live & (y >= 0) & (y < V)
    lse_k = torch.logsumexp(z.masked_fill(~mask, float("-inf")), -1)
    logp = z.gather(1, safe_y.unsqueeze(1)).squeeze(1) - lse_k
    logp = torch.where(in_k, logp, torch.full_like(logp, float("nan")))
    logp = torch.where(live, logp, torch.zeros_like(logp)).reshape(labels.shape)
    if not return_entropy:
        return logp
    logq = torch.log_softmax(z, -1)
    ent = -(logq.exp() * torch.where(logq == float("-inf"), torch.zeros_like(logq), logq)).sum(-1)
    return logp, torch.where(live, ent, torch.zeros_like(ent)).reshape(labels.shape)


def kept_fused_ppo_loss(logits, labels, kept, old_logprobs, advantages, mask, *, temperature=1.0,
                        ignore_index=-100, logit_scale=1.0, final_logit_softcapping=None, ref_logprobs=None,
                        kl_coef=0.0, kl_kind="k3", entropy_coef=0.0, clip_low=0.2, clip_high=None, dual_clip=None,
                        agg="token-mean", num_tokens=None, num_seqs=None, horizon=None, return_entropy=False,
                        **policy):
    """fastppo.reference.fused_ppo_loss with the kept-set log-probs above (mask-0 rows as ignore_index)."""
    want_ent = return_entropy or entropy_coef != 0 or policy.get("entropy_quantile") is not None
    labels = torch.where(mask != 0, labels, ignore_index)
    logp, ent = kept_token_logprobs(logits, labels, kept, temperature=temperature, ignore_index=ignore_index,
                                    return_entropy=True, logit_scale=logit_scale,
                                    final_logit_softcapping=final_logit_softcapping)
    return compose_ppo_loss(logp, ent if want_ent else None, old_logprobs, advantages, mask,
                            ref_logprobs=ref_logprobs, kl_coef=kl_coef, kl_kind=kl_kind, entropy_coef=entropy_coef,
                            clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg,
                            num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon, **policy)


def linear_logits(hidden, weight, bias=None, logits_dtype=None):
    """The linear ops' logits in float64: z = hidden @ weight.T + bias; with logits_dtype (bf16 / fp16) each z is
    rounded to it, the gradient passing straight through the rounding (z + sg(round(z) - z))."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if logits_dtype is not None:
        z = z + (z.to(logits_dtype).double() - z).detach()
    return z


def kept_linear_logprobs(hidden, weight, labels, kept, *, bias=None, logits_dtype=None, **kw):
    """linear_logprobs(kept=) in float64: kept_token_logprobs of linear_logits (the keywords of
    kept_token_logprobs: temperature, ignore_index, return_entropy, logit_scale, final_logit_softcapping)."""
    return kept_token_logprobs(linear_logits(hidden, weight, bias, logits_dtype), labels, kept, **kw)


def kept_fused_linear_ppo_loss(hidden, weight, labels, kept, old_logprobs, advantages, mask, *, bias=None,
                               logits_dtype=None, **kw):
    """fused_linear_ppo_loss(kept=) in float64: kept_fused_ppo_loss of linear_logits."""
    return kept_fused_ppo_loss(linear_logits(hidden, weight, bias, logits_dtype), labels, kept, old_logprobs,
                               advantages, mask, **kw)
