"""float64 references of the distillation divergences: the documented math, written plainly (full [N, V]
tensors), the oracle for tests. Not a backend."""

import torch


def _log_softmax64(z, temperature):
    return torch.log_softmax(z.double() / temperature, -1)


def _kl(lp_a, lp_b):
    """sum_i p_a,i (log p_a,i - log p_b,i), with 0 log 0 = 0."""
    p = lp_a.exp()
    return torch.where(p == 0, torch.zeros_like(p), p * (lp_a - lp_b)).sum(-1)


def divergence_from_logprobs(lp_s, lp_t, beta):
    """TRL 1.16's generalised JSD (trl/experimental/gkd/gkd_trainer.py `generalized_jsd_loss`):
    beta 0: KL(p_t || p_s); beta 1: KL(p_s || p_t); else beta KL(p_t || m) + (1 - beta) KL(p_s || m) with
    m = (1 - beta) p_s + beta p_t. Over the last dimension."""
    if beta == 0.0:
        return _kl(lp_t, lp_s)
    if beta == 1.0:
        return _kl(lp_s, lp_t)
    beta_t = torch.tensor(beta, dtype=lp_s.dtype)
    lm = torch.logaddexp(lp_s + torch.log1p(-beta_t), lp_t + torch.log(beta_t))
    return beta * _kl(lp_t, lm) + (1.0 - beta) * _kl(lp_s, lm)


def logits_divergence(student_logits, teacher_logits, *, beta, temperature=1.0, mask=None):
    """Per-token divergence [...] in float64 of softmax(student / tau) and softmax(teacher / tau);
    0 where mask is 0 (those rows are zeroed before use, so NaN there never reaches the result)."""
    if mask is not None:
        keep = (mask != 0).unsqueeze(-1)
        student_logits = torch.where(keep, student_logits.double(), 0.0)
        teacher_logits = torch.where(keep, teacher_logits.double(), 0.0)
    div = divergence_from_logprobs(_log_softmax64(student_logits, temperature),
                                   _log_softmax64(teacher_logits, temperature).detach(), beta)
    if mask is not None:
        div = torch.where(mask != 0, div, 0.0)
    return div


def topk_divergence(student_logits, teacher_ids, teacher_logprobs, *, beta, temperature=1.0, mask=None):
    """The divergence over K + 1 bins, float64: the teacher's K tokens (log p_t = teacher_logprobs, log q =
    the student's log-softmax there) and a tail bin (p_t,tail = 1 - sum_k p_t,k clamped at 0; q_tail = the
    logsumexp of the student's log-probs over the other columns). 0 where mask is 0."""
    z, ids, lp_t = student_logits.double(), teacher_ids.long(), teacher_logprobs.double().detach()
    if mask is not None:   # masked rows: replaced before use (a NaN there must not reach values or gradients)
        keep = (mask != 0).unsqueeze(-1)
        z, ids, lp_t = torch.where(keep, z, 0.0), torch.where(keep, ids, 0), torch.where(keep, lp_t, float("-inf"))
    lp = _log_softmax64(z, temperature)
    lq = lp.gather(-1, ids)
    lq_tail = torch.logsumexp(lp.scatter(-1, ids, float("-inf")), -1, keepdim=True)
    lp_t_tail = torch.log(torch.clamp(1.0 - lp_t.exp().sum(-1, keepdim=True), min=0.0))
    div = divergence_from_logprobs(torch.cat((lq, lq_tail), -1), torch.cat((lp_t, lp_t_tail), -1), beta)
    if mask is not None:
        div = torch.where(mask != 0, div, 0.0)
    return div


def head_logits(hidden, weight, bias=None, *, logit_scale=1.0, softcap=None):
    """float64 z = softcap(logit_scale * (hidden @ weight.T + bias)), softcap(x) = c tanh(x / c)."""
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    z = logit_scale * z
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, *, beta, temperature=1.0,
                      student_bias=None, teacher_bias=None, mask=None, student_logit_scale=1.0,
                      student_final_logit_softcapping=None, teacher_logit_scale=1.0,
                      teacher_final_logit_softcapping=None):
    """(divergence, the student's entropy) in float64 from full [N, V] logits of both heads; 0 where mask is 0
    (those rows' hidden states are zeroed before use)."""
    if mask is not None:
        keep = (mask != 0).unsqueeze(-1)
        student_hidden = torch.where(keep, student_hidden.double(), 0.0)
        teacher_hidden = torch.where(keep, teacher_hidden.double(), 0.0)
    zs = head_logits(student_hidden, student_weight, student_bias, logit_scale=student_logit_scale,
                     softcap=student_final_logit_softcapping)
    zt = head_logits(teacher_hidden, teacher_weight, teacher_bias, logit_scale=teacher_logit_scale,
                     softcap=teacher_final_logit_softcapping).detach()
    div = logits_divergence(zs, zt, beta=beta, temperature=temperature, mask=mask)
    lp = _log_softmax64(zs, temperature).detach()
    ent = -torch.where(lp.exp() == 0, 0.0, lp.exp() * lp).sum(-1)
    if mask is not None:
        ent = torch.where(mask != 0, ent, 0.0)
    return div, ent


def linear_topk_divergence(student_hidden, student_weight, teacher_ids, teacher_logprobs, *, beta, temperature=1.0,
                           student_bias=None, mask=None, student_logit_scale=1.0,
                           student_final_logit_softcapping=None):
    """topk_divergence in float64 of the student's full [N, V] logits from its head; masked rows' hidden states
    are zeroed before use."""
    if mask is not None:
        student_hidden = torch.where((mask != 0).unsqueeze(-1), student_hidden.double(), 0.0)
    zs = head_logits(student_hidden, student_weight, student_bias, logit_scale=student_logit_scale,
                     softcap=student_final_logit_softcapping)
    return topk_divergence(zs, teacher_ids, teacher_logprobs, beta=beta, temperature=temperature, mask=mask)
