"""The sampler's kept set of every response token of a rollout, compressed: what `--top_k` / `--top_p` /
`--min_p` let the sampler draw from at each position, kept so that the trainer's log-probs are renormalised over
the same set (`kept=` on linear_logprobs / fused_linear_ppo_loss, docs/design.md §4.1b).

Held per rollout as `ids` [nnz] (vocabulary ids, int32 when the vocabulary allows, ascending within a position)
and `counts` int64 [B, R] (ids per response position, 0 at masked positions), positions in row-major order. That
is CSR over the [B, R] positions, and -- since masked positions hold no id -- also over the packed tokens
(`packing.Packing`: the valid positions row-major), so one `ids` array serves both layouts; `counts` is a
[B, R] tensor like every other per-token field, so selecting rows and gathering ranks stay cheap. Memory:
4 bytes per kept id plus 8 per position; the dense [B, V] mask of a decoding step lives only for that step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kept import KeptSet
from .packing import Layout


@dataclass(frozen=True)
class KeptRows:
    ids: torch.Tensor       # int32 / int64 [nnz]: kept ids, position by position (row-major [B, R]), ascending
    counts: torch.Tensor    # int64 [B, R]: kept ids per position (0 where the response is masked)
    vocab_size: int

    @staticmethod
    def step(kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step's dense kept mask bool [B, V], compressed at once: (row int64 [n], id [n]), rows
        ascending and ids ascending within a row (int32 when V allows)."""
        if kept.dim() != 2 or kept.dtype != torch.bool:
            raise ValueError(f"KeptRows.step: kept must be bool [B, V], got {kept.dtype} {tuple(kept.shape)}")
        nz = kept.nonzero()
        dtype = torch.int32 if kept.shape[1] <= torch.iinfo(torch.int32).max else torch.int64
        return nz[:, 0], nz[:, 1].to(dtype)

    @classmethod
    def of_steps(cls, steps: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor,
                 vocab_size: int) -> KeptRows:
        """From the compressed kept sets of the decoding steps (`step(kept)` of each, step t = response position
        t; fewer steps than mask.shape[1] when generation stopped early) and the response mask [B, R]: positions
        where mask is False (after EOS) keep nothing."""
        B, R = mask.shape
        if len(steps) > R:
            raise ValueError(f"KeptRows.of_steps: {len(steps)} steps for {R} response positions")
        if not steps:
            return cls(torch.zeros(0, dtype=torch.int32, device=mask.device),
                       torch.zeros(B, R, dtype=torch.int64, device=mask.device), vocab_size)
        flat = mask.reshape(-1)
        keys, ids = [], []
        for t, (rows, step_ids) in enumerate(steps):
            key = rows.to(flat.device) * R + t
            live = flat[key]
            keys.append(key[live])
            ids.append(step_ids.to(flat.device)[live])
        key = torch.cat(keys)
        order = torch.sort(key, stable=True).indices           # position-major; ids stay ascending within one
        counts = torch.bincount(key, minlength=B * R).view(B, R)
        return cls(torch.cat(ids)[order], counts.to(torch.int64), vocab_size)

    def select(self, idx) -> KeptRows:
        """The rollout rows `idx` (a slice or an index tensor), as Rollout.select takes them."""
        per_row = self.counts.sum(1)
        starts = torch.cumsum(per_row, 0) - per_row
        rows = torch.arange(self.counts.shape[0], device=self.counts.device)[idx]
        n = per_row[rows]
        total = int(n.sum())
        # the ids of row rows[i] are ids[starts[rows[i]] : starts[rows[i]] + n[i]], concatenated in idx order
        seg = torch.repeat_interleave(torch.arange(rows.numel(), device=n.device), n, output_size=total)
        within = torch.arange(total, device=n.device) - (torch.cumsum(n, 0) - n)[seg]
        return KeptRows(self.ids[starts[rows][seg] + within], self.counts[rows], self.vocab_size)

    def kept_set(self, layout: Layout) -> KeptSet:
        """The KeptSet the losses take in `layout`: one row per packed token (packed), or per [B, R] position
        (padded; masked positions are empty rows, their labels are ignore_index)."""
        counts = layout.pack(self.counts)
        return KeptSet.from_lengths(self.ids, counts.reshape(-1), self.vocab_size)
