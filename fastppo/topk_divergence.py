"""topk_divergence: the distillation divergence against a teacher known by its top-K log-probs, over K + 1 bins
(the K tokens and a tail bin), as torch.ops.fastppo ops."""

import torch

from ._validation import (
    check_float,
    check_mask,
    check_same_shape,
    check_temperature,
    check_temperature_rows,
    label_check_enabled,
)
from .backend import backend_for
from .dispatch import ops
from .divergence import check_beta
from .library import define


def _fwd_fake(student, ids, tlp, valid, inv_tau, beta, backend, tau=None):
    n = student.numel() // max(student.shape[-1], 1)
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    return student.new_empty(student.shape[:-1], dtype=acc), student.new_empty((n, 5), dtype=acc)


@define("topk_divergence", _fwd_fake, kernels=True)
def _topk_divergence_op(student: torch.Tensor, ids: torch.Tensor, tlp: torch.Tensor, valid: torch.Tensor | None,
                        inv_tau: float, beta: float, backend: str,
                        tau: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(div [...], stats [N, 5]); div is differentiable w.r.t. the student only. `tau`: per-row temperatures in
    place of inv_tau."""
    div, stats = ops("topk_divergence", backend).topk_divergence_fwd(student, ids, tlp, inv_tau=inv_tau, beta=beta,
                                                                     valid=valid, tau=tau)
    return div.view(student.shape[:-1]), stats


def _bwd_fake(student, ids, tlp, stats, grad, valid, inv_tau, beta, backend, tau=None):
    return student.new_empty(student.shape)


@define("topk_divergence_backward", _bwd_fake, kernels=True)
def _topk_divergence_backward_op(student: torch.Tensor, ids: torch.Tensor, tlp: torch.Tensor, stats: torch.Tensor,
                                 grad: torch.Tensor, valid: torch.Tensor | None, inv_tau: float, beta: float,
                                 backend: str, tau: torch.Tensor | None = None) -> torch.Tensor:
    d = ops("topk_divergence", backend).topk_divergence_bwd(student, ids, tlp, stats, grad.to(stats.dtype).reshape(-1),
                                                            inv_tau=inv_tau, beta=beta, valid=valid, tau=tau)
    return d.contiguous()


def _setup(ctx, inputs, output):
    student, ids, tlp, valid, inv_tau, beta, backend, *rest = inputs
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(student, ids, tlp, output[1], valid, rest[0] if rest else None)
    ctx.args = (inv_tau, beta, backend)


def _backward(ctx, g, _g_stats):
    if g is None:
        return (None,) * 8
    student, ids, tlp, stats, valid, tau = ctx.saved_tensors
    d = torch.ops.fastppo.topk_divergence_backward(student, ids, tlp, stats, g, valid, *ctx.args, tau)
    return (d, *([None] * 7))


_topk_divergence_op.register_autograd(_backward, setup_context=_setup)


def check_topk_inputs(teacher_ids, teacher_logprobs, lead, vocab, mask, lead_name):
    """The teacher's top-K arguments (and the mask) of a student whose per-token shape is `lead` (named
    `lead_name` in errors) over a vocabulary of `vocab` tokens."""
    check_float("teacher_logprobs", teacher_logprobs)
    if mask is not None:
        check_mask(mask)
        check_same_shape("mask", mask, lead_name, lead)
    _check_ids(teacher_ids, lead, vocab, mask, lead_name)
    check_same_shape("teacher_logprobs", teacher_logprobs, "teacher_ids", teacher_ids.shape)


def _check_ids(teacher_ids, lead, vocab, mask, lead_name):
    if not isinstance(teacher_ids, torch.Tensor):
        raise TypeError(f"teacher_ids must be a torch.Tensor, got {type(teacher_ids).__name__}")
    if teacher_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"teacher_ids must be an int32/int64 tensor, got {teacher_ids.dtype}")
    if tuple(teacher_ids.shape[:-1]) != tuple(lead) or teacher_ids.dim() < 1 or teacher_ids.shape[-1] == 0:
        raise ValueError(f"teacher_ids shape {tuple(teacher_ids.shape)} must be {lead_name} {tuple(lead)} plus a "
                         f"non-empty K dim")
    if not label_check_enabled(teacher_ids.device):
        return
    live = teacher_ids if mask is None else teacher_ids[mask != 0]
    if bool(((live < 0) | (live >= vocab)).any()):
        raise ValueError(f"teacher_ids must be in [0, {vocab}) in the rows that count")
    ordered = live.sort(-1).values
    if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
        raise ValueError("teacher_ids must be distinct within a row (each id is one bin)")


def topk_divergence(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, *,
                    beta: float, temperature: float | torch.Tensor = 1.0,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token divergence [...] (float32; float64 for float64 logits) between the student
    p = softmax(student_logits / tau) ([..., V]) and a teacher given by its top-K tokens `teacher_ids` [..., K]
    and their log-probs `teacher_logprobs` [..., K] (used as given: the teacher's own temperature applies), over
    K + 1 bins: the K tokens and one tail bin, p_t,tail = max(1 - sum_k exp(teacher_logprobs_k), 0) and
    q_tail = the student's mass on every other token (summed over those tokens, so a small tail keeps its digits).
    `beta` as in `logits_divergence` (0: KL(teacher || student), 1: KL(student || teacher), between: TRL's
    generalised JSD). Gradient to `student_logits` only; rows where `mask` is 0 are never read (0, zero gradient).
    Ids must be distinct in [0, V) (checked where free, on CPU). Formula and gradient: kernels/topk_divergence.py.
    `temperature` (the student's tau): a positive float, or a floating tensor of the rows' shape [...] (one per
    token; no gradient; read only where `mask` is 1, one load per row)."""
    check_float("student_logits", student_logits)
    if student_logits.dim() < 1 or student_logits.shape[-1] == 0:
        raise ValueError(f"student_logits must have a non-empty vocabulary dim, got shape "
                         f"{tuple(student_logits.shape)}")
    lead = student_logits.shape[:-1]
    check_topk_inputs(teacher_ids, teacher_logprobs, lead, student_logits.shape[-1], mask,
                      "student_logits without the vocabulary dim")
    b = check_beta(beta)
    rows = check_temperature_rows(temperature, lead, student_logits.device, "topk_divergence", mask=mask)
    tau = 1.0 if rows is not None else check_temperature(temperature)
    backend = backend_for(student_logits, teacher_ids, teacher_logprobs, mask)
    div, _ = torch.ops.fastppo.topk_divergence(student_logits, teacher_ids, teacher_logprobs.detach(), mask,
                                               1.0 / tau, b, backend, rows)
    return div
