"""The pure-PyTorch backend of the linear ops: the Triton launchers' interface (per-row outputs by
original row, gradients for per-row coefficients), computed over slices of valid rows so that no
more than CHUNK_ELEMENTS values of the [N, V] logits are alive at once. The logits are accumulated and kept in
fp32 (fp64 for fp64) whatever the input dtype, as on the Triton path: the weight is upcast a block of at most
CHUNK_ELEMENTS values at a time (never a whole fp32 copy of it), and the softmax keeps the row max m and log s
apart (logp = (z'_y - m) - log s, exact at any magnitude, as fp32 log_softmax is).

Only valid rows are projected: on CPU they are gathered (`nonzero` costs nothing there); on other
devices (a forced torch backend) every row is projected with invalid rows' hidden replaced by 0
(selected, never multiplied, so a NaN there cannot leak).

Batch invariance: a BLAS picks its kernel (and so the summation order of a dot product) by the shape of the
product, e.g. a matrix-vector kernel for one row and a blocked one for several, so `h @ W.T` of one row is not
bitwise the same alone and among others. Every product whose rows are output rows (the logits, d_hidden) is
therefore taken over blocks of exactly ROW_BLOCK rows (the last one zero-padded; `_mm_rows`): a row's logits
and d_hidden never depend on how many rows, or which, share the call (tested, tests/ops/test_batch_invariance.py;
about 1.6x the time of one large product on a 1-thread CPU at H = 512, V = 8192)."""

from __future__ import annotations

import torch

from .kernels import _config as cfg
from .kernels.linear_kept import compact_kept

CHUNK_ELEMENTS = 1 << 22  # 16 MiB of fp32 per slice
ROW_BLOCK = 64            # rows per product (batch invariance, module doc)
WEIGHT_SHARE = 8          # a slice's logits ~ the weight's values / WEIGHT_SHARE (slice_rows)
MAX_SLICE_ELEMENTS = 1 << 25   # 128 MiB of fp32 per [rows, V] slice buffer


def _mm_rows(x, w_t, out):
    """out = x @ w_t, taken over blocks of exactly ROW_BLOCK rows of x (the last one zero-padded), each as
    (w_t^T x_b^T)^T: with the long weight dimension as the product's rows a CPU BLAS runs 1.3-1.6x the FLOP
    rate of x_b w_t at ROW_BLOCK = 64 (measured at H = 896, V = 151936), the transposed copy included."""
    n = x.shape[0]
    for a in range(0, n, ROW_BLOCK):
        b = min(n, a + ROW_BLOCK)
        xb = x[a:b]
        if b - a < ROW_BLOCK:
            xb = torch.cat([xb, xb.new_zeros(ROW_BLOCK - (b - a), x.shape[1])])
        out[a:b] = torch.mm(w_t.t(), xb.t()).t()[:b - a]
    return out


def _acc(hidden, weight):
    return torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32


def _selected(hidden2d, valid):
    """(row ids or None, hidden rows to project)."""
    if hidden2d.device.type == "cpu":
        sel = valid.nonzero().squeeze(1)
        return sel, hidden2d.index_select(0, sel)
    return None, torch.where(valid[:, None], hidden2d, torch.zeros((), dtype=hidden2d.dtype, device=hidden2d.device))


