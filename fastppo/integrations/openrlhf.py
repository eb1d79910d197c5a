"""OpenRLHF adapter (OpenRLHF 0.11).

| OpenRLHF entry point (and every module that imported it by name)          | fastppo op         |
|----------------------------------------------------------------------------|--------------------|
| `openrlhf.models.utils.log_probs_from_logits`                              | `token_logprobs`   |
| `openrlhf.models.utils.compute_entropy`                                    | `token_logprobs(return_entropy)` |
| `openrlhf.models.utils.compute_approx_kl` (k1, k2, k3, `unbiased_gradient`) | `kl_penalty`       |
| `openrlhf.models.loss.PolicyLoss` ("ppo", dual clip, token / sequence loss, `action_mask=None`) | `ppo_policy_loss` |
|   + token-level ratio IS correction (clip = TIS / mask = ICEPOP)           | `+ rollout_is_weights` |
|   + sequence-level ratio IS correction (mask = seq-mask-tis)               | `+ rollout_correction` |
|   + binary_kl / tv gates, token or sequence level (mask)                   | `+ rollout_correction(is_gate=)` |
|   "gspo" (+ its IS correction: the ratio against the rollout log-probs)    | `ppo_policy_loss(policy_loss="gspo")` |
|   "gspo" with dual clip (+ IS correction)                                  | `ppo_policy_loss(dual_clip)` (below) |
| `openrlhf.models.loss.ValueLoss`                                           | `value_loss`       |
| `RemoteExperienceMaker.get_advantages_and_returns` (when importable)       | `gae`              |

Host semantics kept: compute_approx_kl works in float32 and clamps k1/k2/k3 to [-10, 10] (k3 is
fastppo's "low_var_kl", whose clamps give the same values and gradients); log_probs_from_logits
divides the caller's logits by `temperature` in place, as OpenRLHF does; the losses take
OpenRLHF's dp_size / batch_num_tokens / global_batch_size (as fastppo's num_tokens / num_seqs) and
return OpenRLHF's tuple (loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio). OpenRLHF's GAE does not skip
masked tokens: it zeroes rewards and values at mask-0 positions and runs the plain recursion over
every position; the adapter does exactly that (fastppo.gae with an all-ones mask on the masked
inputs).

PolicyLoss's IS correction at token level with the ratio gate is fastppo.rollout_is_weights
(level="token", mode "clip" -> "truncate", "mask" -> "mask", [min, max] = is_correction_threshold),
multiplied into the (dual-clipped) loss; vllm_kl and is_filter_ratio are returned as OpenRLHF
returns them. At sequence level (seq-mask-tis, OpenRLHF's and NeMo-RL's name) it is
fastppo.rollout_correction(is_level="token", is_mode="seq-mask", log_ratio_bound=None): the unclamped token
ratios of the sequences whose geometric-mean ratio lies in [low, high] (low 0: no lower bound), 0 elsewhere;
is_filter_ratio is OpenRLHF's fraction of rows gated out (an empty row counts as gated out: its mean is NaN
there). The binary_kl / tv gates (FlashREINFORCE's trust region on the sampled token's Bernoulli divergence,
p = rollout and q = trainer probability, each clamped to [1e-6, 1 - 1e-6]) are
fastppo.rollout_correction(is_level="token", is_mode="mask" | "seq-mask", is_gate=..., log_ratio_bound=None):
the unclamped token ratio where the token's divergence (sequence level: its plain mean over the sequence) lies
in [low, high], 0 elsewhere; is_filter_ratio is the fraction of valid tokens (rows) gated out. GSPO is fastppo's
"gspo" (the sequence-mean ratio, gradient through the mean, per-sample loss); with IS correction on,
OpenRLHF's GSPO ratio is taken against the rollout log-probs and no weights are applied, and so does the
adapter. GSPO with a dual clip (which fastppo's gspo does not take) is OpenRLHF's ratio exp(mean_t lr) on every
token, then PPO's dual-clipped surrogate per token: the adapter forms the masked mean log-ratio per sequence
(a [B, 1] torch reduction, differentiable) and runs ppo_policy_loss(policy_loss="ppo", dual_clip) on it against
0, so the value, the clip statistics and the gradient through the mean are ppo's (ppo clamps the log-ratio at
+-20: a sequence mean above 20 is delegated, below -20 the gradient there is 0 where OpenRLHF's is < 2e-9 |A|).
compute_approx_kl's `unbiased_gradient=True`: the estimator's value (as above), and the gradient of
w * (logp - base)^2 / 2 with w = min(exp(logp - old), KL_IS_WEIGHT_CLIP) detached (1 without old), both
fastppo.kl_penalty; the host's value is value + s - s (one more rounding), fastppo's the value itself.
PolicyLoss with `action_mask=None`: OpenRLHF's masked_mean(x, None) is the plain mean, so the adapter serves
it with an all-ones mask (ppo, token-level loss without batch_num_tokens; elsewhere OpenRLHF's own code needs
the mask and raises, and the adapter lets it: counted as delegated).

PolicyLoss / ValueLoss are replaced by subclasses: modules built before the patch keep the
original class. Delegated to OpenRLHF (counted): PolicyLoss calls that OpenRLHF itself cannot run
(`action_mask=None` with a sequence-level loss, batch_num_tokens or GSPO: it raises), an IS band fastppo's
options refuse (a negative or infinite bound, high <= 0), and a GSPO call where some sequence's mean log-ratio
exceeds 10 (20 with a dual clip): fastppo caps it there (verl's rule), OpenRLHF does not, so the adapter reads
the 0-d ratio_max stat (one host sync per GSPO call; OpenRLHF's actor syncs every micro-step anyway) and
recomputes such a call with OpenRLHF's own PolicyLoss. Largest relative difference from OpenRLHF (loss and
gradient, every loss and IS mode, token and sequence loss, with and without global counts):
`bench/openrlhf_diffs.py`. Differences, documented: a NaN rollout log-prob on a valid token
gives weight clamp(1) in fastppo.rollout_is_weights (TRL's nan_to_num) where OpenRLHF's loss is NaN;
a micro-batch with no valid token gives fastppo's 0 where OpenRLHF divides 0 by 0. Not replaced:
`compute_reward` (OpenRLHF keeps -kl_coef * kl on mask-0 tokens, fastppo.kl_shaped_rewards writes 0
there).
"""

