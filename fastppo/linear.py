"""linear_logprobs and fused_linear_ppo_loss: log-probs, entropy and the PPO loss from the final
hidden states and the lm_head weight, never holding the [N, V] logits (Cut Cross-Entropy's idea,
extended to RL).

Backward walks the vocabulary in chunks [v0, v1) of at most V/16 columns: the chunk's dz = dL/dz
[N, v1 - v0] is recomputed from hidden and weight (Triton kernel, or PyTorch on the CPU backend),
then d(hidden) += dz @ W[v0:v1], d(W)[v0:v1] = dz^T @ hidden, d(bias)[v0:v1] = dz.sum(0).
Deterministic (no atomics); extra memory is one [N, V/16] chunk buffer plus an fp32 d(hidden)
accumulator and one [N, H] product: N (V/16 b + 6 H) bytes for b-byte inputs.
FLOPs: forward 2 N H V; backward 6 N H V (recompute + two products).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _torch_ops, library  # noqa: F401  (library registers torch.ops.fastppo)
from . import reference as ref_impl
from ._checks import check_float, check_labels, check_temperature
from .backend import backend_for
from .fused import check_ppo_args, ppo_output
from .losses import opt_float
from .outputs import PPOLossOutput


def _ops(backend):
    if backend == "triton":
        from .kernels import linear

        return linear
    return _torch_ops


@dataclass(frozen=True)
class LinearOptions:
    inv_tau: float
    ignore_index: int
    with_entropy: bool
    backend: str


def linear_forward(hidden2d, weight, bias, labels1d, opts: LinearOptions):
    return _ops(opts.backend).linear_fwd(hidden2d, weight, bias, labels1d, inv_tau=opts.inv_tau,
                                         ignore_index=opts.ignore_index, with_entropy=opts.with_entropy)


def linear_backward(hidden2d, weight, bias, labels1d, lse, ent, c_logp, c_ent, opts: LinearOptions,
                    needs=(True, True, True)):
    """(d_hidden, d_weight, d_bias) for per-row upstream c_logp (and c_ent), vocabulary chunk by chunk."""
    ops = _ops(opts.backend)
    N, H = hidden2d.shape
    V = weight.shape[0]
    acc = torch.float64 if hidden2d.dtype == torch.float64 else torch.float32
    d_hidden = torch.zeros(N, H, dtype=acc, device=hidden2d.device) if needs[0] else None
    d_weight = torch.empty_like(weight) if needs[1] else None
    d_bias = torch.empty_like(bias) if (bias is not None and needs[2]) else None
    chunks = list(_torch_ops.linear_chunks(N, V))
    buf = torch.empty(N, max(v1 - v0 for v0, v1 in chunks), dtype=hidden2d.dtype, device=hidden2d.device)
    c_logp = c_logp.reshape(-1).contiguous()
    c_ent = None if c_ent is None else c_ent.reshape(-1).contiguous()
    for v0, v1 in chunks:
        dz = buf[:, : v1 - v0]
        ops.linear_dlogits_chunk(hidden2d, weight, bias, labels1d, lse, ent, c_logp, c_ent, v0, v1, buf,
                                 inv_tau=opts.inv_tau, ignore_index=opts.ignore_index)
        if d_hidden is not None:
            d_hidden += torch.mm(dz, weight[v0:v1])   # fp32 running sum of per-chunk products
        if d_weight is not None:
            torch.mm(dz.t(), hidden2d, out=d_weight[v0:v1])
        if d_bias is not None:
            d_bias[v0:v1] = dz.sum(0, dtype=acc).to(bias.dtype)
    return (None if d_hidden is None else d_hidden.to(hidden2d.dtype)), d_weight, d_bias


def _check_linear(hidden, weight, labels, bias, ignore_index):
    check_float("hidden", hidden)
    check_float("weight", weight)
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., H] and weight [V, H] must agree on H, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have one dtype")
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    check_labels(labels, hidden.shape[:-1], weight.shape[0], ignore_index)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias=None,
                    temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False):
    """token_logprobs(hidden @ weight.T + bias, labels) without materialising the logits.

    hidden [..., H] (any strides), weight [V, H] (e.g. `model.lm_head.weight`, tied or not),
    bias [V] or None, labels [...]. Same outputs, conventions and gradients (to hidden, weight and
    bias) as token_logprobs; memory beyond the returned gradients is one [N, V/16] chunk plus
    O(N H)."""
    _check_linear(hidden, weight, labels, bias, ignore_index)
    tau = check_temperature(temperature)
    logp, ent, _ = torch.ops.fastppo.linear_logprobs(hidden, weight, bias, labels, 1.0 / tau, int(ignore_index),
                                                     bool(return_entropy), backend_for(hidden, weight, labels))
    return (logp, ent) if return_entropy else logp


def fused_linear_ppo_loss(hidden, weight, labels, old_logprobs, advantages, mask, *, bias=None, ref_logprobs=None,
                          kl_coef=0.0, kl_kind="k3", entropy_coef=0.0, clip_low=0.2, clip_high=None, dual_clip=None,
                          temperature=1.0, agg="token-mean", ignore_index=-100, return_entropy=False,
                          num_tokens=None, num_seqs=None, horizon=None) -> PPOLossOutput:
    """fused_ppo_loss(hidden @ weight.T + bias, ...) without materialising the logits.

    hidden [B, T, H] (or [T, H]), weight [V, H]; the other arguments and the result are those of
    fused_ppo_loss. Gradients flow to hidden, weight and bias."""
    _check_linear(hidden, weight, labels, bias, ignore_index)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [B, T, H] or [T, H], got shape {tuple(hidden.shape)}")
    check_ppo_args(hidden.shape[:-1], old_logprobs, advantages, mask, ref_logprobs, kl_kind, kl_coef, entropy_coef,
                   clip_low, clip_high, dual_clip, agg, num_tokens, num_seqs, horizon)
    tau = check_temperature(temperature)
    clip_high = clip_low if clip_high is None else clip_high
    want_ent = bool(return_entropy or entropy_coef != 0)
    backend = backend_for(hidden, weight, labels, old_logprobs, advantages, mask)
    if backend == "torch":
        out = linear_logprobs(hidden, weight, labels, bias=bias, temperature=tau, ignore_index=ignore_index,
                              return_entropy=want_ent)
        logp, ent = out if want_ent else (out, None)
        return ref_impl.compose_ppo_loss(
            logp, ent, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, kl_coef=kl_coef,
            kl_kind=kl_kind, entropy_coef=entropy_coef, clip_low=clip_low, clip_high=clip_high,
            dual_clip=dual_clip, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon)
    ref = None if ref_logprobs is None else ref_logprobs.detach()
    loss, logp, kl, ent, stats, *_ = torch.ops.fastppo.fused_linear_ppo_loss(
        hidden, weight, bias, labels, old_logprobs.detach(), advantages.detach(), mask, ref, 1.0 / tau,
        int(ignore_index), want_ent, kl_kind, float(kl_coef), float(entropy_coef), agg, float(clip_low),
        float(clip_high), opt_float(dual_clip), opt_float(num_tokens), opt_float(num_seqs), opt_float(horizon))
    return ppo_output(loss, logp, kl, ent, stats, ref is not None, want_ent)
