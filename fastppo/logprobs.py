"""token_logprobs: per-token log-probabilities (and entropy) from logits, fused."""

from __future__ import annotations

import torch

from . import library  # noqa: F401  (registers torch.ops.fastppo)
from ._checks import check_float, check_labels, check_temperature
from .backend import backend_for


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   ignore_index: int = -100, return_entropy: bool = False):
    """Log-probability of each label under softmax(logits / temperature), and optionally the
    entropy of that distribution, in one pass over the vocabulary.

    logits: [..., V] fp32/bf16/fp16 (any strides); labels: [...] integer, `logits[..., t, :]`
    predicts `labels[..., t]` (shift before calling). Returns float32 [...] log-probs, or
    (log-probs, entropy) with `return_entropy=True`. `ignore_index` positions give 0 and no
    gradient (entropy 0 there too). Differentiable w.r.t. logits.

        logp_t = z'_y - logsumexp(z'),   H_t = logsumexp(z') - sum_i p_i z'_i,   z' = z / tau
    """
    check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dim, got shape {tuple(logits.shape)}")
    check_labels(labels, logits.shape[:-1], logits.shape[-1], ignore_index)
    tau = check_temperature(temperature)
    logp, ent, _ = torch.ops.fastppo.token_logprobs(logits, labels, 1.0 / tau, int(ignore_index), bool(return_entropy),
                                                    backend_for(logits, labels))
    return (logp, ent) if return_entropy else logp
