"""`fastppo train`: PPO / GRPO / on-policy distillation with Hugging Face models; with no model paths, the
embedded demo.

    fastppo train                                   # demo: tiny Llama models, toy QA task, CPU
    fastppo train --mode grpo --iterations 40
    fastppo train --mode distill                    # distillation demo: a trained teacher, a student learns it
    fastppo train config.yaml                       # every flag from a JSON / YAML file
    fastppo train --resume runs/demo --iterations 200   # continue the run (its saved configuration)
    fastppo train --overwrite                       # start afresh in a folder holding a run (deletes that run)
    fastppo train --policy DIR --reward DIR --prompts prompts.jsonl [--critic DIR] [--ref DIR]
    fastppo train --policy DIR --reward_funcs mymod:score --prompts data.parquet --prompts_column question
    fastppo train --lora_r 8 --bf16 --report_to tensorboard
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from .config import TrainConfig

# re-exported for callers of the previous layout
from .plot import plot_curves  # noqa: F401


def _parser():
    from transformers import HfArgumentParser

    return HfArgumentParser(TrainConfig, prog="fastppo train", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)


def _given_flags(argv) -> set[str]:
    """Names of the config fields that appear on the command line (--name, --name=v, --no_name, dashed forms)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = set()
    for tok in argv:
        if not tok.startswith("--"):
            continue
        key = tok[2:].split("=", 1)[0].replace("-", "_")
        if key in names:
            given.add(key)
        elif key.startswith("no_") and key[3:] in names:
            given.add(key[3:])
    return given


def parse_config_and_flags(argv) -> tuple[TrainConfig, set[str]]:
    """(validated config, the fields the user set) from flags or a single JSON / YAML file."""
    import yaml

    parser = _parser()
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        path = Path(argv[0])
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            (cfg,) = parser.parse_json_file(path) if path.suffix == ".json" else parser.parse_yaml_file(path)
            keys = set(json.loads(path.read_text()) if path.suffix == ".json" else
                       yaml.safe_load(path.read_text()) or {})
        except (ValueError, TypeError) as e:
            raise ValueError(f"config file {path}: {e}") from None
        return cfg.validate(), keys
    (cfg,) = parser.parse_args_into_dataclasses(args=argv)
    return cfg.validate(), _given_flags(argv)


def parse_config(argv) -> TrainConfig:
    return parse_config_and_flags(argv)[0]


def run(cfg: TrainConfig, log=print, explicit: set[str] | None = None) -> list[dict]:
    """Train (PPOTrainer.from_config(cfg).train()); returns the metrics of every iteration (resumed runs include
    the earlier ones)."""
    import transformers

    from .ppo import PPOTrainer

    transformers.utils.logging.disable_progress_bar()
    return PPOTrainer.from_config(cfg, log=log, explicit=explicit).train()


def summarize(metrics: list[dict]) -> str:
    n = max(1, len(metrics) // 5)
    lines = []
    for key in ("task_score_mean", "reward_mean", "kl_mean", "teacher_kl", "entropy"):
        if metrics and key in metrics[0]:
            first = sum(m[key] for m in metrics[:n]) / n
            last = sum(m[key] for m in metrics[-n:]) / n
            lines.append(f"{key}: first fifth {first:.3f} -> last fifth {last:.3f} ({last - first:+.3f})")
    if metrics and "loss_tokens" in metrics[0]:
        used = sum(m["loss_tokens"] for m in metrics)
        padded = sum(m["loss_tokens_padded"] for m in metrics)
        lines.append(f"tokens reaching the losses: {used} (padded layout: {padded}; {1 - used / padded:.1%} saved)")
    return "\n".join(lines)


def _is_demo(cfg: TrainConfig) -> bool:
    """The embedded demo (no --policy), fresh or resumed."""
    if cfg.policy is not None:
        return False
    if not cfg.resume:
        return True
    from . import checkpoint

    try:
        return checkpoint.load_config(checkpoint.latest(Path(cfg.resume))).get("policy") is None
    except (ValueError, FileNotFoundError):
        return False   # from_config reports it


def _interrupted(out: Path) -> str:
    """The Ctrl-C line: where the last complete checkpoint is and how to continue."""
    from . import checkpoint

    try:
        last = checkpoint.latest(out)
    except FileNotFoundError:
        return f"fastppo train: interrupted before the first checkpoint in {out}; nothing to resume: run it again"
    return (f"fastppo train: interrupted; the last checkpoint is {last}: continue with "
            f"`fastppo train --resume {out}`")


def main(argv=None) -> int:
    """Exit status 0, or 2 with one line on stderr (what, where, what to do) for a bad flag or file, an output
    folder that cannot be written or holds another run, a model folder that cannot be loaded, a full disk,
    or Ctrl-C."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, given = parse_config_and_flags(argv)
    except ValueError as e:
        print(f"fastppo train: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)

    import os

    import torch
    import transformers

    from .launch import _device
    from .ppo import PPOTrainer

    transformers.utils.logging.disable_progress_bar()
    if _is_demo(cfg) and _device(cfg).type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # the demo's matrices are tiny: one intra-op thread is faster (25.6 s vs 31.2 s wall on an idle 2-core
        # box, 5x faster on a busy one) and gives the same numbers on any core count
        torch.set_num_threads(1)
    trainer = None
    try:
        trainer = PPOTrainer.from_config(cfg, log=log, explicit=given)
        metrics = trainer.train()
    except (ValueError, OSError) as e:   # checkpoint.WriteError is an OSError
        print(f"fastppo train: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = trainer.cfg.out if trainer is not None else (cfg.out if not cfg.resume or "out" in given
                                                            else cfg.resume)
        print(_interrupted(Path(out)), file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.par.close()
    if not trainer.par.is_main:
        return 0
    print(summarize(metrics))
    print(f"wrote {trainer.cfg.out}/metrics.jsonl, curves.png and checkpoints in {time.perf_counter() - start:.0f} s")
    return 0
