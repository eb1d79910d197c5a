"""token_logprobs: per-token log-probabilities (and entropy) from logits, fused.

The op family, top to bottom: the torch.library ops token_logprobs (forward: logp, entropy, lse),
token_logprobs_backward (dlogits, recomputing p) and token_logprobs_backward_inplace (the same written
over the logits, fused_ppo_loss(inplace=True)), each with its fake beside it; then the public function.
Backends: fastppo.kernels.logprobs (Triton) or fastppo.logprobs_torch (PyTorch), chosen by
`fastppo.dispatch.ops("logprobs", backend)`."""

from __future__ import annotations

import torch

from ._validation import check_float, check_labels, check_temperature_rows
from .backend import backend_for
from .dispatch import ops
from .kept import KeptSet
from .kept_logprobs import check_kept
from .kernels.logprobs import logprobs_bwd as triton_logprobs_bwd
from .library import acc_dtype, define, empty, refuse_double_backward
from .options import LogitTransform, VocabParallel
from .vocab_parallel import sharded_token_logprobs


# ----------------------------------------------------------------------------- ops
def _token_logprobs_fake(logits, labels, inv_tau, ignore_index, with_entropy, logit_scale, softcap, backend, tau=None):
    logp = logits.new_empty(labels.shape, dtype=acc_dtype(logits))
    ent = torch.empty_like(logp) if with_entropy else empty(logp)
    return logp, ent, logits.new_empty((labels.numel(), 2), dtype=acc_dtype(logits))


