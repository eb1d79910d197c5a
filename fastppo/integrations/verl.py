"""verl adapter (verl 0.9).

| verl entry point (and every module that imported it by name)            | fastppo op                 |
|--------------------------------------------------------------------------|----------------------------|
| `verl.utils.torch_functional.logprobs_from_logits`                       | `token_logprobs`           |
| `verl.utils.torch_functional.entropy_from_logits`                        | `token_logprobs(return_entropy)` |
| `core_algos.kl_penalty` (k1/kl, abs, k2/mse, k3/low_var_kl, and "+")     | `kl_penalty`               |
| `core_algos.compute_gae_advantage_return`                                | `gae` + `masked_whiten`    |
| `core_algos.compute_grpo_outcome_advantage` / `compute_rloo_outcome_advantage` | `group_advantages`   |
| `core_algos.compute_value_loss`                                          | `value_loss`               |
| policy-loss registry `get_policy_loss_fn(name)` / `compute_policy_loss_<name>`, `rollout_is_weights` | |
|   "vanilla" (dual_clip = clip_ratio_c)                                   | `ppo_policy_loss("ppo")`   |
|   "gspo"                                                                 | `ppo_policy_loss("gspo_token")` |
|   "sapo" (tau_pos / tau_neg), "gpg", "cispo"                             | `ppo_policy_loss(same name)` |
|   "geo_mean"                                                             | `ppo_policy_loss("gmpo")`  |
|   "dppo_tv", "dppo_kl" (ratio_max = clip_ratio_c), "dro", "clip_cov",    | `ppo_policy_loss(same name)` |
|   "kl_cov"                                                               |                            |
|   "bypass_mode": verl's rollout-correction weights and rejection mask,   | `ppo_policy_loss("gpg")`   |
|   then "reinforce" (with the weights) or "ppo_clip"                      | / `ppo_policy_loss("ppo")` |
| `verl.utils.experimental.torch_functional.FusedLinearForPPO` (subclass)  | `linear_logprobs`          |
| rollout_corr_helper's compute functions, `entropy_from_logits_with_chunking` | see `verl_rollout.py`  |

Host semantics kept: verl's `k3`/`low_var_kl` is its clamped estimator (fastppo "low_var_kl");
"k3+" etc. keep verl's straight-through k2 gradient (a composition of two kl_penalty calls). Group
ids are verl's `index` array (any order, uneven groups): rows are gathered per group size and each
size served by group_advantages; groups of one keep verl's own rule (grpo: score / (1 + eps),
rloo: score) by calling verl's original on those rows. Agg modes map verl's dp_size /
batch_num_tokens / global_batch_size / loss_scale_factor onto fastppo's num_tokens / num_seqs /
horizon; "token-sum" is fastppo's token-sum times verl's dp_size. Policy losses, per registry entry,
as verl 0.9.1 computes them: clip_ratio_low / clip_ratio_high (default clip_ratio); "sapo" always
aggregates seq-mean-token-mean (verl ignores loss_agg_mode) with the taus rounded to the
advantages' dtype as verl does; "geo_mean" ignores loss_agg_mode and global_batch_info and takes
torch.mean over all rows (fastppo gmpo with agg seq-mean-token-mean, num_seqs = B: an empty row
adds 0 and counts); "gspo" is fastppo's gspo_token (the per-token gradient s_b dlogp, log-ratio
capped at 10, sequence mean unclamped). Metrics keep verl's keys and Python floats: ppo_kl is the
masked mean of -(logp - old), clamped to [-20, 20] for vanilla / sapo / cispo and not for gspo /
geo_mean as in verl; pg_clipfrac_lower is verl's 0.0 for gspo / sapo / cispo and pg_clipfrac 0.0 for
sapo; gpg returns verl's empty dict. The loss has verl's result dtype (its loss matrix's dtype,
promoted to float32 by the seq-mean modes and geo_mean, and by a floating mask in token modes).

Differences, documented: GAE advantages/returns are 0 at mask-0 positions (verl carries the last
value there, which no verl loss reads); verl's seq-mean-token-mean divides by count + 1e-8 (a
relative 1e-8 / count, below fp32 rounding); NaN/inf at mask-0 positions of a policy loss's inputs
make verl's seq-mean aggregations and geo_mean NaN (they multiply by the mask) while fastppo's are finite (it selects).
Delegated to verl (counted in `handle.stats.delegated`): kl "full"; dp_size > 1 without global
counts (verl raises); a config verl's own assertion rejects (it raises); rollout_is_weights that
require grad (verl back-propagates into them, fastppo treats them as constants); options fastppo
rejects (clip_ratio_low outside [0, 1], clip_ratio_c <= 1, taus <= 0); geo_mean on non-2-D inputs.
Every registry loss of verl 0.9.1 is served. dppo_tv / dppo_kl truncate at clip_ratio_c (verl's
config.get("clip_ratio_c", 20.0)); clip_cov / kl_cov / dro read config.policy_loss (clip_cov_ratio / lb /
ub, kl_cov_ratio, ppo_kl_coef, dro_beta, with verl's fallbacks for None); clip_cov makes verl's random
draw (torch.randperm on the default generator, the same candidates in the same order: same tokens, same
generator state after); kl_cov's top-k breaks ties by position (verl's topk leaves them unspecified);
ppo_kl is unclamped for dro / clip_cov and the mean |d| for kl_cov, as verl; a dro config without
dro_beta > 0 is delegated (verl raises). bypass_mode calls verl's compute_rollout_correction_and_rejection_mask
(whatever serves it) under no_grad as verl does, then fastppo's REINFORCE (verl's
compute_policy_loss_reinforce, also served: gpg with the IS weights, ppo_kl unclamped vs the rollout) or
vanilla on the rejection mask, verl's metrics merged. The entropy function is bound into the engine when it is
built: patch before building it. FusedLinearForPPO serves its "torch" and "liger" backends alike
(log-probs float32, entropy in the logits' dtype, as verl's torch backend returns).
"""

