"""`fastppo train`: PPO / GRPO with Hugging Face models; with no model paths, the embedded demo.

    fastppo train                                   # demo: tiny Llama models, toy QA task, CPU
    fastppo train --mode grpo --iterations 40
    fastppo train config.yaml                       # every flag from a JSON / YAML file
    fastppo train --resume runs/demo                # continue from the last checkpoint
    fastppo train --policy DIR --reward DIR --prompts prompts.jsonl [--critic DIR] [--ref DIR]
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path

import torch

from . import checkpoint
from .config import TrainConfig


def parse_config(argv) -> TrainConfig:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(TrainConfig, description=__doc__)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        path = Path(argv[0])
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        (cfg,) = (parser.parse_json_file(path) if path.suffix == ".json" else parser.parse_yaml_file(path))
    else:
        (cfg,) = parser.parse_args_into_dataclasses(args=argv)
    return cfg.validate()


def _device(cfg):
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device=cuda but CUDA is not available")
    return torch.device(cfg.device)


def build_demo(cfg, device, resume_from=None, log=print):
    """(trainer kwargs, models to checkpoint, setup info) for the embedded demo."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

    from . import demo

    task = demo.ToyTask(cfg.seed)
    info = {}
    if resume_from is None:
        policy, reward, critic = demo.build_models(cfg.seed)
        info["reward_model_accuracy"] = demo.train_reward_model(task, reward, cfg.reward_steps, cfg.seed)
        log(f"reward model: {cfg.reward_steps} Bradley-Terry steps, held-out pair accuracy "
            f"{info['reward_model_accuracy']:.3f}")
        demo.warm_up_policy(task, policy, cfg.sft_steps, cfg.seed)
        log(f"policy: {cfg.sft_steps} warm-up steps on the answer format")
        import copy

        ref = copy.deepcopy(policy)
    else:
        policy = AutoModelForCausalLM.from_pretrained(resume_from / "policy")
        ref = AutoModelForCausalLM.from_pretrained(resume_from / "ref")
        reward = AutoModelForSequenceClassification.from_pretrained(resume_from / "reward")
        critic = (AutoModelForTokenClassification.from_pretrained(resume_from / "critic")
                  if (resume_from / "critic").exists() else demo.build_models(cfg.seed)[2])
    policy, ref, reward, critic = (m.to(device) for m in (policy, ref, reward, critic))

    def prompt_fn(n, generator, group_size):
        return task.prompts(n, generator, group_size)

    kwargs = dict(policy=policy, ref=ref, reward_model=reward, critic=critic, prompt_fn=prompt_fn,
                  eos_id=demo.EOS, pad_id=demo.PAD, task_score_fn=task.score)
    models = {"policy": policy, "ref": ref, "reward": reward, "critic": critic if cfg.mode == "ppo" else None}
    return kwargs, models, info


