"""fused_linear_ppo_loss: fused_ppo_loss from the final hidden states and the lm_head weight, never holding
the [N, V] logits. Built on fastppo.linear (the chunked projection, its Triton pipeline and PyTorch twin)
and fastppo.losses (the per-token loss function); the op fused_linear_ppo_loss is registered here with its
fake and autograd. FLOPs and bytes: fastppo.linear's docstring (6 N_valid H V with the gradient formed in
forward, 8 N_valid H V on the recompute path)."""

from __future__ import annotations

import torch

from ._validation import check_temperature_rows
from .backend import backend_for
from .fused import FusedOutputs, ppo_output
from .kept import KeptSet
from .kept_logprobs import check_kept
from .kernels.scale import scale
from .library import Once, acc_dtype, define, empty, encode, or_empty
from .linear import linear_backward_fake, linear_options_of
from .linear_pipeline import (
    KeptArg,
    build_linear_options,
    check_grad_filter,
    check_linear,
    flatten_rows,
    forward_rows,
    grad_filter_eps,
    gradient_rows,
    triton_gradient_pass,
    triton_kernels,
)
from .losses import agg_outputs_fake, check_fused_tensors, loss_options, loss_options_of, loss_terms_from_logprobs
from .options import LinearOptions, LossOptions, VocabParallel
from .outputs import PPOLossOutput
from .packed import per_token
from .vocab_parallel_linear import sharded_fused_linear_ppo_loss


def _token_local(opts: LossOptions) -> bool:
    """Whether every token's loss coefficients depend only on that token's values and the aggregation
    weights (then the gradient is formed chunk by chunk in forward, 6 N H V FLOPs): every token-level
    policy loss and every aggregation. A sequence-level term (gspo, gspo_token, gmpo: sequence ratios) or a
    batch-global one (entropy_quantile: a threshold over all tokens) answers False and takes the
    recompute path (8 N H V); so do clip_cov / kl_cov (a covariance rank over the batch)."""
    return opts.token_local


def _agg_weights(mask, cu, opts: LossOptions, acc, backend, entropy=False):
    """Per-token aggregation weights m_t w_b of the loss's `agg` mode, read from the per-token loss function
    itself: with entropy_coef = 1 and zero entropy its entropy coefficient is exactly -m_t w_b. entropy=True:
    the entropy term's weights (its own token-mean m_t / max(sum m, 1) with entropy_agg)."""
    zeros = torch.zeros(mask.shape, dtype=acc, device=mask.device)
    unit = opts.replace(policy_loss="ppo", clip_low=0.2, clip_high=None, dual_clip=None, ratio_max=None,
                        entropy_quantile=None, dro_beta=None, kl_coef=0.0, entropy_coef=1.0,
                        entropy_agg=opts.entropy_agg if entropy else None)
    coef_ent = loss_terms_from_logprobs(zeros, zeros, zeros, zeros, mask, opts=unit, backend=backend,
                                        cu_seqlens=cu).coef_ent
    assert coef_ent is not None   # entropy given: the entropy coefficient exists
    return -coef_ent.reshape(-1)


def fused_linear_outputs(hidden, weight, bias, labels, old, adv, mask, ref, isw, cu, opts: LossOptions,
                         lin: LinearOptions, needs, tau=None, kept=None, behaviour=None):
    """Forward of fused_linear_ppo_loss (the body of torch.ops.fastppo.fused_linear_ppo_loss): loss, logp,
    kl, entropy, stats and the gradients (d_hidden, d_weight, d_bias) for a unit upstream gradient, formed
    in this pass where `needs` asks for them (None elsewhere). `tau`: per-token temperatures (or None);
    `kept`: a KeptArg (log-probs over the kept sets) or None; `behaviour`: the off-policy mask's behaviour
    log-probs (None: old)."""
    h2, y = flatten_rows(hidden, labels)
    tau = None if tau is None else tau.reshape(-1).contiguous()
    shape = labels.shape
    valid = (y != lin.ignore_index) & (mask.reshape(-1) != 0)
    use_ent = lin.with_entropy and opts.entropy_coef != 0
    acc = acc_dtype(h2, weight)
    grads = (None, None, None)
    in_forward = any(needs) and lin.backend == "triton" and _token_local(opts)
    if in_forward:
        grads, out = _forward_with_gradient(h2, weight, bias, y, valid, old, adv, mask, ref, isw, cu, opts, lin,
                                            needs, use_ent, acc, tau, kept)
    else:
        rows, out = forward_rows(h2, weight, bias, y, valid, lin, tau, kept)
    logp = out["logp"].view(shape)
    ent = out["ent"].view(shape) if lin.with_entropy else None
    res = loss_terms_from_logprobs(logp, ent, old, adv, mask, opts=opts, backend=lin.backend, ref=ref,
                                   rollout_is_weights=isw, cu_seqlens=cu, off_policy_logprobs=behaviour)
    if any(needs) and not in_forward:
        row_stats = (out["lse"], out["ent"]) if rows is None else (out["lse"], out["ent_c"])
        grads = gradient_rows(h2, weight, bias, y, valid, rows, row_stats, res.coef.reshape(-1),
                              res.coef_ent.reshape(-1) if use_ent and res.coef_ent is not None else None, lin, needs,
                              tau, kept, out.get("klse"))
    dh, dw, db = grads
    return res.loss, logp, res.kl, ent, res.stats, (None if dh is None else dh.view(hidden.shape)), dw, db


