"""The kept-only path of the linear ops with a kept set (docs/design.md §4.1b): when no full-vocabulary output
is asked for (no entropy, no extra_outputs), each row's logits are formed over its kept ids only,
    z'_rj = softcap(logit_scale (h_r . W[j] + b_j)) / tau_r   for j in K_r,
    logp_r = (z'_ry - m_K) - log s_K,  m_K = max_{j in K_r} z'_rj,  log s_K = log sum_{j in K_r} exp(z'_rj - m_K),
with the gradient of sum_r c_r logp_r, g_rj = c_r (onehot(y_r)_j - p_K,rj) dz'_rj / dz_rj:
    d hidden_r = sum_{j in K_r} g_rj W[j],   d W[v] = sum_{(r, j): j = v} g_rj h_r,   d b_v = sum g_rj,
rows of W never kept get exactly zero. The sums run in a fixed order (no atomics): d hidden over a row's ids in
CSR order, d W over the entries of one id in row order (a stable sort of the entries by id). FLOPs: 2 nnz H
forward, 4 nnz H for the gradients (linear_logprobs' backward recomputes the kept logits first: 6 nnz H), never
the 2 N H V of the dense GEMM; bytes ~H b per kept entry and pass (its weight row), nothing of size N V.
A live label in [0, V) outside its row's kept set gives logp = NaN and log s_K = NaN, so its gradient over the
kept columns is NaN too (the dense kept path does the same).

`takes_gather` picks the path from host-known sizes (no host sync): kept_path="auto" takes it when
    nnz * GATHER_COST <= n_rows * V
(n_rows: the labels' count, valid or not), i.e. when reading one weight row per kept entry (bandwidth-bound,
H b bytes) costs less than the dense 2 n_rows H V GEMM (compute-bound): on an H100 with bf16 weights a byte
costs as much as ~295 tensor-core FLOPs, so one entry (2 H bytes) ~ 590 H FLOPs, against 2 V H per row;
GATHER_COST = 512 puts the break-even at ~V / 256 kept ids per row (top-k 50 of 152k: gather; 10 % of 1k:
dense). kept_path="dense" / "gather" force either. The PyTorch backend takes it on CPU tensors only (its sums
are index_add_, sequential and deterministic on CPU; forcing "gather" there on another device is an error).
"""

from __future__ import annotations

import torch

from .dispatch import ops
from .kernels.linear_kept import compact_kept, new_kept_outputs
from .kernels.linear_kept_gather import entry_rows, gather_fwd, gather_grads
from .library import acc_dtype

GATHER_COST = 512            # dense FLOP-units per kept entry (module doc)
TORCH_CHUNK_ELEMENTS = 1 << 22   # PyTorch backend: gathered weight rows per slice, in values


def takes_gather(opts, kept, n_rows: int, vocab: int, device: torch.device) -> bool:
    """Whether a call with kept set `kept` (a KeptArg or None) runs the kept-only path (module doc)."""
    if kept is None or opts.with_entropy or opts.extras or opts.kept_path == "dense":
        return False
    torch_elsewhere = opts.backend == "torch" and device.type != "cpu"
    if opts.kept_path == "gather":
        if torch_elsewhere:
            raise ValueError(f"kept_path='gather' runs on the PyTorch backend for CPU tensors only (its sums are "
                             f"deterministic there), got tensors on {device}")
        return True
    return not torch_elsewhere and kept.ids.numel() * GATHER_COST <= n_rows * vocab


# ----------------------------------------------------------------------------- Triton
def _compacted(kept, rows):
    return compact_kept(kept.ids, kept.offsets, rows.idx, kept.start, kept.size)


