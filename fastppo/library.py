"""Every public op as a `torch.library` op in the namespace `fastppo` (torch.ops.fastppo.*), so that
torch.compile sees one graph node per op (no graph break) and a CUDA graph can capture it (no host
sync inside): each op has a fake (meta) implementation and, where it is differentiable, an autograd
formula registered with it. The public functions validate their arguments, then call these ops.

How an op is registered (`_define`):
- A body that launches Triton kernels is a `torch.library.triton_op`; its launchers launch through
  `torch.library.wrap_triton`, so Inductor traces the kernels into its own graph (and the body,
  run on fake tensors, is the fake implementation).
- Under the Triton interpreter (TRITON_INTERPRET=1) the same body is an opaque `custom_op` with the
  hand-written fake below. `wrap_triton` returns an interpreted kernel unchanged, so tracing the body
  would hand fake tensors to the interpreter, which copies its arguments through their storage:
  that is torch.compile's failure under the interpreter (`Cannot access data pointer of Tensor`,
  or `KeyError(torch.uint64)` from its dtype map). As an opaque op the kernels only ever see real
  tensors: one graph, no break, the interpreter's numbers.
- A pure-PyTorch body is a `custom_op` with a fake implementation.

Schemas take tensors and primitives only (options objects are unpacked into floats, ints, strs and
bools; an absent optional float is passed as -1 where the op documents it); the backend chosen by the
public function ("triton" or "torch") is an argument, so a compiled graph keeps the choice it was
traced with. Stats come back as one tensor; the public functions build their dict views outside.
"""

from collections.abc import Callable

import torch
from torch.library import custom_op, triton_op

from .backend import interpreter_enabled

OPAQUE_KERNELS = interpreter_enabled()


def _define(name: str, fake: Callable, *, kernels: bool, mutates_args=()):
    """Register the decorated function as torch.ops.fastppo.<name> (see the module docstring)."""

    def register(fn):
        qualname = f"fastppo::{name}"
        if kernels and not OPAQUE_KERNELS:
            return triton_op(qualname, fn, mutates_args=mutates_args)
        op = custom_op(qualname, fn, mutates_args=mutates_args)
        op.register_fake(fake)
        return op

    return register


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- advantages (no autograd)
def _gae_fake(rewards, values, mask, gamma, lam, backend):
    out = rewards.new_empty(rewards.shape, dtype=torch.float32)
    return out, torch.empty_like(out)


@_define("gae", _gae_fake, kernels=True)
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) float32 [B, T]; one Triton launch, or the PyTorch loop."""
    if backend == "triton":
        from .kernels.gae import gae_fwd

        return gae_fwd(rewards, values, mask, gamma, lam)
    from .advantages import gae_torch

    return gae_torch(rewards, values, mask, gamma, lam)


def _masked_whiten_fake(x, mask, shift_mean):
    return x.new_empty(x.shape, dtype=torch.float32)


@_define("masked_whiten", _masked_whiten_fake, kernels=False)
def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool) -> torch.Tensor:
    from .advantages import masked_whiten_torch

    return masked_whiten_torch(x, mask, shift_mean)


def _group_advantages_fake(scores, group_size, kind, norm_by_std, eps):
    return scores.new_empty(scores.shape, dtype=torch.float32)


@_define("group_advantages", _group_advantages_fake, kernels=False)
def group_advantages(scores: torch.Tensor, group_size: int, kind: str, norm_by_std: bool,
                     eps: float) -> torch.Tensor:
    from .advantages import group_advantages_torch

    return group_advantages_torch(scores, group_size, kind, norm_by_std, eps)


def _kl_shaped_rewards_fake(scores, kl, mask, kl_coef):
    return kl.new_empty(kl.shape, dtype=torch.float32)


@_define("kl_shaped_rewards", _kl_shaped_rewards_fake, kernels=False)
def kl_shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    from .advantages import kl_shaped_rewards_torch

    return kl_shaped_rewards_torch(scores, kl, mask, kl_coef)


# ----------------------------------------------------------------------------- kl_penalty
def _kl_penalty_fake(logprobs, ref_logprobs, kind):
    kl = logprobs.new_empty(logprobs.shape, dtype=torch.float32)
    return kl, torch.empty_like(kl)


@_define("kl_penalty", _kl_penalty_fake, kernels=True)
def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(kl, dkl/dlogp) per token in one Triton launch; the derivative is saved for backward."""
    from .kernels.kl import kl_fwd

    return kl_fwd(logprobs, ref_logprobs, kind)