def _per_token(t, mask, cu):
    """A per-token ([B, T]) or per-sequence ([B]) tensor as one value per flattened token (packed by cu:
    [total] or [S])."""
    if t is None:
        return None
    if cu is not None:
        return per_token(t, cu, mask.shape[0])
    if t.dim() == 1 and mask.dim() == 2:
        t = t[:, None]
    return t.expand(mask.shape).reshape(-1)


def _forward_with_gradient(h2, weight, bias, y, valid, old, adv, mask, ref, isw, cu, opts, lin, needs, use_ent, acc,
                           tau=None, kept=None):
    """The 6 N H V path: each chunk's coefficients dloss/dlogp = m w dL/dlogp and dloss/dH = -m w c_ent come
    from the per-token loss function run on the chunk's rows with unit aggregation (token-mean over a
    count of 1), times the global aggregation weights m w (the entropy term: its own weights with
    entropy_agg), so chunk contributions add up exactly."""
    k = triton_kernels()
    N = h2.shape[0]
    rows = k.CompactRows(valid)
    out = k.new_outputs(N, h2.device, acc, lin.with_entropy, False)
    weights = _agg_weights(mask, cu, opts, acc, lin.backend)
    ent_weights = _agg_weights(mask, cu, opts, acc, lin.backend, True) if use_ent and opts.entropy_agg else weights
    flat = [_per_token(t, mask, cu) for t in (old, adv, mask, ref, isw)]
    unit = opts.replace(agg="token-mean", num_tokens=1.0, num_seqs=None, horizon=None, entropy_agg=None)
    c_logp = torch.zeros(N, dtype=acc, device=h2.device)
    c_ent = torch.zeros(N, dtype=acc, device=h2.device) if use_ent else None

    def coefs(r0, n):
        sel = rows.idx[r0:r0 + n]
        old_c, adv_c, mask_c, ref_c, isw_c = (None if t is None else t.index_select(0, sel)[None] for t in flat)
        ent_c = out["ent_c"][r0:r0 + n][None] if use_ent else None
        res = loss_terms_from_logprobs(out["logp_c"][r0:r0 + n][None], ent_c, old_c, adv_c, mask_c, opts=unit,
                                       backend=lin.backend, ref=ref_c, rollout_is_weights=isw_c)
        c_logp[r0:r0 + n] = res.coef[0] * weights.index_select(0, sel)
        if use_ent:
            c_ent[r0:r0 + n] = res.coef_ent[0] * ent_weights.index_select(0, sel)
        return c_logp, c_ent

    grads = triton_gradient_pass(h2, weight, bias, y, rows, out, lin, needs, coefs, tau=tau, kept=kept)
    return grads, out


# ----------------------------------------------------------------------------- op
def _fused_linear_ppo_loss_fake(hidden, weight, bias, labels, old_logprobs, advantages, mask, ref_logprobs,
                                rollout_is_weights, cu_seqlens, options, linear_options, need_hidden, need_weight,
                                need_bias, backend, tau=None, ids=None, offsets=None, off_policy_logprobs=None):
    lin = linear_options_of(linear_options)
    loss, stats, coef = agg_outputs_fake(hidden, mask)
    logp = hidden.new_empty(labels.shape, dtype=acc_dtype(hidden, weight))
    kl = coef.new_empty(coef.shape) if ref_logprobs is not None else empty(logp)
    ent = torch.empty_like(logp) if lin.with_entropy else empty(logp)
    return (loss, logp, kl, ent, stats, *linear_backward_fake(hidden, weight, bias, None, None, None, None, None, None,
                                                               need_hidden, need_weight, need_bias, backend))


