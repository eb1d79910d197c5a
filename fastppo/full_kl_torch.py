"""The pure-PyTorch backend of full_kl: the same interface as the Triton launchers (`full_kl_fwd`,
`full_kl_bwd`), over the same bounded slices of rows as fastppo.logprobs_torch."""

import torch

from .logprobs_torch import row_chunks


def full_kl_fwd(logits, ref_logits, *, inv_tau):
    V = logits.shape[-1]
    zp_all, zq_all = logits.reshape(-1, V), ref_logits.reshape(-1, V)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    n = zp_all.shape[0]
    kl, lse_p, lse_q = (torch.empty(n, dtype=acc, device=logits.device) for _ in range(3))
    for a, b in row_chunks(n, V):
        zp, zq = zp_all[a:b].to(acc) * inv_tau, zq_all[a:b].to(acc) * inv_tau
        lp, lq = torch.logsumexp(zp, -1), torch.logsumexp(zq, -1)
        logp = zp - lp.unsqueeze(-1)
        p = logp.exp()
        kl[a:b] = (p * (logp - (zq - lq.unsqueeze(-1))).masked_fill(p == 0, 0.0)).sum(-1)
        lse_p[a:b], lse_q[a:b] = lp, lq
    return kl, lse_p, lse_q


def full_kl_bwd(logits, ref_logits, kl, lse_p, lse_q, g, *, inv_tau):
    V = logits.shape[-1]
    zp_all, zq_all = logits.reshape(-1, V), ref_logits.reshape(-1, V)
    out = torch.empty(zp_all.shape, dtype=logits.dtype, device=logits.device)
    for a, b in row_chunks(zp_all.shape[0], V):
        zp, zq = zp_all[a:b].to(kl.dtype) * inv_tau, zq_all[a:b].to(kl.dtype) * inv_tau
        logp = zp - lse_p[a:b].unsqueeze(-1)
        p = logp.exp()
        d = p * (logp - (zq - lse_q[a:b].unsqueeze(-1)) - kl[a:b].unsqueeze(-1)).masked_fill(p == 0, 0.0)
        out[a:b] = (g[a:b].unsqueeze(-1) * d * inv_tau).to(out.dtype)
    return out.view(logits.shape)