def _kl_penalty_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _kl_penalty_backward(ctx, g_kl, _g_dkl):
    (dkl,) = ctx.saved_tensors
    g = g_kl * dkl
    return g, (-g if ctx.needs_input_grad[1] else None), None


kl_penalty.register_autograd(_kl_penalty_backward, setup_context=_kl_penalty_setup)


# ----------------------------------------------------------------------------- token_logprobs
def _logprob_ops(backend):
    if backend == "triton":
        from .kernels import logprobs

        return logprobs
    from . import _torch_ops

    return _torch_ops


def _empty(like: torch.Tensor, dtype=None) -> torch.Tensor:
    """The stand-in for an output that was not asked for (schemas cannot return None)."""
    return like.new_empty((0,), dtype=dtype or like.dtype)


def _token_logprobs_fake(logits, labels, inv_tau, ignore_index, with_entropy, backend):
    logp = logits.new_empty(labels.shape, dtype=_acc(logits))
    ent = torch.empty_like(logp) if with_entropy else _empty(logp)
    return logp, ent, logits.new_empty((labels.numel(),), dtype=_acc(logits))


@_define("token_logprobs", _token_logprobs_fake, kernels=True)
def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, inv_tau: float, ignore_index: int,
                   with_entropy: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, lse): logp and entropy shaped like labels (entropy empty unless with_entropy);
    lse [N] is saved for backward and gets no gradient."""
    logp, lse, ent = _logprob_ops(backend).logprobs_fwd(logits, labels, inv_tau=inv_tau, ignore_index=ignore_index,
                                                        with_entropy=with_entropy)
    ent = _empty(logp) if ent is None else ent.view(labels.shape)
    return logp.view(labels.shape), ent, lse


def _logprobs_backward_fake(logits, labels, lse, entropy, grad_logp, grad_entropy, scale, inv_tau, ignore_index,
                            backend):
    return logits.new_empty(logits.shape)


@_define("token_logprobs_backward", _logprobs_backward_fake, kernels=True)
def token_logprobs_backward(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                            entropy: torch.Tensor | None, grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None,
                            scale: torch.Tensor | None, inv_tau: float, ignore_index: int,
                            backend: str) -> torch.Tensor:
    """dlogits = scale * (grad_logp dlogp/dz + grad_entropy dH/dz), recomputing p from the logits."""
    ops = _logprob_ops(backend)
    has_ent = entropy is not None and grad_entropy is not None
    acc = lse.dtype
    kwargs = {"scale": scale} if scale is not None else {}
    return ops.logprobs_bwd(logits, labels, lse, entropy.reshape(-1) if has_ent else None,
                            grad_logp.to(acc).reshape(-1), grad_entropy.to(acc).reshape(-1) if has_ent else None,
                            inv_tau=inv_tau, ignore_index=ignore_index, **kwargs)


def _logprobs_backward_inplace_fake(logits, labels, lse, entropy, grad_logp, grad_entropy, scale, inv_tau,
                                    ignore_index):
    return None


@_define("token_logprobs_backward_inplace", _logprobs_backward_inplace_fake, kernels=True, mutates_args=("logits",))
def token_logprobs_backward_inplace(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                               entropy: torch.Tensor | None, grad_logp: torch.Tensor,
                               grad_entropy: torch.Tensor | None, scale: torch.Tensor | None, inv_tau: float,
                               ignore_index: int) -> None:
    """token_logprobs_backward written over the logits (fused_ppo_loss(inplace=True)); Triton only."""
    from .kernels.logprobs import logprobs_bwd

    logprobs_bwd(logits, labels, lse, None if entropy is None else entropy.reshape(-1), grad_logp.reshape(-1),
                 grad_entropy, inv_tau=inv_tau,
                 ignore_index=ignore_index, scale=scale, inplace=True)


def _token_logprobs_setup(ctx, inputs, output):
    logits, labels, inv_tau, ignore_index, with_entropy, backend = inputs
    logp, ent, lse = output
    ctx.set_materialize_grads(False)   # an unused output gets no zero-filled gradient pass
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, labels, lse, ent if with_entropy else None)
    ctx.args = (inv_tau, ignore_index, backend)


def _token_logprobs_backward(ctx, g_logp, g_ent, _g_lse):
    logits, labels, lse, ent = ctx.saved_tensors
    if g_logp is None and g_ent is None:
        return None, None, None, None, None, None
    if g_logp is None:
        g_logp = torch.zeros(labels.shape, dtype=lse.dtype, device=lse.device)
    inv_tau, ignore_index, backend = ctx.args
    d = torch.ops.fastppo.token_logprobs_backward(logits, labels, lse, ent, g_logp, g_ent, None, inv_tau,
                                                  ignore_index, backend)
    return d, None, None, None, None, None


token_logprobs.register_autograd(_token_logprobs_backward, setup_context=_token_logprobs_setup)


# ----------------------------------------------------------------------------- full_kl
def _full_kl_ops(backend):
    if backend == "triton":
        from .kernels import full_kl

        return full_kl
    from . import _torch_ops

    return _torch_ops


def _full_kl_fake(logits, ref_logits, inv_tau, backend):
    n = logits.numel() // max(logits.shape[-1], 1)
    kl = logits.new_empty(logits.shape[:-1], dtype=_acc(logits))
    return kl, logits.new_empty((n,), dtype=_acc(logits)), logits.new_empty((n,), dtype=_acc(logits))


@_define("full_kl", _full_kl_fake, kernels=True)
def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor, inv_tau: float,
            backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kl [...], lse_p [N], lse_q [N]); only kl is differentiable (w.r.t. logits)."""
    kl, lse_p, lse_q = _full_kl_ops(backend).full_kl_fwd(logits, ref_logits, inv_tau=inv_tau)
    return kl.view(logits.shape[:-1]), lse_p, lse_q


