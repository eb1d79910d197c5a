"""The kept set of vLLM's V1 sampler, as a dense bool mask (what `KeptSet.from_filters` compresses).

vLLM V1 (vllm/v1/sample/sampler.py, ops/topk_topp_sampler.py `apply_top_k_top_p_pytorch`,
logits_processor/builtin.py `MinPLogitsProcessor`) processes a row of logits in this order, in fp32:
1. temperature: z / tau. A row with tau < 1e-5 is sampled greedily: its kept set is {argmax of the raw
   logits} (torch.argmax: the lowest id among equal maxima).
2. min-p (an argmax-invariant logits processor): p = softmax(z / tau); drop ids with p < min_p * max(p).
3. top-k: sort the row ascending; the threshold is the sorted value at position V - k; drop ids whose
   logit is below it. Ties at the threshold are all kept (a row can keep more than k ids).
4. top-p over the probabilities renormalised after top-k: softmax of the sorted (filtered) row, cumulative
   sum from the smallest; drop positions where cumsum <= 1 - top_p; the largest is always kept.
Kept = the ids whose logit is still finite. Parameters are a Python number (every row) or a tensor with one
value per row (logits.shape[:-1] or flat); top_k <= 0 or >= V means no top-k for that row. As in vLLM, a
scalar top_p of 1.0 (and top_k None / <= 0) skips the step, while a per-row tensor runs it on every row: a
row with top_p = 1 then still drops ids whose fp32 probability underflows to exactly 0 at the start of the
cumulative sum (vLLM does the same).

Ties in top-p: the ascending sort here is stable, so among equal logits the lower id comes first and is
dropped first (the higher ids are kept). vLLM calls torch.sort without `stable=True`; torch's CPU sort is
stable in practice, CUDA's order of equal keys is not specified. vLLM's Triton top-k/top-p kernel (used on
GPU when Triton is available) and FlashInfer's rejection sampler decide thresholds without a full sort; they
agree with this mask except for ties at the threshold (the Triton top-k keeps exactly k ids) and for
probabilities within rounding of the top-p boundary.
"""

from __future__ import annotations

import torch

_SAMPLING_EPS = 1e-5        # vLLM's greedy-temperature threshold


def _per_row(x, n_rows: int, name: str, dtype, device):
    """A scalar or an n_rows-element tensor as a [n_rows] tensor of `dtype`."""
    if isinstance(x, torch.Tensor):
        if x.numel() != n_rows:
            raise ValueError(f"{name} must be a number or have one value per row ({n_rows}), got shape "
                             f"{tuple(x.shape)}")
        return x.reshape(-1).to(device=device, dtype=dtype)
    return torch.full((n_rows,), x, dtype=dtype, device=device)


def _check_range(t: torch.Tensor, name: str, lo: float, hi: float, lo_open: bool = False):
    bad = ((t <= lo) if lo_open else (t < lo)) | (t > hi) | torch.isnan(t)
    if bool(bad.any()):
        raise ValueError(f"{name} must lie in {'(' if lo_open else '['}{lo}, {hi}], got {t[bad][0].item()}")


def kept_mask_from_filters(logits: torch.Tensor, *, temperature=1.0, top_k=None, top_p=None,
                           min_p=None) -> torch.Tensor:
    """Bool [..., V]: True where vLLM's V1 sampler keeps the id (module doc). Reads the whole [N, V] row set
    and syncs with the host to validate its parameters (a preprocessing step, not a training op)."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 1:
        raise ValueError(f"from_filters needs floating-point logits [..., V], got "
                         f"{getattr(logits, 'dtype', type(logits).__name__)}")
    V = logits.shape[-1]
    x = logits.reshape(-1, V).to(torch.float32, copy=True)
    n, dev = x.shape[0], x.device
    tau = _per_row(temperature, n, "temperature", torch.float32, dev)
    _check_range(tau, "temperature", 0.0, float("inf"))
    greedy = tau < _SAMPLING_EPS
    argmax = x.argmax(-1) if n and V else torch.zeros(n, dtype=torch.long, device=dev)
    x.div_(torch.where(greedy, 1.0, tau).unsqueeze(1))

    if min_p is not None:
        mp = _per_row(min_p, n, "min_p", torch.float32, dev)
        _check_range(mp, "min_p", 0.0, 1.0)
        probs = torch.softmax(x, dim=-1)
        x[probs < probs.amax(-1, keepdim=True) * mp.unsqueeze(1)] = float("-inf")

    use_k = top_k is not None and (isinstance(top_k, torch.Tensor) or 0 < int(top_k) < V)
    use_p = top_p is not None and (isinstance(top_p, torch.Tensor) or float(top_p) < 1.0)
    if use_k or use_p:
        x_sort, idx = x.sort(dim=-1, descending=False, stable=True)
        if use_k:
            k = _per_row(top_k, n, "top_k", torch.long, dev)
            k = torch.where((k <= 0) | (k > V), V, k)
            thr = x_sort.gather(1, (V - k).unsqueeze(1))
            x_sort.masked_fill_(x_sort < thr, float("-inf"))
        if use_p:
            p = _per_row(top_p, n, "top_p", torch.float32, dev)
            _check_range(p, "top_p", 0.0, 1.0, lo_open=True)
            cum = x_sort.softmax(dim=-1).cumsum(dim=-1)
            drop = cum <= 1 - p.unsqueeze(1)
            drop[:, -1] = False
            x_sort.masked_fill_(drop, float("-inf"))
        x = x.scatter(-1, idx, x_sort)

    kept = x > float("-inf")
    if bool(greedy.any()):
        one = torch.zeros_like(kept).scatter_(1, argmax.unsqueeze(1), True)
        kept = torch.where(greedy.unsqueeze(1), one, kept)
    return kept.reshape(logits.shape)
