"""logits_divergence: per-token forward KL, reverse KL or generalised JSD between a student's and a
teacher's softmax over the vocabulary (on-policy / logit distillation), as torch.ops.fastppo ops."""

import torch

from ._validation import check_float, check_mask, check_same_shape, check_temperature, check_temperature_rows
from .backend import backend_for
from .dispatch import ops
from .library import acc_dtype, define


def _fwd_fake(student, teacher, valid, inv_tau, beta, backend, tau=None):
    n = student.numel() // max(student.shape[-1], 1)
    acc = acc_dtype(student, teacher)
    return student.new_empty(student.shape[:-1], dtype=acc), student.new_empty((n, 5), dtype=acc)


@define("logits_divergence", _fwd_fake, kernels=True)
def _logits_divergence_op(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor | None, inv_tau: float,
                          beta: float, backend: str,
                          tau: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(div [...], stats [N, 5]); div is differentiable w.r.t. the student only, stats never. `tau`: per-row
    temperatures in place of inv_tau."""
    div, stats = ops("divergence", backend).divergence_fwd(student, teacher, inv_tau=inv_tau, beta=beta, valid=valid,
                                                           tau=tau)
    return div.view(student.shape[:-1]), stats


def _bwd_fake(student, teacher, stats, grad, valid, inv_tau, beta, backend, tau=None):
    return student.new_empty(student.shape)


@define("logits_divergence_backward", _bwd_fake, kernels=True)
def _logits_divergence_backward_op(student: torch.Tensor, teacher: torch.Tensor, stats: torch.Tensor,
                                   grad: torch.Tensor, valid: torch.Tensor | None, inv_tau: float, beta: float,
                                   backend: str, tau: torch.Tensor | None = None) -> torch.Tensor:
    """grad[r] * d div_r / d student (zero rows where valid is 0), in the student's dtype."""
    d = ops("divergence", backend).divergence_bwd(student, teacher, stats, grad.to(stats.dtype).reshape(-1),
                                                  inv_tau=inv_tau, beta=beta, valid=valid, tau=tau)
    return d.to(student.dtype).contiguous()


def _setup(ctx, inputs, output):
    student, teacher, valid, inv_tau, beta, backend, *rest = inputs
    _, stats = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(student, teacher, stats, valid, rest[0] if rest else None)
    ctx.args = (inv_tau, beta, backend)


def _backward(ctx, g, _g_stats):
    if g is None:
        return (None,) * 7
    student, teacher, stats, valid, tau = ctx.saved_tensors
    d = torch.ops.fastppo.logits_divergence_backward(student, teacher, stats, g, valid, *ctx.args, tau)
    return d, None, None, None, None, None, None


_logits_divergence_op.register_autograd(_backward, setup_context=_setup)


def check_beta(beta) -> float:
    """beta is a real number in [0, 1]."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a float in [0, 1], got {type(beta).__name__}")
    b = float(beta)
    if not 0.0 <= b <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0: KL(teacher || student), 1: KL(student || teacher)), got {beta}")
    return b


def _check_row_mask(mask, lead_shape):
    if mask is None:
        return None
    check_mask(mask)
    check_same_shape("mask", mask, "student_logits without the vocabulary dim", lead_shape)
    return mask


def logits_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float,
                      temperature: float | torch.Tensor = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token divergence between p_s = softmax(student_logits / tau) and p_t = softmax(teacher_logits / tau),
    `[..., V]` -> `[...]` float32 (float64 when an input is float64), TRL 1.16's convention for `beta`:

    - beta = 0: KL(p_t || p_s) (forward KL);  beta = 1: KL(p_s || p_t) (reverse KL, `full_kl`'s value);
    - 0 < beta < 1: beta KL(p_t || m) + (1 - beta) KL(p_s || m) with m = (1 - beta) p_s + beta p_t.

    Differentiable w.r.t. `student_logits` only (the teacher is detached). Rows where `mask` ([...], bool or
    0/1) is 0 are never read: 0 and a zero gradient, even with NaN there. Gradients (kernels/divergence.py):
    forward KL (p_s - p_t) / tau; reverse KL p_s (log p_s - log p_t - KL) / tau; JSD
    (1 - beta) p_s (log p_s - log m - KL(p_s || m)) / tau.

    `temperature`: a positive float, or a floating tensor of the rows' shape [...] (one tau per token, applied to
    both models; no gradient flows to it; read only where `mask` is 1, one load per row)."""
    check_float("student_logits", student_logits)
    check_float("teacher_logits", teacher_logits)
    check_same_shape("teacher_logits", teacher_logits, "student_logits", student_logits.shape)
    if student_logits.dim() < 1 or student_logits.shape[-1] == 0:
        raise ValueError(f"student_logits must have a non-empty vocabulary dim, got shape "
                         f"{tuple(student_logits.shape)}")
    b = check_beta(beta)
    mask = _check_row_mask(mask, student_logits.shape[:-1])
    rows = check_temperature_rows(temperature, student_logits.shape[:-1], student_logits.device, "logits_divergence",
                                  mask=mask)
    tau = 1.0 if rows is not None else check_temperature(temperature)
    backend = backend_for(student_logits, teacher_logits, mask)
    div, _ = torch.ops.fastppo.logits_divergence(student_logits, teacher_logits.detach(), mask, 1.0 / tau, b,
                                                 backend, rows)
    return div