def _full_kl_backward_fake(logits, ref_logits, kl, lse_p, lse_q, grad, inv_tau, backend):
    return logits.new_empty(logits.shape)


@_define("full_kl_backward", _full_kl_backward_fake, kernels=True)
def full_kl_backward(logits: torch.Tensor, ref_logits: torch.Tensor, kl: torch.Tensor, lse_p: torch.Tensor,
                     lse_q: torch.Tensor, grad: torch.Tensor, inv_tau: float, backend: str) -> torch.Tensor:
    return _full_kl_ops(backend).full_kl_bwd(logits, ref_logits, kl.reshape(-1), lse_p, lse_q,
                                             grad.to(kl.dtype).reshape(-1), inv_tau=inv_tau)


def _full_kl_setup(ctx, inputs, output):
    logits, ref_logits, inv_tau, backend = inputs
    kl, lse_p, lse_q = output
    ctx.mark_non_differentiable(lse_p, lse_q)
    ctx.save_for_backward(logits, ref_logits, kl, lse_p, lse_q)
    ctx.args = (inv_tau, backend)


def _full_kl_backward(ctx, g, _g_lse_p, _g_lse_q):
    logits, ref_logits, kl, lse_p, lse_q = ctx.saved_tensors
    d = torch.ops.fastppo.full_kl_backward(logits, ref_logits, kl, lse_p, lse_q, g, *ctx.args)
    return d, None, None, None


full_kl.register_autograd(_full_kl_backward, setup_context=_full_kl_setup)


# ----------------------------------------------------------------------------- linear_logprobs
def _linear_options(inv_tau, ignore_index, with_entropy, backend):
    from .linear import LinearOptions

    return LinearOptions(inv_tau, ignore_index, with_entropy, backend)


def _linear_logprobs_fake(hidden, weight, bias, labels, inv_tau, ignore_index, with_entropy, backend):
    logp = hidden.new_empty(labels.shape, dtype=_acc(hidden))
    ent = torch.empty_like(logp) if with_entropy else _empty(logp)
    return logp, ent, hidden.new_empty((labels.numel(),), dtype=_acc(hidden))


