"""The pure-PyTorch backend of mismatch_stats: kernels/mismatch.py's launcher `mismatch_stats` (same arguments,
same STATS vector), in fp32 (fp64 for fp64 input). Masked positions are selected away with where (never summed,
so a NaN there cannot leak). Packed inputs (cu_seqlens) take their sequence sums from fastppo.packed.Segments."""

import torch

from .kernels.mismatch import K3_SERIES_BELOW, K3_SERIES_TERMS, LOG_RATIO_BOUND
from .packed import Segments


def _terms(d, eps):
    dc = d.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    r = d.exp()
    term = d * d * 0.5                 # the kernel's k3: its Taylor series where exp(d) - d - 1 cancels
    series = term
    for k in range(1, K3_SERIES_TERMS.value):
        term = term * d / (k + 2)
        series = series + term
    k3 = torch.where(d.abs() < K3_SERIES_BELOW.value, series, r - d - 1.0)
    return k3, (2.0 * dc).exp(), dc.exp(), ((r < 1.0 - eps) | (r > 1.0 + eps)).to(d.dtype)


def _nan_max(x):
    if x.numel() == 0:
        return x.new_tensor(float("nan"))
    return x.max() if not torch.isnan(x).any() else x.new_tensor(float("nan"))


def mismatch_stats(train, rollout, mask, *, eps: float, cu_seqlens=None):
    acc = torch.float64 if torch.float64 in (train.dtype, rollout.dtype) else torch.float32
    if cu_seqlens is not None:
        train, rollout, mask = train[None], rollout[None], mask[None]
    seg = Segments(cu_seqlens, *mask.shape, mask.device)
    m = mask != 0
    zero = torch.zeros((), dtype=acc, device=train.device)
    d = torch.where(m, train.to(acc) - rollout.to(acc), zero)
    n_tok = m.to(acc).sum()
    live = seg.sum(m.to(acc)) > 0
    n_seq = live.to(acc).sum()
    tok = [torch.where(m, t, zero).sum() / n_tok for t in _terms(d, eps)]
    dsum = seg.sum(d)
    seq = [torch.where(live, t, zero).sum() / n_seq for t in _terms(dsum, eps)]
    amax_t = torch.where(n_tok > 0, _nan_max(d.abs()[m]), float("nan"))
    amax_s = torch.where(n_seq > 0, _nan_max(dsum.abs()[live]), float("nan"))
    return torch.stack((tok[0], tok[1] - 1.0, amax_t, tok[2], tok[3], seq[0], seq[1] - 1.0, amax_s, seq[2], seq[3],
                        n_tok, n_seq)).to(acc)
