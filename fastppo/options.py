"""The non-tensor options of the ops, one frozen dataclass per concern, each validated once where it is
built, with one set of error messages:

- LogitTransform: z' = softcap(logit_scale * z) / temperature, shared by every logits, linear and
  vocabulary-parallel op (token_logprobs, fused_ppo_loss, linear_logprobs, fused_linear_ppo_loss and
  their fastppo.distributed versions), so all of them refuse the same bad values with the same error.
- LogprobOptions (a LogitTransform plus ignore_index, entropy, inplace, backend): the log-prob pass of the
  logits ops; LinearOptions adds what the linear ops need (extras, chunk_bytes).
- LossOptions: every option of the loss layer (ppo_policy_loss, value_loss, the fused losses, the
  per-token loss function `loss_terms_from_logprobs` and the trainer's configuration).
- RolloutCorrectionOptions: fastppo.rollout_correction's IS weights and rejection criteria.
- VocabParallel: the logits / lm_head a logits or linear op gets are this rank's vocabulary shard of a
  process group (the `vocab_parallel=` keyword of those four ops; fastppo.vocab_parallel runs it).
Mode names live in fastppo.modes."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from ._validation import check_number, check_temperature
from .modes import (
    AGG_MODES,
    COV_LOSSES,
    ENTROPY_AGG_MODES,
    IS_LEVELS,
    KL_KINDS,
    POLICY_LOSSES,
    REJECTION_OPTIONS,
    ROLLOUT_IS_GATES,
    ROLLOUT_IS_MODES,
)


def _finite(name, value):
    return check_number(name, value)


def _positive(name, value):
    """None or a positive finite number (a global count: inf would make every loss 0)."""
    return check_number(name, value, low=0.0, low_open=True, allow_none=True)


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


@dataclass(frozen=True)
class LossOptions:
    """Options of one loss call. `loss="policy"` (ppo_policy_loss / fused losses) or `"value"`.

    policy_loss: ppo | gspo | gspo_token | cispo | sapo | gmpo | gpg | dppo_tv | dppo_kl | dro | clip_cov |
    kl_cov | vespo (formulas: fastppo.losses).
    clip_low in [0, 1], clip_high >= 0 (defaults to clip_low; cispo: >= -clip_low, so its cap 1 + clip_high may
    sit below 1, TRL's epsilon_high < 1, with clip_low = 1: sg(min(r, 1 + clip_high))), dual_clip > 1 (ppo
    only), ratio_max > 1 (ppo: the unclipped ratio capped at ratio_max; dppo_tv / dppo_kl: the truncated IS weight
    sg(min(r, ratio_max)), verl's clip_ratio_c), sapo_tau_pos / sapo_tau_neg > 0, dro_beta > 0 (dro only,
    required there), cov_ratio in (0, 1] (clip_cov / kl_cov: the fraction of valid tokens selected),
    cov_lb < cov_ub (clip_cov's covariance window), kl_cov_coef finite (kl_cov's |log-ratio| coefficient),
    entropy_quantile in (0, 1] (keep the top fraction of valid tokens by entropy in the policy term),
    off_policy_mask_threshold: finite; the policy term keeps a token only where A >= 0 or its sequence's mean
    of (old - logp) is <= it (DeepSeek-V3.2's off-policy sequence masking, TRL's get_off_policy_mask with
    the sampling log-probs = old_logprobs). Not with gmpo (a per-sequence ratio).
    vespo_k_pos / vespo_lambda_pos / vespo_k_neg / vespo_lambda_neg: finite, VESPO's gamma weight (TRL's
    defaults; lambda clamped at 1e-4 as TRL).
    kl_bias_correction: the fused losses' KL term is KL_t r_t, r_t = exp(logp_t - old_t), with its gradient
    (TRL's use_bias_correction_kl at importance_sampling_level="token"); the reported `kl` stays KL_t.
    kl_bias_correction_level: "token" (that) or "sequence": r_t = s_b = exp(sum_b m d / max(n_b, 1)) of the
    token's sequence, unclamped, differentiated through the sequence mean (TRL's use_bias_correction_kl at
    importance_sampling_level="sequence"; policy_weights.kl_sequence_correction).
    entropy_agg: None (the entropy term is aggregated as the loss, by `agg` and the global counts) or
    "token-mean": the entropy term is -entropy_coef sum_t(m_t k_t H_t) / max(sum_t m_t k_t, 1) over this
    call's tokens, k_t the entropy_quantile selection (1 without it), whatever `agg` (TRL 1.16
    GRPOTrainer._compute_loss's entropy bonus over its effective mask).
    agg one of AGG_MODES, kl_kind one of KL_KINDS, kl_coef / entropy_coef finite, value_clip > 0 (inf: no
    clip, stored as None), num_tokens / num_seqs / horizon > 0 and finite (global counts for micro-batches).
    Every number goes through fastppo._validation.check_number: errors name the argument."""

    loss: str = "policy"
    policy_loss: str = "ppo"
    clip_low: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None
    ratio_max: float | None = None
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    entropy_quantile: float | None = None
    dro_beta: float | None = None
    cov_ratio: float = 0.0002
    cov_lb: float = 1.0
    cov_ub: float = 5.0
    kl_cov_coef: float = 0.1
    agg: str = "token-mean"
    kl_kind: str = "k3"
    kl_coef: float = 0.0
    kl_bias_correction: bool = False
    kl_bias_correction_level: str = "token"
    off_policy_mask_threshold: float | None = None
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    entropy_coef: float = 0.0
    entropy_agg: str | None = None
    value_clip: float | None = None
    num_tokens: float | None = None
    num_seqs: float | None = None
    horizon: float | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen: normalise once, here)
        _choice("loss", self.loss, ("policy", "value"))
        _choice("policy_loss", self.policy_loss, POLICY_LOSSES)
        _choice("agg", self.agg, AGG_MODES)
        _choice("kl_kind", self.kl_kind, KL_KINDS)
        cl = _finite("clip_low", self.clip_low)
        if not 0 <= cl <= 1:
            raise ValueError(f"clip_low must be in [0, 1], got {self.clip_low}")
        set_("clip_low", cl)
        ch = cl if self.clip_high is None else _finite("clip_high", self.clip_high)
        if not ch >= 0 and not (self.policy_loss == "cispo" and ch >= -cl):   # cispo: a weight cap 1 + ch below 1
            raise ValueError(f"clip_high must be >= 0 (cispo: >= -clip_low), got {self.clip_high}")
        set_("clip_high", ch)
        if self.dual_clip is not None:
            if not _finite("dual_clip", self.dual_clip) > 1:
                raise ValueError(f"dual_clip must be > 1 (Dual-clip PPO), got {self.dual_clip}")
            if self.policy_loss != "ppo":
                raise ValueError(f"dual_clip applies to policy_loss='ppo' only, got policy_loss={self.policy_loss!r}")
            set_("dual_clip", float(self.dual_clip))
        if self.ratio_max is not None:
            if not _finite("ratio_max", self.ratio_max) > 1:
                raise ValueError(f"ratio_max must be > 1 (a cap on the unclipped ratio), got {self.ratio_max}")
            if self.policy_loss not in ("ppo", "dppo_tv", "dppo_kl"):
                raise ValueError(f"ratio_max applies to policy_loss 'ppo', 'dppo_tv' or 'dppo_kl' only, got "
                                 f"policy_loss={self.policy_loss!r}")
            set_("ratio_max", float(self.ratio_max))
        if self.dro_beta is not None:
            if self.policy_loss != "dro":
                raise ValueError(f"dro_beta applies to policy_loss='dro' only, got policy_loss={self.policy_loss!r}")
            if not _finite("dro_beta", self.dro_beta) > 0:
                raise ValueError(f"dro_beta must be > 0 (DRO's quadratic log-ratio penalty), got {self.dro_beta}")
            set_("dro_beta", float(self.dro_beta))
        elif self.policy_loss == "dro":
            raise ValueError("policy_loss='dro' needs dro_beta > 0 (its quadratic log-ratio penalty)")
        r = _finite("cov_ratio", self.cov_ratio)
        if not 0 < r <= 1:
            raise ValueError(f"cov_ratio must be in (0, 1] (the fraction of valid tokens selected), got {r}")
        set_("cov_ratio", r)
        lb, ub = _finite("cov_lb", self.cov_lb), _finite("cov_ub", self.cov_ub)
        if not lb < ub:
            raise ValueError(f"cov_lb must be < cov_ub (clip_cov's covariance window), got {lb} and {ub}")
        set_("cov_lb", lb)
        set_("cov_ub", ub)
        set_("kl_cov_coef", _finite("kl_cov_coef", self.kl_cov_coef))
        for name in ("sapo_tau_pos", "sapo_tau_neg"):
            v = _finite(name, getattr(self, name))
            if not v > 0:
                raise ValueError(f"{name} must be > 0, got {v}")
            set_(name, v)
        if self.entropy_quantile is not None:
            q = _finite("entropy_quantile", self.entropy_quantile)
            if not 0 < q <= 1:
                raise ValueError(f"entropy_quantile must be in (0, 1] (the fraction of tokens kept), got {q}")
            if self.policy_loss == "gmpo":
                raise ValueError("entropy_quantile is not defined for policy_loss='gmpo' (a per-sequence ratio)")
            if self.policy_loss in COV_LOSSES:
                raise ValueError(f"entropy_quantile is not defined for policy_loss={self.policy_loss!r} (it selects "
                                 f"its own tokens)")
            set_("entropy_quantile", q)
        set_("kl_coef", _finite("kl_coef", self.kl_coef))
        if self.off_policy_mask_threshold is not None:
            set_("off_policy_mask_threshold", _finite("off_policy_mask_threshold", self.off_policy_mask_threshold))
            if self.policy_loss == "gmpo":
                raise ValueError("off_policy_mask_threshold is not defined for policy_loss='gmpo' (a per-sequence "
                                 "ratio)")
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            set_(name, _finite(name, getattr(self, name)))
        if not isinstance(self.kl_bias_correction, bool):
            raise TypeError(f"kl_bias_correction must be a bool, got {type(self.kl_bias_correction).__name__}")
        _choice("kl_bias_correction_level", self.kl_bias_correction_level, IS_LEVELS)
        set_("entropy_coef", _finite("entropy_coef", self.entropy_coef))
        if self.entropy_agg is not None:
            _choice("entropy_agg", self.entropy_agg, (None, *ENTROPY_AGG_MODES))
        clip = check_number("clip", self.value_clip, low=0.0, low_open=True, allow_none=True, allow_inf=True)
        set_("value_clip", None if clip == math.inf else clip)   # clip=inf: no clip (the same loss, exactly)
        for name in ("num_tokens", "num_seqs", "horizon"):
            set_(name, _positive(name, getattr(self, name)))

    @classmethod
    def policy(cls, **kwargs) -> LossOptions:
        """From the public keyword arguments of ppo_policy_loss / fused_ppo_loss (unknown names raise)."""
        return cls(loss="policy", **kwargs)

    @classmethod
    def value(cls, *, clip=None, **kwargs) -> LossOptions:
        """From the public keyword arguments of value_loss."""
        return cls(loss="value", value_clip=clip, **kwargs)

    def replace(self, **changes) -> LossOptions:
        return replace(self, **changes)

    @property
    def sequence_level(self) -> bool:
        """True when the per-token term needs a per-sequence reduction first (gspo, gspo_token, gmpo, vespo)."""
        return self.loss == "policy" and self.policy_loss in ("gspo", "gspo_token", "gmpo", "vespo")

    @property
    def cov_select(self) -> bool:
        """True for clip_cov / kl_cov: the policy term needs a batch-global token selection first
        (fastppo.losses.cov_selection)."""
        return self.loss == "policy" and self.policy_loss in COV_LOSSES

    @property
    def token_local(self) -> bool:
        """True when each token's loss coefficients depend only on that token and the aggregation weights
        (no sequence-level ratio or mask, no batch-global selection: entropy_quantile, clip_cov, kl_cov,
        off_policy_mask_threshold, the sequence-level bias-corrected KL)."""
        return (not self.sequence_level and not self.cov_select and self.entropy_quantile is None
                and self.off_policy_mask_threshold is None and not self.kl_sequence_correction)

    @property
    def kl_sequence_correction(self) -> bool:
        """True when the KL term is weighted by the sequence ratio (kl_bias_correction at sequence level)."""
        return self.kl_bias_correction and self.kl_bias_correction_level == "sequence" and self.kl_coef != 0



def check_logit_transform(logit_scale, final_logit_softcapping) -> tuple[float, float | None]:
    """(scale, cap) of z' = softcap(scale * z) / tau, validated: scale a finite non-zero number, cap None
    (no cap) or a positive finite number."""
    scale = check_number("logit_scale", logit_scale)
    if scale == 0:
        raise ValueError(f"logit_scale must be a finite non-zero number, got {logit_scale!r}")
    cap = check_number("final_logit_softcapping", final_logit_softcapping, low=0.0, low_open=True, allow_none=True)
    return scale, cap


@dataclass(frozen=True)
class LogitTransform:
    """z' = softcap(logit_scale * z) * inv_tau, softcap(x) = softcap * tanh(x / softcap) (none when None).
    Build it with `LogitTransform.of` (the one validator); the kernels and the PyTorch twins read the
    three fields."""

    inv_tau: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None

    @staticmethod
    def validate(temperature, logit_scale, final_logit_softcapping) -> dict:
        """The validated fields of the public keywords temperature, logit_scale, final_logit_softcapping."""
        tau = check_temperature(temperature)
        scale, cap = check_logit_transform(logit_scale, final_logit_softcapping)
        return dict(inv_tau=1.0 / tau, logit_scale=scale, softcap=cap)

    @classmethod
    def of(cls, temperature=1.0, logit_scale=1.0, final_logit_softcapping=None) -> LogitTransform:
        return cls(**cls.validate(temperature, logit_scale, final_logit_softcapping))

    def transform(self) -> dict:
        """Keywords of the launchers for z' = softcap(scale * z) / tau (the transform alone)."""
        return dict(inv_tau=self.inv_tau, logit_scale=self.logit_scale, softcap=self.softcap)


