"""full_kl: exact KL(pi || ref) per token over the whole vocabulary (verl's unimplemented "full")."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._checks import check_float, check_same_shape, check_temperature
from .backend import backend_for
from .dispatch import ops


def _full_kl_ops(backend):
    return ops("full_kl", backend)


class FullKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, inv_tau, backend):
        ctx.set_materialize_grads(False)   # unused outputs get no zero-filled gradient launch
        kl, lse_p, lse_q = _full_kl_ops(backend).full_kl_fwd(logits, ref_logits, inv_tau=inv_tau)
        ctx.save_for_backward(logits, ref_logits, kl, lse_p, lse_q)
        ctx.inv_tau, ctx.backend = inv_tau, backend
        return kl.view(logits.shape[:-1])

    @staticmethod
    @once_differentiable          # double backward: a clear RuntimeError, never a silently wrong number
    def backward(ctx, g):
        if g is None:
            return None, None, None, None
        logits, ref_logits, kl, lse_p, lse_q = ctx.saved_tensors
        g = g.to(kl.dtype).reshape(-1)
        d = _full_kl_ops(ctx.backend).full_kl_bwd(logits, ref_logits, kl, lse_p, lse_q, g, inv_tau=ctx.inv_tau)
        return d, None, None, None


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
    return FullKL.apply(logits, ref_logits.detach(), 1.0 / tau, backend_for(logits, ref_logits))
