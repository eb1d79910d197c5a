"""Vocabulary-parallel ops (fastppo.distributed) on 2 gloo processes on 127.0.0.1: every rank holds
a contiguous slice of the vocabulary (even and uneven splits); log-probs, entropy, losses and the
gradients (each rank's shard slice, the full d(hidden)) must equal the float64 reference of the
full op and the unsharded op. The collectives are counted by wrapping torch.distributed.all_reduce."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
TIMEOUT_S = 300          # 2 spawned interpreters on a shared CPU: 147 s measured at load 14 on 2 cores


# ----------------------------------------------------------------------------- harness
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world, store, args):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, *args, world=WORLD, timeout_s=TIMEOUT_S):
    """Run fn(rank, world, *args) in `world` spawned processes joined in a gloo group; re-raise a
    child's exception here; kill them all after timeout_s. The ranks meet in a file store in a new folder (no
    port to pick: runs on parallel pytest-xdist workers cannot collide)."""
    folder = tempfile.mkdtemp(prefix="fastppo-ranks-")
    ctx = mp.start_processes(_entry, args=(fn, world, os.path.join(folder, "store"), args), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__name__} did not finish in {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
        shutil.rmtree(folder, ignore_errors=True)


class CountAllReduce(contextlib.AbstractContextManager):
    """Counts torch.distributed.all_reduce calls and the bytes they reduce."""

    def __enter__(self):
        self.calls, self.bytes, self._orig = 0, 0, dist.all_reduce

        def counted(t, *a, **k):
            self.calls += 1
            self.bytes += t.numel() * t.element_size()
            return self._orig(t, *a, **k)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig
        return False


# ----------------------------------------------------------------------------- worker
def _split(V, even):
    a = V // 2 if even else V // 2 + 3
    return [(0, a), (a, V)]


def _labels(shape, V, split, ignore_index, gen):
    """Labels on both shards, including each shard's first and last column, plus holes."""
    y = torch.randint(0, V, shape, generator=gen)
    flat = y.view(-1)
    edges = [split[0][0], split[0][1] - 1, split[1][0], split[1][1] - 1]
    flat[: len(edges)] = torch.tensor(edges)
    flat[torch.rand(flat.shape, generator=gen) < 0.2] = ignore_index
    flat[-1] = ignore_index
    return y


def _tol(dtype):
    return {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5),
            torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}[dtype]


def assert_no_worse(got, unsharded, want, tol):
    """|got - want| <= 2 |unsharded - want| + atol + rtol |want|, want the float64 reference: the sharded
    op may not be less accurate than the unsharded op of the same backend."""
    want = want.double()
    err, base = (got.double() - want).abs(), (unsharded.double() - want).abs()
    bound = 2 * base + tol["atol"] + tol["rtol"] * want.abs()
    bad = ~(err <= bound) & ~(got.isnan() & want.isnan())
    assert not bad.any(), f"{int(bad.sum())} elements off, max err {err.max().item():.3g} vs {base.max().item():.3g}"


def assert_same_outputs(out, unsharded, tol):
    """The sharded loss returns what the unsharded fused op returns: per-token outputs (detached, same
    dtype, None alike) and the same stats keys with the same values."""
    assert out.loss.dtype == unsharded.loss.dtype and out.loss.shape == unsharded.loss.shape
    for name in ("logprobs", "kl", "entropy"):
        got, want = getattr(out, name), getattr(unsharded, name)
        assert (got is None) == (want is None), name
        if got is not None:
            assert not got.requires_grad and got.dtype == want.dtype, (name, got.dtype, want.dtype)
            torch.testing.assert_close(got.double(), want.double(), **tol)
    assert list(out.stats) == list(unsharded.stats), (list(out.stats), list(unsharded.stats))
    for k, v in out.stats.items():
        assert v.dim() == 0 and not v.requires_grad, k
        torch.testing.assert_close(v.double(), unsharded.stats[k].double(), **tol, msg=lambda m, k=k: f"{k}: {m}")