def build_real(cfg, device, resume_from=None, log=print):
    """Local Hugging Face checkpoints with their tokenizer; prompts from a JSONL file."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    tok = AutoTokenizer.from_pretrained(cfg.policy)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    prompts = [json.loads(line)["prompt"] for line in Path(cfg.prompts).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {cfg.prompts} holds no prompts")
    src = resume_from if resume_from is not None else None
    policy = AutoModelForCausalLM.from_pretrained(src / "policy" if src else cfg.policy)
    ref = AutoModelForCausalLM.from_pretrained(src / "ref" if src else (cfg.ref or cfg.policy))
    reward = AutoModelForSequenceClassification.from_pretrained(cfg.reward, num_labels=1)
    critic = None
    if cfg.mode == "ppo":
        critic_path = src / "critic" if src else (cfg.critic or cfg.policy)
        critic = AutoModelForTokenClassification.from_pretrained(critic_path, num_labels=1)
    for m in (policy, ref, reward, critic):
        if m is not None:
            m.config.pad_token_id = tok.pad_token_id
    policy, ref, reward = policy.to(device), ref.to(device), reward.to(device)
    critic = None if critic is None else critic.to(device)

    def prompt_fn(n, generator, group_size):
        idx = torch.randint(0, len(prompts), (n // group_size,), generator=generator).repeat_interleave(group_size)
        enc = tok([prompts[i] for i in idx.tolist()], return_tensors="pt", padding=True)
        return enc["input_ids"], enc["attention_mask"]

    kwargs = dict(policy=policy, ref=ref, reward_model=reward, critic=critic, prompt_fn=prompt_fn,
                  eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    return kwargs, {"policy": policy, "ref": ref, "critic": critic}, {}


def plot_curves(metrics: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("reward_mean", "task_score_mean", "kl_mean", "entropy", "policy_loss", "value_loss",
                        "clipfrac") if any(k in m for m in metrics)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3))
    for ax, key in zip(axes, keys):
        ax.plot([m["iteration"] for m in metrics if key in m], [m[key] for m in metrics if key in m])
        ax.set_title(key)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg: TrainConfig, log=print) -> list[dict]:
    """Train; returns the metrics of every iteration (resumed runs include the earlier ones)."""
    import transformers

    import fastppo

    from .ppo import PPOTrainer

    transformers.utils.logging.disable_progress_bar()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    fastppo.set_backend(cfg.backend)
    device = _device(cfg)
    resume_from = checkpoint.latest(Path(cfg.resume)) if cfg.resume else None
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    builder = build_demo if cfg.policy is None else build_real
    kwargs, models, info = builder(cfg, device, resume_from, log)
    trainer = PPOTrainer(cfg, **kwargs)
    metrics = []
    metrics_path = out / "metrics.jsonl"
    if resume_from is not None:
        trainer.load_state_dict(checkpoint.load_state(resume_from))
        previous = Path(cfg.resume) / "metrics.jsonl"
        if previous.exists():
            metrics = [json.loads(line) for line in previous.read_text().splitlines() if line.strip()]
            metrics = [m for m in metrics if m["iteration"] < trainer.iteration]
        log(f"resumed from {resume_from} at iteration {trainer.iteration}")
    metrics_path.write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if info:
        (out / "setup.json").write_text(json.dumps(info, indent=2))

    from tqdm import tqdm

    bar = tqdm(total=cfg.iterations, initial=trainer.iteration, desc=f"fastppo {cfg.mode}",
               disable=not cfg.progress, file=sys.stderr)
    while trainer.iteration < cfg.iterations:
        m = trainer.train_iteration()
        metrics.append(m)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(m) + "\n")
        bar.set_postfix({k: round(m[k], 3) for k in ("reward_mean", "task_score_mean", "kl_mean", "clipfrac")
                         if k in m})
        bar.update(1)
        if trainer.iteration % cfg.save_every == 0 or trainer.iteration == cfg.iterations:
            checkpoint.save(out, trainer.iteration, models, trainer.state_dict(), dataclasses.asdict(cfg),
                            cfg.keep_checkpoints)
    bar.close()
    plot_curves(metrics, out / "curves.png")
    return metrics


def summarize(metrics: list[dict]) -> str:
    n = max(1, len(metrics) // 5)
    lines = []
    for key in ("task_score_mean", "reward_mean", "kl_mean"):
        if metrics and key in metrics[0]:
            first = sum(m[key] for m in metrics[:n]) / n
            last = sum(m[key] for m in metrics[-n:]) / n
            lines.append(f"{key}: first fifth {first:.3f} -> last fifth {last:.3f} ({last - first:+.3f})")
    return "\n".join(lines)


def main(argv=None) -> int:
    import time

    try:
        cfg = parse_config(list(sys.argv[1:] if argv is None else argv))
    except ValueError as e:
        print(f"fastppo train: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    metrics = run(cfg)
    print(summarize(metrics))
    print(f"wrote {cfg.out}/metrics.jsonl, curves.png and checkpoints in {time.perf_counter() - start:.0f} s")
    return 0
