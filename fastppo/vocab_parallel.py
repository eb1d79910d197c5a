"""The vocabulary-parallel implementation of token_logprobs and fused_ppo_loss (their
`vocab_parallel=fastppo.VocabParallel(group)` keyword), and the layout and row-statistic combination that the
sharded linear ops share (fastppo.vocab_parallel_linear): logits (or an lm_head) sharded over the vocabulary
across the ranks of a process group, Megatron's layout (rank r holds the contiguous slice [start_r, start_r + V_r)
in rank order; uneven V_r allowed). Nothing [N, V] is ever gathered.

Each rank runs the unsharded launchers on its shard (kernels/logprobs.py or kernels/linear.py, or
their PyTorch twins), with the labels shifted into the shard and labels owned by another rank
replaced by an out-of-range sentinel (no one-hot there, NaN local log-prob, discarded). Per row it
gets its row stats (m_r, log s_r), H_r (entropy of the shard's own softmax) and, where it owns the label,
logp_r (lse_r = m_r + log s_r is never formed: the stats stay apart, exact at any magnitude). With
M = max_r m_r and a_r = (m_r - M) + log s_r = lse_r - M:

    S = sum_r exp(a_r),                 lse = M + log S  (saved as (M, log S))
    sum_i p_i z'_i - M = sum_r exp(a_r) (a_r - H_r) / S        (shard r's mean of z' is lse_r - H_r)
    H = log S - sum_r exp(a_r) (a_r - H_r) / S
    logp = (logp_r + a_r) - log S       from the owning rank r (z'_y - lse = z'_y - lse_r + lse_r - lse)

so the forward does two all-reduces of O(N) floats: MAX of [N] and SUM of [N, 3 or 4] (exp(a_r),
the entropy term when entropy is wanted, the label term, and an "owned" count that turns a label
owned by no rank into NaN as the unsharded op does). Backward needs no collective for the logits:
each rank calls the unsharded backward launcher on its shard with the GLOBAL lse and H, which is
exactly the shard's slice of the full gradient. The linear ops all-reduce d(hidden) (N x H) once,
so every rank gets the full gradient of the replicated hidden states, and its own slice of
d(weight) / d(bias). The shard sizes are all-gathered once per call (P ints, no host sync).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ._validation import check_float, check_inplace, check_labels, check_temperature_rows
from .backend import backend_for
from .dispatch import ops
from .kept import KeptSet
from .kept_logprobs import check_kept, check_kept_vocab
from .losses import check_fused_tensors, fused_stat_names, loss_terms_from_logprobs, stats_dict
from .options import LogprobOptions, LossOptions, VocabParallel
from .outputs import PPOLossOutput


# ----------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the vocabulary: `start` is a 0-d int64 device tensor (no host sync),
    `total` the full vocabulary size when it is free to know (CPU tensors), else None."""

    group: object
    start: torch.Tensor
    size: int
    total: int | None


