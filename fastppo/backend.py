"""Backend choice per call (docs/design.md §2).

- CUDA tensors: Triton kernels.
- CPU tensors with TRITON_INTERPRET=1 set before triton was imported: the same Triton kernels,
  run by Triton's interpreter.
- CPU tensors otherwise: the pure-PyTorch backend.
Override with FASTPPO_BACKEND=torch|triton, `set_backend(...)` or the `use_backend(...)` context.
A forced backend that cannot run raises; nothing silently falls back.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

BACKENDS = ("torch", "triton")
_override: str | None = None


def _check_name(name):
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Force a backend for all later calls (None returns to the automatic choice)."""
    global _override
    _override = _check_name(name)


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager form of set_backend."""
    global _override
    prev = _override
    _override = _check_name(name)
    try:
        yield
    finally:
        _override = prev


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1" and triton_available()


def forced_backend() -> str | None:
    if _override is not None:
        return _override
    env = os.environ.get("FASTPPO_BACKEND") or None
    if env is not None and env not in BACKENDS:
        raise ValueError(f"FASTPPO_BACKEND must be one of {BACKENDS}, got {env!r}")
    return env


def triton_can_run(device: torch.device) -> bool:
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


def backend_for(*tensors: torch.Tensor | None) -> str:
    """The backend that runs an op on these tensors (None entries are skipped): 'triton' or 'torch'."""
    device = next(t.device for t in tensors if t is not None)
    for t in tensors:
        if t is not None and t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    forced = forced_backend()
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not triton_can_run(device):
            why = ("triton is not installed" if not triton_available() else
                   f"{device.type} tensors need CUDA or TRITON_INTERPRET=1 set before triton is imported")
            raise RuntimeError(f"backend 'triton' was forced but cannot run here: {why}")
        return "triton"
    return "triton" if triton_can_run(device) else "torch"


def describe() -> dict:
    """Backend per device, for `fastppo check`."""
    out = {"cpu": backend_for(torch.empty(0))}
    if torch.cuda.is_available():
        out["cuda"] = backend_for(torch.empty(0, device="cuda"))
    return out