@_define("linear_logprobs", _linear_logprobs_fake, kernels=True)
def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                    inv_tau: float, ignore_index: int, with_entropy: bool,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, lse) of hidden @ weight.T + bias without the [N, V] logits; as token_logprobs."""
    from .linear import linear_forward

    opts = _linear_options(inv_tau, ignore_index, with_entropy, backend)
    logp, lse, ent = linear_forward(hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1), opts)
    ent = _empty(logp) if ent is None else ent.view(labels.shape)
    return logp.view(labels.shape), ent, lse


def _linear_backward_fake(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, inv_tau, ignore_index,
                          need_hidden, need_weight, need_bias, backend):
    return (hidden.new_empty(hidden.shape) if need_hidden else _empty(hidden),
            weight.new_empty(weight.shape) if need_weight else _empty(weight),
            bias.new_empty(bias.shape) if (bias is not None and need_bias) else _empty(weight))


@_define("linear_logprobs_backward", _linear_backward_fake, kernels=True)
def linear_logprobs_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor | None,
                             grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None, inv_tau: float,
                             ignore_index: int, need_hidden: bool, need_weight: bool, need_bias: bool,
                             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_hidden, d_weight, d_bias) for per-token upstream gradients (empty where not needed)."""
    from .linear import linear_backward

    has_ent = entropy is not None and grad_entropy is not None
    opts = _linear_options(inv_tau, ignore_index, has_ent, backend)
    acc = lse.dtype
    dh, dw, db = linear_backward(hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1), lse,
                                 entropy.reshape(-1) if has_ent else None, grad_logp.to(acc),
                                 grad_entropy.to(acc) if has_ent else None, opts,
                                 (need_hidden, need_weight, need_bias))
    return (_empty(hidden) if dh is None else dh.view(hidden.shape), _empty(weight) if dw is None else dw,
            _empty(weight) if db is None else db)


def _linear_logprobs_setup(ctx, inputs, output):
    hidden, weight, bias, labels, inv_tau, ignore_index, with_entropy, backend = inputs
    logp, ent, lse = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(hidden, weight, bias, labels, lse, ent if with_entropy else None)
    ctx.args = (inv_tau, ignore_index, backend)


def _linear_grads(ctx, hidden, weight, bias, labels, lse, ent, g_logp, g_ent, inv_tau, ignore_index, backend):
    needs = ctx.needs_input_grad
    dh, dw, db = torch.ops.fastppo.linear_logprobs_backward(
        hidden, weight, bias, labels, lse, ent, g_logp, g_ent, inv_tau, ignore_index, needs[0], needs[1],
        bias is not None and needs[2], backend)
    return (dh if needs[0] else None), (dw if needs[1] else None), (db if bias is not None and needs[2] else None)


def _linear_logprobs_backward(ctx, g_logp, g_ent, _g_lse):
    hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
    if g_logp is None and g_ent is None:
        return (None,) * 8
    if g_logp is None:
        g_logp = torch.zeros(labels.shape, dtype=lse.dtype, device=lse.device)
    grads = _linear_grads(ctx, hidden, weight, bias, labels, lse, ent, g_logp, g_ent, *ctx.args)
    return (*grads, None, None, None, None, None)


linear_logprobs.register_autograd(_linear_logprobs_backward, setup_context=_linear_logprobs_setup)


# ----------------------------------------------------------------------------- policy / value losses (Triton)
# On the PyTorch backend the public functions compose the differentiable reference instead (plain
# PyTorch ops, which torch.compile traces and fuses itself); these ops run the aggregation kernel.
def _n_stats():
    from .kernels.loss_agg import STATS

    return len(STATS)


def _agg_outputs_fake(x, mask):
    """loss, stats, coef: the aggregation kernel's outputs (coef is [B, T]; [1, T] for a [T] mask)."""
    acc = _acc(x)
    bt = tuple(mask.shape) if mask.dim() == 2 else (1, mask.shape[0])
    return x.new_empty((), dtype=acc), x.new_empty((_n_stats(),), dtype=acc), x.new_empty(bt, dtype=acc)


def _token_loss_setup(ctx, inputs, output):
    loss, stats, coef = output
    ctx.mark_non_differentiable(stats, coef)
    ctx.save_for_backward(coef)
    ctx.x_shape = inputs[0].shape


def _token_loss_backward(ctx, g_loss, _g_stats, _g_coef):
    (coef,) = ctx.saved_tensors
    return (g_loss * coef).view(ctx.x_shape), *([None] * 10)


def _ppo_policy_loss_fake(logprobs, old_logprobs, advantages, mask, agg, clip_low, clip_high, dual_clip,
                          num_tokens, num_seqs, horizon):
    return _agg_outputs_fake(logprobs, mask)


