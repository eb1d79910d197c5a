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


def _define(name: str, fake: Callable, *, kernels: bool):
    """Register the decorated function as torch.ops.fastppo.<name> (see the module docstring)."""

    def register(fn):
        qualname = f"fastppo::{name}"
        if kernels and not OPAQUE_KERNELS:
            return triton_op(qualname, fn, mutates_args=())
        op = custom_op(qualname, fn, mutates_args=())
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
