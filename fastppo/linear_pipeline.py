"""The row pipeline under linear_logprobs, fused_linear_ppo_loss and their vocabulary-parallel versions
(fastppo.vocab_parallel): the checks and options of a linear call, the Triton launches chunk by chunk (the
pipeline fastppo.linear's docstring describes) or the PyTorch twin (fastppo.linear_torch), and the
forward / backward over the valid rows of a flat [N, H] hidden."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import torch

from . import linear_gather
from ._validation import check_float, check_labels
from .dispatch import ops
from .kernels import _config as cfg
from .kernels.linear_kept import (
    colsum_chunk,
    compact_kept,
    kept_grads_chunk,
    kept_scatter_chunk,
    kept_stats_chunk,
    new_kept_outputs,
)
from .library import acc_dtype
from .options import LinearOptions


def triton_kernels():
    return ops("linear", "triton")


MIN_COLS = 4096   # the narrowest vocabulary chunk worth keeping all the rows in one chunk for (chunk_shape)


def chunk_budget(vocab, hidden_size, chunk_bytes):
    """Bytes the gradient pass's [rows, columns] buffers (fp32 z' and dz) may take: `chunk_bytes`, or by default
    the size of a 16-bit copy of the head, 2 V H bytes, at most LIN_CHUNK_BYTES (2 GiB). With it the linear ops'
    peak stays below that of TRL's chunked function (an fp32 [V, H] d(weight) sum plus its cast, 6 V H bytes):
    the row-chunked pass keeps at most max(4 V H + buffers, 6 V H) alive, the two-way chunked one 4 V H."""
    return chunk_bytes if chunk_bytes is not None else min(cfg.LIN_CHUNK_BYTES, 2 * vocab * hidden_size)


def _elem_bytes(acc, dz_dtype):
    """Buffer bytes per (row, column): z' in acc, plus dz in the GEMM dtype when it is 16-bit (dz overwrites z'
    otherwise)."""
    size = torch.empty((), dtype=acc).element_size()
    return size + (0 if dz_dtype == acc else torch.empty((), dtype=dz_dtype).element_size())


def chunk_rows(n_rows, vocab, hidden_size, acc, chunk_bytes, dz_dtype):
    """Rows per chunk when a chunk spans the whole vocabulary (its rows' statistics are formed in the pass: the
    fused loss's gradient in forward, kept sets): a multiple of the kernels' row tile (at least one tile, at most
    n_rows) whose buffers fit `chunk_budget`. Each chunk re-reads the weight (2 V H bytes, twice) and, after the
    first, reads and writes the fp32 d(weight) sum (8 V H): rows ~ H / 3 at the default budget, so that a chunk's
    2 rows H V FLOPs of the d(weight) product outweigh those bytes on an H100 (989 TFLOP/s, 3.35 TB/s)."""
    tile = cfg.LIN_BLOCK_N
    rows = chunk_budget(vocab, hidden_size, chunk_bytes) // max(vocab * _elem_bytes(acc, dz_dtype), 1) // tile * tile
    return max(1, min(max(tile, rows), n_rows))


def chunk_shape(n_rows, vocab, hidden_size, acc, chunk_bytes, dz_dtype):
    """(rows, columns) per chunk of the gradient pass when the rows' statistics are known (linear_logprobs'
    backward, the recompute path, a vocabulary shard's backward): chunks of rows x vocabulary columns whose
    buffers fit `chunk_budget`. Row chunks re-read the weight and the fp32 d(weight) sum (12 V H bytes each),
    vocabulary chunks the hidden rows and the fp32 d(hidden) sum (12 N H each): all the rows in one chunk while
    chunks of MIN_COLS columns fit (then d(weight) is written once, in its own dtype, and no [V, H] sum exists;
    else square chunks), the vocabulary in balanced chunks, multiples of the kernels' column tile (d(hidden) is
    then bitwise the same whatever the chunking: its fp32 sum carries over in order)."""
    elem = _elem_bytes(acc, dz_dtype)
    budget = chunk_budget(vocab, hidden_size, chunk_bytes) // elem    # elements
    tile_n, tile_v = cfg.LIN_BLOCK_N, cfg.LIN_BLOCK_V
    if n_rows * min(vocab, MIN_COLS) <= budget:             # one row chunk: no fp32 [V, H] sum
        rows = n_rows
    else:                                                   # square chunks: the least re-read bytes for the budget
        rows = min(n_rows, max(tile_n, math.isqrt(budget) // tile_n * tile_n))
    cols = budget // max(rows, 1)
    if cols >= vocab:
        return rows, vocab
    cols = max(tile_v, cols // tile_v * tile_v)
    per_chunk = -(-vocab // -(-vocab // cols))      # balanced: ceil(V / chunks), rounded up to the tile
    return rows, -(-per_chunk // tile_v) * tile_v


# ----------------------------------------------------------------------------- the Triton pipeline
class KeptArg(NamedTuple):
    """A kept set as the pipeline takes it: the KeptSet's CSR (ids, offsets) by original row, restricted to the
    vocabulary range [start, start + size) of this weight (a shard; size None: all of it), ids made local."""

    ids: torch.Tensor
    offsets: torch.Tensor
    start: int | torch.Tensor = 0
    size: int | None = None


def _compact(kept: KeptArg | None, rows):
    """The kept CSR in the compacted rows' order (kernels/linear_kept.py compact_kept), or None."""
    if kept is None:
        return None
    return KeptArg(*compact_kept(kept.ids, kept.offsets, rows.idx, kept.start, kept.size))