@_define("ppo_policy_loss", _ppo_policy_loss_fake, kernels=True)
def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    agg: str, clip_low: float, clip_high: float, dual_clip: float | None, num_tokens: float | None,
                    num_seqs: float | None, horizon: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, stats, dloss/dlogprobs) from one launch of the aggregation kernel."""
    from .kernels.loss_agg import POLICY, loss_agg

    loss, stats, coef, _, _ = loss_agg(logprobs, old_logprobs, advantages, mask, loss_kind=POLICY, agg=agg,
                                       clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                                       num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon)
    return loss, stats, coef


ppo_policy_loss.register_autograd(_token_loss_backward, setup_context=_token_loss_setup)


def _value_loss_fake(values, old_values, returns, mask, agg, clip, num_tokens, num_seqs, horizon):
    return _agg_outputs_fake(values, mask)


@_define("value_loss", _value_loss_fake, kernels=True)
def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, agg: str,
               clip: float | None, num_tokens: float | None, num_seqs: float | None,
               horizon: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, stats, dloss/dvalues) from one launch of the aggregation kernel."""
    from .kernels.loss_agg import VALUE, loss_agg

    loss, stats, coef, _, _ = loss_agg(values, old_values, returns, mask, loss_kind=VALUE, agg=agg, value_clip=clip,
                                       num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon)
    return loss, stats, coef


value_loss.register_autograd(_token_loss_backward, setup_context=_token_loss_setup)


# ----------------------------------------------------------------------------- fused PPO losses (Triton)
def _fused_outputs_fake(x, labels, mask, ref_logprobs, with_entropy, entropy_coef):
    loss, stats, coef = _agg_outputs_fake(x, mask)
    acc = _acc(x)
    logp = x.new_empty(labels.shape, dtype=acc)
    kl = torch.empty_like(logp) if ref_logprobs is not None else _empty(logp)
    ent = torch.empty_like(logp) if with_entropy else _empty(logp)
    coef_ent = torch.empty_like(coef) if with_entropy else _empty(coef)
    return loss, logp, kl, ent, stats, x.new_empty((labels.numel(),), dtype=acc), coef, coef_ent


def _fused_terms(logp, lse, ent, labels, old_logprobs, advantages, mask, ref_logprobs, kl_kind, kl_coef, entropy_coef,
                 agg, clip_low, clip_high, dual_clip, num_tokens, num_seqs, horizon):
    """The aggregation launch on the log-probs of launch 1, as the eight outputs of the fused ops."""
    from .kernels.loss_agg import POLICY, loss_agg

    logp = logp.view(labels.shape)
    ent = None if ent is None else ent.view(labels.shape)
    loss, stats, coef, coef_ent, kl = loss_agg(
        logp, old_logprobs, advantages, mask, loss_kind=POLICY, ref=ref_logprobs, ent=ent, agg=agg, kl_kind=kl_kind,
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef, entropy_coef=entropy_coef,
        num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon)
    return (loss, logp, _empty(logp) if kl is None else kl.view(labels.shape), _empty(logp) if ent is None else ent,
            stats, lse, coef, _empty(coef) if coef_ent is None else coef_ent)


def _fused_ppo_loss_fake(logits, labels, old_logprobs, advantages, mask, ref_logprobs, inv_tau, ignore_index,
                         with_entropy, kl_kind, kl_coef, entropy_coef, agg, clip_low, clip_high, dual_clip, num_tokens,
                         num_seqs, horizon, inplace):
    return _fused_outputs_fake(logits, labels, mask, ref_logprobs, with_entropy, entropy_coef)


FusedOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                     torch.Tensor]


@_define("fused_ppo_loss", _fused_ppo_loss_fake, kernels=True)
def fused_ppo_loss(logits: torch.Tensor, labels: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                   mask: torch.Tensor, ref_logprobs: torch.Tensor | None, inv_tau: float, ignore_index: int,
                   with_entropy: bool, kl_kind: str, kl_coef: float, entropy_coef: float, agg: str, clip_low: float,
                   clip_high: float, dual_clip: float | None, num_tokens: float | None, num_seqs: float | None,
                   horizon: float | None, inplace: bool) -> FusedOutputs:
    """(loss, logprobs, kl, entropy, stats, lse, coef_logp, coef_entropy): launches 1 and 2 of
    fastppo.fused (kl / entropy / coef_entropy empty when absent). Only loss is differentiable; its
    backward is launch 3 (token_logprobs_backward, or the in-place variant when inplace)."""
    from .kernels.logprobs import logprobs_fwd

    logp, lse, ent = logprobs_fwd(logits, labels, inv_tau=inv_tau, ignore_index=ignore_index,
                                  with_entropy=with_entropy)
    return _fused_terms(logp, lse, ent, labels, old_logprobs, advantages, mask, ref_logprobs, kl_kind, kl_coef,
                        entropy_coef, agg, clip_low, clip_high, dual_clip, num_tokens, num_seqs, horizon)


