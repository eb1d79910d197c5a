"""PPOTrainer: PPO (critic + GAE) and GRPO (group advantages, KL in the loss, no critic) on Hugging
Face models, with every loss computed by fastppo:
  rollout  -> generate, score (reward model or function), old / ref log-probs, values
  rewards  -> kl_shaped_rewards (ppo) | group_advantages (grpo)
  advantage-> gae + masked_whiten (ppo)
  update   -> ppo_epochs x minibatches of fused_linear_ppo_loss (policy, from hidden states: the
              logits are never materialised) and value_loss (critic), gradient clipping, AdamW.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable

import torch

from .. import (
    AdaptiveKLController,
    FixedKLController,
    fused_linear_ppo_loss,
    gae,
    group_advantages,
    kl_penalty,
    kl_shaped_rewards,
    masked_whiten,
    value_loss,
)
from ..hf import lm_head_of
from .config import TrainConfig
from .rollout import Rollout, generate, response_hidden, response_logprobs, response_values


class PPOTrainer:
    """policy: AutoModelForCausalLM; ref: frozen reference (default: a frozen copy of the policy);
    reward_model: AutoModelForSequenceClassification scoring prompt + response, or reward_fn(sequences,
    attention_mask, prompt_len) -> [B] scores; critic: AutoModelForTokenClassification(num_labels=1)
    (ppo mode). prompt_fn(n, generator, group_size) -> (prompt_ids, prompt_mask);
    task_score_fn(prompt_ids, response) -> [B] optional ground truth (logged as task_score_mean)."""

    def __init__(self, config: TrainConfig, policy, *, prompt_fn: Callable, eos_id: int, pad_id: int, ref=None,
                 reward_model=None, reward_fn: Callable | None = None, critic=None,
                 task_score_fn: Callable | None = None):
        if (reward_model is None) == (reward_fn is None):
            raise ValueError("give exactly one of reward_model and reward_fn")
        if config.mode == "ppo" and critic is None:
            raise ValueError("ppo mode needs a critic (AutoModelForTokenClassification with num_labels=1)")
        self.cfg = config
        self.policy, self.critic = policy, (critic if config.mode == "ppo" else None)
        if ref is None:
            import copy

            ref = copy.deepcopy(policy)
        self.ref = ref.eval().requires_grad_(False)
        self.reward_model = None if reward_model is None else reward_model.eval().requires_grad_(False)
        self.reward_fn, self.prompt_fn, self.task_score_fn = reward_fn, prompt_fn, task_score_fn
        self.eos_id, self.pad_id = eos_id, pad_id
        self.policy_opt = torch.optim.AdamW(policy.parameters(), lr=config.lr)
        self.critic_opt = None if self.critic is None else torch.optim.AdamW(self.critic.parameters(),
                                                                             lr=config.critic_lr)
        self.kl_ctl = (FixedKLController(config.kl_coef) if config.kl_target is None else
                       AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon))
        self.iteration = 0
        self.skipped_steps = 0

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rollout(self, generator: torch.Generator) -> Rollout:
        cfg = self.cfg
        device = next(self.policy.parameters()).device
        group = cfg.group_size if cfg.mode == "grpo" else 1
        prompt_ids, prompt_mask = self.prompt_fn(cfg.batch_size, generator, group)
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        self.policy.eval()
        seqs, attn, response, mask, labels = generate(self.policy, prompt_ids, prompt_mask,
                                                      max_new_tokens=cfg.max_new_tokens,
                                                      temperature=cfg.temperature, eos_id=self.eos_id,
                                                      pad_id=self.pad_id)
        if self.reward_model is not None:
            scores = self.reward_model(input_ids=seqs, attention_mask=attn).logits[:, 0].float()
        else:
            scores = torch.as_tensor(self.reward_fn(seqs, attn, prompt_ids.shape[1]), dtype=torch.float32,
                                     device=device)
        ro = Rollout(seqs, attn, prompt_ids.shape[1], response, labels, mask, scores,
                     old_logprobs=None, ref_logprobs=None, values=None)
        ro.old_logprobs = response_logprobs(self.policy, ro, cfg.temperature)
        ro.ref_logprobs = response_logprobs(self.ref, ro, cfg.temperature)
        if self.critic is not None:
            self.critic.eval()
            ro.values = response_values(self.critic, ro)
        if self.task_score_fn is not None:
            ro.task_scores = self.task_score_fn(prompt_ids.cpu(), response.cpu())
        return ro

    @torch.no_grad()
    def advantages(self, ro: Rollout):
        """(advantages, returns or None, per-token kl used for the reward)."""
        cfg = self.cfg
        kl = kl_penalty(ro.old_logprobs, ro.ref_logprobs, cfg.kl_kind)
        if cfg.mode == "grpo":
            return group_advantages(ro.scores, cfg.group_size), None, kl
        rewards = kl_shaped_rewards(ro.scores, kl, ro.mask, kl_coef=self.kl_ctl.value)
        adv, returns = gae(rewards, ro.values, ro.mask, gamma=cfg.gamma, lam=cfg.lam)
        return masked_whiten(adv, ro.mask), returns, kl

    # ------------------------------------------------------------------ update
    def _policy_step(self, mb: Rollout, adv) -> dict:
        cfg = self.cfg
        self.policy.train()
        weight, bias = lm_head_of(self.policy)
        hidden = response_hidden(self.policy, mb)
        grpo = cfg.mode == "grpo"
        out = fused_linear_ppo_loss(
            hidden, weight.to(hidden.dtype), mb.labels, mb.old_logprobs, adv, mb.mask, bias=bias,
            ref_logprobs=mb.ref_logprobs if grpo else None, kl_coef=self.kl_ctl.value if grpo else 0.0,
            kl_kind=cfg.kl_kind, entropy_coef=cfg.entropy_coef, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
            dual_clip=cfg.dual_clip, temperature=cfg.temperature, agg=cfg.agg, return_entropy=True)
        if not self._step(out.loss, self.policy, self.policy_opt):
            return {}
        return {"policy_loss": out.loss.item(), "clipfrac": out.stats["clipfrac"].item(),
                "entropy": out.stats["entropy"].item(), "approx_kl": out.stats["approx_kl"].item()}

    def _critic_step(self, mb: Rollout, returns) -> dict:
        self.critic.train()
        values = response_values(self.critic, mb)
        loss, stats = value_loss(values, mb.values, returns, mb.mask, clip=self.cfg.vf_clip, agg=self.cfg.agg)
        if not self._step(loss, self.critic, self.critic_opt):
            return {}
        return {"value_loss": loss.item(), "vf_clipfrac": stats["vf_clipfrac"].item()}

    def _step(self, loss, model, opt) -> bool:
        if not torch.isfinite(loss):
            warnings.warn(f"iteration {self.iteration}: non-finite loss {loss.item()}; step skipped", stacklevel=3)
            self.skipped_steps += 1
            opt.zero_grad(set_to_none=True)
            return False
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.max_grad_norm)
        opt.step()
        return True

    def train_iteration(self) -> dict:
        """One rollout + update; deterministic given (seed, iteration), so a resumed run matches."""
        cfg = self.cfg
        start = time.perf_counter()
        torch.manual_seed(cfg.seed * 1_000_003 + self.iteration)
        generator = torch.Generator().manual_seed(cfg.seed * 7919 + self.iteration)
        ro = self.rollout(generator)
        adv, returns, kl = self.advantages(ro)
        logs: dict[str, list] = {}
        mb_size = cfg.batch_size // cfg.minibatches
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(cfg.batch_size, generator=generator)
            for k in range(cfg.minibatches):
                idx = order[k * mb_size:(k + 1) * mb_size].to(ro.scores.device)
                mb = ro.select(idx)
                for key, v in self._policy_step(mb, adv[idx]).items():
                    logs.setdefault(key, []).append(v)
                if self.critic is not None:
                    for key, v in self._critic_step(mb, returns[idx]).items():
                        logs.setdefault(key, []).append(v)
        seq_kl = (kl * ro.mask).sum(1).mean().item()
        n_tokens = int(ro.mask.sum())
        elapsed = time.perf_counter() - start
        metrics = {
            "iteration": self.iteration,
            "reward_mean": ro.scores.mean().item(),
            "kl_mean": seq_kl,
            "kl_coef": self.kl_ctl.value,
            "response_length": n_tokens / cfg.batch_size,
            "tokens_per_s": n_tokens / elapsed,
            "time_s": elapsed,
            "skipped_steps": self.skipped_steps,
        }
        if ro.task_scores is not None:
            metrics["task_score_mean"] = ro.task_scores.mean().item()
        for key, vals in logs.items():
            metrics[key] = sum(vals) / len(vals)
        self.kl_ctl.update(seq_kl, cfg.batch_size)
        self.iteration += 1
        if not all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)):
            warnings.warn(f"iteration {self.iteration - 1}: non-finite metrics {metrics}", stacklevel=2)
        return metrics

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "skipped_steps": self.skipped_steps,
                "policy_opt": self.policy_opt.state_dict(),
                "critic_opt": None if self.critic_opt is None else self.critic_opt.state_dict(),
                "kl_ctl": self.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict):
        self.iteration, self.skipped_steps = state["iteration"], state["skipped_steps"]
        self.policy_opt.load_state_dict(state["policy_opt"])
        if self.critic_opt is not None and state["critic_opt"] is not None:
            self.critic_opt.load_state_dict(state["critic_opt"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
