"""linear_logprobs and fused_linear_ppo_loss: log-probs, entropy, TRL's extra per-token outputs and the
PPO loss from the final hidden states and the lm_head weight, never holding the [N, V] logits (Cut
Cross-Entropy's idea, extended to RL).

Only valid rows are projected: a row whose label is ignore_index (and, in the loss, whose mask is 0)
is never read; its log-prob / entropy / extras are 0 and its gradient row is written as zeros once.
The valid rows are found on device (a stable sort of the validity flags and their count), so FLOPs
scale with N_valid and there is no host sync. Logits (TRL's order):
    z' = softcap(logit_scale * (hidden @ weight.T + bias)) / tau,   softcap(x) = c tanh(x / c).

Triton path, per chunk of compacted rows (`chunk_bytes` of fp32 z' and dz; see `chunk_rows`):
  1. linear_fwd      z' tiles (2 n H V FLOPs) into the chunk buffer, per-split row statistics
  2. linear_finish   lse, log-prob, entropy (extras) per row
  3. linear_dz       dz = dloss/dz from z' and the per-row coefficients, written once in the GEMM dtype;
                     d(bias) (+)= sum dz in fp32
  4. linear_dh       d(hidden) = dz @ W, accumulated in registers over V, written once   (2 n H V)
  5. linear_dw       d(weight) (+)= dz^T @ hidden in a fixed order (no atomics)         (2 n H V)
- fused_linear_ppo_loss runs 1-5 in its forward (the per-token coefficients dloss/dlogp, dloss/dH are
  known once a chunk's rows have their log-probs): 6 N_valid H V FLOPs in all; backward only scales the
  saved gradients by the upstream scalar. A loss whose coefficients are not token-local would take the
  recompute path (1-2 over all rows, the loss, then 1, 3-5: 8 N_valid H V); see `_token_local`.
- linear_logprobs runs 1-2 over all rows in forward (2 N_valid H V, no buffer) and 1, 3-5 in backward,
  where the upstream gradient is known (6 N_valid H V): 8 N_valid H V in all.
Bytes (each launch's tensors, tiles shared by programs reused on chip), b-byte inputs, C chunks: z'
written once and read once, dz written once and read twice (14 N_valid V); d(hidden) written once
(N_valid H b, no fp32 re-read); the weight read twice per chunk (4 V H C for bf16); d(weight) written
once with C = 1, else an fp32 sum written, read and written per further chunk holding valid rows
(about 8 V H C). Memory: the chunk buffers, per-split statistics (24 N V / (LIN_SPLIT_TILES*BLOCK_V)
bytes), and in the loss the gradients held from forward to backward (as Liger's fused linear losses).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ._checks import check_float, check_labels, check_temperature
from .backend import backend_for
from .dispatch import ops
from .fused import check_fused_tensors, loss_options, ppo_output
from .library import encode
from .logprobs import check_logit_transform
from .losses import loss_terms_from_logprobs
from .options import LossOptions
from .outputs import LogprobOutputs, PPOLossOutput

EXTRA_OUTPUTS = ("log_sum_sq_probs", "mean_logits", "is_top1")


@dataclass(frozen=True)
class LinearOptions:
    """Non-tensor options of the linear ops, validated once where built (`_linear_options`)."""

    inv_tau: float
    ignore_index: int
    with_entropy: bool
    backend: str
    extras: bool = False
    logit_scale: float = 1.0
    softcap: float | None = None
    chunk_bytes: int | None = None      # None: automatic (see chunk_rows)


def _kernels():
    return ops("linear", "triton")


def _acc(hidden, weight):
    return torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32


def chunk_rows(n_rows, vocab, acc, chunk_bytes, dz_dtype):
    """Rows per chunk of the gradient pass: a multiple of the kernel's row tile (at least one tile, at most
    n_rows) whose fp32 (fp64) z' and dz (a second [rows, V] buffer in the GEMM dtype when that is 16-bit;
    dz overwrites z' otherwise) fit in chunk_bytes. chunk_bytes=None: at most LIN_CHUNK_BYTES (2 GiB) and
    fewer than n_rows / 8 rows, so no buffer reaches N*V/8 elements. Fewer, larger chunks mean fewer
    re-reads of the weight (2 V H b per chunk) and of the fp32 d(weight) sum (8 V H per chunk after the
    first) and fuller GEMMs; the buffers are 6 bytes (bf16) per row and vocabulary entry."""
    from .kernels import _config as cfg

    size = torch.empty((), dtype=acc).element_size()
    per_row = vocab * (size + (0 if dz_dtype == acc else torch.empty((), dtype=dz_dtype).element_size()))
    tile = cfg.LIN_BLOCK_N
    rows = (cfg.LIN_CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // max(per_row, 1) // tile * tile
    if chunk_bytes is None:
        rows = min(rows, (-(-n_rows // 8) - 1) // tile * tile)
    return max(1, min(max(tile, rows), n_rows))


# ----------------------------------------------------------------------------- the Triton pipeline
def triton_forward(h2, weight, bias, y, valid, opts):
    """Launches 1-2 over all rows (no buffer). Returns (rows, per-row outputs)."""
    k = _kernels()
    rows = k.Rows(valid)
    out = k.new_outputs(h2.shape[0], h2.device, _acc(h2, weight), opts.with_entropy, opts.extras)
    if h2.shape[0]:
        k.stats_chunk(h2, weight, bias, y, rows, 0, h2.shape[0], out, opts)
    return rows, out


def triton_gradient_pass(h2, weight, bias, y, rows, out, opts, needs, coefs, stats=None):
    """Launches 1-5 chunk by chunk. `coefs(r0, n)` returns the chunk's per-row coefficients (c_logp,
    c_ent or None; by compacted position) once its statistics are in `out`. With `stats` = (lse, ent or
    None) by compacted position (known from an earlier forward, or global ones for a vocabulary shard),
    those are used and launch 2 is skipped. Returns (dh, dw, db)."""
    k = _kernels()
    N, H = h2.shape
    V = weight.shape[0]
    acc = _acc(h2, weight)
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
        k.stats_chunk(h2, weight, bias, y, rows, r0, n, out, opts, z=z, finish=stats is None)
        c_logp, c_ent = coefs(r0, n)
        last = i == len(starts) - 1
        lse, ent = stats if stats is not None else (out["lse"], out["ent_c"])
        k.grads_chunk(z, dz_buf[:n], h2, weight, y, rows, r0, n, lse, ent, c_logp, c_ent, opts,
                      d_hidden=dh, dw_out=None if dw is None else (dw if last else dw_acc), dw_in=dw_acc if i else None,
                      db_out=None if db is None else (db if last else db_acc), db_in=db_acc if i else None)
    return dh, dw, db


def _forward(h2, weight, bias, y, valid, opts):
    if opts.backend == "triton":
        return triton_forward(h2, weight, bias, y, valid, opts)
    return None, ops("linear", "torch").forward(h2, weight, bias, y, valid, opts)


def _gradients(h2, weight, bias, y, valid, rows, stats, c_logp, c_ent, opts, needs):
    """(dh, dw, db) of sum c_logp logp + c_ent H (coefficients by original row). `stats`: the rows' lse and
    entropy (or None), by original row on the torch backend, by compacted position on the Triton path."""
    if opts.backend == "torch":
        return ops("linear", "torch").grads(h2, weight, bias, y, valid, stats[0], stats[1], c_logp, c_ent, opts,
                                              needs)
    acc = _acc(h2, weight)
    cl = c_logp.to(acc).index_select(0, rows.idx)
    ce = None if c_ent is None else c_ent.to(acc).index_select(0, rows.idx)
    return triton_gradient_pass(h2, weight, bias, y, rows, None, dataclasses.replace(opts, extras=False), needs,
                                lambda r0, n: (cl, ce), stats=stats)


def linear_forward(hidden2d, weight, bias, labels1d, opts: LinearOptions):
    """(logp, lse, entropy or None) per row in the rows' order (0 at ignored rows): the forward launches for
    callers that combine row statistics themselves (fastppo.distributed)."""
    valid = labels1d != opts.ignore_index
    rows, out = _forward(hidden2d, weight, bias, labels1d, valid, opts)
    lse = out["lse"] if rows is None else torch.empty_like(out["lse"]).index_copy_(0, rows.idx, out["lse"])
    return out["logp"], lse, out["ent"] if opts.with_entropy else None


def linear_backward(hidden2d, weight, bias, labels1d, lse, ent, c_logp, c_ent, opts: LinearOptions,
                    needs=(True, True, True)):
    """(d_hidden, d_weight, d_bias) of sum_i c_logp_i logp_i + c_ent_i H_i for the given per-row lse and
    entropy (in the rows' order; e.g. global ones for a vocabulary shard), valid rows only."""
    valid = labels1d != opts.ignore_index
    if opts.backend == "torch":
        return _gradients(hidden2d, weight, bias, labels1d, valid, None, (lse, ent), c_logp, c_ent, opts, needs)
    rows = _kernels().Rows(valid)
    stats = (lse.index_select(0, rows.idx), None if c_ent is None else ent.index_select(0, rows.idx))
    return _gradients(hidden2d, weight, bias, labels1d, valid, rows, stats, c_logp, c_ent, opts, needs)


def _flatten(hidden, labels):
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)


