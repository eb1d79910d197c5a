"""`KeptSet`: the sampler's kept tokens per row (the support it sampled from after top-k / top-p / min-p),
in compressed sparse rows: row r keeps `ids[offsets[r]:offsets[r + 1]]`, ascending (a set given in another
order is sorted within its rows at construction). Rows are the labels' positions flattened (row r belongs to
`labels.reshape(-1)[r]`).

Which checks run where:
- always (no data read, free on any device): dtypes (ids int32/int64, offsets int64), 1-D shapes,
  offsets non-empty, both on one device.
- on CPU tensors, at construction (cheap, no device to sync with): offsets[0] == 0, offsets non-decreasing,
  offsets[-1] == nnz, ids >= 0 (and < V when `vocab_size` is given), no duplicate id within a row.
- on CUDA tensors the data checks would sync with the host, so the constructor skips them;
  `KeptSet.check(vocab_size)` runs them on any device on request (one sync). The constructors below
  (`from_mask`, `from_filters`, `from_lists`, `from_lengths`, `from_sequences`) build valid sets.

Converters from the engines' returned forms:
- vLLM (#49577, "Mask Replay"): per request `SamplingMask(token_ids=[...], offsets=[0, ..., len(token_ids)])`,
  one row per generated token: already CSR, i.e. `KeptSet(token_ids, offsets)`; `from_sequences` places
  several requests' rows at their positions in a padded [B, T] labels layout.
- SGLang (#27408 / #33593 / #36630): `meta_info["output_token_sampling_mask"]`, one list of kept token ids per
  output token (`from_lists`); internally / in its object-store layout a flat `token_ids` array with
  per-token `lengths` (`from_lengths`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kept_filters import kept_mask_from_filters


def _check_structure(ids, offsets):
    if not isinstance(ids, torch.Tensor) or not isinstance(offsets, torch.Tensor):
        raise TypeError(f"KeptSet needs tensors, got ids {type(ids).__name__}, offsets {type(offsets).__name__}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"KeptSet ids must be int32 or int64, got {ids.dtype}")
    if offsets.dtype != torch.int64:
        raise ValueError(f"KeptSet offsets must be int64, got {offsets.dtype}")
    if ids.dim() != 1 or offsets.dim() != 1:
        raise ValueError(f"KeptSet ids and offsets must be 1-D, got shapes {tuple(ids.shape)} and "
                         f"{tuple(offsets.shape)}")
    if offsets.numel() == 0:
        raise ValueError("KeptSet offsets must have rows + 1 >= 1 entries, got an empty tensor")
    if ids.device != offsets.device:
        raise ValueError(f"KeptSet ids and offsets must be on one device, got {ids.device} and {offsets.device}")


def _check_data(ids, offsets, vocab_size):
    nnz = ids.numel()
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0:
        raise ValueError(f"KeptSet offsets[0] must be 0, got {first}")
    if last != nnz:
        raise ValueError(f"KeptSet offsets[-1] must equal nnz = ids.numel() = {nnz}, got {last}")
    steps = offsets[1:] - offsets[:-1]
    if bool((steps < 0).any()):
        r = int((steps < 0).nonzero()[0])
        raise ValueError(f"KeptSet offsets must be non-decreasing; offsets[{r}] = {int(offsets[r])} > "
                         f"offsets[{r + 1}] = {int(offsets[r + 1])}")
    if nnz == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        bad = lo if lo < 0 else hi
        raise ValueError(f"KeptSet ids must lie in [0, {vocab_size if vocab_size is not None else 'V'}), "
                         f"got {bad}")
    rows = torch.repeat_interleave(torch.arange(steps.numel(), device=ids.device), steps, output_size=nnz)
    key = rows * (hi + 1) + ids.long()
    if torch.unique(key).numel() != nnz:
        sorted_key = key.sort().values
        dup = sorted_key[1:][sorted_key[1:] == sorted_key[:-1]][0]
        raise ValueError(f"KeptSet has a duplicate id {int(dup % (hi + 1))} in row {int(dup // (hi + 1))}")


def _sorted_within_rows(ids, offsets):
    """ids ascending within each row: the same tensor where they already are (checked on CPU), else sorted by
    (row, id) with two stable sorts (no host sync: the row of each id comes from repeat_interleave with the
    known output size nnz)."""
    nnz = ids.numel()
    if nnz < 2:
        return ids
    counts = offsets[1:] - offsets[:-1]
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=ids.device), counts, output_size=nnz)
    if ids.device.type == "cpu" and bool(((rows[1:] != rows[:-1]) | (ids[1:] > ids[:-1])).all()):
        return ids
    order = torch.sort(ids, stable=True).indices
    order = order.gather(0, torch.sort(rows.gather(0, order), stable=True).indices)
    return ids.gather(0, order)


@dataclass(frozen=True, eq=False)
class KeptSet:
    """The sampler's kept tokens per row, CSR (module doc): `ids` int32/int64 [nnz] (vocabulary ids, unique
    within a row), `offsets` int64 [rows + 1]. Frozen; data checks run at construction on CPU only (module
    doc), `vocab_size` (optional) also bounds the ids. The ids are held ascending within each row (sorted at
    construction where they are not, on any device: the kernels' one-sweep entropy path relies on it)."""

    ids: torch.Tensor
    offsets: torch.Tensor
    vocab_size: int | None = None

    def __post_init__(self):
        _check_structure(self.ids, self.offsets)
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size < 1):
            raise ValueError(f"KeptSet vocab_size must be a positive int or None, got {self.vocab_size!r}")
        if self.ids.device.type == "cpu":
            _check_data(self.ids, self.offsets, self.vocab_size)
        object.__setattr__(self, "ids", _sorted_within_rows(self.ids, self.offsets))

    # ------------------------------------------------------------------ views
    @property
    def rows(self) -> int:
        return self.offsets.numel() - 1

    @property
    def nnz(self) -> int:
        return self.ids.numel()

    @property
    def device(self) -> torch.device:
        return self.ids.device

    def counts(self) -> torch.Tensor:
        """Kept ids per row, int64 [rows]."""
        return self.offsets[1:] - self.offsets[:-1]

    def check(self, vocab_size: int | None = None) -> KeptSet:
        """Run the data checks on any device (syncs with a GPU); returns self."""
        _check_data(self.ids, self.offsets, vocab_size if vocab_size is not None else self.vocab_size)
        return self

    def to(self, device: torch.device | str) -> KeptSet:
        return KeptSet(self.ids.to(device), self.offsets.to(device), self.vocab_size)

    def to_mask(self, vocab_size: int | None = None) -> torch.Tensor:
        """Dense bool [rows, V] (True where kept)."""
        V = vocab_size if vocab_size is not None else self.vocab_size
        if V is None:
            raise ValueError("KeptSet.to_mask needs vocab_size (the set was built without one)")
        mask = torch.zeros(self.rows, V, dtype=torch.bool, device=self.device)
        rows = torch.repeat_interleave(torch.arange(self.rows, device=self.device), self.counts(),
                                       output_size=self.nnz)
        mask[rows, self.ids.long()] = True
        return mask

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> KeptSet:
        """From a dense bool mask [..., V]: rows = mask.shape[:-1] flattened, ids ascending within a row."""
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() < 1:
            raise ValueError(f"KeptSet.from_mask needs a bool tensor [..., V], got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
        V = mask.shape[-1]
        flat = mask.reshape(-1, V)
        nz = flat.nonzero()                      # row-major: rows ascending, ids ascending within a row
        counts = flat.sum(-1)
        offsets = torch.zeros(flat.shape[0] + 1, dtype=torch.int64, device=mask.device)
        torch.cumsum(counts, 0, out=offsets[1:])
        return cls(nz[:, 1].contiguous(), offsets, V)

    @classmethod
    def from_filters(cls, logits: torch.Tensor, *, temperature=1.0, top_k=None, top_p=None,
                     min_p=None) -> KeptSet:
        """The kept set of vLLM's V1 sampler (see fastppo.kept_filters.kept_mask_from_filters for the exact
        steps, per-row parameters and how ties are broken)."""
        return cls.from_mask(kept_mask_from_filters(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                                    min_p=min_p))

    @classmethod
    def from_lengths(cls, ids, lengths, vocab_size: int | None = None) -> KeptSet:
        """From a flat id array and the number of kept ids per row (SGLang's `lengths` + `token_ids` layout)."""
        ids = torch.as_tensor(ids)
        lengths = torch.as_tensor(lengths, device=ids.device)
        if lengths.dim() != 1 or lengths.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"KeptSet.from_lengths: lengths must be a 1-D integer array, got {lengths.dtype} "
                             f"{tuple(lengths.shape)}")
        if bool((lengths < 0).any()):
            raise ValueError("KeptSet.from_lengths: lengths must be >= 0")
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=ids.device)
        torch.cumsum(lengths.long(), 0, out=offsets[1:])
        return cls(ids.reshape(-1), offsets, vocab_size)

    @classmethod
    def from_lists(cls, rows, vocab_size: int | None = None, device=None) -> KeptSet:
        """From one list of kept ids per row (SGLang's `output_token_sampling_mask` in meta_info)."""
        flat = [int(t) for r in rows for t in r]
        return cls.from_lengths(torch.tensor(flat, dtype=torch.int64, device=device),
                                torch.tensor([len(r) for r in rows], dtype=torch.int64, device=device), vocab_size)

    @classmethod
    def from_sequences(cls, parts, row_starts, n_rows: int) -> KeptSet:
        """Place several KeptSets (e.g. one vLLM SamplingMask per request) into one set of `n_rows` rows:
        part i's rows go to rows row_starts[i] ... row_starts[i] + parts[i].rows - 1 (for labels [B, T] whose
        response b starts at position s_b: row_starts[b] = b * T + s_b). Other rows are empty: their labels
        must be ignore_index (a valid label with an empty kept set gives a NaN log-prob)."""
        parts = list(parts)
        starts = [int(s) for s in row_starts]
        if len(starts) != len(parts):
            raise ValueError(f"KeptSet.from_sequences: {len(parts)} parts but {len(starts)} row_starts")
        device = parts[0].device if parts else torch.device("cpu")
        counts = torch.zeros(n_rows, dtype=torch.int64, device=device)
        taken = torch.zeros(n_rows, dtype=torch.bool, device=device)
        for part, s in zip(parts, starts):
            if s < 0 or s + part.rows > n_rows:
                raise ValueError(f"KeptSet.from_sequences: rows {s} .. {s + part.rows - 1} fall outside "
                                 f"[0, {n_rows})")
            if bool(taken[s:s + part.rows].any()):
                raise ValueError(f"KeptSet.from_sequences: part at row {s} overlaps another part")
            taken[s:s + part.rows] = True
            counts[s:s + part.rows] = part.counts()
        order = sorted(range(len(parts)), key=lambda i: starts[i])
        ids = torch.cat([parts[i].ids.long() for i in order]) if parts else torch.zeros(0, dtype=torch.int64)
        offsets = torch.zeros(n_rows + 1, dtype=torch.int64, device=device)
        torch.cumsum(counts, 0, out=offsets[1:])
        sizes = {p.vocab_size for p in parts} - {None}
        return cls(ids.to(device), offsets, sizes.pop() if len(sizes) == 1 else None)
