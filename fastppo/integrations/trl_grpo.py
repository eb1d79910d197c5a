"""TRL 1.16 GRPOTrainer's whole loss from hidden states: `GRPOTrainer._compute_loss` served by
`fastppo.fused_linear_ppo_loss`, so the gradient of head + loss is formed in the forward pass
(6 N_valid H V FLOPs on the Triton path, against TRL's 8: its fused head recomputes the logits in backward).

How: the replacement runs TRL's own `_compute_loss` (its input assembly, backbone forward through the model's
fused LM head, metrics) with TRL's fused head (`trl.trainer.utils._ChunkedLogProbFunction`, looked up by the
model's `_fused_forward` at call time) swapped, for that one call, for a capture. The capture receives what TRL's
head would (hidden rows, the head's weight / bias, temperature, softcapping, logit scale), computes the whole
loss with `fused_linear_ppo_loss` and hands TRL fastppo's detached per-token log-probs and entropies, from which
TRL computes its metrics (entropy, KL, clip ratios) exactly as before; the differentiable loss returned is
fastppo's. If TRL's code never calls the head (a host change), TRL's own loss is returned, counted as delegated.

TRL -> fastppo (per_token_loss, mask = completion_mask [* tool_mask], GA = current_gradient_accumulation_steps
in training, 1 in eval):
| TRL option                                   | fastppo                                                      |
|----------------------------------------------|--------------------------------------------------------------|
| loss_type grpo, bnpo, dr_grpo, dapo, luspo   | policy_loss="ppo", clip_low=epsilon, clip_high=epsilon_high  |
| loss_type cispo                              | "cispo", clip_low=1, clip_high=epsilon_high - 1 (min(r, eh)) |
| loss_type sapo                               | "sapo", sapo_tau_pos / neg = sapo_temperature_pos / neg      |
| loss_type vespo, vespo_k_pos / lambda_pos / k_neg / lambda_neg | "vespo", vespo_k_pos / ... (same names);   |
|                                              | importance_sampling_ratio -> rollout_is_weights (inside phi) |
| importance_sampling_level="sequence" (GSPO)  | "gspo" (grpo / bnpo / dr_grpo / dapo / luspo only; vespo     |
|                                              | ignores the level, as TRL's loss does)                       |
| delta (two-sided clipping, > 1)              | ratio_max=delta (token level, the PPO types; TRL ignores it  |
|                                              | for cispo / sapo / vespo, so does this)                      |
| beta, ref_per_token_logps                    | kl_coef=beta, kl_kind="k3", ref_logprobs                     |
| use_bias_correction_kl (beta != 0)           | kl_bias_correction=True, kl_bias_correction_level = TRL's    |
|                                              | importance_sampling_level (KL times the token's / sequence's |
|                                              | ratio, unclamped as TRL)                                     |
| off_policy_mask_threshold                    | off_policy_mask_threshold, off_policy_logprobs = vLLM's      |
|                                              | sampling_per_token_logps when the inputs hold them (TRL's    |
|                                              | rule; else the mask measures against old_logprobs)           |
| top_entropy_quantile < 1 (one process)       | entropy_quantile=top_entropy_quantile                        |
| vLLM IS correction (importance_sampling_ratio) | rollout_is_weights ([B, T] or [B, 1], broadcast)           |
| temperature, softcapping, logit_scale        | the head's own arguments                                     |
| grpo, sapo: mean_b(sum_t m L / n_b) / GA     | agg="seq-mean-token-mean", num_seqs=B, / GA                  |
| luspo: mean_b(sum_t m L) / GA                | agg="seq-mean-token-sum", num_seqs=B, / GA                   |
| bnpo: sum(m L) / sum(m) / GA                 | agg="token-mean" / GA                                        |
| entropy bonus: - c sum(e H) / max(sum e, 1) / GA, e = mask * entropy_mask, c = entropy_coef (adaptive: 0   |
| while the last window's entropy > entropy_target) | entropy_agg="token-mean", entropy_coef = c divisor / GA |
| dr_grpo: sum(m L) / (B max_completion_length) / GA | agg="token-sum" / (B max_completion_length GA)         |
| dapo, cispo, vespo: sum(m L) / normalizer (num_items_in_batch ...) | agg="token-sum" / TRL's normalizer     |

On-policy steps (no old_per_token_logps: TRL uses per_token_logps.detach(), ratio exactly 1): the loss runs as
policy_loss="gpg" (-A logp, whose gradient is every mapped loss's gradient at ratio 1: -A per token, times the IS
weight and the entropy mask; vespo: times its weight phi at ratio 1, computed from the IS weights alone and passed
as the IS weight; cispo with epsilon_high < 1: times eh, its weight at ratio 1) and its value is corrected by a
detached constant, the mapped loss minus gpg at ratio 1 (fastppo.ppo_policy_loss on the returned log-probs), so
value and gradient are TRL's. The bias-corrected KL at ratio 1 is k3 in value and d = logp - ref in gradient (dKL +
KL r with r = 1): the call uses kl_kind="k2" (gradient d) and the value gains beta agg(k3 - k2), detached. The
off-policy mask at ratio 1 keeps every token when the threshold is >= 0 (TRL's sequence KL is exactly 0), else the
tokens with A >= 0: the advantages of the others enter as 0; with vLLM's sampling log-probs the gpg call carries
the mask itself (off_policy_logprobs). The entropy bonus and the mask are the same in the gpg run and the mapped
loss, so the correction leaves them.

GSPO's cap: fastppo caps each sequence's mean log-ratio at 10 (verl's clamp; gspo's ratio e^10), TRL does not, so
grpo / bnpo / dr_grpo / dapo / luspo at sequence level differ from TRL only where a valid sequence's mean
log-ratio exceeds 10 (a ratio above 22026). On CPU the capture checks that on the returned log-probs (a free host
read) and then hands the call to TRL's head, so TRL's own loss stands (counted delegated); on an accelerator the
check would be a host sync, so the step is served with the cap.

Delegated to TRL's original (counted in `handle.stats.delegated["GRPOTrainer._compute_loss"]`; the reason:
`unsupported_reason(trainer, inputs)`): use_bias_correction_kl at sequence level on an on-policy step (its
gradient at ratio 1 spreads each sequence's KL over the sequence, which the gpg run cannot carry), vespo with
[B, 1] IS weights or a vLLM IS clip range that excludes 1 (TRL sums log w over every position, 1 at masked ones
by its construction; fastppo sums over the valid tokens), MoE aux loss (TRL's aux_loss never leaves its
_compute_loss), cispo / sapo at sequence level and delta at sequence level (no sequence-level form of them in
the ops: cispo's weight sg(min(s_b, eh)), sapo's sigmoid of s_b and the capped s_b need gspo's sequence
gradient in the aggregation kernels), epsilon outside [0, 1], delta <= 1, top_entropy_quantile over several
processes (TRL's threshold is global), an on-policy sequence-level step with IS weights, the entropy mask or the
off-policy mask, a subclass overriding `_get_per_token_logps_and_entropies`, a PEFT prompt-learning model (its
labels gain virtual tokens); on CPU, a sequence-level step over the GSPO cap (above).

Precision: hidden, weight and bias enter the op rounded to TRL's compute dtype (the autocast dtype when autocast
is on, else hidden's), held in their own dtype (`in_compute_dtype`): the logits are the products TRL's head forms
(its operands in that dtype, fp32 accumulation) and the gradients come back in each input's own dtype from fp32
accumulators, unrounded to the compute dtype, as TRL's head returns them. (The op then multiplies fp32 tensors
that hold bf16 values: exact products; on a GPU a tf32 / fp32 GEMM rather than a bf16 one.)

Sampling parameters (#23 item 7): TRL's `temperature` reaches the op (TRL passes it to its head). TRL's `top_k`,
`top_p`, `min_p` (vLLM / generate sampling) are not: TRL scores with the full vocabulary (its head has no kept
set and vLLM returns only the sampled token's log-prob), so a kept set would change TRL's numbers, and
`fastppo.KeptSet.from_filters` needs the logits, which this path never forms.
"""

