"""full_kl: exact KL(pi || ref) per token over the whole vocabulary (verl's unimplemented "full").

The ops full_kl (kl, lse_p, lse_q) and full_kl_backward with their fakes and autograd, then the public
function. Backends: fastppo.kernels.full_kl (Triton) or fastppo.full_kl_torch (PyTorch)."""

from __future__ import annotations

import torch

from ._validation import check_float, check_same_shape, check_temperature, check_temperature_rows
from .backend import backend_for
from .dispatch import ops
from .library import acc_dtype, define, refuse_double_backward


# ----------------------------------------------------------------------------- ops
def _full_kl_fake(logits, ref_logits, inv_tau, backend, tau=None):
    n = logits.numel() // max(logits.shape[-1], 1)
    acc = acc_dtype(logits)
    return logits.new_empty(logits.shape[:-1], dtype=acc), logits.new_empty((n, 2), dtype=acc), \
        logits.new_empty((n, 2), dtype=acc)


@define("full_kl", _full_kl_fake, kernels=True)
def full_kl_op(logits: torch.Tensor, ref_logits: torch.Tensor, inv_tau: float, backend: str,
               tau: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kl [...], lse_p [N, 2], lse_q [N, 2]: each row's (max, log-sum) of policy and reference); only kl is
    differentiable (w.r.t. logits). `tau`: per-row temperatures in place of inv_tau."""
    kl, lse_p, lse_q = ops("full_kl", backend).full_kl_fwd(logits, ref_logits, inv_tau=inv_tau, tau=tau)
    return kl.view(logits.shape[:-1]), lse_p, lse_q


def _full_kl_backward_fake(logits, ref_logits, kl, lse_p, lse_q, grad, inv_tau, backend, tau=None):
    return logits.new_empty(logits.shape)


@define("full_kl_backward", _full_kl_backward_fake, kernels=True)
def full_kl_backward_op(logits: torch.Tensor, ref_logits: torch.Tensor, kl: torch.Tensor, lse_p: torch.Tensor,
                     lse_q: torch.Tensor, grad: torch.Tensor, inv_tau: float, backend: str,
                     tau: torch.Tensor | None = None) -> torch.Tensor:
    return ops("full_kl", backend).full_kl_bwd(logits, ref_logits, kl.reshape(-1), lse_p, lse_q,
                                             grad.to(kl.dtype).reshape(-1), inv_tau=inv_tau, tau=tau).contiguous()


def _full_kl_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)   # outputs without a gradient get no zero-filled tensor
    logits, ref_logits, inv_tau, backend, *rest = inputs
    kl, lse_p, lse_q = output
    ctx.mark_non_differentiable(lse_p, lse_q)
    ctx.save_for_backward(logits, ref_logits, kl, lse_p, lse_q, rest[0] if rest else None)
    ctx.args = (inv_tau, backend)


def _full_kl_backward(ctx, g, _g_lse_p, _g_lse_q):
    if g is None:
        return None, None, None, None, None
    logits, ref_logits, kl, lse_p, lse_q, tau = ctx.saved_tensors
    d = torch.ops.fastppo.full_kl_backward(logits, ref_logits, kl, lse_p, lse_q, g, *ctx.args, tau)
    return d, None, None, None, None


full_kl_op.register_autograd(_full_kl_backward, setup_context=_full_kl_setup)


refuse_double_backward(full_kl_backward_op, "full_kl_backward")


# ----------------------------------------------------------------------------- public function
def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor, *, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Exact per-token KL(pi || pi_ref) = sum_i p_i (log p_i - log q_i) with p = softmax(logits / tau),
    q = softmax(ref_logits / tau), reading both [..., V] rows once. float32 [...]; differentiable
    w.r.t. `logits` only (dKL/dz_j = p_j (log p_j - log q_j - KL) / tau); the reference gets no
    gradient. `-inf` policy logits are exact; a reference `-inf` where p > 0 gives KL = inf.
    `temperature`: a positive float or a tensor of logits.shape[:-1] (one per token, both sides; no gradient)."""
    check_float("logits", logits)
    check_float("ref_logits", ref_logits)
    check_same_shape("ref_logits", ref_logits, "logits", logits.shape)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dim, got shape {tuple(logits.shape)}")
    rows = check_temperature_rows(temperature, logits.shape[:-1], logits.device, "full_kl")
    tau = 1.0 if rows is not None else check_temperature(temperature)
    kl, _, _ = torch.ops.fastppo.full_kl(logits, ref_logits.detach(), 1.0 / tau, backend_for(logits, ref_logits),
                                         rows)
    return kl
