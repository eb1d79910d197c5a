"""linear_divergence: logits_divergence's per-token forward KL / reverse KL / generalised JSD between a student
and a teacher computed from both models' final hidden states and LM heads, never holding either model's [N, V]
logits (on-policy distillation with TRL's DistillationTrainer semantics).

Per chunk of rows (`chunk_rows`: the two fp32 [rows, V] logit buffers fit in `chunk_bytes`):
  forward   z_s = T_s(h_s W_s^T + b_s), z_t = T_t(h_t W_t^T + b_t) (fp32 products never rounded to the operands'
            dtype, fastppo.head_gemm; T = softcap(scale * .)), then divergence_fwd of the divergence launchers
            (kernels/divergence.py on the Triton backend, divergence_torch on the PyTorch one) on the chunk:
            the divergence, and the [rows, 5] row statistics kept for backward.     2 N (Hs + Ht) V FLOPs
  backward  (the upstream per-token gradient g known) both chunks' logits again, dz = divergence_bwd(...) with
            the student's softcap / scale chain rule, d h_s = dz @ W_s, d W_s += dz^T h_s, d b_s += sum dz
            (fp32 sums in a fixed chunk order, no atomics).                2 N (Hs + Ht) V + 4 N Hs V FLOPs
In all 4 N Ht V + 8 N Hs V: backward recomputes both models' logits rather than holding gradients formed in the
forward pass, which is exact for any upstream g (a per-token g cannot be folded into d W_s after the fact); the
forward-formed variant (2 N Ht V + 6 N Hs V) needs the upstream reduction inside the op: linear_divergence_loss.
The products are taken whole per chunk (not over ROW_BLOCK blocks as in linear_torch, so no padded rows cost FLOPs):
the bitwise batch invariance of the log-prob ops (docs/design.md §4.6) is not promised here.

Rows where `mask` is 0: on CPU they are skipped (gathered out, never read); on other devices every row is
projected with those rows' hidden states replaced by 0 (selected, never multiplied: a NaN there cannot leak)
and the divergence launchers skip them (no host sync). They give 0 and a zero gradient."""

from __future__ import annotations

import torch

from . import head_gemm
from ._validation import check_float, check_mask, check_same_shape, check_temperature_rows
from .backend import backend_for
from .dispatch import ops
from .library import acc_dtype, decode, define, empty, encode, or_empty, refuse_double_backward
from .options import LinearDivergenceOptions

DEFAULT_CHUNK_BYTES = 1 << 31   # 2 GiB of fp32 logits (both models) per chunk: few chunks, few weight reads


