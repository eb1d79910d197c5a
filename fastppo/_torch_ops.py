"""The pure-PyTorch backend of the logits ops: the same interface as the Triton launchers
(`logprobs_fwd`, `logprobs_bwd`), computed in fp32 over bounded slices of rows so that no more
than CHUNK_ELEMENTS fp32 values of [N, V] are alive at once, forward or backward."""

import torch

CHUNK_ELEMENTS = 1 << 22  # 16 MiB of fp32 per slice


def _row_chunks(n_rows: int, n_cols: int):
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def logprobs_fwd(logits, labels, *, inv_tau, ignore_index, with_entropy):
    V = logits.shape[-1]
    z_all = logits.reshape(-1, V)
    y_all = labels.reshape(-1)
    if y_all.numel() != z_all.shape[0]:
        raise ValueError(f"labels has {y_all.numel()} elements but logits have {z_all.shape[0]} rows")
    n = z_all.shape[0]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.empty(n, dtype=acc, device=logits.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if with_entropy else None
    for a, b in _row_chunks(n, V):
        z = z_all[a:b].to(acc) * inv_tau
        y = y_all[a:b]
        ignored = y == ignore_index
        in_range = (y >= 0) & (y < V)          # as the kernels: an out-of-range label gives NaN, no OOB read
        row_lse = torch.logsumexp(z, -1)
        lse[a:b] = row_lse
        z_y = z.gather(-1, y.masked_fill(~in_range, 0).long().unsqueeze(-1)).squeeze(-1)
        logp[a:b] = torch.where(ignored, 0.0, torch.where(in_range, z_y - row_lse, float("nan")))
        if with_entropy:
            p = torch.exp(z - row_lse.unsqueeze(-1))
            pz = torch.where(p > 0, p * z, torch.zeros_like(p)).sum(-1)
            ent[a:b] = (row_lse - pz).masked_fill(ignored, 0.0)
    return logp, lse, ent


def logprobs_bwd(logits, labels, lse, ent, c_logp, c_ent, *, inv_tau, ignore_index, scale=None,
                 inplace=False):
    V = logits.shape[-1]
    z_all = logits.reshape(-1, V)
    y_all = labels.reshape(-1)
    out = z_all if inplace and z_all.data_ptr() == logits.data_ptr() else torch.empty_like(z_all)
    for a, b in _row_chunks(z_all.shape[0], V):
        z = z_all[a:b].to(lse.dtype) * inv_tau
        y = y_all[a:b]
        keep = (y != ignore_index).to(z.dtype)
        p = torch.exp(z - lse[a:b].unsqueeze(-1))
        in_range = ((y >= 0) & (y < V)).unsqueeze(-1)   # an out-of-range label has no one-hot column
        onehot = torch.zeros_like(p).scatter_(-1, y.unsqueeze(-1).masked_fill(~in_range, 0).long(),
                                              in_range.to(p.dtype))
        g = (c_logp[a:b] * keep).unsqueeze(-1) * (onehot - p)
        if c_ent is not None:
            logp = torch.where(z == float("-inf"), torch.zeros_like(z), z - lse[a:b].unsqueeze(-1))
            g -= (c_ent[a:b] * keep).unsqueeze(-1) * p * (logp + ent[a:b].unsqueeze(-1))
        if scale is not None:
            g = g * scale
        out[a:b] = (g * inv_tau).to(out.dtype)
    return out.view(logits.shape)


def full_kl_fwd(logits, ref_logits, *, inv_tau):
    V = logits.shape[-1]
    zp_all, zq_all = logits.reshape(-1, V), ref_logits.reshape(-1, V)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    n = zp_all.shape[0]
    kl, lse_p, lse_q = (torch.empty(n, dtype=acc, device=logits.device) for _ in range(3))
    for a, b in _row_chunks(n, V):
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
    for a, b in _row_chunks(zp_all.shape[0], V):
        zp, zq = zp_all[a:b].to(kl.dtype) * inv_tau, zq_all[a:b].to(kl.dtype) * inv_tau
        logp = zp - lse_p[a:b].unsqueeze(-1)
        p = logp.exp()
        d = p * (logp - (zq - lse_q[a:b].unsqueeze(-1)) - kl[a:b].unsqueeze(-1)).masked_fill(p == 0, 0.0)
        out[a:b] = (g[a:b].unsqueeze(-1) * d * inv_tau).to(out.dtype)
    return out.view(logits.shape)


def _logit_chunk(hidden, weight, bias, v0, v1, inv_tau, acc):
    z = hidden.to(acc) @ weight[v0:v1].to(acc).t()
    if bias is not None:
        z = z + bias[v0:v1].to(acc)
    return z * inv_tau


def linear_fwd(hidden, weight, bias, labels, *, inv_tau, ignore_index, with_entropy):
    """The vocabulary in `linear_chunks` with an online logsumexp (and entropy sum) across chunks."""
    N = hidden.shape[0]
    V = weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    m = torch.full((N,), -float("inf"), dtype=acc, device=hidden.device)
    s = torch.zeros(N, dtype=acc, device=hidden.device)
    t = torch.zeros_like(s)
    z_y = torch.zeros_like(s)
    ignored = labels == ignore_index
    y = labels.masked_fill(ignored, 0).long()
    for v0, v1 in linear_chunks(N, V):
        z = _logit_chunk(hidden, weight, bias, v0, v1, inv_tau, acc)
        inside = (y >= v0) & (y < v1)
        z_y += torch.where(inside, z.gather(1, (y - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0], torch.zeros_like(s))
        m_new = torch.maximum(m, z.max(1).values)
        alpha = torch.exp(m - m_new)
        e = torch.exp(z - m_new[:, None])
        if with_entropy:
            t = alpha * (t + s * (m - m_new).nan_to_num(0.0)) + (e * (z - m_new[:, None])).sum(1)
        s = s * alpha + e.sum(1)
        m = m_new
    lse = m + torch.log(s)
    logp = (z_y - lse).masked_fill(ignored, 0.0)
    ent = (torch.log(s) - t / s).masked_fill(ignored, 0.0) if with_entropy else None
    return logp, lse, ent


def linear_dlogits_chunk(hidden, weight, bias, labels, lse, ent, c_logp, c_ent, v0, v1, out, *, inv_tau,
                         ignore_index):
    z = _logit_chunk(hidden, weight, bias, v0, v1, inv_tau, lse.dtype)
    keep = (labels != ignore_index).to(z.dtype)
    p = torch.exp(z - lse[:, None])
    cols = torch.arange(v0, v1, device=z.device)
    g = (c_logp * keep)[:, None] * ((cols[None, :] == labels[:, None]).to(z.dtype) - p)
    if c_ent is not None:
        g -= (c_ent * keep)[:, None] * p * (z - lse[:, None] + ent[:, None])
    out[:, : v1 - v0] = (g * inv_tau).to(out.dtype)
    return out


LINEAR_MIN_CHUNKS = 16


def linear_chunks(n_rows: int, n_cols: int):
    """Vocabulary chunks for the linear path: LINEAR_MIN_CHUNKS of them, so the [N, chunk] buffer is
    1/16 of the logits whatever N is."""
    width = max(1, -(-n_cols // LINEAR_MIN_CHUNKS))
    for v0 in range(0, n_cols, width):
        yield v0, min(n_cols, v0 + width)
