"""linear_logprobs and fused_linear_ppo_loss: log-probs, entropy, TRL's extra per-token outputs and the
PPO loss from the final hidden states and the lm_head weight, never holding the [N, V] logits (Cut
Cross-Entropy's idea, extended to RL).

Only valid rows are projected: a row whose label is ignore_index (and, in the loss, whose mask is 0)
is never read; its log-prob / entropy / extras are 0 and its gradient row is written as zeros once.
The valid rows are found on device (a stable sort of the validity flags and their count), so FLOPs
scale with N_valid and there is no host sync. Logits (TRL's order):
    z' = softcap(logit_scale * (hidden @ weight.T + bias)) / tau,   softcap(x) = c tanh(x / c).

Triton path, per chunk of compacted rows (and, in the gradient pass where the row statistics are known, of
vocabulary columns; `chunk_bytes` of fp32 z' and dz, by default 2 V H bytes; see fastppo.linear_pipeline's
`chunk_rows` / `chunk_shape`):
  1. linear_fwd      z' tiles (2 n H V FLOPs) into the chunk buffer, per-split row statistics
  2. linear_finish   lse, log-prob, entropy (extras) per row
  3. linear_dz       dz = dloss/dz from z' and the per-row coefficients, written once in the GEMM dtype;
                     d(bias) (+)= sum dz in fp32
  4. linear_dh       d(hidden) = dz @ W, accumulated in registers over the chunk's columns, carried in fp32
                     from one vocabulary chunk to the next                               (2 n H V)
  5. linear_dw       d(weight) (+)= dz^T @ hidden in a fixed order (no atomics)         (2 n H V)
- fused_linear_ppo_loss runs 1-5 in its forward (the per-token coefficients dloss/dlogp, dloss/dH are
  known once a chunk's rows have their log-probs), chunks of whole rows: 6 N_valid H V FLOPs in all; backward
  only scales the saved gradients by the upstream scalar (kernels/scale.py: one read + one write). A loss whose
  coefficients are not token-local takes the recompute path (1-2 over all rows, the loss, then 1, 3-5:
  8 N_valid H V); see `_token_local`.
- linear_logprobs runs 1-2 over all rows in forward (2 N_valid H V, no buffer) and 1, 3-5 in backward,
  where the upstream gradient is known (6 N_valid H V): 8 N_valid H V in all.
- With kept= (kernels/linear_kept.py, docs/design.md §4.1b): after 1-2 each chunk's kept columns are read from
  the z' buffer (kept statistics); the gradient's kept columns are formed before 3 (which then writes only the
  dense entropy term or zeros) and scattered over dz after it; d(bias) is summed from dz. No FLOPs added;
  linear_logprobs' forward then also writes each chunk's z' (4 N_valid V bytes). Chunks of whole rows.
- With grad_filter= (kernels/linear_filter.py, docs/design.md §4.1c): 3-5 are the filtered launches, dz zeroed
  on each row's vocabulary tiles where |onehot - p| < eps, and 4-5 skip the tiles no row of a row tile keeps.
  Chunks of whole rows.
Bytes (each launch's tensors, tiles shared by programs reused on chip), b-byte inputs, R row chunks and K
vocabulary chunks holding valid rows: z' written once and read once, dz written once and read twice
(14 N_valid V); the weight read twice per row chunk (4 V H R for bf16); d(weight) written once in its dtype
with R = 1, else an fp32 sum written, then read and written per further row chunk (8 V H (R - 1) + 4 V H) and
cast; the hidden rows read twice and the fp32 d(hidden) sum read and written per further vocabulary chunk
(about 12 N_valid H K); d(hidden) written once in its dtype. Memory: the chunk buffers (at most 2 V H bytes by
default), per-split statistics (24 N V / (LIN_SPLIT_TILES*BLOCK_V) bytes), the fp32 sums (4 V H with R > 1,
4 N H with K > 1), and in the loss the gradients held from forward to backward (as Liger's fused linear
losses). docs/design.md §5 gives the figures at the benchmark shape; fastppo/bench/linear_cost.py models every
launch.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from ._validation import check_temperature_rows
from .backend import backend_for
from .kept import KeptSet
from .kept_logprobs import check_kept
from .library import acc_dtype, decode, define, empty, encode, or_empty, refuse_double_backward
from .linear_pipeline import (
    KeptArg,
    build_linear_options,
    check_grad_filter,
    check_linear,
    flatten_rows,
    forward_rows,
    grad_filter_eps,
    gradient_rows,
    triton_kernels,
)
from .options import LinearOptions, VocabParallel
from .outputs import LogprobOutputs
from .vocab_parallel_linear import sharded_linear_logprobs

EXTRA_OUTPUTS = ("log_sum_sq_probs", "mean_logits", "is_top1")
# what linear_logprobs returns: logp, (logp, entropy) or, with extra_outputs, LogprobOutputs
LinearLogprobs = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | LogprobOutputs


# ----------------------------------------------------------------------------- linear_logprobs
def linear_outputs(hidden, weight, bias, labels, opts: LinearOptions, tau=None, kept=None):
    """Forward of linear_logprobs (the body of torch.ops.fastppo.linear_logprobs): logp, entropy,
    log_sum_sq_probs, mean_logits, is_top1 shaped like labels (None where not computed), and backward's
    statistics lse, entropy and, with `kept` (a KeptArg), the kept statistics (m_K, log s_K) (by compacted
    position on the Triton path, by row on the torch backend; None without kept)."""
    h2, y = flatten_rows(hidden, labels)
    tau = None if tau is None else tau.reshape(-1).contiguous()
    rows, out = forward_rows(h2, weight, bias, y, y != opts.ignore_index, opts, tau, kept)
    shape = labels.shape
    ent = out["ent"].view(shape) if opts.with_entropy else None
    extras = (out["sq"].view(shape), out["mean"].view(shape), out["top1"].view(shape).bool()) \
        if opts.extras else (None, None, None)
    ent_key = "ent" if rows is None else "ent_c"
    return (out["logp"].view(shape), ent, *extras, out["lse"], out[ent_key] if opts.with_entropy else None,
            out.get("klse"))


def linear_grads(hidden, weight, bias, labels, lse, ent, g_logp, g_ent, opts: LinearOptions, needs, tau=None,
                 kept=None, klse=None):
    """Backward of linear_logprobs: (d_hidden, d_weight, d_bias) of sum g_logp logp + g_ent H (None where
    not needed) from linear_outputs' statistics; the valid rows are compacted again on device."""
    h2, y = flatten_rows(hidden, labels)
    valid = y != opts.ignore_index
    rows = triton_kernels().CompactRows(valid) if opts.backend == "triton" else None
    acc = lse.dtype
    c_logp = g_logp.reshape(-1).to(acc)
    c_ent = None if g_ent is None else g_ent.reshape(-1).to(acc)
    tau = None if tau is None else tau.reshape(-1).contiguous()
    dh, dw, db = gradient_rows(h2, weight, bias, y, valid, rows, (lse, None if c_ent is None else ent), c_logp, c_ent,
                               opts, needs, tau, kept, klse)
    return (None if dh is None else dh.view(hidden.shape)), dw, db