def triton_forward(h2, weight, bias, y, valid, opts, tau=None, kept=None):
    """Launches 1-2 over all rows (no buffer); with a kept set, chunk by chunk with the z' buffer and the kept
    statistics launch (out["klse"]: (m_K, log s_K) by compacted position; logp renormalised over K). Returns
    (rows, per-row outputs). `tau`: per-row temperatures [N] (or None) everywhere below."""
    k = triton_kernels()
    rows = k.CompactRows(valid)
    N, V = h2.shape[0], weight.shape[0]
    if linear_gather.takes_gather(opts, kept, N, V, h2.device):
        return linear_gather.triton_forward(h2, weight, bias, y, valid, opts, tau, kept)
    acc = acc_dtype(h2, weight)
    out = k.new_outputs(N, h2.device, acc, opts.with_entropy, opts.extras)
    if kept is None:
        if N:
            k.stats_chunk(h2, weight, bias, y, rows, 0, N, out, opts, tau=tau)
        return rows, out
    kc = _compact(kept, rows)
    out["klse"] = new_kept_outputs(N, h2.device, acc)
    step = chunk_rows(N, V, h2.shape[1], acc, opts.chunk_bytes, acc)
    buf = torch.empty(step, V, dtype=acc, device=h2.device)
    for r0 in range(0, N, step):
        n = min(step, N - r0)
        k.stats_chunk(h2, weight, bias, y, rows, r0, n, out, opts, z=buf[:n], tau=tau)
        kept_stats_chunk(buf[:n], y, rows, r0, n, kc.ids, kc.offsets, out["klse"], out["logp_c"], out["logp"])
    return rows, out


