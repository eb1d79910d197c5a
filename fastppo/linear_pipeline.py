"""The row pipeline under linear_logprobs, fused_linear_ppo_loss and their vocabulary-parallel versions
(fastppo.vocab_parallel): the checks and options of a linear call, the Triton launches chunk by chunk (the
pipeline fastppo.linear's docstring describes) or the PyTorch twin (fastppo.linear_torch), and the
forward / backward over the valid rows of a flat [N, H] hidden."""

from __future__ import annotations

import dataclasses

import torch

from ._validation import check_float, check_labels
from .dispatch import ops
from .kernels import _config as cfg
from .library import acc_dtype
from .options import LinearOptions


def triton_kernels():
    return ops("linear", "triton")


def chunk_rows(n_rows, vocab, acc, chunk_bytes, dz_dtype):
    """Rows per chunk of the gradient pass: a multiple of the kernel's row tile (at least one tile, at most
    n_rows) whose fp32 (fp64) z' and dz (a second [rows, V] buffer in the GEMM dtype when that is 16-bit;
    dz overwrites z' otherwise) fit in chunk_bytes. chunk_bytes=None: at most LIN_CHUNK_BYTES (2 GiB) and
    fewer than n_rows / 8 rows, so no buffer reaches N*V/8 elements. Fewer, larger chunks mean fewer
    re-reads of the weight (2 V H b per chunk) and of the fp32 d(weight) sum (8 V H per chunk after the
    first) and fuller GEMMs; the buffers are 6 bytes (bf16) per row and vocabulary entry."""
    size = torch.empty((), dtype=acc).element_size()
    per_row = vocab * (size + (0 if dz_dtype == acc else torch.empty((), dtype=dz_dtype).element_size()))
    tile = cfg.LIN_BLOCK_N
    rows = (cfg.LIN_CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // max(per_row, 1) // tile * tile
    if chunk_bytes is None:
        rows = min(rows, (-(-n_rows // 8) - 1) // tile * tile)
    return max(1, min(max(tile, rows), n_rows))


# ----------------------------------------------------------------------------- the Triton pipeline
def triton_forward(h2, weight, bias, y, valid, opts, tau=None):
    """Launches 1-2 over all rows (no buffer). Returns (rows, per-row outputs). `tau`: per-row temperatures
    [N] (or None) everywhere below."""
    k = triton_kernels()
    rows = k.CompactRows(valid)
    out = k.new_outputs(h2.shape[0], h2.device, acc_dtype(h2, weight), opts.with_entropy, opts.extras)
    if h2.shape[0]:
        k.stats_chunk(h2, weight, bias, y, rows, 0, h2.shape[0], out, opts, tau=tau)
    return rows, out


def triton_gradient_pass(h2, weight, bias, y, rows, out, opts, needs, coefs, stats=None, tau=None):
    """Launches 1-5 chunk by chunk. `coefs(r0, n)` returns the chunk's per-row coefficients (c_logp,
    c_ent or None; by compacted position) once its statistics are in `out`. With `stats` = (lse, ent or
    None) by compacted position (known from an earlier forward, or global ones for a vocabulary shard),
    those are used and launch 2 is skipped. Returns (dh, dw, db)."""
    k = triton_kernels()
    N, H = h2.shape
    V = weight.shape[0]
    acc = acc_dtype(h2, weight)
    dev = h2.device
    dh = torch.zeros(N, H, dtype=h2.dtype, device=dev) if needs[0] else None
    dw = torch.empty(V, H, dtype=weight.dtype, device=dev) if needs[1] else None
    db = torch.empty(V, dtype=bias.dtype, device=dev) if (bias is not None and needs[2]) else None
    if N == 0:
        return dh, (None if dw is None else dw.zero_()), (None if db is None else db.zero_())
    dot = torch.promote_types(h2.dtype, weight.dtype)
    dz_dtype = acc if dot in (torch.float32, torch.float64) else dot
    step = chunk_rows(N, V, acc, opts.chunk_bytes, dz_dtype)
    starts = list(range(0, N, step))
    buf = torch.empty(step, V, dtype=acc, device=dev)
    dz_buf = buf if dz_dtype == acc else torch.empty(step, V, dtype=dz_dtype, device=dev)
    multi = len(starts) > 1 and (dw is not None or db is not None)
    dw_acc = torch.empty(V, H, dtype=acc, device=dev) if multi and dw is not None else None
    db_acc = torch.empty(V, dtype=acc, device=dev) if multi and db is not None else None
    for i, r0 in enumerate(starts):
        n = min(step, N - r0)
        z = buf[:n]
        k.stats_chunk(h2, weight, bias, y, rows, r0, n, out, opts, z=z, finish=stats is None, tau=tau)
        c_logp, c_ent = coefs(r0, n)
        last = i == len(starts) - 1
        lse, ent = stats if stats is not None else (out["lse"], out["ent_c"])
        k.grads_chunk(z, dz_buf[:n], h2, weight, y, rows, r0, n, lse, ent, c_logp, c_ent, opts,
                      d_hidden=dh, dw_out=None if dw is None else (dw if last else dw_acc), dw_in=dw_acc if i else None,
                      db_out=None if db is None else (db if last else db_acc), db_in=db_acc if i else None, tau=tau)
    return dh, dw, db


def forward_rows(h2, weight, bias, y, valid, opts, tau=None):
    if opts.backend == "triton":
        return triton_forward(h2, weight, bias, y, valid, opts, tau)
    return None, ops("linear", "torch").forward(h2, weight, bias, y, valid, opts, tau=tau)


def gradient_rows(h2, weight, bias, y, valid, rows, stats, c_logp, c_ent, opts, needs, tau=None):
    """(dh, dw, db) of sum c_logp logp + c_ent H (coefficients by original row). `stats`: the rows' lse and
    entropy (or None), by original row on the torch backend, by compacted position on the Triton path."""
    if opts.backend == "torch":
        return ops("linear", "torch").grads(h2, weight, bias, y, valid, stats[0], stats[1], c_logp, c_ent, opts,
                                              needs, tau=tau)
    acc = acc_dtype(h2, weight)
    cl = c_logp.to(acc).index_select(0, rows.idx)
    ce = None if c_ent is None else c_ent.to(acc).index_select(0, rows.idx)
    return triton_gradient_pass(h2, weight, bias, y, rows, None, dataclasses.replace(opts, extras=False), needs,
                                lambda r0, n: (cl, ce), stats=stats, tau=tau)


def linear_forward(hidden2d, weight, bias, labels1d, opts: LinearOptions):
    """(logp, lse, entropy or None) per row in the rows' order (0 at ignored rows): the forward launches for
    callers that combine row statistics themselves (fastppo.vocab_parallel)."""
    valid = labels1d != opts.ignore_index
    rows, out = forward_rows(hidden2d, weight, bias, labels1d, valid, opts)
    lse = out["lse"] if rows is None else torch.empty_like(out["lse"]).index_copy_(0, rows.idx, out["lse"])
    return out["logp"], lse, out["ent"] if opts.with_entropy else None


def linear_backward(hidden2d, weight, bias, labels1d, lse, ent, c_logp, c_ent, opts: LinearOptions,
                    needs=(True, True, True)):
    """(d_hidden, d_weight, d_bias) of sum_i c_logp_i logp_i + c_ent_i H_i for the given per-row lse and
    entropy (in the rows' order; e.g. global ones for a vocabulary shard), valid rows only."""
    valid = labels1d != opts.ignore_index
    if opts.backend == "torch":
        return gradient_rows(hidden2d, weight, bias, labels1d, valid, None, (lse, ent), c_logp, c_ent, opts, needs)
    rows = triton_kernels().CompactRows(valid)
    stats = (lse.index_select(0, rows.idx), None if c_ent is None else ent.index_select(0, rows.idx))
    return gradient_rows(hidden2d, weight, bias, labels1d, valid, rows, stats, c_logp, c_ent, opts, needs)


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


def build_linear_options(temperature, ignore_index, with_entropy, extras, final_logit_softcapping, logit_scale,
                         chunk_bytes, backend) -> LinearOptions:
    """LinearOptions from the public keywords (the logit transform validated as for every logits op)."""
    return LinearOptions.build(temperature=temperature, logit_scale=logit_scale,
                               final_logit_softcapping=final_logit_softcapping, ignore_index=ignore_index,
                               with_entropy=with_entropy, backend=backend, extras=bool(extras), chunk_bytes=chunk_bytes)
