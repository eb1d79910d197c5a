"""Packed loss inputs: the valid response tokens of a [B, R] rollout laid end to end in one token dimension
[total] with flash-attention's `cu_seqlens` (int64 [B + 1] offsets), the layout every fastppo loss takes with
`cu_seqlens=`. The model forward stays padded; its hidden states [B, R, H] are gathered to [total, H] before the
fused loss, so no padded token reaches a loss (`--pack false`: the padded layout, same numbers)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Packing:
    """Where the valid tokens of a [B, R] mask sit: `index` int64 [total] into the flattened [B * R] positions
    (row-major, so each row's tokens stay in order and the rows follow one another), `cu_seqlens` int64 [B + 1]
    (row b owns packed tokens [cu_seqlens[b], cu_seqlens[b + 1]); an empty row is an empty sequence)."""

    index: torch.Tensor
    cu_seqlens: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def of(cls, mask: torch.Tensor) -> Packing:
        if mask.dim() != 2:
            raise ValueError(f"mask: expected [B, R], got shape {tuple(mask.shape)}")
        mask = mask.bool()
        cu = torch.zeros(mask.shape[0] + 1, dtype=torch.int64, device=mask.device)
        cu[1:] = mask.sum(1).cumsum(0)
        return cls(mask.reshape(-1).nonzero().squeeze(1), cu, (mask.shape[0], mask.shape[1]))

    @property
    def total(self) -> int:
        return self.index.numel()

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, R, ...] -> [total, ...] (the valid positions); a per-sequence [B] tensor is returned as it is."""
        if x.dim() == 1:
            return x
        if tuple(x.shape[:2]) != self.shape:
            raise ValueError(f"expected [B, R] = {list(self.shape)} leading dims, got shape {tuple(x.shape)}")
        return x.reshape(self.shape[0] * self.shape[1], *x.shape[2:]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """[total] -> [B, R], `fill` at the padded positions."""
        out = torch.full((self.shape[0] * self.shape[1],), fill, dtype=x.dtype, device=x.device)
        return out.index_copy(0, self.index, x).view(self.shape)

    def ones(self) -> torch.Tensor:
        """The packed mask: every packed token is valid."""
        return torch.ones(self.total, dtype=torch.bool, device=self.index.device)


class Layout:
    """The loss inputs of one micro-batch in the layout the trainer uses: `pack(x)` gives x packed ([B, R, ...]
    -> [total, ...]; a per-sequence [B] tensor unchanged) or as it is (padded); `mask` and `cu_seqlens` go with
    it (packed: all-true [total] and the offsets; padded: the [B, R] mask and None)."""

    def __init__(self, packing: Packing | None, mask: torch.Tensor):
        self.packing = packing
        self.mask = mask if packing is None else packing.ones()
        self.cu_seqlens = None if packing is None else packing.cu_seqlens

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.packing is None else self.packing.pack(x)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """A per-token result back to [B, R] (0 at the padded positions); padded: x as it is."""
        return x if self.packing is None else self.packing.unpack(x)

    @classmethod
    def of(cls, mask: torch.Tensor, packed: bool) -> Layout:
        return cls(Packing.of(mask) if packed else None, mask)
