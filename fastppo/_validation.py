"""Argument checks shared by the public functions: clear ValueError/TypeError, never a wrong
number. Checks that would need a device->host sync on CUDA (label range) run only where they
are free (CPU tensors) unless FASTPPO_CHECK_LABELS says otherwise; the kernels never read out of
bounds and return NaN for an out-of-range label instead."""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {x.dtype}")


def check_labels(labels: torch.Tensor, lead_shape, vocab: int, ignore_index: int) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal logits shape without the "
                         f"vocabulary dim {tuple(lead_shape)}")
    if label_check_enabled(labels.device):
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            first = labels[bad].flatten()[0].item()
            raise ValueError(f"labels must be in [0, {vocab}) or ignore_index={ignore_index}; "
                             f"found {first} ({int(bad.sum())} bad labels)")


def label_check_enabled(device: torch.device) -> bool:
    """FASTPPO_CHECK_LABELS=1 forces the host-side label check, =0 turns it off (as on CUDA by
    default: the check costs a device->host sync); unset, it runs where it is free (CPU). Never while
    torch.compile traces (a value check would break the graph; the kernels stay in bounds anyway)."""
    if torch.compiler.is_compiling():
        return False
    env = os.environ.get("FASTPPO_CHECK_LABELS")
    if env in ("0", "1"):
        return env == "1"
    return device.type == "cpu"


def check_temperature(temperature) -> float:
    t = float(temperature)
    if not t > 0 or t == float("inf"):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return t


def check_same_shape(name: str, x: torch.Tensor, like_name: str, like_shape) -> None:
    if tuple(x.shape) != tuple(like_shape):
        raise ValueError(f"{name} shape {tuple(x.shape)} must equal {like_name} shape {tuple(like_shape)}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_mask(mask: torch.Tensor, name: str = "mask") -> None:
    """A mask is bool, or holds only 0 and 1 (any dtype). The value check needs a device->host
    sync on CUDA, so it runs where it is free (CPU) unless FASTPPO_CHECK_LABELS says otherwise
    (the kernels treat any non-zero value as 1)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"{name} must be bool or 0/1 values, got {mask.dtype}")
    if mask.dtype == torch.bool or not label_check_enabled(mask.device):
        return
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        first = mask[bad].flatten()[0].item()
        raise ValueError(f"{name} must be bool or hold only 0 and 1; found {first} ({int(bad.sum())} other values)")


def check_inplace(name: str, x: torch.Tensor) -> None:
    """`inplace=True` writes the gradient into x's storage: refuse storage that several elements share
    (expanded / overlapping views), where the in-place gradient would be wrong."""
    overlap = torch._debug_has_internal_overlap(x)   # 0 no, 1 yes, 2 too hard to tell
    if overlap != 0 or any(s == 0 and n > 1 for s, n in zip(x.stride(), x.shape)):
        raise ValueError(f"inplace=True needs {name} whose elements do not share memory; got shape "
                         f"{tuple(x.shape)} with strides {x.stride()} (an expanded or overlapping view). "
                         f"Pass inplace=False or a contiguous copy.")
