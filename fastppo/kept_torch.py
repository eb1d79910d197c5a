"""The pure-PyTorch twin of the kept-set launchers (kernels/kept.py): the same signatures, the same saved
statistics (m_K, log s_K separately; full-vocabulary lse and entropy when asked), the same logit transform
z' = softcap(logit_scale z) / tau (fastppo.logprobs_torch.transform, tau a float or one value per row). The
kept logits are gathered (O(nnz), no host sync: the row of each kept id comes from repeat_interleave with a
known output size) and reduced per row with segment_reduce; the full-vocabulary entropy and the dense gradient
are computed over bounded slices of rows (CHUNK_ELEMENTS values of [N, V] at a time). Ids outside [0, V) (another
vocabulary shard's) are skipped, forward and backward, as the kernels do."""

import torch

from .kernels.kept import KeptStats
from .logprobs_torch import transform

CHUNK_ELEMENTS = 1 << 22  # 16 MiB of fp32 per slice


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inv_tau(temperature, n, acc, device):
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != n:
            raise ValueError(f"temperature has {temperature.numel()} elements but logits have {n} rows")
        return 1.0 / temperature.reshape(-1).to(device=device, dtype=acc)
    return torch.full((n,), 1.0 / float(temperature), dtype=acc, device=device)


def _setup(logits, labels, ids, offsets, temperature, logit_scale, softcap):
    V = logits.shape[-1]
    z_all = logits.reshape(-1, V)
    n = z_all.shape[0]
    y = labels.reshape(-1)
    if y.numel() != n:
        raise ValueError(f"labels has {y.numel()} elements but logits have {n} rows")
    if offsets.numel() != n + 1:
        raise ValueError(f"kept offsets has {offsets.numel()} entries but logits have {n} rows "
                         f"(expected rows + 1 = {n + 1})")
    acc = _acc(logits.dtype)
    ids = ids.reshape(-1).long()
    offsets = offsets.reshape(-1)
    rows = torch.repeat_interleave(torch.arange(n, device=logits.device), offsets[1:] - offsets[:-1],
                                   output_size=ids.numel())
    ok = (ids >= 0) & (ids < V)                  # ids outside [0, V) (another shard's) are skipped
    ids = torch.where(ok, ids, -1)
    inv = _inv_tau(temperature, n, acc, logits.device)
    tf = lambda z, inv_tau: transform(z, inv_tau=inv_tau, logit_scale=logit_scale, softcap=softcap)  # noqa: E731
    z_k, dz_k = tf(z_all[rows, ids.clamp(min=0)].to(acc), inv[rows])
    z_k = torch.where(ok, z_k, float("-inf"))
    return V, z_all, n, y, acc, ids, offsets, rows, inv, z_k, dz_k, tf


def _row_slices(n, V):
    step = max(1, CHUNK_ELEMENTS // max(V, 1))
    for a in range(0, n, step):
        yield a, min(n, a + step)


def kept_logprobs_fwd(logits, labels, ids, offsets, *, temperature=1.0, ignore_index=-100, with_entropy=False,
                      logit_scale=1.0, softcap=None, raw_stats=False):
    """fastppo.kernels.kept.kept_logprobs_fwd (same arguments and results; ids outside [0, V) skipped,
    raw_stats as there)."""
    V, z_all, n, y, acc, ids, offsets, rows, inv, z_k, _, tf = _setup(logits, labels, ids, offsets, temperature,
                                                                        logit_scale, softcap)
    live = y != ignore_index
    zero = torch.zeros((), dtype=acc, device=logits.device)
    m = torch.segment_reduce(z_k, "max", offsets=offsets, unsafe=True)
    m_ref = torch.where(m == float("-inf"), zero, m)
    s = torch.segment_reduce(torch.exp(z_k - m_ref[rows]), "sum", offsets=offsets, unsafe=True)
    hits = torch.segment_reduce(((ids == y[rows]) & (ids >= 0)).to(acc), "sum", offsets=offsets, unsafe=True)
    found = hits > 0
    in_range = (y >= 0) & (y < V)
    z_y, _ = tf(z_all.gather(1, torch.where(in_range, y, 0).unsqueeze(1)).squeeze(1).to(acc), inv)
    keep = found | raw_stats
    m_k = torch.where(keep, m, zero)
    log_s = torch.where(keep, torch.log(s), torch.full_like(s, float("nan")))
    logp = torch.where(found, (z_y - m) - torch.log(s), torch.full_like(s, float("nan")))
    logp, m_k, log_s = (torch.where(live, t, zero) for t in (logp, m_k, log_s))
    lse = ent = None
    if with_entropy:
        lse = torch.zeros(n, dtype=acc, device=logits.device)
        ent = torch.zeros_like(lse)
        for a, b in _row_slices(n, V):
            z, _ = tf(z_all[a:b].to(acc), inv[a:b, None])
            mf = z.amax(-1, keepdim=True)
            mf = torch.where(mf == float("-inf"), zero, mf)
            zs = z - mf
            e = torch.exp(zs)
            sf = e.sum(-1)
            t = (e * torch.where(z == float("-inf"), zero, zs)).sum(-1)
            lv = live[a:b]
            lse[a:b] = torch.where(lv, mf.squeeze(-1) + torch.log(sf), zero)
            ent[a:b] = torch.where(lv, torch.log(sf) - t / sf, zero)
    return KeptStats(logp, m_k, log_s, lse, ent)


def kept_logprobs_bwd(logits, labels, ids, offsets, stats, c_logp, c_ent=None, *, temperature=1.0,
                      ignore_index=-100, logit_scale=1.0, softcap=None):
    V, z_all, n, y, acc, ids, offsets, rows, inv, z_k, dz_k, tf = _setup(logits, labels, ids, offsets, temperature,
                                                                           logit_scale, softcap)
    has_ent = c_ent is not None
    if has_ent and stats.entropy is None:
        raise ValueError("an entropy gradient (c_ent) needs the forward's entropy: run kept_logprobs_fwd "
                         "with with_entropy=True")
    live = y != ignore_index
    zero = torch.zeros((), dtype=acc, device=logits.device)
    c_logp = c_logp.reshape(-1).to(acc)
    c_ent = c_ent.reshape(-1).to(acc) if has_ent else None
    buf = torch.zeros(n * V + 1, dtype=logits.dtype, device=logits.device)
    out = buf[: n * V].view(n, V)
    if has_ent:
        for a, b in _row_slices(n, V):
            z, dz = tf(z_all[a:b].to(acc), inv[a:b, None])
            lse = stats.lse[a:b, None].to(acc)
            lp = torch.where(z == float("-inf"), zero, z - lse)
            g = -c_ent[a:b, None] * torch.exp(z - lse) * (lp + stats.entropy[a:b, None].to(acc)) * dz
            out[a:b] = torch.where(live[a:b, None], g, zero).to(logits.dtype)
    p_k = torch.exp((z_k - stats.m[rows].to(acc)) - stats.log_s[rows].to(acc))
    g_k = c_logp[rows] * ((ids == y[rows]).to(acc) - p_k)
    if has_ent:
        lse = stats.lse[rows].to(acc)
        lp = torch.where(z_k == float("-inf"), zero, z_k - lse)
        g_k = g_k - c_ent[rows] * torch.exp(z_k - lse) * (lp + stats.entropy[rows].to(acc))
    g_k = torch.where(live[rows], g_k * dz_k, zero)
    # skipped ids write to one spare element past the [N, V] block (no host sync to drop them)
    buf[torch.where(ids >= 0, rows * V + ids, n * V)] = g_k.to(logits.dtype)
    return out.view(logits.shape)
