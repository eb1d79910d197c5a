"""Every public op as a `torch.library` op in the namespace `fastppo` (torch.ops.fastppo.*), so that
torch.compile sees one graph node per op (no graph break) and a CUDA graph can capture it (no host
sync inside): each op has a fake (meta) implementation and, where it is differentiable, an autograd
formula registered with it. The public functions validate their arguments, then call these ops.

How an op is registered (`_define`): a `custom_op` with the fake implementation written beside it.
A body that launches Triton kernels launches them through `torch.library.wrap_triton`, and (as
`torch.library.triton_op` does) the op gets a decomposition under functionalization, so AOTAutograd
and Inductor trace the kernels themselves into their graph instead of an opaque call — for the
"triton" backend only: the PyTorch backend's chunked loops (data-dependent row selection on CPU) stay
one opaque call. Under the Triton interpreter (TRITON_INTERPRET=1) there is no decomposition:
`wrap_triton` returns interpreted kernels unchanged, so tracing the body would hand fake tensors to
the interpreter, which copies its arguments through their storage — torch.compile's failure under the
interpreter (`Cannot access data pointer of Tensor`, or `KeyError(torch.uint64)` from its dtype map).
As an opaque op the kernels only ever see real tensors: one graph, no break, the interpreter's numbers.

Schemas take tensors and primitives. The logits ops take their few options as floats / ints / bools;
the loss ops take their frozen options dataclass as one string, a dict literal (`encode`), decoded in the body,
so the schema stays short and readable when options are added. The backend chosen by the public
function is an argument, so a compiled graph keeps the choice it was traced with. Absent optional
outputs are empty tensors (schemas cannot return None); stats come back as one tensor, the public
functions build their dict views outside.
"""

import ast
import dataclasses
import inspect
from collections.abc import Callable

import torch
from torch._library.triton import set_wrap_triton_enabled
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import custom_op

from .backend import interpreter_enabled

OPAQUE_KERNELS = interpreter_enabled()


def encode(options) -> str:
    """A frozen options dataclass (nested ones included) as the string an op takes: a Python dict literal
    of its fields (floats by repr, so exact). Plain string operations, which torch.compile traces (json
    does not)."""
    items = []
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        items.append(repr(field.name) + ": " + (encode(value) if dataclasses.is_dataclass(value) else repr(value)))
    return "{" + ", ".join(items) + "}"


def _decode(cls, text: str, **nested):
    """The inverse of `encode` for `cls`; `nested` maps a field name to its dataclass."""
    fields = ast.literal_eval(text)
    for name, sub in nested.items():
        fields[name] = sub(**fields[name])
    return cls(**fields)


def _define(name: str, fake: Callable, *, kernels: bool, mutates_args=()):
    """Register the decorated function as torch.ops.fastppo.<name> (see the module docstring)."""

    def register(fn):
        def eager(*args, **kwargs):
            with set_wrap_triton_enabled(False):   # eager calls launch directly (no HOP dispatch)
                return fn(*args, **kwargs)

        op = custom_op(f"fastppo::{name}", eager, mutates_args=mutates_args, schema=_schema(fn, mutates_args))
        op.register_fake(fake)
        if kernels and not OPAQUE_KERNELS:
            op.register_torch_dispatch(FunctionalTensorMode, _decomposition(fn))
        return op

    return register


def _schema(fn, mutates_args):
    from torch._library.infer_schema import infer_schema

    return infer_schema(fn, mutates_args=mutates_args)


def _decomposition(fn):
    """Under functionalization (AOTAutograd, Inductor) run the body itself, so its wrap_triton launches
    become Triton kernels of the graph; the PyTorch backend stays one opaque op."""
    signature = inspect.signature(fn)

    def decompose(mode, op, types, args, kwargs):
        if signature.bind(*args, **kwargs).arguments.get("backend", "triton") != "triton":
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode:
            return fn(*args, **kwargs)

    return decompose


def _acc(*xs) -> torch.dtype:
    """float32 results, float64 when an input is float64."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _empty(like: torch.Tensor, dtype=None) -> torch.Tensor:
    """The stand-in for an output that was not asked for (schemas cannot return None)."""
    return like.new_empty((0,), dtype=dtype or like.dtype)


def _or_empty(t, like):
    return _empty(like) if t is None else t


# ----------------------------------------------------------------------------- advantages (no autograd)
def _gae_fake(rewards, values, mask, gamma, lam, backend):
    out = rewards.new_empty(rewards.shape, dtype=_acc(rewards, values))
    return out, torch.empty_like(out)


@_define("gae", _gae_fake, kernels=True)
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, T]; one Triton launch, or the PyTorch loop."""
    from .dispatch import ops

    return ops("gae", backend).gae_fwd(rewards, values, mask, gamma, lam)


