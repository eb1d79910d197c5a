"""The body of torch.ops.fastppo.rollout_correction in PyTorch ops: IS weights, the rejection mask and the
statistics (formulas: fastppo.rollout_correction's docstring). Every masked position is selected away before
any arithmetic (`torch.where`), so NaN / inf there is never read; every statistic is one masked reduction
over [B, T] or over the [B] per-sequence values, 0-d tensors, no host sync.

Traffic: each per-token quantity (log-ratio, ratio, k1 / k2 / k3 of a rejection option) is formed once and
reduced per sequence once ([B] values); the batch statistics are reductions of those [B] vectors, plus one
[B, T] reduction per token-level statistic."""

from __future__ import annotations

import math

import torch

from .options import RolloutCorrectionOptions

OFFPOLICY_STATS = ("training_ppl", "training_log_ppl", "kl", "k3_kl", "rollout_ppl", "rollout_log_ppl",
                   "log_ppl_diff", "log_ppl_abs_diff", "log_ppl_diff_max", "log_ppl_diff_min", "ppl_ratio",
                   "chi2_token", "chi2_seq", "num_tokens", "num_seqs")
IS_STATS = ("mean", "ratio_fraction_high", "ratio_fraction_low", "max", "min", "std", "eff_sample_size",
            "seq_mean", "seq_std", "seq_max", "seq_min", "seq_max_deviation", "seq_fraction_high",
            "seq_fraction_low")
RS_STATS = ("mean", "max", "min", "fraction_high", "fraction_low", "std", "seq_mean", "seq_std", "seq_max",
            "seq_min", "seq_max_deviation", "seq_fraction_high")


def stat_names(opts: RolloutCorrectionOptions) -> list[str]:
    """The names of the statistics vector, in order (verl's metric keys without "rollout_corr/")."""
    names = []
    if opts.is_level is not None:
        names += [f"rollout_is_{k}" for k in IS_STATS]
        if opts.is_mode != "truncate":
            names.append("rollout_is_oob_ratio")
        if opts.is_mode == "seq-mask":
            names.append("rollout_is_seq_oob_ratio")
        if opts.is_batch_normalize:
            names.append("rollout_is_batch_norm_factor")
    for option, _, _ in opts.rejection:
        names += [f"rollout_rs_{option}_{k}" for k in RS_STATS]
        if option.endswith("k1"):
            names.append(f"rollout_rs_{option}_seq_fraction_low")
        names += [f"rollout_rs_{option}_masked_fraction", f"rollout_rs_{option}_seq_masked_fraction"]
    if opts.rejection:
        names += ["rollout_rs_masked_fraction", "rollout_rs_seq_masked_fraction"]
    return names + list(OFFPOLICY_STATS)


