"""verl adapter, rollout correction and chunked entropy (verl 0.9.1; fastppo.integrations.verl installs these
entry points with its own).

| verl entry point (and every module that imported it by name)                 | fastppo op                  |
|-------------------------------------------------------------------------------|-----------------------------|
| `rollout_corr_helper.compute_rollout_correction_and_rejection_mask`           | `rollout_correction`        |
|   (and through it compute_rollout_correction_and_add_to_batch, bypass mode)   |                             |
| `rollout_corr_helper.compute_rollout_correction_weights`                      | `rollout_correction(is_level=)` |
| `rollout_corr_helper.compute_rollout_rejection_mask`                          | `rollout_correction(rejection=)` |
| `rollout_corr_helper.compute_offpolicy_metrics`                               | `rollout_correction`        |
| `rollout_corr_helper.compute_rollout_corr_metrics_from_logprobs`              | `rollout_correction`        |
| `verl.utils.torch_functional.entropy_from_logits_with_chunking`               | `token_logprobs(return_entropy)` |
| `verl.utils.torch_functional.calculate_sum_pi_squared_from_logits`            | none: verl's, counted delegated |

verl's option strings are parsed by verl's own parsers (`_parse_rollout_is_threshold`,
`_parse_rollout_rs_thresholds`): a threshold "lower_upper" is IcePop (fastppo is_mode "mask"), a number is TIS
("truncate", no lower clamp); the rejection options keep verl's order and thresholds. The weights come back in
the log-ratio's dtype inside verl's DataProto, the mask in the response mask's dtype, the metrics as Python
floats under verl's keys (read with one host transfer). The two helpers compute_is_metrics / compute_rs_metrics
are the internals of the functions above and are not replaced.

Delegated to verl (counted in handle.stats.delegated): anything verl's own checks reject (it raises: no valid
token, mismatched shapes, unparsable thresholds, unknown options), a batch of zero rows, non-2-D inputs, and batch
normalisation while torch.distributed is initialised (verl takes a distributed mean). Differences: the weights are
computed in float32 (float64 for float64) and rounded to the log-ratio's dtype where verl computes in that dtype;
masked positions are never read (verl multiplies its raw weights by the mask: NaN there gives NaN weights at
masked positions, fastppo 0). entropy_from_logits_with_chunking: float32 [N] for 2-D logits, gradient through
the logits; other ranks and a chunk_size < 1 are verl's. calculate_sum_pi_squared_from_logits (sum_v p_v^2, which
the engine's padding-free path computes for the optimal-token baseline) has no fastppo op over logits: every
call goes to verl and is counted in handle.stats.delegated, so a run shows what fastppo did not serve.
"""

from __future__ import annotations

import torch

import fastppo

from ._patching import EntryPoint, entropy_of_logits, host_signature_wrapper

_EXTRA = ("num_tokens", "num_seqs")


def _rch():
    import verl.trainer.ppo.rollout_corr_helper as rch

    return rch


def _tensors_ok(*ts):
    return all(t.dim() == 2 for t in ts) and len({tuple(t.shape) for t in ts}) == 1 and ts[0].shape[0] > 0


def _is_kwargs(rollout_is, threshold, normalize):
    """rollout_correction's IS keywords for verl's (rollout_is, threshold, batch_normalize), None to delegate."""
    if rollout_is not in ("token", "sequence") or not isinstance(normalize, bool):
        return None
    if normalize and torch.distributed.is_available() and torch.distributed.is_initialized():
        return None   # verl normalises with a distributed mean
    try:
        upper, lower = _rch()._parse_rollout_is_threshold(threshold)
    except (TypeError, ValueError):
        return None
    mode = "truncate" if lower is None else "mask"
    return {"is_level": rollout_is, "is_mode": mode, "is_max": upper, "is_min": lower, "is_batch_normalize": normalize}


def _rs_kwargs(rollout_rs, threshold):
    """rollout_correction's `rejection` mapping for verl's (rollout_rs, threshold), None to delegate."""
    rch = _rch()
    if not isinstance(rollout_rs, str) or threshold is None:
        return None
    names = []
    for opt in (o.strip() for o in rollout_rs.split(",")):
        if opt and opt not in names:
            names.append(opt)
    if not names or any(o not in rch.SUPPORTED_ROLLOUT_RS_OPTIONS for o in names):
        return None
    try:
        specs = rch._parse_rollout_rs_thresholds(names, threshold)
    except (TypeError, ValueError):
        return None
    return {o: ((s["lower"], s["upper"]) if o.endswith("k1") else s["upper"]) for o, s in specs.items()}


