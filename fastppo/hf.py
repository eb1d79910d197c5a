"""Hugging Face helpers: per-token log-probs of a causal LM without its [B, T, V] logits.

`causal_lm_logprobs` runs the model (through its root module, so DDP / FSDP2 hooks run, with the
lm_head on zero positions) to the final hidden states of its body and applies `linear_logprobs`
with `model.get_output_embeddings()` (tied or untied lm_head, with or without bias), so a trainer
never materialises the logits.

Heads that are not plain `lm_head(hidden)`: the head transform z' = softcap(scale * z) is read from the
config with TRL 1.16's rules (`trl/trainer/utils.py`, fused lm-head): scale = `logit_scale` (Cohere),
else `output_multiplier` (Muse), else `lm_head_multiplier` (Falcon-H1), else 1 / `logits_scaling`
(Granite; HyperCLOVA X multiplies by it instead); cap = `final_logit_softcapping` (Gemma 2/3, Nanochat).
Any other change of the head (a softcap under another name, a scale of the hidden states, a learned
scale) is caught by a one-time probe that compares the model's own logits on a few tokens with the
transform of `lm_head(hidden)` and refuses the model with a clear error.
"""

from __future__ import annotations

import inspect

import torch

from .linear import linear_logprobs

_PROBE_TOKENS = 8
_VERIFIED_ATTR = "_fastppo_head_verified"


def _text_config(model):
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return cfg


def head_transform(model) -> dict:
    """{"logit_scale": s, "final_logit_softcapping": c or None} of the model's head (TRL 1.16's rules):
    logits = softcap(s * lm_head(hidden)), softcap(x) = c tanh(x / c)."""
    cfg = _text_config(model)
    scale = None
    for attr in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(cfg, attr, None)
        if value is not None:
            scale = value
            break
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        scaling = cfg.logits_scaling
        scale = scaling if getattr(cfg, "model_type", None) == "hyperclovax" else 1.0 / scaling
    cap = getattr(cfg, "final_logit_softcapping", None)
    for name, v in (("logit scale", scale), ("final_logit_softcapping", cap)):
        if v is not None and not isinstance(v, (int, float)):
            raise ValueError(f"{type(model).__name__}: cannot read its {name} from the config ({v!r})")
    return {"logit_scale": 1.0 if scale is None else float(scale),
            "final_logit_softcapping": None if cap is None else float(cap)}


def _is_plain(transform: dict) -> bool:
    return transform["logit_scale"] == 1.0 and transform["final_logit_softcapping"] is None


