"""Model set-up for `fastppo train`: the embedded demo or local Hugging Face folders, fresh or from a checkpoint,
optionally with a LoRA adapter on the policy (peft). Everything is loaded from local folders with
local_files_only=True: never a hub request."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint
from .reporting import phase


@dataclass
class Setup:
    """What PPOTrainer needs, plus the set-up facts (`info`)."""

    policy: object
    ref: object
    reward_model: object
    critic: object
    prompt_fn: object
    eos_id: int
    pad_id: int
    decode: object
    task_score_fn: object = None
    tokenizer: object = None
    teacher: object = None
    info: dict = field(default_factory=dict)


def _load(cls, path, **kw):
    """cls.from_pretrained of a local folder; a folder that cannot be loaded (truncated or corrupt safetensors,
    a pickle where weights belong, which is never executed) is a ValueError naming it."""
    try:
        return cls.from_pretrained(str(path), local_files_only=True, **kw)
    except Exception as e:   # safetensors, pickle, OSError, ValueError: every way a folder can be unloadable
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: cannot load it as {cls.__name__} ({type(e).__name__}: {first}); the weights are "
                         f"truncated, corrupt or not safetensors (pickles are never unpickled): re-save or "
                         f"re-download the folder") from None


def disable_dropout(model) -> None:
    """Dropout off in `model` (TRL's disable_dropout_in_model, and the config): every nn.Dropout's p = 0, every
    float `*dropout` attribute of a module or of the config = 0. A peft model's `lora_dropout` modules are the
    adapter's own (--lora_dropout) and stay as set."""
    if model is None:
        return
    configs = []
    for name, module in model.named_modules():
        if "lora_dropout" in name:
            continue
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr, value in list(vars(module).items()):
            if attr.endswith("dropout") and isinstance(value, float):
                setattr(module, attr, 0.0)
        if getattr(module, "config", None) is not None and hasattr(module.config, "to_dict"):
            configs.append(module.config)
    for config in configs:
        for attr, value in config.to_dict().items():
            if attr.endswith("dropout") and isinstance(value, float):
                setattr(config, attr, 0.0)


def apply_lora(cfg, base, adapter_dir: Path | None = None):
    """base wrapped in a peft LoRA adapter: fresh (rank cfg.lora_r) or loaded from adapter_dir (trainable)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_dir is not None:
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    targets = cfg.lora_targets.strip()
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(base, lcfg)
    except ValueError as e:
        raise ValueError(f"--lora_targets={cfg.lora_targets!r}: {e}") from None


def build_demo(cfg, out: Path, resume_from: Path | None = None, run_dir: Path | None = None, log=print) -> Setup:
    """The embedded demo. Fresh: train the reward model (--mode distill: the teacher instead) and warm up the
    policy (timed phases); the reference is the warmed-up policy; the frozen models are written once to
    out/frozen (before a LoRA adapter is added).
    Resumed: the frozen models from the resumed run folder, the policy / critic from the checkpoint."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

    from . import demo

    task = demo.ToyTask(cfg.seed)
    info = {}
    distill = cfg.mode == "distill"
    teacher = None
    if resume_from is None:
        policy, reward, critic = demo.build_models(cfg.seed)
        if distill:   # the distillation demo: a teacher instead of a reward model (the task score is logged)
            reward = None
            teacher = demo.build_models(cfg.seed + 1)[0]
            with phase(f"teacher: {cfg.teacher_steps} supervised steps on the right answers", log) as ph:
                info["teacher_accuracy"] = demo.train_teacher(task, teacher, cfg.teacher_steps, cfg.seed)
                ph["detail"] = f"greedy accuracy on the {demo.N_ITEMS} items {info['teacher_accuracy']:.3f}"
        else:
            with phase(f"reward model: {cfg.reward_steps} Bradley-Terry steps", log) as ph:
                info["reward_model_accuracy"] = demo.train_reward_model(task, reward, cfg.reward_steps, cfg.seed)
                ph["detail"] = f"held-out pair accuracy {info['reward_model_accuracy']:.3f}"
        with phase(f"warm-up: {cfg.sft_steps} supervised steps of the policy on the answer format", log):
            demo.warm_up_policy(task, policy, cfg.sft_steps, cfg.seed)
        checkpoint.save_frozen(out, {"ref": policy, "reward": reward, "teacher": teacher},
                               tokenizer=demo.tokenizer())
        ref = None if cfg.lora_r else copy.deepcopy(policy)
        if cfg.lora_r:
            policy = apply_lora(cfg, policy)
    else:
        fdir = checkpoint.frozen_dir(run_dir, resume_from)
        reward = None if distill else _load(AutoModelForSequenceClassification, fdir / "reward")
        teacher = _load(AutoModelForCausalLM, fdir / "teacher") if distill else None
        ref = _load(AutoModelForCausalLM, fdir / "ref")
        if cfg.lora_r:
            policy, ref = apply_lora(cfg, ref, resume_from / "policy"), None
        else:
            policy = _load(AutoModelForCausalLM, resume_from / "policy")
        critic = (_load(AutoModelForTokenClassification, resume_from / "critic")
                  if (resume_from / "critic").exists() else demo.build_models(cfg.seed)[2])
        checkpoint.copy_frozen(fdir, out)

    def prompt_fn(n, generator, group_size):
        return task.prompts(n, generator, group_size)

    return Setup(policy=policy, ref=ref, reward_model=reward, critic=critic if cfg.mode == "ppo" else None,
                 prompt_fn=prompt_fn, eos_id=demo.EOS, pad_id=demo.PAD, decode=demo.decode,
                 task_score_fn=task.score, tokenizer=demo.tokenizer(), teacher=teacher, info=info)


def build_real(cfg, prompts: list[str], resume_from: Path | None = None, log=print) -> Setup:
    """Local Hugging Face folders with the policy's tokenizer (left padding). The reference is cfg.ref, or the
    policy folder as it was at the start (nothing to save: both are on disk), or with LoRA the base model with
    the adapter disabled."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    src = resume_from
    with phase("loading models", log):
        tok_dir = src / "policy" if src is not None and (src / "policy" / "tokenizer_config.json").exists() \
            else Path(cfg.policy)
        tok = _load(AutoTokenizer, tok_dir)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        if cfg.lora_r:
            base = _load(AutoModelForCausalLM, cfg.policy)
            policy, ref = apply_lora(cfg, base, src / "policy" if src is not None else None), None
        else:
            policy = _load(AutoModelForCausalLM, src / "policy" if src is not None else cfg.policy)
            ref = _load(AutoModelForCausalLM, cfg.ref or cfg.policy)
        reward = _load(AutoModelForSequenceClassification, cfg.reward, num_labels=1) if cfg.reward else None
        teacher = _load(AutoModelForCausalLM, cfg.teacher) if cfg.teacher else None
        critic = None
        if cfg.mode == "ppo":
            critic_path = src / "critic" if src is not None else (cfg.critic or cfg.policy)
            critic = _load(AutoModelForTokenClassification, critic_path, num_labels=1)
    for m in (policy, ref, reward, critic, teacher):
        if m is not None:
            m.config.pad_token_id = tok.pad_token_id

    def prompt_fn(n, generator, group_size):
        idx = torch.randint(0, len(prompts), (n // group_size,), generator=generator).repeat_interleave(group_size)
        enc = tok([prompts[i] for i in idx.tolist()], return_tensors="pt", padding=True)
        return enc["input_ids"], enc["attention_mask"]

    def decode(ids) -> str:
        return tok.decode([int(t) for t in ids], skip_special_tokens=True)

    return Setup(policy=policy, ref=ref, reward_model=reward, critic=critic, prompt_fn=prompt_fn,
                 eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, decode=decode, tokenizer=tok, teacher=teacher)