def _masked_whiten_fake(x, mask, shift_mean):
    return x.new_empty(x.shape, dtype=_acc(x))


@_define("masked_whiten", _masked_whiten_fake, kernels=False)
def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool) -> torch.Tensor:
    from .advantages import masked_whiten_torch

    return masked_whiten_torch(x, mask, shift_mean).contiguous()


def _group_advantages_fake(scores, group_size, kind, norm_by_std, eps):
    return scores.new_empty(scores.shape, dtype=_acc(scores))


@_define("group_advantages", _group_advantages_fake, kernels=False)
def group_advantages(scores: torch.Tensor, group_size: int, kind: str, norm_by_std: bool,
                     eps: float) -> torch.Tensor:
    from .advantages import group_advantages_torch

    return group_advantages_torch(scores, group_size, kind, norm_by_std, eps).contiguous()


def _kl_shaped_rewards_fake(scores, kl, mask, kl_coef):
    return kl.new_empty(kl.shape, dtype=_acc(scores, kl))


@_define("kl_shaped_rewards", _kl_shaped_rewards_fake, kernels=False)
def kl_shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    from .advantages import kl_shaped_rewards_torch

    return kl_shaped_rewards_torch(scores, kl, mask, kl_coef).contiguous()


def _rollout_is_weights_fake(old_logprobs, rollout_logprobs, mask, level, mode, max, min):
    acc = _acc(old_logprobs)
    return old_logprobs.new_empty(old_logprobs.shape, dtype=acc), old_logprobs.new_empty((4,), dtype=acc)


@_define("rollout_is_weights", _rollout_is_weights_fake, kernels=False)
def rollout_is_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, level: str,
                       mode: str, max: float | None, min: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, stats [is_mean, is_min, is_max, clipped / masked fraction]) of fastppo.rollout_is_weights."""
    from .losses import rollout_is_weights_torch

    w, stats = rollout_is_weights_torch(old_logprobs, rollout_logprobs, mask, level, mode, max, min)
    return w.contiguous(), stats


# ----------------------------------------------------------------------------- kl_penalty
def _kl_penalty_fake(logprobs, ref_logprobs, kind, backend):
    kl = logprobs.new_empty(logprobs.shape, dtype=_acc(logprobs, ref_logprobs))
    return kl, torch.empty_like(kl)


@_define("kl_penalty", _kl_penalty_fake, kernels=True)
def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str,
               backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(kl, dkl/dlogp) per token (one Triton launch, or its PyTorch twin); the derivative is saved for backward."""
    from .dispatch import ops

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
        from ._torch_terms import kl_terms

        c = kl_terms(logp.to(dkl.dtype), ref.to(dkl.dtype), ctx.kind)[1]
        g = g + g_kl * (c - c.detach())
    return g, (-g if ctx.needs_input_grad[1] else None), None, None


kl_penalty.register_autograd(_kl_penalty_backward, setup_context=_kl_penalty_setup)


# ----------------------------------------------------------------------------- token_logprobs
def _logprob_ops(backend):
    from .dispatch import ops

    return ops("logprobs", backend)


def _token_logprobs_fake(logits, labels, inv_tau, ignore_index, with_entropy, logit_scale, softcap, backend):
    logp = logits.new_empty(labels.shape, dtype=_acc(logits))
    ent = torch.empty_like(logp) if with_entropy else _empty(logp)
    return logp, ent, logits.new_empty((labels.numel(), 2), dtype=_acc(logits))


