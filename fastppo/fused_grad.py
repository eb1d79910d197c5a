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

import contextlib

import torch

from .dispatch import ops
from .kernels.fused_grad import TOKEN_LOCAL_POLICIES
from .library import Once, decode, define, empty, or_empty
from .logprobs import token_logprobs_backward_op  # noqa: F401  (registers torch.ops.fastppo.token_logprobs_backward)
from .losses import agg_outputs_fake, loss_options_of
from .options import LogprobOptions, LossOptions

_ENABLED = [True]


@contextlib.contextmanager
def one_pass(enabled: bool):
    """`with fastppo.fused_grad.one_pass(False):` keeps fused_ppo_loss on the two-pass path inside the block: for
    a caller whose upstream gradient is never 1 (a loss scaled after the call: then the one-read path moves
    4 + 4 bytes per bf16 element against the two-pass 6; folding the scale into `num_tokens` / `num_seqs`
    keeps it at 1), or to compare the paths (the benchmark)."""
    before = _ENABLED[0]
    _ENABLED[0] = bool(enabled)
    try:
        yield
    finally:
        _ENABLED[0] = before


def takes_one_pass(logits: torch.Tensor, lopts: LogprobOptions, opts: LossOptions, cu_seqlens, tau) -> bool:
    """Whether fused_ppo_loss forms its gradient in the forward pass: the Triton backend, a gradient wanted,
    eager mode (torch.compile traces the two-pass op, whose backward is a function of its saved tensors), a
    token-level loss (ppo, cispo, sapo, gpg: not the sequence-level gspo / gspo_token / gmpo, nor
    entropy_quantile, a threshold over every token, nor off_policy_mask_threshold / kl_bias_correction /
    entropy_agg; the other policy losses keep the two-pass path too), the padded layout (not cu_seqlens) and a
    row that fits on chip (V <= fastppo.kernels.fused_grad.max_vocab(): 16384, 8192 with a softcap)."""
    if not _ENABLED[0] or lopts.backend != "triton" or not (torch.is_grad_enabled() and logits.requires_grad):
        return False
    if torch.compiler.is_compiling():   # the hand-over of a gradient held from forward is an eager protocol
        return False
    if opts.policy_loss not in TOKEN_LOCAL_POLICIES or opts.entropy_quantile is not None or cu_seqlens is not None:
        return False
    if opts.off_policy_mask_threshold is not None or opts.kl_bias_correction or opts.entropy_agg is not None:
        return False   # a sequence mask; KL r; the entropy term's own mean (not in the row kernel's terms)
    return logits.shape[-1] <= ops("fused_grad", "triton").max_vocab(lopts.softcap is not None)


def _outputs(logits, labels, old, adv, mask, ref, isw, logits_options, options, tau, out):
    lopts = decode(LogprobOptions, logits_options)
    res, logp, lse, ent, d = ops("fused_grad", "triton").fused_grad_loss(
        logits, labels, mask, old, adv, ref, isw, opts=loss_options_of(options), with_entropy=lopts.with_entropy,
        ignore_index=lopts.ignore_index, tau=tau, out=out, **lopts.transform())
    logp = logp.view(labels.shape)
    ent = empty(logp) if ent is None else ent.view(labels.shape)
    return (res.loss, logp, or_empty(res.kl, logp), ent, res.stats, lse, res.coef, or_empty(res.coef_ent, res.coef),
            d)


def fused_outputs_fake(logits, labels, mask, ref_logprobs, with_entropy: bool):
    """The fake outputs of a fused_ppo_loss op: (loss, logp, kl, entropy, stats, row stats, coef, coef_ent), empty
    tensors for the ones not computed."""
    loss, stats, coef = agg_outputs_fake(logits, mask)
    logp = logits.new_empty(labels.shape, dtype=loss.dtype)
    kl = coef.new_empty(coef.shape) if ref_logprobs is not None else empty(logp)
    ent = torch.empty_like(logp) if with_entropy else empty(logp)
    coef_ent = torch.empty_like(coef) if with_entropy else empty(coef)
    return loss, logp, kl, ent, stats, logits.new_empty((labels.numel(), 2), dtype=loss.dtype), coef, coef_ent