from __future__ import annotations

import os
from importlib.metadata import version as _dist_version

import numpy as np
import torch
from packaging.version import Version

import fastppo
from fastppo.options import LossOptions

from . import verl_rollout
from ._patching import EntryPoint, entropy_of_logits, host_signature_wrapper

SUPPORTED = ">=0.9, <0.10 (tested: 0.9.1)"
_KL = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "low_var_kl", "k3": "low_var_kl"}


def installed_version() -> str:
    return _dist_version("verl")


def supported(v: str) -> bool:
    return Version("0.9") <= Version(v) < Version("0.10")


def _tf():
    import verl.utils.torch_functional as tf

    return tf


def _ca():
    import verl.trainer.ppo.core_algos as ca

    return ca


def _logits_out_dtype(logits):
    tf = _tf()
    flash = getattr(tf, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", False) and os.environ.get(
        "VERL_DISABLE_FLASH_ATTN_CE", "0") != "1"
    return torch.float32 if flash else logits.dtype


def _serve_logprobs(a):
    logits = a["logits"]
    return fastppo.token_logprobs(logits, a["labels"]).to(_logits_out_dtype(logits))


def _serve_entropy(a):
    logits = a["logits"]
    return entropy_of_logits(logits).to(logits.dtype)


def _serve_kl(a):
    kind = a["kl_penalty"]
    base = kind[:-1] if kind.endswith("+") else kind
    if base not in _KL:
        return NotImplemented   # "full" and unknown kinds: verl raises NotImplementedError itself
    logp, ref = a["logprob"], a["ref_logprob"]
    dtype = torch.result_type(logp, ref)
    fwd = fastppo.kl_penalty(logp, ref, kind=_KL[base]).to(dtype)
    if not kind.endswith("+") or base in ("mse", "k2"):
        return fwd
    st = fastppo.kl_penalty(logp, ref, kind="k2").to(dtype)   # straight-through: k2's gradient, fwd's value
    return st - st.detach() + fwd.detach()


def _serve_gae(a):
    r, v, m = a["token_level_rewards"], a["values"], a["response_mask"]
    with torch.no_grad():
        adv, ret = fastppo.gae(r, v, m, gamma=float(a["gamma"]), lam=float(a["lam"]))
        adv = fastppo.masked_whiten(adv, m)
    dtype = torch.result_type(r, v)
    return adv.to(dtype), ret.to(dtype)


