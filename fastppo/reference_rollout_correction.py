"""float64 reference of rollout_correction, written per sequence in Python floats from the formulas of its
docstring (verl 0.9.1 rollout_corr_helper, OpenRLHF's seq-mask-tis): the weights, the kept mask and the
statistics that define the modes (IS mean / max / min, each option's masked fraction and sequence mean, the
off-policy kl, k3_kl and chi2). The oracle for tests, not a backend."""

import math

import torch


def _clamp(x, b):
    return x if b is None else min(max(x, -b), b)


def _exp(x):
    return math.inf if x > 709 else math.exp(x)


def _div(lr, kind, b):
    ls = _clamp(lr, b)
    return {"k1": -ls, "k2": 0.5 * ls * ls, "k3": _exp(ls) - 1.0 - ls}[kind]


def _gate_div(old, roll, gate):
    """OpenRLHF's binary_kl / tv of the sampled token's probabilities (clamped to [1e-6, 1 - 1e-6])."""
    if gate == "ratio":
        return 0.0
    p = min(max(_exp(roll), 1e-6), 1 - 1e-6)
    q = min(max(_exp(old), 1e-6), 1 - 1e-6)
    if gate == "tv":
        return abs(p - q)
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def _mean(xs):
    return math.fsum(xs) / len(xs) if xs else 0.0


def rollout_correction(old_logprobs, rollout_logprobs, mask, *, is_level=None, is_mode="truncate", is_max=2.0,
                       is_min=None, is_batch_normalize=False, rejection=None, log_ratio_bound=20.0, is_gate="ratio"):
    """(weights [B, T] float64 or None, kept [B, T] bool, stats dict of Python floats)."""
    old, roll, m = old_logprobs.double().tolist(), rollout_logprobs.double().tolist(), (mask != 0).tolist()
    B, T, b = len(old), len(old[0]) if old else 0, log_ratio_bound
    lrs = [[old[i][t] - roll[i][t] for t in range(T) if m[i][t]] for i in range(B)]
    divs = [[_gate_div(old[i][t], roll[i][t], is_gate) for t in range(T) if m[i][t]] for i in range(B)]
    idx = [[t for t in range(T) if m[i][t]] for i in range(B)]
    stats = {}
    weights = None
    if is_level is not None:
        weights = [[0.0] * T for _ in range(B)]
        lo = 0.0 if is_min is None else is_min
        for i in range(B):
            s = math.fsum(lrs[i])
            if lrs[i]:
                seq_stat = _exp(s / len(lrs[i])) if is_gate == "ratio" else _mean(divs[i])
            gate_out = bool(lrs[i]) and not (lo <= seq_stat <= is_max)
            for t, lr, dv in zip(idx[i], lrs[i], divs[i]):
                raw = _exp(_clamp(s if is_level == "sequence" else lr, b))
                if is_mode == "truncate":
                    w = min(raw, is_max) if is_min is None else min(max(raw, is_min), is_max)
                elif is_mode == "mask":
                    w = raw if lo <= (raw if is_gate == "ratio" else dv) <= is_max else 0.0
                else:
                    w = 0.0 if gate_out else raw
                weights[i][t] = w
        flat = [weights[i][t] for i in range(B) for t in idx[i]]
        stats["rollout_is_mean"] = _mean(flat)
        if is_level == "token":
            stats["rollout_is_max"], stats["rollout_is_min"] = max(flat), min(flat)
        if is_batch_normalize:
            if is_level == "token":
                mean = _mean(flat)
            else:
                mean = _mean([weights[i][idx[i][0]] for i in range(B) if idx[i]])
            if mean > 1e-8:
                weights = [[w / mean for w in row] for row in weights]
        weights = torch.tensor(weights, dtype=torch.float64).reshape(B, T)
    kept = [[bool(m[i][t]) for t in range(T)] for i in range(B)]
    n_tok = sum(len(x) for x in lrs)
    for option, spec in (rejection or {}).items():
        level, kind = option.rsplit("_", 1)
        if kind == "k1":
            lower, upper = spec if isinstance(spec, (tuple, list)) else (1.0 / spec, spec)
            lo, hi = math.log(lower), math.log(upper)
        else:
            lo, hi = -math.inf, spec
        rejected, seq_vals = 0, []
        for i in range(B):
            d = [_div(lr, kind, b) for lr in lrs[i]]
            if not d:
                continue
            if level == "token":
                keep = [lo <= x <= hi for x in d]
                seq_vals.append(_mean(d))
            else:
                v = {"seq_sum": math.fsum, "seq_mean": _mean, "seq_max": max}[level](d)
                keep = [lo <= v <= hi] * len(d)
                seq_vals.append(v)
            for t, k in zip(idx[i], keep):
                rejected += not k
                kept[i][t] = kept[i][t] and k
        stats[f"rollout_rs_{option}_masked_fraction"] = rejected / n_tok if n_tok else 0.0
        stats[f"rollout_rs_{option}_seq_mean"] = _mean(seq_vals)
    flat_lr = [lr for x in lrs for lr in x]
    stats["kl"] = _mean([-x for x in flat_lr])
    stats["k3_kl"] = _mean([_exp(x) - x - 1 for x in flat_lr])
    stats["chi2_token"] = _mean([_exp(2 * _clamp(x, b)) for x in flat_lr]) - 1.0
    stats["chi2_seq"] = _mean([_exp(2 * _clamp(math.fsum(x), b)) for x in lrs]) - 1.0
    return weights, torch.tensor(kept, dtype=torch.bool).reshape(B, T), stats