@_define("token_logprobs", _token_logprobs_fake, kernels=True)
def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, inv_tau: float, ignore_index: int, with_entropy: bool,
                   logit_scale: float, softcap: float | None,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, lse) of z' = softcap(logit_scale z) inv_tau: logp and entropy shaped like labels
    (entropy empty unless with_entropy); lse [N, 2] (each row's max m and log s, kept apart so that backward's
    p = exp((z' - m) - log s) is exact at any magnitude) is saved for backward and gets no gradient."""
    logp, lse, ent = _logprob_ops(backend).logprobs_fwd(logits, labels, inv_tau=inv_tau, ignore_index=ignore_index,
                                                        with_entropy=with_entropy, logit_scale=logit_scale,
                                                        softcap=softcap)
    return logp.view(labels.shape), _empty(logp) if ent is None else ent.view(labels.shape), lse


def _logprobs_backward_fake(logits, labels, lse, entropy, grad_logp, grad_entropy, scale, valid, inv_tau,
                            ignore_index, logit_scale, softcap, backend):
    return logits.new_empty(logits.shape)


@_define("token_logprobs_backward", _logprobs_backward_fake, kernels=True)
def token_logprobs_backward(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                            entropy: torch.Tensor | None, grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None,
                            scale: torch.Tensor | None, valid: torch.Tensor | None, inv_tau: float,
                            ignore_index: int, logit_scale: float, softcap: float | None,
                            backend: str) -> torch.Tensor:
    """dlogits = scale * (grad_logp dlogp/dz + grad_entropy dH/dz), recomputing p from the logits; rows
    with an ignore_index label or valid == 0 get exact zeros."""
    has_ent = entropy is not None and grad_entropy is not None
    acc = lse.dtype
    return _logprob_ops(backend).logprobs_bwd(
        logits, labels, lse, entropy.reshape(-1) if has_ent else None, grad_logp.to(acc).reshape(-1),
        grad_entropy.to(acc).reshape(-1) if has_ent else None, inv_tau=inv_tau, ignore_index=ignore_index,
        scale=scale, valid=valid, logit_scale=logit_scale, softcap=softcap).contiguous()


def _token_logprobs_setup(ctx, inputs, output):
    logits, labels, inv_tau, ignore_index, with_entropy, logit_scale, softcap, backend = inputs
    logp, ent, lse = output
    ctx.set_materialize_grads(False)   # an unused output gets no zero-filled gradient pass
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, labels, lse, ent if with_entropy else None)
    ctx.args = (inv_tau, ignore_index, logit_scale, softcap, backend)


def _token_logprobs_backward(ctx, g_logp, g_ent, _g_lse):
    logits, labels, lse, ent = ctx.saved_tensors
    if g_logp is None and g_ent is None:
        return (None,) * 8
    if g_logp is None:
        g_logp = torch.zeros(labels.shape, dtype=lse.dtype, device=lse.device)
    d = torch.ops.fastppo.token_logprobs_backward(logits, labels, lse, ent, g_logp, g_ent, None, None, *ctx.args)
    return (d, *([None] * 7))


token_logprobs.register_autograd(_token_logprobs_backward, setup_context=_token_logprobs_setup)


# ----------------------------------------------------------------------------- full_kl
def _full_kl_ops(backend):
    from .dispatch import ops

    return ops("full_kl", backend)


def _full_kl_fake(logits, ref_logits, inv_tau, backend):
    n = logits.numel() // max(logits.shape[-1], 1)
    acc = _acc(logits)
    return logits.new_empty(logits.shape[:-1], dtype=acc), logits.new_empty((n, 2), dtype=acc), \
        logits.new_empty((n, 2), dtype=acc)


@_define("full_kl", _full_kl_fake, kernels=True)
def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor, inv_tau: float,
            backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kl [...], lse_p [N, 2], lse_q [N, 2]: each row's (max, log-sum) of policy and reference); only kl is
    differentiable (w.r.t. logits)."""
    kl, lse_p, lse_q = _full_kl_ops(backend).full_kl_fwd(logits, ref_logits, inv_tau=inv_tau)
    return kl.view(logits.shape[:-1]), lse_p, lse_q


def _full_kl_backward_fake(logits, ref_logits, kl, lse_p, lse_q, grad, inv_tau, backend):
    return logits.new_empty(logits.shape)


@_define("full_kl_backward", _full_kl_backward_fake, kernels=True)
def full_kl_backward(logits: torch.Tensor, ref_logits: torch.Tensor, kl: torch.Tensor, lse_p: torch.Tensor,
                     lse_q: torch.Tensor, grad: torch.Tensor, inv_tau: float, backend: str) -> torch.Tensor:
    return _full_kl_ops(backend).full_kl_bwd(logits, ref_logits, kl.reshape(-1), lse_p, lse_q,
                                             grad.to(kl.dtype).reshape(-1), inv_tau=inv_tau).contiguous()


def _full_kl_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)   # outputs without a gradient get no zero-filled tensor
    logits, ref_logits, inv_tau, backend = inputs
    kl, lse_p, lse_q = output
    ctx.mark_non_differentiable(lse_p, lse_q)
    ctx.save_for_backward(logits, ref_logits, kl, lse_p, lse_q)
    ctx.args = (inv_tau, backend)


def _full_kl_backward(ctx, g, _g_lse_p, _g_lse_q):
    if g is None:
        return None, None, None, None
    logits, ref_logits, kl, lse_p, lse_q = ctx.saved_tensors
    return torch.ops.fastppo.full_kl_backward(logits, ref_logits, kl, lse_p, lse_q, g, *ctx.args), None, None, None


full_kl.register_autograd(_full_kl_backward, setup_context=_full_kl_setup)


# ----------------------------------------------------------------------------- linear_logprobs
def _linear_options(options: str):
    from .linear import LinearOptions

    return _decode(LinearOptions, options)


def _linear_logprobs_fake(hidden, weight, bias, labels, options, backend):
    opts = _linear_options(options)
    logp = hidden.new_empty(labels.shape, dtype=_acc(hidden, weight))
    per_token = [torch.empty_like(logp) if on else _empty(logp)
                 for on in (opts.with_entropy, opts.extras, opts.extras)]
    top1 = logp.new_empty(labels.shape, dtype=torch.bool) if opts.extras else _empty(logp, torch.bool)
    lse = logp.new_empty((labels.numel(), 2))
    return logp, *per_token, top1, lse, logp.new_empty((labels.numel(),)) if opts.with_entropy else _empty(lse)


@_define("linear_logprobs", _linear_logprobs_fake, kernels=True)
def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                    options: str, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                         torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, log_sum_sq_probs, mean_logits, is_top1, lse, entropy_rows) of hidden @ weight.T + bias
    without the [N, V] logits (fastppo.linear; `options` is a LinearOptions). lse [N, 2] (row max, log-sum) and
    entropy_rows [N] are backward's statistics. Only logp and entropy are differentiable."""
    from .linear import linear_outputs

    opts = _linear_options(options)
    logp, ent, sq, mean, top1, lse, ent_rows = linear_outputs(hidden, weight, bias, labels, opts)
    if ent_rows is not None and opts.backend == "torch":
        ent_rows = ent_rows.clone()   # by row there: the same values as entropy (op outputs may not alias)
    return logp, _or_empty(ent, logp), _or_empty(sq, logp), _or_empty(mean, logp), \
        _or_empty(top1, _empty(logp, torch.bool)), lse, _or_empty(ent_rows, logp)


def _linear_backward_fake(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, options, need_hidden,
                          need_weight, need_bias, backend):
    return (hidden.new_empty(hidden.shape) if need_hidden else _empty(hidden),
            weight.new_empty(weight.shape) if need_weight else _empty(weight),
            bias.new_empty(bias.shape) if (bias is not None and need_bias) else _empty(weight))


@_define("linear_logprobs_backward", _linear_backward_fake, kernels=True)
def linear_logprobs_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor | None,
                             grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None, options: str,
                             need_hidden: bool, need_weight: bool, need_bias: bool,
                             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_hidden, d_weight, d_bias) for per-token upstream gradients (empty where not needed)."""
    from .linear import linear_grads

    has_ent = entropy is not None and grad_entropy is not None
    dh, dw, db = linear_grads(hidden, weight, bias, labels, lse, entropy if has_ent else None, grad_logp,
                              grad_entropy if has_ent else None, _linear_options(options),
                              (need_hidden, need_weight, need_bias))
    return (_empty(hidden) if dh is None else dh.contiguous(), _or_empty(dw, weight), _or_empty(db, weight))


def _linear_logprobs_setup(ctx, inputs, output):
    hidden, weight, bias, labels, options, backend = inputs
    logp, ent, sq, mean, top1, lse, ent_rows = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(sq, mean, top1, lse, ent_rows)
    with_entropy = _linear_options(options).with_entropy
    ctx.save_for_backward(hidden, weight, bias, labels, lse, ent_rows if with_entropy else None)
    ctx.options, ctx.backend = options, backend


def _linear_logprobs_backward(ctx, g_logp, g_ent, *_):
    hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if g_logp is None and (g_ent is None or ent is None):
        return (None,) * 6
    if g_logp is None:
        g_logp = torch.zeros(labels.shape, dtype=lse.dtype, device=lse.device)
    need_bias = bias is not None and needs[2]
    dh, dw, db = torch.ops.fastppo.linear_logprobs_backward(hidden, weight, bias, labels, lse, ent, g_logp, g_ent,
                                                            ctx.options, needs[0], needs[1], need_bias, ctx.backend)
    return (dh if needs[0] else None), (dw if needs[1] else None), (db if need_bias else None), None, None, None


linear_logprobs.register_autograd(_linear_logprobs_backward, setup_context=_linear_logprobs_setup)


# ----------------------------------------------------------------------------- policy / value losses
def _loss_options(options: str):
    from .options import LossOptions

    return _decode(LossOptions, options)


def _agg_outputs_fake(x, mask):
    """loss, stats, coef: the aggregation's outputs (coef is [B, T]; [1, T] for a [T] mask)."""
    from .kernels.loss_agg import STATS

    acc = _acc(x)
    bt = tuple(mask.shape) if mask.dim() == 2 else (1, mask.shape[0])
    return x.new_empty((), dtype=acc), x.new_empty((len(STATS),), dtype=acc), x.new_empty(bt, dtype=acc)


def _ppo_policy_loss_fake(logprobs, old_logprobs, advantages, mask, entropy, rollout_is_weights, options, backend):
    return _agg_outputs_fake(logprobs, mask)


@_define("ppo_policy_loss", _ppo_policy_loss_fake, kernels=True)
def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    entropy: torch.Tensor | None, rollout_is_weights: torch.Tensor | None, options: str,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, stats, dloss/dlogprobs) of the policy loss of `options` (a LossOptions)."""
    from .losses import loss_terms_from_logprobs

    res = loss_terms_from_logprobs(logprobs, entropy, old_logprobs, advantages, mask, opts=_loss_options(options),
                                   backend=backend, rollout_is_weights=rollout_is_weights)
    return res.loss, res.stats, res.coef


def _value_loss_fake(values, old_values, returns, mask, options, backend):
    return _agg_outputs_fake(values, mask)


@_define("value_loss", _value_loss_fake, kernels=True)
def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, options: str,
               backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, stats, dloss/dvalues) of the value loss of `options` (a LossOptions)."""
    from .dispatch import ops

    res = ops("loss_agg", backend).value_loss_agg(values, old_values, returns, mask, opts=_loss_options(options))
    return res.loss, res.stats, res.coef


