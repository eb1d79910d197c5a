"""Context parallel: every sequence split across the ranks of a process group in contiguous shards (Megatron's
context parallel, verl's Ulysses sequence parallel). gae and the policy / value losses with every aggregation on
each rank's shard give that rank's part of the unsplit result. The API is these functions, each the single-process
op's signature plus `group=` (None: the default process group), as fastppo.distributed is for vocabulary shards:

    gae(rewards, values, mask, *, gamma, lam, cu_seqlens=None, group=None) -> (advantages, returns)
    ppo_policy_loss(logprobs, old_logprobs, advantages, mask, *, <ppo_policy_loss's keywords>, group=None)
    value_loss(values, old_values, returns, mask, *, <value_loss's keywords>, group=None)

Layout: the ranks hold, in rank order, contiguous pieces of every sequence; the unsplit sequence is their
concatenation. Padded: [B, T_r], columns [T_0 + ... + T_{r-1}, ... + T_r) of the unsplit [B, T] (T_r may differ
by rank, 0 allowed). Packed: 1-D [n_r] with this rank's cu_seqlens [S + 1] (the same S on every rank): sequence
s's piece is tokens [cu[s], cu[s + 1]), empty pieces allowed, so a packed stream cut into contiguous rank slices
(a sequence wholly on one rank, another across two) is described by each rank's offsets. Per-sequence
advantages ([B] / [S]) are replicated. Labels: the log-prob of a shard's last token is that of the next shard's
first token; the CALLER shifts the labels (labels[t] = input_ids[t + 1]) before splitting, as Megatron and verl
do, so each rank's logits [..., T_r, V] and labels [..., T_r] are local and the logits ops need no exchange.

Results: gae returns this shard's slice of the unsplit advantages and returns. A loss returns (loss, stats):
`loss` is this rank's share of the unsplit loss (the shares sum to it) and its backward gives this rank's tokens
the gradient of the UNSPLIT loss, d loss / d logprobs_r (for gspo / gmpo that includes the other ranks' tokens'
dependence on this shard through the sequence means). Parameters replicated over the group therefore get the
unsplit gradient as the SUM over ranks (DDP / FSDP average: 1 / world of it, as for any per-rank loss). stats are
the unsplit call's, on every rank. No double backward; entropy_quantile is refused (its threshold is a quantile
over every rank's tokens).

Math: every aggregation weight and sequence-level term is a function of per-sequence sums over valid tokens
(the counts n_b; gspo: sums of d and of the tokens' dL / ds_b; gmpo: sums of the clipped log ratios, advantages
and log IS weights): each is the shard's segment sum all-reduced over the group, and the per-token formulas are
fastppo.losses_torch's, run with those global sums (`_GroupSegments`). GAE: the reverse recurrence over a shard
is affine in the carry (V_in, g_in) from the shard to its right; with c = gamma lam, K = gamma V_in + c g_in,
A^0 the shard's gae from a zero carry, j_t its valid tokens after t and k its valid tokens:
    A_t = A^0_t + c^j_t K,   R_t = A_t + V_t   (valid t; 0 elsewhere)
    carry out = (V_first, A^0_first + c^(k-1) K) if k > 0 else (V_in, g_in)
one all-gather of every rank's per-sequence (k > 0, V_first, A^0_first, c^(k-1)) lets each rank compose the maps
of the ranks to its right (the last rank's carry is (0, 0)).

Collectives per call (tests/ops/test_context_parallel.py counts them): gae 1 all_gather of 4 S floats per rank;
a loss 1 all_reduce of the S counts + 1 all_gather of the 14-float stats vector, plus for gspo 2 more all_reduces
of S (the mean log ratio, then the sum of dL / ds_b), gspo_token 1, gmpo 2 (3 with rollout IS weights), for
seq-mean-token-sum-norm without `horizon` 1 of S (packed: the sequences' lengths) or 1 float (padded: T).
Backends: gae runs fastppo.gae on the shard (Triton kernel or PyTorch backend, as chosen for the device), then
the correction in PyTorch; the losses run the PyTorch closed form (fastppo.losses_torch) on the shard's device
(a few elementwise launches per call). No host sync: every size comes from a shape.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from . import advantages, losses_torch
from ._validation import check_float, check_same_shape
from .kernels.loss_layout import STATS
from .losses import check_policy_tensors, check_token_args, policy_stat_names, stats_dict
from .options import LossOptions
from .packed import Segments

__all__ = ["gae", "ppo_policy_loss", "value_loss"]

_SUM_NORM = "seq-mean-token-sum-norm"


def _check_group(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("fastppo.context_parallel needs an initialised torch.distributed process group")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")


class _GroupSegments(Segments):
    """Segments of this rank's shard whose per-sequence sums and horizon are those of the unsplit batch: the
    shard's segment sums all-reduced over `group`."""

    def __init__(self, mask, cu_seqlens, group):
        B, T = (mask.shape[0], mask.shape[1]) if mask.dim() == 2 else (1, mask.shape[0])
        super().__init__(cu_seqlens, B, T, mask.device)
        self.group, self.device = group, mask.device

    def sum(self, v):
        out = super().sum(v).contiguous()
        dist.all_reduce(out, group=self.group)
        return out

    def horizon(self, dtype):
        if self.packed:
            lengths = (self.cu[1:] - self.cu[:-1]).to(dtype)
            dist.all_reduce(lengths, group=self.group)
            return lengths.max()
        t = torch.full((), float(self.T), dtype=dtype, device=self.device)
        dist.all_reduce(t, group=self.group)
        return t


