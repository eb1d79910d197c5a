"""The vocabulary-parallel linear ops with kept sets and per-token temperatures on 2 gloo processes (uneven
split): each rank restricts the kept set to its shard, the kept statistics combine like the full ones, and the
log-probs, entropy, loss and gradients (the full d(hidden), each rank's d(weight) / d(bias) slice) equal the
unsharded op's and the float64 reference's, on both backends, on the dense kept path and the kept-only one
(kept_path="gather"). All-reduces counted: forward 4 (kept + full statistics, with entropy) or 2, backward 1."""

from __future__ import annotations

import os

import pytest
import torch

from tests.ops.test_distributed import CountAllReduce, run_ranks

pytestmark = pytest.mark.slow   # multi-process end to end: `python -m pytest -q -m slow`


def _case(rank):
    import fastppo
    from fastppo import KeptSet
    from fastppo.reference_kept import kept_linear_logprobs

    g = torch.Generator().manual_seed(7)
    B, T, H, V = 2, 5, 16, 45
    split = [(0, 25), (25, V)]
    N = B * T
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.4
    bias = torch.randn(V, generator=g) * 0.3
    mask = torch.rand(N, V, generator=g) < 0.3
    mask[1] = False
    mask[1, 3:9] = True                       # kept only in shard 0
    mask[2] = False
    mask[2, 40] = True                        # one token, in shard 1
    mask[3] = True                            # the whole vocabulary
    labels = torch.multinomial(mask.float() + 1e-12, 1, generator=g)[:, 0]
    labels[0] = -100
    ks = KeptSet.from_mask(mask.view(B, T, V))
    y = labels.view(B, T)
    tau = torch.rand(B, T, generator=g) + 0.5
    g_lp, g_ent = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    lo, hi = split[rank]
    group = fastppo.VocabParallel(None)
    tol = dict(rtol=1e-5, atol=2e-5)

    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight[lo:hi], bias[lo:hi]))
    with CountAllReduce() as fwd:
        lp, ent = fastppo.linear_logprobs(h, w, y, bias=b, kept=ks, temperature=tau, return_entropy=True,
                                          vocab_parallel=group)
    with CountAllReduce() as bwd:
        (lp * g_lp + ent * g_ent).sum().backward()
    assert (fwd.calls, bwd.calls) == (4, 1), (fwd.calls, bwd.calls)
    h0, w0, b0 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    lp0, ent0 = fastppo.linear_logprobs(h0, w0, y, bias=b0, kept=ks, temperature=tau, return_entropy=True)
    (lp0 * g_lp + ent0 * g_ent).sum().backward()
    h6, w6, b6 = (t.double().clone().requires_grad_() for t in (hidden, weight, bias))
    rlp, rent = kept_linear_logprobs(h6, w6, y, ks, bias=b6, temperature=tau.double(), return_entropy=True)
    (rlp * g_lp.double() + rent * g_ent.double()).sum().backward()
    for got, unsharded, want in ((lp, lp0, rlp), (ent, ent0, rent), (h.grad, h0.grad, h6.grad),
                                 (w.grad, w0.grad[lo:hi], w6.grad[lo:hi]), (b.grad, b0.grad[lo:hi], b6.grad[lo:hi])):
        torch.testing.assert_close(got, unsharded, **tol)
        torch.testing.assert_close(got.double(), want, **tol)

    # without entropy: 2 all-reduces forward
    with CountAllReduce() as fwd:
        lp1 = fastppo.linear_logprobs(hidden, weight[lo:hi], y, kept=ks, vocab_parallel=group)
    assert fwd.calls == 2
    torch.testing.assert_close(lp1, fastppo.linear_logprobs(hidden, weight, y, kept=ks), **tol)

    # the kept-only path (kept_path="gather": each rank's kept logits over its shard's ids), log-probs and gradients
    h3, w3, b3 = (t.clone().requires_grad_() for t in (hidden, weight[lo:hi], bias[lo:hi]))
    lp3 = fastppo.linear_logprobs(h3, w3, y, bias=b3, kept=ks, temperature=tau, vocab_parallel=group,
                                  kept_path="gather")
    (lp3 * g_lp).sum().backward()
    h4, w4, b4 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    lp4 = fastppo.linear_logprobs(h4, w4, y, bias=b4, kept=ks, temperature=tau, kept_path="dense")
    (lp4 * g_lp).sum().backward()
    for got, exp in ((lp3, lp4), (h3.grad, h4.grad), (w3.grad, w4.grad[lo:hi]), (b3.grad, b4.grad[lo:hi])):
        torch.testing.assert_close(got, exp, **tol)

    # the fused linear loss, mask with holes, per-token temperature
    old = torch.randn(B, T, generator=g) * 0.3 - 3.0
    adv = torch.randn(B, T, generator=g)
    live = torch.rand(B, T, generator=g) > 0.25
    kw = dict(entropy_coef=0.02, temperature=tau, kept=ks, return_entropy=True)
    h1, w1, b1 = (t.clone().requires_grad_() for t in (hidden, weight[lo:hi], bias[lo:hi]))
    out = fastppo.fused_linear_ppo_loss(h1, w1, y, old, adv, live, bias=b1, vocab_parallel=group, **kw)
    out.loss.backward()
    h2, w2, b2 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    want = fastppo.fused_linear_ppo_loss(h2, w2, y, old, adv, live, bias=b2, **kw)
    want.loss.backward()
    for got, exp in ((out.loss, want.loss), (out.logprobs, want.logprobs), (out.entropy, want.entropy),
                     (h1.grad, h2.grad), (w1.grad, w2.grad[lo:hi]), (b1.grad, b2.grad[lo:hi])):
        torch.testing.assert_close(got, exp, **tol)

    # the fused loss on the kept-only path (no entropy term)
    kw = dict(temperature=tau, kept=ks, kl_coef=0.1, ref_logprobs=old + 0.1)
    h1, w1, b1 = (t.clone().requires_grad_() for t in (hidden, weight[lo:hi], bias[lo:hi]))
    out = fastppo.fused_linear_ppo_loss(h1, w1, y, old, adv, live, bias=b1, vocab_parallel=group,
                                        kept_path="gather", **kw)
    out.loss.backward()
    h2, w2, b2 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    want = fastppo.fused_linear_ppo_loss(h2, w2, y, old, adv, live, bias=b2, kept_path="dense", **kw)
    want.loss.backward()
    for got, exp in ((out.loss, want.loss), (out.logprobs, want.logprobs), (h1.grad, h2.grad),
                     (w1.grad, w2.grad[lo:hi]), (b1.grad, b2.grad[lo:hi])):
        torch.testing.assert_close(got, exp, **tol)


def _worker(rank, world):
    import fastppo

    for backend in ("triton", "torch"):
        with fastppo.use_backend(backend):
            _case(rank)


def test_sharded_linear_ops_with_kept_sets():
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.fail("the triton backend needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    run_ranks(_worker)
