"""Hugging Face helpers: per-token log-probs of a causal LM without its [B, T, V] logits.

`causal_lm_logprobs` runs the model's body (`model.get_decoder()` or `model.base_model`) to the
final hidden states and applies `linear_logprobs` with `model.get_output_embeddings()` (tied or
untied lm_head, with or without bias), so a trainer never materialises the logits.
"""

from __future__ import annotations

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


def causal_lm_hidden(model, input_ids, attention_mask=None, **model_kwargs):
    """Final hidden states [B, T, H] of the model's body (no lm_head)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None:
        body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise ValueError(f"cannot find the body (decoder / base_model) of {type(model).__name__}")
    out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


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
    hidden = causal_lm_hidden(model, input_ids, attention_mask, **model_kwargs)
    weight, bias = lm_head_of(model)
    return linear_logprobs(hidden[:, :-1], weight.to(hidden.dtype), labels, bias=bias, temperature=temperature,
                           ignore_index=ignore_index, return_entropy=return_entropy)


@torch.no_grad()
def reference_causal_lm_logprobs(model, input_ids, attention_mask=None, *, temperature=1.0):
    """The same through the model's full logits (for checking; materialises [B, T, V])."""
    from .reference import token_logprobs

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return token_logprobs(logits[:, :-1], input_ids[:, 1:], temperature=temperature)