def _combine_stats(stats, group):
    """The unsplit call's stats from every rank's (shares of the sums over the global token counts): summed
    over ranks, ratio_max the max, num_tokens / num_seqs (already global) as they are."""
    parts = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, stats.contiguous(), group=group)
    stacked = torch.stack(parts)
    out = stacked.sum(0)
    for name in ("ratio_max",):
        out[STATS.index(name)] = stacked[:, STATS.index(name)].amax()
    for name in ("num_tokens", "num_seqs"):
        out[STATS.index(name)] = stats[STATS.index(name)]
    return out


class _ShardLoss(torch.autograd.Function):
    """The rank's share of the loss; backward: upstream gradient x coef (d unsplit loss / d this shard)."""

    @staticmethod
    def forward(ctx, x, share, coef):
        ctx.shape, ctx.dtype = x.shape, x.dtype
        ctx.save_for_backward(coef)
        return share.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (coef,) = ctx.saved_tensors
        return (g.to(coef.dtype) * coef).view(ctx.shape).to(ctx.dtype), None, None


def _options(opts: LossOptions, agg: str, horizon):
    """horizon only enters seq-mean-token-sum-norm: elsewhere a placeholder spares its collective."""
    if agg != _SUM_NORM and horizon is None:
        return replace(opts, horizon=1.0)
    return opts


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    *, group: dist.ProcessGroup | None = None, clip_low: float = 0.2, clip_high: float | None = None,
                    dual_clip: float | None = None, agg: str = "token-mean", num_tokens: float | None = None,
                    num_seqs: float | None = None, horizon: float | None = None, policy_loss: str = "ppo",
                    ratio_max: float | None = None, sapo_tau_pos: float = 1.0, sapo_tau_neg: float = 1.05,
                    rollout_is_weights: torch.Tensor | None = None,
                    cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """fastppo.ppo_policy_loss on this rank's shard of sequences split over `group` (layout and gradient
    semantics: the module docstring). Returns (this rank's share of the unsplit loss, the unsplit stats);
    horizon defaults to the unsplit batch's (the longest unsplit sequence, packed; sum of T_r, padded)."""
    _check_group(group)
    opts = LossOptions.policy(policy_loss=policy_loss, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                              ratio_max=ratio_max, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg, agg=agg,
                              num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon)
    if opts.cov_select or policy_loss == "vespo":   # a batch-global selection / a weight the twin is not given here
        raise ValueError(f"policy_loss={policy_loss!r} is not supported with context parallel yet (its "
                         f"{'covariance selection' if opts.cov_select else 'gamma weight'} needs the unsplit tokens)")
    check_float("logprobs", logprobs)
    check_policy_tensors("logprobs", logprobs.shape, old_logprobs, advantages, mask, opts,
                         rollout_is_weights=rollout_is_weights, cu_seqlens=cu_seqlens)
    seg = _GroupSegments(mask, cu_seqlens, group)
    isw = None if rollout_is_weights is None else rollout_is_weights.detach()
    res = losses_torch.policy_loss_agg(logprobs.detach(), old_logprobs.detach(), advantages.detach(), mask,
                                       opts=_options(opts, agg, horizon), rollout_is_weights=isw,
                                       cu_seqlens=cu_seqlens, segments=seg)
    loss = _ShardLoss.apply(logprobs, res.loss, res.coef)
    return loss, stats_dict(_combine_stats(res.stats, group), policy_stat_names(opts))


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
               group: dist.ProcessGroup | None = None, clip: float | None = None, agg: str = "token-mean",
               num_tokens: float | None = None, num_seqs: float | None = None, horizon: float | None = None,
               cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """fastppo.value_loss on this rank's shard (as ppo_policy_loss here). Returns (share, {"vf_clipfrac"})."""
    _check_group(group)
    opts = LossOptions.value(clip=clip, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon)
    check_float("values", values)
    check_token_args("values", values.shape, old_values, returns, mask, old_name="old_values", adv_name="returns",
                     cu_seqlens=cu_seqlens)
    check_same_shape("returns", returns, "values", values.shape)
    seg = _GroupSegments(mask, cu_seqlens, group)
    res = losses_torch.value_loss_agg(values.detach(), old_values.detach(), returns.detach(), mask,
                                      opts=_options(opts, agg, horizon), cu_seqlens=cu_seqlens, segments=seg)
    loss = _ShardLoss.apply(values, res.loss, res.coef)
    return loss, stats_dict(_combine_stats(res.stats, group), [("vf_clipfrac", "clipfrac")])