def _logits_case(rank, dtype, even, ignore_index, measure, tf=None):
    import fastppo
    from fastppo import distributed as D
    from fastppo import reference as ref

    tf = tf or {}
    gen = torch.Generator().manual_seed(7)
    B, T, V, tau = 3, 5, 41, 0.7
    split = _split(V, even)
    full = (torch.randn(B, T, V, generator=gen) * 3).to(dtype)
    full[0, 1, split[1][0]:] = 40.0            # an extreme row: the mass sits on rank 1's shard
    y = _labels((B, T), V, split, ignore_index, gen)
    g_lp, g_ent = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    lo, hi = split[rank]
    # a non-contiguous view of the full logits (row stride V) as this rank's shard
    shard = full.detach().clone().requires_grad_()
    with CountAllReduce() as fwd:
        lp, ent = D.token_logprobs(shard[..., lo:hi], y, temperature=tau, ignore_index=ignore_index,
                                   return_entropy=True, **tf)
    with CountAllReduce() as bwd:
        (lp * g_lp + ent * g_ent).sum().backward()
    N = B * T
    acc_bytes = 8 if dtype == torch.float64 else 4
    assert (fwd.calls, fwd.bytes, bwd.calls) == (2, 5 * N * acc_bytes, 0), (fwd.calls, fwd.bytes, bwd.calls)
    if measure is not None:
        measure["token_logprobs"] = dict(N=N, fwd_all_reduces=fwd.calls, fwd_bytes=fwd.bytes,
                                         bwd_all_reduces=bwd.calls, bwd_bytes=bwd.bytes)
    x64 = full.detach().double().clone().requires_grad_()
    rlp, rent = ref.token_logprobs(x64, y, temperature=tau, ignore_index=ignore_index, return_entropy=True, **tf)
    (rlp * g_lp.double() + rent * g_ent.double()).sum().backward()
    x = full.detach().clone().requires_grad_()
    ulp, uent = fastppo.token_logprobs(x, y, temperature=tau, ignore_index=ignore_index, return_entropy=True, **tf)
    (ulp * g_lp + uent * g_ent).sum().backward()
    tol = _tol(dtype)
    assert_no_worse(lp, ulp, rlp, tol)
    assert_no_worse(ent, uent, rent, tol)
    grad = shard.grad
    assert_no_worse(grad[..., lo:hi], x.grad[..., lo:hi], x64.grad[..., lo:hi], tol)
    assert (grad[..., :lo] == 0).all() and (grad[..., hi:] == 0).all()
    assert (lp[y == ignore_index] == 0).all() and (ent[y == ignore_index] == 0).all()