from __future__ import annotations

import contextlib
import functools

import torch

import fastppo
from fastppo.options import LossOptions
from fastppo.policy_weights import vespo_weights

from ._patching import CallStats, EntryPoint, compute_dtype, in_compute_dtype

NAME = "GRPOTrainer._compute_loss"
_PPO = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
_MAPPED = (*_PPO, "cispo", "sapo", "vespo")
_GSPO_CAP = 10.0   # fastppo's gspo caps each sequence's mean log-ratio here (verl's clamp); TRL does not
_IGNORE = -100


def _utils():
    import trl.trainer.utils as u

    return u


def _grpo_class():
    from trl.trainer.grpo_trainer import GRPOTrainer

    return GRPOTrainer


def available() -> bool:
    """Whether the installed TRL has the GRPOTrainer this adapter serves (TRL 1.16: the fused LM head)."""
    u = _utils()
    return hasattr(u, "add_fused_lm_head") and hasattr(_grpo_class(), "_compute_loss")


def _policy_kwargs(tr) -> dict | str:
    """fused_linear_ppo_loss's policy keywords for the trainer's configuration, or why it is not served."""
    lt, level = tr.loss_type, tr.importance_sampling_level
    el, eh, delta = tr.epsilon_low, tr.epsilon_high, tr.args.delta
    if lt not in _MAPPED:
        return f"loss_type={lt!r}"
    if level not in ("token", "sequence"):
        return f"importance_sampling_level={level!r}"
    if not 0 <= el <= 1 or not eh >= 0:
        return f"epsilon={el}, epsilon_high={eh}"
    ppo = lt in _PPO
    if delta is not None and ppo and (not delta > 1 or level == "sequence"):   # TRL's delta acts on these only
        return f"delta={delta} with loss_type={lt!r}, importance_sampling_level={level!r}"
    if level == "sequence" and lt in ("cispo", "sapo"):
        return f"loss_type={lt!r} at importance_sampling_level='sequence'"
    if lt == "cispo":   # sg(min(r, eh)): clamp(r, 0, 1 + (eh - 1)), eh < 1 included
        return {"policy_loss": "cispo", "clip_low": 1.0, "clip_high": eh - 1.0}
    if lt == "sapo":
        return {"policy_loss": "sapo", "sapo_tau_pos": tr.args.sapo_temperature_pos,
                "sapo_tau_neg": tr.args.sapo_temperature_neg}
    if lt == "vespo":   # its loss ignores the level (the sequence weight is its own)
        a = tr.args
        return {"policy_loss": "vespo", "vespo_k_pos": a.vespo_k_pos, "vespo_lambda_pos": a.vespo_lambda_pos,
                "vespo_k_neg": a.vespo_k_neg, "vespo_lambda_neg": a.vespo_lambda_neg}
    kw = {"policy_loss": "gspo" if level == "sequence" else "ppo", "clip_low": el, "clip_high": eh}
    if delta is not None:
        kw["ratio_max"] = delta
    return kw