def vocab_shard(local_size: int, device: torch.device, group=None) -> VocabShard:
    """All-gather the P shard sizes (one collective of P int64) and locate this rank's slice."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fastppo.distributed needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    # gloo collectives run on CPU tensors, nccl on CUDA ones
    comm_device = torch.device("cpu") if dist.get_backend(group) == "gloo" else device
    mine = torch.tensor([local_size], dtype=torch.int64, device=comm_device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    sizes = torch.cat(gathered)
    start = sizes[:rank].sum().to(device)
    total = int(sizes.sum()) if sizes.device.type == "cpu" else None
    return VocabShard(group, start, int(local_size), total)


def all_reduce(x: torch.Tensor, op, group):
    """In-place all-reduce through the module attribute (so tests can count the calls); gloo needs
    CPU tensors, so a CUDA tensor under gloo makes a round trip."""
    if dist.get_backend(group) == "gloo" and x.device.type != "cpu":
        y = x.cpu()
        dist.all_reduce(y, op=op, group=group)
        x.copy_(y)
    else:
        dist.all_reduce(x, op=op, group=group)
    return x


def sentinel_label(ignore_index: int) -> int:
    """A label outside every shard that is not ignore_index: the launchers give it NaN log-prob,
    exact lse / entropy, and a gradient with no one-hot term."""
    return -1 if ignore_index != -1 else -2


def shard_labels(labels: torch.Tensor, shard: VocabShard, ignore_index: int):
    """(local labels, owned, ignored): labels shifted into the shard; a label owned by another rank
    becomes the sentinel; ignored labels stay ignore_index."""
    y = labels.reshape(-1)
    ignored = y == ignore_index
    local = y - shard.start
    owned = (~ignored) & (local >= 0) & (local < shard.size)
    sentinel = torch.full_like(y, sentinel_label(ignore_index))
    local = torch.where(owned, local, torch.where(ignored, y, sentinel))
    return local, owned, ignored


def combine_shards(logp_r, lse_r, ent_r, owned, ignored, group):
    """Global (logp, lse, H) per row from every rank's (logp_r, lse_r, H_r), lse_r = the shard's row stats
    (m_r, log s_r) [N, 2] and the returned lse the global (M, log S) [N, 2], never one absolute lse (exact
    at any magnitude): 2 all-reduces (MAX of [N]; SUM of [N, 3], or [N, 4] with entropy). Ignored rows give
    0 log-prob and entropy; a label no rank owns gives NaN (as an out-of-range label does unsharded)."""
    m_r, log_s_r = lse_r[:, 0], lse_r[:, 1]
    m = all_reduce(torch.where(log_s_r == float("-inf"), log_s_r, m_r), dist.ReduceOp.MAX, group)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)    # an all -inf row: S = 0, lse = -inf
    a = (m_r - m) + log_s_r                                         # log of the shard's sum exp(z' - M)
    e = torch.exp(a)
    zero = torch.zeros_like(e)
    cols = [e, torch.where(owned, logp_r + a, zero), owned.to(e.dtype)]
    if ent_r is not None:
        cols.append(torch.where(e == 0, zero, e * (a - ent_r)))
    sums = all_reduce(torch.stack(cols, 1), dist.ReduceOp.SUM, group)
    log_s = torch.log(sums[:, 0])
    lse = torch.stack((m, log_s), 1)
    logp = torch.where(sums[:, 2] > 0, sums[:, 1] - log_s, float("nan"))
    logp = torch.where(ignored, zero, logp)
    ent = None
    if ent_r is not None:
        ent = torch.where(ignored, zero, log_s - sums[:, 3] / sums[:, 0])
    return logp, lse, ent


# ----------------------------------------------------------------------------- logits
def _shard_forward(logits, labels, shard, opts: LogprobOptions, tau=None):
    local, owned, ignored = shard_labels(labels, shard, opts.ignore_index)
    logp_r, lse_r, ent_r = ops("logprobs", opts.backend).logprobs_fwd(
        logits, local, ignore_index=opts.ignore_index, with_entropy=opts.with_entropy, tau=tau, **opts.transform())
    logp, lse, ent = combine_shards(logp_r, lse_r, ent_r, owned, ignored, shard.group)
    return local, logp, lse, ent


class VocabParallelLogprobs(torch.autograd.Function):
    """Forward: shard statistics + 2 all-reduces. Backward: the unsharded backward launcher on the
    shard with the global lse and H (no collective). `tau`: per-token temperatures (labels' shape, replicated;
    None: opts' scalar one)."""

    @staticmethod
    def forward(ctx, logits, labels, shard: VocabShard, opts: LogprobOptions, tau=None):
        ctx.set_materialize_grads(False)
        local, logp, lse, ent = _shard_forward(logits, labels, shard, opts, tau)
        ctx.save_for_backward(logits, local, lse, ent if ent is not None else lse, tau)
        ctx.opts = opts
        shape = labels.shape
        return logp.view(shape), (None if ent is None else ent.view(shape))

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, local, lse, ent, tau = ctx.saved_tensors
        opts = ctx.opts
        if g_logp is None and g_ent is None:
            return None, None, None, None, None
        if g_logp is None:
            g_logp = torch.zeros(local.shape, dtype=lse.dtype, device=lse.device)
        has_ent = opts.with_entropy and g_ent is not None
        dlogits = ops("logprobs", opts.backend).logprobs_bwd(
            logits, local, lse, ent if has_ent else None, g_logp.to(lse.dtype).reshape(-1),
            g_ent.to(lse.dtype).reshape(-1) if has_ent else None, ignore_index=opts.ignore_index,
            inplace=opts.inplace, tau=tau, **opts.transform())
        return dlogits, None, None, None, None


# ----------------------------------------------------------------------------- kept sets, sharded
def shard_kept_ids(ids: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """A KeptSet's global ids (`kept.ids`) as this rank's local ids: int64 [nnz] = ids - shard.start, with the
    set's offsets unchanged (no host sync). Ids in other ranks' shards land outside [0, shard.size), which the
    kept kernels and their PyTorch twin skip (forward and backward); the CSR is not compacted (that would need
    the shard's nnz on the host). Ascending order within a row is kept."""
    return ids.long() - shard.start


def _float_tau(temperature, tau):
    return tau if tau is not None else float(temperature)


class VocabParallelKeptLogprobs(torch.autograd.Function):
    """token_logprobs(kept=, vocab_parallel=): each rank runs the kept launcher on its shard with the kept
    ids shifted into it (shard_kept_ids) and raw_stats (its kept (m_K,r, log s_K,r): -inf, -inf where the row
    keeps nothing here); combine_shards turns them into the global (M_K, log S_K) and the kept log-prob from
    the rank that owns the label and keeps it (a label kept by no rank: NaN, as unsharded). With entropy a
    second combine_shards of the shards' full-row (lse_r, H_r) gives the full-vocabulary entropy and lse.
    2 all-reduces of O(N) (4 with entropy). Backward: the unsharded kept backward launcher on the shard with
    the global statistics, exactly the shard's slice of the full gradient (no collective)."""

    @staticmethod
    def forward(ctx, logits, labels, ids, offsets, tau, shard: VocabShard, opts: LogprobOptions, temperature):
        ctx.set_materialize_grads(False)
        local, owned, ignored = shard_labels(labels, shard, opts.ignore_index)
        lids = shard_kept_ids(ids, shard)
        mod = ops("kept", opts.backend)
        st = mod.kept_logprobs_fwd(logits, local, lids, offsets, temperature=_float_tau(temperature, tau),
                                   ignore_index=opts.ignore_index, with_entropy=opts.with_entropy,
                                   logit_scale=opts.logit_scale, softcap=opts.softcap, raw_stats=True)
        kept_here = owned & ~torch.isnan(st.logp)
        logp, stats_k, _ = combine_shards(st.logp, torch.stack((st.m, st.log_s), 1), None, kept_here, ignored,
                                          shard.group)
        missing = torch.isnan(logp)                    # as unsharded: log s_K = NaN, so the gradient is NaN too
        m_k = torch.where(missing, 0.0, stats_k[:, 0])
        log_s_k = torch.where(missing, float("nan"), stats_k[:, 1])
        lse = ent = None
        if opts.with_entropy:
            zero = torch.zeros_like(st.lse)
            _, full, ent = combine_shards(zero, torch.stack((st.lse, zero), 1), st.entropy,
                                          torch.zeros_like(owned), ignored, shard.group)
            lse = full[:, 0] + full[:, 1]
        ctx.save_for_backward(logits, local, lids, offsets, tau, m_k, log_s_k, lse, ent)
        ctx.opts, ctx.temperature = opts, temperature
        shape = labels.shape
        return logp.view(shape), (None if ent is None else ent.view(shape))

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, local, lids, offsets, tau, m_k, log_s_k, lse, ent = ctx.saved_tensors
        opts = ctx.opts
        if g_logp is None and g_ent is None:
            return (None,) * 8
        if g_logp is None:
            g_logp = torch.zeros(local.shape, dtype=m_k.dtype, device=m_k.device)
        has_ent = opts.with_entropy and g_ent is not None
        mod = ops("kept", opts.backend)
        stats = mod.KeptStats(m_k, m_k, log_s_k, lse if has_ent else None, ent if has_ent else None)
        dlogits = mod.kept_logprobs_bwd(
            logits, local, lids, offsets, stats, g_logp.to(m_k.dtype).reshape(-1),
            g_ent.to(m_k.dtype).reshape(-1) if has_ent else None, temperature=_float_tau(ctx.temperature, tau),
            ignore_index=opts.ignore_index, logit_scale=opts.logit_scale, softcap=opts.softcap)
        return dlogits, None, None, None, None, None, None, None


def _sharded_logprobs(logits_shard, labels, shard, opts, tau, kept: KeptSet | None, temperature):
    """(logp, entropy or None) of the sharded logits op, kept or not."""
    if kept is None:
        return VocabParallelLogprobs.apply(logits_shard, labels, shard, opts, tau)
    if shard.total is not None:
        check_kept_vocab(kept, shard.total)
    return VocabParallelKeptLogprobs.apply(logits_shard, labels, kept.ids, kept.offsets, tau, shard, opts,
                                           temperature)


NO_VOCAB_LIMIT = 2**62


def locate_shard(local_size, device, labels, lead_shape, ignore_index, group):
    """Local checks first (a rank that raises must not leave the others waiting in a collective),
    then the shard-size all-gather, then the label range against the full vocabulary where free."""
    check_labels(labels, lead_shape, NO_VOCAB_LIMIT, ignore_index)
    shard = vocab_shard(local_size, device, group)
    if shard.total is not None:
        check_labels(labels, lead_shape, shard.total, ignore_index)
    return shard


def _check_logits(logits_shard, labels, ignore_index, group):
    check_float("logits_shard", logits_shard)
    if logits_shard.dim() < 1 or logits_shard.shape[-1] == 0:
        raise ValueError(f"logits_shard must have a non-empty vocabulary dim, got shape "
                         f"{tuple(logits_shard.shape)}")
    return locate_shard(logits_shard.shape[-1], logits_shard.device, labels, logits_shard.shape[:-1], ignore_index,
                   group)


class ShardedLossTerms(torch.autograd.Function):
    """The loss on the (replicated) global per-token log-probs and entropy: the library's per-token loss
    function (fastppo.losses.loss_terms_from_logprobs, O(N), no collective), so every rank computes the
    value, stats and per-token outputs of the unsharded fused ops. Backward hands dloss/dlogp = coef and
    dloss/dH = coef_ent, times the upstream gradient, to the sharded log-prob op's backward (the entropy
    gets no gradient when entropy_coef is 0, as unsharded)."""

    @staticmethod
    def forward(ctx, logp, ent, old, adv, mask, ref, isw, opts: LossOptions, backend: str):
        ctx.set_materialize_grads(False)
        res = loss_terms_from_logprobs(logp, ent, old, adv, mask, opts=opts, backend=backend, ref=ref,
                                       rollout_is_weights=isw)
        use_ent_grad = ent is not None and opts.entropy_coef != 0
        ctx.save_for_backward(res.coef, res.coef_ent if use_ent_grad else res.coef)
        ctx.use_ent_grad, ctx.shape = use_ent_grad, logp.shape
        ctx.mark_non_differentiable(*[t for t in (res.kl, res.stats) if t is not None])
        return res.loss, res.kl, res.stats

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, *_):
        if g_loss is None:
            return (None,) * 9
        coef, coef_ent = ctx.saved_tensors
        g = g_loss.to(coef.dtype)
        g_logp = (g * coef).view(ctx.shape)
        g_ent = (g * coef_ent).view(ctx.shape) if ctx.use_ent_grad else None
        return g_logp, g_ent, None, None, None, None, None, None, None


def sharded_loss(logp, ent, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights, opts: LossOptions,
                  backend: str) -> PPOLossOutput:
    """PPOLossOutput of the unsharded fused ops from the global per-token log-probs (and entropy) of a
    vocabulary-parallel log-prob op, chained through its autograd."""
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    loss, kl, stats = ShardedLossTerms.apply(logp, ent, old_logprobs.detach(), advantages.detach(), mask,
                                             detach(ref_logprobs), detach(rollout_is_weights), opts, backend)
    return PPOLossOutput(loss=loss, logprobs=logp.detach(), kl=kl, entropy=detach(ent),
                         stats=stats_dict(stats, fused_stat_names(opts, kl is not None, ent is not None)))


# ----------------------------------------------------------------------------- the two logits ops, sharded
def want_entropy(return_entropy, opts: LossOptions):
    return bool(return_entropy or opts.entropy_coef != 0 or opts.entropy_quantile is not None)


def sharded_token_logprobs(logits_shard, labels, vocab_parallel, *, temperature, ignore_index, return_entropy,
                           final_logit_softcapping, logit_scale, kept: KeptSet | None = None):
    """token_logprobs(..., vocab_parallel=): logits_shard [..., V_r] is this rank's vocabulary slice; kept (global
    ids, replicated) and a per-token temperature tensor (replicated) as unsharded."""
    group = VocabParallel.check(vocab_parallel).group
    check_float("logits_shard", logits_shard)
    tau = check_temperature_rows(temperature, labels.shape, logits_shard.device, "token_logprobs", labels,
                                 ignore_index)
    opts = LogprobOptions.build(temperature=1.0 if tau is not None else temperature, logit_scale=logit_scale,
                                final_logit_softcapping=final_logit_softcapping, ignore_index=ignore_index,
                                with_entropy=return_entropy, backend=backend_for(logits_shard, labels))
    if kept is not None:
        check_kept(kept, labels, None, ignore_index)
    shard = _check_logits(logits_shard, labels, ignore_index, group)
    logp, ent = _sharded_logprobs(logits_shard, labels, shard, opts, tau, kept, temperature)
    return (logp, ent) if return_entropy else logp


def sharded_fused_ppo_loss(logits_shard, labels, old_logprobs, advantages, mask, vocab_parallel, *,
                           loss_opts: LossOptions, ref_logprobs, rollout_is_weights, cu_seqlens, temperature,
                           ignore_index, return_entropy, inplace, final_logit_softcapping,
                           logit_scale, kept: KeptSet | None = None) -> PPOLossOutput:
    """fused_ppo_loss(..., vocab_parallel=): the per-token arguments (kept and a per-token temperature
    included) are replicated, the loss and the per-token outputs the same on every rank, each rank's
    logits_shard gets its gradient slice. As unsharded, rows where mask is 0 count as ignored labels (0
    log-prob, no gradient, never read)."""
    group = VocabParallel.check(vocab_parallel).group
    refuse_packed(cu_seqlens)
    check_float("logits_shard", logits_shard)
    if logits_shard.dim() not in (2, 3):
        raise ValueError(f"logits_shard must be [B, T, V_r] or [T, V_r], got shape {tuple(logits_shard.shape)}")
    check_fused_tensors(logits_shard.shape[:-1], old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights,
                        loss_opts)
    tau = check_temperature_rows(temperature, labels.shape, logits_shard.device, "fused_ppo_loss", labels,
                                 ignore_index, mask)
    if kept is not None:
        check_kept(kept, labels, None, ignore_index, live=mask)
    opts = LogprobOptions.build(temperature=1.0 if tau is not None else temperature, logit_scale=logit_scale,
                                final_logit_softcapping=final_logit_softcapping, ignore_index=ignore_index,
                                with_entropy=want_entropy(return_entropy, loss_opts), inplace=inplace,
                                backend=backend_for(logits_shard, labels, old_logprobs, advantages, mask))
    if inplace:
        check_inplace("logits_shard", logits_shard)
    shard = _check_logits(logits_shard, labels, ignore_index, group)
    labels = torch.where(mask != 0, labels, opts.ignore_index)      # mask-0 rows are dead, as unsharded
    logp, ent = _sharded_logprobs(logits_shard, labels, shard, opts, tau, kept, temperature)
    return sharded_loss(logp, ent, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights, loss_opts,
                         opts.backend)


def refuse_packed(cu_seqlens):
    if cu_seqlens is not None:
        raise ValueError("cu_seqlens (packed sequences) is not offered with vocab_parallel; pass padded [B, T] "
                         "tensors")
