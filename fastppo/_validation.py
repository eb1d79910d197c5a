"""Argument checks shared by the public functions: clear ValueError/TypeError, never a wrong
number. Checks that would need a device->host sync on CUDA (label range) run only where they
are free (CPU tensors) unless FASTPPO_CHECK_LABELS says otherwise; the kernels never read out of
bounds and return NaN for an out-of-range label instead."""

from __future__ import annotations

import math
import os
from typing import Any, Literal, overload

import torch

from .kernels._rows import has_internal_overlap

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


@overload
def check_number(name: str, value: Any, *, low: float | None = ..., low_open: bool = ..., high: float | None = ...,
                 allow_none: Literal[False] = ..., allow_inf: bool = ...) -> float: ...
@overload
def check_number(name: str, value: Any, *, low: float | None = ..., low_open: bool = ..., high: float | None = ...,
                 allow_none: bool = ..., allow_inf: bool = ...) -> float | None: ...
def check_number(name: str, value: Any, *, low: float | None = None, low_open: bool = False,
                 high: float | None = None, allow_none: bool = False, allow_inf: bool = False) -> float | None:
    """The one validator of a numeric option (every op's every float option goes through it): a real int /
    float (a bool, string or None is a TypeError naming `name`), not NaN, finite unless `allow_inf`, and
    within [low, high] ((low, high] when `low_open`). Returns it as a float (None when allowed and given)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{name} must be a {'' if allow_inf else 'finite '}number, got {value!r}")
    if low is not None and not (v > low if low_open else v >= low):
        bound = "a positive number" if (low, low_open) == (0, True) else f"{'>' if low_open else '>='} {low}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    if high is not None and not v <= high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")
    return v


def check_temperature(temperature) -> float:
    """A positive finite number. A tensor (per-token temperatures) is a TypeError here: the ops that take one
    (token_logprobs, fused_ppo_loss, full_kl, linear_logprobs, fused_linear_ppo_loss, the distillation ops)
    validate it before (check_temperature_rows)."""
    if isinstance(temperature, torch.Tensor):
        raise TypeError(f"temperature must be a number for this op, got a tensor of shape {tuple(temperature.shape)} "
                        f"(per-token temperatures: token_logprobs, fused_ppo_loss, full_kl, linear_logprobs, "
                        f"fused_linear_ppo_loss, logits_divergence, topk_divergence, linear_divergence, "
                        f"linear_divergence_loss, linear_topk_divergence)")
    return check_number("temperature", temperature, low=0.0, low_open=True)


def check_same_shape(name: str, x: torch.Tensor, like_name: str, like_shape) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
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
    if has_internal_overlap(x):   # exact for strided views (logits[:, :-1] passes)
        raise ValueError(f"inplace=True needs {name} whose elements do not share memory; got shape "
                         f"{tuple(x.shape)} with strides {x.stride()} (an expanded or overlapping view). "
                         f"Pass inplace=False or a contiguous copy.")


def check_temperature_rows(temperature, shape, device, op: str, labels: torch.Tensor | None = None,
                           ignore_index: int = -100, mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """A per-token temperature tensor: floating, of `shape` (the labels' / rows' shape) on `device`; positive and
    finite at every position that is read (label not ignore_index, mask != 0, where given: dead rows are never
    read), checked where the value check is free (CPU, or FASTPPO_CHECK_LABELS=1). Returns it detached (no
    gradient flows to a temperature); None for a float temperature, which LogitTransform validates."""
    if not isinstance(temperature, torch.Tensor):
        return None
    if not temperature.dtype.is_floating_point:
        raise TypeError(f"{op}: a temperature tensor must be floating point, got {temperature.dtype}")
    if tuple(temperature.shape) != tuple(shape):
        raise ValueError(f"{op}: temperature shape {tuple(temperature.shape)} must equal {tuple(shape)} "
                         f"(one temperature per token)")
    if temperature.device != torch.device(device):
        raise ValueError(f"{op}: temperature is on {temperature.device} but the logits are on {device}")
    if label_check_enabled(temperature.device):
        bad = ~(torch.isfinite(temperature) & (temperature > 0))
        if labels is not None:
            bad &= labels != ignore_index
        if mask is not None:
            bad &= mask != 0
        if bool(bad.any()):
            raise ValueError(f"{op}: temperature must be positive and finite at every live position, got "
                             f"{temperature[bad].flatten()[0].item()} ({int(bad.sum())} bad values)")
    return temperature.detach()
