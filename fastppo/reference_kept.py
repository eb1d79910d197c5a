"""Float64 reference of the kept-set log-probs (the documented math, dense; the oracle for tests):

    z' = softcap(logit_scale z) / tau (softcap(x) = c tanh(x / c), none when c is None),
    logp = z'_y - logsumexp_{j in K} z'_j,  H = full-vocabulary entropy of softmax(z'),
    d logp / dz_j = (onehot(y)_j - p_K,j) dz'_j/dz_j for j in K, 0 elsewhere (autograd of the formula).

A label that is not in its row's kept set (an empty set included) gives NaN; ignore_index labels give 0 and
zero gradient (their logits never enter the computation). Traffic: reads [N, V] once, holds several fp64
[N, V] intermediates (a reference, not a kernel)."""

import torch


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
