"""token_logprobs: per-token log-probabilities (and entropy) from logits, fused."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from ._checks import check_float, check_labels, check_temperature
from .backend import backend_for
from .dispatch import ops


def ops_for(backend: str):
    """The launcher module of a backend: Triton kernels or their chunked PyTorch twins."""
    return ops("logprobs", backend)


@dataclass(frozen=True)
class LogprobOptions:
    inv_tau: float
    ignore_index: int
    with_entropy: bool
    backend: str


class TokenLogprobs(torch.autograd.Function):
    """Forward saves only lse and H (fp32 per row); backward recomputes p from the logits."""

    @staticmethod
    def forward(ctx, logits, labels, opts: LogprobOptions):
        ctx.set_materialize_grads(False)   # unused outputs get no zero-filled gradient launch
        ops = ops_for(opts.backend)
        logp, lse, ent = ops.logprobs_fwd(logits, labels, inv_tau=opts.inv_tau,
                                          ignore_index=opts.ignore_index, with_entropy=opts.with_entropy)
        ctx.save_for_backward(logits, labels, lse, ent if ent is not None else lse)
        ctx.opts = opts
        shape = labels.shape
        if ent is None:
            return logp.view(shape), None
        return logp.view(shape), ent.view(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_ent):
        logits, labels, lse, ent = ctx.saved_tensors
        opts = ctx.opts
        if g_logp is None and g_ent is None:
            return None, None, None
        if g_logp is None:
            g_logp = torch.zeros(labels.shape, dtype=lse.dtype, device=logits.device)
        has_ent = opts.with_entropy and g_ent is not None
        dlogits = ops_for(opts.backend).logprobs_bwd(
            logits, labels, lse, ent if has_ent else None, g_logp.to(lse.dtype).reshape(-1),
            g_ent.to(lse.dtype).reshape(-1) if has_ent else None,
            inv_tau=opts.inv_tau, ignore_index=opts.ignore_index)
        return dlogits, None, None


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
    opts = LogprobOptions(1.0 / tau, int(ignore_index), bool(return_entropy), backend_for(logits, labels))
    logp, ent = TokenLogprobs.apply(logits, labels, opts)
    return (logp, ent) if return_entropy else logp