def _grad_fake(logits, labels, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights, logits_options,
               options, tau=None):
    return fused_outputs_fake(logits, labels, mask, ref_logprobs, decode(LogprobOptions, logits_options).with_entropy)


def _fused_ppo_loss_grad_fake(*args, **kwargs):
    logits = args[0]
    return (*_grad_fake(*args, **kwargs), logits.new_empty(logits.shape))


Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                torch.Tensor]
OutputsAndGrad = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                       torch.Tensor, torch.Tensor, torch.Tensor]


@define("fused_ppo_loss_grad", _fused_ppo_loss_grad_fake, kernels=True)
def fused_ppo_loss_grad_op(logits: torch.Tensor, labels: torch.Tensor, old_logprobs: torch.Tensor,
                           advantages: torch.Tensor, mask: torch.Tensor, ref_logprobs: torch.Tensor | None,
                           rollout_is_weights: torch.Tensor | None, logits_options: str, options: str,
                           tau: torch.Tensor | None = None) -> OutputsAndGrad:
    """(loss, logprobs, kl, entropy, stats, lse, coef_logp, coef_entropy, dlogits): fused_ppo_loss's outputs
    (those of torch.ops.fastppo.fused_ppo_loss) and d loss / d logits for a unit upstream gradient, in a new
    buffer of the logits' shape and dtype. Not differentiable (fused_grad_link hands dlogits to autograd)."""
    return _outputs(logits, labels, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights,
                    logits_options, options, tau, None)


@define("fused_ppo_loss_grad_inplace", _grad_fake, kernels=True, mutates_args=("logits",))
def fused_ppo_loss_grad_inplace_op(logits: torch.Tensor, labels: torch.Tensor, old_logprobs: torch.Tensor,
                                   advantages: torch.Tensor, mask: torch.Tensor, ref_logprobs: torch.Tensor | None,
                                   rollout_is_weights: torch.Tensor | None, logits_options: str, options: str,
                                   tau: torch.Tensor | None = None) -> Outputs:
    """fused_ppo_loss_grad with dlogits written over the logits (each row is read before it is written)."""
    return _outputs(logits, labels, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights,
                    logits_options, options, tau, logits)[:8]


def _scale_fake(grad, labels, mask, scale, ignore_index):
    return None


@define("fused_grad_scale_", _scale_fake, kernels=True, mutates_args=("grad",))
def fused_grad_scale_op(grad: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor,
                        ignore_index: int) -> None:
    """grad *= scale (0-d) on the live rows, in place (the inplace path, whose logits are gone: the gradient is
    then rounded twice to its dtype, exact for a power-of-two scale); no [N, V] bytes when scale == 1."""
    ops("fused_grad", "triton").scale_rows_(grad, labels, mask, scale, ignore_index=ignore_index)


def _rescale_fake(grad, logits, labels, lse, entropy, coef, coef_ent, scale, mask, logits_options, tau=None):
    return None


@define("fused_grad_rescale_", _rescale_fake, kernels=True, mutates_args=("grad",))
def fused_grad_rescale_op(grad: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                          entropy: torch.Tensor | None, coef: torch.Tensor, coef_ent: torch.Tensor | None,
                          scale: torch.Tensor, mask: torch.Tensor, logits_options: str,
                          tau: torch.Tensor | None = None) -> None:
    """grad (the gradient formed in forward for a unit upstream) rewritten for the upstream `scale` from the
    logits, rounded once, as the two-pass backward would write it; no bytes when scale == 1."""
    lopts = decode(LogprobOptions, logits_options)
    ops("logprobs", "triton").logprobs_bwd(
        logits, labels, lse, None if entropy is None else entropy.reshape(-1), coef.reshape(-1),
        None if coef_ent is None else coef_ent.reshape(-1), ignore_index=lopts.ignore_index, scale=scale,
        valid=mask, tau=tau, rescale=grad, **lopts.transform())


def _link_fake(loss, logits, grad, labels, mask, lse, entropy, coef, coef_ent, logits_options, tau=None):
    return loss.new_empty(loss.shape)