@dataclass(frozen=True)
class LogprobOptions(LogitTransform):
    """The log-prob pass of a logits op: the transform, the ignored label, whether entropy is computed,
    whether backward writes over the logits, and the backend chosen for the call."""

    ignore_index: int = -100
    with_entropy: bool = False
    inplace: bool = False
    backend: str = "torch"

    @classmethod
    def build(cls, *, temperature=1.0, logit_scale=1.0, final_logit_softcapping=None, ignore_index=-100,
              with_entropy=False, inplace=False, backend="torch", **more):
        """From the public keywords (validated here once); `more`: a subclass's own fields."""
        return cls(**cls.validate(temperature, logit_scale, final_logit_softcapping), ignore_index=int(ignore_index),
                   with_entropy=bool(with_entropy), inplace=bool(inplace), backend=backend, **more)


@dataclass(frozen=True)
class LinearOptions(LogprobOptions):
    """The linear ops' options: TRL's extra per-token outputs, chunk_bytes (None: automatic, see
    fastppo.linear_pipeline.chunk_budget), logits_dtype (None, "bfloat16" or "float16": each logit h . w + b
    rounded to it before the transform), fp32_head (the GEMMs in fp32 whatever the inputs' dtype),
    grad_filter (None: off; else the threshold eps of the gradient filter, kernels/linear_filter.py) and kept_path
    ("auto", "dense" or "gather": how a kept set's log-probs are formed, fastppo.linear_gather)."""

    extras: bool = False
    chunk_bytes: int | None = None
    logits_dtype: str | None = None
    fp32_head: bool = False
    grad_filter: float | None = None
    kept_path: str = "auto"

    def __post_init__(self):
        cb = self.chunk_bytes
        if cb is not None and (isinstance(cb, bool) or not isinstance(cb, int) or cb <= 0):
            raise ValueError(f"chunk_bytes must be None or a positive int, got {cb!r}")
        if self.logits_dtype not in LOGITS_DTYPES:
            raise ValueError(f"logits_dtype must be None, torch.bfloat16 or torch.float16, got {self.logits_dtype!r}")
        if not isinstance(self.fp32_head, bool):
            raise TypeError(f"fp32_head must be a bool, got {type(self.fp32_head).__name__}")
        gf = self.grad_filter
        if gf is not None and (not isinstance(gf, float) or not 0.0 < gf < 1.0):
            raise ValueError(f"grad_filter's threshold must be a float in (0, 1), got {gf!r}")
        if self.kept_path not in KEPT_PATHS:
            raise ValueError(f"kept_path must be one of {KEPT_PATHS}, got {self.kept_path!r}")

    @staticmethod
    def logits_dtype_name(logits_dtype) -> str | None:
        """The option's value for the public keyword logits_dtype (None, torch.bfloat16 or torch.float16)."""
        names = {None: None, torch.bfloat16: "bfloat16", torch.float16: "float16"}
        if not isinstance(logits_dtype, torch.dtype) and logits_dtype is not None:
            raise TypeError(f"logits_dtype must be None, torch.bfloat16 or torch.float16, got "
                            f"{type(logits_dtype).__name__}")
        if logits_dtype not in names:
            raise ValueError(f"logits_dtype must be None, torch.bfloat16 or torch.float16, got {logits_dtype}")
        return names[logits_dtype]


