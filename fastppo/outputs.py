"""Result types of the loss functions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch


@dataclass
class PPOLossOutput:
    """`loss` is a differentiable scalar; the per-token tensors are detached float32 of the
    labels' shape (`kl` is None without ref_logprobs, `entropy` None when it was not computed);
    `stats` maps names to detached 0-d tensors (no host sync happens to build them)."""

    loss: torch.Tensor
    logprobs: torch.Tensor
    kl: torch.Tensor | None
    entropy: torch.Tensor | None
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class LogprobOutputs(NamedTuple):
    """Per-token outputs of token_logprobs / linear_logprobs when `extra_outputs` is given (TRL's fused-head
    fields, same definitions; None where not requested; 0 / False at ignored labels):
    logprobs (differentiable), entropy (differentiable, with return_entropy=True),
    log_sum_sq_probs = log sum_v p_v^2, mean_logits = mean over v of the scaled logits z'_v, is_top1 = the
    label is the first argmax of z' (bool); these three carry no gradient."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None


class RolloutCorrection(NamedTuple):
    """Result of fastppo.rollout_correction: `weights` [B, T] (float32; float64 for float64 input; None without
    is_level; 0 at mask-0 and rejected-by-IS positions, detached), `mask` [B, T] (the input mask, in its
    dtype, with the rejected tokens set to 0), `stats` (name -> detached 0-d tensor, no host sync)."""

    weights: torch.Tensor | None
    mask: torch.Tensor
    stats: dict[str, torch.Tensor]
