"""PPOTrainer: PPO (critic + GAE), GRPO (group advantages, KL in the loss, no critic) and on-policy
distillation on Hugging Face models, with every loss computed by fastppo:
  rollout  -> generate (keeping the sampler's log-probs), score (reward model or function), old / ref
              log-probs, values; distill: the teacher's log-probs and KL(policy || teacher)
  mismatch -> mismatch_stats(old, sampler log-probs): the engine / trainer gap, logged
  rewards  -> kl_shaped_rewards (ppo) | group_advantages (grpo) | log p_teacher - log p_student (distill
              advantage)
  advantage-> gae + masked_whiten (ppo)
  update   -> ppo_epochs x minibatches of fused_linear_ppo_loss (policy, from hidden states: the
              logits are never materialised), linear_divergence_loss (distill divergence) and value_loss
              (critic), gradient clipping, AdamW.
Every loss and sequence-level op reads the valid response tokens packed ([total] with cu_seqlens; packing.py)
unless --pack false.

Library entry point:
    trainer = PPOTrainer.from_config(TrainConfig(...))   # demo or local folders, fresh or --resume
    metrics = trainer.train()                             # metrics.jsonl, report_to, checkpoints, curves.png
    trainer.evaluate()                                    # rollouts without an update
    trainer.save()                                        # a checkpoint now
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .. import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    group_advantages,
    kl_penalty,
    kl_shaped_rewards,
    masked_whiten,
    mismatch_stats,
)
from . import checkpoint
from .config import TrainConfig, report_targets
from .launch import backend_scope, build_trainer
from .models import disable_dropout
from .packing import Layout
from .parallel import Parallel
from .reporting import Progress, Reporters, phase, write_metrics
from .rollout import Rollout, generate, response_logprobs, response_values, teacher_terms
from .update import UpdateSteps, token_counts

# mismatch_stats entries logged as mismatch_<name> (the engine / trainer log-prob gap, see train_iteration)
MISMATCH_KEYS = ("k3_kl_token", "chi2_token", "max_abs_diff_token", "ratio_mean_token", "frac_outside_token",
                 "k3_kl_seq", "chi2_seq", "max_abs_diff_seq", "ratio_mean_seq", "frac_outside_seq")


def _is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def _in_backend(method):
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with backend_scope(self.cfg.backend):
            return method(self, *args, **kwargs)

    return run


class PPOTrainer(UpdateSteps):
    """policy: AutoModelForCausalLM (or a peft LoRA model: then the reference is the base model with the adapter
    disabled, no second copy); ref: frozen reference (default: a frozen copy of the policy); reward_model:
    AutoModelForSequenceClassification scoring prompt + response, and/or reward_fn(sequences, attention_mask,
    prompt_len) -> [B] scores (both given: their sum); critic: AutoModelForTokenClassification(num_labels=1)
    (ppo mode). prompt_fn(n, generator, group_size) -> (prompt_ids, prompt_mask); task_score_fn(prompt_ids,
    response) -> [B] optional ground truth (logged as task_score_mean); tokenizer: saved with each checkpoint.
    distill mode: teacher (AutoModelForCausalLM, frozen, the policy's vocabulary); the policy is trained on its own
    samples to minimise fastppo.linear_divergence to the teacher (config.distill_beta); a reward is optional
    (logged only). Dropout is switched off in every model (disable_dropout) unless config.keep_dropout."""

    def __init__(self, config: TrainConfig, policy, *, prompt_fn: Callable, eos_id: int, pad_id: int, ref=None,
                 reward_model=None, reward_fn: Callable | None = None, critic=None,
                 task_score_fn: Callable | None = None, tokenizer=None, log: Callable = print,
                 parallel: Parallel | None = None, teacher=None):
        if reward_model is None and reward_fn is None and config.mode != "distill":
            raise ValueError("give a reward_model, a reward_fn, or both")
        if (config.mode == "distill") != (teacher is not None):
            raise ValueError("distill mode needs a teacher (AutoModelForCausalLM), and only distill mode takes one")
        if config.mode == "ppo" and critic is None:
            raise ValueError("ppo mode needs a critic (AutoModelForTokenClassification with num_labels=1)")
        self.cfg = config
        if not config.keep_dropout:   # old / new log-probs and values must come from the same function
            for model in (policy, ref, reward_model, critic, teacher):
                disable_dropout(model)
        self.policy, self.critic = policy, (critic if config.mode == "ppo" else None)
        self.lora = _is_peft(policy)
        if self.lora:
            if ref is not None:
                raise ValueError("a LoRA policy's reference is its base model with the adapter disabled: pass ref=None")
            self.ref = None
        else:
            if ref is None:
                import copy

                ref = copy.deepcopy(policy)
            self.ref = ref.eval().requires_grad_(False)
        self.reward_model = None if reward_model is None else reward_model.eval().requires_grad_(False)
        # data parallelism (parallel.py): wrap before the optimisers see the parameters
        self.par = parallel or Parallel()
        device = next(policy.parameters()).device
        self.policy, self.critic = (self.par.wrap(m, device=device) for m in (self.policy, self.critic))
        self.ref = self.par.wrap(self.ref, device=device)
        self.teacher = None if teacher is None else self.par.wrap(teacher.eval().requires_grad_(False), device=device)
        policy = self.policy
        self.reward_fn, self.prompt_fn, self.task_score_fn = reward_fn, prompt_fn, task_score_fn
        self.eos_id, self.pad_id = eos_id, pad_id
        self.tokenizer, self.log = tokenizer, log
        self.policy_params = [p for p in policy.parameters() if p.requires_grad]
        self.policy_opt = torch.optim.AdamW(self.policy_params, lr=config.lr)
        self.critic_opt = None if self.critic is None else torch.optim.AdamW(self.critic.parameters(),
                                                                             lr=config.critic_lr)
        self.kl_ctl = (FixedKLController(config.kl_coef) if config.kl_target is None else
                       AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon))
        self.iteration = 0
        self.skipped_steps = 0
        self.history: list[dict] = []   # metrics of the earlier iterations of a resumed run

    @classmethod
    def from_config(cls, cfg: TrainConfig, log: Callable = print, explicit: set[str] | None = None) -> PPOTrainer:
        """The trainer `fastppo train` runs: the embedded demo (no --policy) or local folders, fresh or resumed
        (cfg.resume: the run folder's last complete checkpoint, its saved configuration merged with the flags
        given now, see config.merge_for_resume). Everything that can be checked is checked before a model is
        built: the configuration, the checkpoint's state file (weights_only), the prompts, the reward
        functions, the output folder (writable, and holding no other run unless cfg.overwrite; see launch.py).
        explicit: the flags the user gave (default: the fields that differ from the defaults)."""

        return build_trainer(cls, cfg, log, explicit)

    def _amp(self):
        """bf16 autocast for the forward passes (--bf16); the weights and optimiser state stay fp32."""
        if not self.cfg.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    def _ref_logprobs(self, ro):
        if self.lora:
            with self.policy.disable_adapter():
                return response_logprobs(self.policy, ro, self.cfg.temperature)
        return response_logprobs(self.ref, ro, self.cfg.temperature)

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rollout(self, generator: torch.Generator) -> Rollout:
        cfg = self.cfg
        device = self.device
        group = cfg.group_size if cfg.mode == "grpo" else 1
        # the global batch's prompts on every rank (same generator), this rank's rows of it
        prompt_ids, prompt_mask = self.prompt_fn(cfg.batch_size, generator, group)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        rows = torch.arange(prompt_ids.shape[0])[self.par.local_rows(prompt_ids.shape[0])]
        prompt_ids, prompt_mask = prompt_ids[rows].to(device), prompt_mask[rows].to(device)
        self.policy.eval()
        with self._amp():
            seqs, attn, response, mask, labels, sampled, kept = generate(
                self.par.unwrap(self.policy), prompt_ids, prompt_mask, max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p,
                record_kept=cfg.use_kept, eos_id=self.eos_id, pad_id=self.pad_id, seed=seed, rows=rows,
                **self.par.generation_kwargs())
            scores = torch.zeros(seqs.shape[0], dtype=torch.float32, device=device)
            if self.reward_model is not None:
                scores = scores + self.reward_model(input_ids=seqs, attention_mask=attn).logits[:, 0].float()
            if self.reward_fn is not None:
                scores = scores + torch.as_tensor(self.reward_fn(seqs, attn, prompt_ids.shape[1]),
                                                  dtype=torch.float32, device=device)
            ro = Rollout(seqs, attn, prompt_ids.shape[1], response, labels, mask, scores,
                         old_logprobs=None, ref_logprobs=None, values=None, rollout_logprobs=sampled, kept=kept)
            # the policy's log-probs over the sampler's kept sets (--kept_logprobs): the sampler's own; the
            # reference's over the whole vocabulary (it is not the sampler), so kl_penalty(old, ref) estimates
            # KL(sampling distribution || reference)
            ro.old_logprobs = response_logprobs(self.policy, ro, cfg.temperature, kept=kept is not None)
            ro.ref_logprobs = self._ref_logprobs(ro)
            if self.teacher is not None:
                ro.teacher_logprobs, ro.teacher_kl = teacher_terms(self.policy, self.teacher, ro, cfg.temperature)
            if self.critic is not None:
                self.critic.eval()
                ro.values = response_values(self.critic, ro)
        if self.task_score_fn is not None:
            ro.task_scores = self.task_score_fn(prompt_ids.cpu(), response.cpu())
        return self.par.gather_rollout(ro)

    @torch.no_grad()
    def advantages(self, ro: Rollout):
        """(advantages, returns or None, per-token kl used for the reward)."""
        cfg = self.cfg
        kl = kl_penalty(ro.old_logprobs, ro.ref_logprobs, cfg.kl_kind)
        if cfg.mode == "distill":
            if cfg.distill_loss == "divergence":
                return None, None, kl
            # the per-token reverse KL to the teacher at the sampled token, as the advantage (prime-rl,
            # Thinking Machines' on-policy distillation): A_t = -(log p_student(y_t) - log p_teacher(y_t))
            return torch.where(ro.mask, ro.teacher_logprobs - ro.old_logprobs, 0.0), None, kl
        if cfg.mode == "grpo":
            return group_advantages(ro.scores, cfg.group_size), None, kl
        lay = Layout.of(ro.mask, cfg.pack)   # packed: the sequence-level ops read cu_seqlens, no padding
        rewards = kl_shaped_rewards(ro.scores, lay.pack(kl), lay.mask, kl_coef=self.kl_ctl.value,
                                    cu_seqlens=lay.cu_seqlens)
        adv, returns = gae(rewards, lay.pack(ro.values), lay.mask, gamma=cfg.gamma, lam=cfg.lam,
                           cu_seqlens=lay.cu_seqlens)
        return lay.unpack(masked_whiten(adv, lay.mask)), lay.unpack(returns), kl

    @_in_backend
    def train_iteration(self) -> dict:
        """One rollout + update; deterministic given (seed, iteration), so a resumed run matches."""
        cfg = self.cfg
        start = time.perf_counter()
        torch.manual_seed(cfg.seed * 1_000_003 + self.iteration)
        generator = torch.Generator().manual_seed(cfg.seed * 7919 + self.iteration)
        ro = self.rollout(generator)
        # the engine / trainer gap: the sampler's log-probs against the trainer's recomputation with the same
        # (rollout) policy, i.e. the first epoch's old policy, on every token (verl's rollout_corr metrics)
        lay = Layout.of(ro.mask, cfg.pack)
        mismatch = mismatch_stats(lay.pack(ro.old_logprobs), lay.pack(ro.rollout_logprobs), lay.mask,
                                  cu_seqlens=lay.cu_seqlens)
        adv, returns, kl = self.advantages(ro)
        logs: dict[str, list] = {}
        mb_size = cfg.batch_size // cfg.minibatches
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(cfg.batch_size, generator=generator)
            for k in range(cfg.minibatches):
                idx = order[k * mb_size:(k + 1) * mb_size].to(ro.scores.device)
                counts = token_counts(ro.mask[idx])        # of the whole minibatch: every rank holds it
                idx = idx[self.par.local_rows(mb_size)]     # this rank's part
                mb = ro.select(idx)
                step = self._distill_step(mb, counts) if adv is None else self._policy_step(mb, adv[idx], counts)
                for key, v in step.items():
                    logs.setdefault(key, []).append(v)
                if self.critic is not None:
                    for key, v in self._critic_step(mb, returns[idx], counts).items():
                        logs.setdefault(key, []).append(v)
        seq_kl = (kl * ro.mask).sum(1).mean().item()
        n_tokens = int(ro.mask.sum())
        passes = cfg.ppo_epochs * (2 if self.critic is not None else 1)   # loss passes over the batch
        elapsed = time.perf_counter() - start
        metrics = {
            "iteration": self.iteration,
            "reward_mean": ro.scores.mean().item(),
            "kl_mean": seq_kl,
            "kl_coef": self.kl_ctl.value,
            "non_score_reward": -self.kl_ctl.value * seq_kl,
            "rlhf_reward": ro.scores.mean().item() - self.kl_ctl.value * seq_kl,
            "response_length": n_tokens / cfg.batch_size,
            "tokens_per_s": n_tokens / elapsed,
            "time_s": elapsed,
            "skipped_steps": self.skipped_steps,
            # tokens reaching the losses this iteration (policy and critic, every epoch): the layout in use,
            # and the padded [B, R] layout's count (equal with --pack false)
            "loss_tokens": passes * (n_tokens if cfg.pack else ro.mask.numel()),
            "loss_tokens_padded": passes * ro.mask.numel(),
        }
        metrics.update({f"mismatch_{k}": v for k, v in zip(MISMATCH_KEYS, torch.stack(
            [mismatch[k].float().cpu() for k in MISMATCH_KEYS]).tolist())})
        if self.reward_model is None and self.reward_fn is None:   # distill without a reward: nothing to log
            for key in ("reward_mean", "non_score_reward", "rlhf_reward"):
                del metrics[key]
        if ro.task_scores is not None:
            metrics["task_score_mean"] = ro.task_scores.mean().item()
        if ro.teacher_kl is not None:
            metrics["teacher_kl"] = ((ro.teacher_kl * ro.mask).sum() / ro.mask.sum().clamp_min(1)).item()
        for key, vals in logs.items():
            metrics[key] = sum(vals) / len(vals)
        self.kl_ctl.update(seq_kl, cfg.batch_size)
        self.iteration += 1
        if not all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)):
            warnings.warn(f"iteration {self.iteration - 1}: non-finite metrics {metrics}", stacklevel=2)
        return metrics

    # ------------------------------------------------------------------ entry points
    @_in_backend
    def train(self) -> list[dict]:
        """Iterate to cfg.iterations: metrics.jsonl (+ report_to), a checkpoint every save_every iterations and
        at the end, curves.png. Returns the metrics of every iteration (a resumed run includes the earlier)."""
        cfg, out = self.cfg, Path(self.cfg.out)
        if not self.par.is_main:
            return self._train_other_rank()
        out.mkdir(parents=True, exist_ok=True)
        for p in checkpoint.clean_stale(out):
            self.log(f"removed {p.name} (left by an interrupted run)")
        metrics = list(self.history)
        write_metrics(out / "metrics.jsonl", metrics)
        if getattr(self, "info", None):
            (out / "setup.json").write_text(json.dumps(self.info, indent=2))
        reporters = Reporters(out, report_targets(cfg.report_to), dataclasses.asdict(cfg), run_name=out.name)
        progress = Progress(cfg.iterations, self.iteration, f"fastppo {cfg.mode}", cfg.progress, cfg.log_every,
                            self.log)
        log = progress.around(self.log)
        try:
            with phase(f"{cfg.mode}: iterations {self.iteration}..{cfg.iterations}", log):
                while self.iteration < cfg.iterations:
                    m = self.train_iteration()
                    metrics.append(m)
                    reporters.log(m)
                    progress.update(m)
                    if self.iteration % cfg.save_every == 0 or self.iteration == cfg.iterations:
                        self.save()
        finally:
            progress.close()
            reporters.close()
        self.history = metrics
        try:
            from .plot import plot_curves

            plot_curves(metrics, out / "curves.png", label=out.name)
        except ImportError:
            self.log("curves.png skipped: matplotlib is not installed (pip install matplotlib; then "
                     f"`fastppo plot {out}`)")
        return metrics

    def _train_other_rank(self) -> list[dict]:
        """train() on ranks other than 0: the same iterations and checkpoint collectives, no files."""
        cfg = self.cfg
        metrics = list(self.history)
        while self.iteration < cfg.iterations:
            metrics.append(self.train_iteration())
            if self.iteration % cfg.save_every == 0 or self.iteration == cfg.iterations:
                self.save()
        self.history = metrics
        return metrics

    def save(self) -> Path:
        """A checkpoint of the current iteration in cfg.out (policy, or only its LoRA adapter, with the
        tokenizer; critic; optimiser and controller state; configuration), rotated to keep_checkpoints.
        Data parallel: every rank calls it (FSDP2 gathers the full weights and optimiser state), rank 0 writes."""
        cfg = self.cfg
        models = {"policy": self.par.savable(self.policy), "critic": self.par.savable(self.critic)}
        config = {**dataclasses.asdict(cfg), "fastppo_version": _version()}
        state = self.state_dict()
        path = Path(cfg.out) / f"checkpoint-{self.iteration:06d}"
        if self.par.is_main:
            path = checkpoint.save(Path(cfg.out), self.iteration, models, state, config, cfg.keep_checkpoints,
                                   tokenizer=self.tokenizer)
        self.par.barrier()
        return path

    @torch.no_grad()
    @_in_backend
    def evaluate(self, batches: int = 1, seed: int | None = None) -> dict:
        """Rollouts with the current policy and no update: mean reward, task score (if known), KL to the
        reference and response length over `batches` batches of cfg.batch_size, from generator seed `seed`
        (default: fixed per run, so successive evaluations compare the same prompts)."""
        cfg = self.cfg
        seed = cfg.seed * 7919 + 999_983 if seed is None else seed
        generator = torch.Generator().manual_seed(seed)
        totals: dict[str, float] = {}
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)   # sampling: reproducible, and the training RNG stream is left as it was
            rollouts = [self.rollout(generator) for _ in range(batches)]
        for ro in rollouts:
            kl = kl_penalty(ro.old_logprobs, ro.ref_logprobs, cfg.kl_kind)
            row = {"reward_mean": ro.scores.mean().item(), "kl_mean": (kl * ro.mask).sum(1).mean().item(),
                   "response_length": ro.mask.sum().item() / cfg.batch_size}
            if ro.task_scores is not None:
                row["task_score_mean"] = ro.task_scores.mean().item()
            for k, v in row.items():
                totals[k] = totals.get(k, 0.0) + v / batches
        return totals

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "skipped_steps": self.skipped_steps,
                "policy_opt": self.par.optimizer_state(self.policy, self.policy_opt),
                "critic_opt": None if self.critic_opt is None else self.par.optimizer_state(self.critic,
                                                                                          self.critic_opt),
                "kl_ctl": self.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict):
        self.iteration, self.skipped_steps = int(state["iteration"]), int(state["skipped_steps"])
        self.par.load_optimizer_state(self.policy, self.policy_opt, state["policy_opt"])
        if self.critic_opt is not None and state["critic_opt"] is not None:
            self.par.load_optimizer_state(self.critic, self.critic_opt, state["critic_opt"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("fastppo")
    except Exception:
        return "unknown"
