"""The pure-PyTorch backend of token_logprobs (and the log-prob pass of the fused losses): the same
interface as the Triton launchers (`logprobs_fwd`, `logprobs_bwd`), computed in fp32 over bounded
slices of rows so that no more than a few LOGPROBS_CHUNK_ELEMENTS fp32 slices of [N, V] are alive at once, forward or
backward (the other logits ops' slices, row_chunks' default, are CHUNK_ELEMENTS)."""

import torch

CHUNK_ELEMENTS = 1 << 22  # 16 MiB of fp32 per slice
LOGPROBS_CHUNK_ELEMENTS = 1 << 24   # token_logprobs' slices off CPU: 64 MiB of fp32, ~110 rows at V = 152k
CPU_CHUNK_ELEMENTS = 1 << 18        # on one CPU thread: 1 MiB of fp32 (one row at V = 152k), so the two working
                                    # slices stay in a 2 MiB L2 and every pass after the first read runs from cache:
                                    # OpenRLHF's torch.compile'd compute_entropy speed in eager PyTorch


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


def _slice_elements(device) -> int:
    """Values per slice: on a single-threaded CPU a cache-sized slice (CPU_CHUNK_ELEMENTS), so the few passes over
    a slice after its first read run from cache; elsewhere LOGPROBS_CHUNK_ELEMENTS (fewer, larger launches: with
    several intra-op threads every op on a small slice is a parallel region of its own, whose start and barrier
    cost more than the cache saves, ~5x slower measured on 2 loaded cores)."""
    cached = device.type == "cpu" and torch.get_num_threads() == 1
    return CPU_CHUNK_ELEMENTS if cached else LOGPROBS_CHUNK_ELEMENTS