@define("fused_grad_link", _link_fake, kernels=False)
def fused_grad_link_op(loss: torch.Tensor, logits: torch.Tensor, grad: torch.Tensor, labels: torch.Tensor,
                       mask: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor | None, coef: torch.Tensor,
                       coef_ent: torch.Tensor | None, logits_options: str,
                       tau: torch.Tensor | None = None) -> torch.Tensor:
    """The loss again, now differentiable in `logits`: its backward brings `grad` (the gradient formed in the
    forward pass; the logits' own storage with inplace) to the upstream gradient and returns it. The
    other tensors are what that takes: the rows' statistics and loss coefficients (fused_grad_rescale_)."""
    return loss.clone()


def _link_setup(ctx, inputs, output):
    loss, logits, grad, labels, mask, lse, entropy, coef, coef_ent, logits_options, *rest = inputs
    inplace = decode(LogprobOptions, logits_options).inplace   # then the logits hold the gradient: not saved
    ctx.save_for_backward(None if inplace else logits, labels, mask, lse, entropy, coef, coef_ent,
                          rest[0] if rest else None)
    ctx.logits_options = logits_options
    # inplace: the logits (now holding the gradient) are not saved, but a second derivative must still reach
    # them to raise Once's clear error: kept for that link only, never read
    ctx.link = logits if inplace else None
    # held as an attribute, not a saved tensor: backward rewrites it in place and hands it over once
    # (a saved tensor would fail autograd's version check on a second backward, and stay referenced)
    ctx.grad = grad


def _link_backward(ctx, g_loss):
    if g_loss is None:
        return (None,) * 11
    logits, labels, mask, lse, entropy, coef, coef_ent, tau = ctx.saved_tensors
    lopts = decode(LogprobOptions, ctx.logits_options)
    scale = g_loss.reshape(()).to(lse.dtype)
    grad, ctx.grad = ctx.grad, None
    if grad is None:
        # a second backward through the same graph (retain_graph): the gradient formed in forward was handed
        # over (its receiver may hold it), so a new one is computed from the logits, as the two-pass backward
        if lopts.inplace:
            raise RuntimeError("fused_ppo_loss(inplace=True) wrote its gradient over the logits in the forward pass "
                               "and backward already handed it over: backward through this loss once")
        grad = torch.ops.fastppo.token_logprobs_backward(
            logits, labels, lse, entropy, coef, coef_ent, scale, mask, lopts.inv_tau, lopts.ignore_index,
            lopts.logit_scale, lopts.softcap, "triton", tau)
    elif lopts.inplace:
        torch.ops.fastppo.fused_grad_scale_(grad, labels, mask, scale, lopts.ignore_index)
    else:
        torch.ops.fastppo.fused_grad_rescale_(grad, logits, labels, lse, entropy, coef, coef_ent, scale, mask,
                                              ctx.logits_options, tau)
    if torch.is_grad_enabled():   # create_graph: the gradient is no function of the logits in torch ops
        link = logits if logits is not None else ctx.link
        grad = Once.apply("fused_ppo_loss", grad, g_loss, *(() if link is None else (link,)))
    return None, grad, *([None] * 9)


fused_grad_link_op.register_autograd(_link_backward, setup_context=_link_setup)


def fused_ppo_loss_one_pass(logits, labels, old, adv, mask, ref, isw, lopts: str, opts: str, tau):
    """(loss, logprobs, kl, entropy, stats) of fused_ppo_loss with the gradient formed in the forward pass
    (the caller checked takes_one_pass); loss is differentiable in logits."""
    flags = decode(LogprobOptions, lopts)
    raw = logits.detach()
    if flags.inplace:
        loss, logp, kl, ent, stats, lse, coef, coef_ent = torch.ops.fastppo.fused_ppo_loss_grad_inplace(
            raw, labels, old, adv, mask, ref, isw, lopts, opts, tau)
        grad = raw
    else:
        loss, logp, kl, ent, stats, lse, coef, coef_ent, grad = torch.ops.fastppo.fused_ppo_loss_grad(
            raw, labels, old, adv, mask, ref, isw, lopts, opts, tau)
    use_ent = flags.with_entropy and loss_options_of(opts).entropy_coef != 0
    loss = torch.ops.fastppo.fused_grad_link(loss, logits, grad, labels, mask, lse, ent if use_ent else None, coef,
                                             coef_ent if use_ent else None, lopts, tau)
    return loss, logp, kl, ent, stats
