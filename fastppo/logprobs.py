"""token_logprobs: per-token log-probabilities (and entropy) from logits, fused."""

from __future__ import annotations

import torch

from . import library  # noqa: F401  (registers torch.ops.fastppo)
from ._checks import check_float, check_labels, check_number, check_temperature
from .backend import backend_for
from .dispatch import ops


def check_logit_transform(logit_scale, final_logit_softcapping):
    """(scale, cap) of z' = softcap(scale * z) / tau, validated once: scale a finite non-zero number,
    cap None (no cap) or a positive finite number."""
    scale = check_number("logit_scale", logit_scale)
    if scale == 0:
        raise ValueError(f"logit_scale must be a finite non-zero number, got {logit_scale!r}")
    return scale, check_number("final_logit_softcapping", final_logit_softcapping, low=0.0, low_open=True,
                               allow_none=True)


def ops_for(backend: str):
    """The launcher module of a backend: Triton kernels or their chunked PyTorch twins."""
    return ops("logprobs", backend)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   ignore_index: int = -100, return_entropy: bool = False, final_logit_softcapping=None,
                   logit_scale: float = 1.0):
    """Log-probability of each label under softmax(z'), and optionally the entropy of that
    distribution, in one pass over the vocabulary, with

        z' = softcap(logit_scale * z) / temperature,   softcap(x) = c * tanh(x / c)  (c = final_logit_softcapping;
        no cap when None). This is the order of TRL 1.16 (`trl/kernels/chunked_logprob.py::_transform`:
        scale, then Gemma-style softcap, then temperature) and of the models (Cohere `logit_scale`,
        Granite `1 / logits_scaling`, Gemma 2/3 `final_logit_softcapping`; temperature at sampling time).
        logp_t = z'_y - logsumexp(z'),   H_t = logsumexp(z') - sum_i p_i z'_i.

    logits: [..., V] fp16/bf16/fp32/fp64 (any strides); labels: [...] integer (any strides),
    `logits[..., t, :]` predicts `labels[..., t]` (shift before calling). Returns float32 [...] log-probs
    (float64 for float64 logits), or (log-probs, entropy) with `return_entropy=True`. `ignore_index`
    positions give 0 and no gradient (entropy 0 there too), and their logits row is never read (NaN there
    cannot leak). Differentiable w.r.t. logits:
    dlogp/dz = (onehot(y) - p) dz'/dz, dH/dz = -p (log p + H) dz'/dz, dz'/dz = scale (1 - tanh^2(scale z / c)) / tau.
    """
    check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dim, got shape {tuple(logits.shape)}")
    check_labels(labels, logits.shape[:-1], logits.shape[-1], ignore_index)
    tau = check_temperature(temperature)
    scale, cap = check_logit_transform(logit_scale, final_logit_softcapping)
    logp, ent, _ = torch.ops.fastppo.token_logprobs(logits, labels, 1.0 / tau, int(ignore_index), bool(return_entropy),
                                                    scale, cap, backend_for(logits, labels))
    return (logp, ent) if return_entropy else logp
