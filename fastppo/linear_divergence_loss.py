"""linear_divergence_loss: the scalar distillation loss sum_r weights_r div_r of linear_divergence, with the
student's gradient formed in the forward pass chunk by chunk (the upstream of a scalar is one number, so the
per-token coefficients weights_r are known in forward): per chunk of rows both models' logits (2 n (Hs + Ht) V
FLOPs), the divergence and its statistics, dz = divergence_bwd with g = weights, then d h_s = dz W_s and
d W_s += dz^T h_s (4 n Hs V). 2 N Ht V + 6 N Hs V in all, against linear_divergence's 4 N Ht V + 8 N Hs V;
backward only scales the held gradients and rounds them once to the student's dtypes (d hidden [N, Hs] and
d weight [V, Hs] held in fp32 (fp64 for fp64) from forward to backward: 4 (N + V) Hs bytes)."""

from __future__ import annotations

import torch

from .backend import backend_for
from .dispatch import ops
from .library import Once, acc_dtype, decode, define, empty, encode, or_empty
from .linear_divergence import (
    accumulate_grads,
    by_row,
    check_linear_divergence,
    chunk,
    chunk_logits,
    chunk_rows,
    rows_of,
    select_rows,
)
from .options import LinearDivergenceOptions


def fused_rows(hs, ws, bs, ht, wt, bt, valid, weights, opts: LinearDivergenceOptions, needs, backend, tau=None):
    """(loss, div [N], d h_s, d W_s, d b_s) of sum_r weights_r div_r, the gradients in acc (None where not
    needed). `tau`: per-token temperatures [N] in place of opts.inv_tau."""
    N, Hs = hs.shape
    V = ws.shape[0]
    acc = acc_dtype(hs, ws, ht, wt)
    dev = hs.device
    sel, hs_r, ht_r, v_r = select_rows(valid, hs, ht)
    tau_r = rows_of(tau, sel)
    w_r = weights.to(acc) if sel is None else weights.to(acc).index_select(0, sel)
    if v_r is not None:   # masked rows' weights are never used (a NaN there cannot leak)
        w_r = torch.where(v_r, w_r, torch.zeros((), dtype=acc, device=dev))
    n = hs_r.shape[0]
    k = ops("divergence", backend)
    div = torch.zeros(n, dtype=acc, device=dev)
    dh = torch.zeros(n, Hs, dtype=acc, device=dev) if needs[0] else None
    dw = torch.zeros(V, Hs, dtype=acc, device=dev) if needs[1] else None
    db = torch.zeros(V, dtype=acc, device=dev) if (bs is not None and needs[2]) else None
    step = chunk_rows(n, V, acc, opts.chunk_bytes)
    for a in range(0, n, step):
        b = min(n, a + step)
        zs, th, zt = chunk_logits(hs_r[a:b], ws, bs, ht_r[a:b], wt, bt, opts, acc)
        vc, tc = chunk(v_r, a, b), chunk(tau_r, a, b)
        div[a:b], stats = k.divergence_fwd(zs, zt, inv_tau=opts.inv_tau, beta=opts.beta, valid=vc, tau=tc)
        if any(x is not None for x in (dh, dw, db)):
            d = k.divergence_bwd(zs, zt, stats, w_r[a:b], inv_tau=opts.inv_tau, beta=opts.beta, valid=vc, tau=tc)
            accumulate_grads(d, th, opts, ws, hs_r[a:b], None if dh is None else dh[a:b], dw, db)
    loss = (div * w_r).sum()
    return loss, by_row(sel, div, N), None if dh is None else by_row(sel, dh, N), dw, db


def _fake(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, valid, weights,
          options, need_hidden, need_weight, need_bias, backend, tau=None):
    acc = acc_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight)
    div = student_hidden.new_empty((student_hidden.shape[0],), dtype=acc)
    return (div.new_empty(()), div, div.new_empty(student_hidden.shape) if need_hidden else empty(div),
            div.new_empty(student_weight.shape) if need_weight else empty(div),
            div.new_empty(student_bias.shape) if (student_bias is not None and need_bias) else empty(div))


