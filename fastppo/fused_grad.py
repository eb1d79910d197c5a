"""fused_ppo_loss with its gradient formed in the forward pass (docs/design.md §5): for a token-level loss the
coefficient d loss / d logp of every token is known once its row's log-prob is, so one read of each live
logits row gives its log-prob, entropy and gradient (kernels/fused_grad.py). Bytes of forward + backward,
bf16: 2 (read) + 2 (write) per element of a live row, 2 per element of a dead row (its zero gradient), against
the two-pass 2 + 2 + 2; launches: 4 forward (the aggregation weights, the row kernel, the per-token terms, the
finishing reduction) + 1 backward (the upstream-gradient scaling, which moves no [N, V] bytes when the
upstream gradient is 1).

The ops, top to bottom: fused_ppo_loss_grad (the forward: a new gradient buffer) and
fused_ppo_loss_grad_inplace (the same, written over the logits), neither differentiable; fused_grad_link, which
hands the formed gradient to autograd (the loss's identity whose backward scales the held gradient by the
upstream one, in place, and returns it) and fused_grad_scale_ (that scaling, a mutating op).
The public function is fastppo.fused.fused_ppo_loss, which routes here when `takes_one_pass` says so."""

from __future__ import annotations

import torch

from .dispatch import ops
from .kernels.fused_grad import TOKEN_LOCAL_POLICIES
from .library import Once, decode, define, empty, or_empty
from .losses import agg_outputs_fake, loss_options_of
from .options import LogprobOptions, LossOptions


def takes_one_pass(logits: torch.Tensor, lopts: LogprobOptions, opts: LossOptions, cu_seqlens, tau) -> bool:
    """Whether fused_ppo_loss forms its gradient in the forward pass: the Triton backend, a gradient wanted,
    a token-level loss (ppo, cispo, sapo, gpg: not the sequence-level gspo / gspo_token / gmpo, nor
    entropy_quantile, a threshold over every token), the padded layout (not cu_seqlens) and a row that
    fits on chip (V <= fastppo.kernels.fused_grad.max_vocab(): 16384, 8192 with a softcap)."""
    if lopts.backend != "triton" or not (torch.is_grad_enabled() and logits.requires_grad):
        return False
    if opts.policy_loss not in TOKEN_LOCAL_POLICIES or opts.entropy_quantile is not None or cu_seqlens is not None:
        return False
    return logits.shape[-1] <= ops("fused_grad", "triton").max_vocab(lopts.softcap is not None)


def _outputs(logits, labels, old, adv, mask, ref, isw, logits_options, options, tau, out):
    lopts = decode(LogprobOptions, logits_options)
    res, logp, _stats, ent, d = ops("fused_grad", "triton").fused_grad_loss(
        logits, labels, mask, old, adv, ref, isw, opts=loss_options_of(options), with_entropy=lopts.with_entropy,
        ignore_index=lopts.ignore_index, tau=tau, out=out, **lopts.transform())
    logp = logp.view(labels.shape)
    ent = empty(logp) if ent is None else ent.view(labels.shape)
    return res.loss, logp, or_empty(res.kl, logp), ent, res.stats, d


def _grad_fake(logits, labels, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights, logits_options,
               options, tau=None):
    lopts = decode(LogprobOptions, logits_options)
    loss, stats, coef = agg_outputs_fake(logits, mask)
    logp = logits.new_empty(labels.shape, dtype=loss.dtype)
    kl = coef.new_empty(coef.shape) if ref_logprobs is not None else empty(logp)
    ent = torch.empty_like(logp) if lopts.with_entropy else empty(logp)
    return loss, logp, kl, ent, stats


def _fused_ppo_loss_grad_fake(*args, **kwargs):
    logits = args[0]
    return (*_grad_fake(*args, **kwargs), logits.new_empty(logits.shape))