def _run(old, rollout, mask, **kw):
    """fastppo.rollout_correction and its stats as Python floats (one host transfer), verl's keys only."""
    out = fastppo.rollout_correction(old, rollout, mask, **kw)
    values = torch.stack(list(out.stats.values())).tolist() if out.stats else []
    metrics = {k: v for k, v in zip(out.stats, values) if k not in _EXTRA}
    return out, metrics


def _serve_correction_and_rejection(a):
    old, roll, m = a["old_log_prob"], a["rollout_log_prob"], a["response_mask"]
    if not _tensors_ok(old, roll, m) or not bool(m.any()):
        return NotImplemented   # verl raises its ValueError
    kw = {}
    if a["rollout_is"] is not None and a["rollout_is_threshold"] is not None:
        is_kw = _is_kwargs(a["rollout_is"], a["rollout_is_threshold"], a["rollout_is_batch_normalize"])
        if is_kw is None:
            return NotImplemented
        kw.update(is_kw)
    if a["rollout_rs"] is not None:
        rej = _rs_kwargs(a["rollout_rs"], a["rollout_rs_threshold"])
        if rej is None:
            return NotImplemented
        kw["rejection"] = rej
    out, metrics = _run(old, roll, m, **kw)
    proto = None
    if out.weights is not None:
        from verl.protocol import DataProto

        w = out.weights.to(torch.result_type(old, roll))
        proto = DataProto.from_dict(tensors={"rollout_is_weights": w})
    return proto, out.mask, {f"rollout_corr/{k}": v for k, v in metrics.items()}


def _serve_weights(a):
    lr, m = a["log_ratio"], a["response_mask"]
    if not _tensors_ok(lr, m) or not bool(m.any()):
        return NotImplemented
    kw = _is_kwargs(a["rollout_is"], a["rollout_is_threshold"], a["rollout_is_batch_normalize"])
    if kw is None:
        return NotImplemented
    out, metrics = _run(lr, torch.zeros_like(lr), m, **kw)   # old - rollout = log_ratio exactly
    return out.weights.to(lr.dtype), {k: v for k, v in metrics.items() if k.startswith("rollout_is_")}


def _serve_rejection(a):
    lr, m = a["log_ratio"], a["response_mask"]
    if not _tensors_ok(lr, m) or not bool(m.any()):
        return NotImplemented
    rej = _rs_kwargs(a["rollout_rs"], a["rollout_rs_threshold"])
    if rej is None:
        return NotImplemented
    out, metrics = _run(lr, torch.zeros_like(lr), m, rejection=rej)
    return out.mask, {k: v for k, v in metrics.items() if k.startswith("rollout_rs_")}


_TRAINING_ONLY = ("training_ppl", "training_log_ppl")


def _offpolicy(old, roll, m):
    if roll is not None and not _tensors_ok(old, roll, m) or roll is None and not _tensors_ok(old, m):
        return None
    if not bool(m.any()):
        return None   # verl asserts
    _, metrics = _run(old, old if roll is None else roll, m)
    return {k: v for k, v in metrics.items() if roll is not None or k in _TRAINING_ONLY}


def _serve_offpolicy(a):
    out = _offpolicy(a["old_log_prob"], a["rollout_log_prob"], a["response_mask"])
    return NotImplemented if out is None else out


def _serve_metrics_from_logprobs(a):
    out = _offpolicy(a["log_prob"], a["rollout_log_prob"], a["response_mask"])
    return NotImplemented if out is None else {f"rollout_corr/{k}": v for k, v in out.items()}


def _serve_chunked_entropy(a):
    logits, chunk = a["logits"], a["chunk_size"]
    if logits.dim() != 2 or not isinstance(chunk, int) or chunk < 1:
        return NotImplemented
    return entropy_of_logits(logits).float()


def _not_served(a):
    return NotImplemented


def _function(name, serve):
    def build(original, stats):
        return host_signature_wrapper(original, name, stats, serve)
    return build


def entry_points() -> list[EntryPoint]:
    """The entry points above that the installed verl defines (all of them in 0.9.1)."""
    import verl.utils.torch_functional as tf

    rch = _rch()
    table = [
        (rch, "compute_rollout_correction_and_rejection_mask", _serve_correction_and_rejection),
        (rch, "compute_rollout_correction_weights", _serve_weights),
        (rch, "compute_rollout_rejection_mask", _serve_rejection),
        (rch, "compute_offpolicy_metrics", _serve_offpolicy),
        (rch, "compute_rollout_corr_metrics_from_logprobs", _serve_metrics_from_logprobs),
        (tf, "entropy_from_logits_with_chunking", _serve_chunked_entropy),
        (tf, "calculate_sum_pi_squared_from_logits", _not_served),
    ]
    return [EntryPoint(name, (lambda mod=mod, name=name: (mod, name)), _function(name, serve))
            for mod, name, serve in table if hasattr(mod, name)]