def _check_extras(extra_outputs):
    if isinstance(extra_outputs, str) or not isinstance(extra_outputs, (tuple, list, set, frozenset)):
        raise TypeError(f"extra_outputs must be a tuple of names from {EXTRA_OUTPUTS}, got {extra_outputs!r}")
    bad = [e for e in extra_outputs if e not in EXTRA_OUTPUTS]
    if bad:
        raise ValueError(f"extra_outputs must be a subset of {EXTRA_OUTPUTS}, got unknown {bad}")
    return frozenset(extra_outputs)


# ----------------------------------------------------------------------------- ops
def linear_options_of(options: str) -> LinearOptions:
    """The LinearOptions an op received as its encoded string (cached)."""
    return decode(LinearOptions, options)


def _kept_arg(ids, offsets):
    return None if ids is None else KeptArg(ids, offsets)


def _linear_logprobs_fake(hidden, weight, bias, labels, options, backend, tau=None, ids=None, offsets=None):
    opts = linear_options_of(options)
    logp = hidden.new_empty(labels.shape, dtype=acc_dtype(hidden, weight))
    per_token = [torch.empty_like(logp) if on else empty(logp)
                 for on in (opts.with_entropy, opts.extras, opts.extras)]
    top1 = logp.new_empty(labels.shape, dtype=torch.bool) if opts.extras else empty(logp, torch.bool)
    lse = logp.new_empty((labels.numel(), 2))
    return (logp, *per_token, top1, lse, logp.new_empty((labels.numel(),)) if opts.with_entropy else empty(lse),
            torch.empty_like(lse) if ids is not None else empty(lse))


