"""The vocabulary-parallel linear_logprobs and fused_linear_ppo_loss (their `vocab_parallel=` keyword): the lm_head
sharded over the vocabulary in rank order (fastppo.vocab_parallel's layout and its derivation of the combined row
statistics). Each rank runs the unsharded linear row pipeline (fastppo.linear_pipeline) on its weight shard;
forward: 2 all-reduces of O(N) floats; backward: the unsharded chunked backward on the shard with the global lse
and H, then one all-reduce of d(hidden) (N x H), so every rank gets the full gradient of the replicated hidden
states and its own slice of d(weight) / d(bias)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._validation import check_float, check_temperature_rows
from .backend import backend_for
from .kept import KeptSet
from .kept_logprobs import check_kept
from .linear_pipeline import KeptArg, build_linear_options, check_linear, linear_backward, linear_forward
from .losses import check_fused_tensors
from .options import LinearOptions, LossOptions, VocabParallel
from .outputs import PPOLossOutput
from .vocab_parallel import (
    VocabShard,
    all_reduce,
    combine_shards,
    locate_shard,
    refuse_packed,
    shard_labels,
    sharded_loss,
    want_entropy,
)


class VocabParallelLinearLogprobs(torch.autograd.Function):
    """Forward: the linear launcher on the weight shard + 2 all-reduces. Backward: the unsharded
    chunked backward on the shard with the global lse and H, then one all-reduce of d(hidden)."""

    @staticmethod
    def forward(ctx, hidden, weight_shard, bias_shard, labels, shard: VocabShard, opts: LinearOptions, tau=None,
                kept: KeptSet | None = None):
        ctx.set_materialize_grads(False)
        h2 = hidden.reshape(-1, hidden.shape[-1])
        local, owned, ignored = shard_labels(labels, shard, opts.ignore_index)
        tau = None if tau is None else tau.reshape(-1).contiguous()
        karg = None if kept is None else KeptArg(kept.ids, kept.offsets, shard.start, shard.size)
        logp_r, lse_r, ent_r, klse_r = linear_forward(h2, weight_shard, bias_shard, local, opts, tau, karg)
        klse = None
        if karg is None:
            logp, lse, ent = combine_shards(logp_r, lse_r, ent_r, owned, ignored, shard.group)
        else:   # the kept sets' (M_K, log S_K) combined like the full ones; the entropy from the full statistics
            logp, klse, _ = combine_shards(logp_r, klse_r, None, owned, ignored, shard.group)
            lse, ent = lse_r, None
            if ent_r is not None:
                _, lse, ent = combine_shards(logp_r, lse_r, ent_r, owned, ignored, shard.group)
        ctx.save_for_backward(hidden, weight_shard, bias_shard, local, lse, ent if ent is not None else lse, tau, klse)
        ctx.opts, ctx.group, ctx.kept = opts, shard.group, karg
        shape = labels.shape
        return logp.view(shape), (None if ent is None else ent.view(shape))

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, local, lse, ent, tau, klse = ctx.saved_tensors
        opts = ctx.opts
        if g_logp is None and g_ent is None:
            return (None,) * 8
        if g_logp is None:
            g_logp = torch.zeros(local.shape, dtype=lse.dtype, device=lse.device)
        has_ent = opts.with_entropy and g_ent is not None
        h2 = hidden.reshape(-1, hidden.shape[-1])
        dh, dw, db = linear_backward(h2, weight, bias, local, lse, ent if has_ent else None,
                                     g_logp.to(lse.dtype).reshape(-1),
                                     g_ent.to(lse.dtype).reshape(-1) if has_ent else None, opts,
                                     ctx.needs_input_grad[:3], tau, ctx.kept, klse)
        if dh is not None:   # (hidden requires grad on every rank or on none: the all-reduce is collective)
            dh = all_reduce(dh.to(lse.dtype), dist.ReduceOp.SUM, ctx.group).to(hidden.dtype).view(hidden.shape)
        return dh, dw, db, None, None, None, None, None


def _check_linear_shard(hidden, weight_shard, labels, bias_shard, ignore_index, group):
    check_float("hidden", hidden)
    check_float("weight_shard", weight_shard)
    if weight_shard.dim() != 2 or weight_shard.shape[0] == 0:
        raise ValueError(f"weight_shard must be [V_r, H] with V_r >= 1, got {tuple(weight_shard.shape)}")
    # the unsharded checks with the labels' range left to locate_shard (they are global ids)
    check_linear(hidden, weight_shard, torch.zeros(labels.shape, dtype=torch.int64) if isinstance(
        labels, torch.Tensor) and not labels.dtype.is_floating_point else labels, bias_shard, ignore_index)
    return locate_shard(weight_shard.shape[0], hidden.device, labels, hidden.shape[:-1], ignore_index, group)



def _check_kept_shard(kept, labels, shard, ignore_index, live=None):
    """check_kept against the full vocabulary (its size is known where the check is free, on CPU)."""
    if kept is not None:
        check_kept(kept, labels, shard.total, ignore_index, live)


def _tau_and_options(hidden, weight_shard, labels, temperature, ignore_index, with_entropy, final_logit_softcapping,
                     logit_scale, chunk_bytes, logits_dtype, fp32_head, op, *, mask=None, more=(), kept_path="auto"):
    """(per-token temperatures or None, LinearOptions) of a sharded linear call; `more`: the other tensors the
    backend is chosen from."""
    tau = check_temperature_rows(temperature, labels.shape, hidden.device, op, labels, ignore_index, mask)
    opts = build_linear_options(1.0 if tau is not None else temperature, ignore_index, with_entropy, False,
                                final_logit_softcapping, logit_scale, chunk_bytes,
                                backend_for(hidden, weight_shard, labels, *more), logits_dtype, fp32_head,
                                kept_path=kept_path)
    return tau, opts


def sharded_linear_logprobs(hidden, weight_shard, labels, vocab_parallel, *, bias, temperature, ignore_index,
                            return_entropy, final_logit_softcapping, logit_scale, extra_outputs, chunk_bytes,
                            kept=None, logits_dtype=None, fp32_head=False, kept_path="auto"):
    """linear_logprobs(..., vocab_parallel=): weight_shard [V_r, H] (and bias [V_r]) are rows
    [start_r, start_r + V_r) of the full head, hidden and labels (global ids) replicated; hidden gets the
    full gradient on every rank, weight_shard / bias their slices. 2 all-reduces of O(N) floats forward
    (4 with a kept set and entropy), 1 of N x H floats backward. extra_outputs is not offered here. A kept
    set (global ids, the same on every rank) is restricted on each rank to its shard (ids made local, the
    others skipped); the kept statistics combine across ranks like the full ones. `kept_path`: each rank's
    kept-only path over its shard's kept ids where it applies (fastppo.linear_gather)."""
    group = VocabParallel.check(vocab_parallel).group
    if extra_outputs:
        raise ValueError(f"extra_outputs is not offered with vocab_parallel, got {extra_outputs!r}")
    tau, opts = _tau_and_options(hidden, weight_shard, labels, temperature, ignore_index, return_entropy,
                                 final_logit_softcapping, logit_scale, chunk_bytes, logits_dtype, fp32_head,
                                 "linear_logprobs", kept_path=kept_path)
    shard = _check_linear_shard(hidden, weight_shard, labels, bias, ignore_index, group)
    _check_kept_shard(kept, labels, shard, ignore_index)
    logp, ent = VocabParallelLinearLogprobs.apply(hidden, weight_shard, bias, labels, shard, opts, tau, kept)
    return (logp, ent) if return_entropy else logp


