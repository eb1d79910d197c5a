"""Host-side layout helpers shared by the launchers (no Triton code, no device queries)."""

import numpy as np
import torch
import triton.language as tl


class Rows:
    """A [..., V] tensor addressed as N rows without copying: row r starts at element
    (r // n_inner) * stride_outer + (r % n_inner) * stride_inner. This covers contiguous tensors
    and the common shifted views such as `logits[:, :-1, :]`. The last dimension is made
    contiguous here when it is not (a copy, as flash-attention's cross-entropy does)."""

    __slots__ = ("tensor", "n_rows", "n_cols", "n_inner", "stride_outer", "stride_inner")

    def __init__(self, x: torch.Tensor):
        if x.dim() == 0:
            raise ValueError("expected a tensor with a vocabulary dimension, got a scalar")
        if x.stride(-1) != 1 and x.shape[-1] > 1:
            x = x.contiguous()
        lead = x.shape[:-1]
        n_cols = x.shape[-1]
        if len(lead) > 2:
            try:
                x = x.view(-1, lead[-1], n_cols)
            except RuntimeError:
                x = x.reshape(-1, n_cols)
            lead = x.shape[:-1]
        n_rows = 1
        for d in lead:
            n_rows *= d
        if len(lead) == 2:
            n_inner, stride_outer, stride_inner = lead[1], x.stride(0), x.stride(1)
        elif len(lead) == 1:
            n_inner, stride_outer, stride_inner = max(n_rows, 1), 0, x.stride(0)
        else:
            n_inner, stride_outer, stride_inner = 1, 0, 0
        self.tensor = x
        self.n_rows = n_rows
        self.n_cols = n_cols
        self.n_inner = max(n_inner, 1)
        self.stride_outer = stride_outer
        self.stride_inner = stride_inner

    def args(self):
        return self.n_inner, self.stride_outer, self.stride_inner


def has_internal_overlap(x: torch.Tensor) -> bool:
    """True when two indices of `x` may share memory (an expanded / stride-0 or otherwise overlapping view):
    walking the dims by increasing stride, each stride must exceed the extent of the smaller ones."""
    dims = sorted((x.stride(d), x.shape[d]) for d in range(x.dim()) if x.shape[d] > 1)
    extent = 0
    for stride, size in dims:
        if stride <= extent:
            return True
        extent += (size - 1) * stride
    return False


def check_inplace_target(logits: torch.Tensor) -> None:
    """`inplace=True` writes the gradient over the logits: refused for overlapping storage, where two
    gradient entries would land on one element."""
    if has_internal_overlap(logits):
        raise ValueError(f"inplace=True needs logits whose elements do not share memory; got shape "
                         f"{tuple(logits.shape)} with strides {logits.stride()} (an expanded or overlapping view)")


def flat_labels(labels: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Labels as a contiguous [N] vector (the kernels read label r at element r): a strided view such
    as `labels[::2]` is copied here (N integers, not [N, V] data)."""
    flat = labels.reshape(-1).contiguous()
    if flat.numel() != n_rows:
        raise ValueError(f"labels has {flat.numel()} elements but logits have {n_rows} rows")
    return flat


def flat_rows(x: torch.Tensor, n_rows: int, name: str) -> torch.Tensor:
    """A per-row tensor (mask, upstream gradient) as a contiguous [N] vector (copied if strided)."""
    flat = x.reshape(-1).contiguous()
    if flat.numel() != n_rows:
        raise ValueError(f"{name} has {flat.numel()} elements but logits have {n_rows} rows")
    return flat


def tau_rows_arg(tau, n_rows: int, fallback: torch.Tensor):
    """(pointer tensor, HAS_TAU_ROWS) of an optional per-row temperature (`row_inv_tau`, in place of the scalar
    inv_tau): tau as a contiguous [N] vector, or `fallback` (never read) without one."""
    return (fallback, False) if tau is None else (flat_rows(tau, n_rows, "temperature"), True)


def split_float(x: float):
    """(hi, lo) fp32 pair with hi + lo == x to ~2^-48: how a host float reaches an fp64 kernel exactly
    (the JIT passes Python floats as fp32)."""
    hi = float(np.float32(x))   # host arithmetic only: no tensor, so torch.compile can trace a launcher
    lo = float(np.float32(x - hi))
    return hi, lo


class LogitTransform:
    """Host side of `transform_logits` (kernels/_common.py): z' = softcap(scale * z) / tau,
    softcap(x) = c * tanh(x / c) (no cap when c is None), folded into pre / post factors and passed
    as (hi, lo) fp32 pairs: `args()` = (pre_hi, pre_lo, post_hi, post_lo); `has_cap` the constexpr."""

    __slots__ = ("has_cap", "pre", "post")

    def __init__(self, inv_tau: float, logit_scale: float = 1.0, softcap=None):
        self.has_cap = softcap is not None
        if self.has_cap:
            self.pre, self.post = float(logit_scale) / float(softcap), float(softcap) * float(inv_tau)
        else:
            self.pre, self.post = float(logit_scale) * float(inv_tau), 1.0

    def args(self):
        return (*split_float(self.pre), *split_float(self.post))


def acc_dtype(dtype: torch.dtype):
    """Accumulator dtype (torch, triton): fp32, or fp64 for fp64 inputs."""
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)