def unsupported_reason(trainer, inputs) -> str | None:
    """Why this GRPOTrainer configuration goes to TRL's own `_compute_loss` (None: fastppo serves it)."""
    plan = _plan(trainer, inputs)
    return plan if isinstance(plan, str) else None


def _plan(tr, inputs) -> _Plan | str:
    """The loss call for this step, or why it is delegated."""
    if type(tr)._get_per_token_logps_and_entropies is not _grpo_class()._get_per_token_logps_and_entropies:
        return "a subclass overrides _get_per_token_logps_and_entropies"
    if tr.beta != 0.0 and tr.args.use_bias_correction_kl and tr.importance_sampling_level != "token" \
            and inputs.get("old_per_token_logps") is None:
        return "on-policy use_bias_correction_kl at importance_sampling_level='sequence'"
    if getattr(tr, "aux_loss_enabled", False):
        return "MoE aux loss"
    if getattr(getattr(tr.model, "active_peft_config", None), "is_prompt_learning", False):
        return "PEFT prompt learning (TRL's head also scores the virtual tokens' labels)"
    if tr.top_entropy_quantile < 1.0 and tr.accelerator.num_processes > 1:
        return "top_entropy_quantile over several processes"
    on_policy = inputs.get("old_per_token_logps") is None
    kw = _policy_kwargs(tr)
    if isinstance(kw, str):
        return kw
    if kw["policy_loss"] == "vespo" and inputs.get("importance_sampling_ratio") is not None:
        isw = inputs["importance_sampling_ratio"]
        lo, hi = tr.vllm_importance_sampling_clip_min, tr.vllm_importance_sampling_clip_max
        if tuple(isw.shape) != tuple(inputs["completion_mask"].shape) or not (lo is None or lo <= 1) \
                or not (hi is None or hi >= 1):
            # TRL sums log w over every position (1 at masked ones when 1 is inside its clip range), fastppo
            # over the valid tokens
            return "vespo with sequence-level IS weights or an IS clip range that excludes 1"
    sampling_mask = tr.off_policy_mask_threshold is not None and "sampling_per_token_logps" in inputs
    if on_policy and kw["policy_loss"] == "gspo" and (tr.top_entropy_quantile < 1.0 or sampling_mask
                                                      or _is_weights(tr, inputs) is not None):
        return "on-policy sequence-level step with IS weights, the entropy mask or the off-policy mask"
    try:
        return _Plan(tr, inputs, kw)
    except ValueError as e:   # a value fastppo's options refuse
        return str(e)