def chunk_rows(n_rows: int, vocab: int, acc: torch.dtype, chunk_bytes: int | None) -> int:
    """Rows per chunk: the student's and the teacher's [rows, V] logits in acc fit in chunk_bytes (at least
    one row). The row math's temporaries are a few more buffers of that size."""
    size = torch.empty((), dtype=acc).element_size()
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return max(1, min(max(n_rows, 1), budget // max(2 * vocab * size, 1)))


def gathers_rows(device: torch.device) -> bool:
    """Whether select_rows gathers the valid rows out (CPU, where the gather's host sync is free) rather than
    keeping every row (elsewhere)."""
    return device.type == "cpu"


def select_rows(valid, hs, *others):
    """(selected row ids or None, hs's rows, each of `others`' rows, validity of those rows or None): on CPU the
    valid rows gathered out; elsewhere every row, with masked rows' values replaced by 0 (selected, never
    multiplied: a NaN there cannot leak) and their validity returned for the launchers."""
    if valid is None:
        return None, hs, *others, None
    if gathers_rows(hs.device):
        sel = valid.nonzero().squeeze(1)
        return sel, hs.index_select(0, sel), *(t.index_select(0, sel) for t in others), None
    keep = valid[:, None]
    zero = lambda h: torch.where(keep, h, torch.zeros((), dtype=h.dtype, device=h.device))  # noqa: E731
    return None, zero(hs), *(zero(t) for t in others), valid


def by_row(sel, rows_value, n_rows):
    """Per-selected-row values by original row (zeros at the rows not selected)."""
    if sel is None:
        return rows_value
    full = rows_value.new_zeros((n_rows, *rows_value.shape[1:]))
    return full.index_copy_(0, sel, rows_value)


def chunk_logits(hs_c, ws, bs, ht_c, wt, bt, opts: LinearDivergenceOptions, acc):
    """(z_s, tanh of the student's softcap or None, z_t) of one chunk of rows, in acc, before the temperature."""
    zs, th = head_gemm.head_logits(hs_c, ws, bs, opts.student(), acc)
    zt, _ = head_gemm.head_logits(ht_c, wt, bt, opts.teacher(), acc)
    return zs, th, zt


def accumulate_grads(d, th, opts: LinearDivergenceOptions, ws, hs_c, dh_c, dw, db):
    """d = d div / d z_s of a chunk (acc) through the student's softcap and scale, then dh_c += d W_s,
    dw += d^T h_s, db += sum d (each None when not needed; fastppo.head_gemm), in d's dtype."""
    if th is not None:
        d = d * (1 - th * th)
    head_gemm.head_grads(d * opts.s_scale, ws, hs_c, dh_c, dw, db)


def rows_of(x, sel):
    """An optional per-row tensor (a per-token temperature) at select_rows' rows: gathered where they are (CPU),
    else whole: the launchers never read a masked row's value, so it needs no zeroing pass."""
    return x if x is None or sel is None else x.index_select(0, sel)


def chunk(x, a, b):
    """Rows a:b of an optional per-row tensor."""
    return None if x is None else x[a:b]


def _entropy(zs, stats, inv_tau, tau_c):
    if tau_c is not None:
        inv_tau = 1.0 / tau_c.to(zs.dtype).unsqueeze(-1)
    lp = (zs * inv_tau - stats[:, 0:1]) - stats[:, 1:2]
    p = lp.exp()
    return -torch.where(p == 0, torch.zeros_like(p), p * lp).sum(-1)


def forward_rows(hs, ws, bs, ht, wt, bt, valid, opts: LinearDivergenceOptions, backend, tau=None):
    """(div [N], entropy [N] or None, stats [N, 5]) by original row, zeros at masked rows. `tau`: per-token
    temperatures [N] in place of opts.inv_tau."""
    N, V = hs.shape[0], ws.shape[0]
    acc = acc_dtype(hs, ws, ht, wt)
    sel, hs_r, ht_r, v_r = select_rows(valid, hs, ht)
    tau_r = rows_of(tau, sel)
    n = hs_r.shape[0]
    k = ops("divergence", backend)
    div = torch.zeros(n, dtype=acc, device=hs.device)
    ent = torch.zeros(n, dtype=acc, device=hs.device) if opts.with_entropy else None
    stats = torch.zeros(n, 5, dtype=acc, device=hs.device)
    step = chunk_rows(n, V, acc, opts.chunk_bytes)
    for a in range(0, n, step):
        b = min(n, a + step)
        zs, _, zt = chunk_logits(hs_r[a:b], ws, bs, ht_r[a:b], wt, bt, opts, acc)
        vc, tc = chunk(v_r, a, b), chunk(tau_r, a, b)
        div[a:b], stats[a:b] = k.divergence_fwd(zs, zt, inv_tau=opts.inv_tau, beta=opts.beta, valid=vc, tau=tc)
        if ent is not None:
            e = _entropy(zs, stats[a:b], opts.inv_tau, tc)
            ent[a:b] = e if vc is None else torch.where(vc, e, torch.zeros((), dtype=acc, device=e.device))
    return by_row(sel, div, N), None if ent is None else by_row(sel, ent, N), by_row(sel, stats, N)


def student_gradient_rows(hs, ws, bs, valid, extra, stats, g, opts: LinearDivergenceOptions, needs, tile_grad,
                          tau=None):
    """(d h_s, d W_s, d b_s) of sum_r g_r div_r (None where not needed), in the student's dtypes, for a divergence
    whose gradient tile d div / d z_s of a chunk of rows is `tile_grad(hs_c, extra_c, stats_c, g_c, valid_c, tau_c)`
    -> (d in acc, tanh of the student's softcap or None); `extra`: per-row tensors of the teacher, selected with the
    student's rows; `tau`: per-token temperatures [N] or None (tau_c: the chunk's)."""
    N, Hs = hs.shape
    V = ws.shape[0]
    acc = stats.dtype
    sel, hs_r, *extra_r, v_r = select_rows(valid, hs, *extra)
    tau_r = rows_of(tau, sel)
    pick = (lambda x: x) if sel is None else (lambda x: x.index_select(0, sel))  # noqa: E731
    st_r, g_r = pick(stats), pick(g.reshape(-1).to(acc))
    n = hs_r.shape[0]
    dh = torch.zeros(n, Hs, dtype=acc, device=hs.device) if needs[0] else None
    dw = torch.zeros(V, Hs, dtype=acc, device=hs.device) if needs[1] else None
    db = torch.zeros(V, dtype=acc, device=hs.device) if (bs is not None and needs[2]) else None
    step = chunk_rows(n, V, acc, opts.chunk_bytes)
    for a in range(0, n, step):
        b = min(n, a + step)
        d, th = tile_grad(hs_r[a:b], [t[a:b] for t in extra_r], st_r[a:b], g_r[a:b], chunk(v_r, a, b),
                          chunk(tau_r, a, b))
        accumulate_grads(d.to(acc), th, opts, ws, hs_r[a:b], None if dh is None else dh[a:b], dw, db)
    dh = None if dh is None else by_row(sel, dh, N)
    return (None if dh is None else dh.to(hs.dtype), None if dw is None else dw.to(ws.dtype),
            None if db is None else db.to(bs.dtype))


def gradient_rows(hs, ws, bs, ht, wt, bt, valid, stats, g, opts: LinearDivergenceOptions, needs, backend, tau=None):
    """(d h_s, d W_s, d b_s) of sum_r g_r div_r (None where not needed), in the student's dtypes."""
    k = ops("divergence", backend)

    def tile_grad(hs_c, extra_c, st, g_c, vc, tc):
        zs, th, zt = chunk_logits(hs_c, ws, bs, extra_c[0], wt, bt, opts, st.dtype)
        return k.divergence_bwd(zs, zt, st, g_c, inv_tau=opts.inv_tau, beta=opts.beta, valid=vc, tau=tc), th

    return student_gradient_rows(hs, ws, bs, valid, (ht,), stats, g, opts, needs, tile_grad, tau)


# ----------------------------------------------------------------------------- ops
def _fwd_fake(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, valid,
              options, backend, tau=None):
    acc = acc_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight)
    div = student_hidden.new_empty((student_hidden.shape[0],), dtype=acc)
    with_entropy = decode(LinearDivergenceOptions, options).with_entropy
    return div, torch.empty_like(div) if with_entropy else empty(div), div.new_empty((div.shape[0], 5))


@define("linear_divergence", _fwd_fake, kernels=True)
def linear_divergence_op(student_hidden: torch.Tensor, student_weight: torch.Tensor, student_bias: torch.Tensor | None,
                         teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, teacher_bias: torch.Tensor | None,
                         valid: torch.Tensor | None, options: str, backend: str,
                         tau: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(div [N], student entropy [N] (empty unless asked), stats [N, 5]) from [N, H] hidden states; only div is
    differentiable, w.r.t. the student's hidden, weight and bias. `tau`: per-token temperatures [N] (both models)
    in place of the options' one."""
    opts = decode(LinearDivergenceOptions, options)
    div, ent, stats = forward_rows(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                   teacher_bias, valid, opts, backend, tau)
    return div, or_empty(ent, div), stats


def _bwd_fake(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, valid,
              stats, grad, options, need_hidden, need_weight, need_bias, backend, tau=None):
    return (student_hidden.new_empty(student_hidden.shape) if need_hidden else empty(student_hidden),
            student_weight.new_empty(student_weight.shape) if need_weight else empty(student_weight),
            student_bias.new_empty(student_bias.shape) if (student_bias is not None and need_bias)
            else empty(student_weight))


@define("linear_divergence_backward", _bwd_fake, kernels=True)
def linear_divergence_backward_op(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                                  student_bias: torch.Tensor | None, teacher_hidden: torch.Tensor,
                                  teacher_weight: torch.Tensor, teacher_bias: torch.Tensor | None,
                                  valid: torch.Tensor | None, stats: torch.Tensor, grad: torch.Tensor, options: str,
                                  need_hidden: bool, need_weight: bool, need_bias: bool, backend: str,
                                  tau: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden, d weight, d bias) of the student for the per-token upstream `grad` (empty where not needed)."""
    dh, dw, db = gradient_rows(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                               teacher_bias, valid, stats, grad, decode(LinearDivergenceOptions, options),
                               (need_hidden, need_weight, need_bias), backend, tau)
    return or_empty(dh, student_hidden), or_empty(dw, student_weight), or_empty(db, student_weight)


def _setup(ctx, inputs, output):
    *tensors, valid, options, backend = inputs[:9]
    _, ent, stats = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(ent, stats)
    ctx.save_for_backward(*tensors, valid, stats, inputs[9] if len(inputs) > 9 else None)
    ctx.options, ctx.backend = options, backend


def _backward(ctx, g, *_):
    if g is None:
        return (None,) * 10
    hs, ws, bs, ht, wt, bt, valid, stats, tau = ctx.saved_tensors
    needs = ctx.needs_input_grad
    need_bias = bs is not None and needs[2]
    dh, dw, db = linear_divergence_backward_op(hs, ws, bs, ht, wt, bt, valid, stats, g, ctx.options, needs[0],
                                               needs[1], need_bias, ctx.backend, tau)
    return (dh if needs[0] else None), (dw if needs[1] else None), (db if need_bias else None), *(None,) * 7


linear_divergence_op.register_autograd(_backward, setup_context=_setup)
refuse_double_backward(linear_divergence_backward_op, "linear_divergence_backward")


# ----------------------------------------------------------------------------- public function
def check_head(who, hidden, weight, bias):
    check_float(f"{who}_hidden", hidden)
    check_float(f"{who}_weight", weight)
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{who}_hidden [..., H] and {who}_weight [V, H] must agree on H, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{who}_weight must have at least one vocabulary row, got shape {tuple(weight.shape)}")
    if bias is not None:
        check_float(f"{who}_bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{who}_bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")


def check_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                            teacher_bias, mask, temperature=1.0, op="linear_divergence"):
    """Validates the heads and the mask; returns the per-token temperature tensor ([N], detached) or None for a
    float temperature (LinearDivergenceOptions validates that one)."""
    check_head("student", student_hidden, student_weight, student_bias)
    check_head("teacher", teacher_hidden, teacher_weight, teacher_bias)
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(f"student_weight and teacher_weight must share the vocabulary, got V = "
                         f"{student_weight.shape[0]} and {teacher_weight.shape[0]}")
    if tuple(teacher_hidden.shape[:-1]) != tuple(student_hidden.shape[:-1]):
        raise ValueError(f"student_hidden and teacher_hidden must have the same leading (token) shape, got "
                         f"{tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}")
    if mask is not None:
        check_mask(mask)
        check_same_shape("mask", mask, "student_hidden without the hidden dim", student_hidden.shape[:-1])
    tau = check_temperature_rows(temperature, student_hidden.shape[:-1], student_hidden.device, op, mask=mask)
    return None if tau is None else tau.reshape(-1)


def linear_divergence(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                      teacher_weight: torch.Tensor, *, beta: float, temperature: float | torch.Tensor = 1.0,
                      student_bias=None, teacher_bias=None, mask: torch.Tensor | None = None,
                      chunk_bytes: int | None = None, return_entropy: bool = False, student_logit_scale: float = 1.0,
                      student_final_logit_softcapping=None, teacher_logit_scale: float = 1.0,
                      teacher_final_logit_softcapping=None):
    """logits_divergence(z_s, z_t, beta=beta, temperature=temperature, mask=mask) for
    z = softcap(logit_scale * (hidden @ weight.T + bias)) of each model (its own scale / softcap), without
    either [N, V] logits: student_hidden [..., Hs], student_weight [V, Hs], teacher_hidden [..., Ht],
    teacher_weight [V, Ht] (any float dtypes; the products are kept in fp32, fp64 for fp64: fastppo.head_gemm)
    -> per-token divergence [...] float32 (float64 when an input is float64). beta 0: KL(p_t || p_s),
    1: KL(p_s || p_t), between: TRL's generalised JSD with m = (1 - beta) p_s + beta p_t.

    Gradient to the student's hidden, weight and bias only (the teacher is detached). Rows where `mask`
    ([...], bool or 0/1) is 0 give 0 and a zero gradient, even with NaN there. `return_entropy=True` returns
    (divergence, the student's entropy of softmax(z_s / tau), no gradient). `chunk_bytes` bounds the two
    [rows, V] logit buffers (None: 2 GiB). Costs: see the module docstring (4 N Ht V + 8 N Hs V FLOPs).
    `temperature`: a positive float, or a floating tensor of the tokens' shape [...] (one tau per token for both
    models, read only where `mask` is 1; no gradient flows to it)."""
    tau = check_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                                  teacher_bias, mask, temperature)
    opts = LinearDivergenceOptions.build(
        beta=beta, temperature=1.0 if tau is not None else temperature, student_logit_scale=student_logit_scale,
        student_final_logit_softcapping=student_final_logit_softcapping, teacher_logit_scale=teacher_logit_scale,
        teacher_final_logit_softcapping=teacher_final_logit_softcapping, return_entropy=return_entropy,
        chunk_bytes=chunk_bytes)
    lead = student_hidden.shape[:-1]
    valid = None if mask is None else (mask.reshape(-1) != 0)
    backend = backend_for(student_hidden, teacher_hidden, mask)
    t_bias = None if teacher_bias is None else teacher_bias.detach()
    div, ent, _ = torch.ops.fastppo.linear_divergence(
        student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, student_bias,
        teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]), teacher_weight.detach(), t_bias, valid,
        encode(opts), backend, tau)
    return (div.view(lead), ent.view(lead)) if opts.with_entropy else div.view(lead)