def _buffers(n, V, acc, device):
    """Two reusable [rows, V] working slices (each pass writes into them: no allocation per slice)."""
    rows = min(n, max(1, _slice_elements(device) // max(V, 1)))
    return torch.empty((rows, V), dtype=acc, device=device), torch.empty((rows, V), dtype=acc, device=device)


def logprobs_fwd(logits, labels, *, inv_tau, ignore_index, with_entropy, logit_scale=1.0, softcap=None,
                 valid=None, tau=None):
    """Entropy is kept relative to the row max, as the kernel does: with zs = z' - max, e = exp(zs),
    s = sum e, H = log s - sum(e zs) / s (no cancellation between lse and sum p z' for huge logits).
    The row max m and log s are saved apart (stats [N, 2], as the kernel does): logp = (z'_y - m) - log s
    is as exact as fp32 log_softmax at any magnitude. Dead rows (ignore_index label, `valid` 0) give
    logp = H = m = log s = 0. Per slice: one read of the logits (max), then zs and e written into two reusable
    working slices, their sums, the label's zs gathered; the per-row results are finished once for all rows."""
    V = logits.shape[-1]
    z_all = logits.reshape(-1, V)
    y_all = labels.reshape(-1)
    if y_all.numel() != z_all.shape[0]:
        raise ValueError(f"labels has {y_all.numel()} elements but logits have {z_all.shape[0]} rows")
    live = _live_rows(y_all, ignore_index, valid)
    n = z_all.shape[0]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    dev = logits.device
    in_range = (y_all >= 0) & (y_all < V)          # as the kernels: an out-of-range label gives NaN, no OOB read
    y_safe = torch.where(live & in_range, y_all, 0).long().unsqueeze(-1)
    m_all = torch.empty((n, 1), dtype=acc, device=dev)
    s_all = torch.empty(n, dtype=acc, device=dev)
    zy_all = torch.empty((n, 1), dtype=acc, device=dev)     # zs at the label: z'_y - m
    t_all = torch.empty(n, dtype=acc, device=dev) if with_entropy else None
    buf_zs, buf_e = _buffers(n, V, acc, dev)
    for a, b in row_chunks(n, V, buf_zs.shape[0] * max(V, 1)):
        z, _ = transform(z_all[a:b].to(acc), inv_tau=_inv_tau(inv_tau, tau, a, b, acc), logit_scale=logit_scale,
                         softcap=softcap)
        m = z.amax(-1, keepdim=True)
        m = torch.where(m == float("-inf"), 0.0, m)
        m_all[a:b] = m
        zs = torch.sub(z, m, out=buf_zs[:b - a])
        e = torch.exp(zs, out=buf_e[:b - a])
        torch.sum(e, -1, out=s_all[a:b])
        torch.gather(zs, -1, y_safe[a:b], out=zy_all[a:b])
        if with_entropy:   # sum(e zs), in place; e zs = 0 * -inf = NaN only where e = 0 (skipped by nansum): a NaN /
            torch.nansum(e.mul_(zs), -1, out=t_all[a:b])   # +inf logit makes m, hence s and H, NaN anyway
    zero = torch.zeros((), dtype=acc, device=dev)
    log_s = torch.log(s_all)
    stats = torch.stack([torch.where(live, m_all.squeeze(-1), zero), torch.where(live, log_s, zero)], -1)
    logp = torch.where(live, torch.where(in_range, zy_all.squeeze(-1) - log_s, float("nan")), zero)
    ent = torch.where(live, log_s - t_all / s_all, zero) if with_entropy else None
    return logp, stats, ent


def logprobs_bwd(logits, labels, stats, ent, c_logp, c_ent, *, inv_tau, ignore_index, scale=None,
                 inplace=False, logit_scale=1.0, softcap=None, valid=None, tau=None):
    """p = exp((z' - m) - log s) from the saved row stats. Dead rows get an exact zero gradient row
    (selected with masked_fill: NaN there cannot leak). `c_logp` None (no log-prob upstream, e.g. only the
    entropy is differentiated) skips the log-prob term c_logp (onehot(y) - p) entirely: no one-hot, no product.
    Per slice: one read of the logits, log p and p written into two reusable working slices, the terms
    formed in place there, and one write of the gradient slice that also applies the per-row factor (the one
    upstream gradient, times `scale`; 0 on dead rows)."""
    V = logits.shape[-1]
    z_all = logits.reshape(-1, V)
    y_all = labels.reshape(-1)
    n = z_all.shape[0]
    acc = stats.dtype
    live = _live_rows(y_all, ignore_index, valid)
    dead = (~live).unsqueeze(-1)
    zero = torch.zeros((), dtype=acc, device=logits.device)
    neg_lp = None if c_logp is None else c_logp.reshape(-1).to(acc).neg().unsqueeze(-1)
    neg_ent = None if c_ent is None else c_ent.reshape(-1).to(acc).neg().unsqueeze(-1)
    if neg_lp is not None:
        hot = (live & (y_all >= 0) & (y_all < V)).unsqueeze(-1)   # an out-of-range label has no one-hot column
        y_hot = torch.where(hot, y_all.unsqueeze(-1), 0).long()
        minus_hot = torch.where(hot, -1.0, zero).to(acc)
    # the factor applied in the write: the upstream gradient of the one term present (else 1), times scale
    only = neg_ent if neg_lp is None else (neg_lp if neg_ent is None else None)
    factor = torch.ones((n, 1), dtype=acc, device=logits.device) if only is None else only
    if scale is not None:
        factor = factor * scale.to(acc)
    factor = torch.where(dead, zero, factor)
    out = z_all if inplace and z_all.data_ptr() == logits.data_ptr() else torch.empty_like(z_all)
    buf_lp, buf_p = _buffers(n, V, acc, logits.device)
    for a, b in row_chunks(n, V, buf_lp.shape[0] * max(V, 1)):
        k = b - a
        z, dz = transform(z_all[a:b].to(acc), inv_tau=_inv_tau(inv_tau, tau, a, b, acc),
                          logit_scale=logit_scale, softcap=softcap)
        logp = torch.sub(z, stats[a:b, :1], out=buf_lp[:k]).sub_(stats[a:b, 1:])
        p = torch.exp(logp, out=buf_p[:k])
        g = None
        if neg_ent is not None:    # p (log p + H), 0 where p = 0 (log p = -inf made finite; NaN stays NaN)
            g = logp.clamp_min_(torch.finfo(acc).min).add_(ent[a:b].unsqueeze(-1)).mul_(p)
        if neg_lp is not None:     # p - onehot(y) (times -c_logp: c_logp (onehot - p))
            h = p.scatter_add_(-1, y_hot[a:b], minus_hot[a:b])
            if g is None:
                g = h
            else:   # both terms: each times its own upstream gradient here
                g = g.mul_(neg_ent[a:b]).add_(h.mul_(neg_lp[a:b]))
        if g is None:
            g = logp.zero_()
        if not (isinstance(dz, float) and dz == 1.0):
            g.mul_(dz)
        torch.mul(g.masked_fill_(dead[a:b], 0), factor[a:b], out=out[a:b])
    return out.view(logits.shape)
