"""The grad_filter experiment of issue #27 item 2: on realistic next-token distributions, the share of the
backward GEMMs' tile products that the filter skips, and the error it makes in d hidden / d weight against
float64, beside the bf16 rounding of the unfiltered gradient.

Distributions (rows = contexts, [N, V] logits from a [V, H] head):
- `trained`: a small head trained (Adam, full batch) towards per-context targets q_c = u Zipf(1.1) unigram over
  a frequency-sorted vocabulary (as BPE ids roughly are) + (1 - u) over 8 context favourites (drawn from the
  unigram, weights 1/2, 1/4, ... renormalised; u = --unigram, 0.2); labels sampled from q_c.
- `trained-shuffled`: the same with the vocabulary ids permuted (frequency no longer follows the id).
- `flat`: random init (hidden N(0, 1), weight N(0, 0.02^2)): p ~ 1 / V everywhere.
Skipped share: (row tile of LIN_BLOCK_N valid rows, vocabulary tile of LIN_BLOCK_V columns) pairs no row keeps,
exactly what the Triton GEMMs skip (tests/ops/test_linear_grad_filter.py counts it). Errors: max |g - g64| /
max |g64| with g64 the unfiltered float64 gradient of sum_i c_i logp_i (c_i ~ N(0, 1), advantage-like).

    python -m bench.grad_filter [--vocab 32768] [--rows 256] [--hidden 128] [--eps 0.000244140625] [--steps 100]
                                [--unigram 0.2] [--cases trained,trained-shuffled,flat]
"""

from __future__ import annotations

import argparse
import math

import torch

import fastppo
from fastppo.kernels import _config as cfg


def zipf_targets(V, C, seed, u):
    g = torch.Generator().manual_seed(seed)
    uni = 1.0 / torch.arange(1, V + 1, dtype=torch.float64) ** 1.1
    uni /= uni.sum()
    fav = torch.multinomial(uni, C * 8, replacement=True, generator=g).view(C, 8)
    q = u * uni.expand(C, V).clone()
    w = 0.5 ** torch.arange(8, dtype=torch.float64)
    q.scatter_add_(1, fav, ((1 - u) * w / w.sum()).expand(C, 8).contiguous())
    return q


def trained_head(V, H, C, seed, steps, u):
    g = torch.Generator().manual_seed(seed)
    q = zipf_targets(V, C, seed, u)
    hidden = torch.randn(C, H, generator=g)
    hidden[:, 0] = 1.0                                  # a constant feature (the bias direction)
    weight = (0.02 * torch.randn(V, H, generator=g)).requires_grad_()
    opt = torch.optim.Adam([weight], lr=0.05)
    qf = q.float()
    for _ in range(steps):
        opt.zero_grad()
        loss = -(qf * torch.log_softmax(hidden @ weight.t(), -1)).sum(-1).mean()
        loss.backward()
        opt.step()
    labels = torch.multinomial(q, 1, generator=g)[:, 0]
    return hidden, weight.detach(), labels


def flat_head(V, H, C, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(C, H, generator=g), 0.02 * torch.randn(V, H, generator=g), torch.randint(0, V, (C,), generator=g)


def grads64(hidden, weight, labels, c, eps):
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    with fastppo.use_backend("torch"):
        lp = fastppo.linear_logprobs(h, w, labels, grad_filter=eps)
    (lp * c).sum().backward()
    return h.grad, w.grad


def skipped_share(hidden, weight, labels, eps):
    z = hidden.double() @ weight.double().t()
    p = torch.softmax(z, -1)
    from fastppo.linear_torch import filter_keep

    keep = filter_keep(p, labels, eps)[:, ::cfg.LIN_BLOCK_V]        # [rows, tiles]
    pad = -keep.shape[0] % cfg.LIN_BLOCK_N
    tiles = torch.cat([keep, keep.new_zeros(pad, keep.shape[1])]).view(-1, cfg.LIN_BLOCK_N, keep.shape[1]).any(1)
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    top = p.max(-1)[0].mean().item()
    return 1 - tiles.double().mean().item(), 1 - keep.double().mean().item(), ent.mean().item(), top


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--eps", type=float, default=2.0**-12)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--unigram", type=float, default=0.2)
    ap.add_argument("--cases", default="trained,trained-shuffled,flat")
    args = ap.parse_args(argv)
    V, H, C, eps = args.vocab, args.hidden, args.rows, args.eps
    names = args.cases.split(",")
    cases = {}
    if "trained" in names or "trained-shuffled" in names:
        h_t, w_t, y_t = trained_head(V, H, C, 0, args.steps, args.unigram)
        perm = torch.randperm(V, generator=torch.Generator().manual_seed(1))
        cases = {"trained": (h_t, w_t, y_t), "trained-shuffled": (h_t, w_t[perm], torch.argsort(perm)[y_t])}
    cases["flat"] = flat_head(V, H, C, 2)
    cases = {k: v for k, v in cases.items() if k in names}
    c = torch.randn(C, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    print(f"V={V} H={H} rows={C} eps={eps:.3g} tiles {cfg.LIN_BLOCK_N}x{cfg.LIN_BLOCK_V}")
    print("case | mean H (nats) | mean max p | GEMM tiles skipped | row-tile entries dropped | "
          "d hidden err | d weight err | bf16 rounding dh / dw")
    for name, (h, w, y) in cases.items():
        share, per_row, ent, top = skipped_share(h, w, y, eps)
        dh, dw = grads64(h, w, y, c, None)
        fdh, fdw = grads64(h, w, y, c, eps)
        r_dh, r_dw = rel(dh.bfloat16().double(), dh), rel(dw.bfloat16().double(), dw)
        print(f"{name} | {ent:.2f} | {top:.3f} | {share:.1%} | {per_row:.1%} | {rel(fdh, dh):.2e} | "
              f"{rel(fdw, dw):.2e} | {r_dh:.2e} / {r_dw:.2e}")
    print(f"(bf16 unit roundoff 2^-9 = {2.0**-9:.2e}; log2 eps = {math.log2(eps):.1f})")


if __name__ == "__main__":
    main()