@define("linear_logprobs", _linear_logprobs_fake, kernels=True)
def linear_logprobs_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                    options: str, backend: str, tau: torch.Tensor | None = None, ids: torch.Tensor | None = None,
                    offsets: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor, torch.Tensor]:
    """(logp, entropy, log_sum_sq_probs, mean_logits, is_top1, lse, entropy_rows, kept_rows) of hidden @ weight.T
    + bias without the [N, V] logits (fastppo.linear; `options` is a LinearOptions; ids / offsets: a KeptSet's
    CSR). lse [N, 2] (row max, log-sum), entropy_rows [N] and kept_rows [N, 2] (m_K, log s_K; empty without a
    kept set) are backward's statistics. Only logp and entropy are differentiable."""
    opts = linear_options_of(options)
    logp, ent, sq, mean, top1, lse, ent_rows, klse = linear_outputs(hidden, weight, bias, labels, opts, tau,
                                                                    _kept_arg(ids, offsets))
    if ent_rows is not None and opts.backend == "torch":
        ent_rows = ent_rows.clone()   # by row there: the same values as entropy (op outputs may not alias)
    return logp, or_empty(ent, logp), or_empty(sq, logp), or_empty(mean, logp), \
        or_empty(top1, empty(logp, torch.bool)), lse, or_empty(ent_rows, logp), or_empty(klse, lse)


def linear_backward_fake(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, options, need_hidden,
                          need_weight, need_bias, backend, tau=None, ids=None, offsets=None, kept_rows=None):
    return (hidden.new_empty(hidden.shape) if need_hidden else empty(hidden),
            weight.new_empty(weight.shape) if need_weight else empty(weight),
            bias.new_empty(bias.shape) if (bias is not None and need_bias) else empty(weight))