class _Masked:
    """Reductions over the mask-1 tokens of [B, T] values and over the sequences of [B] values."""

    def __init__(self, m, acc):
        self.m, self.acc = m, acc
        self.n = m.to(acc).sum(-1)                     # [B] valid tokens per sequence
        self.N = self.n.sum()
        self.valid = self.n > 0                          # [B] sequences with a valid token
        self.S = self.valid.to(acc).sum()
        self.zero = self.N.new_zeros(())

    def sel(self, x, fill=0.0):
        return torch.where(self.m, x, torch.full_like(x, fill))

    def mean(self, x):                                   # verl_F.masked_mean over everything
        return self.sel(x).sum() / self.N.clamp_min(1)

    def row_sum(self, x):
        return self.sel(x).sum(-1)

    def row_mean(self, x):                               # 0 on empty sequences, as verl's masked_mean
        return self.row_sum(x) / self.n.clamp_min(1)

    def row_max(self, x):
        top = self.sel(x, -math.inf).amax(-1)
        return torch.where(self.valid, top, torch.zeros_like(top))

    def tok_max(self, x):
        return self.sel(x, -math.inf).amax()

    def tok_min(self, x):
        return self.sel(x, math.inf).amin()

    def frac(self, cond):                                # fraction of the valid tokens where cond holds
        return self.mean(cond.to(self.acc))

    def clamped_std(self, x, lo, hi):                    # verl: sqrt(max(E[c^2] - E[c]^2, 0)), c = clamp(x)
        c = x.clamp(min=lo, max=hi)
        var = self.mean(c * c) - self.mean(c).square()
        return torch.where(self.N > 1, var.clamp_min(0).sqrt(), self.zero)

    # over the valid sequences of a [B] vector
    def seq_mean(self, v):
        return torch.where(self.valid, v, torch.zeros_like(v)).sum() / self.S.clamp_min(1)

    def seq_std(self, v):                                # unbiased; 0 for fewer than two sequences
        dev = torch.where(self.valid, v - self.seq_mean(v), torch.zeros_like(v))
        var = dev.square().sum() / (self.S - 1).clamp_min(1)
        return torch.where(self.S > 1, var.sqrt(), self.zero)

    def seq_max(self, v):
        return torch.where(self.S > 0, torch.where(self.valid, v, torch.full_like(v, -math.inf)).amax(), self.zero)

    def seq_min(self, v):
        return torch.where(self.S > 0, torch.where(self.valid, v, torch.full_like(v, math.inf)).amin(), self.zero)

    def seq_frac(self, cond):
        return self.seq_mean(cond.to(self.acc))


def _clamp(x, bound):
    return x if bound is None else x.clamp(-bound, bound)


def _std_all(v):                                        # torch.std over every row, 0 for one row
    return v.std() if v.numel() > 1 else v.new_zeros(())


def gate_divergence(old, roll, gate):
    """OpenRLHF 0.11's per-token gate statistic (openrlhf/models/loss.py, PolicyLoss.forward):
        p = clamp(exp(rollout), 1e-6, 1 - 1e-6), q = clamp(exp(old), 1e-6, 1 - 1e-6)
        binary_kl = p log(p / q) + (1 - p) log((1 - p) / (1 - q))        tv = |p - q|
    the divergence between the rollout and the trainer's Bernoulli of the sampled token (FlashREINFORCE's
    trust region), in the host's operation order."""
    p = torch.exp(roll).clamp(1e-6, 1 - 1e-6)
    q = torch.exp(old).clamp(1e-6, 1 - 1e-6)
    if gate == "tv":
        return (p - q).abs()
    return p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()


