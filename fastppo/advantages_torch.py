"""The pure-PyTorch bodies of the advantage ops: gae (`gae_fwd`, the interface of fastppo.kernels.gae, its
CPU twin), and masked_whiten, group_advantages, kl_shaped_rewards (one implementation each, the same on
every device)."""

from __future__ import annotations

import torch

from .packed import segment_ids


def _out_dtype(*xs):
    """float32 results, float64 when an input is float64 (fp64 stays fp64 end to end)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def gae_fwd(rewards, values, mask, gamma, lam, cu_seqlens=None):
    """Mask-aware GAE (docs/design.md §4), vectorised over sequences, a loop over time in fp64 (as the
    kernel's scan). Returns (advantages, returns) [B, T], float32 (float64 when rewards or values are).
    Packed (cu_seqlens): `_gae_packed`."""
    if cu_seqlens is not None:
        return _gae_packed(rewards, values, mask, gamma, lam, cu_seqlens)
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


def _gae_packed(rewards, values, mask, gamma, lam, cu_seqlens):
    """GAE on packed [total] inputs: step k of the loop visits the k-th token from each sequence's end
    (index cu[s + 1] - 1 - k), vectorised over sequences. The loop runs to the longest sequence, read on the
    host: free on CPU, one sync on CUDA (the Triton backend, CUDA's default, never syncs)."""
    r, v, m = rewards.double(), values.double(), mask != 0
    cu = cu_seqlens.to(torch.int64)
    ends, lengths = cu[1:], cu[1:] - cu[:-1]
    adv = torch.zeros_like(r)
    g = torch.zeros(lengths.shape, dtype=torch.float64, device=r.device)
    v_next = torch.zeros_like(g)
    for k in range(int(lengths.max()) if lengths.numel() else 0):
        live = lengths > k
        idx = torch.where(live, ends - 1 - k, torch.zeros_like(ends))
        mt = live & m[idx]
        g_t = torch.where(mt, r[idx] - v[idx], 0.0) + gamma * v_next + gamma * lam * g
        g = torch.where(mt, g_t, g)
        v_next = torch.where(mt, v[idx], v_next)
        adv = adv.index_put((idx[live],), g_t[live])
    adv = torch.where(m, adv, torch.zeros_like(adv))
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


def kl_shaped_rewards_torch(scores, kl, mask, kl_coef, cu_seqlens=None):
    """No value-dependent shapes: the score lands where the position equals the last mask-1 position
    (packed: of its sequence, the sequences' last positions by a scatter max, which is order independent)."""
    m = mask != 0
    dt = _out_dtype(scores, kl)
    zero = torch.zeros((), dtype=dt, device=kl.device)
    out = torch.where(m, -kl_coef * kl.to(dt), zero)
    if cu_seqlens is not None:
        seg = segment_ids(cu_seqlens, m.shape[0])
        positions = torch.arange(m.shape[0], device=m.device)
        last = torch.full((cu_seqlens.shape[0] - 1,), -1, dtype=torch.int64, device=m.device)
        last = last.scatter_reduce(0, seg, torch.where(m, positions, -1), "amax")
        return out + torch.where(positions == last[seg], scores.to(dt)[seg], zero)
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(m, positions, torch.full_like(positions, -1)).amax(-1, keepdim=True)
    return out + torch.where(positions == last, scores.to(dt)[:, None], zero)