def _group_rows(index):
    """Row indices of each group of verl's `index` array, in first-seen order."""
    groups: dict = {}
    for i, g in enumerate(np.asarray(index).tolist()):
        groups.setdefault(g, []).append(i)
    return list(groups.values())


def _outcome(kind):
    def serve(a, original):
        r, m, index = a["token_level_rewards"], a["response_mask"], np.asarray(a["index"])
        eps = float(a["epsilon"])
        norm = bool(a.get("norm_adv_by_std_in_grpo", True))
        with torch.no_grad():
            scores = r.sum(dim=-1)
            out = torch.zeros(torch.broadcast_shapes(r.shape, m.shape), dtype=torch.result_type(scores, m),
                              device=r.device)
            by_size: dict[int, list[int]] = {}
            for rows in _group_rows(index):
                by_size.setdefault(len(rows), []).extend(rows)   # each size's groups stay contiguous
            for size, rows in by_size.items():
                idx = torch.tensor(rows, device=r.device)
                if size == 1:   # verl's own rule for groups of one, from verl itself
                    kw = {"norm_adv_by_std_in_grpo": norm} if kind == "grpo" else {}
                    out[idx] = original(token_level_rewards=r[idx], response_mask=m[idx], index=index[rows],
                                        epsilon=eps, config=a["config"], **kw)[0].to(out.dtype)
                    continue
                g = fastppo.group_advantages(scores[idx], size, kind=kind, norm_by_std=norm, eps=eps)
                out[idx] = g.to(scores.dtype).unsqueeze(-1) * m[idx]
        return out, out
    return serve


def _agg_counts(mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor):
    """verl's agg_loss knobs as fastppo's global counts (+ "dp_scale": verl's token-sum multiplies the
    local sum by dp_size); None when verl would raise."""
    if mode == "token-mean":
        if batch_num_tokens is None:
            return None if dp_size > 1 else {}
        return {"num_tokens": batch_num_tokens / dp_size}
    if mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        kw = {}
        if global_batch_size is None:
            if dp_size > 1:
                return None
        else:
            kw["num_seqs"] = global_batch_size / dp_size
        if mode == "seq-mean-token-sum-norm" and loss_scale_factor is not None:
            kw["horizon"] = loss_scale_factor
        return kw
    if mode == "token-sum":
        return {} if dp_size == 1 else {"dp_scale": dp_size}
    return None   # unknown modes (verl raises)


def _serve_value_loss(a):
    counts = _agg_counts(a["loss_agg_mode"], a["dp_size"], a["batch_num_tokens"], a["global_batch_size"],
                         a["loss_scale_factor"])
    if counts is None:
        return NotImplemented
    scale = counts.pop("dp_scale", 1)
    loss, stats = fastppo.value_loss(a["vpreds"], a["values"], a["returns"], a["response_mask"],
                                     clip=a["cliprange_value"], agg=a["loss_agg_mode"], **counts)
    return (loss * scale if scale != 1 else loss), stats["vf_clipfrac"]


# verl registry name -> (fastppo policy_loss, verl's config assertion, verl's ppo_kl metric: masked mean of
# -(logp - old) clamped to [-20, 20] ("clamp"), unclamped ("raw") or of |logp - old| ("abs"), clipfrac_lower
# reported by fastppo (else verl's 0.0), the metric keys verl returns)
_KEYS3 = ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower")
_POLICY_LOSSES = {
    "vanilla": ("ppo", "not_algo", "clamp", True, _KEYS3),
    "gspo": ("gspo_token", "actor", "raw", False, _KEYS3),
    "sapo": ("sapo", "actor", "clamp", False, _KEYS3),
    "gpg": ("gpg", None, "clamp", False, ()),
    "geo_mean": ("gmpo", "not_algo", "raw", True, _KEYS3),
    "cispo": ("cispo", "actor", "clamp", False, _KEYS3),
    "dppo_tv": ("dppo_tv", "not_algo", "clamp", True, _KEYS3),
    "dppo_kl": ("dppo_kl", "not_algo", "clamp", True, _KEYS3),
    "dro": ("dro", "policy_cfg", "raw", False, ("actor/ppo_kl",)),
    "clip_cov": ("clip_cov", "policy_cfg", "raw", False, ("actor/pg_clipfrac", "actor/ppo_kl")),
    "kl_cov": ("kl_cov", "policy_cfg", "abs", False, ("actor/ppo_kl",)),
    # not registered: REINFORCE, which verl's bypass_mode calls (log-prob args: rollout_log_prob, log_prob)
    "reinforce": ("gpg", None, "raw", False, ("actor/ppo_kl",)),
}