from __future__ import annotations

import importlib
import math
from importlib.metadata import version as _dist_version

import torch
from packaging.version import Version

import fastppo
from fastppo.options import LossOptions

from ._patching import EntryPoint, entropy_of_logits, host_signature_wrapper

SUPPORTED = ">=0.11, <0.12 (tested: 0.11.2)"
_KL = {"k1": "k1", "k2": "k2", "k3": "low_var_kl"}


def installed_version() -> str:
    return _dist_version("openrlhf")


def supported(v: str) -> bool:
    return Version("0.11") <= Version(v) < Version("0.12")


def _serve_logprobs(a):
    logits, t = a["logits"], a["temperature"]
    if t != 1.0:
        logits.div_(t)   # OpenRLHF's in-place scaling, visible to the caller
    return fastppo.token_logprobs(logits, a["labels"]).to(logits.dtype)


def _serve_entropy(a):
    logits = a["logits"]
    return entropy_of_logits(logits).to(logits.dtype)


def _serve_kl(a):
    kind = a["kl_estimator"]
    if kind not in _KL:
        return NotImplemented   # unknown kinds raise in OpenRLHF
    lp, base = a["log_probs"].float(), a["log_probs_base"].float()
    value = fastppo.kl_penalty(lp, base, kind=_KL[kind])
    value = value if kind == "k3" else value.clamp(min=-10, max=10)   # OpenRLHF's clamp of k1 / k2
    if not a["unbiased_gradient"]:
        return value
    # OpenRLHF's unbiased_gradient (openrlhf/models/utils.py compute_approx_kl): the value of the estimator,
    # the gradient of w * (logp - base)^2 / 2 = w * k2, w = min(exp(logp - old), KL_IS_WEIGHT_CLIP) detached
    # (1 without old), i.e. the IS-weighted reverse-KL gradient w * (logp - base) * grad(logp - base). The host
    # writes value + s - s.detach() (rounded once more in the forward); fastppo keeps the value exact.
    from openrlhf.models.utils import KL_IS_WEIGHT_CLIP

    old = a["log_probs_old"]
    w = 1.0
    if old is not None:
        w = torch.exp(fastppo.kl_penalty(lp.detach(), old.float().detach(), kind="k1")).clamp(max=KL_IS_WEIGHT_CLIP)
    s = fastppo.kl_penalty(lp, base, kind="k2")
    return value.detach() + w * (s - s.detach())