def slice_rows(V, H):
    """Rows per slice: a multiple of ROW_BLOCK (a smaller slice would be zero-padded to ROW_BLOCK rows by
    `_mm_rows`, wasted products), so that the slice's [rows, V] logits hold about 1 / WEIGHT_SHARE of the
    weight's V * H values (rows ~ H / WEIGHT_SHARE: each slice's products re-stream the [V, H] weight, so the
    slice grows with H to amortise it), at least CHUNK_ELEMENTS and at most MAX_SLICE_ELEMENTS values.
    The grouping never changes a row's values (products over ROW_BLOCK rows, module doc)."""
    budget = min(max(CHUNK_ELEMENTS, V * H // WEIGHT_SHARE), MAX_SLICE_ELEMENTS)
    return max(1, budget // max(V, 1) // ROW_BLOCK) * ROW_BLOCK


def _slices(n_rows, V, H):
    step = slice_rows(V, H)
    for a in range(0, n_rows, step):
        yield a, min(n_rows, a + step)


def _weight_blocks(weight, acc):
    """(v0, v1, weight[v0:v1] in acc), blocks of at most CHUNK_ELEMENTS values (no copy when already acc)."""
    V, H = weight.shape
    step = V if weight.dtype == acc else max(1, CHUNK_ELEMENTS // max(H, 1))
    for v0 in range(0, V, step):
        v1 = min(V, v0 + step)
        yield v0, v1, weight[v0:v1].to(acc)


def logits(h, weight, bias, opts, acc, inv_tau=None, row_blocks=True, logits_dtype=None):
    """z' = softcap(logit_scale (h W^T + b)) / tau in acc, plus tanh(.) for the softcap derivative (or None).
    The product is accumulated and kept in acc from upcast operands (bf16 / fp16 products are exact in fp32):
    never rounded to the input dtype before the softmax, unless `logits_dtype` ("bfloat16" / "float16", the
    linear ops' option) asks for the engine's rounding of h W^T + b. `inv_tau`: per-row 1 / temperature
    ([rows, 1]) in place of opts.inv_tau. `row_blocks`: the product over blocks of ROW_BLOCK rows (batch
    invariance, module doc); False takes it whole (no padded rows: for callers that promise no per-row
    invariance)."""
    hz = h.to(acc)
    z = torch.empty(h.shape[0], weight.shape[0], dtype=acc, device=h.device)
    for v0, v1, w in _weight_blocks(weight, acc):
        if row_blocks:
            _mm_rows(hz, w.t(), z[:, v0:v1])
        else:
            torch.matmul(hz, w.t(), out=z[:, v0:v1])
    if bias is not None:
        z += bias.to(acc)
    if logits_dtype is not None:     # the engine's rounded logits (gradients pass straight through)
        z = z.to(getattr(torch, logits_dtype)).to(acc)
    if opts.logit_scale != 1.0:
        z *= opts.logit_scale
    th = None
    if opts.softcap is not None:
        th = torch.tanh(z / opts.softcap)
        z = opts.softcap * th
    inv = opts.inv_tau if inv_tau is None else inv_tau
    if not (isinstance(inv, float) and inv == 1.0):   # in place, no pass for a unit factor
        z *= inv
    return z, th


def _row_inv_tau(tau, sel, acc):
    """Per selected row 1 / temperature [n, 1] (None without per-row temperatures)."""
    if tau is None:
        return None
    t = tau.reshape(-1) if sel is None else tau.reshape(-1).index_select(0, sel)
    return 1.0 / t.to(acc).unsqueeze(-1)


def _kept_entries(kept, valid, sel):
    """(ids, row) of every kept entry: row = its position among the projected rows (the selected ones, in
    order), or a number past them for entries of other rows or outside this weight's vocabulary range."""
    n = valid.numel()
    idx = torch.arange(n, device=valid.device) if sel is None else torch.argsort((~valid).to(torch.int8), stable=True)
    ids, offsets = compact_kept(kept.ids, kept.offsets, idx, kept.start, kept.size)
    counts = torch.cat([offsets[1:] - offsets[:-1], (ids.numel() - offsets[-1:])])
    return ids, torch.repeat_interleave(torch.arange(n + 1, device=ids.device), counts, output_size=ids.numel())


def _kept_mask(entries, a, b, V):
    """Bool [b - a, V]: the kept columns of projected rows [a, b) (no host sync: O(nnz) scatter of ones)."""
    ids, row = entries
    rel = row - a
    inside = (rel >= 0) & (rel < b - a)
    hits = torch.zeros(b - a + 1, V, dtype=torch.int32, device=ids.device)
    hits.index_put_((torch.where(inside, rel, b - a), torch.where(inside, ids, 0)),
                    torch.ones_like(ids, dtype=torch.int32), accumulate=True)
    return hits[:b - a] > 0


def _kept_forward(z, y, in_range, km):
    """(logp over the kept set, (m_K, log s_K)) of a slice of z' with kept mask km."""
    zk = torch.where(km, z, float("-inf"))
    m = zk.amax(-1)
    e = torch.exp(zk - torch.where(m == float("-inf"), torch.zeros_like(m), m)[:, None])
    log_s = torch.log(e.sum(-1))
    safe = y.clamp(0, z.shape[1] - 1).long()[:, None]
    found = km.gather(1, safe)[:, 0] & in_range
    log_s = torch.where(in_range & ~found, float("nan"), log_s)   # a label not kept: NaN gradient over K too
    logp = torch.where(found, (z.gather(1, safe)[:, 0] - m) - log_s, torch.full_like(m, float("nan")))
    return logp, torch.stack((m, log_s), 1)


def forward(hidden2d, weight, bias, labels, valid, opts, tau=None, kept=None):
    """Per original row: logp, ent, log_sum_sq_probs, mean_logits, is_top1 (zeros where not valid) and lse,
    the [N, 2] row statistics (max m, log s); with `kept` (fastppo.linear_pipeline.KeptArg) logp over the kept
    set and klse, its statistics (m_K, log s_K)."""
    N, V = hidden2d.shape[0], weight.shape[0]
    acc = _acc(hidden2d, weight)
    dev = hidden2d.device
    sel, h = _selected(hidden2d, valid)
    y_all = labels if sel is None else labels.index_select(0, sel)
    n = h.shape[0]
    inv = _row_inv_tau(tau, sel, acc)
    res = {k: torch.zeros(n, dtype=acc, device=dev) for k in ("logp", "ent", "sq", "mean")}
    res["lse"] = torch.zeros(n, 2, dtype=acc, device=dev)
    res["top1"] = torch.zeros(n, dtype=torch.bool, device=dev)
    entries = None if kept is None else _kept_entries(kept, valid, sel)
    if kept is not None:
        res["klse"] = torch.zeros(n, 2, dtype=acc, device=dev)
    for a, b in _slices(n, V, hidden2d.shape[1]):
        z, _ = logits(h[a:b], weight, bias, opts, acc, None if inv is None else inv[a:b],
                      logits_dtype=opts.logits_dtype)
        y = y_all[a:b]
        in_range = (y >= 0) & (y < V)
        m = z.amax(-1, keepdim=True)
        m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
        zs = z - m
        e = torch.exp(zs)
        s_row = e.sum(-1)
        log_s = torch.log(s_row)
        z_y = zs.gather(1, y.clamp(0, V - 1).long()[:, None])[:, 0]
        res["lse"][a:b, 0], res["lse"][a:b, 1] = m[:, 0], log_s
        res["logp"][a:b] = torch.where(in_range, z_y - log_s, torch.full_like(log_s, float("nan")))
        if kept is not None:
            res["logp"][a:b], res["klse"][a:b] = _kept_forward(z, y, in_range, _kept_mask(entries, a, b, V))
        if opts.with_entropy:
            res["ent"][a:b] = log_s - torch.where(e == 0, torch.zeros_like(e), e * zs).sum(-1) / s_row
        if opts.extras:
            res["sq"][a:b] = torch.logsumexp(2 * zs, -1) - 2 * log_s
            res["mean"][a:b] = z.mean(-1)
            first = z.argmax(-1)
            res["top1"][a:b] = in_range & (first == y)
    out = {}
    for k, v in res.items():
        if sel is None:
            out[k] = torch.where(valid.view(-1, *([1] * (v.dim() - 1))), v, torch.zeros((), dtype=v.dtype, device=dev))
        else:
            out[k] = torch.zeros(N, *v.shape[1:], dtype=v.dtype, device=dev).index_copy_(0, sel, v)
    return out


def filter_keep(p, y, eps, block=None):
    """Bool [rows, V]: the entries the gradient filter keeps (kernels/linear_filter.py's rule): those of the
    vocabulary tiles [t B, (t + 1) B) where some |onehot(y)_j - p_j| of the row is not below eps (NaN keeps)."""
    block = cfg.LIN_BLOCK_V if block is None else block
    n, V = p.shape
    hot = ((y >= 0) & (y < V))[:, None]
    d = p.scatter_add(1, torch.where(hot, y[:, None], 0).long(), torch.where(hot, -1.0, 0.0).to(p.dtype))
    small = torch.nn.functional.pad(d.abs_() < eps, (0, -V % block), value=True)
    return (~small.view(n, -1, block).all(-1)).repeat_interleave(block, 1)[:, :V]


def grads(hidden2d, weight, bias, labels, valid, lse, ent, c_logp, c_ent, opts, needs, tau=None, kept=None,
          klse=None):
    """(d_hidden, d_weight, d_bias) of sum_i c_logp_i logp_i + c_ent_i H_i over valid rows (per original row
    coefficients; fp32 sums, fp64 for fp64); with `kept`, logp over the kept set, whose statistics are klse
    (d logp / dz'_j = onehot(y)_j - p_K,j on the kept columns, 0 elsewhere)."""
    N, H = hidden2d.shape
    V = weight.shape[0]
    acc = _acc(hidden2d, weight)
    sel, h = _selected(hidden2d, valid)
    pick = (lambda x: x) if sel is None else (lambda x: x.index_select(0, sel))
    y_all, lse_s, cl, vrow = pick(labels), pick(lse), pick(c_logp).to(acc), pick(valid)
    ce = None if c_ent is None else pick(c_ent).to(acc)
    ent_s = None if c_ent is None else pick(ent)
    dh = torch.zeros(h.shape, dtype=acc, device=h.device) if needs[0] else None
    dw = None
    if needs[1]:   # the first slice's product is written into it (no zero-fill pass), unless there is none
        dw = (torch.empty if h.shape[0] > 0 else torch.zeros)(weight.shape, dtype=acc, device=h.device)
    db = torch.zeros(V, dtype=acc, device=h.device) if (bias is not None and needs[2]) else None
    cols = torch.arange(V, device=h.device)
    inv = _row_inv_tau(tau, sel, acc)
    entries = None if kept is None else _kept_entries(kept, valid, sel)
    klse_s = None if kept is None else pick(klse).to(acc)
    for a, b in _slices(h.shape[0], V, H):
        inv_rows = opts.inv_tau if inv is None else inv[a:b]
        z, th = logits(h[a:b], weight, bias, opts, acc, None if inv is None else inv_rows,
                       logits_dtype=opts.logits_dtype)
        logp = (z - lse_s[a:b, :1]).sub_(lse_s[a:b, 1:])
        p = torch.exp(logp)
        if kept is None:   # c (onehot - p) = -c p, plus c at the label column (in place: fewer [rows, V] passes)
            y = y_all[a:b, None]
            hot = (y >= 0) & (y < V)
            g = p * cl[a:b, None].neg()
            g.scatter_add_(1, torch.where(hot, y, 0).long(), torch.where(hot, cl[a:b, None], 0.0))
        else:
            onehot = cols[None, :] == y_all[a:b, None]
            km = _kept_mask(entries, a, b, V)
            p_k = torch.exp((z - klse_s[a:b, :1]) - klse_s[a:b, 1:])
            p_k = torch.where(km, p_k, torch.zeros((), dtype=acc, device=z.device))
            g = cl[a:b, None] * ((onehot & km).to(acc) - p_k)
        if ce is not None:   # p (log p + H), 0 where p = 0 (log p = -inf made finite; NaN stays NaN)
            h_term = logp.clamp_min_(torch.finfo(acc).min).add_(ent_s[a:b, None]).mul_(p)
            g.sub_(h_term.mul_(ce[a:b, None]))
        if not (isinstance(inv_rows, float) and inv_rows == 1.0):
            g.mul_(inv_rows)
        if th is not None:
            g.mul_(1 - th * th)
        if opts.logit_scale != 1.0:
            g.mul_(opts.logit_scale)
        g.masked_fill_(~vrow[a:b, None], 0)
        if db is not None:
            db += g.sum(0)
        if opts.grad_filter is not None and kept is None:   # dz~ in the GEMMs (kernels/linear_filter.py's rule)
            g = g.masked_fill_(~filter_keep(p, y_all[a:b], opts.grad_filter), 0)
        if dh is not None:
            for v0, v1, w in _weight_blocks(weight, acc):
                dh[a:b] += _mm_rows(g[:, v0:v1], w, torch.empty(b - a, H, dtype=acc, device=h.device))
        if dw is not None:
            if a == 0:   # into the one fp32 buffer: no [V, H] temporary per slice
                torch.mm(g.t(), h[a:b].to(acc), out=dw)
            else:
                dw.addmm_(g.t(), h[a:b].to(acc))
    if dh is not None and sel is not None:
        dh = torch.zeros(N, H, dtype=acc, device=h.device).index_copy_(0, sel, dh)
    return (None if dh is None else dh.to(hidden2d.dtype), None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype))
