"""Crash-safe checkpoints.

Layout of a run folder:
    checkpoint-000010/   policy/ (save_pretrained safetensors, or the LoRA adapter only; tokenizer beside it),
                         critic/, trainer_state.pt (tensors and plain containers only), config.json
    frozen/              the models that never change (demo: reference and reward model), written once
    metrics.jsonl

Every folder is written under a `.tmp-*` name and renamed into place only when complete. Rotation renames a
folder to `.old-*` before deleting it, so a crash (or a full disk) at any point leaves each `checkpoint-N` either
complete or absent; `clean_stale` removes the `.tmp-*` / `.old-*` leftovers at the start of a run. A write that
fails (full disk, read-only folder) removes its temporary folder and raises WriteError naming the last complete
checkpoint. Loading never unpickles code: `torch.load(weights_only=True)` and safetensors only.

A fresh run refuses a folder that already holds a run (`holds_run`) unless told to replace it (`clear_run`
removes exactly the files a run writes, nothing else of the folder).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch

PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.json"
FROZEN = "frozen"
# what a run writes in its folder (besides checkpoint-N): a fresh run refuses a folder holding any of them
RUN_FILES = ("metrics.jsonl", "setup.json", "curves.png", FROZEN, "tensorboard", "wandb")


class WriteError(OSError):
    """A run file could not be written (full disk, read-only folder); the message says what, where, what to do."""


def main_process() -> bool:
    """False on the ranks other than 0 of a torchrun launch: they never write or delete run files."""
    return int(os.environ.get("RANK", "0")) == 0


def _remove(path: Path):
    """Rename to `.old-*` (atomic), then delete: a crash mid-delete leaves only a `.old-*` folder."""
    doomed = path.parent / f".old-{path.name}-{os.getpid()}"
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def clean_stale(out_dir: Path) -> list[Path]:
    """Delete the `.tmp-*` and `.old-*` folders a crashed run left behind; returns what was removed."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir() or not main_process():
        return []
    stale = [p for p in out_dir.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    for p in stale:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return stale


def holds_run(out_dir: Path) -> list[str]:
    """The names of the run files (metrics.jsonl, checkpoint-N, frozen/, ...) already in out_dir."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p.name for p in out_dir.iterdir() if p.name in RUN_FILES or PATTERN.match(p.name))


def clear_run(out_dir: Path) -> list[str]:
    """Delete the run files of out_dir (holds_run, and `.tmp-*` / `.old-*` leftovers); returns their names."""
    out_dir = Path(out_dir)
    names = holds_run(out_dir)
    for name in names:
        p = out_dir / name
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return names + [p.name for p in clean_stale(out_dir)]


def check_writable(out_dir: Path):
    """Create out_dir and write (then delete) a probe file in it: a ValueError saying what to do if it cannot
    be written, before any model is built or trained."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir}: is a file, not a folder; choose a folder for the run")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".tmp-probe-{os.getpid()}"
        probe.write_bytes(b"fastppo")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {out_dir}: cannot write there ({e.strerror or e}); choose a writable folder") \
            from None


def _write_models(folder: Path, models: dict, tokenizer=None):
    for name, model in models.items():
        if model is not None:
            model.save_pretrained(folder / name, safe_serialization=True)
    if tokenizer is not None:
        for name in ("policy", "ref", "teacher"):   # a policy folder is a loadable model with its tokenizer
            if models.get(name) is not None:
                tokenizer.save_pretrained(folder / name)


def _write_or_clean(tmp: Path, write, what: str, out_dir: Path):
    """Run write() into tmp; on failure remove tmp and raise WriteError (the complete checkpoints stay)."""
    try:
        write()
    except (OSError, RuntimeError) as e:    # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        done = list_checkpoints(out_dir)
        last = f"the last complete checkpoint is {done[-1]}" if done else "no checkpoint was written yet"
        reason = (e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0] if str(e) else
                  type(e).__name__)
        raise WriteError(f"writing {what} in {out_dir} failed ({reason}); {last}: free space or fix the "
                         f"folder's permissions, then `fastppo train --resume {out_dir}`") from None


def save(out_dir: Path, iteration: int, models: dict, trainer_state: dict, config: dict, keep: int,
         tokenizer=None) -> Path:
    """models: name -> HF / peft model (save_pretrained, safetensors). Keeps the `keep` newest checkpoints."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"checkpoint-{iteration:06d}"
    tmp = out_dir / f".tmp-checkpoint-{iteration:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)

    def write():
        tmp.mkdir()
        _write_models(tmp, models, tokenizer)
        torch.save(trainer_state, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))

    _write_or_clean(tmp, write, final.name, out_dir)
    if final.exists():
        _remove(final)
    os.replace(tmp, final)
    for old in list_checkpoints(out_dir)[:-keep]:
        _remove(old)
    return final


def save_frozen(out_dir: Path, models: dict, tokenizer=None) -> Path | None:
    """Write the never-changing models once (no-op when `frozen/` exists or there is nothing to write)."""
    out_dir = Path(out_dir)
    final = out_dir / FROZEN
    models = {k: v for k, v in models.items() if v is not None}
    if final.exists() or not models or not main_process():
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".tmp-{FROZEN}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    _write_or_clean(tmp, lambda: _write_models(tmp, models, tokenizer), f"{FROZEN}/", out_dir)
    os.replace(tmp, final)
    return final


def copy_frozen(src: Path, out_dir: Path):
    """A resumed run written to another folder gets its own copy of the frozen models (once)."""
    src, final = Path(src), Path(out_dir) / FROZEN
    if not main_process() or final.exists() or src.resolve() == final.resolve() or not (src / "ref").is_dir():
        return
    tmp = Path(out_dir) / f".tmp-{FROZEN}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name in ("ref", "reward", "teacher"):
        if (src / name).is_dir():
            shutil.copytree(src / name, tmp / name)
    os.replace(tmp, final)


def list_checkpoints(out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if p.is_dir() and (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(out_dir: Path) -> Path:
    ckpts = [p for p in list_checkpoints(Path(out_dir)) if (p / STATE_FILE).is_file() and (p / CONFIG_FILE).is_file()]
    if not ckpts:
        raise FileNotFoundError(f"no complete checkpoint-* folder in {out_dir} to resume from")
    return ckpts[-1]


def load_state(ckpt: Path) -> dict:
    """The trainer state, loaded with weights_only=True: tensors and plain containers, never code."""
    path = Path(ckpt) / STATE_FILE
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refusing to load: it holds more than tensors and plain containers (a trainer "
                         f"state written by fastppo never does; the file may have been tampered with): "
                         f"{str(e).splitlines()[0]}") from None


def load_config(ckpt: Path) -> dict:
    path = Path(ckpt) / CONFIG_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the saved configuration: {e}") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: the saved configuration is not a JSON object")
    return saved


def frozen_dir(run_dir: Path, ckpt: Path) -> Path:
    """Where a run's frozen models live (older runs kept them inside each checkpoint)."""
    run_frozen = Path(run_dir) / FROZEN
    return run_frozen if run_frozen.is_dir() else Path(ckpt)