# ----------------------------------------------------------------------------- linear_logprobs
def linear_outputs(hidden, weight, bias, labels, opts: LinearOptions):
    """Forward of linear_logprobs (the body of torch.ops.fastppo.linear_logprobs): logp, entropy,
    log_sum_sq_probs, mean_logits, is_top1 shaped like labels (None where not computed), and backward's
    statistics lse and entropy (by compacted position on the Triton path, by row on the torch backend)."""
    h2, y = _flatten(hidden, labels)
    rows, out = _forward(h2, weight, bias, y, y != opts.ignore_index, opts)
    shape = labels.shape
    ent = out["ent"].view(shape) if opts.with_entropy else None
    extras = (out["sq"].view(shape), out["mean"].view(shape), out["top1"].view(shape).bool()) \
        if opts.extras else (None, None, None)
    ent_key = "ent" if rows is None else "ent_c"
    return out["logp"].view(shape), ent, *extras, out["lse"], out[ent_key] if opts.with_entropy else None


def linear_grads(hidden, weight, bias, labels, lse, ent, g_logp, g_ent, opts: LinearOptions, needs):
    """Backward of linear_logprobs: (d_hidden, d_weight, d_bias) of sum g_logp logp + g_ent H (None where
    not needed) from linear_outputs' statistics; the valid rows are compacted again on device."""
    h2, y = _flatten(hidden, labels)
    valid = y != opts.ignore_index
    rows = _kernels().Rows(valid) if opts.backend == "triton" else None
    acc = lse.dtype
    c_logp = g_logp.reshape(-1).to(acc)
    c_ent = None if g_ent is None else g_ent.reshape(-1).to(acc)
    dh, dw, db = _gradients(h2, weight, bias, y, valid, rows, (lse, None if c_ent is None else ent), c_logp, c_ent,
                            opts, needs)
    return (None if dh is None else dh.view(hidden.shape)), dw, db