def lm_head_of(model, *, allow_transform: bool = False):
    """(weight [V, H], bias [V] or None) of a causal LM's output projection. Unless `allow_transform`,
    a model whose logits are not plain `lm_head(hidden)` (see `head_transform`) is refused: the caller
    would compute the wrong log-probs with hidden @ weight.T + bias."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) with a weight")
    if not allow_transform:
        tf = head_transform(model)
        if not _is_plain(tf):
            raise ValueError(f"{type(model).__name__} transforms its logits (logit_scale={tf['logit_scale']}, "
                             f"final_logit_softcapping={tf['final_logit_softcapping']}); plain hidden @ "
                             "lm_head.weight.T + bias would give wrong log-probs. Use fastppo.hf.head_transform "
                             "and pass logit_scale / final_logit_softcapping to the op")
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


def causal_lm_hidden_and_head(model, input_ids, attention_mask=None, *, allow_transform=False, **model_kwargs):
    """(hidden [B, T, H], lm_head weight [V, H], bias or None), the head read AFTER the forward: under
    FSDP2 that is the all-gathered parameter that the root's backward reduce-scatters. A head that
    is still a sharded DTensor here (lm_head wrapped in its own fully_shard group, or the root with
    reshard_after_forward=True) is an error: its gradient would not be reduced. A head that transforms
    its logits (see `head_transform`) is refused unless `allow_transform` (the caller applies it)."""
    hidden = causal_lm_hidden(model, input_ids, attention_mask, **model_kwargs)
    weight, bias = lm_head_of(_unwrap(model), allow_transform=allow_transform)
    if type(weight).__name__ == "DTensor" or type(bias).__name__ == "DTensor":
        raise ValueError("the lm_head weight is a sharded DTensor after the forward: keep lm_head in the root "
                         "module's fully_shard group (fully_shard each layer, then the model) with the root's "
                         "default reshard_after_forward")
    return hidden, weight, bias


def apply_head_transform(z: torch.Tensor, transform: dict) -> torch.Tensor:
    """softcap(scale * z) in float32 (float64 for float64 z)."""
    z = z.double() if z.dtype == torch.float64 else z.float()
    z = z * transform["logit_scale"]
    cap = transform["final_logit_softcapping"]
    return z if cap is None else cap * torch.tanh(z / cap)


@torch.no_grad()
def verify_head(model, input_ids, attention_mask=None, transform=None, **model_kwargs) -> dict:
    """Check once per model that its logits are softcap(scale * lm_head(hidden)) on the first few tokens
    (one small forward in eval mode; the result is remembered on the model). Raises ValueError naming the
    model and the deviation otherwise. Returns the transform."""
    transform = head_transform(model) if transform is None else transform
    if getattr(model, _VERIFIED_ATTR, None) == transform:
        return transform
    if not model_kwargs:                     # a few tokens of the first sequence are enough
        input_ids = input_ids[:1, :_PROBE_TOKENS]
        attention_mask = None if attention_mask is None else attention_mask[:1, :_PROBE_TOKENS]
    was_training = model.training
    model.eval()
    try:
        hidden = causal_lm_hidden(model, input_ids, attention_mask, **model_kwargs)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs).logits
        weight, bias = lm_head_of(_unwrap(model), allow_transform=True)
        ours = apply_head_transform(torch.nn.functional.linear(hidden, weight.to(hidden.dtype),
                                                               None if bias is None else bias.to(hidden.dtype)),
                                    transform)
    finally:
        model.train(was_training)
    theirs = logits.to(ours.dtype)
    if ours.shape != theirs.shape:
        raise ValueError(f"{type(model).__name__}: its logits {tuple(theirs.shape)} are not lm_head(hidden) "
                         f"{tuple(ours.shape)}; the fused path cannot reproduce this head")
    eps = torch.finfo(logits.dtype).eps if logits.dtype.is_floating_point else 1e-6
    scale = 1.0 + float(theirs.abs().amax())
    dev = float((ours - theirs).abs().amax())
    if not dev <= 8 * eps * scale:
        raise ValueError(f"{type(model).__name__}: its logits are not softcap(scale * lm_head(hidden)) with "
                         f"{transform} (max deviation {dev:.3g} on the first {input_ids.shape[-1]} tokens); its "
                         "head changes the logits in a way fastppo does not know, so the fused path is refused")
    setattr(model, _VERIFIED_ATTR, transform)
    return transform


def causal_lm_logprobs(model, input_ids, attention_mask=None, labels=None, *, temperature=1.0,
                       ignore_index=-100, return_entropy=False, check_head=True, **model_kwargs):
    """log p(token t+1 | tokens <= t) for every position of `input_ids` [B, T], from the hidden states,
    with the model's own head transform (see `head_transform`): z' = softcap(scale * lm_head(h)) / temperature.

    labels: [B, T - 1] targets (default: input_ids[:, 1:], with positions whose target is padding,
    attention_mask[:, 1:] == 0, set to ignore_index). Returns [B, T - 1] float32 log-probs (and entropy
    with return_entropy), differentiable w.r.t. the model's parameters. `check_head` runs `verify_head`
    once per model (a small forward) so that an unknown head is refused rather than mis-scored."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [B, T] with T >= 2, got {tuple(input_ids.shape)}")
    if labels is None:
        labels = input_ids[:, 1:]
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask[:, 1:] == 0, ignore_index)
    transform = head_transform(_unwrap(model))
    if check_head:
        verify_head(model, input_ids, attention_mask, transform, **model_kwargs)
    hidden, weight, bias = causal_lm_hidden_and_head(model, input_ids, attention_mask, allow_transform=True,
                                                     **model_kwargs)
    return linear_logprobs(hidden[:, :-1], weight.to(hidden.dtype), labels, bias=bias, temperature=temperature,
                           ignore_index=ignore_index, return_entropy=return_entropy, **transform)


@torch.no_grad()
def reference_causal_lm_logprobs(model, input_ids, attention_mask=None, *, temperature=1.0):
    """The same through the model's full logits (for checking; materialises [B, T, V])."""
    from .reference import token_logprobs

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return token_logprobs(logits[:, :-1], input_ids[:, 1:], temperature=temperature)