def triton_forward(h2, weight, bias, y, valid, opts, tau, kept):
    """(rows, per-row outputs) as linear_pipeline.triton_forward gives them with a kept set (out["klse"] by
    compacted position; out["lse"] stays 0: no full-vocabulary statistic is formed)."""
    k = ops("linear", "triton")
    rows = k.CompactRows(valid)
    N = h2.shape[0]
    acc = acc_dtype(h2, weight)
    out = k.new_outputs(N, h2.device, acc, False, False)
    out["klse"] = new_kept_outputs(N, h2.device, acc)
    ids_c, offsets_c = _compacted(kept, rows)
    gather_fwd(h2, weight, bias, y, rows, ids_c, offsets_c, out, opts, tau)
    return rows, out


def triton_gradient_pass(h2, weight, bias, y, rows, out, opts, needs, coefs, kstats, tau, kept):
    """linear_pipeline.triton_gradient_pass on the kept-only path: with `kstats` (kept statistics by compacted
    position, e.g. a vocabulary shard's global ones) the kept logits are recomputed and those statistics used;
    without, the forward launch fills out["klse"], out["logp_c"], out["logp"] first, then `coefs(0, N)` gives
    the coefficients (by compacted position)."""
    N = h2.shape[0]
    acc = acc_dtype(h2, weight)
    ids_c, offsets_c = _compacted(kept, rows)
    if kstats is None:
        out["klse"] = new_kept_outputs(N, h2.device, acc)
        zk = gather_fwd(h2, weight, bias, y, rows, ids_c, offsets_c, out, opts, tau)
        kstats = out["klse"]
    else:
        scratch = ops("linear", "triton").new_outputs(N, h2.device, acc, False, False)
        scratch["klse"] = new_kept_outputs(N, h2.device, acc)
        zk = gather_fwd(h2, weight, bias, y, rows, ids_c, offsets_c, scratch, opts, tau)
    c_logp, _ = coefs(0, N)
    return gather_grads(h2, weight, bias, y, rows, ids_c, offsets_c, zk, kstats, c_logp, opts, needs, tau)


# ----------------------------------------------------------------------------- PyTorch
def _entries(kept, valid, V):
    """(selected rows, their ids' kept entries: ids, position among the selected rows) on CPU."""
    sel = valid.nonzero().squeeze(1)
    idx = torch.argsort((~valid).to(torch.int8), stable=True)
    ids_c, offsets_c = compact_kept(kept.ids, kept.offsets, idx, kept.start, kept.size)
    erow = entry_rows(offsets_c, ids_c.numel())
    take = (erow < sel.numel()) & (ids_c >= 0) & (ids_c < V)
    return sel, ids_c[take], erow[take]


