"""Configuration of `fastppo train`, parsed by transformers' HfArgumentParser (flags, or a JSON /
YAML file), validated with clear errors before any model is built, saved with every checkpoint and
restored on `--resume`."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass, field

from ..modes import AGG_MODES, KL_KINDS
from ..options import LossOptions


@dataclass
class TrainConfig:
    # run
    out: str = field(default="runs/demo", metadata={"help": "output folder: metrics.jsonl, curves.png, checkpoints"})
    seed: int = field(default=0, metadata={"help": "seed; a run is reproducible from it, resumed or not"})
    iterations: int = field(default=100, metadata={"help": "rollout + update iterations"})
    mode: str = field(default="ppo", metadata={
        "help": "ppo (critic + GAE), grpo (group advantages, no critic) or distill (on-policy distillation from "
                "--teacher: the policy samples, the loss is fastppo.linear_divergence to the teacher on its samples)"})
    resume: str | None = field(default=None, metadata={"help": "continue from the last checkpoint in this folder"})
    overwrite: bool = field(default=False, metadata={
        "help": "a fresh run into an --out that holds a run deletes that run's files first (without it: refused)"})
    save_every: int = field(default=10, metadata={"help": "checkpoint every N iterations (and at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many checkpoints to keep"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    backend: str | None = field(default=None, metadata={"help": "force the fastppo backend: torch or triton"})
    progress: bool = field(default=True, metadata={
        "help": "progress: a tqdm bar on a terminal, plain periodic lines otherwise; false: silent"})
    log_every: int = field(default=10, metadata={"help": "plain progress line every N iterations (not a terminal)"})
    report_to: str = field(default="none", metadata={
        "help": "also log metrics (TRL names) to: none, tensorboard, wandb or tensorboard,wandb"})
    parallel: str = field(default="none", metadata={
        "help": "data parallelism under torchrun: none, ddp (DistributedDataParallel) or fsdp2 (fully_shard)"})
    grad_accum: int = field(default=1, metadata={
        "help": "micro-batches per minibatch on each rank (gradient accumulation; same loss as one pass)"})
    keep_dropout: bool = field(default=False, metadata={
        "help": "keep the models' dropout (default: off in policy, reference, reward model and critic, as TRL)"})
    bf16: bool = field(default=False, metadata={
        "help": "bfloat16 autocast for the policy / reference / reward / critic forwards (fp32 master weights)"})
    # rollouts
    batch_size: int = field(default=64, metadata={"help": "sequences per iteration"})
    group_size: int = field(default=8, metadata={"help": "grpo: samples per prompt"})
    max_new_tokens: int = field(default=4, metadata={"help": "response length limit"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (the loss uses the same)"})
    top_k: int = field(default=0, metadata={
        "help": "sample from the top-k tokens only (0: off; vLLM's V1 sampler order: temperature, min-p, top-k, "
                "top-p)"})
    top_p: float = field(default=1.0, metadata={
        "help": "sample from the smallest set of tokens holding probability top_p (1: off; after top-k)"})
    min_p: float = field(default=0.0, metadata={
        "help": "sample only from tokens with probability >= min_p x the row's largest (0: off; before top-k)"})
    kept_logprobs: bool | None = field(default=None, metadata={
        "help": "renormalise the policy's log-probs (old, new, mismatch metrics) over the sampler's kept set of "
                "each token, so they are the sampler's (default: true when --top_k / --top_p / --min_p filter; "
                "false: over the whole vocabulary, the mismatch_* metrics then show the gap). The reference's "
                "(and teacher's) log-probs always use the whole vocabulary"})
    # optimisation
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each batch"})
    minibatches: int = field(default=2, metadata={"help": "minibatches per pass"})
    lr: float = field(default=1e-3, metadata={"help": "policy learning rate (AdamW)"})
    critic_lr: float = field(default=1e-3, metadata={"help": "critic learning rate (AdamW)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    pack: bool = field(default=True, metadata={
        "help": "feed the losses packed tokens (the valid response tokens end to end, cu_seqlens; no padding); "
                "false: the padded [batch, max_new_tokens] layout (the same numbers)"})
    clip_low: float = field(default=0.2, metadata={"help": "PPO clip (lower)"})
    clip_high: float | None = field(default=None, metadata={"help": "PPO clip (upper); default clip_low"})
    dual_clip: float | None = field(default=None, metadata={"help": "dual-clip constant c > 1"})
    vf_clip: float | None = field(default=0.2, metadata={"help": "value clip"})
    entropy_coef: float = field(default=0.0, metadata={"help": "entropy bonus"})
    policy_loss: str = field(default="ppo", metadata={
        "help": "policy-loss variant: ppo, gspo, gspo_token, cispo, sapo, gmpo, gpg, dppo_tv, dppo_kl, clip_cov, "
                "kl_cov or vespo with their defaults (see fastppo.ppo_policy_loss; dro needs dro_beta, not a "
                "trainer option)"})
    ratio_max: float | None = field(default=None, metadata={"help": "ppo: cap on the unclipped ratio (> 1)"})
    sapo_tau_pos: float = field(default=1.0, metadata={"help": "sapo: temperature for positive advantages"})
    sapo_tau_neg: float = field(default=1.05, metadata={"help": "sapo: temperature for negative advantages"})
    entropy_quantile: float | None = field(default=None, metadata={
        "help": "train only on the highest-entropy fraction of tokens, in (0, 1] (None: every token)"})
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
    teacher: str | None = field(default=None, metadata={
        "help": "distill: local AutoModelForCausalLM folder of the teacher (the policy's vocabulary)"})
    distill_beta: float = field(default=1.0, metadata={
        "help": "distill: 0 forward KL(teacher || student), 1 reverse KL(student || teacher), between: the "
                "generalised JSD (TRL's beta)"})
    distill_loss: str = field(default="divergence", metadata={
        "help": "distill: divergence (the token mean of --distill_beta's divergence to the teacher, from both "
                "models' hidden states) or advantage (A_t = -(log p_student - log p_teacher) at the sampled token, "
                "the per-token reverse KL to the teacher, fed to the PPO policy loss: prime-rl / Thinking "
                "Machines' on-policy distillation)"})
    prompts: str | None = field(default=None, metadata={
        "help": "prompts: a JSONL / JSON / Parquet / CSV file, a folder saved by datasets, or a datasets hub name "
                "(hub:owner/name when it has a '/'; a missing local path is an error, never a hub request)"})
    prompts_column: str = field(default="prompt", metadata={"help": "column (JSONL field) holding the prompt text"})
    prompts_split: str = field(default="train", metadata={"help": "split of a datasets dataset"})
    reward_funcs: list[str] = field(default_factory=list, metadata={
        "help": "Python reward functions module:function, called as f(prompts=[str], completions=[str], "
                "completion_ids=[[int]]) -> [float]; added to the reward model's score (if any)"})
    reward_weights: list[float] = field(default_factory=list, metadata={
        "help": "one weight per --reward_funcs entry (default 1 each)"})
    # LoRA (needs peft: pip install 'fastppo[lora]')
    lora_r: int = field(default=0, metadata={"help": "LoRA rank of the policy (0: full fine-tuning); the reference "
                                                      "is then the base model with the adapter disabled"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha"})
    lora_targets: str = field(default="all-linear", metadata={
        "help": "comma-separated module names to adapt (e.g. q_proj,v_proj), or all-linear"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    # demo
    sft_steps: int = field(default=150, metadata={"help": "demo: supervised warm-up steps of the policy"})
    reward_steps: int = field(default=400, metadata={"help": "demo: Bradley-Terry steps of the reward model"})
    teacher_steps: int = field(default=300, metadata={
        "help": "distillation demo (--mode distill, no --policy): supervised steps of its teacher on the right "
                "answers"})

    def validate(self):
        """Check every value (types, ranges, finiteness, files and folders, optional packages) and fill the
        derived defaults; raises ValueError naming the flag. Builds nothing and contacts no server."""

        def bad(name, why):
            raise ValueError(f"--{name}={getattr(self, name)!r}: {why}")

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                bad(f.name, "must be finite")
        if self.mode not in ("ppo", "grpo", "distill"):
            bad("mode", "must be ppo, grpo or distill")
        if not 0 <= self.distill_beta <= 1:
            bad("distill_beta", "must be in [0, 1]")
        if self.distill_loss not in ("divergence", "advantage"):
            bad("distill_loss", "must be divergence or advantage")
        if self.top_k < 0:
            bad("top_k", "must be >= 0 (0: off)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1] (1: off)")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1] (0: off)")
        if self.kept_logprobs and not self.sampler_filters:
            bad("kept_logprobs", "needs --top_k, --top_p or --min_p (without a filter the sampler keeps the whole "
                                 "vocabulary)")
        for name in ("iterations", "batch_size", "max_new_tokens", "ppo_epochs", "minibatches", "save_every",
                     "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("sft_steps", "reward_steps", "teacher_steps", "seed", "lora_r"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.batch_size % self.minibatches:
            bad("minibatches", f"must divide batch_size={self.batch_size}")
        self._validate_parallel(bad)
        if self.mode == "grpo" and (self.group_size < 2 or self.batch_size % self.group_size):
            bad("group_size", f"grpo needs group_size >= 2 dividing batch_size={self.batch_size}")
        for name in ("lr", "critic_lr", "temperature", "max_grad_norm", "kl_horizon", "lora_alpha"):
            if not getattr(self, name) > 0:
                bad(name, "must be > 0")
        if self.vf_clip is not None and not self.vf_clip > 0:
            bad("vf_clip", "must be > 0 (leave it unset for no value clipping)")
        if self.kl_target is not None and not self.kl_target > 0:
            bad("kl_target", "must be > 0 (leave it unset for a fixed KL coefficient)")
        for name in ("kl_coef", "entropy_coef"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", "must be in [0, 1)")
        if self.kl_kind is None:
            self.kl_kind = default_kl_kind(self.mode)
        try:   # the loss options are validated where the losses validate them (fastppo.options)
            LossOptions.policy(clip_low=self.clip_low, clip_high=self.clip_high, dual_clip=self.dual_clip,
                               agg=self.agg, kl_kind=self.kl_kind, kl_coef=self.kl_coef,
                               entropy_coef=self.entropy_coef, policy_loss=self.policy_loss,
                               ratio_max=self.ratio_max, sapo_tau_pos=self.sapo_tau_pos,
                               sapo_tau_neg=self.sapo_tau_neg, entropy_quantile=self.entropy_quantile)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--{e}") from None
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                bad(name, "must be in [0, 1]")
        if self.device not in ("auto", "cpu", "cuda"):
            bad("device", "must be auto, cpu or cuda")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                bad("device", "CUDA is not available")
        if self.backend not in (None, "torch", "triton"):
            bad("backend", "must be torch or triton")
        self._validate_reporting(bad)
        self._validate_sources(bad)
        return self

    @property
    def sampler_filters(self) -> bool:
        """Whether the sampler drops tokens (--top_k, --top_p or --min_p)."""
        return self.top_k > 0 or self.top_p < 1 or self.min_p > 0

    @property
    def use_kept(self) -> bool:
        """Whether the policy's log-probs are renormalised over the sampler's kept sets (--kept_logprobs,
        default: when the sampler filters)."""
        return self.sampler_filters if self.kept_logprobs is None else bool(self.kept_logprobs)

    def _validate_parallel(self, bad):
        from .parallel import KINDS

        if self.parallel not in KINDS:
            bad("parallel", f"must be one of {KINDS}")
        if self.grad_accum < 1:
            bad("grad_accum", "must be >= 1")
        world = int(os.environ.get("WORLD_SIZE", "1")) if self.parallel != "none" else 1
        if (self.batch_size // self.minibatches) % (world * self.grad_accum):
            bad("grad_accum", f"batch_size / minibatches = {self.batch_size // self.minibatches} rows must split into "
                              f"world size {world} x grad_accum {self.grad_accum} micro-batches")
        if self.parallel != "none" and self.lora_r:
            bad("parallel", "LoRA policies are trained in one process (--lora_r with --parallel is not supported)")

    def _validate_reporting(self, bad):
        targets = report_targets(self.report_to)
        for t in targets:
            if t not in ("tensorboard", "wandb"):
                bad("report_to", "must be none, tensorboard, wandb or a comma-separated list of them")
        if "tensorboard" in targets and importlib.util.find_spec("tensorboard") is None:
            bad("report_to", "needs the tensorboard package: pip install 'fastppo[tensorboard]'")
        if "wandb" in targets and importlib.util.find_spec("wandb") is None:
            bad("report_to", "needs the wandb package: pip install 'fastppo[wandb]'")

    def _validate_sources(self, bad):
        for name in ("policy", "reward", "critic", "ref", "teacher"):
            path = getattr(self, name)
            if path is not None and not os.path.isdir(path):
                bad(name, "no such folder (fastppo train loads local save_pretrained folders only, never a hub id: "
                          "download the model first, e.g. `huggingface-cli download ID --local-dir DIR`)")
        if (self.policy is None) != (self.prompts is None):
            bad("policy" if self.policy is None else "prompts", "--policy and --prompts go together")
        if self.policy is None and (self.reward or self.critic or self.ref):
            bad("policy", "--reward / --critic / --ref need --policy (without them: the embedded demo)")
        if self.teacher is not None and self.mode != "distill":
            bad("teacher", "--mode distill and --teacher go together")
        if self.mode == "distill" and self.policy is not None and self.teacher is None:
            bad("teacher", "--mode distill and --teacher go together (without --policy: the distillation demo, "
                           "which trains its own teacher)")
        if self.teacher is not None and self.policy is None:
            bad("teacher", "--teacher needs --policy and --prompts (without them --mode distill runs the "
                           "distillation demo, which trains its own teacher)")
        if self.mode == "distill" and self.lora_r:
            bad("lora_r", "--mode distill trains the full policy (LoRA is not supported there)")
        if self.policy is not None and self.reward is None and not self.reward_funcs and self.mode != "distill":
            bad("reward", "a real policy needs --reward (a reward model folder) or --reward_funcs")
        for spec in self.reward_funcs:
            module, _, func = spec.partition(":")
            if not module or not func or not all(p.isidentifier() for p in module.split(".") + func.split(".")):
                bad("reward_funcs", f"{spec!r} is not module:function")
        if self.reward_weights and len(self.reward_weights) != len(self.reward_funcs):
            bad("reward_weights", f"needs one weight per --reward_funcs entry ({len(self.reward_funcs)})")
        if self.lora_r and importlib.util.find_spec("peft") is None:
            bad("lora_r", "LoRA needs the peft package: pip install 'fastppo[lora]'")
        if self.lora_r and self.ref is not None:
            bad("ref", "with LoRA the reference is the base model with the adapter disabled; drop --ref")
        if not self.lora_targets.strip() or any(not t.strip() for t in self.lora_targets.split(",")):
            bad("lora_targets", "must be all-linear or comma-separated module names")


def default_kl_kind(mode: str) -> str:
    return "k1" if mode == "ppo" else "low_var_kl"


def report_targets(report_to: str) -> list[str]:
    return [t.strip() for t in str(report_to).split(",") if t.strip() and t.strip() != "none"]


# Flags that may differ from a checkpoint's configuration on --resume (logged as an override); any other
# contradicting flag is an error, since it would silently change the run being continued.
MAY_CHANGE_ON_RESUME = frozenset({"iterations", "save_every", "keep_checkpoints", "progress", "log_every",
                                  "report_to", "out", "resume", "overwrite", "device", "backend"})


def explicit_fields(cfg: TrainConfig) -> set[str]:
    """Fields set away from their defaults (the API's notion of "given"; the CLI knows its flags)."""
    given = set()
    for f in dataclasses.fields(cfg):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = getattr(cfg, f.name)
        if f.name == "kl_kind" and value == default_kl_kind(cfg.mode):
            continue
        if value != default:
            given.add(f.name)
    return given


def merge_for_resume(cfg: TrainConfig, saved: dict, explicit: set[str] | None, source, log=print) -> TrainConfig:
    """The checkpoint's configuration, with the flags given now: a flag that contradicts the saved value is a
    ValueError unless it is in MAY_CHANGE_ON_RESUME (then a logged override). `--out` defaults to the resumed
    folder."""
    given = explicit_fields(cfg) if explicit is None else set(explicit)
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(saved) - names - {"fastppo_version"})
    if unknown:
        raise ValueError(f"{source}: unknown configuration keys {unknown} (written by another fastppo version?)")
    merged = dataclasses.replace(cfg)
    for name in sorted(names & set(saved)):
        now, then = getattr(cfg, name), saved[name]
        if name in ("resume", "overwrite"):   # what this invocation does, never restored
            continue
        if name not in given:
            setattr(merged, name, then)
        elif now != then:
            if name not in MAY_CHANGE_ON_RESUME:
                raise ValueError(f"--{name}={now!r} contradicts the resumed run's {name}={then!r} ({source}); "
                                 f"drop the flag to continue that run, or start a fresh run in another --out")
            if name != "out":
                log(f"resume: overriding {name}={then!r} with {now!r}")
    if "out" not in given:
        merged.out = str(cfg.resume)
    return merged.validate()
