"""Vocabulary-parallel versions of the logits and linear ops under their own names: each is the one public
op with `vocab_parallel=fastppo.VocabParallel(group)` (see fastppo.vocab_parallel for the layout, the math
and the collectives), every other argument forwarded unchanged, documented once on that op.

    fastppo.distributed.token_logprobs(logits_shard, labels, group=g, **kw)
        == fastppo.token_logprobs(logits_shard, labels, vocab_parallel=fastppo.VocabParallel(g), **kw)

and likewise fused_ppo_loss, linear_logprobs and fused_linear_ppo_loss. The machinery (VocabShard,
vocab_shard, shard_labels, combine_shards and the autograd functions) is re-exported from
fastppo.vocab_parallel."""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import fused as _fused
from . import fused_linear as _fused_linear
from . import linear as _linear
from . import logprobs as _logprobs
from .options import VocabParallel
from .outputs import PPOLossOutput
from .vocab_parallel import (
    NO_VOCAB_LIMIT,
    ShardedLossTerms,
    VocabParallelLogprobs,
    VocabShard,
    combine_shards,
    sentinel_label,
    shard_labels,
    vocab_shard,
)
from .vocab_parallel_linear import VocabParallelLinearLogprobs

__all__ = [
    "NO_VOCAB_LIMIT",
    "ShardedLossTerms",
    "VocabParallel",
    "VocabParallelLinearLogprobs",
    "VocabParallelLogprobs",
    "VocabShard",
    "combine_shards",
    "fused_linear_ppo_loss",
    "fused_ppo_loss",
    "linear_logprobs",
    "sentinel_label",
    "shard_labels",
    "token_logprobs",
    "vocab_shard",
]


def token_logprobs(logits_shard: torch.Tensor, labels: torch.Tensor, *, group: dist.ProcessGroup | None = None,
                   **kwargs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """fastppo.token_logprobs(logits_shard, labels, vocab_parallel=VocabParallel(group), **kwargs):
    logits_shard [..., V_r] is this rank's contiguous vocabulary slice, in rank order over `group`."""
    return _logprobs.token_logprobs(logits_shard, labels, vocab_parallel=VocabParallel(group), **kwargs)


def fused_ppo_loss(logits_shard: torch.Tensor, labels: torch.Tensor, old_logprobs: torch.Tensor,
                   advantages: torch.Tensor, mask: torch.Tensor, *, group: dist.ProcessGroup | None = None,
                   **kwargs) -> PPOLossOutput:
    """fastppo.fused_ppo_loss(logits_shard, labels, old_logprobs, advantages, mask,
    vocab_parallel=VocabParallel(group), **kwargs)."""
    return _fused.fused_ppo_loss(logits_shard, labels, old_logprobs, advantages, mask,
                                 vocab_parallel=VocabParallel(group), **kwargs)


def linear_logprobs(hidden: torch.Tensor, weight_shard: torch.Tensor, labels: torch.Tensor, *,
                    group: dist.ProcessGroup | None = None, **kwargs) -> _linear.LinearLogprobs:
    """fastppo.linear_logprobs(hidden, weight_shard, labels, vocab_parallel=VocabParallel(group), **kwargs):
    weight_shard [V_r, H] (and bias [V_r]) are this rank's rows of the lm_head."""
    return _linear.linear_logprobs(hidden, weight_shard, labels, vocab_parallel=VocabParallel(group), **kwargs)


def fused_linear_ppo_loss(hidden: torch.Tensor, weight_shard: torch.Tensor, labels: torch.Tensor,
                          old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                          group: dist.ProcessGroup | None = None, **kwargs) -> PPOLossOutput:
    """fastppo.fused_linear_ppo_loss(hidden, weight_shard, labels, old_logprobs, advantages, mask,
    vocab_parallel=VocabParallel(group), **kwargs)."""
    return _fused_linear.fused_linear_ppo_loss(hidden, weight_shard, labels, old_logprobs, advantages, mask,
                                               vocab_parallel=VocabParallel(group), **kwargs)