def _kept_logits(h, weight, bias, e_ids, e_row, opts, inv, acc):
    """z' of each entry (slices of TORCH_CHUNK_ELEMENTS gathered weight values) and tanh(.) with a softcap."""
    H = h.shape[1]
    z = torch.empty(e_ids.numel(), dtype=acc)
    step = max(1, TORCH_CHUNK_ELEMENTS // max(H, 1))
    for a in range(0, e_ids.numel(), step):
        b = min(e_ids.numel(), a + step)
        w = weight.index_select(0, e_ids[a:b]).to(acc)
        z[a:b] = (w * h.index_select(0, e_row[a:b]).to(acc)).sum(-1)
    if bias is not None:
        z += bias.to(acc).index_select(0, e_ids)
    if opts.logits_dtype is not None:
        z = z.to(getattr(torch, opts.logits_dtype)).to(acc)
    z = z * opts.logit_scale
    th = None
    if opts.softcap is not None:
        th = torch.tanh(z / opts.softcap)
        z = opts.softcap * th
    return z * (opts.inv_tau if inv is None else inv.index_select(0, e_row)), th


def _row_inv(tau, sel, acc):
    return None if tau is None else 1.0 / tau.reshape(-1).index_select(0, sel).to(acc)


def torch_forward(h2, weight, bias, y, valid, opts, tau, kept):
    """Per original row: logp over the kept set, klse (m_K, log s_K), lse = 0 (not formed), ent = 0."""
    N, V = h2.shape[0], weight.shape[0]
    acc = acc_dtype(h2, weight)
    sel, e_ids, e_row = _entries(kept, valid, V)
    n = sel.numel()
    h = h2.index_select(0, sel)
    yv = y.index_select(0, sel)
    z, _ = _kept_logits(h, weight, bias, e_ids, e_row, opts, _row_inv(tau, sel, acc), acc)
    m = torch.full((n,), float("-inf"), dtype=acc).scatter_reduce_(0, e_row, z, "amax")
    m_ref = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    s = torch.zeros(n, dtype=acc).index_add_(0, e_row, torch.exp(z - m_ref.index_select(0, e_row)))
    is_y = e_ids == yv.index_select(0, e_row)
    hits = torch.zeros(n, dtype=torch.int64).index_add_(0, e_row, is_y.long())
    z_y = torch.zeros(n, dtype=acc).index_add_(0, e_row, torch.where(is_y, z, torch.zeros_like(z)))
    missing = (hits == 0) & (yv >= 0) & (yv < V)
    log_s = torch.where(missing, float("nan"), torch.log(s))
    logp = torch.where(hits > 0, (z_y - m) - log_s, float("nan"))
    by_row = lambda t: torch.zeros(N, *t.shape[1:], dtype=t.dtype).index_copy_(0, sel, t)  # noqa: E731
    zeros = torch.zeros(N, dtype=acc)
    return {"logp": by_row(logp), "klse": by_row(torch.stack((m, log_s), 1)), "lse": torch.zeros(N, 2, dtype=acc),
            "ent": zeros, "sq": zeros, "mean": zeros, "top1": torch.zeros(N, dtype=torch.bool)}


def torch_grads(h2, weight, bias, y, valid, c_logp, opts, needs, tau, kept, klse):
    """(d_hidden, d_weight, d_bias) of sum_r c_logp_r logp_r over the kept sets (by original row), fp32 sums
    (fp64 for fp64) in entry order (index_add_ on CPU: sequential, deterministic)."""
    N, H = h2.shape
    V = weight.shape[0]
    acc = acc_dtype(h2, weight)
    sel, e_ids, e_row = _entries(kept, valid, V)
    h = h2.index_select(0, sel)
    inv = _row_inv(tau, sel, acc)
    z, th = _kept_logits(h, weight, bias, e_ids, e_row, opts, inv, acc)
    ks = klse.index_select(0, sel).to(acc).index_select(0, e_row)
    yv = y.index_select(0, sel).index_select(0, e_row)
    g = c_logp.index_select(0, sel).to(acc).index_select(0, e_row) * (
        (e_ids == yv).to(acc) - torch.exp((z - ks[:, 0]) - ks[:, 1]))
    g = g * (opts.inv_tau if inv is None else inv.index_select(0, e_row))
    if th is not None:
        g = g * (1 - th * th)
    g = g * opts.logit_scale
    dh = torch.zeros(sel.numel(), H, dtype=acc) if needs[0] else None
    dw = torch.zeros(V, H, dtype=acc) if needs[1] else None
    step = max(1, TORCH_CHUNK_ELEMENTS // max(H, 1))
    for a in range(0, e_ids.numel(), step):
        b = min(e_ids.numel(), a + step)
        if dh is not None:
            dh.index_add_(0, e_row[a:b], g[a:b, None] * weight.index_select(0, e_ids[a:b]).to(acc))
        if dw is not None:
            dw.index_add_(0, e_ids[a:b], g[a:b, None] * h.index_select(0, e_row[a:b]).to(acc))
    db = None
    if bias is not None and needs[2]:
        db = torch.zeros(V, dtype=acc).index_add_(0, e_ids, g).to(bias.dtype)
    if dh is not None:
        dh = torch.zeros(N, H, dtype=h2.dtype).index_copy_(0, sel, dh.to(h2.dtype))
    return dh, None if dw is None else dw.to(weight.dtype), db