def triton_gradient_pass(h2, weight, bias, y, rows, out, opts, needs, coefs, stats=None, tau=None, kept=None,
                         kstats=None):
    """Launches 1-5 chunk by chunk. `coefs(r0, n)` returns the chunk's per-row coefficients (c_logp,
    c_ent or None; by compacted position) once its statistics are in `out`. With `stats` = (lse, ent or
    None) by compacted position (known from an earlier forward, or global ones for a vocabulary shard),
    those are used, launch 2 is skipped and the chunks also split the vocabulary (`chunk_shape`: d(hidden)
    carried in fp32 from one vocabulary chunk to the next); without, chunks of whole rows (`chunk_rows`).
    `kept` (KeptArg): the log-prob term over the kept sets (whole rows), with their statistics `kstats` (by
    compacted position) or, without, the kept statistics launch per chunk (into out["klse"], out["logp_c"],
    out["logp"]); then the kept gradient launch, the dense dz launch without the log-prob term, the scatter of
    the kept columns and d(bias) summed from dz; or the kept-only path (fastppo.linear_gather) where it applies.
    grad_filter (kernels/linear_filter.py): chunks of whole rows. Several row chunks sum d(weight) in fp32
    [V, H] (each chunk's products added in order onto the sum: bitwise the same whatever the row chunking),
    cast once at the end after the chunk buffers are freed. Returns (dh, dw, db)."""
    k = triton_kernels()
    N, H = h2.shape
    V = weight.shape[0]
    if linear_gather.takes_gather(opts, kept, N, V, h2.device):
        return linear_gather.triton_gradient_pass(h2, weight, bias, y, rows, out, opts, needs, coefs, kstats, tau,
                                                  kept)
    acc = acc_dtype(h2, weight)
    dev = h2.device
    dh = torch.zeros(N, H, dtype=h2.dtype, device=dev) if needs[0] else None
    db = torch.empty(V, dtype=bias.dtype, device=dev) if (bias is not None and needs[2]) else None
    if N == 0:
        dw = torch.zeros(V, H, dtype=weight.dtype, device=dev) if needs[1] else None
        return dh, dw, (None if db is None else db.zero_())
    dot = acc if opts.fp32_head else torch.promote_types(h2.dtype, weight.dtype)
    dz_dtype = acc if dot in (torch.float32, torch.float64) else dot
    if stats is None or kept is not None or opts.grad_filter is not None:    # whole rows (the filter's tiles too)
        step, cols = chunk_rows(N, V, H, acc, opts.chunk_bytes, dz_dtype), V
    else:
        step, cols = chunk_shape(N, V, H, acc, opts.chunk_bytes, dz_dtype)
    starts, vstarts = list(range(0, N, step)), list(range(0, V, cols))
    buf = torch.empty(step, cols, dtype=acc, device=dev)
    dz_buf = buf if dz_dtype == acc else torch.empty(step, cols, dtype=dz_dtype, device=dev)
    multi = len(starts) > 1
    # several row chunks: the fp32 d(weight) sum (d(weight) itself when that is fp32), cast after the loop
    dw_sum = (torch.empty(V, H, dtype=acc, device=dev) if multi and needs[1] else None)
    dw = None if not needs[1] else dw_sum if dw_sum is not None else torch.empty(V, H, dtype=weight.dtype, device=dev)
    db_acc = torch.empty(V, dtype=acc, device=dev) if multi and db is not None else None
    # several vocabulary chunks: the fp32 d(hidden) sum (d(hidden) itself when that is fp32)
    dh_sum = None if dh is None or len(vstarts) == 1 else dh if dh.dtype == acc else torch.empty(N, H, dtype=acc,
                                                                                                   device=dev)
    kc = _compact(kept, rows)
    dz_chunk, gemm_chunk = k.dz_chunk, k.gemm_chunk
    if opts.grad_filter is not None and kc is None:   # the filtered launches 3-5 (kernels/linear_filter.py)
        filt = ops("linear_filter", "triton")
        keep = filt.new_keep(step, V, dev)
        dz_chunk, gemm_chunk = (functools.partial(f, keep=keep) for f in (filt.dz_chunk, filt.gemm_chunk))
    if kc is not None:
        gk = torch.empty(kc.ids.numel(), dtype=acc, device=dev)
        no_logp = torch.zeros(N, dtype=acc, device=dev)
        if kstats is None:
            out["klse"] = new_kept_outputs(N, dev, acc)
    lse, ent = stats if stats is not None else (out["lse"], out["ent_c"])
    for i, r0 in enumerate(starts):
        n = min(step, N - r0)
        for j, c0 in enumerate(vstarts):
            c = min(cols, V - c0)
            z, dz = buf[:n, :c], dz_buf[:n, :c]
            w_j, b_j, y_j = weight[c0:c0 + c], None if bias is None else bias[c0:c0 + c], y if c0 == 0 else y - c0
            k.stats_chunk(h2, w_j, b_j, y_j, rows, r0, n, out, opts, z=z, finish=stats is None, tau=tau)
            if kc is not None and kstats is None:
                kept_stats_chunk(z, y, rows, r0, n, kc.ids, kc.offsets, out["klse"], out["logp_c"], out["logp"])
            if j == 0:
                c_logp, c_ent = coefs(r0, n)
            db_out = None if db is None else (db if i == len(starts) - 1 else db_acc)[c0:c0 + c]
            db_in = db_acc[c0:c0 + c] if i and db is not None else None
            if kc is None:
                dz_chunk(z, dz, y_j, rows, r0, n, lse, ent, c_logp, c_ent, opts, db_out=db_out, db_in=db_in, tau=tau)
            else:
                kept_grads_chunk(z, y, rows, r0, n, kc.ids, kc.offsets, out["klse"] if kstats is None else kstats,
                                 lse, ent, c_logp, c_ent, gk, opts, tau)
                k.dz_chunk(z, dz, y, rows, r0, n, lse, ent, no_logp, c_ent, opts, tau=tau)
                kept_scatter_chunk(gk, dz, y, rows, r0, n, kc.ids, kc.offsets)
                if db_out is not None:
                    colsum_chunk(dz, rows, r0, n, acc, db_out, db_in)
            dw_j = None if dw is None else dw[c0:c0 + c]
            carry = {"dh_in": dh_sum} if j else {}     # d(hidden)'s fp32 sum from the earlier vocabulary chunks
            gemm_chunk(dz, h2, w_j, rows, r0, n, opts, d_hidden=dh if dh_sum is None or j == len(vstarts) - 1
                       else dh_sum, dw_out=dw_j, dw_in=dw_j if i else None, **carry)
    del buf, dz_buf, z, dz      # the chunk buffers (and their views) are freed before the cast
    if dw_sum is not None and weight.dtype != acc:
        dw = dw_sum.to(weight.dtype)
    return dh, dw, db


