"""full_kl: exact KL(pi || ref) per token over the whole vocabulary (verl's unimplemented "full")."""

from __future__ import annotations

import torch

from . import library  # noqa: F401  (registers torch.ops.fastppo)
from ._validation import check_float, check_same_shape, check_temperature
from .backend import backend_for


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Exact per-token KL(pi || pi_ref) = sum_i p_i (log p_i - log q_i) with p = softmax(logits / tau),
    q = softmax(ref_logits / tau), reading both [..., V] rows once. float32 [...]; differentiable
    w.r.t. `logits` only (dKL/dz_j = p_j (log p_j - log q_j - KL) / tau); the reference gets no
    gradient. `-inf` policy logits are exact; a reference `-inf` where p > 0 gives KL = inf."""
    check_float("logits", logits)
    check_float("ref_logits", ref_logits)
    check_same_shape("ref_logits", ref_logits, "logits", logits.shape)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dim, got shape {tuple(logits.shape)}")
    tau = check_temperature(temperature)
    kl, _, _ = torch.ops.fastppo.full_kl(logits, ref_logits.detach(), 1.0 / tau, backend_for(logits, ref_logits))
    return kl