def _counts(token_level, dp_size, batch_num_tokens, global_batch_size):
    if token_level:
        return {} if batch_num_tokens is None else {"num_tokens": batch_num_tokens / dp_size}
    return {} if global_batch_size is None else {"num_seqs": global_batch_size / dp_size}


_GSPO_CAP = math.exp(10.0) * (1 - 1e-6)   # fastppo's gspo caps the sequence log-ratio at 10; OpenRLHF does not
_PPO_CAP = math.exp(20.0) * (1 - 1e-6)    # ppo clamps the log-ratio at 20 (OpenRLHF's ppo too, not its gspo)


def _is_weights_kwargs(loss):
    """("weights", fastppo.rollout_is_weights keywords) or ("correction", fastppo.rollout_correction keywords)
    for the PolicyLoss's IS correction, or None where OpenRLHF's rule is not fastppo's. Token level with the
    ratio gate ("clip" = truncate to [low, high], "mask" = ICEPOP: the ratio where low <= ratio <= high else 0)
    is rollout_is_weights; sequence level with the ratio gate (seq-mask-tis: the token ratios exp(lr_t), unclamped,
    where the sequence's geometric-mean ratio exp(mean lr) is in [low, high], else 0) is rollout_correction's
    "seq-mask"; the binary_kl / tv gates (mask only: the token ratio where the token's divergence, or at
    sequence level its mean over the sequence, is in [low, high]) are rollout_correction's is_gate. A gate
    whose band rounds differently (a negative low, high <= 0 or infinite) is OpenRLHF's own."""
    gate = loss.is_correction_gating
    if loss.is_correction_level not in ("token", "seq"):
        return None
    low, high = (float(x) for x in loss.is_correction_threshold)
    if not 0 <= low <= high or high <= 0 or math.isinf(high):
        return None
    seq = loss.is_correction_level == "seq"
    if gate != "ratio" or seq:
        return "correction", {"is_level": "token", "is_mode": "seq-mask" if seq else "mask", "is_gate": gate,
                              "is_min": low if low > 0 else None, "is_max": high, "log_ratio_bound": None}
    return "weights", {"level": "token", "mode": "truncate" if loss.is_correction_mode == "clip" else "mask",
                       "min": low, "max": high}