def _check_linear(hidden, weight, labels, bias, ignore_index):
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


def _linear_options(temperature, ignore_index, with_entropy, extras, final_logit_softcapping, logit_scale,
                    chunk_bytes, backend):
    tau = check_temperature(temperature)
    scale, softcap = check_logit_transform(logit_scale, final_logit_softcapping)   # the logits ops' one check
    if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int)
                                    or chunk_bytes <= 0):
        raise ValueError(f"chunk_bytes must be None or a positive int, got {chunk_bytes!r}")
    return LinearOptions(1.0 / tau, int(ignore_index), bool(with_entropy), backend, bool(extras), scale, softcap,
                         chunk_bytes)


def _check_extras(extra_outputs):
    if isinstance(extra_outputs, str) or not isinstance(extra_outputs, (tuple, list, set, frozenset)):
        raise TypeError(f"extra_outputs must be a tuple of names from {EXTRA_OUTPUTS}, got {extra_outputs!r}")
    bad = [e for e in extra_outputs if e not in EXTRA_OUTPUTS]
    if bad:
        raise ValueError(f"extra_outputs must be a subset of {EXTRA_OUTPUTS}, got unknown {bad}")
    return frozenset(extra_outputs)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias=None,
                    temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                    final_logit_softcapping=None, logit_scale: float = 1.0, extra_outputs=(), chunk_bytes=None):
    """token_logprobs(z', labels) with z' = softcap(logit_scale * (hidden @ weight.T + bias)) / temperature,
    softcap(x) = c tanh(x / c) with c = final_logit_softcapping (none when None), without materialising
    the logits.

    hidden [..., H] (any strides), weight [V, H] (e.g. `model.lm_head.weight`, tied or not), bias [V] or
    None, labels [...]. hidden and weight may differ in float dtype: the product runs in their promoted
    dtype (fp32 hidden with a bf16 head: an fp32 product of the exactly upcast weight). Gradients flow to
    hidden, weight and bias in their own dtypes (fp32 sums; fp64 throughout for fp64). Rows with
    ignore_index labels are never read and get 0.
    `extra_outputs`: any of "log_sum_sq_probs" (log sum_v p_v^2), "mean_logits" (mean of z'), "is_top1"
    (the label is the first argmax of z'), computed in the same pass, without gradient; when given, the
    result is LogprobOutputs(logprobs, entropy, log_sum_sq_probs, mean_logits, is_top1) with None where
    not requested. Without it: logp, or (logp, entropy) with return_entropy.
    `chunk_bytes` bounds the backward's [rows, V] buffers (fp32 logits + dz; None: automatic, see
    `chunk_rows`)."""
    _check_linear(hidden, weight, labels, bias, ignore_index)
    extras = _check_extras(extra_outputs)
    opts = _linear_options(temperature, ignore_index, return_entropy, bool(extras), final_logit_softcapping,
                           logit_scale, chunk_bytes, backend_for(hidden, weight, labels))
    logp, ent, sq, mean, top1, _, _ = torch.ops.fastppo.linear_logprobs(hidden, weight, bias, labels, encode(opts),
                                                                       opts.backend)
    ent = ent if opts.with_entropy else None   # the op returns empty tensors for outputs not asked for
    if extras:
        pick = {"log_sum_sq_probs": sq, "mean_logits": mean, "is_top1": top1}
        return LogprobOutputs(logp, ent, *[pick[k] if k in extras else None for k in EXTRA_OUTPUTS])
    return (logp, ent) if return_entropy else logp


