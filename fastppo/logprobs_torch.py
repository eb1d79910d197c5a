"""The pure-PyTorch backend of token_logprobs (and the log-prob pass of the fused losses): the same
interface as the Triton launchers (`logprobs_fwd`, `logprobs_bwd`), computed in fp32 over bounded
slices of rows so that no more than a few LOGPROBS_CHUNK_ELEMENTS fp32 slices of [N, V] are alive at once, forward or
backward (the other logits ops' slices, row_chunks' default, are CHUNK_ELEMENTS)."""

import torch

CHUNK_ELEMENTS = 1 << 22  # 16 MiB of fp32 per slice
LOGPROBS_CHUNK_ELEMENTS = 1 << 24   # token_logprobs' slices: 64 MiB of fp32, ~110 rows at V = 152k (TRL's
                                    # entropy_from_logits takes 128): fewer, larger passes run 1.6x faster on CPU


def row_chunks(n_rows: int, n_cols: int, elements: int | None = None):
    """(start, end) of slices of at most `elements` (default CHUNK_ELEMENTS) values, at least one row each."""
    step = max(1, (CHUNK_ELEMENTS if elements is None else elements) // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def transform(z, *, inv_tau, logit_scale=1.0, softcap=None):
    """z' = softcap(scale * z) / tau (softcap(x) = c tanh(x / c)) and dz'/dz, in z's dtype. Without a softcap and
    with a factor of exactly 1 (a float), z itself (no copy: callers must not write into it) and 1.0."""
    if softcap is None:
        f = logit_scale * inv_tau
        if isinstance(f, float) and f == 1.0:
            return z, 1.0
        return z * f, f
    th = torch.tanh(z * (logit_scale / softcap))
    return th * (softcap * inv_tau), (logit_scale * inv_tau) * (1 - th * th)


def _live_rows(y, ignore_index, valid):
    live = y != ignore_index
    if valid is not None:
        live = live & (valid.reshape(-1) != 0)
    return live


def _inv_tau(inv_tau, tau, a, b, acc):
    """The chunk's 1 / temperature: the scalar inv_tau, or 1 / tau[a:b] per row ([b - a, 1]) when given."""
    if tau is None:
        return inv_tau
    return 1.0 / tau.reshape(-1)[a:b].to(acc).unsqueeze(-1)


def logprobs_fwd(logits, labels, *, inv_tau, ignore_index, with_entropy, logit_scale=1.0, softcap=None,
                 valid=None, tau=None):
    """Entropy is kept relative to the row max, as the kernel does: with zs = z' - max, e = exp(zs),
    s = sum e, H = log s - sum(e zs) / s (no cancellation between lse and sum p z' for huge logits).
    The row max m and log s are saved apart (stats [N, 2], as the kernel does): logp = (z'_y - m) - log s
    is as exact as fp32 log_softmax at any magnitude. Dead rows (ignore_index label, `valid` 0) give
    logp = H = m = log s = 0."""
    V = logits.shape[-1]
    z_all = logits.reshape(-1, V)
    y_all = labels.reshape(-1)
    if y_all.numel() != z_all.shape[0]:
        raise ValueError(f"labels has {y_all.numel()} elements but logits have {z_all.shape[0]} rows")
    live_all = _live_rows(y_all, ignore_index, valid)
    n = z_all.shape[0]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.empty(n, dtype=acc, device=logits.device)
    stats = torch.empty((n, 2), dtype=acc, device=logits.device)
    ent = torch.empty_like(logp) if with_entropy else None
    for a, b in row_chunks(n, V, LOGPROBS_CHUNK_ELEMENTS):
        z, _ = transform(z_all[a:b].to(acc), inv_tau=_inv_tau(inv_tau, tau, a, b, acc), logit_scale=logit_scale,
                         softcap=softcap)
        y = y_all[a:b]
        live = live_all[a:b]
        in_range = (y >= 0) & (y < V)          # as the kernels: an out-of-range label gives NaN, no OOB read
        zero = torch.zeros((), dtype=acc, device=z.device)
        m = z.amax(-1, keepdim=True)
        m = torch.where(m == float("-inf"), zero, m)
        zs = z - m
        e = torch.exp(zs)
        s_row = e.sum(-1)
        log_s = torch.log(s_row)
        stats[a:b, 0] = torch.where(live, m.squeeze(-1), zero)
        stats[a:b, 1] = torch.where(live, log_s, zero)
        z_y = z.gather(-1, torch.where(live & in_range, y, 0).long().unsqueeze(-1)).squeeze(-1)
        logp[a:b] = torch.where(live, torch.where(in_range, (z_y - m.squeeze(-1)) - log_s, float("nan")), zero)
        if with_entropy:   # sum(e zs) with e zs = 0 where e = 0 (zs = -inf made finite; NaN stays NaN), in place
            t = e.mul_(zs.clamp_min_(torch.finfo(acc).min)).sum(-1)
            ent[a:b] = torch.where(live, log_s - t / s_row, zero)
    return logp, stats, ent


def logprobs_bwd(logits, labels, stats, ent, c_logp, c_ent, *, inv_tau, ignore_index, scale=None,
                 inplace=False, logit_scale=1.0, softcap=None, valid=None, tau=None):
    """p = exp((z' - m) - log s) from the saved row stats. Dead rows get an exact zero gradient row
    (selected with where: NaN there cannot leak). `c_logp` None (no log-prob upstream, e.g. only the entropy
    is differentiated) skips the log-prob term c_logp (onehot(y) - p) entirely: no one-hot, no product."""
    V = logits.shape[-1]
    z_all = logits.reshape(-1, V)
    y_all = labels.reshape(-1)
    live_all = _live_rows(y_all, ignore_index, valid)
    c_logp = None if c_logp is None else c_logp.reshape(-1)
    c_ent = None if c_ent is None else c_ent.reshape(-1)
    out = z_all if inplace and z_all.data_ptr() == logits.data_ptr() else torch.empty_like(z_all)
    for a, b in row_chunks(z_all.shape[0], V, LOGPROBS_CHUNK_ELEMENTS):
        z, dz = transform(z_all[a:b].to(stats.dtype), inv_tau=_inv_tau(inv_tau, tau, a, b, stats.dtype),
                          logit_scale=logit_scale, softcap=softcap)
        y = y_all[a:b]
        live = live_all[a:b]
        logp = (z - stats[a:b, :1]).sub_(stats[a:b, 1:])
        p = torch.exp(logp)
        g = None
        if c_logp is not None:   # c (onehot - p) = -c p, plus c at the label column
            c = c_logp[a:b].to(p.dtype).unsqueeze(-1)
            g = p * c.neg()
            hot = (live & (y >= 0) & (y < V)).unsqueeze(-1)   # an out-of-range label has no one-hot column
            g.scatter_add_(-1, torch.where(hot, y.unsqueeze(-1), 0).long(), torch.where(hot, c, 0.0))
        if c_ent is not None:    # -c_ent p (log p + H), 0 where p = 0 (log p = -inf made finite; NaN stays NaN)
            h = logp.clamp_min_(torch.finfo(p.dtype).min).add_(ent[a:b].unsqueeze(-1)).mul_(p)
            h.mul_(c_ent[a:b].to(p.dtype).unsqueeze(-1).neg())
            g = h if g is None else g.add_(h)
        if g is None:
            g = torch.zeros_like(p)
        if scale is not None:
            g.mul_(scale.to(p.dtype))
        if not (isinstance(dz, float) and dz == 1.0):
            g.mul_(dz)
        out[a:b] = g.masked_fill_(~live.unsqueeze(-1), 0)
    return out.view(logits.shape)