def _policy_loss_class(original, stats):
    from openrlhf.models.utils import masked_mean

    class PolicyLoss(original):
        __doc__ = "fastppo.ppo_policy_loss behind OpenRLHF's PolicyLoss. " + (original.__doc__ or "")

        def _fastppo_kwargs(self, rollout_log_probs, action_mask, batch_num_tokens):
            """(ppo_policy_loss keywords, IS keywords or None), or None to delegate. GSPO with a dual clip is
            ppo (dual clip) on the sequence's mean log-ratio (see forward)."""
            gspo = self.policy_loss_type == "gspo"
            if self.policy_loss_type not in ("ppo", "gspo"):
                return None
            if action_mask is None and (gspo or not self.token_level_loss or batch_num_tokens is not None):
                return None   # OpenRLHF itself needs the mask there (it raises): its own error
            kw = {"policy_loss": "ppo" if gspo and self.dual_clip is not None else self.policy_loss_type,
                  "clip_low": self.clip_eps_low, "clip_high": self.clip_eps_high, "dual_clip": self.dual_clip}
            is_kw = None
            if self.is_correction_level != "off":
                if rollout_log_probs is None:
                    return None
                if not gspo:   # GSPO's IS correction is its ratio against the rollout policy
                    is_kw = _is_weights_kwargs(self)
                    if is_kw is None:
                        return None
            try:
                LossOptions.policy(**kw)
            except (TypeError, ValueError):
                return None
            return kw, is_kw

        def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None,
                    dp_size=1, batch_num_tokens=None, global_batch_size=None):
            args = (log_probs, old_log_probs, advantages, action_mask, rollout_log_probs, dp_size, batch_num_tokens,
                    global_batch_size)
            plan = self._fastppo_kwargs(rollout_log_probs, action_mask, batch_num_tokens)
            if plan is None:
                stats.delegated["PolicyLoss"] += 1
                return super().forward(*args)
            kw, is_kw = plan
            if action_mask is None:   # OpenRLHF's masked_mean(x, None) is the plain mean: every token valid
                action_mask = torch.ones_like(log_probs)
            gspo = self.policy_loss_type == "gspo"
            ratio_ref = rollout_log_probs if gspo and self.is_correction_level != "off" else old_log_probs
            logp, cap = log_probs, _GSPO_CAP
            if gspo and self.dual_clip is not None:
                # GSPO + dual clip (OpenRLHF: ratio_b = exp(mean_t lr_bt) on every token, then PPO's dual-clipped
                # surrogate per token): ppo_policy_loss with dual_clip on logp'_bt = mean_t lr_bt against 0, whose
                # gradient flows through the mean (ppo's clamp of the log-ratio at +-20: beyond +20 delegated below)
                n = action_mask.sum(-1, keepdim=True).clamp(min=1)
                mean_lr = ((log_probs - ratio_ref.detach()) * action_mask).sum(-1, keepdim=True) / n
                logp, ratio_ref, cap = mean_lr.expand_as(log_probs), torch.zeros_like(log_probs), _PPO_CAP
            vllm_kl = filt = isw = None
            if is_kw is not None and is_kw[0] == "weights":
                is_kw = is_kw[1]
                isw, is_stats = fastppo.rollout_is_weights(old_log_probs, rollout_log_probs, action_mask, **is_kw)
                filt = is_stats["is_clipped_frac" if is_kw["mode"] == "truncate" else "is_masked_frac"]
                vllm_kl = masked_mean(fastppo.kl_penalty(rollout_log_probs.detach(), old_log_probs.detach(),
                                                         kind="k1"), action_mask, dim=None)
            elif is_kw is not None:   # seq-mask-tis, and the binary_kl / tv gates
                rc = fastppo.rollout_correction(old_log_probs, rollout_log_probs, action_mask, **is_kw[1])
                isw, vllm_kl = rc.weights, rc.stats["kl"]
                if is_kw[1]["is_mode"] == "seq-mask":
                    # OpenRLHF's filter ratio is over every row, an empty row (a NaN mean) counting as filtered
                    rows = action_mask.shape[0]
                    kept_rows = rc.stats["num_seqs"]
                    filt = (rc.stats["rollout_is_seq_oob_ratio"] * kept_rows + (rows - kept_rows)) / rows
                else:   # the fraction of valid tokens the gate dropped
                    filt = rc.stats["rollout_is_oob_ratio"]
            agg = "token-mean" if self.token_level_loss else "seq-mean-token-mean"
            loss, st = fastppo.ppo_policy_loss(
                logp, ratio_ref, advantages, action_mask, agg=agg, rollout_is_weights=isw,
                **kw, **_counts(self.token_level_loss, dp_size, batch_num_tokens, global_batch_size))
            if gspo and float(st["ratio_max"]) >= cap:
                stats.delegated["PolicyLoss"] += 1   # a sequence ratio beyond fastppo's cap: OpenRLHF's numbers
                return super().forward(*args)
            stats.served["PolicyLoss"] += 1
            ppo_kl = masked_mean(fastppo.kl_penalty(old_log_probs.detach(), log_probs.detach(), kind="k1"),
                                 action_mask, dim=None)
            return loss, st["clipfrac"], ppo_kl, vllm_kl, filt

    PolicyLoss.__module__ = original.__module__
    PolicyLoss.__qualname__ = original.__qualname__
    PolicyLoss.__fastppo_original__ = original
    return PolicyLoss


