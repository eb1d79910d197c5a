"""The pure-PyTorch backend of full_kl: the same interface as the Triton launchers (`full_kl_fwd`,
`full_kl_bwd`), over the same bounded slices of rows as fastppo.logprobs_torch."""

import torch

from .logprobs_torch import row_chunks


def _log_softmax_stats(z):
    """(log p, m, log s) of rows z: log p = (z - m) - log s with the row max m (0 for an all -inf row) and the
    log-sum kept apart, as fp32 log_softmax computes it (exact at any magnitude)."""
    m = z.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    zs = z - m
    log_s = torch.log(torch.exp(zs).sum(-1, keepdim=True))
    return zs - log_s, m, log_s


def _kl_terms(logp, logq, kl=None):
    """p (log p - log q [- KL]) per entry, exactly 0 where p == 0 (an underflowed or -inf entry)."""
    p = logp.exp()
    d = logp - logq if kl is None else (logp - logq) - kl
    return torch.where(p == 0, torch.zeros_like(p), p * d)


def _inv(inv_tau, tau, a, b, acc):
    """The slice's 1 / temperature: the scalar, or 1 / tau per row ([b - a, 1]) when a per-row tau is given."""
    return inv_tau if tau is None else 1.0 / tau.reshape(-1)[a:b].to(acc).unsqueeze(-1)


def full_kl_fwd(logits, ref_logits, *, inv_tau, tau=None):
    """(kl [N], stats_p [N, 2], stats_q [N, 2]): each side's row (max, log-sum) kept apart for backward."""
    V = logits.shape[-1]
    zp_all, zq_all = logits.reshape(-1, V), ref_logits.reshape(-1, V)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    n = zp_all.shape[0]
    kl = torch.empty(n, dtype=acc, device=logits.device)
    stats_p, stats_q = (torch.empty(n, 2, dtype=acc, device=logits.device) for _ in range(2))
    for a, b in row_chunks(n, V):
        it = _inv(inv_tau, tau, a, b, acc)
        logp, mp, lsp = _log_softmax_stats(zp_all[a:b].to(acc) * it)
        logq, mq, lsq = _log_softmax_stats(zq_all[a:b].to(acc) * it)
        kl[a:b] = _kl_terms(logp, logq).sum(-1)
        stats_p[a:b] = torch.cat((mp, lsp), -1)
        stats_q[a:b] = torch.cat((mq, lsq), -1)
    return kl, stats_p, stats_q


def full_kl_bwd(logits, ref_logits, kl, stats_p, stats_q, g, *, inv_tau, tau=None):
    V = logits.shape[-1]
    zp_all, zq_all = logits.reshape(-1, V), ref_logits.reshape(-1, V)
    out = torch.empty(zp_all.shape, dtype=logits.dtype, device=logits.device)
    for a, b in row_chunks(zp_all.shape[0], V):
        it = _inv(inv_tau, tau, a, b, kl.dtype)
        zp, zq = zp_all[a:b].to(kl.dtype) * it, zq_all[a:b].to(kl.dtype) * it
        logp = (zp - stats_p[a:b, :1]) - stats_p[a:b, 1:]
        logq = (zq - stats_q[a:b, :1]) - stats_q[a:b, 1:]
        d = _kl_terms(logp, logq, kl[a:b].unsqueeze(-1))
        out[a:b] = (g[a:b].unsqueeze(-1) * d * it).to(out.dtype)
    return out.view(logits.shape)