@define("linear_divergence_loss", _fake, kernels=True)
def linear_divergence_loss_op(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                              student_bias: torch.Tensor | None, teacher_hidden: torch.Tensor,
                              teacher_weight: torch.Tensor, teacher_bias: torch.Tensor | None,
                              valid: torch.Tensor | None, weights: torch.Tensor, options: str, need_hidden: bool,
                              need_weight: bool, need_bias: bool, backend: str,
                              tau: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                        torch.Tensor, torch.Tensor]:
    """(loss, div [N], d hidden, d weight, d bias) with the gradients of the loss for a unit upstream in fp32
    (fp64 for fp64; empty where not needed). Only loss is differentiable; its backward scales the held gradients
    and rounds them to the student's dtypes. `tau`: per-token temperatures [N] in place of the options' one."""
    loss, div, dh, dw, db = fused_rows(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                       teacher_bias, valid, weights, decode(LinearDivergenceOptions, options),
                                       (need_hidden, need_weight, need_bias), backend, tau)
    return loss, div, or_empty(dh, div), or_empty(dw, div), or_empty(db, div)


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    _, div, dh, dw, db = output
    ctx.mark_non_differentiable(div, dh, dw, db)
    ctx.save_for_backward(dh, dw, db, *inputs[:3])
    ctx.present = (inputs[9], inputs[10], inputs[2] is not None and inputs[11])


def _backward(ctx, g_loss, *_):
    if g_loss is None:
        return (None,) * 14
    dh, dw, db, *linked = ctx.saved_tensors
    grads = []
    for t, present, x in zip((dh, dw, db), ctx.present, linked):
        if not present:
            grads.append(None)
            continue
        t = (t * g_loss.reshape(()).to(t.dtype)).to(x.dtype)
        if torch.is_grad_enabled():   # formed in the forward: a second derivative raises
            t = Once.apply("linear_divergence_loss", t, g_loss, *(x for x in linked if x is not None))
        grads.append(t)
    return (*grads, *([None] * 11))


linear_divergence_loss_op.register_autograd(_backward, setup_context=_setup)


def _check_weights(weights, lead):
    if not isinstance(weights, torch.Tensor) or not weights.dtype.is_floating_point:
        raise TypeError(f"weights must be a float tensor shaped like the tokens {tuple(lead)}, got "
                        f"{getattr(weights, 'dtype', type(weights).__name__)}")
    if tuple(weights.shape) != tuple(lead):
        raise ValueError(f"weights must have the tokens' shape {tuple(lead)}, got {tuple(weights.shape)}")


def linear_divergence_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                           teacher_weight: torch.Tensor, *, beta: float, weights: torch.Tensor | None = None,
                           temperature: float | torch.Tensor = 1.0, student_bias=None, teacher_bias=None,
                           mask: torch.Tensor | None = None, chunk_bytes: int | None = None,
                           student_logit_scale: float = 1.0, student_final_logit_softcapping=None,
                           teacher_logit_scale: float = 1.0, teacher_final_logit_softcapping=None):
    """(loss, per-token divergence) with loss = sum_r weights_r div_r over the rows where `mask` is 1 and div =
    linear_divergence(...) (same arguments, same conventions). `weights` [...] (float, the tokens' shape); None:
    the token mean over the valid rows (mask / max(count, 1), on device). Differentiable w.r.t. the student's
    hidden, weight and bias through `loss` only (formed in the forward pass: 2 N Ht V + 6 N Hs V FLOPs; see the
    module docstring); the per-token divergence comes without gradient, for logging."""
    tau = check_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                                  teacher_bias, mask, temperature, "linear_divergence_loss")
    lead = student_hidden.shape[:-1]
    if weights is not None:
        _check_weights(weights, lead)
    opts = LinearDivergenceOptions.build(
        beta=beta, temperature=1.0 if tau is not None else temperature, student_logit_scale=student_logit_scale,
        student_final_logit_softcapping=student_final_logit_softcapping, teacher_logit_scale=teacher_logit_scale,
        teacher_final_logit_softcapping=teacher_final_logit_softcapping, chunk_bytes=chunk_bytes)
    valid = None if mask is None else (mask.reshape(-1) != 0)
    acc = acc_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight)
    if weights is None:
        ones = torch.ones(lead.numel(), dtype=acc, device=student_hidden.device)
        w = ones if valid is None else valid.to(acc)
        weights = w / w.sum().clamp_min(1)
    backend = backend_for(student_hidden, teacher_hidden, mask)
    needs = [torch.is_grad_enabled() and x is not None and x.requires_grad
             for x in (student_hidden, student_weight, student_bias)]
    t_bias = None if teacher_bias is None else teacher_bias.detach()
    loss, div, _, _, _ = torch.ops.fastppo.linear_divergence_loss(
        student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, student_bias,
        teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]), teacher_weight.detach(), t_bias, valid,
        weights.reshape(-1), encode(opts), *needs, backend, tau)
    return loss, div.view(lead)
