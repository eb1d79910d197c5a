"""Hugging Face helpers: per-token log-probs of a causal LM without its [B, T, V] logits.

`causal_lm_logprobs` runs the model (through its root module, so DDP / FSDP2 hooks run, with the
lm_head on zero positions) to the final hidden states of its body and applies `linear_logprobs`
with `model.get_output_embeddings()` (tied or untied lm_head, with or without bias), so a trainer
never materialises the logits.
"""

from __future__ import annotations

import inspect

import torch

from .linear import linear_logprobs


def lm_head_of(model):
    """(weight [V, H], bias [V] or None) of a causal LM's output projection."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) with a weight")
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):
        value = getattr(cfg, attr, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"{type(model).__name__} applies {attr}={value} to its logits; the fused path "
                             "computes plain hidden @ lm_head.weight.T + bias")
    return head.weight, getattr(head, "bias", None)


def _unwrap(model):
    """The HF model inside a DistributedDataParallel wrapper (FSDP2 keeps the model's own class)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _body_of(model):
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None:
        body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise ValueError(f"cannot find the body (decoder / base_model) of {type(model).__name__}")
    return body


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def causal_lm_hidden(model, input_ids, attention_mask=None, **model_kwargs):
    """Final hidden states [B, T, H] of the model's body (no [B, T, V] logits).

    The call goes through the ROOT module (`model(...)`, also a DistributedDataParallel or FSDP2
    `fully_shard` wrapper), so the wrappers' forward hooks run: FSDP2 all-gathers the root's
    parameters (embedding, final norm, lm_head) and hooks the outputs for its backward. The lm_head
    runs on zero positions (`logits_to_keep` = an empty index tensor); a forward hook on the body
    captures its last hidden state, and a forward hook on the root returns it as one of the root's
    outputs, so FSDP2's pre-backward hook sees it. Models whose forward takes no `logits_to_keep`
    get the body called directly (not FSDP2-safe)."""
    inner = _unwrap(model)
    body = _body_of(inner)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
    if not _accepts(inner.forward, "logits_to_keep"):
        out = body(**kwargs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    captured = []

    def grab(_module, _args, out):
        captured.append(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])

    def expose(_module, _args, out):       # runs before FSDP2's post-forward hook (prepend)
        return out, captured[-1]

    no_positions = torch.zeros(0, dtype=torch.long, device=input_ids.device)
    handles = [body.register_forward_hook(grab), model.register_forward_hook(expose, prepend=True)]
    try:
        _, hidden = model(**kwargs, logits_to_keep=no_positions)
    finally:
        for h in handles:
            h.remove()
    return hidden


def causal_lm_hidden_and_head(model, input_ids, attention_mask=None, **model_kwargs):
    """(hidden [B, T, H], lm_head weight [V, H], bias or None), the head read AFTER the forward: under
    FSDP2 that is the all-gathered parameter that the root's backward reduce-scatters. A head that
    is still a sharded DTensor here (lm_head wrapped in its own fully_shard group, or the root with
    reshard_after_forward=True) is an error: its gradient would not be reduced."""
    hidden = causal_lm_hidden(model, input_ids, attention_mask, **model_kwargs)
    weight, bias = lm_head_of(_unwrap(model))
    if type(weight).__name__ == "DTensor" or type(bias).__name__ == "DTensor":
        raise ValueError("the lm_head weight is a sharded DTensor after the forward: keep lm_head in the root "
                         "module's fully_shard group (fully_shard each layer, then the model) with the root's "
                         "default reshard_after_forward")
    return hidden, weight, bias


def causal_lm_logprobs(model, input_ids, attention_mask=None, labels=None, *, temperature=1.0,
                       ignore_index=-100, return_entropy=False, **model_kwargs):
    """log p(token t+1 | tokens <= t) for every position of `input_ids` [B, T], from the hidden states.

    labels: [B, T - 1] targets (default: input_ids[:, 1:], with positions whose target is padding,
    attention_mask[:, 1:] == 0, set to ignore_index). Returns [B, T - 1] float32 log-probs (and entropy
    with return_entropy), differentiable w.r.t. the model's parameters."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [B, T] with T >= 2, got {tuple(input_ids.shape)}")
    if labels is None:
        labels = input_ids[:, 1:]
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask[:, 1:] == 0, ignore_index)
    hidden, weight, bias = causal_lm_hidden_and_head(model, input_ids, attention_mask, **model_kwargs)
    return linear_logprobs(hidden[:, :-1], weight.to(hidden.dtype), labels, bias=bias, temperature=temperature,
                           ignore_index=ignore_index, return_entropy=return_entropy)


@torch.no_grad()
def reference_causal_lm_logprobs(model, input_ids, attention_mask=None, *, temperature=1.0):
    """The same through the model's full logits (for checking; materialises [B, T, V])."""
    from .reference import token_logprobs

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return token_logprobs(logits[:, :-1], input_ids[:, 1:], temperature=temperature)