# ----------------------------------------------------------------------------- gae
def _first_valid(m, seg):
    """Per sequence of the shard: (has a valid token [S] bool, k its valid tokens [S], `take` reading a per-token
    [B, T] / [1, total] tensor at each sequence's first valid token (0 where it has none), j_t the valid tokens
    after each token in its sequence)."""
    mi = m.to(torch.int64)
    if not seg.packed:
        k = mi.sum(-1)
        after = mi.flip(-1).cumsum(-1).flip(-1) - mi
        first = torch.cat((mi, torch.ones_like(mi[:, :1])), -1).argmax(-1)   # the first 1; T (a 0 column) if none
        return k > 0, k, lambda x: torch.cat((x, torch.zeros_like(x[:, :1])), -1).gather(-1, first[:, None])[:, 0], \
            after
    flat = mi.reshape(-1)
    n = flat.shape[0]
    incl = flat.cumsum(0)
    upto = torch.cat((incl.new_zeros(1), incl))                   # valid tokens before each offset
    k = upto[seg.cu[1:]] - upto[seg.cu[:-1]]
    after = (upto[seg.cu[1:]][seg.seg] - incl).view(1, -1)
    pos = torch.arange(n, device=flat.device, dtype=torch.float64)
    first = torch.segment_reduce(torch.where(flat != 0, pos, float(n)), "min", offsets=seg.cu, unsafe=True,
                                 initial=float(n)).to(torch.int64).clamp_(0, n)      # n (a 0 entry) if none
    return k > 0, k, lambda x: torch.cat((x.reshape(-1), x.new_zeros(1)))[first], after


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 1.0,
        group: dist.ProcessGroup | None = None,
        cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fastppo.gae on this rank's shard of sequences split over `group` (layout and the carry's math: the module
    docstring): returns this shard's slice of the unsplit (advantages, returns), float32 (float64 for float64
    input). One all_gather of 4 S float64 per rank."""
    _check_group(group)
    adv0, ret0 = advantages.gae(rewards, values, mask, gamma=gamma, lam=lam, cu_seqlens=cu_seqlens)
    seg = _GroupSegments(mask, cu_seqlens, group)
    f64 = torch.float64
    m = seg.per_token(mask, f64) != 0
    a0, r0 = seg.per_token(adv0, f64), seg.per_token(ret0, f64)
    v = torch.where(m, seg.per_token(values, f64), 0.0)
    has, k, take, after = _first_valid(m, seg)
    gamma, c = float(gamma), float(gamma) * float(lam)
    power = lambda e: torch.full(e.shape, c, dtype=f64, device=e.device).pow(e.to(f64))  # noqa: E731  (0^0 = 1)
    summary = torch.stack((has.to(f64), take(v), take(a0), power((k - 1).clamp_min(0))), -1)     # [S, 4]
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    parts = [torch.empty_like(summary) for _ in range(world)]
    dist.all_gather(parts, summary, group=group)
    v_in = g_in = torch.zeros(summary.shape[0], dtype=f64, device=summary.device)
    for q in range(world - 1, rank, -1):          # the carry enters at the last rank and moves left
        live, v_first, a_first, p = parts[q].unbind(-1)
        live = live != 0
        v_in, g_in = (torch.where(live, v_first, v_in),
                      torch.where(live, a_first + p * (gamma * v_in + c * g_in), g_in))
    kick = seg.spread(gamma * v_in + c * g_in)
    corr = torch.where(m, power(after) * kick, 0.0)
    return (a0 + corr).to(adv0.dtype).view(adv0.shape), (r0 + corr).to(ret0.dtype).view(ret0.shape)