def _token_loss_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)   # outputs without a gradient get no zero-filled tensor
    loss, stats, coef = output
    ctx.mark_non_differentiable(stats, coef)
    ctx.save_for_backward(coef, *inputs[:-2])   # the tensor inputs: only read under create_graph
    ctx.x_meta = (inputs[0].shape, len(inputs), inputs[-2])


def _coef_graph(options: str, x, *rest):
    """dloss/dx per token as differentiable torch ops of the inputs (the PyTorch backend's closed form, whose
    own derivative is the loss's second derivative)."""
    from .dispatch import ops
    from .losses import loss_terms_from_logprobs

    opts = _loss_options(options)
    if opts.loss == "value":
        return ops("loss_agg", "torch").value_loss_agg(x, *rest, opts=opts).coef
    old, adv, mask, ent, isw = rest
    return loss_terms_from_logprobs(x, ent, old, adv, mask, opts=opts, backend="torch", rollout_is_weights=isw).coef


def _token_loss_backward(ctx, g_loss, _g_stats, _g_coef):
    shape, n, options = ctx.x_meta
    if g_loss is None:
        return (None,) * n
    coef, x, *rest = ctx.saved_tensors
    g = g_loss.to(coef.dtype)
    d = g * coef
    if torch.is_grad_enabled():   # create_graph: add the coefficient's own derivative (zero in value)
        c = _coef_graph(options, x.to(coef.dtype), *rest)
        d = d + g * (c - c.detach())
    return (d.view(shape), *([None] * (n - 1)))


