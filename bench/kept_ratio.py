"""The top-p experiment of issue #23: how far the trainer's ratio exp(train_logp - rollout_logp) is from 1 when
the rollout engine samples from the kept set (top-p) and reports kept-set-renormalised log-probs, with the
trainer's log-prob (a) over the full vocabulary, (b) over the same kept set (fastppo's kept-set launcher).

A random tiny LlamaForCausalLM (as fastppo/trainer/demo.py builds one) samples `--new` tokens per prompt,
one step at a time, from vLLM V1's kept set (KeptSet.from_filters semantics: temperature, top-p); the rollout
log-prob is the kept-set one, computed by the rollout model in `--rollout-dtype` (bf16 mimics an engine that
runs the model in bf16). The trainer recomputes the sequence in fp32 in one forward pass.
`--head-scale` multiplies the LM head's weights: a random model's next-token distribution is nearly flat,
a larger scale makes it peaked like a trained model's.

    python -m bench.kept_ratio [--top-p 0.8] [--rollout-dtype bf16] [--head-scale 8]
"""

from __future__ import annotations

import argparse
import copy

import torch


def build_policy(vocab: int, seed: int, head_scale: float):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model


@torch.no_grad()
def rollout(model, prompts, new_tokens: int, *, top_p: float, temperature: float, generator):
    """Sample token by token from the kept set; returns (sequences, kept masks [B, new, V], rollout logp)."""
    from fastppo.kept_filters import kept_mask_from_filters

    seqs, masks, logps = prompts, [], []
    for _ in range(new_tokens):
        logits = model(seqs).logits[:, -1].float()
        kept = kept_mask_from_filters(logits, temperature=temperature, top_p=top_p)
        z = (logits / temperature).masked_fill(~kept, float("-inf"))
        logp_k = torch.log_softmax(z, -1)                          # what the engine reports (processed_logprobs)
        tok = torch.multinomial(logp_k.exp(), 1, generator=generator)
        seqs = torch.cat([seqs, tok], 1)
        masks.append(kept)
        logps.append(logp_k.gather(1, tok).squeeze(1))
    return seqs, torch.stack(masks, 1), torch.stack(logps, 1)


def trainer_logprobs(model, seqs, masks, prompt_len: int, temperature: float):
    """(full-vocabulary logp, kept-set logp) of the sampled tokens, fp32, one forward pass."""
    from fastppo import KeptSet

    if seqs.is_cuda:
        from fastppo.kernels.kept import kept_logprobs_fwd
    else:
        from fastppo.kept_torch import kept_logprobs_fwd
    with torch.no_grad():
        logits = model(seqs).logits[:, prompt_len - 1:-1].float()
    labels = seqs[:, prompt_len:]
    full = torch.log_softmax(logits / temperature, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ks = KeptSet.from_mask(masks)
    kept = kept_logprobs_fwd(logits, labels, ks.ids, ks.offsets, temperature=temperature).logp.view_as(labels)
    return full, kept


def summary(train, rollout_logp, band: float = 0.1):
    ratio = torch.exp(train.double() - rollout_logp.double())
    outside = ((ratio < 1 - band) | (ratio > 1 + band)).double().mean()
    return float(ratio.mean()), float(outside)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=4)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--top-p", type=float, default=0.8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--rollout-dtype", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--head-scale", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    model = build_policy(args.vocab, args.seed, args.head_scale).to(args.device)
    engine = copy.deepcopy(model).to(torch.bfloat16 if args.rollout_dtype == "bf16" else torch.float32)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    prompts = torch.randint(3, args.vocab, (args.batch, args.prompt), generator=g, device=args.device)
    seqs, masks, rollout_logp = rollout(engine, prompts, args.new, top_p=args.top_p,
                                        temperature=args.temperature, generator=g)
    full, kept = trainer_logprobs(model, seqs, masks, args.prompt, args.temperature)
    kept_size = masks.sum(-1).double()
    print(f"tokens {rollout_logp.numel()}  vocab {args.vocab}  top_p {args.top_p}  rollout {args.rollout_dtype}  "
          f"head_scale {args.head_scale}  mean kept-set size {float(kept_size.mean()):.1f}  "
          f"mean kept mass {float(torch.exp(full - kept).mean()):.3f}")
    for name, train in (("full vocabulary", full), ("kept set", kept)):
        mean, outside = summary(train, rollout_logp)
        print(f"train logp over {name:16s} mean ratio {mean:.4f}   outside [0.9, 1.1] {100 * outside:.1f} %")


if __name__ == "__main__":
    main()