@define("fused_linear_ppo_loss", _fused_linear_ppo_loss_fake, kernels=True)
def fused_linear_ppo_loss_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             labels: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                             mask: torch.Tensor, ref_logprobs: torch.Tensor | None,
                             rollout_is_weights: torch.Tensor | None, cu_seqlens: torch.Tensor | None, options: str,
                             linear_options: str,
                             need_hidden: bool, need_weight: bool, need_bias: bool, backend: str,
                             tau: torch.Tensor | None = None, ids: torch.Tensor | None = None,
                             offsets: torch.Tensor | None = None,
                             off_policy_logprobs: torch.Tensor | None = None) -> FusedOutputs:
    """(loss, logprobs, kl, entropy, stats, d_hidden, d_weight, d_bias): fused_linear_ppo_loss's forward,
    which forms the gradients for a unit upstream gradient (fastppo.linear; empty where not needed).
    tau: per-token temperatures (linear_options' inv_tau then 1); ids / offsets: a KeptSet's CSR;
    off_policy_logprobs: the off-policy mask's behaviour log-probs. Only loss is differentiable; its backward
    scales the saved gradients."""
    loss, logp, kl, ent, stats, dh, dw, db = fused_linear_outputs(
        hidden, weight, bias, labels, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights, cu_seqlens,
        loss_options_of(options), linear_options_of(linear_options), (need_hidden, need_weight, need_bias), tau,
        None if ids is None or offsets is None else KeptArg(ids, offsets), off_policy_logprobs)
    return (loss, logp, or_empty(kl, logp), or_empty(ent, logp), stats, empty(hidden) if dh is None else
            dh.contiguous(), or_empty(dw, weight), or_empty(db, weight))


def _fused_linear_ppo_loss_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)   # outputs without a gradient get no zero-filled tensor
    loss, logp, kl, ent, stats, dh, dw, db = output
    ctx.mark_non_differentiable(logp, kl, ent, stats, dh, dw, db)
    ctx.save_for_backward(dh, dw, db, *inputs[:3])
    ctx.present = inputs[12:15]     # need_hidden, need_weight, need_bias
    ctx.backend = inputs[15]


SCALE_SLICE_ELEMENTS = 1 << 26   # 256 MiB of fp32 per temporary of _scaled on the torch backend


def _traced(t) -> bool:
    """Whether t is being traced (torch.compile, AOT autograd): the backward formula then stays in torch ops (a
    Triton launch inside an autograd formula is not an opaque op there)."""
    from torch._subclasses.functional_tensor import FunctionalTensor

    return torch.compiler.is_compiling() or isinstance(t, FunctionalTensor)


def _scaled(t, g, backend):
    """t * g computed in fp32 (fp64 for fp64 t) and rounded once to t's dtype: the Triton scale kernel (one read
    and one write of t), or on the torch backend slice by slice of SCALE_SLICE_ELEMENTS, so that the fp32
    temporaries of a 16-bit [V, H] d(weight) never add 8 V H bytes to the peak."""
    if backend == "triton" and not _traced(t):
        return scale(t, g)
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    g = g.to(acc)
    if t.dtype == acc or not t.is_contiguous() or t.numel() <= SCALE_SLICE_ELEMENTS:
        return (t.to(acc) * g).to(t.dtype)
    out = torch.empty_like(t)
    flat, flat_out = t.reshape(-1), out.view(-1)
    for a in range(0, flat.numel(), SCALE_SLICE_ELEMENTS):
        flat_out[a:a + SCALE_SLICE_ELEMENTS] = flat[a:a + SCALE_SLICE_ELEMENTS].to(acc) * g
    return out