def _fused_case(rank, dtype, even, policy=None):
    import fastppo
    from fastppo import distributed as D

    gen = torch.Generator().manual_seed(11)
    B, T, V = 4, 6, 37
    split = _split(V, even)
    full = (torch.randn(B, T, V, generator=gen) * 2).to(dtype)
    y = _labels((B, T), V, split, -100, gen)
    old = torch.randn(B, T, generator=gen) * 0.3 - 3.5
    ref_lp = old + torch.randn(B, T, generator=gen) * 0.1
    adv = torch.randn(B, T, generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.2
    mask[1] = False
    kw = dict(ref_logprobs=ref_lp, kl_coef=0.1, entropy_coef=0.01, agg="seq-mean-token-mean", temperature=0.9,
              num_tokens=50.0, num_seqs=6.0, clip_high=0.28, **(policy or {}))
    lo, hi = split[rank]
    shard = full[..., lo:hi].detach().clone().requires_grad_()
    with CountAllReduce() as fwd:
        out = D.fused_ppo_loss(shard, y, old, adv, mask, **kw)
    with CountAllReduce() as bwd:
        (out.loss * 1.7).backward()
    assert (fwd.calls, bwd.calls) == (2, 0), (fwd.calls, bwd.calls)     # the loss itself adds no collective
    x64 = full.detach().double().clone().requires_grad_()
    with fastppo.use_backend("torch"):
        want = fastppo.fused_ppo_loss(x64, y, old.double(), adv.double(), mask, **kw)
    (want.loss * 1.7).backward()
    x = full.detach().clone().requires_grad_()
    unsharded = fastppo.fused_ppo_loss(x, y, old, adv, mask, **kw)
    (unsharded.loss * 1.7).backward()
    tol = _tol(dtype)
    torch.testing.assert_close(out.loss.double(), want.loss, **tol)
    torch.testing.assert_close(out.logprobs.double(), want.logprobs, **tol)
    torch.testing.assert_close(out.entropy.double(), want.entropy, **tol)
    torch.testing.assert_close(shard.grad.double(), x64.grad[..., lo:hi], **tol)
    torch.testing.assert_close(shard.grad, x.grad[..., lo:hi], **tol)
    torch.testing.assert_close(out.loss, unsharded.loss, **tol)
    assert_same_outputs(out, unsharded, tol)
    assert set(out.stats) >= {"clipfrac", "approx_kl", "kl", "entropy", "pg_loss"}


def _linear_case(rank, dtype, even, measure, tf=None):
    import fastppo
    from fastppo import distributed as D
    from fastppo import reference as ref

    tf = tf or {}
    gen = torch.Generator().manual_seed(13)
    B, T, H, V = 2, 5, 16, 45
    split = _split(V, even)
    hidden = torch.randn(B, T, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) / H**0.5 * 2).to(dtype)
    bias = (torch.randn(V, generator=gen) * 0.5).to(dtype)
    y = _labels((B, T), V, split, -100, gen)
    g_lp, g_ent = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    lo, hi = split[rank]
    h = hidden.clone().requires_grad_()
    w = weight[lo:hi].clone().requires_grad_()
    b = bias[lo:hi].clone().requires_grad_()
    with CountAllReduce() as fwd:
        lp, ent = D.linear_logprobs(h, w, y, bias=b, temperature=1.1, return_entropy=True, **tf)
    with CountAllReduce() as bwd:
        (lp * g_lp + ent * g_ent).sum().backward()
    N = B * T
    acc_bytes = 8 if dtype == torch.float64 else 4
    assert (fwd.calls, fwd.bytes) == (2, 5 * N * acc_bytes), (fwd.calls, fwd.bytes)
    assert (bwd.calls, bwd.bytes) == (1, N * H * acc_bytes), (bwd.calls, bwd.bytes)
    if measure is not None:
        measure["linear_logprobs"] = dict(N=N, H=H, fwd_all_reduces=fwd.calls, fwd_bytes=fwd.bytes,
                                          bwd_all_reduces=bwd.calls, bwd_bytes=bwd.bytes)
    leaves = [t.detach().double().clone().requires_grad_() for t in (hidden, weight, bias)]
    rlp, rent = ref.linear_logprobs(leaves[0], leaves[1], y, bias=leaves[2], temperature=1.1, return_entropy=True,
                                    **tf)
    (rlp * g_lp.double() + rent * g_ent.double()).sum().backward()
    tol = _tol(dtype) if dtype != torch.float32 else dict(rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(lp.double(), rlp, **tol)
    torch.testing.assert_close(ent.double(), rent, **tol)
    torch.testing.assert_close(h.grad.double(), leaves[0].grad, **tol)
    torch.testing.assert_close(w.grad.double(), leaves[1].grad[lo:hi], **tol)
    torch.testing.assert_close(b.grad.double(), leaves[2].grad[lo:hi], **tol)

    # the fused linear loss against the unsharded one, hidden replicated
    old = torch.randn(B, T, generator=gen) * 0.3 - 3.7
    adv = torch.randn(B, T, generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.25
    ref_lp = old + torch.randn(B, T, generator=gen) * 0.1
    kw = dict(entropy_coef=0.02, agg="token-mean", num_tokens=13.0, ref_logprobs=ref_lp, kl_coef=0.05, **tf)
    h1, w1, b1 = (t.detach().clone().requires_grad_() for t in (hidden, weight[lo:hi], bias[lo:hi]))
    with CountAllReduce() as fwd:
        out = D.fused_linear_ppo_loss(h1, w1, y, old, adv, mask, bias=b1, **kw)
    with CountAllReduce() as bwd:
        out.loss.backward()
    assert (fwd.calls, bwd.calls) == (2, 1), (fwd.calls, bwd.calls)
    h2, w2, b2 = (t.detach().double().clone().requires_grad_() for t in (hidden, weight, bias))
    want = fastppo.fused_linear_ppo_loss(h2, w2, y, old.double(), adv.double(), mask, bias=b2, **kw)
    want.loss.backward()
    torch.testing.assert_close(out.loss.double(), want.loss, **tol)
    unsharded = fastppo.fused_linear_ppo_loss(hidden, weight, y, old, adv, mask, bias=bias, **kw)
    assert_same_outputs(out, unsharded, tol)
    torch.testing.assert_close(h1.grad.double(), h2.grad, **tol)
    torch.testing.assert_close(w1.grad.double(), w2.grad[lo:hi], **tol)
    torch.testing.assert_close(b1.grad.double(), b2.grad[lo:hi], **tol)


def _magnitude_case(rank, name, dtype):
    """Issue #21 class 2 sharded: log-probs, entropy and gradient to fp32 rounding of float64 at every
    magnitude (the shards' row max and log-sum are combined, never one absolute lse), both the logits op and
    the linear op (exact fp32 logits: integer hidden, weights in 1/8 steps, a bias at the offset)."""
    from fastppo import distributed as D
    from fastppo import reference as ref
    from tests.helpers import assert_close_by_dtype, magnitude_logits

    torch.manual_seed(5)                                      # every rank draws the same full tensors
    B, T, H, V = 2, 3, 8, 41
    split = _split(V, False)
    lo, hi = split[rank]
    full = magnitude_logits(name, dtype, (B, T, V), device="cpu")
    y = _labels((B, T), V, split, -100, torch.Generator().manual_seed(3))
    g_lp, g_ent = torch.randn(B, T), torch.randn(B, T)
    shard = full[..., lo:hi].detach().clone().requires_grad_()
    lp, ent = D.token_logprobs(shard, y, return_entropy=True)
    (lp * g_lp + ent * g_ent).sum().backward()
    x64 = full.detach().double().requires_grad_()
    rlp, rent = ref.token_logprobs(x64, y, return_entropy=True)
    (rlp * g_lp.double() + rent * g_ent.double()).sum().backward()
    for got, want in ((lp, rlp), (ent, rent)):
        assert_close_by_dtype(got, want, torch.float32)
    assert_close_by_dtype(shard.grad, x64.grad[..., lo:hi], dtype)
    if dtype != torch.float32:
        return
    hidden = torch.randint(-2, 3, (B, T, H)).float()
    weight = torch.randint(-4, 5, (V, H)) / 8.0
    bias = torch.full((V,), float(name))
    h, w = hidden.clone().requires_grad_(), weight[lo:hi].clone().requires_grad_()
    lp, ent = D.linear_logprobs(h, w, y, bias=bias[lo:hi], return_entropy=True)
    (lp * g_lp + ent * g_ent).sum().backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    rlp, rent = ref.linear_logprobs(h64, w64, y, bias=bias.double(), return_entropy=True)
    (rlp * g_lp.double() + rent * g_ent.double()).sum().backward()
    for got, want in ((lp, rlp), (ent, rent)):
        assert_close_by_dtype(got, want, torch.float32)
    assert_close_by_dtype(h.grad, h64.grad, torch.float32, scale=H)
    assert_close_by_dtype(w.grad, w64.grad[lo:hi], torch.float32, scale=H)


def _errors_case(rank):
    from fastppo import distributed as D

    logits = torch.randn(3, 4 + rank)
    with pytest.raises(ValueError, match="labels must be in"):
        D.token_logprobs(logits, torch.tensor([0, 8, 9]))            # V = 9: label 9 is owned by no rank
    with pytest.raises(ValueError, match="labels shape"):
        D.token_logprobs(logits, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="weight_shard"):
        D.linear_logprobs(torch.randn(3, 4), torch.randn(0, 4), torch.tensor([0, 1, 2]))


def _cases(rank, measure):
    for dtype in (torch.float32, torch.float64):
        for even in (True, False):
            _logits_case(rank, dtype, even, -100, measure if dtype == torch.float32 else None)
    _logits_case(rank, torch.float32, False, -1, None)       # ignore_index = -1: the sentinel moves to -2
    _logits_case(rank, torch.bfloat16, False, -100, None)
    _logits_case(rank, torch.float32, False, -100, None, dict(final_logit_softcapping=20.0, logit_scale=0.8))
    for even in (True, False):
        _fused_case(rank, torch.float32, even)
    is_w = torch.rand(4, 6, generator=torch.Generator().manual_seed(2)) + 0.5
    _fused_case(rank, torch.float32, False, dict(policy_loss="gspo", rollout_is_weights=is_w))
    _fused_case(rank, torch.float32, True, dict(policy_loss="cispo"))
    _fused_case(rank, torch.float32, False, dict(entropy_quantile=0.5, dual_clip=3.0))
    _linear_case(rank, torch.float32, False, measure)
    _linear_case(rank, torch.float64, True, None, dict(final_logit_softcapping=3.0, logit_scale=1.5))
    from tests.helpers import MAGNITUDES
    for name, dtype in MAGNITUDES:
        _magnitude_case(rank, name, dtype)
    _errors_case(rank)


def _worker(rank, world, out_path):
    import fastppo

    measures = {}
    for backend in ("triton", "torch"):       # the Triton kernels (interpreter on CPU) and the PyTorch backend
        measures[backend] = {} if rank == 0 else None
        with fastppo.use_backend(backend):
            _cases(rank, measures[backend])
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(measures, f)


@pytest.mark.slow
def test_vocab_parallel_ops_match_full_ops(tmp_path):
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.fail("the triton backend needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    out = tmp_path / "measure.json"
    run_ranks(_worker, str(out))
    for backend, measure in json.loads(out.read_text()).items():
        print(backend, measure)
        lp, lin = measure["token_logprobs"], measure["linear_logprobs"]
        assert (lp["fwd_all_reduces"], lp["fwd_bytes"], lp["bwd_all_reduces"]) == (2, 20 * lp["N"], 0)
        assert (lin["fwd_all_reduces"], lin["bwd_all_reduces"], lin["bwd_bytes"]) == (2, 1, 4 * lin["N"] * lin["H"])