LOGITS_DTYPES = (None, "bfloat16", "float16")
KEPT_PATHS = ("auto", "dense", "gather")


@dataclass(frozen=True)
class LinearDivergenceOptions:
    """linear_divergence's options: beta in [0, 1], the shared float temperature (inv_tau; a per-token tensor
    travels beside the options, as the ops' `tau` argument, with inv_tau = 1), each model's logit
    transform before it (z' = softcap(scale * z), TRL's `student_/teacher_logit_scale` and
    `..._final_logit_softcapping`), whether the student's entropy is returned, chunk_bytes (None: automatic)."""

    beta: float = 0.5
    inv_tau: float = 1.0
    s_scale: float = 1.0
    s_softcap: float | None = None
    t_scale: float = 1.0
    t_softcap: float | None = None
    with_entropy: bool = False
    chunk_bytes: int | None = None

    @classmethod
    def build(cls, *, beta, temperature=1.0, student_logit_scale=1.0, student_final_logit_softcapping=None,
              teacher_logit_scale=1.0, teacher_final_logit_softcapping=None, return_entropy=False,
              chunk_bytes=None) -> LinearDivergenceOptions:
        """From the public keywords, each validated with the errors every logits op gives."""
        if isinstance(beta, bool) or not isinstance(beta, (int, float)):
            raise TypeError(f"beta must be a float in [0, 1], got {type(beta).__name__}")
        if not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"beta must be in [0, 1] (0: KL(teacher || student), 1: KL(student || teacher)), "
                             f"got {beta}")
        if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int)
                                        or chunk_bytes <= 0):
            raise ValueError(f"chunk_bytes must be None or a positive int, got {chunk_bytes!r}")
        tau = check_temperature(temperature)
        try:
            s_scale, s_cap = check_logit_transform(student_logit_scale, student_final_logit_softcapping)
        except (TypeError, ValueError) as e:
            raise type(e)(f"student: {e}") from None
        try:
            t_scale, t_cap = check_logit_transform(teacher_logit_scale, teacher_final_logit_softcapping)
        except (TypeError, ValueError) as e:
            raise type(e)(f"teacher: {e}") from None
        return cls(beta=float(beta), inv_tau=1.0 / tau, s_scale=s_scale, s_softcap=s_cap, t_scale=t_scale,
                   t_softcap=t_cap, with_entropy=bool(return_entropy), chunk_bytes=chunk_bytes)

    def student(self) -> LogitTransform:
        """The student's transform without the temperature (the row math divides by it)."""
        return LogitTransform(inv_tau=1.0, logit_scale=self.s_scale, softcap=self.s_softcap)

    def teacher(self) -> LogitTransform:
        return LogitTransform(inv_tau=1.0, logit_scale=self.t_scale, softcap=self.t_softcap)


