"""Vocabulary-parallel ops with kept sets and per-token temperatures (token_logprobs / fused_ppo_loss with
kept= and temperature=tensor, vocab_parallel=) on 2 gloo processes (harness of tests/ops/test_distributed.py:
they time out and are killed on their own), even and uneven shards, both backends: values and gradients
(upstream not all ones) against the float64 reference of the documented formula and the unsharded op; kept
rows that sit in one shard only, straddle the shard edge, or are empty (ignored label); ignored labels; NaN in
masked rows; the collectives counted."""

from __future__ import annotations

import os

import pytest
import torch

from tests.ops.test_distributed import CountAllReduce, _split, _tol, assert_no_worse, assert_same_outputs, run_ranks

pytestmark = pytest.mark.slow   # multi-process end to end: `python -m pytest -q -m slow`


def _kept_case(V, split, lead, gen):
    """Logits [*lead, V], a KeptSet (top-p 0.8 of the logits, with rows kept on one shard only, a row straddling
    the shard edge, an empty row) and labels drawn from each row's kept set (some ignored)."""
    from fastppo import KeptSet
    from fastppo.kept_filters import kept_mask_from_filters

    full = torch.randn(*lead, V, generator=gen) * 3
    mask = kept_mask_from_filters(full, top_p=0.8).reshape(-1, V)
    edge = split[1][0]
    mask[0] = False
    mask[0, edge:edge + 5] = True                 # kept on rank 1's shard only
    mask[1] = False
    mask[1, :4] = True                            # kept on rank 0's shard only
    mask[2] = False
    mask[2, edge - 2:edge + 2] = True             # straddles the edge, both edge columns kept
    mask[3] = False                               # empty: its label is ignored
    y = torch.multinomial(mask.float() + (~mask.any(-1, keepdim=True)).float(), 1, generator=gen).squeeze(1)
    y[2] = edge - 1
    y[3] = -100
    y[torch.rand(y.shape, generator=gen) < 0.15] = -100
    return full, y.view(lead), KeptSet.from_mask(mask)


def _logprobs_case(rank, dtype, even, with_ent):
    import fastppo
    from fastppo import distributed as D
    from fastppo.reference_kept import kept_token_logprobs

    gen = torch.Generator().manual_seed(17)
    B, T, V = 3, 5, 41
    split = _split(V, even)
    full, y, ks = _kept_case(V, split, (B, T), gen)
    full = full.to(dtype)
    tau = torch.rand(B, T, generator=gen) + 0.5
    tf = dict(logit_scale=0.9, final_logit_softcapping=12.0)
    g_lp, g_ent = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    lo, hi = split[rank]
    shard = full.detach().clone().requires_grad_()           # a strided view of it is this rank's shard
    with CountAllReduce() as fwd:
        out = D.token_logprobs(shard[..., lo:hi], y, kept=ks, temperature=tau, return_entropy=with_ent, **tf)
    lp, ent = out if with_ent else (out, None)
    with CountAllReduce() as bwd:
        (lp * g_lp + (ent * g_ent if with_ent else 0)).sum().backward()
    N = B * T
    acc_bytes = 8 if dtype == torch.float64 else 4
    # kept (M_K, S_K, logp, owned): 2 all-reduces of 4 N values; the full entropy's 2 more of 5 N
    want_calls, want_bytes = (4, 9 * N * acc_bytes) if with_ent else (2, 4 * N * acc_bytes)
    assert (fwd.calls, fwd.bytes, bwd.calls) == (want_calls, want_bytes, 0), (fwd.calls, fwd.bytes, bwd.calls)

    x64 = full.detach().double().requires_grad_()
    rlp, rent = kept_token_logprobs(x64, y, ks, temperature=tau.double(), return_entropy=True,
                                    logit_scale=0.9, final_logit_softcapping=12.0)
    (rlp * g_lp.double() + (rent * g_ent.double() if with_ent else 0)).sum().backward()
    x = full.detach().clone().requires_grad_()
    uout = fastppo.token_logprobs(x, y, kept=ks, temperature=tau, return_entropy=with_ent, **tf)
    ulp, uent = uout if with_ent else (uout, None)
    (ulp * g_lp + (uent * g_ent if with_ent else 0)).sum().backward()
    tol = _tol(dtype)
    assert_no_worse(lp, ulp, rlp, tol)
    if with_ent:
        assert_no_worse(ent, uent, rent, tol)
    grad = shard.grad
    assert_no_worse(grad[..., lo:hi], x.grad[..., lo:hi], x64.grad[..., lo:hi], tol)
    assert (grad[..., :lo] == 0).all() and (grad[..., hi:] == 0).all()
    assert (lp[y == -100] == 0).all() and (grad[y == -100] == 0).all()
    if not with_ent:                                  # the gradient reaches the kept columns only
        outside = ~ks.to_mask(V).view(B, T, V)[..., lo:hi]
        assert (grad[..., lo:hi][outside] == 0).all()


