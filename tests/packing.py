"""Packed test batches: sequences of given lengths laid end to end (cu_seqlens) and the same batch padded to
[S, T], T the longest, with the maps between the two layouts."""

from typing import NamedTuple

import torch

from tests.helpers import DEVICE


class PackCase(NamedTuple):
    lengths: tuple
    cu: torch.Tensor          # int64 [S + 1]
    mask: torch.Tensor        # bool [total]
    index: torch.Tensor       # [total]: each packed token's flat position in [S, T]

    @property
    def S(self):
        return len(self.lengths)

    @property
    def T(self):
        return max(max(self.lengths), 1)

    @property
    def total(self):
        return sum(self.lengths)

    def pad(self, x, fill=0.0):
        """Packed [total] (or per-sequence [S], returned as is) -> padded [S, T]; `fill` off the sequences."""
        if x.shape[0] == self.S and self.total != self.S:
            return x
        out = torch.full((self.S * self.T,), fill, dtype=x.dtype, device=x.device)
        return out.index_copy(0, self.index, x).view(self.S, self.T)

    def pad_mask(self):
        return self.pad(self.mask, fill=False)

    def unpad(self, x):
        return x.reshape(-1).index_select(0, self.index)


def pack_case(lengths, holes=False, seed=0):
    """A PackCase of `lengths` (zeros allowed); mask all 1, or with holes (and the first sequence empty)."""
    g = torch.Generator().manual_seed(seed)
    lengths = tuple(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    T = max(max(lengths), 1)
    index = torch.cat([s * T + torch.arange(n) for s, n in enumerate(lengths)]) if sum(lengths) else \
        torch.zeros(0, dtype=torch.int64)
    mask = torch.ones(sum(lengths), dtype=torch.bool)
    if holes:
        mask = torch.rand(sum(lengths), generator=g) > 0.3
        mask[: lengths[0]] = False
    return PackCase(lengths, cu.to(DEVICE), mask.to(DEVICE), index.to(DEVICE))
