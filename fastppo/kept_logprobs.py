"""token_logprobs(kept=): log-probabilities renormalised over each row's kept set, as torch.library ops.

The op family: token_logprobs_kept (forward: logp, entropy and the saved row statistics m_K, log s_K, lse)
and token_logprobs_kept_backward (the dense dlogits, zero outside the kept set unless the entropy has a
gradient), each with its fake beside it, autograd registered right below; then `check_kept`, the validation
the public functions (token_logprobs, fused_ppo_loss) share.
A KeptSet travels as its two tensors (ids, offsets); a per-token temperature as a tensor `tau` (None: the
float `temperature`). Backends: fastppo.kernels.kept (Triton) or fastppo.kept_torch (PyTorch), chosen by
`fastppo.dispatch.ops("kept", backend)`."""

from __future__ import annotations

import torch

from ._validation import label_check_enabled
from .dispatch import ops
from .kept import KeptSet
from .library import acc_dtype, define, empty, refuse_double_backward


def _temperature(tau, temperature):
    return temperature if tau is None else tau


# ----------------------------------------------------------------------------- ops
def _kept_fake(logits, labels, ids, offsets, tau, temperature, ignore_index, with_entropy, logit_scale, softcap,
               backend):
    logp = logits.new_empty(labels.shape, dtype=acc_dtype(logits))
    n = labels.numel()
    rows = logits.new_empty((n,), dtype=logp.dtype)
    ent = torch.empty_like(logp) if with_entropy else empty(logp)
    return logp, ent, rows, torch.empty_like(rows), torch.empty_like(rows) if with_entropy else empty(logp)


