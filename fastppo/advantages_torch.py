"""The pure-PyTorch bodies of the advantage ops: gae (`gae_fwd`, the interface of fastppo.kernels.gae, its
CPU twin), and masked_whiten, group_advantages, kl_shaped_rewards (one implementation each, the same on
every device)."""

from __future__ import annotations

import torch


def _out_dtype(*xs):
    """float32 results, float64 when an input is float64 (fp64 stays fp64 end to end)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def gae_fwd(rewards, values, mask, gamma, lam):
    """Mask-aware GAE (docs/design.md §4), vectorised over sequences, a loop over time in fp64 (as the
    kernel's scan). Returns (advantages, returns) [B, T], float32 (float64 when rewards or values are)."""
    r, v, m = rewards.double(), values.double(), mask != 0
    B, T = r.shape
    adv = torch.zeros(B, T, dtype=torch.float64, device=r.device)
    g = torch.zeros(B, dtype=torch.float64, device=r.device)
    v_next = torch.zeros_like(g)
    for t in reversed(range(T)):
        mt = m[:, t]
        g_t = torch.where(mt, r[:, t] - v[:, t], 0.0) + gamma * v_next + gamma * lam * g
        g = torch.where(mt, g_t, g)
        v_next = torch.where(mt, v[:, t], v_next)
        adv[:, t] = torch.where(mt, g_t, torch.zeros_like(g_t))
    out = torch.float64 if torch.float64 in (rewards.dtype, values.dtype) else torch.float32
    return adv.to(out), torch.where(m, adv + v, torch.zeros_like(adv)).to(out)


def masked_whiten_torch(x, mask, shift_mean):
    m = mask != 0
    n = m.sum()
    xd = torch.where(m, x.double(), 0.0)
    a = xd.abs().amax()
    a = torch.where((a > 0) & torch.isfinite(a), a, torch.ones_like(a))   # inf / NaN stay NaN below
    xs = xd / a
    mean_s = xs.sum() / n
    d = torch.where(m, xs - mean_s, 0.0)
    q = d.square().sum() / (n - 1)
    out = d / torch.sqrt(q + 1e-8 / a.square())
    if not shift_mean:
        out = out + mean_s * a
    return torch.where(m, out, 0.0).to(_out_dtype(x))


def group_advantages_torch(scores, group_size, kind, norm_by_std, eps):
    out_dtype = _out_dtype(scores)
    if group_size == 1:
        return torch.zeros_like(scores, dtype=out_dtype)
    s = scores.double().view(-1, group_size)
    mean = s.mean(-1, keepdim=True)
    if kind == "rloo":
        out = s - (s.sum(-1, keepdim=True) - s) / (group_size - 1)
    else:
        out = s - mean
        if norm_by_std:
            out = out / (s.std(-1, keepdim=True) + eps)
    return out.reshape(-1).to(out_dtype)


def kl_shaped_rewards_torch(scores, kl, mask, kl_coef):
    """No value-dependent shapes: the score lands where the position equals the last mask-1 position."""
    m = mask != 0
    dt = _out_dtype(scores, kl)
    zero = torch.zeros((), dtype=dt, device=kl.device)
    out = torch.where(m, -kl_coef * kl.to(dt), zero)
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(m, positions, torch.full_like(positions, -1)).amax(-1, keepdim=True)
    return out + torch.where(positions == last, scores.to(dt)[:, None], zero)
