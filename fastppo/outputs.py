"""Result types of the loss functions."""

from __future__ import annotations

from dataclasses import dataclass, field

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