def _is_weights(tr, inputs):
    if tr.use_vllm and tr.vllm_importance_sampling_correction and tr.loss_type != "vespo":
        return inputs["importance_sampling_ratio"]
    return None


class _Plan:
    """The loss call for one `_compute_loss`: fused_linear_ppo_loss's tensors and keywords, the divisor that
    turns its aggregation into TRL's, and (on-policy) the mapped policy keywords of the value correction."""

    def __init__(self, tr, inputs, policy: dict):
        self.labels_mask = inputs["completion_mask"].bool()
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        self.mask, self.labels = mask, inputs["completion_ids"]
        B = mask.shape[0]
        adv = inputs["advantages"]
        adv = adv if adv.dim() == 2 else adv[:, None].expand(mask.shape)
        old = inputs.get("old_per_token_logps")
        self.on_policy = old is None
        self.old = old
        policy = dict(policy)
        thr = tr.off_policy_mask_threshold
        # the mask's behaviour log-probs: vLLM's sampling log-probs when the inputs hold them, else old (TRL's rule)
        self.behaviour = inputs.get("sampling_per_token_logps") if thr is not None else None
        if thr is not None and self.on_policy and self.behaviour is None:
            # TRL's KL is exactly 0: keep A >= 0, or every token if 0 <= thr
            adv = adv if thr >= 0 else torch.where(adv >= 0, adv, torch.zeros_like(adv))
        elif thr is not None:
            policy["off_policy_mask_threshold"] = float(thr)
        self.adv = adv
        isw = inputs.get("importance_sampling_ratio") if policy["policy_loss"] == "vespo" else _is_weights(tr, inputs)
        self.isw = None if isw is None else isw.expand(mask.shape)
        self.run_isw = self.isw   # on-policy: the IS weights of the gpg run (vespo: its weight phi at ratio 1)
        if self.on_policy and policy["policy_loss"] == "vespo" and self.isw is not None:
            zero = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
            self.run_isw = vespo_weights(zero, zero, adv, mask, self.isw, LossOptions.policy(**policy))
        if self.on_policy and policy["policy_loss"] == "cispo" and policy["clip_high"] < 0:
            # epsilon_high < 1: cispo's weight at ratio 1 is eh, not 1 (gpg's gradient times eh)
            ones = torch.ones(mask.shape, dtype=torch.float32, device=mask.device)
            self.run_isw = (1.0 + policy["clip_high"]) * (ones if self.run_isw is None else self.run_isw)
        self.ref = inputs["ref_per_token_logps"] if tr.beta != 0.0 else None
        self.policy = policy
        train = tr.model.training
        ga = tr.current_gradient_accumulation_steps if train else 1.0
        # use_bias_correction_kl (token level): KL exp(logp - old); at ratio 1 (on-policy) its gradient dKL + KL
        # is k2's, d = logp - ref, and its value k3's (a detached correction in loss())
        self.kl_on_policy_k2 = bool(tr.beta != 0.0 and tr.args.use_bias_correction_kl and self.on_policy)
        kw = {"kl_coef": float(tr.beta), "kl_kind": "k2" if self.kl_on_policy_k2 else "k3",
              "kl_bias_correction": bool(tr.beta != 0.0 and tr.args.use_bias_correction_kl and not self.on_policy),
              "kl_bias_correction_level": tr.importance_sampling_level,
              "entropy_quantile": tr.top_entropy_quantile if tr.top_entropy_quantile < 1.0 else None}
        lt = tr.loss_type
        if lt in ("grpo", "sapo"):
            kw.update(agg="seq-mean-token-mean", num_seqs=float(B))
            self.divisor = ga
        elif lt == "luspo":   # sum_t m L per sequence, mean over the B sequences
            kw.update(agg="seq-mean-token-sum", num_seqs=float(B))
            self.divisor = ga
        elif lt == "bnpo":   # sum(m L) / max(sum m, 1)
            kw["agg"] = "token-mean"
            self.divisor = ga
        elif lt == "dr_grpo":
            kw["agg"] = "token-sum"
            self.divisor = float(B * tr.max_completion_length * ga)
        else:   # dapo, cispo, vespo: num_items_in_batch spans the generation batch
            kw["agg"] = "token-sum"
            div = inputs["num_items_in_batch"].clamp(min=1.0) / tr.accelerator.num_processes
            self.divisor = div * tr.current_gradient_accumulation_steps / tr.args.steps_per_generation if train \
                else div
        self.agg_kwargs = kw
        self.ent_kwargs = self._entropy_bonus(tr, ga)
        LossOptions.policy(**policy, **kw, **self.ent_kwargs)   # validated here, before TRL's forward runs

    def _entropy_bonus(self, tr, ga) -> dict:
        """TRL's entropy bonus (_compute_loss: loss - c sum(e H) / max(sum e, 1) / GA, e = mask * entropy_mask,
        c = entropy_coef, or 0 under adaptive entropy while the last window's entropy is above entropy_target)
        as the op's entropy term: entropy_agg="token-mean" with entropy_coef = c divisor / GA, since the op's
        loss is divided by `divisor`. dapo / cispo / vespo's divisor is num_items_in_batch's, a tensor: read on
        the host here (free on CPU; one sync on an accelerator, where TRL's bonus branch syncs anyway)."""
        if not getattr(tr, "_entropy_bonus_enabled", False):
            return {}
        c = tr.entropy_coef
        if tr.use_adaptive_entropy and not tr._last_world_entropy <= tr.args.entropy_target:
            c = 0.0
        div = self.divisor
        scale = float(div) if isinstance(div, torch.Tensor) else div
        return {"entropy_coef": float(c) * scale / ga, "entropy_agg": "token-mean"}

    def over_cap(self, logp) -> bool:
        """gspo off-policy: whether a valid sequence's mean log-ratio exceeds fastppo's cap (TRL has none).
        Reads the answer on the host: called on CPU only, where that is free."""
        if self.on_policy or self.policy["policy_loss"] != "gspo":
            return False
        m = self.mask != 0
        d = torch.where(m, logp.float() - self.old.float(), torch.zeros_like(logp, dtype=torch.float32))
        return bool((d.sum(-1) / m.sum(-1).clamp(min=1) > _GSPO_CAP).any())

    def _aggregate(self, x):
        """x [B, T] aggregated as the loss call aggregates its terms (the mask's valid tokens)."""
        m = self.mask != 0
        x = torch.where(m, x, torch.zeros_like(x))
        agg, kw = self.agg_kwargs["agg"], self.agg_kwargs
        if agg == "seq-mean-token-mean":
            return (x.sum(-1) / m.sum(-1).clamp(min=1)).sum() / kw["num_seqs"]
        if agg == "token-mean":
            return x.sum() / m.sum().clamp(min=1)
        return x.sum() / (kw["num_seqs"] if agg == "seq-mean-token-sum" else 1.0)

    def loss(self, hidden, weight, bias, temperature, softcap, scale):
        """fused_linear_ppo_loss on hidden [B, T, H]; (TRL's loss, per-token log-probs, entropies)."""
        mask_kw = {k: v for k, v in self.policy.items() if k == "off_policy_mask_threshold"}
        if self.behaviour is not None:
            mask_kw["off_policy_logprobs"] = self.behaviour
        policy = {"policy_loss": "gpg", **mask_kw} if self.on_policy else {**self.policy, **mask_kw}
        old = torch.zeros_like(self.mask, dtype=torch.float32) if self.on_policy else self.old
        out = fastppo.fused_linear_ppo_loss(
            hidden, weight, self.labels, old, self.adv, self.mask, bias=bias, ref_logprobs=self.ref,
            temperature=temperature, rollout_is_weights=self.run_isw, final_logit_softcapping=softcap,
            logit_scale=scale, return_entropy=True, **policy, **self.agg_kwargs, **self.ent_kwargs)
        loss = out.loss
        if self.on_policy:   # the value at ratio 1 (gradient unchanged: a detached constant)
            lp, ent = out.logprobs, out.entropy
            common = {k: v for k, v in self.agg_kwargs.items() if not k.startswith("kl_")}
            mapped = fastppo.ppo_policy_loss(lp, lp, self.adv, self.mask, rollout_is_weights=self.isw, entropy=ent,
                                             **{**self.policy, **mask_kw}, **common)[0]
            gpg = fastppo.ppo_policy_loss(lp, lp, self.adv, self.mask, rollout_is_weights=self.run_isw, entropy=ent,
                                          policy_loss="gpg", **mask_kw, **common)[0]
            loss = loss + (mapped - gpg)
            if self.kl_on_policy_k2:   # value: k3 (ratio 1), where the call summed k2 = d^2 / 2
                d = lp.double() - self.ref.double()
                k3_minus_k2 = torch.exp(-d) - 1 + d - 0.5 * d * d
                loss = loss + self.agg_kwargs["kl_coef"] * self._aggregate(k3_minus_k2).to(loss.dtype)
        return loss / self.divisor, out.logprobs, out.entropy