# ----------------------------------------------------------------------------- fused_linear_ppo_loss
def _token_local(opts: LossOptions) -> bool:
    """Whether every token's loss coefficients depend only on that token's values and the aggregation
    weights (then the gradient is formed chunk by chunk in forward, 6 N H V FLOPs): every token-level
    policy loss and every aggregation. A sequence-level term (gspo, gspo_token, gmpo: sequence ratios) or a
    batch-global one (entropy_quantile: a threshold over all tokens) answers False and takes the
    recompute path (8 N H V)."""
    return not opts.sequence_level and opts.entropy_quantile is None


def _agg_weights(mask, opts: LossOptions, acc, backend):
    """Per-token aggregation weights m_t w_b of the loss's `agg` mode, read from the per-token loss function
    itself: with entropy_coef = 1 and zero entropy its entropy coefficient is exactly -m_t w_b."""
    zeros = torch.zeros(mask.shape, dtype=acc, device=mask.device)
    unit = opts.replace(policy_loss="ppo", dual_clip=None, ratio_max=None, entropy_quantile=None, kl_coef=0.0,
                        entropy_coef=1.0)
    res = loss_terms_from_logprobs(zeros, zeros, zeros, zeros, mask, opts=unit, backend=backend)
    return -res.coef_ent.reshape(-1)