def _fused_case(rank, dtype, even, per_token_tau):
    import fastppo
    from fastppo import distributed as D
    from fastppo.reference_kept import kept_fused_ppo_loss

    gen = torch.Generator().manual_seed(23)
    B, T, V = 4, 6, 37
    split = _split(V, even)
    full, y, ks = _kept_case(V, split, (B, T), gen)
    full = full.to(dtype)
    old = torch.randn(B, T, generator=gen) * 0.3 - 1.5
    ref_lp = old + torch.randn(B, T, generator=gen) * 0.1
    adv = torch.randn(B, T, generator=gen)
    mask = (torch.rand(B, T, generator=gen) > 0.2) & (y != -100)
    mask[1] = False                                            # an empty sequence
    full[1, 2] = float("nan")                                  # NaN in a masked row: never read
    y[1, 3] = 5 if 5 not in ks.ids[ks.offsets[9]:ks.offsets[10]].tolist() else 6   # masked: not checked
    tau = torch.rand(B, T, generator=gen) + 0.5 if per_token_tau else 0.9
    kw = dict(ref_logprobs=ref_lp, kl_coef=0.1, entropy_coef=0.01, agg="seq-mean-token-mean", num_tokens=50.0,
              num_seqs=6.0, clip_high=0.28, final_logit_softcapping=10.0)
    lo, hi = split[rank]
    shard = full[..., lo:hi].detach().clone().requires_grad_()
    with CountAllReduce() as fwd:
        out = D.fused_ppo_loss(shard, y, old, adv, mask, kept=ks, temperature=tau, return_entropy=True, **kw)
    with CountAllReduce() as bwd:
        (out.loss * 1.7).backward()
    assert (fwd.calls, bwd.calls) == (4, 0), (fwd.calls, bwd.calls)
    x64 = full.detach().double().clone().requires_grad_()
    t64 = tau.double() if per_token_tau else tau
    want = kept_fused_ppo_loss(x64, y, ks, old.double(), adv.double(), mask, temperature=t64, return_entropy=True,
                               **kw)
    (want.loss * 1.7).backward()
    x = full.detach().clone().requires_grad_()
    unsharded = fastppo.fused_ppo_loss(x, y, old, adv, mask, kept=ks, temperature=tau, return_entropy=True, **kw)
    (unsharded.loss * 1.7).backward()
    tol = _tol(dtype)
    torch.testing.assert_close(out.loss.double(), want.loss, **tol)
    ok = ~want.logprobs.isnan()
    torch.testing.assert_close(out.logprobs.double()[ok], want.logprobs[ok], **tol)
    torch.testing.assert_close(out.entropy.double(), want.entropy, **tol)
    torch.testing.assert_close(shard.grad.double(), x64.grad[..., lo:hi], **tol)
    torch.testing.assert_close(shard.grad, x.grad[..., lo:hi], **tol)
    assert_same_outputs(out, unsharded, tol)
    assert torch.isfinite(shard.grad).all() and (shard.grad[~mask] == 0).all()


def _plain_tau_case(rank, even):
    """A per-token temperature without kept sets: token_logprobs and fused_ppo_loss, sharded == float64."""
    from fastppo import distributed as D
    from fastppo import reference as ref

    gen = torch.Generator().manual_seed(29)
    B, T, V = 2, 5, 43
    split = _split(V, even)
    full = torch.randn(B, T, V, generator=gen) * 2
    y = torch.randint(0, V, (B, T), generator=gen)
    y[0, 1] = -100
    tau = torch.rand(B, T, generator=gen) + 0.5
    tau[0, 1] = 0.0                                                 # an ignored position: never read
    g_lp, g_ent = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    lo, hi = split[rank]
    shard = full[..., lo:hi].clone().requires_grad_()
    lp, ent = D.token_logprobs(shard, y, temperature=tau, return_entropy=True)
    (lp * g_lp + ent * g_ent).sum().backward()
    x64 = full.double().requires_grad_()
    rlp, rent = ref.token_logprobs(x64, y, temperature=torch.where(y == -100, 1.0, tau).double().unsqueeze(-1),
                                   return_entropy=True)
    (rlp * g_lp.double() + rent * g_ent.double()).sum().backward()
    tol = _tol(torch.float32)
    torch.testing.assert_close(lp.double(), rlp, **tol)
    torch.testing.assert_close(ent.double(), rent, **tol)
    torch.testing.assert_close(shard.grad.double(), x64.grad[..., lo:hi], **tol)
    with pytest.raises(ValueError, match="positive and finite"):
        D.token_logprobs(shard, y, temperature=torch.where(y == -100, 1.0, tau).fill_(-1.0))
    with pytest.raises(ValueError, match="one temperature per token"):
        D.token_logprobs(shard, y, temperature=tau[:, :2])


def _errors_case(rank):
    from fastppo import KeptSet
    from fastppo import distributed as D

    logits = torch.randn(3, 4 + rank)                                # V = 9
    y = torch.tensor([0, 8, -100])
    with pytest.raises(ValueError, match="not in its row's kept set"):
        D.token_logprobs(logits, y, kept=KeptSet.from_lists([[0], [7], []]))
    with pytest.raises(ValueError, match="kept has 2 rows"):
        D.token_logprobs(logits, y, kept=KeptSet.from_lists([[0], [8]]))
    with pytest.raises(ValueError, match=r"kept ids must lie in \[0, 9\), got 9"):
        D.token_logprobs(logits, y, kept=KeptSet.from_lists([[0], [8, 9], []]))
    with pytest.raises(ValueError, match="built for vocab_size 10"):
        D.token_logprobs(logits, y, kept=KeptSet.from_lists([[0], [8], []], vocab_size=10))


def _worker(rank, world):
    import fastppo

    for backend in ("triton", "torch"):
        with fastppo.use_backend(backend):
            for even in (True, False):
                _logprobs_case(rank, torch.float32, even, with_ent=True)
                _fused_case(rank, torch.float32, even, per_token_tau=not even)
            _logprobs_case(rank, torch.float32, False, with_ent=False)
            _logprobs_case(rank, torch.float64, False, with_ent=True)
            _logprobs_case(rank, torch.bfloat16, True, with_ent=True)
            _fused_case(rank, torch.bfloat16, False, per_token_tau=True)
            _plain_tau_case(rank, False)
            _errors_case(rank)


def test_vocab_parallel_kept_and_temperature_match_full_ops():
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.fail("the triton backend needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    run_ranks(_worker)