def _importance(lr, old, roll, M, opts, stats):
    """IS weights [B, T] (0 at masked positions) and their statistics (verl's compute_is_metrics)."""
    b, hi = opts.log_ratio_bound, opts.is_max
    lo = opts.is_min if opts.is_min is not None else 1.0 / hi   # verl: the metrics' lower bound is 1 / upper
    seq_lr = M.row_sum(lr)                                        # [B] log of the sequence ratio
    if opts.is_level == "sequence":
        raw = M.sel(torch.exp(_clamp(seq_lr, b)).unsqueeze(-1).expand_as(lr))
    else:
        raw = M.sel(torch.exp(_clamp(lr, b)))
    seq_out = None
    if opts.is_mode == "truncate":
        w = M.sel(raw.clamp(min=opts.is_min, max=hi))
        outside = None
    else:
        low = 0.0 if opts.is_min is None else opts.is_min
        div = None if opts.is_gate == "ratio" else gate_divergence(old, roll, opts.is_gate)
        if opts.is_mode == "mask":
            tok = raw if div is None else div
            outside = ~((tok >= low) & (tok <= hi))      # NaN is outside, as in verl / OpenRLHF
        else:   # seq-mask: the sequence's geometric-mean ratio exp(mean_b lr) (a divergence: its mean) gates
            gate = torch.exp(M.row_mean(lr)) if div is None else M.row_mean(div)
            seq_out = ~((gate >= low) & (gate <= hi))
            outside = seq_out.unsqueeze(-1).expand_as(lr)
        w = M.sel(torch.where(outside, torch.zeros_like(raw), raw))
    k = "rollout_is_"
    stats[k + "mean"] = M.mean(w)
    if opts.is_level == "sequence":
        ub = math.inf if b is None else b
        stats[k + "ratio_fraction_high"] = (seq_lr > math.log(hi)).to(M.acc).mean()
        stats[k + "ratio_fraction_low"] = (seq_lr < math.log(lo)).to(M.acc).mean()
        stats[k + "max"] = torch.exp(seq_lr.amax().clamp(max=ub))
        stats[k + "min"] = torch.exp(seq_lr.amin())
    else:
        stats[k + "ratio_fraction_high"] = M.frac(raw > hi)
        stats[k + "ratio_fraction_low"] = M.frac(raw < lo)
        stats[k + "max"] = M.tok_max(w)
        stats[k + "min"] = M.tok_min(w)
    wc = w.clamp(min=0.0, max=hi)
    stats[k + "std"] = M.clamped_std(w, 0.0, hi)
    stats[k + "eff_sample_size"] = 1.0 / M.mean((wc / (M.mean(wc) + 1e-8)).square())
    seq_w, seq_raw = M.row_mean(w), M.row_mean(raw)               # over every row, empty ones 0 (verl)
    stats[k + "seq_mean"] = seq_w.mean()
    stats[k + "seq_std"] = _std_all(seq_w)
    stats[k + "seq_max"] = seq_w.amax()
    stats[k + "seq_min"] = seq_w.amin()
    stats[k + "seq_max_deviation"] = (seq_w - 1.0).abs().amax()
    stats[k + "seq_fraction_high"] = (seq_raw > hi).to(M.acc).mean()
    stats[k + "seq_fraction_low"] = (seq_raw < lo).to(M.acc).mean()
    if outside is not None:
        # verl's oob ratio counts (raw < low) | (raw > hi): a NaN ratio is dropped but not counted (mask);
        # seq-mask counts what it dropped, as OpenRLHF's is_filter_ratio
        # (a divergence gate counts what it dropped, NaN included, as OpenRLHF's is_filter_ratio)
        ratio_mask = opts.is_mode == "mask" and opts.is_gate == "ratio"
        stats[k + "oob_ratio"] = M.frac((raw < low) | (raw > hi)) if ratio_mask else M.frac(outside)
    if opts.is_mode == "seq-mask":
        stats[k + "seq_oob_ratio"] = M.seq_frac(seq_out)
    if opts.is_batch_normalize:
        if opts.is_level == "sequence":
            mean = M.seq_mean(seq_w)
        else:
            mean = M.mean(w)
        ok = mean > 1e-8
        w = torch.where(ok, w / torch.where(ok, mean, torch.ones_like(mean)), w)
        stats[k + "batch_norm_factor"] = torch.where(ok, mean, torch.ones_like(mean))
    return w


def _divergences(lr, bound):
    lrs = _clamp(lr, bound)
    return {"k1": -lrs, "k2": 0.5 * lrs.square(), "k3": torch.exp(lrs) - 1.0 - lrs}