def fused_linear_outputs(hidden, weight, bias, labels, old, adv, mask, ref, isw, opts: LossOptions,
                         lin: LinearOptions, needs):
    """Forward of fused_linear_ppo_loss (the body of torch.ops.fastppo.fused_linear_ppo_loss): loss, logp,
    kl, entropy, stats and the gradients (d_hidden, d_weight, d_bias) for a unit upstream gradient, formed
    in this pass where `needs` asks for them (None elsewhere)."""
    h2, y = _flatten(hidden, labels)
    shape = labels.shape
    valid = (y != lin.ignore_index) & (mask.reshape(-1) != 0)
    use_ent = lin.with_entropy and opts.entropy_coef != 0
    acc = _acc(h2, weight)
    grads = (None, None, None)
    in_forward = any(needs) and lin.backend == "triton" and _token_local(opts)
    if in_forward:
        grads, out = _forward_with_gradient(h2, weight, bias, y, valid, old, adv, mask, ref, isw, opts, lin,
                                            needs, use_ent, acc)
    else:
        rows, out = _forward(h2, weight, bias, y, valid, lin)
    logp = out["logp"].view(shape)
    ent = out["ent"].view(shape) if lin.with_entropy else None
    res = loss_terms_from_logprobs(logp, ent, old, adv, mask, opts=opts, backend=lin.backend, ref=ref,
                                   rollout_is_weights=isw)
    if any(needs) and not in_forward:
        row_stats = (out["lse"], out["ent"]) if rows is None else (out["lse"], out["ent_c"])
        grads = _gradients(h2, weight, bias, y, valid, rows, row_stats, res.coef.reshape(-1),
                           res.coef_ent.reshape(-1) if use_ent else None, lin, needs)
    dh, dw, db = grads
    return res.loss, logp, res.kl, ent, res.stats, (None if dh is None else dh.view(hidden.shape)), dw, db


def _per_token(t, mask):
    """A per-token ([B, T]) or per-sequence ([B]) tensor as one value per flattened token."""
    if t is None:
        return None
    if t.dim() == 1 and mask.dim() == 2:
        t = t[:, None]
    return t.expand(mask.shape).reshape(-1)


def _forward_with_gradient(h2, weight, bias, y, valid, old, adv, mask, ref, isw, opts, lin, needs, use_ent, acc):
    """The 6 N H V path: each chunk's coefficients dloss/dlogp = m w dL/dlogp and dloss/dH = -m w c_ent come
    from the per-token loss function run on the chunk's rows with unit aggregation (token-mean over a
    count of 1), times the global aggregation weights m w, so chunk contributions add up exactly."""
    k = _kernels()
    N = h2.shape[0]
    rows = k.Rows(valid)
    out = k.new_outputs(N, h2.device, acc, lin.with_entropy, False)
    weights = _agg_weights(mask, opts, acc, lin.backend)
    flat = [_per_token(t, mask) for t in (old, adv, mask, ref, isw)]
    unit = opts.replace(agg="token-mean", num_tokens=1.0, num_seqs=None, horizon=None)
    c_logp = torch.zeros(N, dtype=acc, device=h2.device)
    c_ent = torch.zeros(N, dtype=acc, device=h2.device) if use_ent else None

    def coefs(r0, n):
        sel = rows.idx[r0:r0 + n]
        old_c, adv_c, mask_c, ref_c, isw_c = (None if t is None else t.index_select(0, sel)[None] for t in flat)
        ent_c = out["ent_c"][r0:r0 + n][None] if use_ent else None
        res = loss_terms_from_logprobs(out["logp_c"][r0:r0 + n][None], ent_c, old_c, adv_c, mask_c, opts=unit,
                                       backend=lin.backend, ref=ref_c, rollout_is_weights=isw_c)
        w = weights.index_select(0, sel)
        c_logp[r0:r0 + n] = res.coef[0] * w
        if use_ent:
            c_ent[r0:r0 + n] = res.coef_ent[0] * w
        return c_logp, c_ent

    grads = triton_gradient_pass(h2, weight, bias, y, rows, out, lin, needs, coefs)
    return grads, out


