"""The optimisation steps of PPOTrainer (a mixin): policy and critic steps over micro-batches with global
normalisers, gradient clipping, skipping a step on a non-finite loss or gradient norm on any rank, and the
token-weighted statistics reduced over ranks."""

from __future__ import annotations

import functools
import warnings

import torch

from .. import fused_linear_ppo_loss, linear_divergence_loss, value_loss
from .packing import Layout
from .rollout import Rollout, response_hidden_and_head, response_values


class UpdateSteps:
    """_policy_step / _critic_step / _step of PPOTrainer (self.cfg, self.policy, self.critic, self.par,
    self.kl_ctl, the optimisers and self._amp come from the trainer)."""

    def _policy_step(self, mb: Rollout, adv, counts: dict | None = None) -> dict:
        """One optimiser step of the policy on `mb` (this rank's part of a minibatch), normalised by the
        minibatch's global `counts` (num_tokens, num_seqs, horizon; default: mb's own)."""
        cfg = self.cfg
        counts = counts or token_counts(mb.mask)
        self.policy.train()
        grpo = cfg.mode == "grpo"
        stats = []

        def micro_loss(sl):
            part = mb.select(sl)
            with self._amp():
                hidden, weight, bias = response_hidden_and_head(self.policy, part)
            lay = self._layout(part.mask)
            out = fused_linear_ppo_loss(
                lay.pack(hidden), weight.to(hidden.dtype), lay.pack(part.labels), lay.pack(part.old_logprobs),
                lay.pack(adv[sl]), lay.mask, bias=bias, ref_logprobs=lay.pack(part.ref_logprobs) if grpo else None,
                kl_coef=self.kl_ctl.value if grpo else 0.0, kl_kind=cfg.kl_kind, entropy_coef=cfg.entropy_coef,
                clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
                policy_loss=cfg.policy_loss, ratio_max=cfg.ratio_max, sapo_tau_pos=cfg.sapo_tau_pos,
                sapo_tau_neg=cfg.sapo_tau_neg, entropy_quantile=cfg.entropy_quantile,
                temperature=cfg.temperature, agg=cfg.agg, return_entropy=True, cu_seqlens=lay.cu_seqlens,
                kept=part.kept_set(lay), **counts)
            stats.append(_weighted(out.loss, lay.mask, out.stats, ("clipfrac", "entropy", "approx_kl")))
            return out.loss

        losses = [functools.partial(micro_loss, sl) for sl in self._micro_slices(mb)]
        if not self._step(losses, self.policy_opt, model=self.policy):
            return {}
        return self._reduce_logs("policy_loss", ("clipfrac", "entropy", "approx_kl"), stats, counts)

    def _distill_step(self, mb: Rollout, counts: dict | None = None) -> dict:
        """One optimiser step of the policy towards the teacher on `mb` (distill mode): the token-mean (global
        num_tokens) of the divergence between the policy and the teacher on the policy's own samples, from both
        models' hidden states (linear_divergence_loss: neither model's logits materialised, the gradient formed
        in the forward pass)."""
        cfg = self.cfg
        counts = counts or token_counts(mb.mask)
        self.policy.train()
        stats = []

        def micro_loss(sl):
            part = mb.select(sl)
            with self._amp():
                with torch.no_grad():
                    h_t, w_t, b_t = response_hidden_and_head(self.teacher, part)
                hidden, weight, bias = response_hidden_and_head(self.policy, part)
            lay = self._layout(part.mask)
            weights = lay.mask.to(torch.float32) / counts["num_tokens"]
            loss, div = linear_divergence_loss(lay.pack(hidden), weight.to(hidden.dtype), lay.pack(h_t),
                                               w_t.to(h_t.dtype), beta=cfg.distill_beta, weights=weights,
                                               temperature=cfg.temperature, student_bias=bias, teacher_bias=b_t,
                                               mask=lay.mask)
            n = lay.mask.sum().clamp_min(1)
            stats.append(_weighted(loss, lay.mask, {"divergence": div.sum() / n}, ("divergence",)))
            return loss

        losses = [functools.partial(micro_loss, sl) for sl in self._micro_slices(mb)]
        if not self._step(losses, self.policy_opt, model=self.policy):
            return {}
        return self._reduce_logs("distill_loss", ("divergence",), stats, counts)

    def _critic_step(self, mb: Rollout, returns, counts: dict | None = None) -> dict:
        counts = counts or token_counts(mb.mask)
        self.critic.train()
        stats = []

        def micro_loss(sl):
            part = mb.select(sl)
            with self._amp():
                values = response_values(self.critic, part)
            lay = self._layout(part.mask)
            loss, st = value_loss(lay.pack(values), lay.pack(part.values), lay.pack(returns[sl]), lay.mask,
                                  clip=self.cfg.vf_clip, agg=self.cfg.agg, cu_seqlens=lay.cu_seqlens, **counts)
            stats.append(_weighted(loss, lay.mask, st, ("vf_clipfrac",)))
            return loss

        losses = [functools.partial(micro_loss, sl) for sl in self._micro_slices(mb)]
        if not self._step(losses, self.critic_opt, model=self.critic):
            return {}
        return self._reduce_logs("value_loss", ("vf_clipfrac",), stats, counts)

    def _layout(self, mask: torch.Tensor) -> Layout:
        """How a micro-batch reaches the losses: packed (cfg.pack: its valid tokens [total] with cu_seqlens) or
        padded ([B, R] with the mask)."""
        return Layout.of(mask, self.cfg.pack)

    def _micro_slices(self, mb: Rollout) -> list[slice]:
        n = mb.mask.shape[0]
        k = n // self.cfg.grad_accum
        return [slice(i * k, (i + 1) * k) for i in range(self.cfg.grad_accum)]

    def _reduce_logs(self, loss_name, stat_names, stats, counts) -> dict:
        """Global minibatch loss (sum of every micro-batch share on every rank) and token-weighted statistics:
        one all-reduce."""
        total = self.par.all_reduce_sum(torch.stack([torch.stack(s) for s in stats]).sum(0))
        values = total.tolist()
        logs = {loss_name: values[0]}
        for name, v in zip(stat_names, values[1:]):
            logs[name] = v / counts["num_tokens"]
        return logs

    def _step(self, loss, opt, model=None) -> bool:
        """Backward, clip, step. `loss`: a 0-d tensor, or a list of zero-argument functions that compute the
        micro-batch losses (gradient accumulation: each is backpropagated before the next is computed; `model`
        synchronises gradients across ranks on the last one only). Each loss is scaled by parallel.grad_scale
        before backward. The gradient norm is clipped over exactly the parameters `opt` steps: under FSDP2 a
        model's .parameters() is not that set after a forward without backward (the rollout's): fully_shard's
        root module keeps its own parameters (embeddings, final norm, heads) unsharded after forward and
        registers them as plain tensors until the next backward reshards it, so they would get no gradient
        and drop out of the norm. A non-finite loss on any rank or a non-finite gradient norm skips the step
        on every rank (weights and optimiser state untouched) with a warning."""
        params = [p for group in opt.param_groups for p in group["params"]]
        micro = [lambda: loss] if isinstance(loss, torch.Tensor) else list(loss)
        opt.zero_grad(set_to_none=True)
        n_bad, first_bad = torch.zeros(()), None
        for i, compute in enumerate(micro):
            with self.par.micro_batch(model, last=i == len(micro) - 1):
                value = compute()
                (value * self.par.grad_scale).backward()
            if not torch.isfinite(value.detach()):
                n_bad += 1
                first_bad = value.item() if first_bad is None else first_bad
        if self.par.all_reduce_sum(n_bad).item() > 0:
            warnings.warn(f"iteration {self.iteration}: non-finite loss {first_bad} (on some rank); step skipped",
                          stacklevel=3)
            self.skipped_steps += 1
            opt.zero_grad(set_to_none=True)
            return False
        norm = self.par.clip_grad_norm_(params, self.cfg.max_grad_norm)
        if not torch.isfinite(norm):
            warnings.warn(f"iteration {self.iteration}: non-finite gradient norm {norm.item()}; step skipped",
                          stacklevel=3)
            self.skipped_steps += 1
            opt.zero_grad(set_to_none=True)
            return False
        opt.step()
        return True



def token_counts(mask: torch.Tensor) -> dict:
    """The global normalisers of a minibatch's losses (see fastppo's agg modes): tokens, sequences with a
    token, horizon. Passed to every micro-batch's loss, so the micro-batch losses add up to the minibatch loss."""
    per_seq = mask.sum(1)
    return {"num_tokens": max(float(per_seq.sum()), 1.0), "num_seqs": max(float((per_seq > 0).sum()), 1.0),
            "horizon": float(mask.shape[1])}


def _weighted(loss, mask, stats: dict, names) -> list:
    """[loss, stat * tokens, ...] of one micro-batch: summed over micro-batches and ranks, then divided by
    the minibatch's tokens, the token-weighted mean of each statistic."""
    n = mask.sum().to(torch.float32)
    zero = torch.zeros((), device=n.device)
    return [loss.detach().float().cpu()] + [torch.where(n > 0, stats[k].detach().float() * n, zero).cpu()
                                             for k in names]