@define("token_logprobs", _token_logprobs_fake, kernels=True)
def token_logprobs_op(logits: torch.Tensor, labels: torch.Tensor, inv_tau: float, ignore_index: int, with_entropy: bool,
                   logit_scale: float, softcap: float | None, backend: str,
                   tau: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, lse) of z' = softcap(logit_scale z) inv_tau (1 / tau per token when `tau` is given):
    logp and entropy shaped like labels (entropy empty unless with_entropy); lse [N, 2] (each row's max m and
    log s, kept apart so that backward's p = exp((z' - m) - log s) is exact at any magnitude) is saved for
    backward and gets no gradient."""
    logp, lse, ent = ops("logprobs", backend).logprobs_fwd(logits, labels, inv_tau=inv_tau, ignore_index=ignore_index,
                                                        with_entropy=with_entropy, logit_scale=logit_scale,
                                                        softcap=softcap, tau=tau)
    return logp.view(labels.shape), empty(logp) if ent is None else ent.view(labels.shape), lse


def _logprobs_backward_fake(logits, labels, lse, entropy, grad_logp, grad_entropy, scale, valid, inv_tau,
                            ignore_index, logit_scale, softcap, backend, tau=None):
    return logits.new_empty(logits.shape)


@define("token_logprobs_backward", _logprobs_backward_fake, kernels=True)
def token_logprobs_backward_op(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                            entropy: torch.Tensor | None, grad_logp: torch.Tensor | None,
                            grad_entropy: torch.Tensor | None, scale: torch.Tensor | None,
                            valid: torch.Tensor | None, inv_tau: float, ignore_index: int, logit_scale: float,
                            softcap: float | None, backend: str, tau: torch.Tensor | None = None) -> torch.Tensor:
    """dlogits = scale * (grad_logp dlogp/dz + grad_entropy dH/dz), recomputing p from the logits; rows
    with an ignore_index label or valid == 0 get exact zeros. A None grad_logp / grad_entropy is an absent
    term (no work for it: e.g. only the entropy is differentiated)."""
    acc = lse.dtype
    ent_rows = g_ent = None
    if entropy is not None and grad_entropy is not None:
        ent_rows, g_ent = entropy.reshape(-1), grad_entropy.to(acc).reshape(-1)
    c_logp = None if grad_logp is None else grad_logp.to(acc).reshape(-1)
    return ops("logprobs", backend).logprobs_bwd(
        logits, labels, lse, ent_rows, c_logp, g_ent, inv_tau=inv_tau,
        ignore_index=ignore_index, scale=scale, valid=valid, logit_scale=logit_scale, softcap=softcap,
        tau=tau).contiguous()


def _token_logprobs_setup(ctx, inputs, output):
    logits, labels, inv_tau, ignore_index, with_entropy, logit_scale, softcap, backend, *rest = inputs
    logp, ent, lse = output
    ctx.set_materialize_grads(False)   # an unused output gets no zero-filled gradient pass
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, labels, lse, ent if with_entropy else None, rest[0] if rest else None)
    ctx.args = (inv_tau, ignore_index, logit_scale, softcap, backend)


def _token_logprobs_backward(ctx, g_logp, g_ent, _g_lse):
    logits, labels, lse, ent, tau = ctx.saved_tensors
    if g_logp is None and g_ent is None:
        return (None,) * 9
    d = torch.ops.fastppo.token_logprobs_backward(logits, labels, lse, ent, g_logp, g_ent, None, None, *ctx.args,
                                                  tau)
    return (d, *([None] * 8))


token_logprobs_op.register_autograd(_token_logprobs_backward, setup_context=_token_logprobs_setup)


def _logprobs_backward_inplace_fake(logits, labels, lse, entropy, grad_logp, grad_entropy, scale, valid, inv_tau,
                                    ignore_index, logit_scale, softcap, tau=None):
    return None


@define("token_logprobs_backward_inplace", _logprobs_backward_inplace_fake, kernels=True, mutates_args=("logits",))
def token_logprobs_backward_inplace_op(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                                    entropy: torch.Tensor | None, grad_logp: torch.Tensor,
                                    grad_entropy: torch.Tensor | None, scale: torch.Tensor | None,
                                    valid: torch.Tensor | None, inv_tau: float, ignore_index: int, logit_scale: float,
                                    softcap: float | None, tau: torch.Tensor | None = None) -> None:
    """token_logprobs_backward written over the logits (fused_ppo_loss(inplace=True)); Triton only."""
    triton_logprobs_bwd(logits, labels, lse, None if entropy is None else entropy.reshape(-1), grad_logp.reshape(-1),
                 None if grad_entropy is None else grad_entropy.reshape(-1), inv_tau=inv_tau,
                 ignore_index=ignore_index, scale=scale, inplace=True, valid=valid, logit_scale=logit_scale,
                 softcap=softcap, tau=tau)


refuse_double_backward(token_logprobs_backward_op, "token_logprobs_backward")


# ----------------------------------------------------------------------------- public function
def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float | torch.Tensor = 1.0,
                   ignore_index: int = -100, return_entropy: bool = False,
                   final_logit_softcapping: float | None = None,
                   logit_scale: float = 1.0, vocab_parallel: VocabParallel | None = None,
                   kept: KeptSet | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label under softmax(z'), and optionally the entropy of that
    distribution, in one pass over the vocabulary, with

        z' = softcap(logit_scale * z) / temperature,   softcap(x) = c * tanh(x / c)  (c = final_logit_softcapping;
        no cap when None). This is the order of TRL 1.16 (`trl/kernels/chunked_logprob.py::_transform`:
        scale, then Gemma-style softcap, then temperature) and of the models (Cohere `logit_scale`,
        Granite `1 / logits_scaling`, Gemma 2/3 `final_logit_softcapping`; temperature at sampling time).
        logp_t = z'_y - logsumexp(z'),   H_t = logsumexp(z') - sum_i p_i z'_i.

    logits: [..., V] fp16/bf16/fp32/fp64 (any strides); labels: [...] integer (any strides),
    `logits[..., t, :]` predicts `labels[..., t]` (shift before calling). Returns float32 [...] log-probs
    (float64 for float64 logits), or (log-probs, entropy) with `return_entropy=True`. `ignore_index`
    positions give 0 and no gradient (entropy 0 there too), and their logits row is never read (NaN there
    cannot leak). Differentiable w.r.t. logits:
    dlogp/dz = (onehot(y) - p) dz'/dz, dH/dz = -p (log p + H) dz'/dz, dz'/dz = scale (1 - tanh^2(scale z / c)) / tau.
    `vocab_parallel=fastppo.VocabParallel(group)`: the logits passed are this rank's contiguous vocabulary
    shard, in rank order, of the process group (see VocabParallel and the README's vocabulary-parallel
    section); labels are global ids, the results those of the full vocabulary on every rank; kept (global ids)
    and a per-token temperature are replicated like the labels.

    `temperature`: a positive float, or a tensor of labels' shape (one temperature per token, e.g. per
    sample; positive and finite at live positions, no gradient; the kernel reads one value per row, no extra
    pass).
    `kept`: a fastppo.KeptSet with one row per label (rows = labels flattened): the sampler's kept set
    (top-k / top-p / min-p). Then logp_t = z'_y - logsumexp_{j in K_t} z'_j and its gradient reaches the
    kept columns only; the entropy stays the full-vocabulary entropy of softmax(z') (what an entropy bonus or
    entropy statistics mean). Without return_entropy the forward reads only each row's kept logits (bytes
    grow with the kept ids, not with V). A live label outside its row's kept set (or an empty row) is a
    ValueError where the check is free (CPU; FASTPPO_CHECK_LABELS=1 elsewhere), NaN on CUDA.
    """
    if vocab_parallel is not None:
        return sharded_token_logprobs(logits, labels, vocab_parallel, temperature=temperature,
                                      ignore_index=ignore_index, return_entropy=return_entropy,
                                      final_logit_softcapping=final_logit_softcapping, logit_scale=logit_scale,
                                      kept=kept)
    check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dim, got shape {tuple(logits.shape)}")
    check_labels(labels, logits.shape[:-1], logits.shape[-1], ignore_index)
    tau = check_temperature_rows(temperature, labels.shape, logits.device, "token_logprobs", labels, ignore_index)
    tr = LogitTransform.of(1.0 if tau is not None else temperature, logit_scale, final_logit_softcapping)
    if kept is not None:
        check_kept(kept, labels, logits.shape[-1], ignore_index)
        logp, ent, *_ = torch.ops.fastppo.token_logprobs_kept(
            logits, labels, kept.ids, kept.offsets, tau, 1.0 if tau is not None else float(temperature),
            int(ignore_index), bool(return_entropy),
            tr.logit_scale, tr.softcap, backend_for(logits, labels))
        return (logp, ent) if return_entropy else logp
    logp, ent, _ = torch.ops.fastppo.token_logprobs(logits, labels, tr.inv_tau, int(ignore_index), bool(return_entropy),
                                                    tr.logit_scale, tr.softcap, backend_for(logits, labels), tau)
    return (logp, ent) if return_entropy else logp