def forward_rows(h2, weight, bias, y, valid, opts, tau=None, kept=None):
    """(rows or None, per-row outputs) of the valid rows: the Triton pipeline or the PyTorch twin."""
    if opts.backend == "triton":
        return triton_forward(h2, weight, bias, y, valid, opts, tau, kept)
    if linear_gather.takes_gather(opts, kept, h2.shape[0], weight.shape[0], h2.device):
        return None, linear_gather.torch_forward(h2, weight, bias, y, valid, opts, tau, kept)
    return None, ops("linear", "torch").forward(h2, weight, bias, y, valid, opts, tau=tau, kept=kept)


def gradient_rows(h2, weight, bias, y, valid, rows, stats, c_logp, c_ent, opts, needs, tau=None, kept=None,
                  kstats=None):
    """(dh, dw, db) of sum c_logp logp + c_ent H (coefficients by original row). `stats`: the rows' lse and
    entropy (or None), `kstats` the kept statistics (with `kept`), by original row on the torch backend, by
    compacted position on the Triton path."""
    if opts.backend == "torch" and linear_gather.takes_gather(opts, kept, h2.shape[0], weight.shape[0], h2.device):
        return linear_gather.torch_grads(h2, weight, bias, y, valid, c_logp, opts, needs, tau, kept, kstats)
    if opts.backend == "torch":
        return ops("linear", "torch").grads(h2, weight, bias, y, valid, stats[0], stats[1], c_logp, c_ent, opts,
                                              needs, tau=tau, kept=kept, klse=kstats)
    acc = acc_dtype(h2, weight)
    cl = c_logp.to(acc).index_select(0, rows.idx)
    ce = None if c_ent is None else c_ent.to(acc).index_select(0, rows.idx)
    return triton_gradient_pass(h2, weight, bias, y, rows, None, dataclasses.replace(opts, extras=False), needs,
                                lambda r0, n: (cl, ce), stats=stats, tau=tau, kept=kept, kstats=kstats)


