"""The pure-PyTorch backend of logits_divergence: the launchers of kernels/divergence.py (`divergence_fwd`,
`divergence_bwd`) with the same arguments and results, over bounded slices of rows (at most CHUNK_ELEMENTS
fp32 values of [N, V] per temporary). Statistics layout [N, 5]: max and log-sum-exp of the student's row, the
same of the teacher's, AUX (reverse KL: the KL; JSD: K = KL(p_s || m); forward KL: 0). Rows with valid == 0
give 0 and a zero gradient (selected with where: a NaN there never leaks, nor a 0 / NaN per-row temperature).
`tau`: an optional per-row temperature ([N] elements, both models) in place of the scalar inv_tau."""

import math

import torch

from .logprobs_torch import _inv_tau, row_chunks


def _acc(*xs):
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _log_probs(z):
    """(log p, max, log-sum) with log p = (z - max) - log-sum (no digits lost at large |z|)."""
    m = z.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    ls = torch.log(torch.exp(z - m).sum(-1, keepdim=True))
    return (z - m) - ls, m.squeeze(-1), ls.squeeze(-1)


def _xlogy_diff(lp_a, lp_b):
    """p_a (lp_a - lp_b), 0 where p_a = 0."""
    p = lp_a.exp()
    return torch.where(p == 0, torch.zeros_like(p), p * (lp_a - lp_b))


def _log_mixture(lp_s, lp_t, beta):
    return torch.logaddexp(lp_s + math.log1p(-beta), lp_t + math.log(beta))


def _live(valid, n, device):
    if valid is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    return valid.reshape(-1) != 0


def divergence_fwd(student, teacher, *, inv_tau: float, beta: float, valid=None, tau=None):
    V = student.shape[-1]
    zs_all, zt_all = student.reshape(-1, V), teacher.reshape(-1, V)
    acc = _acc(student, teacher)
    n = zs_all.shape[0]
    live = _live(valid, n, student.device)
    div = torch.empty(n, dtype=acc, device=student.device)
    stats = torch.empty((n, 5), dtype=acc, device=student.device)
    zero = torch.zeros((), dtype=acc, device=student.device)
    for a, b in row_chunks(n, V):
        it = _inv_tau(inv_tau, tau, a, b, acc)
        lp_s, m_s, ls_s = _log_probs(zs_all[a:b].to(acc) * it)
        lp_t, m_t, ls_t = _log_probs(zt_all[a:b].to(acc) * it)
        if beta == 0.0:
            d = _xlogy_diff(lp_t, lp_s).sum(-1)
            aux = torch.zeros_like(d)
        elif beta == 1.0:
            d = aux = _xlogy_diff(lp_s, lp_t).sum(-1)
        else:
            lm = _log_mixture(lp_s, lp_t, beta)
            aux = _xlogy_diff(lp_s, lm).sum(-1)
            d = beta * _xlogy_diff(lp_t, lm).sum(-1) + (1.0 - beta) * aux
        keep = live[a:b]
        div[a:b] = torch.where(keep, d, zero)
        stats[a:b] = torch.where(keep.unsqueeze(-1), torch.stack((m_s, ls_s, m_t, ls_t, aux), -1), zero)
    return div, stats


def divergence_bwd(student, teacher, stats, g, *, inv_tau: float, beta: float, valid=None, tau=None):
    V = student.shape[-1]
    zs_all, zt_all = student.reshape(-1, V), teacher.reshape(-1, V)
    n = zs_all.shape[0]
    acc = stats.dtype
    live = _live(valid, n, student.device)
    g = g.reshape(-1).to(acc)
    out = torch.empty((n, V), dtype=student.dtype, device=student.device)
    for a, b in row_chunks(n, V):
        st = stats[a:b]
        it = _inv_tau(inv_tau, tau, a, b, acc)
        zs = zs_all[a:b].to(acc) * it
        zt = zt_all[a:b].to(acc) * it
        lp_s = (zs - st[:, 0:1]) - st[:, 1:2]
        lp_t = (zt - st[:, 2:3]) - st[:, 3:4]
        p_s = lp_s.exp()
        if beta == 0.0:
            d = p_s - lp_t.exp()
        elif beta == 1.0:
            d = p_s * (lp_s - lp_t - st[:, 4:5])
        else:
            d = (1.0 - beta) * p_s * (lp_s - _log_mixture(lp_s, lp_t, beta) - st[:, 4:5])
        if beta != 0.0:
            d = torch.where(p_s == 0, torch.zeros_like(d), d)   # 0 log 0 = 0: no NaN from a -inf teacher logit
        grad = (g[a:b].unsqueeze(-1) * it) * d
        out[a:b] = torch.where(live[a:b].unsqueeze(-1), grad, torch.zeros((), dtype=acc)).to(out.dtype)
    return out.view(student.shape)
