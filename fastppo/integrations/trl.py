"""TRL adapter (TRL 1.14 - 1.16).

| TRL entry point                                   | fastppo op                          |
|---------------------------------------------------|-------------------------------------|
| `trl.trainer.utils._ChunkedLogProbFunction.apply` | `linear_logprobs` (fused LM head)   |
| `trl.trainer.utils.selective_log_softmax`         | `token_logprobs`                    |
| `trl.trainer.utils.entropy_from_logits`           | `token_logprobs(return_entropy)`    |
| `trl.trainer.utils.selective_log_softmax_and_entropy` | `token_logprobs(return_entropy)` |
| `trl.kernels.chunked_divergence.ChunkedDivergenceFunction.apply` (TRL 1.16) | `linear_divergence` |
| `trl.GRPOTrainer._compute_loss` (TRL 1.16)        | `fused_linear_ppo_loss` (the whole loss: trl_grpo.py) |

Every module that imported one of these by name (grpo_trainer, rloo_trainer, dpo_trainer,
experimental.*, ...) is rebound too. Host semantics kept:
- fused head: `apply(hidden, weight, bias, targets, temperature, chunk_size,
  final_logit_softcapping=None, logit_scale=1.0[, outputs])`; TRL >= 1.15 returns the 5-tuple
  (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), None where not requested; TRL 1.14
  returns (log_probs, entropy). Log-probs and entropy are float32. The projection runs in the
  autocast dtype when autocast is on, else in hidden's dtype (TRL's `compute_dtype`; a bf16 head
  under fp32 hidden is upcast). `chunk_size` is TRL's tile width and is not used: fastppo picks its
  own vocabulary chunks. Gradients to hidden, weight and bias, in each input's own dtype: under
  autocast the operands are rounded to the autocast dtype and held in their own dtype
  (`in_compute_dtype`), so an fp32 weight gets its fp32 gradient from fp32 accumulators, unrounded, as
  TRL's head returns it (TRL rounds its logits' gradient tile to the compute dtype, fastppo keeps it fp32:
  the two agree at bf16 tolerance, not bit for bit).
- selective_log_softmax: rows where `row_mask == 0` give 0 and no gradient; the result has the
  logits' dtype, float32 where TRL would run its own Triton kernel (CUDA, fp16/bf16/fp32). A
  top-K `index` [..., K] goes to TRL's original.
- entropy_from_logits / selective_log_softmax_and_entropy: same dtype rule; `chunk_size` unused.
- distillation (DistillationTrainer's `_chunked_divergence_loss`): `apply(student_hidden, student_weight,
  student_bias, teacher_hidden, teacher_weight, teacher_bias, beta, temperature=1.0, student_logit_scale=1.0,
  student_final_logit_softcapping=None, teacher_logit_scale=1.0, teacher_final_logit_softcapping=None)` ->
  (per-token divergence, the student's entropy without gradient), both float32; each model projects in its
  autocast dtype, else its hidden's dtype (the head cast to it, the bias added in fp32, as TRL). Gradients to
  the student's hidden, weight and bias. Under autocast the operands are rounded to the autocast dtype and
  held in fp32, so the gradients come back unrounded; TRL rounds the gradient of the logits to the student's
  dtype before its gradient GEMMs, fastppo keeps it fp32 (bf16 runs agree at bf16 tolerance). A beta
  outside [0, 1] or a temperature <= 0 goes to TRL's original.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version as _dist_version

import torch
from packaging.version import Version

import fastppo

from . import trl_grpo
from ._patching import (
    EntryPoint,
    accepts,
    compute_dtype,
    entropy_of_logits,
    host_signature_wrapper,
    in_compute_dtype,
)

SUPPORTED = ">=1.14, <1.17 (tested: 1.14.0, 1.16.0)"
EXTRA_OUTPUTS = ("log_sum_sq_probs", "mean_logits", "is_top1")
_IGNORE = -100


def installed_version() -> str:
    return _dist_version("trl")


def supported(v: str) -> bool:
    return Version("1.14") <= Version(v) < Version("1.17")


def _utils():
    import trl.trainer.utils as u

    return u


def _host_kernel_path(*args) -> bool:
    """Whether TRL itself would answer with its Triton kernel (which returns float32)."""
    u = _utils()
    pred = getattr(u, "_supports_trl_loss_kernel", None)
    has_triton = getattr(u, "is_triton_available", lambda: False)
    return bool(pred is not None and has_triton() and pred(*args))


def _labels(index, row_mask):
    return index if row_mask is None else torch.where(row_mask == 0, _IGNORE, index)


# --- fused LM head -------------------------------------------------------------------------------

def _serve_fused_head(a):
    five = "outputs" in a
    wanted = set(a["outputs"]) if five else {"log_probs", "entropy"}
    extras = tuple(n for n in EXTRA_OUTPUTS if n in wanted)
    softcap, scale = a.get("final_logit_softcapping"), a.get("logit_scale", 1.0)
    kw = {}
    if softcap is not None or scale != 1.0:
        if not accepts(fastppo.linear_logprobs, "final_logit_softcapping"):
            return NotImplemented
        kw.update(final_logit_softcapping=softcap, logit_scale=scale)
    if extras:
        if not accepts(fastppo.linear_logprobs, "extra_outputs"):
            return NotImplemented
        kw["extra_outputs"] = extras
    hidden = a["hidden"] if "hidden" in a else a["last_hidden"]   # TRL 1.14 names it last_hidden
    weight, bias = a["weight"], a["bias"]
    dev = hidden.device.type
    cdt = compute_dtype(hidden)
    want_ent = "entropy" in wanted
    with torch.autocast(dev, enabled=False):
        out = fastppo.linear_logprobs(in_compute_dtype(hidden, cdt), in_compute_dtype(weight, cdt), a["targets"],
                                      bias=None if bias is None else in_compute_dtype(bias, cdt),
                                      temperature=a["temperature"], return_entropy=want_ent, **kw)
    if extras:
        logp, ent, lssp, mean_logits, top1 = tuple(out)
    else:
        (logp, ent), lssp, mean_logits, top1 = (out if want_ent else (out, None)), None, None, None
    logp = logp.float()
    ent = None if ent is None else ent.float()
    if not five:
        return logp, ent
    return logp, ent, lssp, mean_logits, top1



def _build_fused_head(original, stats):
    params = list(inspect.signature(original.forward).parameters.values())[1:]   # drop ctx
    sig = inspect.Signature(params)
    apply = host_signature_wrapper(original.forward, "ChunkedLogProbFunction", stats, _serve_fused_head, sig=sig,
                                   call_original=original.apply)
    apply.__name__ = "apply"
    return type(original.__name__, (), {"__doc__": "fastppo.linear_logprobs in TRL's fused LM head. "
                                        + (original.__doc__ or ""), "apply": staticmethod(apply),
                                        "__fastppo_original__": original, "__module__": __name__})


# --- distillation ---------------------------------------------------------------------------------

def _serve_divergence(a):
    beta, tau = a["beta"], a["temperature"]
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
        return NotImplemented
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
        return NotImplemented
    hs, ht = a["student_hidden"], a["teacher_hidden"]
    s_dt, t_dt = compute_dtype(hs), compute_dtype(ht)
    with torch.autocast(hs.device.type, enabled=False):
        div, ent = fastppo.linear_divergence(
            in_compute_dtype(hs, s_dt), in_compute_dtype(a["student_weight"], s_dt), in_compute_dtype(ht, t_dt),
            in_compute_dtype(a["teacher_weight"], t_dt), beta=float(beta),
            temperature=float(tau), student_bias=a["student_bias"], teacher_bias=a["teacher_bias"],
            return_entropy=True, student_logit_scale=a["student_logit_scale"],
            student_final_logit_softcapping=a["student_final_logit_softcapping"],
            teacher_logit_scale=a["teacher_logit_scale"],
            teacher_final_logit_softcapping=a["teacher_final_logit_softcapping"])
    return div.float(), ent.float()


def _build_divergence(original, stats):
    params = list(inspect.signature(original.forward).parameters.values())[1:]   # drop ctx
    apply = host_signature_wrapper(original.forward, "ChunkedDivergenceFunction", stats, _serve_divergence,
                                   sig=inspect.Signature(params), call_original=original.apply)
    apply.__name__ = "apply"
    return type(original.__name__, (), {"__doc__": "fastppo.linear_divergence in TRL's distillation. "
                                        + (original.__doc__ or ""), "apply": staticmethod(apply),
                                        "__fastppo_original__": original, "__module__": __name__})


def _divergence_module():
    """trl.kernels.chunked_divergence (TRL >= 1.16), or None."""
    try:
        import trl.kernels.chunked_divergence as cd
    except ImportError:
        return None
    return cd if hasattr(cd, "ChunkedDivergenceFunction") else None


# --- logits entry points ---------------------------------------------------------------------------

def _serve_selective(a):
    logits, index = a["logits"], a["index"]
    if index.dim() != logits.dim() - 1 or a["temperature"] <= 0:
        return NotImplemented   # top-K gather, or an error TRL raises itself
    out_dtype = torch.float32 if _host_kernel_path(logits, index, a["row_mask"]) else logits.dtype
    logp = fastppo.token_logprobs(logits, _labels(index, a["row_mask"]), temperature=a["temperature"])
    return logp.to(out_dtype)


def _serve_entropy(a):
    logits = a["logits"]
    out_dtype = torch.float32 if _host_kernel_path(logits) else logits.dtype
    return entropy_of_logits(logits).to(out_dtype)


def _serve_selective_and_entropy(a):
    logits, index = a["logits"], a["index"]
    if index.dim() != logits.dim() - 1 or a["temperature"] <= 0:
        return NotImplemented
    out_dtype = torch.float32 if _host_kernel_path(logits, index, a["row_mask"]) else logits.dtype
    logp, ent = fastppo.token_logprobs(logits, _labels(index, a["row_mask"]), temperature=a["temperature"],
                                       return_entropy=True)
    ent = ent.to(out_dtype)
    return logp.to(out_dtype), (ent if a["entropy_requires_grad"] else ent.detach())


def _function(name, serve):
    def build(original, stats):
        return host_signature_wrapper(original, name, stats, serve)
    return build


def entry_points() -> list[EntryPoint]:
    u = _utils()
    table = [
        ("ChunkedLogProbFunction", "_ChunkedLogProbFunction", _build_fused_head),
        ("selective_log_softmax", "selective_log_softmax", _function("selective_log_softmax", _serve_selective)),
        ("entropy_from_logits", "entropy_from_logits", _function("entropy_from_logits", _serve_entropy)),
        ("selective_log_softmax_and_entropy", "selective_log_softmax_and_entropy",
         _function("selective_log_softmax_and_entropy", _serve_selective_and_entropy)),
    ]
    points = [EntryPoint(name, (lambda attr=attr: (u, attr)), build) for name, attr, build in table if hasattr(u, attr)]
    if trl_grpo.available():
        points.append(trl_grpo.entry_point())
    cd = _divergence_module()
    if cd is not None:
        points.append(EntryPoint("ChunkedDivergenceFunction", lambda: (cd, "ChunkedDivergenceFunction"),
                                 _build_divergence))
    return points
