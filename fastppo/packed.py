"""Packed sequences (flash-attention's convention): S sequences laid end to end in one token dimension,
sequence s owning tokens [cu_seqlens[s], cu_seqlens[s + 1]) of a 1-D [total] tensor. The checks every
op with `cu_seqlens=` runs, and the segment operations of the PyTorch twins (no Python loop over
sequences, no host sync: every size comes from a shape)."""

from __future__ import annotations

import torch

from ._validation import label_check_enabled


def check_cu_seqlens(cu_seqlens, total: int, device: torch.device) -> int:
    """Validate `cu_seqlens` for `total` packed tokens; returns S. Shape, dtype and device always; the
    values (cu_seqlens[0] == 0, non-decreasing, cu_seqlens[-1] == total) where that is free (CPU tensors,
    or FASTPPO_CHECK_LABELS=1), never with a host sync on CUDA by default."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be [S + 1] with S >= 1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on {device} with the other tensors, got {cu_seqlens.device}")
    if label_check_enabled(cu_seqlens.device):
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        if first != 0 or last != total:
            raise ValueError(f"cu_seqlens must start at 0 and end at the packed length {total}, got "
                             f"cu_seqlens[0]={first}, cu_seqlens[-1]={last}")
        steps = cu_seqlens[1:] - cu_seqlens[:-1]
        if bool((steps < 0).any()):
            s = int((steps < 0).nonzero()[0, 0])
            raise ValueError(f"cu_seqlens must be non-decreasing, got cu_seqlens[{s}]={int(cu_seqlens[s])} > "
                             f"cu_seqlens[{s + 1}]={int(cu_seqlens[s + 1])}")
    return cu_seqlens.shape[0] - 1


def check_packed(name: str, x: torch.Tensor, cu_seqlens) -> int:
    """`name` must be 1-D [total] when cu_seqlens is given; returns S."""
    if x.dim() != 1:
        raise ValueError(f"with cu_seqlens, {name} must be packed 1-D [total], got shape {tuple(x.shape)}")
    return check_cu_seqlens(cu_seqlens, x.shape[0], x.device)


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total] int64: the sequence of each packed token (searchsorted on the device, no host sync)."""
    cu = cu_seqlens.to(torch.int64)
    tok = torch.arange(total, device=cu.device)
    return torch.searchsorted(cu[1:], tok, right=True).clamp_(max=max(cu.shape[0] - 2, 0))   # the ends <= t


def per_token(x: torch.Tensor, cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """A packed per-token [total] tensor as is, a per-sequence [S] one spread to its sequences' tokens."""
    return x if x.shape[0] == total else x[segment_ids(cu_seqlens, total)]


class Segments:
    """Sequence-level operations on per-token values laid out as [B, T] (padded, cu_seqlens None) or as
    [1, total] (packed by cu_seqlens): `sum` per sequence ([B] / [S]), `spread` a per-sequence value back
    to every token, `lengths` ([S] / [B] of T) and `horizon` (T / the longest sequence, a 0-d tensor)."""

    def __init__(self, cu_seqlens, B: int, T: int, device):
        self.cu = None if cu_seqlens is None else cu_seqlens.to(device=device, dtype=torch.int64)
        self.B, self.T = B, T
        self.S = B if self.cu is None else self.cu.shape[0] - 1
        self._seg = None

    @property
    def packed(self) -> bool:
        return self.cu is not None

    @property
    def seg(self) -> torch.Tensor | None:
        """[total] int64 sequence of each packed token (None padded), computed on first use."""
        if self.packed and self._seg is None:
            self._seg = segment_ids(self.cu, self.T)
        return self._seg

    def sum(self, v: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return v.sum(-1)
        return torch.segment_reduce(v.reshape(-1), "sum", offsets=self.cu, unsafe=True)

    def spread(self, v: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return v[:, None].expand(self.B, self.T)
        return v[self.seg][None]

    def horizon(self, dtype) -> torch.Tensor:
        if not self.packed:
            return torch.tensor(float(self.T), dtype=dtype)
        return (self.cu[1:] - self.cu[:-1]).max().to(dtype)

    def per_token(self, x: torch.Tensor, acc) -> torch.Tensor:
        """x in the accumulator dtype, as the layout's per-token tensor: [B, T] / [T] (B == 1) / per-sequence
        [B] padded; [total] / per-sequence [S] packed (a [total] tensor is per token when S == total too)."""
        x = x.to(acc)
        if self.packed:
            return x.view(1, self.T) if x.shape[0] == self.T else x[self.seg][None]
        if x.dim() == 2:
            return x
        if x.dim() == 1 and x.shape[0] == self.T and self.B == 1:
            return x.view(1, self.T)
        return x.view(self.B, 1).expand(self.B, self.T)
