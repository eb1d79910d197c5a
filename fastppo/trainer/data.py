"""Prompt sets and Python reward functions for `fastppo train`.

Prompts come from a local JSONL file (one object per line, parsed here so errors say file:line), or through
the optional `datasets` package (pip install 'fastppo[datasets]') from a JSON / Parquet / CSV file, a folder
written by `Dataset.save_to_disk`, or a hub dataset name. A value that names a local path (a path separator, a
file extension, a leading `.` or `~`) never reaches the hub: if it does not exist it is an error naming it; a
hub name with a `/` is written `hub:owner/name`. Text files are checked to be UTF-8 line by line (file:line).
Reward functions are `module:function` names, called as TRL calls its reward functions:
f(prompts=[str], completions=[str], completion_ids=[[int]]) -> [float].
"""

from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

_DATASET_FILES = {".json": "json", ".parquet": "parquet", ".csv": "csv"}
HUB_PREFIX = "hub:"


def _check_text(value, where: str, column: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: {column!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where}: {column!r} is empty")
    return value


def _text_lines(path: Path):
    """(line number, text) of a UTF-8 file; bad UTF-8 is a ValueError naming file:line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                 f"save the file as UTF-8") from None


def _read_jsonl(path: Path, column: str) -> list[str]:
    prompts = []
    for n, line in _text_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object with a {column!r} field, got {type(row).__name__}")
        if column not in row:
            raise ValueError(f"{where}: no {column!r} field (fields: {sorted(row)}); set --prompts_column")
        prompts.append(_check_text(row[column], where, column))
    return prompts


def _import_datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--prompts {what} needs the datasets package: pip install 'fastppo[datasets]'") from None
    return datasets


def _read_dataset(source: str, column: str, split: str) -> list[str]:
    path = Path(source).expanduser()
    datasets = _import_datasets(source)
    if path.is_file():
        if path.suffix != ".parquet":
            for _ in _text_lines(path):
                pass
        ds = datasets.load_dataset(_DATASET_FILES[path.suffix], data_files=str(path), split="train")
    elif path.is_dir() and any(path.glob("*.arrow")) or (path / "dataset_dict.json").is_file():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"--prompts {source}: no split {split!r} (splits: {sorted(ds)}); set --prompts_split")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(source.removeprefix(HUB_PREFIX), split=split)
    if column not in ds.column_names:
        raise ValueError(f"--prompts {source}: no column {column!r} (columns: {ds.column_names}); "
                         f"set --prompts_column")
    return [_check_text(v, f"{source} row {i}", column) for i, v in enumerate(ds[column])]


def load_prompts(source: str, column: str = "prompt", split: str = "train") -> list[str]:
    """The prompt texts of `source` (see the module docstring); ValueError with file:line on bad input."""
    path = Path(source).expanduser()
    separators = [s for s in (os.sep, os.altsep, "/") if s]
    looks_local = not source.startswith(HUB_PREFIX) and (
        any(s in source for s in separators) or bool(path.suffix) or source.startswith((".", "~")))
    if looks_local and not path.exists():
        raise ValueError(f"--prompts {source}: no such file or folder ({path.resolve()}); a hub dataset with a '/' "
                         f"in its name is written {HUB_PREFIX}owner/name")
    if path.is_file() and path.suffix not in (".jsonl", *_DATASET_FILES):
        raise ValueError(f"--prompts {source}: unknown file type {path.suffix!r} (use .jsonl, .json, .parquet, .csv)")
    prompts = _read_jsonl(path, column) if path.suffix == ".jsonl" and path.is_file() else _read_dataset(
        source, column, split)
    if not prompts:
        raise ValueError(f"--prompts {source} holds no prompts")
    return prompts


def load_reward_funcs(specs: list[str]) -> list[tuple[str, Callable]]:
    """[(spec, function)] for `module:function` names (imports the modules: they are the user's code)."""
    funcs = []
    for spec in specs:
        module_name, _, attr = spec.partition(":")
        try:
            obj = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"--reward_funcs {spec}: cannot import {module_name!r}: {e}") from None
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"--reward_funcs {spec}: {module_name!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
        if not callable(obj):
            raise ValueError(f"--reward_funcs {spec}: {attr!r} is not callable")
        funcs.append((spec, obj))
    return funcs


def combined_reward(funcs: list[tuple[str, Callable]], weights: list[float] | None = None) -> Callable:
    """score = sum_i w_i f_i(prompts=, completions=, completion_ids=); each f_i must return one finite-or-NaN
    number per completion."""
    weights = list(weights) if weights else [1.0] * len(funcs)

    def reward(prompts: list[str], completions: list[str], completion_ids: list[list[int]]) -> list[float]:
        total = [0.0] * len(completions)
        for (spec, f), w in zip(funcs, weights):
            out = f(prompts=prompts, completions=completions, completion_ids=completion_ids)
            out = list(out) if out is not None else None
            if out is None or len(out) != len(completions):
                raise ValueError(f"reward function {spec} returned {None if out is None else len(out)} values "
                                 f"for {len(completions)} completions")
            for i, v in enumerate(out):
                v = float("nan") if v is None else float(v)
                if math.isinf(v):
                    raise ValueError(f"reward function {spec} returned {v} for completion {i}")
                total[i] += w * v
        return total

    return reward
