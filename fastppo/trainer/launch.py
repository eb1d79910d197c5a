"""PPOTrainer.from_config: what `fastppo train` runs, built from a TrainConfig. Everything that can be checked is
checked before a model is built or trained: the configuration, a resumed checkpoint's state file (weights_only),
the prompts, the reward functions, and the output folder (writable; a fresh run never mixes into an earlier one:
`--resume` continues it, `--overwrite` replaces it)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from pathlib import Path

import torch

from .. import use_backend
from . import checkpoint
from .config import TrainConfig, merge_for_resume
from .parallel import Parallel
from .reporting import read_metrics


def _quiet(*_args, **_kwargs):
    """The log of ranks other than 0."""


def _device(cfg) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device=cuda but CUDA is not available")
    return torch.device(cfg.device)


def prepare_out(cfg: TrainConfig, log: Callable = print):
    """The output folder before any model is built: a folder holding another run is refused (every rank checks,
    nothing is changed), or with --overwrite emptied of that run's files (rank 0); then a write probe (rank 0)."""
    out = Path(cfg.out)
    continuing = bool(cfg.resume) and out.resolve() == Path(cfg.resume).resolve()
    if continuing and cfg.overwrite:
        raise ValueError(f"--overwrite with --resume {cfg.resume} would delete the run being resumed: drop "
                         f"--overwrite to continue it, or give another --out")
    found = [] if continuing or (out.exists() and not out.is_dir()) else checkpoint.holds_run(out)
    if found and not cfg.overwrite:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise ValueError(f"--out {out} already holds a run ({shown}): continue it with `fastppo train --resume "
                         f"{out}`, or pass --overwrite to delete it and start afresh")
    if not checkpoint.main_process():
        return
    checkpoint.check_writable(out)
    if found:
        checkpoint.clear_run(out)
        log(f"--overwrite: deleted the earlier run in {out} ({', '.join(found)})")


def backend_scope(name: str | None):
    """`fastppo.use_backend(name)` around the trainer's own work (--backend), leaving the process-wide
    choice as it was afterwards; None changes nothing."""
    return contextlib.nullcontext() if name is None else use_backend(name)


def build_trainer(cls, cfg: TrainConfig, log: Callable = print, explicit: set[str] | None = None):
    """The body of PPOTrainer.from_config (see its docstring)."""
    from .data import combined_reward, load_prompts, load_reward_funcs
    from .models import build_demo, build_real

    cfg.validate()
    if not checkpoint.main_process():
        log = _quiet
    resume_from = state = None
    if cfg.resume:
        run_dir = Path(cfg.resume)
        for p in checkpoint.clean_stale(run_dir):
            log(f"removed {p.name} (left by an interrupted run)")
        resume_from = checkpoint.latest(run_dir)
        cfg = merge_for_resume(cfg, checkpoint.load_config(resume_from), explicit, resume_from, log)
        state = checkpoint.load_state(resume_from)
    out = Path(cfg.out)
    prompts = load_prompts(cfg.prompts, cfg.prompts_column, cfg.prompts_split) if cfg.policy else None
    reward_funcs = load_reward_funcs(cfg.reward_funcs)
    prepare_out(cfg, log)
    parallel = Parallel.setup(cfg.parallel, _device(cfg))
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    with backend_scope(cfg.backend):
        if cfg.policy is None:
            setup = build_demo(cfg, out, resume_from, Path(cfg.resume) if cfg.resume else None, log)
        else:
            setup = build_real(cfg, prompts, resume_from, log)
    device = _device(cfg)
    policy, ref, reward_model, critic, teacher = (None if m is None else m.to(device) for m in
                                                  (setup.policy, setup.ref, setup.reward_model, setup.critic,
                                                   setup.teacher))
    reward_fn = None
    if reward_funcs:
        text_reward = combined_reward(reward_funcs, cfg.reward_weights)

        def reward_fn(seqs, attn, prompt_len):
            prompt_ids, response = seqs[:, :prompt_len].tolist(), seqs[:, prompt_len:].tolist()
            resp_mask = attn[:, prompt_len:].tolist()
            completion_ids = [[t for t, m in zip(r, k) if m] for r, k in zip(response, resp_mask)]
            return text_reward(prompts=[setup.decode(p) for p in prompt_ids],
                               completions=[setup.decode(c) for c in completion_ids],
                               completion_ids=completion_ids)

    trainer = cls(cfg, policy, prompt_fn=setup.prompt_fn, eos_id=setup.eos_id, pad_id=setup.pad_id, ref=ref,
                  reward_model=reward_model, reward_fn=reward_fn, critic=critic,
                  task_score_fn=setup.task_score_fn, tokenizer=setup.tokenizer, log=log, parallel=parallel,
                  teacher=teacher)
    trainer.info = setup.info
    if state is not None:
        trainer.load_state_dict(state)
        trainer.history = [m for m in read_metrics(Path(cfg.resume) / "metrics.jsonl")
                           if m["iteration"] < trainer.iteration]
        log(f"resumed from {resume_from} at iteration {trainer.iteration}")
    return trainer