@define("linear_logprobs_backward", linear_backward_fake, kernels=True)
def linear_logprobs_backward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor | None,
                             grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None, options: str,
                             need_hidden: bool, need_weight: bool, need_bias: bool, backend: str,
                             tau: torch.Tensor | None = None, ids: torch.Tensor | None = None,
                             offsets: torch.Tensor | None = None, kept_rows: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_hidden, d_weight, d_bias) for per-token upstream gradients (empty where not needed)."""
    has_ent = entropy is not None and grad_entropy is not None
    dh, dw, db = linear_grads(hidden, weight, bias, labels, lse, entropy if has_ent else None, grad_logp,
                              grad_entropy if has_ent else None, linear_options_of(options),
                              (need_hidden, need_weight, need_bias), tau, _kept_arg(ids, offsets), kept_rows)
    return (empty(hidden) if dh is None else dh.contiguous(), or_empty(dw, weight), or_empty(db, weight))


def _linear_logprobs_setup(ctx, inputs, output):
    hidden, weight, bias, labels, options, backend, *rest = inputs
    tau, ids, offsets = (list(rest) + [None] * 3)[:3]
    logp, ent, sq, mean, top1, lse, ent_rows, klse = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(sq, mean, top1, lse, ent_rows, klse)
    with_entropy = linear_options_of(options).with_entropy
    ctx.save_for_backward(hidden, weight, bias, labels, lse, ent_rows if with_entropy else None, tau, ids, offsets,
                          klse if ids is not None else None)
    ctx.options, ctx.backend = options, backend


def _linear_logprobs_backward(ctx, g_logp, g_ent, *_):
    hidden, weight, bias, labels, lse, ent, tau, ids, offsets, klse = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if g_logp is None and (g_ent is None or ent is None):
        return (None,) * 9
    if g_logp is None:
        g_logp = torch.zeros(labels.shape, dtype=lse.dtype, device=lse.device)
    need_bias = bias is not None and needs[2]
    dh, dw, db = linear_logprobs_backward_op(hidden, weight, bias, labels, lse, ent, g_logp, g_ent,
                                             ctx.options, needs[0], needs[1], need_bias, ctx.backend, tau, ids,
                                             offsets, klse)
    return (dh if needs[0] else None), (dw if needs[1] else None), (db if need_bias else None), *([None] * 6)


linear_logprobs_op.register_autograd(_linear_logprobs_backward, setup_context=_linear_logprobs_setup)


refuse_double_backward(linear_logprobs_backward_op, "linear_logprobs_backward")


# ----------------------------------------------------------------------------- public function
def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                    bias: torch.Tensor | None = None, temperature: float | torch.Tensor = 1.0, ignore_index: int = -100,
                    return_entropy: bool = False, final_logit_softcapping: float | None = None,
                    logit_scale: float = 1.0, extra_outputs: Collection[str] = (),
                    chunk_bytes: int | None = None, vocab_parallel: VocabParallel | None = None,
                    kept: KeptSet | None = None, logits_dtype: torch.dtype | None = None,
                    fp32_head: bool = False, grad_filter: bool | float | None = None,
                    kept_path: str = "auto") -> LinearLogprobs:
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
    `chunk_bytes` bounds the backward's [rows, columns] buffers (fp32 logits + dz; None: automatic, 2 V H
    bytes at most, see fastppo.linear_pipeline.chunk_shape). `temperature`: a positive float or a tensor of
    labels' shape (per token; no gradient).
    `vocab_parallel=fastppo.VocabParallel(group)`: the weight (and bias) passed are this rank's contiguous vocabulary
    shard, in rank order, of the process group (see VocabParallel and the README's vocabulary-parallel
    section); labels are global ids, the results those of the full vocabulary on every rank.
    hidden gets its full gradient on every rank (one all-reduce of N x H in backward). (Not with extra_outputs.)
    `kept=fastppo.KeptSet` (one row per label): log-probs renormalised over each row's kept set (the sampler's
    support after top-k / top-p / min-p), logp = z'_y - logsumexp_{j in K} z'_j; the log-prob's gradient reaches
    hidden / weight / bias through the kept columns only; entropy and extra_outputs stay full-vocabulary
    (docs/design.md §4.1b). A live label outside its row's kept set is a ValueError where the check is free
    (CPU), NaN on CUDA (log-prob and its gradient over the row's kept columns). With entropy or extra_outputs:
    same FLOPs as without (the chunk's logits, then the kept columns read from them); without, `kept_path`
    "auto" (default) forms only the kept logits h . W[ids] when that is cheaper (2 nnz H FLOPs forward, 6 nnz H
    backward, ~H b bytes per kept entry and pass, nothing of size N V; the rule is fastppo.linear_gather's),
    "dense" / "gather" force either.
    `logits_dtype` (None, torch.bfloat16, torch.float16): each logit h . w + b is rounded to that dtype before
    the transform and softmax, as an engine that materialises such logits does (matching its log-probs);
    gradients pass straight through the rounding (d round(z) / dz taken as 1). `fp32_head=True`: hidden and
    weight upcast to fp32 in the GEMMs, the gradient dz kept in fp32 too (TRL's cast_lm_head_to_fp32,
    ScaleRL's fp32 LM head; the PyTorch backend always projects in fp32), gradients returned in the inputs'
    dtypes: more exact log-probs and gradients for 16-bit heads, at fp32 GEMM speed (no 16-bit tensor cores)
    and an fp32 [rows, V] dz buffer.
    `grad_filter` (None / False: off; True: finfo(GEMM dtype).eps / 32, 2^-12 for bf16, cut-cross-entropy's
    default; a float: that threshold eps): the backward's GEMMs skip, per row, the vocabulary tiles of
    LIN_BLOCK_V columns where every |onehot(y)_j - p_j| < eps (dz zeroed there; d(bias) stays exact). The
    result is the gradient of that documented rule on both backends, batch-invariant, deterministic, and
    approximate: see kernels/linear_filter.py and docs/design.md §4.1c for the rule, the FLOPs it saves and
    its error. Not with vocab_parallel or kept."""
    check_grad_filter(grad_filter, vocab_parallel, kept)
    if vocab_parallel is not None:
        return sharded_linear_logprobs(hidden, weight, labels, vocab_parallel, bias=bias, temperature=temperature,
                                       ignore_index=ignore_index, return_entropy=return_entropy,
                                       final_logit_softcapping=final_logit_softcapping, logit_scale=logit_scale,
                                       extra_outputs=extra_outputs, chunk_bytes=chunk_bytes, kept=kept,
                                       logits_dtype=logits_dtype, fp32_head=fp32_head, kept_path=kept_path)
    check_linear(hidden, weight, labels, bias, ignore_index)
    extras = _check_extras(extra_outputs)
    tau = check_temperature_rows(temperature, labels.shape, hidden.device, "linear_logprobs", labels, ignore_index)
    opts = build_linear_options(1.0 if tau is not None else temperature, ignore_index, return_entropy, bool(extras),
                                final_logit_softcapping, logit_scale, chunk_bytes, backend_for(hidden, weight, labels),
                                logits_dtype, fp32_head, grad_filter_eps(grad_filter, hidden, weight, fp32_head),
                                kept_path=kept_path)
    if kept is not None:
        check_kept(kept, labels, weight.shape[0], ignore_index)
    logp, ent, sq, mean, top1, *_ = torch.ops.fastppo.linear_logprobs(
        hidden, weight, bias, labels, encode(opts), opts.backend, tau, *((kept.ids, kept.offsets) if kept is not None
                                                                           else (None, None)))
    if extras:   # (the op returns empty tensors for outputs not asked for)
        pick = {"log_sum_sq_probs": sq, "mean_logits": mean, "is_top1": top1}
        return LogprobOutputs(logp, ent if opts.with_entropy else None,
                              *[pick[k] if k in extras else None for k in EXTRA_OUTPUTS])
    return (logp, ent) if return_entropy else logp