def _fused_linear_ppo_loss_backward(ctx, g_loss, *_):
    if g_loss is None:
        return (None,) * 20
    grads = []
    dh, dw, db, *linked = ctx.saved_tensors
    for t, present in zip((dh, dw, db), ctx.present):
        if not present:
            grads.append(None)
            continue
        t = _scaled(t, g_loss.reshape(()).to(torch.float64 if t.dtype == torch.float64 else torch.float32),
                    ctx.backend)
        if torch.is_grad_enabled():   # the gradients were formed in the forward: a second derivative cannot be
            t = Once.apply("fused_linear_ppo_loss", t, g_loss, *(x for x in linked if x is not None))
        grads.append(t)
    return (*grads, *([None] * 17))


fused_linear_ppo_loss_op.register_autograd(_fused_linear_ppo_loss_backward, setup_context=_fused_linear_ppo_loss_setup)


# ----------------------------------------------------------------------------- public function
def fused_linear_ppo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, old_logprobs: torch.Tensor,
                          advantages: torch.Tensor, mask: torch.Tensor, *, bias: torch.Tensor | None = None,
                          ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0, kl_kind: str = "k3",
                          entropy_coef: float = 0.0, clip_low: float = 0.2, clip_high: float | None = None,
                          dual_clip: float | None = None, temperature: float | torch.Tensor = 1.0,
                          agg: str = "token-mean",
                          ignore_index: int = -100, return_entropy: bool = False, num_tokens: float | None = None,
                          num_seqs: float | None = None, horizon: float | None = None, policy_loss: str = "ppo",
                          ratio_max: float | None = None, sapo_tau_pos: float = 1.0, sapo_tau_neg: float = 1.05,
                          rollout_is_weights: torch.Tensor | None = None, entropy_quantile: float | None = None,
                          final_logit_softcapping: float | None = None, logit_scale: float = 1.0,
                          chunk_bytes: int | None = None, cu_seqlens: torch.Tensor | None = None,
                          dro_beta: float | None = None, cov_ratio: float = 0.0002, cov_lb: float = 1.0,
                          cov_ub: float = 5.0, kl_cov_coef: float = 0.1,
                          kl_bias_correction: bool = False, kl_bias_correction_level: str = "token",
                          off_policy_mask_threshold: float | None = None,
                          vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
                          vespo_lambda_neg: float = 2.0, entropy_agg: str | None = None,
                          off_policy_logprobs: torch.Tensor | None = None,
                          vocab_parallel: VocabParallel | None = None, kept: KeptSet | None = None,
                          logits_dtype: torch.dtype | None = None, fp32_head: bool = False,
                          grad_filter: bool | float | None = None, kept_path: str = "auto") -> PPOLossOutput:
    """fused_ppo_loss(z', ...) with z' = softcap(logit_scale * (hidden @ weight.T + bias)) / temperature,
    without materialising the logits.

    hidden [B, T, H] (or [T, H]), weight [V, H]; the other arguments (policy-loss variants included) and
    the result are those of fused_ppo_loss. Only tokens with mask != 0 and a label != ignore_index are
    projected; the returned per-token log-probs / entropy are 0 elsewhere, and NaN there cannot leak. On
    the Triton path, for token-level losses (`_token_local`), the gradients to hidden, weight and bias are
    formed in the forward pass, chunk by chunk (`chunk_bytes` bounds the [rows, V] buffers; None:
    automatic, 2 V H bytes at most, see fastppo.linear_pipeline.chunk_rows): 6 N_valid H V FLOPs for forward
    + backward, and backward only scales them by the upstream gradient (those gradients are held from forward
    to backward). Sequence-level variants (gspo, gspo_token, gmpo), the batch-global selections
    (entropy_quantile, clip_cov, kl_cov) recompute the logits in forward: 8 N_valid H V.
    cu_seqlens ([S + 1] offsets): packed sequences, hidden [total, H] (fused_ppo_loss's packed form).
    `vocab_parallel=fastppo.VocabParallel(group)`: the weight (and bias) passed are this rank's contiguous vocabulary
    shard, in rank order, of the process group (see VocabParallel and the README's vocabulary-parallel
    section); labels are global ids, the results those of the full vocabulary on every rank. (Not with cu_seqlens.)
    `temperature`: a positive float or a tensor of labels' shape (per token; no gradient). `kept`,
    `logits_dtype`, `fp32_head`: as in linear_logprobs (log-probs renormalised over each row's kept set, the
    entropy term full-vocabulary, the gradient still formed in forward; rounded logits; fp32 GEMMs); mask-0
    rows need no kept entry check (never read). `grad_filter`: as in linear_logprobs (the gradient GEMMs skip the
    vocabulary tiles a row's |onehot - p| leaves below the threshold; approximate, off by default). `kept_path`
    as in linear_logprobs: without entropy (no return_entropy, entropy_coef = 0, no entropy_quantile) the
    kept-only path forms the kept logits only (2 nnz H FLOPs, then 4 nnz H for the gradients, in forward on the
    token-local path). `entropy_agg="token-mean"`: the entropy term is its own token mean over this call's valid
    tokens (those entropy_quantile keeps), whatever `agg` (LossOptions.entropy_agg; TRL's entropy bonus); the
    gradient is still formed in forward. `off_policy_logprobs` (labels' shape; needs off_policy_mask_threshold):
    the behaviour log-probs the off-policy mask measures against instead of old_logprobs (TRL's
    sampling_per_token_logps from vLLM; as in ppo_policy_loss). (Not with vocab_parallel.)"""
    check_grad_filter(grad_filter, vocab_parallel, kept)
    opts = loss_options(policy_loss=policy_loss, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                        ratio_max=ratio_max, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg,
                        entropy_quantile=entropy_quantile, agg=agg, kl_kind=kl_kind, kl_coef=kl_coef,
                        entropy_coef=entropy_coef, num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon,
                        dro_beta=dro_beta, cov_ratio=cov_ratio, cov_lb=cov_lb, cov_ub=cov_ub, kl_cov_coef=kl_cov_coef,
                        kl_bias_correction=kl_bias_correction, kl_bias_correction_level=kl_bias_correction_level,
                        off_policy_mask_threshold=off_policy_mask_threshold,
                        vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
                        vespo_lambda_neg=vespo_lambda_neg, entropy_agg=entropy_agg)
    if vocab_parallel is not None:
        if off_policy_logprobs is not None:
            raise ValueError("off_policy_logprobs is not supported with vocab_parallel")
        return sharded_fused_linear_ppo_loss(
            hidden, weight, labels, old_logprobs, advantages, mask, vocab_parallel, loss_opts=opts, bias=bias,
            ref_logprobs=ref_logprobs, rollout_is_weights=rollout_is_weights, cu_seqlens=cu_seqlens,
            temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy,
            final_logit_softcapping=final_logit_softcapping, logit_scale=logit_scale, chunk_bytes=chunk_bytes,
            kept=kept, logits_dtype=logits_dtype, fp32_head=fp32_head, kept_path=kept_path)
    check_linear(hidden, weight, labels, bias, ignore_index)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [B, T, H] or [T, H], got shape {tuple(hidden.shape)}")
    if cu_seqlens is not None and hidden.dim() != 2:
        raise ValueError(f"with cu_seqlens, hidden must be packed [total, H], got shape {tuple(hidden.shape)}")
    check_fused_tensors(hidden.shape[:-1], old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights, opts,
                        cu_seqlens, off_policy_logprobs)
    want_ent = bool(return_entropy or entropy_coef != 0 or entropy_quantile is not None)
    backend = backend_for(hidden, weight, labels, old_logprobs, advantages, mask, cu_seqlens)
    tau = check_temperature_rows(temperature, labels.shape, hidden.device, "fused_linear_ppo_loss", labels,
                                 ignore_index, mask=mask)
    lin = build_linear_options(1.0 if tau is not None else temperature, ignore_index, want_ent, False,
                               final_logit_softcapping, logit_scale, chunk_bytes, backend, logits_dtype, fp32_head,
                               grad_filter_eps(grad_filter, hidden, weight, fp32_head), kept_path=kept_path)
    if kept is not None:
        check_kept(kept, labels, weight.shape[0], ignore_index, live=mask)
    grad_on = torch.is_grad_enabled()
    needs = tuple(bool(grad_on and t is not None and t.requires_grad) for t in (hidden, weight, bias))
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    loss, logp, kl, ent, stats, *_ = torch.ops.fastppo.fused_linear_ppo_loss(
        hidden, weight, bias, labels, old_logprobs.detach(), advantages.detach(), mask, detach(ref_logprobs),
        detach(rollout_is_weights), cu_seqlens, encode(opts), encode(lin), *needs, backend, tau,
        *((kept.ids, kept.offsets) if kept is not None else (None, None)), detach(off_policy_logprobs))
    return ppo_output(loss, logp, kl, ent, stats, opts, ref_logprobs is not None, want_ent)
