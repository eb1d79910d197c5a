"""The pure-PyTorch backend of topk_divergence: the launchers of kernels/topk_divergence.py
(`topk_divergence_fwd`, `topk_divergence_bwd`), same arguments and results, over bounded slices of rows.
Statistics [N, 5]: the student row's max and log-sum-exp, log q_tail, log p_t,tail, C (see the kernel
module's docstring for the bins, G_b and C). Rows with valid == 0 give 0 and a zero gradient. `tau`: an optional
per-row temperature of the student ([N] elements) in place of the scalar inv_tau."""

import math

import torch

from .divergence_torch import _live, _log_probs, _xlogy_diff
from .logprobs_torch import _inv_tau, row_chunks


def _bins(lp, ids, tlp):
    """(log q [rows, K], log q_tail, log p_t [rows, K], log p_t,tail) from the student's log-probs."""
    lq = lp.gather(-1, ids.clamp(0, lp.shape[-1] - 1))
    tail = lp.scatter(-1, ids.clamp(0, lp.shape[-1] - 1), float("-inf"))
    lp_t = tlp.to(lp.dtype)
    lp_t_tail = torch.log(torch.clamp(1.0 - lp_t.exp().sum(-1), min=0.0))
    return lq, torch.logsumexp(tail, -1), lp_t, lp_t_tail


def _mixture(lq, lp_t, beta):
    return torch.logaddexp(lq + math.log1p(-beta), lp_t + math.log(beta))


def topk_divergence_fwd(student, ids, tlp, *, inv_tau: float, beta: float, valid=None, tau=None):
    V, k = student.shape[-1], ids.shape[-1]
    z_all, ids_all, tlp_all = student.reshape(-1, V), ids.reshape(-1, k).long(), tlp.reshape(-1, k)
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    n = z_all.shape[0]
    live = _live(valid, n, student.device)
    div = torch.empty(n, dtype=acc, device=student.device)
    stats = torch.empty((n, 5), dtype=acc, device=student.device)
    zero = torch.zeros((), dtype=acc, device=student.device)
    for a, b in row_chunks(n, V):
        lp, m, ls = _log_probs(z_all[a:b].to(acc) * _inv_tau(inv_tau, tau, a, b, acc))
        lq, lq_tail, lp_t, lp_t_tail = _bins(lp, ids_all[a:b], tlp_all[a:b])
        lq_all, lt_all = torch.cat((lq, lq_tail[:, None]), -1), torch.cat((lp_t, lp_t_tail[:, None]), -1)
        if beta == 0.0:
            d = _xlogy_diff(lt_all, lq_all).sum(-1)
            c = lt_all.exp().sum(-1)
        elif beta == 1.0:
            d = c = _xlogy_diff(lq_all, lt_all).sum(-1)
        else:
            lm = _mixture(lq_all, lt_all, beta)
            c = _xlogy_diff(lq_all, lm).sum(-1)
            d = beta * _xlogy_diff(lt_all, lm).sum(-1) + (1.0 - beta) * c
        keep = live[a:b]
        div[a:b] = torch.where(keep, d, zero)
        stats[a:b] = torch.where(keep[:, None], torch.stack((m, ls, lq_tail, lp_t_tail, c), -1), zero)
    return div, stats


def _bin_grad(lp, lq_b, lp_t_b, c, beta):
    p = lp.exp()
    if beta == 0.0:
        d = p * c - torch.exp(lp - lq_b + lp_t_b)
    elif beta == 1.0:
        d = p * (lq_b - lp_t_b - c)
    else:
        d = (1.0 - beta) * p * (lq_b - _mixture(lq_b, lp_t_b, beta) - c)
    return torch.where(p == 0, torch.zeros_like(d), d)


def topk_divergence_bwd(student, ids, tlp, stats, g, *, inv_tau: float, beta: float, valid=None, tau=None):
    V, k = student.shape[-1], ids.shape[-1]
    z_all, ids_all, tlp_all = student.reshape(-1, V), ids.reshape(-1, k).long(), tlp.reshape(-1, k)
    n = z_all.shape[0]
    acc = stats.dtype
    live = _live(valid, n, student.device)
    g = g.reshape(-1).to(acc)
    out = torch.empty((n, V), dtype=student.dtype, device=student.device)
    for a, b in row_chunks(n, V):
        st = stats[a:b]
        it = _inv_tau(inv_tau, tau, a, b, acc)
        lp = (z_all[a:b].to(acc) * it - st[:, 0:1]) - st[:, 1:2]
        c = st[:, 4:5]
        d = _bin_grad(lp, st[:, 2:3], st[:, 3:4], c, beta)
        row_ids = ids_all[a:b].clamp(0, V - 1)
        lq = lp.gather(-1, row_ids)
        d = d.scatter(-1, row_ids, _bin_grad(lq, lq, tlp_all[a:b].to(acc), c, beta))
        grad = (g[a:b, None] * it) * d
        out[a:b] = torch.where(live[a:b, None], grad, torch.zeros((), dtype=acc)).to(out.dtype)
    return out.view(student.shape)
