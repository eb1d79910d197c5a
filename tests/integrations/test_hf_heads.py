"""causal_lm_logprobs on models whose head is not plain lm_head(hidden): Granite's logits_scaling,
Gemma 2's final_logit_softcapping, Cohere's logit_scale are applied; an unknown head change is refused."""

import pytest
import torch
import transformers

import fastppo
from fastppo import hf
from tests.helpers import DEVICE

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def _model(kind):
    torch.manual_seed(0)
    if kind == "granite":
        return transformers.GraniteForCausalLM(transformers.GraniteConfig(logits_scaling=4.0, **COMMON))
    if kind == "gemma2":
        cfg = transformers.Gemma2Config(final_logit_softcapping=0.7, head_dim=8, **COMMON)
        return transformers.Gemma2ForCausalLM(cfg)
    if kind == "cohere":
        return transformers.CohereForCausalLM(transformers.CohereConfig(logit_scale=0.3, **COMMON))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))


def _model_logprobs(model, ids, temperature):
    """float64 log-probs from the model's own logits (what the head really computes)."""
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].double() / temperature
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]


@pytest.mark.parametrize("kind,transform", [
    ("granite", {"logit_scale": 0.25, "final_logit_softcapping": None}),
    ("gemma2", {"logit_scale": 1.0, "final_logit_softcapping": 0.7}),
    ("cohere", {"logit_scale": 0.3, "final_logit_softcapping": None}),
])
def test_transformed_heads_match_the_models_logits(kind, transform):
    model = _model(kind).to(DEVICE).eval()
    assert hf.head_transform(model) == transform
    ids = torch.randint(0, 97, (2, 7), device=DEVICE)
    lp = hf.causal_lm_logprobs(model, ids, temperature=0.9)
    want = _model_logprobs(model, ids, 0.9)
    torch.testing.assert_close(lp.double(), want, rtol=1e-5, atol=1e-5)
    lp.sum().backward()
    assert model.get_output_embeddings().weight.grad is not None
    with pytest.raises(ValueError, match="transforms its logits"):
        hf.lm_head_of(model)                     # the plain-head accessor refuses it (the trainer's path)


def test_plain_llama_head_is_accepted():
    model = _model("llama").to(DEVICE).eval()
    assert hf.head_transform(model) == {"logit_scale": 1.0, "final_logit_softcapping": None}
    ids = torch.randint(0, 97, (1, 6), device=DEVICE)
    torch.testing.assert_close(hf.causal_lm_logprobs(model, ids).double(), _model_logprobs(model, ids, 1.0),
                               rtol=1e-5, atol=1e-5)


def test_unknown_head_change_is_refused():
    model = _model("llama").to(DEVICE).eval()
    model.get_output_embeddings().register_forward_hook(lambda mod, inp, out: out * 1.5)
    with pytest.raises(ValueError, match="not softcap"):
        hf.causal_lm_logprobs(model, torch.randint(0, 97, (1, 6), device=DEVICE))


def test_probe_restores_training_mode_and_runs_once():
    model = _model("granite").to(DEVICE).train()
    ids = torch.randint(0, 97, (1, 5), device=DEVICE)
    calls = []
    model.get_decoder().register_forward_hook(lambda *a: calls.append(1))
    hf.causal_lm_logprobs(model, ids)
    assert model.training
    first = len(calls)
    calls.clear()
    hf.causal_lm_logprobs(model, ids)
    assert first > len(calls) == 1               # the probe's forwards ran once: later calls run the body once


def test_op_level_transform_equals_materialised_head():
    """token_logprobs(lm_head(h), logit_scale=1/logits_scaling) == log_softmax of Granite's own logits."""
    model = _model("granite").to(DEVICE).eval()
    ids = torch.randint(0, 97, (1, 6), device=DEVICE)
    with torch.no_grad():
        hidden = hf.causal_lm_hidden(model, ids)
        raw = model.lm_head(hidden)
    lp = fastppo.token_logprobs(raw[:, :-1], ids[:, 1:], **hf.head_transform(model))
    torch.testing.assert_close(lp.double(), _model_logprobs(model, ids, 1.0), rtol=1e-5, atol=1e-5)
