"""Rollouts: sample responses, score them, and compute old / reference log-probs and values
without gradients. Every per-token quantity is aligned to the response tokens [B, R]."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hf import causal_lm_hidden_and_head
from ..linear import linear_logprobs
from ..linear_divergence import linear_divergence
from .kept_rows import KeptRows
from .packing import Layout


@dataclass
class Rollout:
    sequences: torch.Tensor        # [B, P + R] prompt + response (PAD after EOS)
    attention_mask: torch.Tensor   # [B, P + R]
    prompt_len: int
    response: torch.Tensor         # [B, R]
    labels: torch.Tensor           # [B, R] response tokens, ignore_index where masked
    mask: torch.Tensor             # [B, R] bool: response tokens up to and including EOS
    scores: torch.Tensor           # [B] reward
    old_logprobs: torch.Tensor     # [B, R]
    ref_logprobs: torch.Tensor     # [B, R]
    values: torch.Tensor | None    # [B, R]
    task_scores: torch.Tensor | None = None
    rollout_logprobs: torch.Tensor | None = None   # [B, R] the sampler's log-probs of the sampled tokens
    teacher_logprobs: torch.Tensor | None = None   # [B, R] distill: the teacher's log-probs of them
    teacher_kl: torch.Tensor | None = None         # [B, R] distill: KL(policy || teacher) per token (exact)
    kept: KeptRows | None = None                   # the sampler's kept set per response token (--kept_logprobs)

    def select(self, idx: torch.Tensor) -> Rollout:
        fields = {}
        for name, value in self.__dict__.items():
            if isinstance(value, KeptRows):
                fields[name] = value.select(idx)
            else:
                fields[name] = value[idx] if isinstance(value, torch.Tensor) and value.dim() >= 1 else value
        return Rollout(**fields)

    def kept_set(self, layout: Layout):
        """The policy's kept sets in `layout` (a fastppo.KeptSet for kept=), or None (full vocabulary)."""
        return None if self.kept is None else self.kept.kept_set(layout)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as generate() uses them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def response_hidden_and_head(model, rollout: Rollout):
    """Hidden states that predict the response tokens [B, R, H], and the lm_head (weight, bias) read after
    the forward (under FSDP2 the all-gathered parameters)."""
    P, R = rollout.prompt_len, rollout.response.shape[1]
    hidden, weight, bias = causal_lm_hidden_and_head(model, rollout.sequences, rollout.attention_mask,
                                                     position_ids=position_ids(rollout.attention_mask))
    return hidden[:, P - 1:P + R - 1], weight, bias


def response_logprobs(model, rollout: Rollout, temperature: float, kept: bool = False) -> torch.Tensor:
    """log p(response token) [B, R] (0 where masked); `kept`: renormalised over the sampler's kept set of each
    token (rollout.kept, padded rows), the sampler's own log-probs; else over the whole vocabulary."""
    hidden, weight, bias = response_hidden_and_head(model, rollout)
    kept_set = rollout.kept_set(Layout.of(rollout.mask, packed=False)) if kept else None
    return linear_logprobs(hidden, weight.to(hidden.dtype), rollout.labels, bias=bias, temperature=temperature,
                           kept=kept_set)


def teacher_terms(policy, teacher, rollout: Rollout, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the teacher's log-probs of the response tokens [B, R], KL(policy || teacher) per response token [B, R],
    exact over the vocabulary: fastppo.linear_divergence with beta = 1; 0 where masked)."""
    h_s, w_s, b_s = response_hidden_and_head(policy, rollout)
    h_t, w_t, b_t = response_hidden_and_head(teacher, rollout)
    logp_t = linear_logprobs(h_t, w_t.to(h_t.dtype), rollout.labels, bias=b_t, temperature=temperature)
    B, R = rollout.mask.shape
    kl = linear_divergence(h_s.reshape(B * R, -1), w_s.to(h_s.dtype), h_t.reshape(B * R, -1), w_t.to(h_t.dtype),
                           beta=1.0, temperature=temperature, student_bias=b_s, teacher_bias=b_t,
                           mask=rollout.mask.reshape(-1))
    return logp_t.float(), kl.reshape(B, R).float()


def response_values(critic, rollout: Rollout) -> torch.Tensor:
    P, R = rollout.prompt_len, rollout.response.shape[1]
    out = critic(input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
                 position_ids=position_ids(rollout.attention_mask))
    return out.logits[:, P - 1:P + R - 1, 0].float()


@torch.no_grad()
def generate(policy, prompt_ids, prompt_mask, *, max_new_tokens, temperature, eos_id, pad_id, seed: int,
             rows: torch.Tensor | None = None, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             record_kept: bool = False, **generate_kwargs):
    """Sample from softmax(z / temperature), restricted to the min-p / top-k / top-p kept set when those are set
    (see parallel.CounterSampler), row i keyed by (seed, rows[i]) (default rows 0..B-1: the responses do not
    depend on how the batch is split). Returns (sequences, attention_mask, response, mask, labels,
    sampler_logprobs, kept): sampler_logprobs [B, R] are the sampler's log-probs of the sampled tokens
    (generate's output_logits, the raw logits of each step, through the sampler's own processing, log_softmax
    at the chosen token; 0 where masked), what an inference engine reports as the rollout log-probs; kept
    (with `record_kept` and a filter on, else None) the sampler's kept set of every response token
    (kept_rows.KeptRows; each step's [B, V] mask is compressed as soon as it is formed)."""
    from transformers import LogitsProcessorList

    from .parallel import CounterSampler

    if rows is None:
        rows = torch.arange(prompt_ids.shape[0])
    sampler = CounterSampler(seed, rows, prompt_ids.shape[1], temperature, top_k, top_p, min_p)
    out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=False,
                          logits_processor=LogitsProcessorList([sampler]), max_new_tokens=max_new_tokens,
                          eos_token_id=eos_id, pad_token_id=pad_id, return_dict_in_generate=True,
                          output_logits=True, **generate_kwargs)
    P = prompt_ids.shape[1]
    response = out.sequences[:, P:]
    steps = response.shape[1]
    sampled = torch.zeros(response.shape, dtype=torch.float32, device=response.device)
    step_kept = []
    for t, logits in enumerate(out.logits[:steps]):
        kept = sampler.kept(logits)
        logp = torch.log_softmax(sampler.processed(logits, kept), -1)
        sampled[:, t] = logp.gather(1, response[:, t:t + 1].to(logp.device)).squeeze(1).float()
        if record_kept and kept is not None:
            step_kept.append(KeptRows.step(kept))
    if steps < max_new_tokens:
        pad = torch.full((response.shape[0], max_new_tokens - steps), pad_id, dtype=response.dtype,
                         device=response.device)
        response = torch.cat([response, pad], 1)
        sampled = torch.cat([sampled, torch.zeros(pad.shape, dtype=sampled.dtype, device=sampled.device)], 1)
    is_eos = response == eos_id
    # response tokens up to and including the first EOS
    before_eos = (is_eos.long().cumsum(1) - is_eos.long()) == 0
    mask = before_eos
    sequences = torch.cat([prompt_ids, torch.where(mask, response, torch.full_like(response, pad_id))], 1)
    attention_mask = torch.cat([prompt_mask, mask.long()], 1)
    labels = torch.where(mask, response, torch.full_like(response, -100))
    kept_rows = KeptRows.of_steps(step_kept, mask, out.logits[0].shape[-1]) if record_kept and sampler.filters \
        else None
    return (sequences, attention_mask, response, mask, labels, torch.where(mask, sampled, torch.zeros_like(sampled)),
            kept_rows)