@define("token_logprobs_kept", _kept_fake, kernels=True)
def token_logprobs_kept_op(logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor,
                           tau: torch.Tensor | None, temperature: float, ignore_index: int, with_entropy: bool,
                           logit_scale: float, softcap: float | None, backend: str
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, m_K, log s_K, lse): logp and entropy shaped like labels (entropy empty unless
    with_entropy), the kept-set row max / log-sum and the full-vocabulary lse ([N]; lse empty without entropy)
    saved for backward, with no gradient."""
    st = ops("kept", backend).kept_logprobs_fwd(logits, labels, ids, offsets,
                                                temperature=_temperature(tau, temperature),
                                                ignore_index=ignore_index, with_entropy=with_entropy,
                                                logit_scale=logit_scale, softcap=softcap)
    ent = empty(st.logp) if st.entropy is None else st.entropy.view(labels.shape)
    return st.logp.view(labels.shape), ent, st.m, st.log_s, empty(st.logp) if st.lse is None else st.lse


def _kept_backward_fake(logits, labels, ids, offsets, tau, m, log_s, lse, entropy, grad_logp, grad_entropy,
                        temperature, ignore_index, logit_scale, softcap, backend):
    return logits.new_empty(logits.shape)


@define("token_logprobs_kept_backward", _kept_backward_fake, kernels=True)
def token_logprobs_kept_backward_op(logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor,
                                    offsets: torch.Tensor, tau: torch.Tensor | None, m: torch.Tensor,
                                    log_s: torch.Tensor, lse: torch.Tensor | None, entropy: torch.Tensor | None,
                                    grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None, temperature: float,
                                    ignore_index: int, logit_scale: float, softcap: float | None,
                                    backend: str) -> torch.Tensor:
    """dlogits of sum(grad_logp logp + grad_entropy H) (dense, logits' shape; rows with an ignore_index label
    get zeros and are not read)."""
    mod = ops("kept", backend)
    has_ent = entropy is not None and grad_entropy is not None
    acc = m.dtype
    stats = mod.KeptStats(empty(m), m, log_s, lse if has_ent else None, entropy.reshape(-1) if has_ent else None)
    return mod.kept_logprobs_bwd(
        logits, labels, ids, offsets, stats, grad_logp.to(acc).reshape(-1),
        grad_entropy.to(acc).reshape(-1) if has_ent else None, temperature=_temperature(tau, temperature),
        ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap).contiguous()


def _kept_setup(ctx, inputs, output):
    logits, labels, ids, offsets, tau, temperature, ignore_index, with_entropy, logit_scale, softcap, backend = inputs
    logp, ent, m, log_s, lse = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(m, log_s, lse)
    ctx.save_for_backward(logits, labels, ids, offsets, tau, m, log_s, lse if with_entropy else None,
                          ent if with_entropy else None)
    ctx.args = (temperature, ignore_index, logit_scale, softcap, backend)


def _kept_backward(ctx, g_logp, g_ent, *_):
    logits, labels, ids, offsets, tau, m, log_s, lse, ent = ctx.saved_tensors
    if g_logp is None and g_ent is None:
        return (None,) * 11
    if g_logp is None:
        g_logp = torch.zeros(labels.shape, dtype=m.dtype, device=m.device)
    d = torch.ops.fastppo.token_logprobs_kept_backward(logits, labels, ids, offsets, tau, m, log_s, lse, ent,
                                                       g_logp, g_ent, *ctx.args)
    return (d, *([None] * 10))


token_logprobs_kept_op.register_autograd(_kept_backward, setup_context=_kept_setup)
refuse_double_backward(token_logprobs_kept_backward_op, "token_logprobs_kept_backward")


# ----------------------------------------------------------------------------- validation
def check_kept_vocab(kept: KeptSet, vocab: int) -> None:
    """kept fits a vocabulary of `vocab` ids: its vocab_size (where set) is V, and (where the data check is free:
    CPU, or FASTPPO_CHECK_LABELS=1) its ids lie below V."""
    if kept.vocab_size is not None and kept.vocab_size != vocab:
        raise ValueError(f"kept was built for vocab_size {kept.vocab_size} but logits have V = {vocab}")
    if label_check_enabled(kept.device) and kept.nnz and int(kept.ids.max()) >= vocab:
        raise ValueError(f"kept ids must lie in [0, {vocab}), got {int(kept.ids.max())}")


def check_kept(kept, labels: torch.Tensor, vocab: int | None, ignore_index: int,
               live: torch.Tensor | None = None) -> None:
    """`kept` is a KeptSet with one row per label (rows = labels.numel()), on the labels' device, fitting a
    vocabulary of `vocab` ids (check_kept_vocab; None: not known yet, as for a vocabulary shard before the
    shard sizes are gathered). Where the data checks are free (CPU, or FASTPPO_CHECK_LABELS=1) every live
    label (not ignore_index, and `live` where given) lies in its row's kept set. On CUDA such a label gives
    NaN."""
    if not isinstance(kept, KeptSet):
        raise TypeError(f"kept must be a fastppo.KeptSet or None, got {type(kept).__name__}")
    n = labels.numel()
    if kept.rows != n:
        raise ValueError(f"kept has {kept.rows} rows but labels has {n} elements (shape {tuple(labels.shape)}); "
                         f"a KeptSet has one row per label")
    if kept.device != labels.device:
        raise ValueError(f"kept is on {kept.device} but labels are on {labels.device}")
    if vocab is not None:
        check_kept_vocab(kept, vocab)
    if not label_check_enabled(labels.device):
        return
    y = labels.reshape(-1)
    rows = torch.repeat_interleave(torch.arange(n, device=y.device), kept.counts(), output_size=kept.nnz)
    hits = torch.zeros(n, dtype=torch.int64, device=y.device).index_add_(0, rows, (kept.ids == y[rows]).long())
    bad = (y != ignore_index) & (hits == 0)
    if live is not None:
        bad &= live.reshape(-1) != 0
    if bool(bad.any()):
        r = int(bad.nonzero()[0])
        raise ValueError(f"label {int(y[r])} at flat position {r} is not in its row's kept set "
                         f"({int(bad.sum())} such labels); give it ignore_index or keep it")