def _fused_ppo_loss_setup(ctx, inputs, output):
    loss, logp, kl, ent, stats, lse, coef, coef_ent = output
    ctx.mark_non_differentiable(logp, kl, ent, stats, lse, coef, coef_ent)
    logits, labels = inputs[0], inputs[1]
    inv_tau, ignore_index, with_entropy, entropy_coef, inplace = (inputs[6], inputs[7], inputs[8], inputs[11],
                                                                  inputs[19])
    ctx.use_ent = with_entropy and entropy_coef != 0
    ctx.save_for_backward(logits, labels, lse, ent if ctx.use_ent else None, coef, coef_ent if ctx.use_ent else None)
    ctx.args = (inv_tau, ignore_index, inplace)


def _fused_ppo_loss_backward(ctx, g_loss, *_):
    logits, labels, lse, ent, coef, coef_ent = ctx.saved_tensors
    inv_tau, ignore_index, inplace = ctx.args
    scale = g_loss.to(lse.dtype)
    if inplace and logits.stride(-1) == 1:   # otherwise the kernel would write into a contiguous copy
        torch.ops.fastppo.token_logprobs_backward_inplace(logits, labels, lse, ent, coef, coef_ent, scale, inv_tau,
                                                          ignore_index)
        d = logits
    else:
        d = torch.ops.fastppo.token_logprobs_backward(logits, labels, lse, ent, coef, coef_ent, scale, inv_tau,
                                                      ignore_index, "triton")
    return (d, *([None] * 19))


fused_ppo_loss.register_autograd(_fused_ppo_loss_backward, setup_context=_fused_ppo_loss_setup)


def _fused_linear_ppo_loss_fake(hidden, weight, bias, labels, old_logprobs, advantages, mask, ref_logprobs, inv_tau,
                                ignore_index, with_entropy, kl_kind, kl_coef, entropy_coef, agg, clip_low, clip_high,
                                dual_clip, num_tokens, num_seqs, horizon):
    return _fused_outputs_fake(hidden, labels, mask, ref_logprobs, with_entropy, entropy_coef)


@_define("fused_linear_ppo_loss", _fused_linear_ppo_loss_fake, kernels=True)
def fused_linear_ppo_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                          old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                          ref_logprobs: torch.Tensor | None, inv_tau: float, ignore_index: int, with_entropy: bool,
                          kl_kind: str, kl_coef: float, entropy_coef: float, agg: str, clip_low: float,
                          clip_high: float, dual_clip: float | None, num_tokens: float | None,
                          num_seqs: float | None, horizon: float | None) -> FusedOutputs:
    """fused_ppo_loss from hidden states and the lm_head weight (the linear log-prob kernel as launch 1);
    the backward walks the vocabulary in chunks (linear_logprobs_backward)."""
    from .linear import linear_forward

    opts = _linear_options(inv_tau, ignore_index, with_entropy, "triton")
    logp, lse, ent = linear_forward(hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1), opts)
    return _fused_terms(logp, lse, ent, labels, old_logprobs, advantages, mask, ref_logprobs, kl_kind, kl_coef,
                        entropy_coef, agg, clip_low, clip_high, dual_clip, num_tokens, num_seqs, horizon)


def _fused_linear_ppo_loss_setup(ctx, inputs, output):
    loss, logp, kl, ent, stats, lse, coef, coef_ent = output
    ctx.mark_non_differentiable(logp, kl, ent, stats, lse, coef, coef_ent)
    hidden, weight, bias, labels = inputs[:4]
    inv_tau, ignore_index, with_entropy, entropy_coef = inputs[8], inputs[9], inputs[10], inputs[13]
    ctx.use_ent = with_entropy and entropy_coef != 0
    ctx.save_for_backward(hidden, weight, bias, labels, lse, ent if ctx.use_ent else None, coef,
                          coef_ent if ctx.use_ent else None)
    ctx.args = (inv_tau, ignore_index, "triton")


def _fused_linear_ppo_loss_backward(ctx, g_loss, *_):
    hidden, weight, bias, labels, lse, ent, coef, coef_ent = ctx.saved_tensors
    g = g_loss.to(lse.dtype)
    grads = _linear_grads(ctx, hidden, weight, bias, labels, lse, ent, (coef * g).view(labels.shape),
                          None if coef_ent is None else (coef_ent * g).view(labels.shape), *ctx.args)
    return (*grads, *([None] * 18))


fused_linear_ppo_loss.register_autograd(_fused_linear_ppo_loss_backward, setup_context=_fused_linear_ppo_loss_setup)
