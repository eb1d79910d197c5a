"""Where a run's numbers go: metrics.jsonl (always), TensorBoard / Weights & Biases (`--report_to`, with TRL's
metric names where they mean the same thing), progress on the console, and timed phases."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

# fastppo metric -> the name TRL logs for the same quantity: TRL's PPOTrainer (trl 0.11-0.2x; trl 1.16, the
# installed version, no longer ships it) and the objective/* names that trl 1.16's online-DPO trainer still logs.
# Metrics without a TRL counterpart keep their own name.
TRL_NAMES = {
    "reward_mean": "objective/scores",          # mean reward-model / reward-function score per sequence
    "kl_mean": "objective/kl",                  # per-token KL summed over the response, mean over sequences
    "non_score_reward": "objective/non_score_reward",  # -kl_coef * kl_mean
    "rlhf_reward": "objective/rlhf_reward",     # scores + non_score_reward
    "entropy": "policy/entropy_avg",            # token-mean entropy of the policy during the update
    "clipfrac": "policy/clipfrac_avg",          # fraction of tokens whose ratio is clipped
    "approx_kl": "policy/approxkl_avg",
    "policy_loss": "loss/policy_avg",
    "value_loss": "loss/value_avg",
    "vf_clipfrac": "val/clipfrac_avg",
    "response_length": "objective/response_length",
}


def trl_name(key: str) -> str:
    return TRL_NAMES.get(key, key)


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl as a list; a torn last line (a crash mid-write) is dropped with a warning, a bad line
    elsewhere is a ValueError naming file:line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "iteration" not in row:
                raise ValueError("not a metrics object")
        except ValueError as e:
            if n == len(lines):
                warnings.warn(f"{path}:{n}: dropping a torn last line ({e})", stacklevel=2)
                break
            raise ValueError(f"{path}:{n}: not a metrics line ({e})") from None
        rows.append(row)
    return rows


def write_metrics(path: Path, rows: list[dict]):
    """Rewrite metrics.jsonl atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text("".join(json.dumps(m) + "\n" for m in rows))
    os.replace(tmp, path)


class Reporters:
    """metrics.jsonl plus the `report_to` targets."""

    def __init__(self, out: Path, targets: list[str], config: dict, run_name: str | None = None):
        self.path = Path(out) / "metrics.jsonl"
        self.tb = self.wandb = None
        if "tensorboard" in targets:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(out) / "tensorboard"))
        if "wandb" in targets:
            try:
                import wandb
            except ImportError:
                raise ValueError("--report_to wandb needs the wandb package: pip install 'fastppo[wandb]'") from None
            # offline unless the user configured W&B: a run on a machine without network still logs locally
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "fastppo"), dir=str(out), mode=mode,
                                    config=config, name=run_name, resume="allow")

    def log(self, m: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(m) + "\n")
        step = m["iteration"]
        scalars = {trl_name(k): v for k, v in m.items() if k != "iteration" and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def is_terminal(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    return hasattr(stream, "isatty") and stream.isatty()


class Progress:
    """A tqdm bar when stderr is a terminal; otherwise a plain line every `every` iterations (and the last)."""

    SHOWN = ("reward_mean", "task_score_mean", "kl_mean", "teacher_kl", "entropy", "clipfrac")

    def __init__(self, total: int, initial: int, desc: str, enabled: bool, every: int, log=print):
        self.total, self.every, self.log, self.enabled = total, every, log, enabled
        self.bar = None
        self.start = time.perf_counter()
        self.initial = initial
        if enabled and is_terminal():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr)

    def update(self, m: dict):
        shown = {k: round(m[k], 3) for k in self.SHOWN if k in m}
        if self.bar is not None:
            self.bar.set_postfix(shown)
            self.bar.update(1)
            return
        done = m["iteration"] + 1
        if self.enabled and (done % self.every == 0 or done == self.total):
            rate = (time.perf_counter() - self.start) / max(1, done - self.initial)
            fields = " ".join(f"{k}={v}" for k, v in shown.items())
            self.log(f"iteration {done}/{self.total} ({rate:.1f} s/it, ~{rate * (self.total - done):.0f} s left) "
                     f"{fields}")

    def around(self, log):
        """`log` for lines printed while the bar is shown: the bar is cleared first and redrawn below the line
        (tqdm's external_write_mode), so a line never runs into it."""
        if self.bar is None:
            return log

        def write(*args, **kwargs):
            with self.bar.external_write_mode():
                log(*args, **kwargs)

        return write

    def close(self):
        if self.bar is not None:
            self.bar.close()


@contextmanager
def phase(name: str, log=print):
    """Announce a phase and, when it ends, its wall time."""
    log(f"[{name}] ...")
    start = time.perf_counter()
    info: dict = {}
    yield info
    detail = f": {info['detail']}" if info.get("detail") else ""
    log(f"[{name}] done in {time.perf_counter() - start:.1f} s{detail}")
