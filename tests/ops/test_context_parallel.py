"""Context parallel (fastppo.context_parallel) on 2 gloo processes against 1 process on the unsplit tensors: every
sequence split across the ranks in contiguous shards, padded ([B, T_r], uneven T_r, a sequence whose valid tokens
all lie on one rank) and packed (a packed stream cut at a token: sequences wholly on rank 0, one across the cut,
others wholly on rank 1, an empty one). Each rank's gae slice, loss share (summed over ranks), stats and token
gradients must equal the unsplit op's (both backends) and the float64 reference's (fastppo.reference, padded);
the collectives are counted by wrapping torch.distributed.all_reduce / all_gather; the caller-shifted labels give
each shard's last token the next shard's first label."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

from tests.ops.test_distributed import run_ranks

VARIANTS = ("ppo", "gspo", "gspo_token", "cispo", "sapo", "gmpo", "gpg")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")
LENGTHS = (5, 1, 0, 8, 3, 1, 13)   # packed stream of 31 tokens
CUT = 12                           # rank 0: tokens [0, 12) (sequence 3 split 6 | 2), rank 1: [12, 31)
T_SPLIT = (4, 7)                   # padded [B, 11] split into columns [0, 4) and [4, 11)


class CountCollectives(contextlib.AbstractContextManager):
    """Counts all_reduce / all_gather calls and the bytes each rank sends."""

    def __enter__(self):
        self.calls, self.bytes, self._orig = [], 0, (dist.all_reduce, dist.all_gather)

        def reduce(t, *a, **k):
            self.calls.append("all_reduce")
            self.bytes += t.numel() * t.element_size()
            return self._orig[0](t, *a, **k)

        def gather(out, t, *a, **k):
            self.calls.append("all_gather")
            self.bytes += t.numel() * t.element_size()
            return self._orig[1](out, t, *a, **k)

        dist.all_reduce, dist.all_gather = reduce, gather
        return self

    def __exit__(self, *exc):
        dist.all_reduce, dist.all_gather = self._orig
        return False


def _close(got, want, what, rtol=2e-5, atol=2e-6):
    got, want = got.double(), want.double()
    if not torch.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
        raise AssertionError(f"{what}: max |diff| {(got - want).abs().max().item():.3g}\n{got}\n{want}")


def _layouts(rank):
    """(name, full tensors' layout, this rank's shard function, local cu_seqlens or None, padded view)."""
    from tests.packing import pack_case

    case = pack_case(LENGTHS, holes=True, seed=4)
    start, end = (0, CUT) if rank == 0 else (CUT, case.total)
    cu_local = case.cu.clamp(start, end) - start
    packed = dict(name="packed", mask=case.mask, cu=case.cu, cu_local=cu_local, S=case.S,
                  shard=lambda x: x[start:end] if x.shape[0] == case.total else x, pad=case.pad, unpad=case.unpad)
    g = torch.Generator().manual_seed(11)
    B, T = 5, sum(T_SPLIT)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[1] = False                 # an empty sequence
    mask[2, :T_SPLIT[0]] = False    # a sequence wholly on rank 1
    mask[3, T_SPLIT[0]:] = False    # a sequence wholly on rank 0
    t0, t1 = (0, T_SPLIT[0]) if rank == 0 else (T_SPLIT[0], T)
    padded = dict(name="padded", mask=mask, cu=None, cu_local=None, S=B,
                  shard=lambda x: x[:, t0:t1] if x.dim() == 2 else x, pad=lambda x, fill=0.0: x,
                  unpad=lambda x: x)
    return packed, padded


def _inputs(lay, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shape = lay["mask"].shape
    logp = (-torch.rand(shape, generator=g) * 2).to(dtype)
    old = (logp.double() + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    adv = torch.randn(shape, generator=g).to(dtype)
    isw = (0.5 + torch.rand(shape, generator=g)).to(dtype)
    logp[~lay["mask"]] = float("nan")     # masked positions contribute nothing, even NaN
    return logp, old, adv, isw


def _worker(rank, world, backend):
    import fastppo
    from fastppo.kernels import _config as cfg

    cfg.GAE_BLOCK_T = 8     # the interpreter's scan over the default 1024-token block takes seconds per call
    with fastppo.use_backend(backend):
        _check_rank(rank, backend == "torch")


def _check_rank(rank, every_case):
    """Every variant and aggregation on the PyTorch backend; on the Triton one (the interpreter: slow), gae and
    the sequence-coupled variants under two aggregations (the losses' own shard math is backend-free)."""
    import fastppo
    from fastppo import context_parallel as cp
    from fastppo import reference as ref

    g_up = 1.7
    for lay in _layouts(rank):
        sh, cu, cu_l, mask = lay["shard"], lay["cu"], lay["cu_local"], lay["mask"]
        pm = lay["pad"](mask, fill=False)
        # ---- gae
        for dtype in (torch.float32, torch.float64):
            g = torch.Generator().manual_seed(5)
            r, v = (torch.randn(mask.shape, generator=g).to(dtype) for _ in range(2))
            v[~mask] = float("nan")
            with CountCollectives() as count:
                a, ret = cp.gae(sh(r), sh(v), sh(mask), gamma=0.9, lam=0.8, cu_seqlens=cu_l)
            assert count.calls == ["all_gather"] and count.bytes == 4 * lay["S"] * 8, (count.calls, count.bytes)
            full_a, full_r = fastppo.gae(r, v, mask, gamma=0.9, lam=0.8, cu_seqlens=cu)
            want_a, want_r = ref.gae(lay["pad"](r.double()), lay["pad"](v.double(), fill=float("nan")), pm,
                                     gamma=0.9, lam=0.8)
            _close(a, sh(full_a), f"{lay['name']} gae {dtype} vs unsplit")
            _close(a, sh(lay["unpad"](want_a)), f"{lay['name']} gae {dtype} vs float64")
            _close(ret, sh(lay["unpad"](want_r)), f"{lay['name']} gae returns {dtype} vs float64")
        # ---- policy losses, every variant and aggregation
        logp, old, adv, isw = _inputs(lay, torch.float32, seed=3)
        for policy_loss in VARIANTS if every_case else ("ppo", "gspo", "gmpo"):
            for agg in AGGS if every_case else ("seq-mean-token-mean", "seq-mean-token-sum-norm"):
                kw = dict(policy_loss=policy_loss, agg=agg, rollout_is_weights=isw,
                          dual_clip=3.0 if policy_loss == "ppo" else None)
                x = sh(logp).clone().requires_grad_(True)
                with CountCollectives() as count:
                    share, stats = cp.ppo_policy_loss(x, sh(old), sh(adv), sh(mask), cu_seqlens=cu_l,
                                                      **{**kw, "rollout_is_weights": sh(isw)})
                seq_sums = 1 + {"gspo": 2, "gspo_token": 1, "gmpo": 3}.get(policy_loss, 0)   # counts, the variant's
                norm = agg == "seq-mean-token-sum-norm"       # + the horizon: S lengths (packed), T_r (padded)
                assert count.calls.count("all_reduce") == seq_sums + norm and count.calls.count("all_gather") == 1, \
                    (policy_loss, agg, count.calls)
                horizon_floats = (lay["S"] if cu is not None else 1) if norm else 0
                assert count.bytes == 4 * (seq_sums * lay["S"] + horizon_floats + 14), (policy_loss, agg, count.bytes)
                (share * g_up).backward()
                total = share.detach().clone()
                dist.all_reduce(total)
                xf = logp.clone().requires_grad_(True)
                loss, full_stats = fastppo.ppo_policy_loss(xf, old, adv, mask, cu_seqlens=cu, **kw)
                (loss * g_up).backward()
                xp = lay["pad"](logp.double(), fill=float("nan")).requires_grad_(True)
                want, want_stats = ref.ppo_policy_loss(xp, lay["pad"](old.double()), lay["pad"](adv.double()), pm,
                                                       **{**kw, "rollout_is_weights": lay["pad"](isw.double(),
                                                                                                 fill=1.0)})
                (want * g_up).backward()
                what = f"{lay['name']} {policy_loss} {agg}"
                _close(total, loss, what + " loss vs unsplit")
                _close(total, want, what + " loss vs float64")
                for key in ("clipfrac", "clipfrac_lower", "approx_kl", "ratio_mean", "ratio_max"):
                    _close(stats[key], full_stats[key], f"{what} {key}")
                _close(x.grad, sh(xf.grad), what + " grad vs unsplit")
                _close(x.grad, sh(lay["unpad"](xp.grad)), what + " grad vs float64")
        # ---- per-sequence advantages, bf16
        logp, old, _, _ = _inputs(lay, torch.bfloat16, seed=8)
        adv_s = torch.randn(lay["S"], generator=torch.Generator().manual_seed(2))
        for policy_loss in ("ppo", "gspo", "gmpo"):
            x = sh(logp).clone().requires_grad_(True)
            share, _ = cp.ppo_policy_loss(x, sh(old), adv_s, sh(mask), cu_seqlens=cu_l, policy_loss=policy_loss,
                                          agg="seq-mean-token-mean")
            share.backward()
            xf = logp.clone().requires_grad_(True)
            loss, _ = fastppo.ppo_policy_loss(xf, old, adv_s, mask, cu_seqlens=cu, policy_loss=policy_loss,
                                              agg="seq-mean-token-mean")
            loss.backward()
            total = share.detach().clone()
            dist.all_reduce(total)
            _close(total, loss, f"{lay['name']} bf16 {policy_loss} loss", rtol=1e-3, atol=1e-4)
            _close(x.grad, sh(xf.grad), f"{lay['name']} bf16 {policy_loss} grad", rtol=1e-2, atol=1e-4)
        # ---- value loss
        g = torch.Generator().manual_seed(9)
        val, old_v, ret = (torch.randn(mask.shape, generator=g) for _ in range(3))
        for agg in AGGS if every_case else ("seq-mean-token-mean",):
            x = sh(val).clone().requires_grad_(True)
            with CountCollectives() as count:
                share, stats = cp.value_loss(x, sh(old_v), sh(ret), sh(mask), clip=0.2, agg=agg, cu_seqlens=cu_l)
            assert len(count.calls) == 2 + (agg == "seq-mean-token-sum-norm"), count.calls
            (share * g_up).backward()
            total = share.detach().clone()
            dist.all_reduce(total)
            xp = lay["pad"](val.double()).requires_grad_(True)
            want, want_stats = ref.value_loss(xp, lay["pad"](old_v.double()), lay["pad"](ret.double()), pm, clip=0.2,
                                              agg=agg)
            (want * g_up).backward()
            _close(total, want, f"{lay['name']} value {agg} loss")
            _close(stats["vf_clipfrac"], want_stats["vf_clipfrac"], f"{lay['name']} value {agg} clipfrac")
            _close(x.grad, sh(lay["unpad"](xp.grad)), f"{lay['name']} value {agg} grad")
    # ---- labels: shifted by the caller before the split; a shard's last token is scored on the next shard's first
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 16, (3, 12), generator=g)
    logits = torch.randn(3, 12, 16, generator=g)
    labels = torch.cat((ids[:, 1:], torch.full_like(ids[:, :1], -100)), -1)     # labels[t] = ids[t + 1]
    cut = 5
    part = slice(0, cut) if rank == 0 else slice(cut, 12)
    mine = fastppo.token_logprobs(logits[:, part], labels[:, part])
    full = fastppo.token_logprobs(logits, labels)
    _close(mine, full[:, part], "shifted labels")
    if rank == 0:
        want_last = torch.log_softmax(logits[:, cut - 1].double(), -1).gather(-1, ids[:, cut, None])[:, 0]
        _close(mine[:, -1], want_last, "the shard's last token scores the next shard's first id")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_context_parallel_two_ranks_match_one(backend):
    run_ranks(_worker, backend, timeout_s=600)


def test_context_parallel_needs_a_process_group():
    from fastppo import context_parallel as cp

    x = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        cp.gae(x, x, x > -1)
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        cp.ppo_policy_loss(x, x, x, x > -1)
