"""linear_topk_divergence: topk_divergence's K + 1-bin distillation divergence with the student given by its final
hidden states and LM head, never holding the student's [N, V] logits (a teacher known by its top-K tokens and their
log-probs, as NeMo-RL and verl's top-k distillation store it; the tail bin as in verl RFC #7856).

Per chunk of rows (`linear_divergence.chunk_rows`: the fp32 [rows, V] logits and their gradient fit in
`chunk_bytes`):
  forward   z_s = T_s(h_s W_s^T + b_s) (fp32 products, fastppo.head_gemm; T = softcap(scale .)),
            then topk_divergence_fwd (kernels/topk_divergence.py on the Triton backend, topk_divergence_torch on the
            PyTorch one) on the chunk: the divergence and the [rows, 5] row statistics kept for backward.
                                                                                        2 N Hs V FLOPs
  backward  (the upstream per-token gradient g known) the chunk's logits again, dz = topk_divergence_bwd(...)
            through the softcap / scale chain rule, d h_s = dz W_s, d W_s += dz^T h_s, d b_s += sum dz (fp32 sums in a
            fixed chunk order, no atomics).                                             2 N Hs V + 4 N Hs V FLOPs
8 N Hs V in all, exact for any upstream g; the teacher costs nothing but its [N, K] ids and log-probs.
Rows where `mask` is 0 are skipped on CPU (gathered out, never read); elsewhere their hidden states are replaced by
0 (selected, never multiplied) and the launchers skip them (no host sync). They give 0 and a zero gradient."""

from __future__ import annotations

import torch

from . import head_gemm
from ._validation import check_temperature_rows
from .backend import backend_for
from .dispatch import ops
from .library import acc_dtype, decode, define, empty, encode, or_empty, refuse_double_backward
from .linear_divergence import (
    by_row,
    check_head,
    chunk,
    chunk_rows,
    rows_of,
    select_rows,
    student_gradient_rows,
)
from .options import LinearDivergenceOptions
from .topk_divergence import check_topk_inputs


def _chunk_logits(hs_c, ws, bs, opts: LinearDivergenceOptions, acc):
    return head_gemm.head_logits(hs_c, ws, bs, opts.student(), acc)


def forward_rows(hs, ws, bs, ids, tlp, valid, opts: LinearDivergenceOptions, backend, tau=None):
    """(div [N], stats [N, 5]) by original row, zeros at masked rows. `tau`: per-token temperatures [N] of the
    student in place of opts.inv_tau."""
    N, V = hs.shape[0], ws.shape[0]
    acc = acc_dtype(hs, ws)
    sel, hs_r, ids_r, tlp_r, v_r = select_rows(valid, hs, ids, tlp)
    tau_r = rows_of(tau, sel)
    n = hs_r.shape[0]
    k = ops("topk_divergence", backend)
    div = torch.zeros(n, dtype=acc, device=hs.device)
    stats = torch.zeros(n, 5, dtype=acc, device=hs.device)
    step = chunk_rows(n, V, acc, opts.chunk_bytes)
    for a in range(0, n, step):
        b = min(n, a + step)
        zs, _ = _chunk_logits(hs_r[a:b], ws, bs, opts, acc)
        div[a:b], stats[a:b] = k.topk_divergence_fwd(zs, ids_r[a:b], tlp_r[a:b], inv_tau=opts.inv_tau,
                                                     beta=opts.beta, valid=chunk(v_r, a, b), tau=chunk(tau_r, a, b))
    return by_row(sel, div, N), by_row(sel, stats, N)


def gradient_rows(hs, ws, bs, ids, tlp, valid, stats, g, opts: LinearDivergenceOptions, needs, backend, tau=None):
    """(d h_s, d W_s, d b_s) of sum_r g_r div_r (None where not needed), in the student's dtypes."""
    k = ops("topk_divergence", backend)

    def tile_grad(hs_c, extra_c, st, g_c, vc, tc):
        zs, th = _chunk_logits(hs_c, ws, bs, opts, st.dtype)
        ids_c, tlp_c = extra_c
        return k.topk_divergence_bwd(zs, ids_c, tlp_c, st, g_c, inv_tau=opts.inv_tau, beta=opts.beta, valid=vc,
                                     tau=tc), th

    return student_gradient_rows(hs, ws, bs, valid, (ids, tlp), stats, g, opts, needs, tile_grad, tau)


# ----------------------------------------------------------------------------- ops
def _fwd_fake(student_hidden, student_weight, student_bias, teacher_ids, teacher_logprobs, valid, options, backend,
              tau=None):
    acc = acc_dtype(student_hidden, student_weight)
    n = student_hidden.shape[0]
    return student_hidden.new_empty((n,), dtype=acc), student_hidden.new_empty((n, 5), dtype=acc)