def sharded_fused_linear_ppo_loss(hidden, weight_shard, labels, old_logprobs, advantages, mask, vocab_parallel, *,
                                  loss_opts: LossOptions, bias, ref_logprobs, rollout_is_weights, cu_seqlens,
                                  temperature, ignore_index, return_entropy, final_logit_softcapping, logit_scale,
                                  chunk_bytes, kept=None, logits_dtype=None, fp32_head=False,
                                  kept_path="auto") -> PPOLossOutput:
    """fused_linear_ppo_loss(..., vocab_parallel=): the head sharded as in sharded_linear_logprobs, the
    loss and per-token outputs replicated on every rank."""
    group = VocabParallel.check(vocab_parallel).group
    refuse_packed(cu_seqlens)
    check_float("hidden", hidden)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [B, T, H] or [T, H], got shape {tuple(hidden.shape)}")
    check_fused_tensors(hidden.shape[:-1], old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights,
                        loss_opts)
    tau, opts = _tau_and_options(hidden, weight_shard, labels, temperature, ignore_index,
                                 want_entropy(return_entropy, loss_opts), final_logit_softcapping, logit_scale,
                                 chunk_bytes, logits_dtype, fp32_head, "fused_linear_ppo_loss", mask=mask,
                                 more=(old_logprobs, advantages, mask), kept_path=kept_path)
    shard = _check_linear_shard(hidden, weight_shard, labels, bias, ignore_index, group)
    _check_kept_shard(kept, labels, shard, ignore_index, mask)
    labels = torch.where(mask.reshape(labels.shape) != 0, labels, opts.ignore_index)   # mask-0 rows are dead
    logp, ent = VocabParallelLinearLogprobs.apply(hidden, weight_shard, bias, labels, shard, opts, tau, kept)
    return sharded_loss(logp, ent, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights, loss_opts,
                         opts.backend)
