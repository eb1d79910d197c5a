"""fastppo: fused Triton kernels for PPO/GRPO training of language models."""

from .advantages import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    group_advantages,
    kl_shaped_rewards,
    masked_whiten,
)
from .backend import backend_for, set_backend, use_backend
from .divergence import logits_divergence
from .full_kl import full_kl
from .fused import fused_ppo_loss
from .fused_linear import fused_linear_ppo_loss
from .kept import KeptSet
from .kl import kl_penalty
from .linear import linear_logprobs
from .linear_divergence import linear_divergence
from .linear_divergence_loss import linear_divergence_loss
from .linear_topk_divergence import linear_topk_divergence
from .logprobs import token_logprobs
from .losses import ppo_policy_loss, rollout_is_weights, value_loss
from .mismatch import mismatch_stats
from .options import VocabParallel
from .outputs import LogprobOutputs, PPOLossOutput, RolloutCorrection
from .rollout_correction import rollout_correction
from .topk_divergence import topk_divergence

__version__ = "0.1.0"

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KeptSet",
    "gae",
    "group_advantages",
    "kl_shaped_rewards",
    "masked_whiten",
    "mismatch_stats",
    "LogprobOutputs",
    "PPOLossOutput",
    "RolloutCorrection",
    "VocabParallel",
    "backend_for",
    "full_kl",
    "fused_linear_ppo_loss",
    "fused_ppo_loss",
    "kl_penalty",
    "linear_divergence",
    "linear_divergence_loss",
    "linear_topk_divergence",
    "linear_logprobs",
    "logits_divergence",
    "ppo_policy_loss",
    "rollout_correction",
    "rollout_is_weights",
    "set_backend",
    "token_logprobs",
    "topk_divergence",
    "use_backend",
    "value_loss",
]