@dataclass(frozen=True)
class VocabParallel:
    """`vocab_parallel=VocabParallel(group)` on token_logprobs, fused_ppo_loss, linear_logprobs and
    fused_linear_ppo_loss: the logits (or lm_head weight / bias) passed are this rank's contiguous slice
    of the vocabulary, in rank order over the ranks of `group` (None: the default process group; uneven
    slices allowed), and the labels (global ids) and every per-token tensor are replicated. The results
    are those of the op on the full vocabulary, on every rank; each rank's shard gets its gradient slice."""

    group: dist.ProcessGroup | None = None

    def __post_init__(self):
        if self.group is not None and not (dist.is_available() and isinstance(self.group, dist.ProcessGroup)):
            raise TypeError(f"VocabParallel.group must be a torch.distributed.ProcessGroup or None, got "
                            f"{type(self.group).__name__} {self.group!r}")

    @staticmethod
    def check(value) -> VocabParallel:
        """`value` as the vocab_parallel keyword of an op: a VocabParallel (None is handled by the op)."""
        if not isinstance(value, VocabParallel):
            raise TypeError(f"vocab_parallel must be a fastppo.VocabParallel or None, got "
                            f"{type(value).__name__} {value!r}")
        return value


@dataclass(frozen=True)
class RolloutCorrectionOptions:
    """Options of fastppo.rollout_correction (the formulas are in its docstring).

    is_level: None (no IS weights) | token | sequence; is_mode: truncate | mask | seq-mask (token level);
    is_max > 0 (finite), is_min in (0, is_max] or None; is_batch_normalize; rejection: a tuple of
    (option, lower, upper) with option in REJECTION_OPTIONS, in the caller's order, `lower` a ratio bound of
    the k1 options (None for k2 / k3); log_ratio_bound: the clamp of the log-ratio before exp (verl's
    SAFETY_BOUND 20; None: none, as OpenRLHF); is_gate: ratio | binary_kl | tv, the statistic is_mode mask /
    seq-mask compares with [is_min, is_max] (the divergences: token level, mask or seq-mask only)."""

    is_level: str | None = None
    is_mode: str = "truncate"
    is_max: float = 2.0
    is_min: float | None = None
    is_batch_normalize: bool = False
    rejection: tuple = ()
    log_ratio_bound: float | None = 20.0
    is_gate: str = "ratio"

    @classmethod
    def build(cls, *, is_level=None, is_mode="truncate", is_max=2.0, is_min=None, is_batch_normalize=False,
              rejection=None, log_ratio_bound=20.0, is_gate="ratio") -> RolloutCorrectionOptions:
        """Validate the public keywords once. `rejection` maps option -> upper bound, or for the k1 options
        (lower, upper) ratio bounds (a single number u means (1 / u, u), verl's convention)."""
        if is_level is not None:
            _choice("is_level", is_level, IS_LEVELS)
        _choice("is_mode", is_mode, ROLLOUT_IS_MODES)
        if is_mode == "seq-mask" and is_level not in (None, "token"):
            raise ValueError(f"is_mode='seq-mask' gates token-level weights: is_level must be 'token', "
                             f"got {is_level!r}")
        _choice("is_gate", is_gate, ROLLOUT_IS_GATES)
        if is_gate != "ratio" and (is_level != "token" or is_mode == "truncate"):
            raise ValueError(f"is_gate={is_gate!r} gates token weights (a rejection filter): it needs is_level='token' "
                             f"and is_mode 'mask' or 'seq-mask', got is_level={is_level!r}, is_mode={is_mode!r}")
        hi = check_number("is_max", is_max, low=0.0, low_open=True)
        lo = check_number("is_min", is_min, low=0.0, low_open=True, allow_none=True)
        if lo is not None and lo > hi:
            raise ValueError(f"is_min ({lo}) must be <= is_max ({hi})")
        if not isinstance(is_batch_normalize, bool):
            raise TypeError(f"is_batch_normalize must be a bool, got {is_batch_normalize!r}")
        bound = check_number("log_ratio_bound", log_ratio_bound, low=0.0, low_open=True, allow_none=True)
        return cls(is_level, is_mode, hi, lo, is_batch_normalize, _rejection(rejection), bound, is_gate)


def _rejection(rejection) -> tuple:
    if rejection is None:
        return ()
    if not hasattr(rejection, "items"):
        raise TypeError(f"rejection must be a mapping option -> threshold, got {type(rejection).__name__}")
    out = []
    for name, spec in rejection.items():
        _choice("rejection option", name, REJECTION_OPTIONS)
        if name.endswith("k1"):
            if isinstance(spec, (tuple, list)):
                if len(spec) != 2:
                    raise ValueError(f"rejection[{name!r}] must be upper or (lower, upper), got {spec!r}")
                lo, hi = (check_number(f"rejection[{name!r}]", v, low=0.0, low_open=True) for v in spec)
            else:
                hi = check_number(f"rejection[{name!r}]", spec, low=0.0, low_open=True)
                lo = 1.0 / hi
            if lo > hi:
                raise ValueError(f"rejection[{name!r}]: lower ({lo}) must be <= upper ({hi})")
        else:
            if isinstance(spec, (tuple, list)):
                raise ValueError(f"rejection[{name!r}] takes one upper bound (only the k1 options take two), "
                                 f"got {spec!r}")
            lo, hi = None, check_number(f"rejection[{name!r}]", spec, low=0.0, low_open=True)
        out.append((name, lo, hi))
    return tuple(out)
