"""OpenRLHF adapter (OpenRLHF 0.11).

| OpenRLHF entry point (and every module that imported it by name)          | fastppo op         |
|----------------------------------------------------------------------------|--------------------|
| `openrlhf.models.utils.log_probs_from_logits`                              | `token_logprobs`   |
| `openrlhf.models.utils.compute_entropy`                                    | `token_logprobs(return_entropy)` |
| `openrlhf.models.utils.compute_approx_kl` (k1, k2, k3)                     | `kl_penalty`       |
| `openrlhf.models.loss.PolicyLoss` ("ppo", dual clip, token / sequence loss) | `ppo_policy_loss`  |
| `openrlhf.models.loss.ValueLoss`                                           | `value_loss`       |
| `RemoteExperienceMaker.get_advantages_and_returns` (when importable)       | `gae`              |

Host semantics kept: compute_approx_kl works in float32 and clamps k1/k2/k3 to [-10, 10] (k3 is
fastppo's "low_var_kl", whose clamps give the same values and gradients); log_probs_from_logits
divides the caller's logits by `temperature` in place, as OpenRLHF does; the losses take
OpenRLHF's dp_size / batch_num_tokens / global_batch_size (as fastppo's num_tokens / num_seqs) and
return OpenRLHF's tuple (loss, clip_ratio, ppo_kl, None, None). OpenRLHF's GAE does not skip
masked tokens: it zeroes rewards and values at mask-0 positions and runs the plain recursion over
every position; the adapter does exactly that (fastppo.gae with an all-ones mask on the masked
inputs).

PolicyLoss / ValueLoss are replaced by subclasses: modules built before the patch keep the
original class. Delegated to OpenRLHF (counted): `unbiased_gradient=True`, GSPO and the rollout
IS-correction of PolicyLoss, and `action_mask=None`. Not replaced: `compute_reward` (OpenRLHF keeps
-kl_coef * kl on mask-0 tokens, fastppo.kl_shaped_rewards writes 0 there).
"""

from __future__ import annotations

import importlib
from importlib.metadata import version as _dist_version

import torch
from packaging.version import Version

import fastppo

from ._patching import EntryPoint, host_signature_wrapper

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
    zeros = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return fastppo.token_logprobs(logits, zeros, return_entropy=True)[1].to(logits.dtype)


def _serve_kl(a):
    kind = a["kl_estimator"]
    if a["unbiased_gradient"] or kind not in _KL:
        return NotImplemented   # the IS-weighted straight-through estimator; unknown kinds raise in OpenRLHF
    value = fastppo.kl_penalty(a["log_probs"].float(), a["log_probs_base"].float(), kind=_KL[kind])
    return value if kind == "k3" else value.clamp(min=-10, max=10)   # OpenRLHF's clamp of k1 / k2


def _counts(token_level, dp_size, batch_num_tokens, global_batch_size):
    if token_level:
        return {} if batch_num_tokens is None else {"num_tokens": batch_num_tokens / dp_size}
    return {} if global_batch_size is None else {"num_seqs": global_batch_size / dp_size}


def _policy_loss_class(original, stats):
    from openrlhf.models.utils import masked_mean

    class PolicyLoss(original):
        __doc__ = "fastppo.ppo_policy_loss behind OpenRLHF's PolicyLoss. " + (original.__doc__ or "")

        def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None,
                    dp_size=1, batch_num_tokens=None, global_batch_size=None):
            args = (log_probs, old_log_probs, advantages, action_mask, rollout_log_probs, dp_size, batch_num_tokens,
                    global_batch_size)
            if self.policy_loss_type != "ppo" or self.is_correction_level != "off" or action_mask is None:
                stats.delegated["PolicyLoss"] += 1
                return super().forward(*args)
            stats.served["PolicyLoss"] += 1
            agg = "token-mean" if self.token_level_loss else "seq-mean-token-mean"
            loss, st = fastppo.ppo_policy_loss(
                log_probs, old_log_probs, advantages, action_mask, clip_low=self.clip_eps_low,
                clip_high=self.clip_eps_high, dual_clip=self.dual_clip, agg=agg,
                **_counts(self.token_level_loss, dp_size, batch_num_tokens, global_batch_size))
            ppo_kl = masked_mean(fastppo.kl_penalty(old_log_probs.detach(), log_probs.detach(), kind="k1"),
                                 action_mask, dim=None)
            return loss, st["clipfrac"], ppo_kl, None, None

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
