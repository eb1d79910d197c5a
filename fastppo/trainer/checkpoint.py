"""Checkpoints written atomically: everything goes to a temporary folder that is renamed into place
only when complete, so a crash never leaves a half-written checkpoint behind."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

PATTERN = re.compile(r"^checkpoint-(\d+)$")


def save(out_dir: Path, iteration: int, models: dict, trainer_state: dict, config: dict, keep: int) -> Path:
    """models: name -> HF model (saved with save_pretrained, safetensors)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"checkpoint-{iteration:06d}"
    tmp = out_dir / f".tmp-checkpoint-{iteration:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, model in models.items():
        if model is not None:
            model.save_pretrained(tmp / name, safe_serialization=True)
    torch.save(trainer_state, tmp / "trainer_state.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir: Path) -> list[Path]:
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if p.is_dir() and (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(out_dir: Path) -> Path:
    ckpts = list_checkpoints(Path(out_dir))
    if not ckpts:
        raise FileNotFoundError(f"no checkpoint-* folder in {out_dir} to resume from")
    return ckpts[-1]


def load_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "trainer_state.pt", weights_only=False)
