"""float64 reference of mismatch_stats, written per sequence from the definitions in kernels/mismatch.py
(verl 0.9.1 `compute_offpolicy_metrics`: k3_kl = E[exp(d) - d - 1]; chi2 = E[exp(2 clamp(d, -20, 20))] - 1). The
oracle for tests, not a backend."""

import math

import torch

from .mismatch import STATS


def _terms(d, eps):
    """(k3, rho^2, rho, outside, |d|) of one log ratio d (a Python float)."""
    dc = min(max(d, -20.0), 20.0)
    r = math.inf if d > 709 else math.exp(d)
    return r - d - 1.0, math.exp(2 * dc), math.exp(dc), float(r < 1 - eps or r > 1 + eps), abs(d)


def _summarise(terms):
    if not terms:
        return [math.nan] * 5
    cols = list(zip(*terms))
    k3, rho2, rho, out = (math.fsum(c) / len(terms) for c in cols[:4])
    abs_max = math.nan if any(math.isnan(v) for v in cols[4]) else max(cols[4])
    return [k3, rho2 - 1.0, abs_max, rho, out]


def mismatch_stats(train_logprobs, rollout_logprobs, mask, *, eps=0.1):
    """Dict of float64 0-d tensors, keys STATS."""
    x, y, m = train_logprobs.double().tolist(), rollout_logprobs.double().tolist(), (mask != 0).tolist()
    tok, seq = [], []
    for xb, yb, mb in zip(x, y, m):
        ds = [a - b for a, b, keep in zip(xb, yb, mb) if keep]
        tok += [_terms(d, eps) for d in ds]
        if ds:
            seq.append(_terms(math.fsum(ds), eps))
    values = _summarise(tok) + _summarise(seq) + [float(len(tok)), float(len(seq))]
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in zip(STATS, values)}
