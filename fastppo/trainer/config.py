"""Configuration of `fastppo train`, parsed by transformers' HfArgumentParser (flags, or a JSON /
YAML file), validated with clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..modes import AGG_MODES, KL_KINDS
from ..options import LossOptions


@dataclass
class TrainConfig:
    # run
    out: str = field(default="runs/demo", metadata={"help": "output folder: metrics.jsonl, curves.png, checkpoints"})
    seed: int = field(default=0, metadata={"help": "seed; a run is reproducible from it, resumed or not"})
    iterations: int = field(default=100, metadata={"help": "rollout + update iterations"})
    mode: str = field(default="ppo", metadata={"help": "ppo (critic + GAE) or grpo (group advantages, no critic)"})
    resume: str | None = field(default=None, metadata={"help": "continue from the last checkpoint in this folder"})
    save_every: int = field(default=10, metadata={"help": "checkpoint every N iterations (and at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many checkpoints to keep"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    backend: str | None = field(default=None, metadata={"help": "force the fastppo backend: torch or triton"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    # rollouts
    batch_size: int = field(default=64, metadata={"help": "sequences per iteration"})
    group_size: int = field(default=8, metadata={"help": "grpo: samples per prompt"})
    max_new_tokens: int = field(default=4, metadata={"help": "response length limit"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (the loss uses the same)"})
    # optimisation
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each batch"})
    minibatches: int = field(default=2, metadata={"help": "minibatches per pass"})
    lr: float = field(default=1e-3, metadata={"help": "policy learning rate (AdamW)"})
    critic_lr: float = field(default=1e-3, metadata={"help": "critic learning rate (AdamW)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    clip_low: float = field(default=0.2, metadata={"help": "PPO clip (lower)"})
    clip_high: float | None = field(default=None, metadata={"help": "PPO clip (upper); default clip_low"})
    dual_clip: float | None = field(default=None, metadata={"help": "dual-clip constant c > 1"})
    vf_clip: float | None = field(default=0.2, metadata={"help": "value clip"})
    entropy_coef: float = field(default=0.0, metadata={"help": "entropy bonus"})
    agg: str = field(default="token-mean", metadata={"help": f"loss aggregation: {', '.join(AGG_MODES)}"})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    # KL to the reference
    kl_coef: float = field(default=0.02, metadata={"help": "KL coefficient (reward penalty in ppo, loss term in grpo)"})
    kl_kind: str | None = field(default=None, metadata={
        "help": f"KL estimator ({', '.join(KL_KINDS)}); default k1 in the ppo reward, low_var_kl in the grpo loss"})
    kl_target: float | None = field(default=None, metadata={"help": "adaptive KL controller target (None: fixed)"})
    kl_horizon: float = field(default=10000.0, metadata={"help": "adaptive KL controller horizon"})
    # models (no paths: the embedded demo)
    policy: str | None = field(default=None, metadata={"help": "local AutoModelForCausalLM folder"})
    reward: str | None = field(default=None, metadata={"help": "local AutoModelForSequenceClassification folder"})
    critic: str | None = field(default=None, metadata={"help": "local AutoModelForTokenClassification folder"})
    ref: str | None = field(default=None, metadata={"help": "reference model folder (default: frozen policy copy)"})
    prompts: str | None = field(default=None, metadata={"help": "JSONL file with a 'prompt' per line"})
    # demo
    sft_steps: int = field(default=150, metadata={"help": "demo: supervised warm-up steps of the policy"})
    reward_steps: int = field(default=400, metadata={"help": "demo: Bradley-Terry steps of the reward model"})

    def validate(self):
        def bad(name, why):
            raise ValueError(f"--{name}={getattr(self, name)!r}: {why}")

        if self.mode not in ("ppo", "grpo"):
            bad("mode", "must be ppo or grpo")
        for name in ("iterations", "batch_size", "max_new_tokens", "ppo_epochs", "minibatches", "save_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("sft_steps", "reward_steps"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.batch_size % self.minibatches:
            bad("minibatches", f"must divide batch_size={self.batch_size}")
        if self.mode == "grpo" and (self.group_size < 2 or self.batch_size % self.group_size):
            bad("group_size", f"grpo needs group_size >= 2 dividing batch_size={self.batch_size}")
        for name in ("lr", "critic_lr", "temperature", "max_grad_norm"):
            if not getattr(self, name) > 0:
                bad(name, "must be > 0")
        if self.kl_coef < 0 or self.entropy_coef < 0:
            bad("kl_coef" if self.kl_coef < 0 else "entropy_coef", "must be >= 0")
        if self.kl_kind is None:
            self.kl_kind = "k1" if self.mode == "ppo" else "low_var_kl"
        try:   # the loss options are validated where the losses validate them (fastppo.options)
            LossOptions.policy(clip_low=self.clip_low, clip_high=self.clip_high, dual_clip=self.dual_clip,
                               agg=self.agg, kl_kind=self.kl_kind, kl_coef=self.kl_coef,
                               entropy_coef=self.entropy_coef)
            LossOptions.value(clip=self.vf_clip, agg=self.agg)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--{e}") from None
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                bad(name, "must be in [0, 1]")
        if self.device not in ("auto", "cpu", "cuda"):
            bad("device", "must be auto, cpu or cuda")
        if self.backend not in (None, "torch", "triton"):
            bad("backend", "must be torch or triton")
        if (self.policy is None) != (self.prompts is None):
            bad("policy" if self.policy is None else "prompts", "--policy and --prompts go together")
        if self.policy is not None and self.reward is None:
            bad("reward", "a real policy needs --reward")
        return self
