"""kl_penalty (fastppo.kl): the per-token KL estimators between the policy and the reference log-probs.

The op kl_penalty (kl and dkl/dlogp, saved for backward) with its fake and autograd, then the public
function. Backends: fastppo.kernels.kl (Triton) or fastppo.kl_torch (PyTorch). Math:
docs/design.md §4.2."""

from __future__ import annotations

import torch

from ._validation import check_choice, check_float, check_same_shape
from .backend import backend_for
from .dispatch import ops
from .kl_torch import kl_terms
from .library import acc_dtype, define
from .modes import KL_KINDS


# ----------------------------------------------------------------------------- op
def _kl_penalty_fake(logprobs, ref_logprobs, kind, backend):
    kl = logprobs.new_empty(logprobs.shape, dtype=acc_dtype(logprobs, ref_logprobs))
    return kl, torch.empty_like(kl)


@define("kl_penalty", _kl_penalty_fake, kernels=True)
def kl_penalty_op(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str,
               backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(kl, dkl/dlogp) per token (one Triton launch, or its PyTorch twin); the derivative is saved for backward."""
    return ops("kl_penalty", backend).kl_fwd(logprobs, ref_logprobs, kind)


def _kl_penalty_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)   # outputs without a gradient get no zero-filled tensor
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1], inputs[0], inputs[1])
    ctx.kind = inputs[2]


def _kl_penalty_backward(ctx, g_kl, _g_dkl):
    if g_kl is None:
        return None, None, None, None
    dkl, logp, ref = ctx.saved_tensors
    g_kl = g_kl.to(dkl.dtype)
    g = g_kl * dkl
    if torch.is_grad_enabled():   # create_graph: add dkl's own derivative (zero in value), so double backward is exact
        c = kl_terms(logp.to(dkl.dtype), ref.to(dkl.dtype), ctx.kind)[1]
        g = g + g_kl * (c - c.detach())
    return g, (-g if ctx.needs_input_grad[1] else None), None, None


kl_penalty_op.register_autograd(_kl_penalty_backward, setup_context=_kl_penalty_setup)


# ----------------------------------------------------------------------------- public function
def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL estimator between the policy and the reference, with d = logp - ref_logp:
    `k1` d; `abs` |d|; `k2`/`mse` d^2/2; `k3` exp(-d) - 1 + d; `low_var_kl` k3 with d clamped to
    [-20, 20] and the result to [-10, 10] (verl). float32 (float64 for float64 inputs),
    differentiable in both arguments, twice included (double backward is autograd's of the formula)."""
    check_float("logprobs", logprobs)
    check_float("ref_logprobs", ref_logprobs)
    check_same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs.shape)
    check_choice("kind", kind, KL_KINDS)
    return torch.ops.fastppo.kl_penalty(logprobs, ref_logprobs, kind, backend_for(logprobs, ref_logprobs))[0]
