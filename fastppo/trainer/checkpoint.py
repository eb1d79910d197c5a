"""Crash-safe checkpoints.

Layout of a run folder:
    checkpoint-000010/   policy/ (save_pretrained safetensors, or the LoRA adapter only; tokenizer beside it),
                         critic/, trainer_state.pt (tensors and plain containers only), config.json
    frozen/              the models that never change (demo: reference and reward model), written once
    metrics.jsonl

Every folder is written under a `.tmp-*` name and renamed into place only when complete. Rotation renames a
folder to `.old-*` before deleting it, so a crash at any point leaves each `checkpoint-N` either complete or
absent; `clean_stale` removes the `.tmp-*` / `.old-*` leftovers at the start of a run. Loading never unpickles
code: `torch.load(weights_only=True)` and safetensors only.
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


def _write_models(folder: Path, models: dict, tokenizer=None):
    for name, model in models.items():
        if model is not None:
            model.save_pretrained(folder / name, safe_serialization=True)
    if tokenizer is not None and models.get("policy") is not None:
        tokenizer.save_pretrained(folder / "policy")


def save(out_dir: Path, iteration: int, models: dict, trainer_state: dict, config: dict, keep: int,
         tokenizer=None) -> Path:
    """models: name -> HF / peft model (save_pretrained, safetensors). Keeps the `keep` newest checkpoints."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"checkpoint-{iteration:06d}"
    tmp = out_dir / f".tmp-checkpoint-{iteration:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _write_models(tmp, models, tokenizer)
    torch.save(trainer_state, tmp / STATE_FILE)
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    if final.exists():
        _remove(final)
    os.replace(tmp, final)
    for old in list_checkpoints(out_dir)[:-keep]:
        _remove(old)
    return final


def save_frozen(out_dir: Path, models: dict) -> Path | None:
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
    _write_models(tmp, models)
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
    for name in ("ref", "reward"):
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
