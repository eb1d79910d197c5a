"""fastppo.rollout_correction: correct for the rollout engine's sampling distribution (vLLM / SGLang log-probs
differ from the trainer's) with importance-sampling weights and rejection masks, as verl 0.9.1
(verl/trainer/ppo/rollout_corr_helper.py), OpenRLHF 0.11 (openrlhf/models/loss.py PolicyLoss's
is_correction_*) and NeMo-RL define them. One torch.library op, `torch.ops.fastppo.rollout_correction`, whose
body is the PyTorch composition in fastppo/rollout_correction_torch.py (one masked reduction per statistic,
no host sync; there is no Triton kernel: the work is a few passes over [B, T] scalars). No autograd: the
weights are detached by definition (IS changes the measure, not the objective) and the mask is boolean."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ._validation import check_float, check_mask, check_same_shape
from .library import acc_dtype, decode, define, encode
from .options import RolloutCorrectionOptions
from .outputs import RolloutCorrection
from .rollout_correction_torch import rollout_correction_torch, stat_names


def _fake(old_logprobs, rollout_logprobs, mask, options):
    opts = decode(RolloutCorrectionOptions, options)
    acc = acc_dtype(old_logprobs, rollout_logprobs)
    w = old_logprobs.new_empty(old_logprobs.shape if opts.is_level else (0,), dtype=acc)
    return w, mask.new_empty(mask.shape, dtype=torch.bool), old_logprobs.new_empty((len(stat_names(opts)),), dtype=acc)


@define("rollout_correction", _fake, kernels=False)
def rollout_correction_op(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                          options: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights or empty, kept bool [B, T], stats in the order of stat_names(options))."""
    opts = decode(RolloutCorrectionOptions, options)
    w, kept, stats = rollout_correction_torch(old_logprobs, rollout_logprobs, mask, opts)
    return w.contiguous(), kept.contiguous(), torch.stack([stats[k] for k in stat_names(opts)])


def rollout_correction(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, *,
                       is_level: str | None = None, is_mode: str = "truncate", is_max: float = 2.0,
                       is_min: float | None = None, is_batch_normalize: bool = False,
                       rejection: Mapping[str, float | tuple[float, float]] | None = None,
                       log_ratio_bound: float | None = 20.0, is_gate: str = "ratio") -> RolloutCorrection:
    """IS weights, a rejection mask and diagnostics for [B, T] trainer / rollout log-probs.

    With lr_t = old_t - rollout_t on mask-1 tokens (masked positions are never read), b = log_ratio_bound
    (verl's SAFETY_BOUND 20; None: no clamp, OpenRLHF) and S_b = sum_t lr_t over sequence b's valid tokens:

    IS weights (is_level "token" | "sequence"; None: no weights):
        raw_t = exp(clamp(lr_t, -b, b))  (token)  or  exp(clamp(S_b, -b, b))  (sequence, every token of b)
        is_mode "truncate" (TIS):          w = clamp(raw, is_min, is_max)        (verl: no is_min)
        is_mode "mask" (IcePop):           w = raw if is_min <= raw <= is_max else 0
        is_mode "seq-mask" (seq-mask-tis): w_t = raw_t if is_min <= exp(S_b / n_b) <= is_max else 0
                                           (the sequence's geometric-mean ratio gates its token weights)
        is_gate (mask / seq-mask, token level; OpenRLHF's is_correction_gating): the statistic compared with
        [is_min, is_max] — "ratio" (above: raw_t, the geometric mean), or a divergence between the rollout and
        the trainer's probability of the sampled token, with p = clamp(exp(rollout_t), 1e-6, 1 - 1e-6) and
        q = clamp(exp(old_t), 1e-6, 1 - 1e-6):  "binary_kl" p log(p / q) + (1 - p) log((1 - p) / (1 - q)),
        "tv" |p - q|; seq-mask gates on the divergence's plain mean over the sequence's valid tokens
        (OpenRLHF 0.11 openrlhf/models/loss.py PolicyLoss, FlashREINFORCE's trust region); the surviving
        tokens keep raw_t. is_min None means 0.
        is_batch_normalize: w / mean(w) when mean(w) > 1e-8 — the mean over valid tokens (token level) or over
        the non-empty sequences' weights (sequence level), verl's rollout_is_batch_normalize.
    Rejection (verl's rollout_rs; `rejection` maps option -> threshold, all options must pass): with
    ls = clamp(lr, -b, b), k1 = -ls, k2 = ls^2 / 2, k3 = exp(ls) - 1 - ls per token, the statistic of
    `token_kX` is the token's, of `seq_sum_kX` / `seq_mean_kX` / `seq_max_kX` the sum / mean / max over the
    sequence's valid tokens. k1 options keep log(lower) <= stat <= log(upper) (threshold (lower, upper), or
    u meaning (1 / u, u)); k2 / k3 keep stat <= upper. A NaN statistic rejects.

    Returns RolloutCorrection(weights, mask, stats): `mask` is the input mask (its dtype) with rejected
    tokens 0; `stats` holds verl's metrics under verl's names without the "rollout_corr/" prefix
    (rollout_is_*, rollout_rs_<option>_*, rollout_rs_masked_fraction, the off-policy metrics kl, k3_kl,
    training_ppl, rollout_ppl, log_ppl_diff*, ppl_ratio, chi2_token, chi2_seq; IS statistics before batch
    normalisation; with a divergence gate the ratio statistics still compare raw with is_min / is_max, and
    rollout_is_oob_ratio is the fraction of valid tokens the gate dropped) plus rollout_is_seq_oob_ratio
    (seq-mask: fraction of non-empty sequences gated out), num_tokens and num_seqs (non-empty sequences).
    Every statistic is a 0-d tensor; nothing syncs with the host. Differences from verl: masked positions
    are selected away (verl multiplies the raw weights by the mask, so NaN there gives NaN weights at masked
    positions); statistics are float32 tensors, not floats."""
    opts = RolloutCorrectionOptions.build(is_level=is_level, is_mode=is_mode, is_max=is_max, is_min=is_min,
                                          is_batch_normalize=is_batch_normalize, rejection=rejection,
                                          log_ratio_bound=log_ratio_bound, is_gate=is_gate)
    check_float("old_logprobs", old_logprobs)
    check_float("rollout_logprobs", rollout_logprobs)
    if old_logprobs.dim() != 2 or 0 in old_logprobs.shape:
        raise ValueError(f"old_logprobs must be [B, T] with B, T >= 1, got shape {tuple(old_logprobs.shape)}")
    check_same_shape("rollout_logprobs", rollout_logprobs, "old_logprobs", old_logprobs.shape)
    check_same_shape("mask", mask, "old_logprobs", old_logprobs.shape)
    check_mask(mask)
    w, kept, stats = torch.ops.fastppo.rollout_correction(old_logprobs.detach(), rollout_logprobs.detach(), mask,
                                                          encode(opts))
    new_mask = kept if mask.dtype == torch.bool else kept.to(mask.dtype)
    return RolloutCorrection(w if opts.is_level else None, new_mask, dict(zip(stat_names(opts), stats.unbind())))