for _op in (ppo_policy_loss, value_loss):
    _op.register_autograd(_token_loss_backward, setup_context=_token_loss_setup)


# ----------------------------------------------------------------------------- fused losses
def _logits_options(options: str):
    from .fused import LogitsOptions

    return _decode(LogitsOptions, options)


FusedOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                     torch.Tensor]


def _fused_ppo_loss_fake(logits, labels, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights,
                         logits_options, options, backend):
    lopts = _logits_options(logits_options)
    loss, stats, coef = _agg_outputs_fake(logits, mask)
    logp = logits.new_empty(labels.shape, dtype=loss.dtype)
    kl = coef.new_empty(coef.shape) if ref_logprobs is not None else _empty(logp)
    ent = torch.empty_like(logp) if lopts.want_entropy else _empty(logp)
    coef_ent = torch.empty_like(coef) if lopts.want_entropy else _empty(coef)
    return loss, logp, kl, ent, stats, logits.new_empty((labels.numel(), 2), dtype=loss.dtype), coef, coef_ent


@_define("fused_ppo_loss", _fused_ppo_loss_fake, kernels=True)
def fused_ppo_loss(logits: torch.Tensor, labels: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                   mask: torch.Tensor, ref_logprobs: torch.Tensor | None, rollout_is_weights: torch.Tensor | None,
                   logits_options: str, options: str, backend: str) -> FusedOutputs:
    """(loss, logprobs, kl, entropy, stats, lse, coef_logp, coef_entropy) of fastppo.fused (`logits_options`: a
    LogitsOptions, `options`: a LossOptions; kl / entropy / coef_entropy empty when absent). Only loss is
    differentiable; its backward is one log-prob backward launch (token_logprobs_backward, or written over
    the logits when inplace)."""
    from .fused import fused_outputs

    loss, logp, kl, ent, stats, lse, coef, coef_ent = fused_outputs(
        logits, labels, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights,
        _logits_options(logits_options), _loss_options(options))
    return loss, logp, _or_empty(kl, logp), _or_empty(ent, logp), stats, lse, coef, _or_empty(coef_ent, coef)


