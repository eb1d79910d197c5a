"""mismatch_stats: how far the trainer's log-probs are from the rollout engine's (verl#7519's diagnostics), in
one fused deterministic reduction, as the torch.ops.fastppo op `mismatch_stats` (no autograd: diagnostics)."""

import torch

from ._validation import check_float, check_mask, check_same_shape
from .backend import backend_for
from .dispatch import ops
from .kernels.mismatch import STATS
from .library import define
from .packed import check_packed


def _fake(train, rollout, mask, cu_seqlens, eps, backend):
    acc = torch.float64 if torch.float64 in (train.dtype, rollout.dtype) else torch.float32
    return train.new_empty((len(STATS),), dtype=acc)


@define("mismatch_stats", _fake, kernels=True)
def _mismatch_stats_op(train: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor,
                       cu_seqlens: torch.Tensor | None, eps: float, backend: str) -> torch.Tensor:
    """The statistics vector, in the order of STATS; packed by cu_seqlens when given."""
    return ops("mismatch", backend).mismatch_stats(train, rollout, mask, eps=eps, cu_seqlens=cu_seqlens)


def mismatch_stats(train_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, *,
                   eps: float = 0.1, cu_seqlens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Mismatch diagnostics of per-token log-probs [B, T] (or [T]: one sequence; or packed 1-D [total] with
    cu_seqlens, int32/int64 [S + 1] offsets: sequence s is tokens [cu[s], cu[s + 1]), the results those of the
    same sequences padded) where `mask` is 1, as a dict of 0-d tensors (float32; float64 for float64 input), no
    host sync. With d = train - rollout = log rho
    (verl 0.9.1 `compute_offpolicy_metrics`, verl/trainer/ppo/rollout_corr_helper.py):

    - `k3_kl_token` mean of exp(d) - d - 1 (an estimate of KL(pi_rollout || pi_train); verl's `k3_kl`);
    - `chi2_token` mean of rho^2, minus 1, with rho = exp(clamp(d, -20, 20)) (verl's `chi2_token`);
    - `max_abs_diff_token` max |d|; `ratio_mean_token` mean of exp(clamp(d, -20, 20));
    - `frac_outside_token` the fraction of tokens with exp(d) outside [1 - eps, 1 + eps];
    - the same five `*_seq` over sequences with at least one valid token, with d replaced by the sequence's
      sum of d over its valid tokens (the log of the sequence ratio; `chi2_seq` is verl's);
    - `num_tokens`, `num_seqs` (as floats). Statistics over nothing (no valid token) are NaN.
    Masked positions are never read (NaN there changes nothing); NaN at a valid position propagates.
    Gradients: none (the inputs are read detached)."""
    check_float("train_logprobs", train_logprobs)
    check_float("rollout_logprobs", rollout_logprobs)
    if cu_seqlens is not None:
        check_packed("train_logprobs", train_logprobs, cu_seqlens)
    elif train_logprobs.dim() not in (1, 2):
        raise ValueError(f"train_logprobs must be [B, T] or [T], got shape {tuple(train_logprobs.shape)}")
    check_same_shape("rollout_logprobs", rollout_logprobs, "train_logprobs", train_logprobs.shape)
    check_mask(mask)
    check_same_shape("mask", mask, "train_logprobs", train_logprobs.shape)
    e = float(eps)
    if not 0.0 < e < 1.0:
        raise ValueError(f"eps must be in (0, 1) (the ratio band is [1 - eps, 1 + eps]), got {eps}")
    train, rollout = train_logprobs.detach(), rollout_logprobs.detach()
    if train.dim() == 1 and cu_seqlens is None:
        train, rollout, mask = train[None], rollout[None], mask[None]
    stats = torch.ops.fastppo.mismatch_stats(train, rollout, mask, cu_seqlens, e,
                                             backend_for(train, rollout, mask, cu_seqlens))
    return dict(zip(STATS, stats.unbind()))