@define("linear_topk_divergence", _fwd_fake, kernels=True)
def linear_topk_divergence_op(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                              student_bias: torch.Tensor | None, teacher_ids: torch.Tensor,
                              teacher_logprobs: torch.Tensor, valid: torch.Tensor | None, options: str,
                              backend: str, tau: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(div [N], stats [N, 5]) from [N, Hs] hidden states; div is differentiable w.r.t. the student's hidden,
    weight and bias. `tau`: per-token temperatures [N] in place of the options' one."""
    return forward_rows(student_hidden, student_weight, student_bias, teacher_ids, teacher_logprobs, valid,
                        decode(LinearDivergenceOptions, options), backend, tau)


def _bwd_fake(student_hidden, student_weight, student_bias, teacher_ids, teacher_logprobs, valid, stats, grad,
              options, need_hidden, need_weight, need_bias, backend, tau=None):
    return (student_hidden.new_empty(student_hidden.shape) if need_hidden else empty(student_hidden),
            student_weight.new_empty(student_weight.shape) if need_weight else empty(student_weight),
            student_bias.new_empty(student_bias.shape) if (student_bias is not None and need_bias)
            else empty(student_weight))


@define("linear_topk_divergence_backward", _bwd_fake, kernels=True)
def linear_topk_divergence_backward_op(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                                       student_bias: torch.Tensor | None, teacher_ids: torch.Tensor,
                                       teacher_logprobs: torch.Tensor, valid: torch.Tensor | None, stats: torch.Tensor,
                                       grad: torch.Tensor, options: str, need_hidden: bool, need_weight: bool,
                                       need_bias: bool, backend: str,
                                       tau: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """(d hidden, d weight, d bias) of the student for the per-token upstream `grad` (empty where not needed)."""
    dh, dw, db = gradient_rows(student_hidden, student_weight, student_bias, teacher_ids, teacher_logprobs, valid,
                               stats, grad, decode(LinearDivergenceOptions, options),
                               (need_hidden, need_weight, need_bias), backend, tau)
    return or_empty(dh, student_hidden), or_empty(dw, student_weight), or_empty(db, student_weight)


def _setup(ctx, inputs, output):
    *tensors, valid, options, backend = inputs[:8]
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*tensors, valid, output[1], inputs[8] if len(inputs) > 8 else None)
    ctx.options, ctx.backend = options, backend


def _backward(ctx, g, _g_stats):
    if g is None:
        return (None,) * 9
    hs, ws, bs, ids, tlp, valid, stats, tau = ctx.saved_tensors
    needs = ctx.needs_input_grad
    need_bias = bs is not None and needs[2]
    dh, dw, db = linear_topk_divergence_backward_op(hs, ws, bs, ids, tlp, valid, stats, g, ctx.options, needs[0],
                                                    needs[1], need_bias, ctx.backend, tau)
    return (dh if needs[0] else None), (dw if needs[1] else None), (db if need_bias else None), *(None,) * 6


linear_topk_divergence_op.register_autograd(_backward, setup_context=_setup)
refuse_double_backward(linear_topk_divergence_backward_op, "linear_topk_divergence_backward")


# ----------------------------------------------------------------------------- public function
def linear_topk_divergence(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_ids: torch.Tensor,
                           teacher_logprobs: torch.Tensor, *, beta: float, temperature: float | torch.Tensor = 1.0,
                           student_bias: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                           chunk_bytes: int | None = None, student_logit_scale: float = 1.0,
                           student_final_logit_softcapping: float | None = None) -> torch.Tensor:
    """topk_divergence(z_s, teacher_ids, teacher_logprobs, beta=beta, temperature=temperature, mask=mask) with
    z_s = softcap(student_logit_scale * (student_hidden @ student_weight.T + student_bias)), without the student's
    [N, V] logits: student_hidden [..., Hs], student_weight [V, Hs], teacher_ids [..., K] (distinct ids in [0, V),
    checked where free), teacher_logprobs [..., K] (used as given) -> per-token divergence [...] float32 (float64
    when an input is float64) over the K + 1 bins (the K tokens and a tail bin; see topk_divergence).

    Gradient to the student's hidden, weight and bias only. Rows where `mask` is 0 give 0 and a zero gradient, even
    with NaN there. `chunk_bytes` bounds the two fp32 [rows, V] buffers (None: 2 GiB). Costs: see the module
    docstring (8 N Hs V FLOPs for forward + backward). `temperature` (the student's tau): a positive float, or a
    floating tensor of the tokens' shape [...] (one per token, read only where `mask` is 1; no gradient)."""
    check_head("student", student_hidden, student_weight, student_bias)
    lead = student_hidden.shape[:-1]
    check_topk_inputs(teacher_ids, teacher_logprobs, lead, student_weight.shape[0], mask,
                      "student_hidden without the hidden dim")
    tau = check_temperature_rows(temperature, lead, student_hidden.device, "linear_topk_divergence", mask=mask)
    opts = LinearDivergenceOptions.build(
        beta=beta, temperature=1.0 if tau is not None else temperature, student_logit_scale=student_logit_scale,
        student_final_logit_softcapping=student_final_logit_softcapping, chunk_bytes=chunk_bytes)
    k = teacher_ids.shape[-1]
    valid = None if mask is None else (mask.reshape(-1) != 0)
    backend = backend_for(student_hidden, student_weight, teacher_ids, teacher_logprobs, mask)
    div, _ = torch.ops.fastppo.linear_topk_divergence(
        student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, student_bias,
        teacher_ids.reshape(-1, k), teacher_logprobs.detach().reshape(-1, k), valid, encode(opts), backend,
        None if tau is None else tau.reshape(-1))
    return div.view(lead)