def _value_loss_class(original, stats):
    class ValueLoss(original):
        __doc__ = "fastppo.value_loss behind OpenRLHF's ValueLoss. " + (original.__doc__ or "")

        def forward(self, values, old_values, returns, action_mask=None, dp_size=1, batch_num_tokens=None,
                    global_batch_size=None):
            if action_mask is None:
                stats.delegated["ValueLoss"] += 1
                return super().forward(values, old_values, returns, action_mask, dp_size, batch_num_tokens,
                                       global_batch_size)
            stats.served["ValueLoss"] += 1
            agg = "token-mean" if self.token_level_loss else "seq-mean-token-mean"
            loss, _ = fastppo.value_loss(values, old_values, returns, action_mask, clip=self.clip_eps, agg=agg,
                                         **_counts(self.token_level_loss, dp_size, batch_num_tokens,
                                                   global_batch_size))
            return loss

    ValueLoss.__module__ = original.__module__
    ValueLoss.__qualname__ = original.__qualname__
    ValueLoss.__fastppo_original__ = original
    return ValueLoss


def _serve_gae(a):
    values, rewards, m = a["values"], a["rewards"], a["action_mask"]
    with torch.no_grad():
        if m is not None:   # OpenRLHF: zero rewards and values at mask-0 positions, then no skipping
            values, rewards = m * values, m * rewards
        adv, ret = fastppo.gae(rewards, values, torch.ones_like(values), gamma=float(a["gamma"]),
                               lam=float(a["lambd"]))
    dtype = torch.result_type(values, rewards)
    return adv.to(dtype), ret.to(dtype)


def build_gae(original, stats):
    """The replacement of RemoteExperienceMaker.get_advantages_and_returns (a method)."""
    return host_signature_wrapper(original, "get_advantages_and_returns", stats, _serve_gae)


def _function(name, serve):
    def build(original, stats):
        return host_signature_wrapper(original, name, stats, serve)
    return build


def entry_points() -> list[EntryPoint]:
    mu = importlib.import_module("openrlhf.models.utils")
    ml = importlib.import_module("openrlhf.models.loss")
    eps = [
        EntryPoint("log_probs_from_logits", lambda: (mu, "log_probs_from_logits"),
                   _function("log_probs_from_logits", _serve_logprobs)),
        EntryPoint("compute_entropy", lambda: (mu, "compute_entropy"), _function("compute_entropy", _serve_entropy)),
        EntryPoint("compute_approx_kl", lambda: (mu, "compute_approx_kl"), _function("compute_approx_kl", _serve_kl)),
        EntryPoint("PolicyLoss", lambda: (ml, "PolicyLoss"), _policy_loss_class),
        EntryPoint("ValueLoss", lambda: (ml, "ValueLoss"), _value_loss_class),
    ]
    try:   # the experience maker imports vLLM; without it there is no GAE call site to patch
        em = importlib.import_module("openrlhf.trainer.ppo_utils.experience_maker")
    except ImportError:
        return eps
    eps.append(EntryPoint("get_advantages_and_returns", lambda: (em.RemoteExperienceMaker,
                                                                 "get_advantages_and_returns"), build_gae))
    return eps