def fused_linear_ppo_loss(hidden, weight, labels, old_logprobs, advantages, mask, *, bias=None, ref_logprobs=None,
                          kl_coef=0.0, kl_kind="k3", entropy_coef=0.0, clip_low=0.2, clip_high=None, dual_clip=None,
                          temperature=1.0, agg="token-mean", ignore_index=-100, return_entropy=False,
                          num_tokens=None, num_seqs=None, horizon=None, policy_loss="ppo", ratio_max=None,
                          sapo_tau_pos=1.0, sapo_tau_neg=1.05, rollout_is_weights=None, entropy_quantile=None,
                          final_logit_softcapping=None, logit_scale=1.0, chunk_bytes=None) -> PPOLossOutput:
    """fused_ppo_loss(z', ...) with z' = softcap(logit_scale * (hidden @ weight.T + bias)) / temperature,
    without materialising the logits.

    hidden [B, T, H] (or [T, H]), weight [V, H]; the other arguments (policy-loss variants included) and
    the result are those of fused_ppo_loss. Only tokens with mask != 0 and a label != ignore_index are
    projected; the returned per-token log-probs / entropy are 0 elsewhere, and NaN there cannot leak. On
    the Triton path, for token-level losses (`_token_local`), the gradients to hidden, weight and bias are
    formed in the forward pass, chunk by chunk (`chunk_bytes` bounds the [rows, V] buffers; None:
    automatic, see `chunk_rows`): 6 N_valid H V FLOPs for forward + backward, and backward only scales
    them by the upstream gradient (those gradients are held from forward to backward). Sequence-level
    variants (gspo, gspo_token, gmpo) and entropy_quantile recompute the logits in forward: 8 N_valid H V."""
    opts = loss_options(policy_loss=policy_loss, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                        ratio_max=ratio_max, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg,
                        entropy_quantile=entropy_quantile, agg=agg, kl_kind=kl_kind, kl_coef=kl_coef,
                        entropy_coef=entropy_coef, num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon)
    _check_linear(hidden, weight, labels, bias, ignore_index)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [B, T, H] or [T, H], got shape {tuple(hidden.shape)}")
    check_fused_tensors(hidden.shape[:-1], old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights, opts)
    want_ent = bool(return_entropy or entropy_coef != 0 or entropy_quantile is not None)
    backend = backend_for(hidden, weight, labels, old_logprobs, advantages, mask)
    lin = _linear_options(temperature, ignore_index, want_ent, False, final_logit_softcapping, logit_scale,
                          chunk_bytes, backend)
    grad_on = torch.is_grad_enabled()
    needs = tuple(bool(grad_on and t is not None and t.requires_grad) for t in (hidden, weight, bias))
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    loss, logp, kl, ent, stats, *_ = torch.ops.fastppo.fused_linear_ppo_loss(
        hidden, weight, bias, labels, old_logprobs.detach(), advantages.detach(), mask, detach(ref_logprobs),
        detach(rollout_is_weights), encode(opts), encode(lin), *needs, backend)
    return ppo_output(loss, logp, kl, ent, stats, opts, ref_logprobs is not None, want_ent)