def _config_ok(cfg, rule):
    """verl's own `assert` on the config type (a failing one is left for verl to raise)."""
    if cfg is None:
        return False
    if rule == "actor":
        from verl.workers.config import ActorConfig

        return isinstance(cfg, ActorConfig)
    if rule in ("not_algo", "policy_cfg"):
        from verl.trainer.config import AlgoConfig

        if isinstance(cfg, AlgoConfig):
            return False
    return rule != "policy_cfg" or getattr(cfg, "policy_loss", None) is not None


def _clip_range(cfg):
    clip = cfg.clip_ratio
    low = cfg.clip_ratio_low if cfg.clip_ratio_low is not None else clip
    high = cfg.clip_ratio_high if cfg.clip_ratio_high is not None else clip
    return low, high


def _loss_dtype(name, a, agg):
    """The dtype verl's arithmetic gives the loss: its loss matrix's promoted dtype, then agg_loss's
    promotions (the seq-mean modes and geo_mean's means divide by float32 counts; token-mean /
    token-sum multiply by the mask, which promotes with a floating mask)."""
    ts = [a["log_prob"], a["advantages"]] + ([] if name in ("gpg", "reinforce") else [a["old_log_prob"]])
    if a["rollout_is_weights"] is not None:
        ts.append(a["rollout_is_weights"])
    dtype = ts[0].dtype
    for t in ts[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    m = a["response_mask"]
    if name == "geo_mean" or agg.startswith("seq-mean"):
        return torch.promote_types(dtype, torch.float32)
    return torch.promote_types(dtype, m.dtype) if m.is_floating_point() else dtype


def _or(value, default):
    return default if value is None else value


def _policy_kwargs(name, a):
    """ppo_policy_loss keywords reproducing verl's compute_policy_loss_<name>, or None where verl's
    semantics cannot be reproduced (the call is then delegated to verl)."""
    kind, rule, _, _, _ = _POLICY_LOSSES[name]
    cfg, logp, adv, isw = a["config"], a["log_prob"], a["advantages"], a["rollout_is_weights"]
    if not _config_ok(cfg, rule) or logp.dim() != 2:
        return None
    pl = cfg.policy_loss if rule == "policy_cfg" else None
    if isw is not None and isw.requires_grad:
        return None   # verl back-propagates into the weights; fastppo treats them as constants
    kw = {"policy_loss": kind}
    if name == "geo_mean":   # verl ignores loss_agg_mode and global_batch_info: torch.mean over the rows
        if logp.shape[0] == 0:
            return None
        kw.update(agg="seq-mean-token-mean", num_seqs=logp.shape[0])
    else:
        mode = "seq-mean-token-mean" if name == "sapo" else a["loss_agg_mode"]   # sapo: always seq-mean-token-mean
        info = dict(getattr(cfg, "global_batch_info", None) or {})
        counts = _agg_counts(mode, info.get("dp_size", 1), info.get("batch_num_tokens"),
                             info.get("global_batch_size"), info.get("loss_scale_factor"))
        if counts is None:
            return None
        kw.update(agg=mode, **counts)
    if name not in ("gpg", "reinforce", "dro", "kl_cov"):
        kw["clip_low"], kw["clip_high"] = _clip_range(cfg)
    if name in ("dppo_tv", "dppo_kl"):   # verl's TIS cap of the stop-gradient ratio
        kw["ratio_max"] = cfg.get("clip_ratio_c", 20.0)
    if name == "dro":
        kw["dro_beta"] = pl.dro_beta   # None or <= 0: verl raises its ValueError
    if name == "clip_cov":   # verl's fallbacks for None
        kw.update(cov_ratio=_or(pl.clip_cov_ratio, 0.0002), cov_lb=_or(pl.clip_cov_lb, 1.0),
                  cov_ub=_or(pl.clip_cov_ub, 5.0))
    if name == "kl_cov":
        kw.update(cov_ratio=_or(pl.kl_cov_ratio, 0.0002), kl_cov_coef=_or(pl.ppo_kl_coef, 1.0))
    if name == "vanilla":
        kw["dual_clip"] = cfg.get("clip_ratio_c", 3.0)
        if not kw["dual_clip"] > 1.0:
            return None   # verl asserts with its message
    if name == "sapo":   # verl makes the taus tensors of the advantages' dtype
        kw["sapo_tau_pos"] = float(torch.tensor(cfg.tau_pos, dtype=adv.dtype))
        kw["sapo_tau_neg"] = float(torch.tensor(cfg.tau_neg, dtype=adv.dtype))
    try:   # an option fastppo rejects (e.g. clip_ratio_low > 1) is verl's to compute
        LossOptions.policy(**{k: v for k, v in kw.items() if k != "dp_scale"})
    except (TypeError, ValueError):
        return None
    return kw


def _ppo_kl(kind, logp, old, m):
    """verl's actor/ppo_kl metric: the masked mean (verl's masked_mean) of -(logp - old), clamped to
    [-20, 20] ("clamp") or not ("raw"), or of |logp - old| ("abs")."""
    neg_kl = fastppo.kl_penalty(old.detach(), logp.detach(), kind="k1")
    if kind == "clamp":
        neg_kl = neg_kl.clamp(-20, 20)
    elif kind == "abs":
        neg_kl = neg_kl.abs()
    return float(_tf().masked_mean(neg_kl, m))


def _serve_policy(name, a):
    """fastppo's computation of verl's compute_policy_loss_<name> on the bound arguments `a`, or
    NotImplemented (then verl computes it)."""
    _, _, kl_mode, has_lower, keys = _POLICY_LOSSES[name]
    kw = _policy_kwargs(name, a)
    if kw is None:
        return NotImplemented
    scale = kw.pop("dp_scale", 1)
    old = a["rollout_log_prob"] if name == "reinforce" else a["old_log_prob"]
    logp, adv, m = a["log_prob"], a["advantages"], a["response_mask"]
    loss, stats = fastppo.ppo_policy_loss(logp, old, adv, m, rollout_is_weights=a["rollout_is_weights"], **kw)
    loss = loss.to(_loss_dtype(name, a, kw["agg"]))
    if scale != 1:   # verl's token-sum: the local masked sum times dp_size
        loss = loss * scale
    values = {"actor/pg_clipfrac": 0.0 if name == "sapo" else float(stats["clipfrac"]),
              "actor/pg_clipfrac_lower": float(stats["clipfrac_lower"]) if has_lower else 0.0}
    if keys:
        values["actor/ppo_kl"] = _ppo_kl(kl_mode, logp, old, m)
    return loss, {k: values[k] for k in keys}


def _policy_loss(name):
    """The replacement of verl's registry entry `name` (compute_policy_loss_<name>)."""
    return lambda a: _serve_policy(name, a)


def _serve_bypass(a):
    """verl's compute_policy_loss_bypass_mode: the rollout-correction IS weights and rejection mask from
    verl's rollout_corr_helper (as verl calls it, under no_grad: current policy vs old = rollout), then
    REINFORCE with those weights on the rejection mask, or PPO-clip (vanilla) on it without them, both
    fastppo's; verl's metrics merged. A config verl rejects, or a dispatched loss fastppo does not serve,
    is verl's."""
    cfg = a["config"]
    rc = cfg.policy_loss.get("rollout_correction", None) if cfg is not None and hasattr(cfg, "policy_loss") else None
    loss_type = None if rc is None else rc.get("loss_type", "ppo_clip")
    if loss_type not in ("reinforce", "ppo_clip"):
        return NotImplemented
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask

    logp, rollout = a["log_prob"], a["old_log_prob"]
    with torch.no_grad():
        isw_proto, mask, metrics = compute_rollout_correction_and_rejection_mask(
            old_log_prob=logp, rollout_log_prob=rollout, response_mask=a["response_mask"],
            rollout_is=rc.get("rollout_is", None), rollout_is_threshold=rc.get("rollout_is_threshold", 2.0),
            rollout_is_batch_normalize=rc.get("rollout_is_batch_normalize", False),
            rollout_rs=rc.get("rollout_rs", None), rollout_rs_threshold=rc.get("rollout_rs_threshold", None))
    isw = isw_proto.batch["rollout_is_weights"] if isw_proto else None
    inner = dict(a, response_mask=mask)
    if loss_type == "reinforce":
        out = _serve_policy("reinforce", dict(inner, rollout_log_prob=rollout, rollout_is_weights=isw))
    else:
        out = _serve_policy("vanilla", dict(inner, rollout_is_weights=None))
    if out is NotImplemented:
        return NotImplemented
    loss, pg_metrics = out
    pg_metrics.update(metrics)
    return loss, pg_metrics


def _fused_linear_class(original, stats):
    class FusedLinearForPPO(original):
        __doc__ = "fastppo.linear_logprobs behind verl's FusedLinearForPPO. " + (original.__doc__ or "")

        def forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
            stats.served["FusedLinearForPPO"] += 1
            logp, ent = fastppo.linear_logprobs(hidden_states, vocab_weights, input_ids.to(torch.int64),
                                                temperature=temperature, return_entropy=True)
            return logp.float(), ent.to(torch.result_type(hidden_states, vocab_weights))

    FusedLinearForPPO.__module__ = original.__module__
    FusedLinearForPPO.__qualname__ = original.__qualname__
    FusedLinearForPPO.__fastppo_original__ = original
    return FusedLinearForPPO


def _function(name, serve, with_original=False):
    def build(original, stats):
        fn = (lambda a: serve(a, original)) if with_original else serve
        return host_signature_wrapper(original, name, stats, fn)
    return build


def entry_points() -> list[EntryPoint]:
    tf, ca = _tf(), _ca()
    table = [
        ("logprobs_from_logits", tf, "logprobs_from_logits", _function("logprobs_from_logits", _serve_logprobs)),
        ("entropy_from_logits", tf, "entropy_from_logits", _function("entropy_from_logits", _serve_entropy)),
        ("kl_penalty", ca, "kl_penalty", _function("kl_penalty", _serve_kl)),
        ("compute_gae_advantage_return", ca, "compute_gae_advantage_return",
         _function("compute_gae_advantage_return", _serve_gae)),
        ("compute_grpo_outcome_advantage", ca, "compute_grpo_outcome_advantage",
         _function("compute_grpo_outcome_advantage", _outcome("grpo"), True)),
        ("compute_rloo_outcome_advantage", ca, "compute_rloo_outcome_advantage",
         _function("compute_rloo_outcome_advantage", _outcome("rloo"), True)),
        ("compute_value_loss", ca, "compute_value_loss", _function("compute_value_loss", _serve_value_loss)),
    ]
    regs = tuple((f"core_algos.{n}", getattr(ca, n)) for n in ("POLICY_LOSS_REGISTRY", "ADV_ESTIMATOR_REGISTRY")
                 if isinstance(getattr(ca, n, None), dict))
    for name in _POLICY_LOSSES:
        table.append((f"policy_loss_{name}", ca, f"compute_policy_loss_{name}",
                      _function(f"policy_loss_{name}", _policy_loss(name))))
    table.append(("policy_loss_bypass_mode", ca, "compute_policy_loss_bypass_mode",
                  _function("policy_loss_bypass_mode", _serve_bypass)))
    import verl.utils.experimental.torch_functional as xtf  # models import the class from here at call time

    eps = [EntryPoint(name, (lambda h=h, attr=attr: (h, attr)), build, regs) for name, h, attr, build in table]
    eps.append(EntryPoint("FusedLinearForPPO", lambda: (xtf, "FusedLinearForPPO"), _fused_linear_class))
    return eps + verl_rollout.entry_points()
