"""Per-token losses on log-probs: kl_penalty, ppo_policy_loss, value_loss (Triton on GPU /
interpreter, the reference in PyTorch otherwise). Math: fastppo.reference and DESIGN.md §4."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import reference as ref_impl
from ._checks import check_choice, check_float, check_mask, check_positive, check_same_shape
from .backend import backend_for
from .library import encode

POLICY_STATS = ("clipfrac", "clipfrac_lower", "approx_kl", "ratio_mean", "ratio_max")


def _kernels():
    from .kernels import kl, loss_agg

    return kl, loss_agg


# ----------------------------------------------------------------------------- checks
def check_token_args(name, shape, old, adv, mask, agg, num_tokens, num_seqs, horizon,
                     old_name="old_logprobs", adv_name="advantages"):
    """Shapes of the per-token arguments: `name` has `shape` [B, T] (or [T]); old, mask the same;
    adv [B, T] or per sequence [B]."""
    shape = tuple(shape)
    if len(shape) not in (1, 2):
        raise ValueError(f"{name} must be [B, T] or [T], got shape {shape}")
    check_float(old_name, old)
    check_float(adv_name, adv)
    check_same_shape(old_name, old, name, shape)
    check_same_shape("mask", mask, name, shape)
    check_mask(mask)
    if tuple(adv.shape) != shape and not (len(shape) == 2 and tuple(adv.shape) == (shape[0],)):
        raise ValueError(f"{adv_name} must be {shape} (per token) or ({shape[0]},) (per "
                         f"sequence), got {tuple(adv.shape)}")
    check_choice("agg", agg, ref_impl.AGG_MODES)
    check_positive("num_tokens", num_tokens)
    check_positive("num_seqs", num_seqs)
    check_positive("horizon", horizon)


def check_clips(clip_low, clip_high, dual_clip):
    if not 0 <= clip_low < 1:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if clip_high is not None and not clip_high >= 0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (Dual-clip PPO), got {dual_clip}")


def stats_dict(buf: torch.Tensor, names) -> dict[str, torch.Tensor]:
    """Views of the kernel's stats buffer by name (no copy, no sync)."""
    from .kernels.loss_agg import STATS

    return {out: buf[STATS.index(src)] for out, src in names}


# ----------------------------------------------------------------------------- kl_penalty
def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL estimator between the policy and the reference, with d = logp - ref_logp:
    `k1` d; `abs` |d|; `k2`/`mse` d^2/2; `k3` exp(-d) - 1 + d; `low_var_kl` k3 with d clamped to
    [-20, 20] and the result to [-10, 10] (verl). float32, differentiable in both arguments."""
    check_float("logprobs", logprobs)
    check_float("ref_logprobs", ref_logprobs)
    check_same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs.shape)
    check_choice("kind", kind, ref_impl.KL_KINDS)
    if backend_for(logprobs, ref_logprobs) == "torch":
        return ref_impl.kl_penalty(logprobs, ref_logprobs, kind)
    return torch.ops.fastppo.kl_penalty(logprobs, ref_logprobs, kind)[0]


# ----------------------------------------------------------------------------- policy / value
@dataclass(frozen=True)
class AggOptions:
    """Options of the aggregation kernel (see fastppo.kernels.loss_agg.loss_agg)."""

    loss_kind: int
    agg: str
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    value_clip: float | None = None
    num_tokens: float | None = None
    num_seqs: float | None = None
    horizon: float | None = None

    def kwargs(self):
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None,
                    dual_clip=None, agg="token-mean", num_tokens=None, num_seqs=None, horizon=None):
    """PPO clipped surrogate, aggregated. Per token, ratio = exp(clamp(logp - old, -20, 20)):
        L = max(-A ratio, -A clamp(ratio, 1 - clip_low, 1 + clip_high))
    and with dual_clip c > 1, where A < 0: L = min(L, -c A).
    logprobs, old_logprobs, mask: [B, T] (or [T]); advantages [B, T] or per sequence [B].
    agg: token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm; the
    global counts num_tokens / num_seqs / horizon make micro-batch losses sum to the batch loss.
    Returns (loss, stats) with stats clipfrac, clipfrac_lower, approx_kl (mean d^2/2), ratio_mean,
    ratio_max over mask-1 tokens (0-d tensors, no host sync)."""
    check_float("logprobs", logprobs)
    check_token_args("logprobs", logprobs.shape, old_logprobs, advantages, mask, agg, num_tokens, num_seqs,
                     horizon)
    check_clips(clip_low, clip_high, dual_clip)
    clip_high = clip_low if clip_high is None else clip_high
    if backend_for(logprobs, old_logprobs, advantages, mask) == "torch":
        return ref_impl.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=clip_low,
                                        clip_high=clip_high, dual_clip=dual_clip, agg=agg,
                                        num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon)
    opts = AggOptions(0, agg, clip_low, clip_high, dual_clip, None, num_tokens, num_seqs, horizon)
    loss, buf, _ = torch.ops.fastppo.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, encode(opts))
    return loss, stats_dict(buf, [(k, k) for k in POLICY_STATS])


def value_loss(values, old_values, returns, mask, *, clip=None, agg="token-mean", num_tokens=None,
               num_seqs=None, horizon=None):
    """Critic loss 0.5 (v - R)^2, or with clip: 0.5 max((v - R)^2, (v_c - R)^2) where
    v_c = old + clamp(v - old, -clip, clip). Same shapes and aggregation as ppo_policy_loss
    (returns [B, T]). Returns (loss, {"vf_clipfrac"})."""
    check_float("values", values)
    check_token_args("values", values.shape, old_values, returns, mask, agg, num_tokens, num_seqs, horizon,
                     old_name="old_values", adv_name="returns")
    check_same_shape("returns", returns, "values", values.shape)
    check_positive("clip", clip)
    if backend_for(values, old_values, returns, mask) == "torch":
        return ref_impl.value_loss(values, old_values, returns, mask, clip=clip, agg=agg,
                                   num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon)
    opts = AggOptions(1, agg, value_clip=clip, num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon)
    loss, buf, _ = torch.ops.fastppo.value_loss(values, old_values, returns, mask, encode(opts))
    return loss, stats_dict(buf, [("vf_clipfrac", "clipfrac")])