@define("fused_ppo_loss_grad", _fused_ppo_loss_grad_fake, kernels=True)
def fused_ppo_loss_grad_op(logits: torch.Tensor, labels: torch.Tensor, old_logprobs: torch.Tensor,
                           advantages: torch.Tensor, mask: torch.Tensor, ref_logprobs: torch.Tensor | None,
                           rollout_is_weights: torch.Tensor | None, logits_options: str, options: str,
                           tau: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, logprobs, kl, entropy, stats, dlogits): fused_ppo_loss's outputs and d loss / d logits for a unit
    upstream gradient, in a new buffer of the logits' shape and dtype. Not differentiable (fused_grad_link
    hands dlogits to autograd)."""
    return _outputs(logits, labels, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights,
                    logits_options, options, tau, None)


@define("fused_ppo_loss_grad_inplace", _grad_fake, kernels=True, mutates_args=("logits",))
def fused_ppo_loss_grad_inplace_op(logits: torch.Tensor, labels: torch.Tensor, old_logprobs: torch.Tensor,
                                   advantages: torch.Tensor, mask: torch.Tensor, ref_logprobs: torch.Tensor | None,
                                   rollout_is_weights: torch.Tensor | None, logits_options: str, options: str,
                                   tau: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                             torch.Tensor, torch.Tensor]:
    """fused_ppo_loss_grad with dlogits written over the logits (each row is read before it is written)."""
    return _outputs(logits, labels, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights,
                    logits_options, options, tau, logits)[:5]


def _scale_fake(grad, labels, mask, scale, ignore_index):
    return None


@define("fused_grad_scale_", _scale_fake, kernels=True, mutates_args=("grad",))
def fused_grad_scale_op(grad: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor,
                        ignore_index: int) -> None:
    """grad *= scale (0-d) on the live rows, in place; no [N, V] traffic when scale == 1 (read on the device)."""
    ops("fused_grad", "triton").scale_rows_(grad, labels, mask, scale, ignore_index=ignore_index)


def _link_fake(loss, logits, grad, labels, mask, ignore_index):
    return loss.new_empty(loss.shape)


@define("fused_grad_link", _link_fake, kernels=False)
def fused_grad_link_op(loss: torch.Tensor, logits: torch.Tensor, grad: torch.Tensor, labels: torch.Tensor,
                       mask: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The loss again, now differentiable in `logits`: its backward scales `grad` (the gradient formed in
    the forward pass; the logits' own storage with inplace) by the upstream gradient and returns it."""
    return loss.clone()


def _link_setup(ctx, inputs, output):
    loss, logits, grad, labels, mask, ignore_index = inputs
    ctx.save_for_backward(grad, labels, mask, logits)
    ctx.ignore_index = ignore_index
    ctx.spent = False


def _link_backward(ctx, g_loss):
    if g_loss is None:
        return (None,) * 6
    if ctx.spent:   # the held gradient was scaled and handed over: a second backward would scale it again
        raise RuntimeError("fused_ppo_loss formed its gradient in the forward pass and backward already used it: "
                           "backward through this loss once (retain_graph reuse is not supported on this path)")
    ctx.spent = True
    grad, labels, mask, logits = ctx.saved_tensors
    torch.ops.fastppo.fused_grad_scale_(grad, labels, mask, g_loss.reshape(()).to(torch.float32), ctx.ignore_index)
    if torch.is_grad_enabled():   # create_graph: the gradient is no function of the logits in torch ops
        grad = Once.apply("fused_ppo_loss", grad, g_loss, logits)
    return None, grad, None, None, None, None


fused_grad_link_op.register_autograd(_link_backward, setup_context=_link_setup)


def fused_ppo_loss_one_pass(logits, labels, old, adv, mask, ref, isw, lopts: str, opts: str, tau):
    """(loss, logprobs, kl, entropy, stats) of fused_ppo_loss with the gradient formed in the forward pass
    (the caller checked takes_one_pass); loss is differentiable in logits."""
    flag = decode(LogprobOptions, lopts)
    raw = logits.detach()
    if flag.inplace:
        loss, logp, kl, ent, stats = torch.ops.fastppo.fused_ppo_loss_grad_inplace(raw, labels, old, adv, mask, ref,
                                                                                  isw, lopts, opts, tau)
        grad = raw
    else:
        loss, logp, kl, ent, stats, grad = torch.ops.fastppo.fused_ppo_loss_grad(raw, labels, old, adv, mask, ref,
                                                                                isw, lopts, opts, tau)
    loss = torch.ops.fastppo.fused_grad_link(loss, logits, grad, labels, mask, flag.ignore_index)
    return loss, logp, kl, ent, stats