def _fused_ppo_loss_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)   # outputs without a gradient get no zero-filled tensor
    logits, labels, old, adv, mask, ref, isw, logits_options, options, backend = inputs
    loss, logp, kl, ent, stats, lse, coef, coef_ent = output
    ctx.mark_non_differentiable(logp, kl, ent, stats, lse, coef, coef_ent)
    use_ent = _logits_options(logits_options).want_entropy and _loss_options(options).entropy_coef != 0
    ctx.save_for_backward(logits, labels, mask, lse, ent if use_ent else None, coef, coef_ent if use_ent else None)
    ctx.logits_options = logits_options


def _fused_ppo_loss_backward(ctx, g_loss, *_):
    if g_loss is None:
        return (None,) * 10
    logits, labels, mask, lse, ent, coef, coef_ent = ctx.saved_tensors
    lopts = _logits_options(ctx.logits_options)
    scale = g_loss.to(lse.dtype)
    transform = (lopts.inv_tau, lopts.ignore_index, lopts.logit_scale, lopts.softcap)
    if lopts.inplace and lopts.backend == "triton" and logits.stride(-1) == 1 and not torch.is_grad_enabled():
        # (else a new buffer: a contiguous copy, or create_graph, whose double backward then raises)
        torch.ops.fastppo.token_logprobs_backward_inplace(logits, labels, lse, ent, coef, coef_ent, scale, mask,
                                                          *transform)
        d = logits
    else:
        d = torch.ops.fastppo.token_logprobs_backward(logits, labels, lse, ent, coef, coef_ent, scale, mask,
                                                      *transform, lopts.backend)
    return (d, *([None] * 9))


fused_ppo_loss.register_autograd(_fused_ppo_loss_backward, setup_context=_fused_ppo_loss_setup)


def _logprobs_backward_inplace_fake(logits, labels, lse, entropy, grad_logp, grad_entropy, scale, valid, inv_tau,
                                    ignore_index, logit_scale, softcap):
    return None


@_define("token_logprobs_backward_inplace", _logprobs_backward_inplace_fake, kernels=True, mutates_args=("logits",))
def token_logprobs_backward_inplace(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                                    entropy: torch.Tensor | None, grad_logp: torch.Tensor,
                                    grad_entropy: torch.Tensor | None, scale: torch.Tensor | None,
                                    valid: torch.Tensor | None, inv_tau: float, ignore_index: int, logit_scale: float,
                                    softcap: float | None) -> None:
    """token_logprobs_backward written over the logits (fused_ppo_loss(inplace=True)); Triton only."""
    from .kernels.logprobs import logprobs_bwd

    logprobs_bwd(logits, labels, lse, None if entropy is None else entropy.reshape(-1), grad_logp.reshape(-1),
                 None if grad_entropy is None else grad_entropy.reshape(-1), inv_tau=inv_tau,
                 ignore_index=ignore_index, scale=scale, inplace=True, valid=valid, logit_scale=logit_scale,
                 softcap=softcap)