def linear_forward(hidden2d, weight, bias, labels1d, opts: LinearOptions, tau=None, kept=None):
    """(logp, lse, entropy or None, kept statistics or None) per row in the rows' order (0 at ignored rows): the
    forward launches for callers that combine row statistics themselves (fastppo.vocab_parallel_linear). With
    `kept`, logp is renormalised over the kept set and the kept statistics (m_K, log s_K) are [N, 2]."""
    valid = labels1d != opts.ignore_index
    rows, out = forward_rows(hidden2d, weight, bias, labels1d, valid, opts, tau, kept)
    by_row = lambda t: t if rows is None else torch.zeros_like(t).index_copy_(0, rows.idx, t)  # noqa: E731
    klse = by_row(out["klse"]) if kept is not None else None
    return out["logp"], by_row(out["lse"]), out["ent"] if opts.with_entropy else None, klse


def linear_backward(hidden2d, weight, bias, labels1d, lse, ent, c_logp, c_ent, opts: LinearOptions,
                    needs=(True, True, True), tau=None, kept=None, klse=None):
    """(d_hidden, d_weight, d_bias) of sum_i c_logp_i logp_i + c_ent_i H_i for the given per-row lse, entropy
    and kept statistics (in the rows' order; e.g. global ones for a vocabulary shard), valid rows only."""
    valid = labels1d != opts.ignore_index
    if opts.backend == "torch":
        return gradient_rows(hidden2d, weight, bias, labels1d, valid, None, (lse, ent), c_logp, c_ent, opts, needs,
                             tau, kept, klse)
    rows = triton_kernels().CompactRows(valid)
    pick = lambda t: None if t is None else t.index_select(0, rows.idx)  # noqa: E731
    stats = (pick(lse), None if c_ent is None else pick(ent))
    return gradient_rows(hidden2d, weight, bias, labels1d, valid, rows, stats, c_logp, c_ent, opts, needs, tau,
                         kept, pick(klse))


def flatten_rows(hidden, labels):
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)



def check_linear(hidden, weight, labels, bias, ignore_index):
    check_float("hidden", hidden)
    check_float("weight", weight)
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., H] and weight [V, H] must agree on H, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have at least one vocabulary row, got shape {tuple(weight.shape)}")
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    check_labels(labels, hidden.shape[:-1], weight.shape[0], ignore_index)


def grad_filter_eps(grad_filter, hidden, weight, fp32_head=False) -> float | None:
    """The filter threshold of the public keyword grad_filter: None / False off, True cut-cross-entropy's
    default for the gradient GEMMs' dtype (finfo(dtype).eps / 32: bf16 2^-12, fp16 2^-15, fp32 2^-28), a float
    that threshold (kernels/linear_filter.py has the rule)."""
    if grad_filter is None or grad_filter is False:
        return None
    if grad_filter is True:
        dot = torch.promote_types(hidden.dtype, weight.dtype)
        dot = torch.float32 if fp32_head and dot != torch.float64 else dot
        return torch.finfo(dot).eps / 32
    if not isinstance(grad_filter, (float, int)):
        raise TypeError(f"grad_filter must be None, a bool or a float threshold, got {type(grad_filter).__name__}")
    return float(grad_filter)


def check_grad_filter(grad_filter, vocab_parallel, kept):
    if grad_filter is not None and grad_filter is not False and (vocab_parallel is not None or kept is not None):
        raise ValueError("grad_filter is not supported with " + ("vocab_parallel" if vocab_parallel is not None
                                                                  else "kept") + " (pass grad_filter=None)")


def build_linear_options(temperature, ignore_index, with_entropy, extras, final_logit_softcapping, logit_scale,
                         chunk_bytes, backend, logits_dtype=None, fp32_head=False, grad_filter=None,
                         kept_path="auto") -> LinearOptions:
    """LinearOptions from the public keywords (the logit transform validated as for every logits op);
    grad_filter: the resolved threshold (grad_filter_eps) or None."""
    return LinearOptions.build(temperature=temperature, logit_scale=logit_scale,
                               final_logit_softcapping=final_logit_softcapping, ignore_index=ignore_index,
                               with_entropy=with_entropy, backend=backend, extras=bool(extras), chunk_bytes=chunk_bytes,
                               logits_dtype=LinearOptions.logits_dtype_name(logits_dtype), fp32_head=fp32_head,
                               grad_filter=grad_filter, kept_path=kept_path)