class _CapturedHead:
    """Stands in for TRL's `_ChunkedLogProbFunction` during one served `_compute_loss`: its one call computes
    the whole loss from the hidden rows it is given and returns fastppo's detached per-token log-probs and
    entropies in TRL's layout (compact rows on Triton devices, every position elsewhere). On CPU, a gspo step
    where a sequence's mean log-ratio exceeds fastppo's cap hands the call to TRL's head (`host_head`) instead:
    TRL's own loss then stands (delegated)."""

    def __init__(self, plan: _Plan, host_head):
        self.plan, self.host_head, self.loss, self.calls = plan, host_head, None, 0

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
               logit_scale=1.0, outputs=("log_probs",)):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("fastppo's GRPO loss: TRL called its fused LM head twice in one _compute_loss; "
                               "undo fastppo.integrations.patch('trl') for this trainer")
        plan = self.plan
        B, T = plan.mask.shape
        cm = plan.labels_mask
        compact = _utils()._use_triton(hidden.device)
        if compact:   # the rows of the completion tokens, in order
            if hidden.device.type == "cpu" and hidden.shape[0] != int(cm.sum()):   # free on CPU only
                raise RuntimeError(f"fastppo's GRPO loss: TRL's head got {hidden.shape[0]} rows for "
                                   f"{int(cm.sum())} completion tokens")
            h = hidden.new_zeros(B, T, hidden.shape[-1]).masked_scatter(cm[..., None], hidden)
        else:         # every position of [B, L - 1]: the completion is the last T
            h = hidden.view(B, -1, hidden.shape[-1])[:, -T:]
        dt = compute_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            self.loss, logp, ent = plan.loss(in_compute_dtype(h, dt), in_compute_dtype(weight, dt),
                                             None if bias is None else in_compute_dtype(bias, dt), temperature,
                                             final_logit_softcapping, logit_scale)
        if hidden.device.type == "cpu" and plan.over_cap(logp):   # host read: free on CPU only
            self.loss = None
            return self.host_head.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                        final_logit_softcapping, logit_scale, outputs)
        logp, ent = logp.float(), ent.float()
        if compact:
            per_token = [x[cm] for x in (logp, ent)]
        else:
            L1 = hidden.shape[0] // B
            per_token = [x.new_zeros(B, L1).index_copy_(1, torch.arange(L1 - T, L1, device=x.device), x).reshape(-1)
                         for x in (logp, ent)]
        wanted = set(outputs)
        return (per_token[0], per_token[1] if "entropy" in wanted else None, None, None, None)


@contextlib.contextmanager
def _head_swapped(head):
    u = _utils()
    saved = u._ChunkedLogProbFunction
    u._ChunkedLogProbFunction = head
    try:
        yield
    finally:
        u._ChunkedLogProbFunction = saved


def _build(original, stats: CallStats):
    @functools.wraps(original)
    def _compute_loss(self, model, inputs):
        plan = _plan(self, inputs)
        if isinstance(plan, str):
            stats.delegated[NAME] += 1
            return original(self, model, inputs)
        head = _CapturedHead(plan, _utils()._ChunkedLogProbFunction)
        with _head_swapped(head):
            host_loss = original(self, model, inputs)
        if head.loss is None:   # TRL's code did not reach its head, or (CPU) gspo over the cap: TRL's loss stands
            stats.delegated[NAME] += 1
            return host_loss
        stats.served[NAME] += 1
        return head.loss

    _compute_loss.__fastppo_original__ = original
    return _compute_loss


def entry_point() -> EntryPoint:
    return EntryPoint(NAME, lambda: (_grpo_class(), "_compute_loss"), _build)