def _fused_linear_ppo_loss_fake(hidden, weight, bias, labels, old_logprobs, advantages, mask, ref_logprobs,
                                rollout_is_weights, options, linear_options, need_hidden, need_weight, need_bias,
                                backend):
    lin = _linear_options(linear_options)
    loss, stats, coef = _agg_outputs_fake(hidden, mask)
    logp = hidden.new_empty(labels.shape, dtype=_acc(hidden, weight))
    kl = coef.new_empty(coef.shape) if ref_logprobs is not None else _empty(logp)
    ent = torch.empty_like(logp) if lin.with_entropy else _empty(logp)
    return (loss, logp, kl, ent, stats, *_linear_backward_fake(hidden, weight, bias, None, None, None, None, None, None,
                                                               need_hidden, need_weight, need_bias, backend))


@_define("fused_linear_ppo_loss", _fused_linear_ppo_loss_fake, kernels=True)
def fused_linear_ppo_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                          old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                          ref_logprobs: torch.Tensor | None, rollout_is_weights: torch.Tensor | None, options: str,
                          linear_options: str, need_hidden: bool, need_weight: bool, need_bias: bool,
                          backend: str) -> FusedOutputs:
    """(loss, logprobs, kl, entropy, stats, d_hidden, d_weight, d_bias): fused_linear_ppo_loss's forward,
    which forms the gradients for a unit upstream gradient (fastppo.linear; empty where not needed).
    Only loss is differentiable; its backward scales the saved gradients."""
    from .linear import fused_linear_outputs

    loss, logp, kl, ent, stats, dh, dw, db = fused_linear_outputs(
        hidden, weight, bias, labels, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights,
        _loss_options(options), _linear_options(linear_options), (need_hidden, need_weight, need_bias))
    return (loss, logp, _or_empty(kl, logp), _or_empty(ent, logp), stats, _empty(hidden) if dh is None else
            dh.contiguous(), _or_empty(dw, weight), _or_empty(db, weight))


def _fused_linear_ppo_loss_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)   # outputs without a gradient get no zero-filled tensor
    loss, logp, kl, ent, stats, dh, dw, db = output
    ctx.mark_non_differentiable(logp, kl, ent, stats, dh, dw, db)
    ctx.save_for_backward(dh, dw, db, *inputs[:3])
    ctx.present = inputs[-4:-1]


def _fused_linear_ppo_loss_backward(ctx, g_loss, *_):
    if g_loss is None:
        return (None,) * 15
    grads = []
    dh, dw, db, *linked = ctx.saved_tensors
    for t, present in zip((dh, dw, db), ctx.present):
        if not present:
            grads.append(None)
            continue
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        t = (t.to(acc) * g_loss.reshape(()).to(acc)).to(t.dtype)
        if torch.is_grad_enabled():   # the gradients were formed in the forward: a second derivative cannot be
            t = _Once.apply("fused_linear_ppo_loss", t, g_loss, *(x for x in linked if x is not None))
        grads.append(t)
    return (*grads, *([None] * 12))


fused_linear_ppo_loss.register_autograd(_fused_linear_ppo_loss_backward, setup_context=_fused_linear_ppo_loss_setup)


# ----------------------------------------------------------------------------- double backward
def _twice(name):
    return RuntimeError(f"torch.ops.fastppo.{name} is once_differentiable: fastppo cannot differentiate twice "
                        f"(double backward is not implemented)")


class _Once(torch.autograd.Function):
    """The identity on a gradient, linked to the op's inputs, whose derivative raises `_twice`: for backward
    formulas that are not functions of those inputs in torch ops (gradients formed in the forward pass)."""

    @staticmethod
    def forward(ctx, name, grad, *linked):
        ctx.name = name
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *grads):
        raise _twice(ctx.name)


def _refuse_double_backward(op, name):
    """Backward ops are once_differentiable: differentiating through them raises this clear error."""

    def backward(ctx, *grads):
        raise _twice(name)

    op.register_autograd(backward, setup_context=lambda ctx, inputs, output: None)


for _name, _op in (("token_logprobs_backward", token_logprobs_backward), ("full_kl_backward", full_kl_backward),
                   ("linear_logprobs_backward", linear_logprobs_backward)):
    _refuse_double_backward(_op, _name)