def _rejection(lr, M, opts, stats):
    """The kept mask [B, T] (bool, valid tokens only) of every rejection option, and their statistics
    (verl's compute_rollout_rejection_mask / compute_rs_metrics)."""
    div = _divergences(lr, opts.log_ratio_bound)
    final = M.m
    for option, lower, upper in opts.rejection:
        level, kind = option.rsplit("_", 1)
        tok = div[kind]
        k1 = kind == "k1"
        hi = math.log(upper) if k1 else upper
        lo = math.log(lower) if k1 else 0.0
        if level == "token":
            seq = M.row_mean(tok)
            per_tok = tok
        else:
            seq = {"seq_sum": M.row_sum, "seq_mean": M.row_mean, "seq_max": M.row_max}[level](tok)
            per_tok = seq.unsqueeze(-1).expand_as(lr)
        keep = per_tok <= hi
        if k1:
            keep = keep & (per_tok >= lo)
        k = f"rollout_rs_{option}_"
        stats[k + "mean"] = M.mean(per_tok)
        if level == "token":
            stats[k + "max"], stats[k + "min"] = M.tok_max(tok), M.tok_min(tok)
            stats[k + "fraction_high"] = M.frac(tok > hi)
            stats[k + "fraction_low"] = M.frac(tok < lo) if k1 else M.zero
        else:   # verl: over the valid sequences
            stats[k + "max"], stats[k + "min"] = M.seq_max(seq), M.seq_min(seq)
            stats[k + "fraction_high"] = M.seq_frac(seq > hi)
            stats[k + "fraction_low"] = M.seq_frac(seq < lo) if k1 else M.zero
        stats[k + "std"] = M.clamped_std(per_tok, lo, hi)
        stats[k + "seq_mean"] = M.seq_mean(seq)
        stats[k + "seq_std"] = M.seq_std(seq)
        stats[k + "seq_max"] = M.seq_max(seq)
        stats[k + "seq_min"] = M.seq_min(seq)
        stats[k + "seq_max_deviation"] = M.seq_max(seq.abs())
        stats[k + "seq_fraction_high"] = M.seq_frac(seq > hi)
        if k1:
            stats[k + "seq_fraction_low"] = M.seq_frac(seq < lo)
        stats[k + "masked_fraction"] = M.frac(~keep)
        stats[k + "seq_masked_fraction"] = M.seq_frac((M.m & ~keep).any(-1))
        final = final & keep
    if opts.rejection:
        stats["rollout_rs_masked_fraction"] = M.frac(~final)
        stats["rollout_rs_seq_masked_fraction"] = (M.m & ~final).any(-1).to(M.acc).mean()
    return final


def _offpolicy(old, roll, lr, M, bound, stats):
    """verl's compute_offpolicy_metrics (per-sequence means over every row: an empty row gives 0)."""
    mo, mr = M.row_mean(old), M.row_mean(roll)
    stats["training_ppl"] = torch.exp(-mo).mean()
    stats["training_log_ppl"] = (-mo).mean()
    stats["kl"] = M.mean(roll - old)
    stats["k3_kl"] = M.mean(torch.exp(lr) - lr - 1)
    stats["rollout_ppl"] = torch.exp(-mr).mean()
    stats["rollout_log_ppl"] = (-mr).mean()
    diff = mr - mo
    stats["log_ppl_diff"] = diff.mean()
    stats["log_ppl_abs_diff"] = diff.abs().mean()
    stats["log_ppl_diff_max"] = diff.amax()
    stats["log_ppl_diff_min"] = diff.amin()
    stats["ppl_ratio"] = torch.exp(diff).mean()
    stats["chi2_token"] = M.mean(torch.exp(_clamp(lr, bound)).square()) - 1.0
    stats["chi2_seq"] = torch.exp(2.0 * _clamp(M.row_sum(lr), bound)).mean() - 1.0
    stats["num_tokens"] = M.N
    stats["num_seqs"] = M.S


def rollout_correction_torch(old_logprobs, rollout_logprobs, mask, opts: RolloutCorrectionOptions):
    """(weights [B, T] (empty without is_level), kept [B, T] bool, stats dict) for [B, T] inputs."""
    acc = torch.float64 if torch.float64 in (old_logprobs.dtype, rollout_logprobs.dtype) else torch.float32
    m = mask != 0
    M = _Masked(m, acc)
    old, roll = M.sel(old_logprobs.to(acc)), M.sel(rollout_logprobs.to(acc))
    lr = old - roll                                     # log(pi_train / pi_rollout), 0 at masked positions
    stats: dict[str, torch.Tensor] = {}
    w = _importance(lr, old, roll, M, opts, stats) if opts.is_level is not None else lr.new_empty((0,))
    kept = _rejection(lr, M, opts, stats)
    _offpolicy(old, roll, lr, M, opts.log_ratio_bound, stats)
    return w, kept, stats
