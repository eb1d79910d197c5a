"""The kept-only linear path (kept_path="gather", fastppo.linear_gather, kernels/linear_kept_gather.py) on both
backends: values and gradients against the float64 reference of the documented formula (fastppo.reference_kept)
and against the dense kept path, upstream gradients not all ones, odd shapes, strided hidden, empty kept rows,
ignored rows holding NaN hidden, float and per-token temperatures, softcap, bf16 / fp32 / fp64; the fused loss
(gradient formed in forward, and the recompute path); a live label outside its kept set (NaN log-prob and NaN
gradient over K, #23 c, on both paths); batch invariance and determinism; the path rule; counters: the gather
launches' bytes do not grow with V and no GEMM runs; float64 gradcheck."""

import pytest
import torch

import fastppo
from fastppo import KeptSet
from fastppo.library import encode
from fastppo.linear_gather import takes_gather
from fastppo.linear_pipeline import KeptArg, build_linear_options
from fastppo.options import LinearOptions
from fastppo.reference_kept import kept_fused_linear_ppo_loss, kept_linear_logprobs
from tests.helpers import DEVICE, assert_close_by_dtype, kept_gradcheck_inputs

BACKENDS = ["triton", "torch"]
H, V = 19, 203


def sparse_case(N, dtype, seed=0, V=V, frac=0.05):
    """hidden (a strided view), weight, bias, labels and a sparse KeptSet (~5 % kept): row 0 keeps nothing (its
    label ignored, its hidden NaN), row 1 keeps one token, row 2 is ignored but keeps tokens (NaN hidden too),
    every live label kept."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, 2 * H, generator=g)
    hidden = base[:, ::2].clone()
    weight = torch.randn(V, H, generator=g) * 0.4
    bias = torch.randn(V, generator=g) * 0.3
    mask = torch.rand(N, V, generator=g) < frac
    labels = torch.randint(0, V, (N,), generator=g)
    mask[torch.arange(N), labels] = True
    mask[0] = False
    mask[1] = False
    mask[1, labels[1]] = True
    labels[0] = labels[2] = -100
    hidden[0] = hidden[2] = float("nan")
    strided = torch.cat([hidden, torch.zeros(N, H)], 1)[:, :H]      # a view with row stride 2 H
    return (strided.to(dtype).to(DEVICE), weight.to(dtype).to(DEVICE), bias.to(dtype).to(DEVICE),
            labels.to(DEVICE), KeptSet.from_mask(mask).to(DEVICE))


def upstream(n, a, b):
    return torch.linspace(a, b, n, dtype=torch.float64, device=DEVICE)


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def close_grad(got, want, dtype):
    if dtype == torch.bfloat16:
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * scale)
    else:
        assert_close_by_dtype(got, want, torch.float32 if dtype == torch.float32 else dtype,
                              scale=10 * max(1.0, want.abs().max().item()))


def run_linear(backend, path, hidden, weight, bias, labels, ks, g, **kw):
    h, w, b = leaves(hidden, weight, bias)
    with fastppo.use_backend(backend):
        lp = fastppo.linear_logprobs(h, w, labels, bias=b, kept=ks, kept_path=path, **kw)
    (lp * g.to(lp.dtype)).sum().backward()
    return lp.detach(), h.grad, w.grad, b.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tau", [(torch.float32, "rows"), (torch.bfloat16, 0.8), (torch.float64, "rows")])
def test_gather_matches_float64_and_dense(backend, dtype, tau):
    N = 11
    hidden, weight, bias, labels, ks = sparse_case(N, dtype)
    kw = dict(final_logit_softcapping=4.0, logit_scale=1.2) if dtype != torch.bfloat16 else {}
    kw["temperature"] = (torch.rand(N, generator=torch.Generator().manual_seed(1)) + 0.5).to(DEVICE) \
        if tau == "rows" else tau
    g = upstream(N, -1.5, 2.0)
    got = run_linear(backend, "gather", hidden, weight, bias, labels, ks, g, **kw)
    dense = run_linear(backend, "dense", hidden, weight, bias, labels, ks, g, **kw) if dtype == torch.float32 else got
    # the reference with the ignored rows' NaN hidden zeroed (ignored rows contribute nothing by definition)
    h6, w6, b6 = leaves(*(t.double() for t in (torch.nan_to_num(hidden), weight, bias)))
    rlp = kept_linear_logprobs(h6, w6, labels, ks, bias=b6, **kw)
    (rlp * g).sum().backward()
    live = labels != -100
    assert (got[0][~live] == 0).all() and (got[1][~live] == 0).all()
    assert all(torch.isfinite(t).all() for t in got)          # the NaN hidden of ignored rows never leaks
    assert_close_by_dtype(got[0], torch.where(live, rlp, 0), torch.float32 if dtype != torch.float64 else dtype,
                          scale=10)
    for a, want, t in zip(got[1:], (h6.grad, w6.grad, b6.grad), (hidden, weight, bias)):
        assert a.dtype == t.dtype
        close_grad(a, want, dtype)
    for a, d in zip(got, dense):
        close_grad(a, d.double(), dtype)
    kept_cols = ks.to_mask(V)[live.cpu()].any(0).to(DEVICE)
    assert (got[2][~kept_cols] == 0).all() and (got[3][~kept_cols] == 0).all()   # never-kept rows: exactly 0


@pytest.mark.parametrize("backend,policy_loss", [("triton", "ppo"), ("triton", "gspo"), ("torch", "ppo")])
def test_fused_linear_ppo_loss_gather(backend, policy_loss):
    """Without entropy the fused loss takes the kept-only path: on the Triton backend in forward (token-local) or
    on the recompute path (gspo); the torch backend has the one path."""
    N = 12
    hidden, weight, bias, labels, ks = sparse_case(N, torch.float32, seed=3)
    B, T = 2, N // 2
    gen = torch.Generator().manual_seed(4)
    mask = (torch.rand(B, T, generator=gen) > 0.2).to(DEVICE)
    old = (torch.randn(B, T, generator=gen) * 0.2 - 3).to(DEVICE)
    adv = torch.randn(B, T, generator=gen).to(DEVICE)
    tau = (torch.rand(B, T, generator=gen) + 0.5).to(DEVICE)
    kw = dict(temperature=tau, policy_loss=policy_loss, kl_coef=0.1, ref_logprobs=old + 0.1)
    h, w, b = leaves(hidden.reshape(B, T, H), weight, bias)
    with fastppo.use_backend(backend):
        out = fastppo.fused_linear_ppo_loss(h, w, labels.view(B, T), old, adv, mask, bias=b, kept=ks,
                                            kept_path="gather", **kw)
    (out.loss * 1.7).backward()
    h6, w6, b6 = leaves(torch.nan_to_num(hidden).reshape(B, T, H).double(), weight.double(), bias.double())
    ref = kept_fused_linear_ppo_loss(h6, w6, labels.view(B, T), ks, old.double(), adv.double(), mask, bias=b6,
                                     **dict(kw, temperature=tau.double(), ref_logprobs=(old + 0.1).double()))
    (ref.loss * 1.7).backward()
    live = mask & (labels.view(B, T) != -100)
    assert_close_by_dtype(out.loss, ref.loss, torch.float32, scale=10)
    assert_close_by_dtype(out.logprobs, torch.where(live, ref.logprobs, 0), torch.float32, scale=10)
    for got, want in zip((h.grad, w.grad, b.grad), (h6.grad, w6.grad, b6.grad)):
        close_grad(got, want, torch.float32)
    assert (h.grad[~live] == 0).all()


def _unchecked_logprobs(backend, path, hidden, weight, labels, ks, g):
    """linear_logprobs' op called without the CPU check of the labels (what a CUDA call runs)."""
    opts = build_linear_options(1.0, -100, False, False, None, 1.0, None, backend, kept_path=path)
    h, w = leaves(hidden, weight)
    out = torch.ops.fastppo.linear_logprobs(h, w, None, labels, encode(opts), backend, None, ks.ids, ks.offsets)
    (out[0] * g.float()).sum().backward()
    return out[0].detach(), h.grad, w.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["dense", "gather"])
def test_label_outside_kept_set_gives_nan_gradient(backend, path):
    """#23 (c): a live label not in its row's kept set gives a NaN log-prob and a NaN gradient over the row's
    kept columns (d hidden row NaN, d weight NaN exactly at those ids), other rows untouched, on both paths
    and backends (the public function refuses it on CPU)."""
    N = 7
    hidden, weight, _, labels, ks = sparse_case(N, torch.float32, seed=5)
    hidden = torch.nan_to_num(hidden)
    bad = labels.clone()
    kmask = ks.to_mask(V)
    bad[4] = int((~kmask[4]).nonzero()[0])
    with pytest.raises(ValueError, match="not in its row's kept set"):
        fastppo.linear_logprobs(hidden, weight, bad, kept=ks, kept_path=path)
    g = upstream(N, -1.0, 1.0) + 2.0
    lp, dh, dw = _unchecked_logprobs(backend, path, hidden, weight, bad, ks, g)
    ok, _, _ = _unchecked_logprobs(backend, path, hidden, weight, labels, ks, g)
    assert torch.isnan(lp[4]) and torch.isnan(dh[4]).all()
    others = torch.arange(N, device=DEVICE) != 4
    assert torch.isfinite(dh[others]).all() and torch.equal(lp[others], ok[others])
    assert torch.isnan(dw[kmask[4].to(DEVICE)]).all()
    live_others = kmask[(labels.cpu() != -100) & others.cpu()].any(0).to(DEVICE)
    assert torch.isfinite(dw[~kmask[4].to(DEVICE)]).all() and (dw[~kmask[4].to(DEVICE) & ~live_others] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_rows_batch_invariant_and_deterministic(backend):
    """Row 5's log-prob and d(hidden) are bitwise the same alone and among 9 rows; d(weight) bitwise the same
    on a second run (a fixed summation order, no atomics)."""
    hidden, weight, bias, labels, ks = sparse_case(9, torch.float32, seed=6)
    kmask = ks.to_mask(V)
    g = upstream(9, -1.0, 2.0)

    def run(rows):
        sub = KeptSet.from_mask(kmask[rows.cpu()]).to(DEVICE)
        return run_linear(backend, "gather", hidden[rows], weight, bias, labels[rows], sub, g[rows])

    alone = run(torch.tensor([5], device=DEVICE))
    among = run(torch.arange(9, device=DEVICE))
    again = run(torch.arange(9, device=DEVICE))
    assert torch.equal(alone[0][0], among[0][5]) and torch.equal(alone[1][0], among[1][5])
    for a, b in zip(among, again):
        assert torch.equal(a, b)


def test_path_rule():
    """auto: gather when nnz * GATHER_COST <= rows * V (top-50 of a 151,552 vocabulary yes, 10 % of 1k no),
    never with entropy or extras; the torch backend only on CPU; an unknown kept_path is refused."""
    opts = LinearOptions(backend="triton")
    cpu = torch.device("cpu")

    def kept(nnz):
        return KeptArg(torch.zeros(nnz, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))

    assert takes_gather(opts, kept(8192 * 50), 8192, 151552, cpu)
    assert not takes_gather(opts, kept(64 * 100), 64, 1000, cpu)
    assert not takes_gather(opts, None, 8192, 151552, cpu)
    assert not takes_gather(LinearOptions(backend="triton", with_entropy=True), kept(50), 8192, 151552, cpu)
    assert not takes_gather(LinearOptions(backend="triton", extras=True), kept(50), 8192, 151552, cpu)
    assert not takes_gather(LinearOptions(backend="triton", kept_path="dense"), kept(50), 8192, 151552, cpu)
    assert takes_gather(LinearOptions(backend="triton", kept_path="gather"), kept(10 ** 6), 8, 100, cpu)
    meta = torch.device("meta")
    assert not takes_gather(LinearOptions(backend="torch"), kept(50), 8192, 151552, meta)
    with pytest.raises(ValueError, match="kept_path='gather'"):
        takes_gather(LinearOptions(backend="torch", kept_path="gather"), kept(50), 8, 100, meta)
    hidden, weight, _, labels, ks = sparse_case(4, torch.float32)
    with pytest.raises(ValueError, match="kept_path"):
        fastppo.linear_logprobs(hidden, weight, labels, kept=ks, kept_path="sparse")


def _gather_traffic(Vd):
    from fastppo.bench.counters import TritonLaunches

    N, Hd = 8, 32
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, Hd, generator=g).bfloat16().to(DEVICE)
    weight = (torch.randn(Vd, Hd, generator=torch.Generator().manual_seed(1)) * 0.2).bfloat16().to(DEVICE)
    mask = torch.zeros(N, Vd, dtype=torch.bool)
    mask[:, :256] = torch.rand(N, 256, generator=g) < 0.03    # the same kept ids at every V
    labels = torch.randint(0, 256, (N,), generator=g)
    mask[torch.arange(N), labels] = True
    ks = KeptSet.from_mask(mask).to(DEVICE)
    h, w = leaves(hidden, weight)
    counter = TritonLaunches()
    with counter.count():
        lp = fastppo.linear_logprobs(h, w, labels.to(DEVICE), kept=ks, kept_path="gather")
        (lp * upstream(N, -1.0, 1.0).float()).sum().backward()
    return ks.nnz, counter.log


def test_gather_bytes_grow_with_nnz_not_vocab():
    """At equal kept sets (N = 8, H = 32, bf16, ~3 % of 256 ids kept), V = 512 and V = 2048: the gather
    launches move the same bytes, run no GEMM (tl.dot FLOPs 0, no linear_fwd launch), and move at most 4 rows of
    H bf16 and 96 bytes per kept entry (the weight row in the forward, the backward's recompute and d hidden; its
    d weight row; the id read thrice, z' written twice and read, g written and read, five int64 sort / run
    arrays) plus per row its hidden row, d hidden row and statistics (measured: 26,148 bytes for nnz 75)."""
    nnz, small = _gather_traffic(512)
    _, large = _gather_traffic(2048)
    assert [r["kernel"] for r in small] == ["_gather_fwd_kernel", "_gather_fwd_kernel", "_gather_dh_kernel",
                                            "_gather_dw_kernel"]
    total = lambda log: sum(r["requested_bytes"] for r in log)  # noqa: E731
    unique = lambda log: sum(r["loaded_bytes"] + r["stored_bytes"] for r in log)  # noqa: E731
    assert total(small) == total(large) and unique(small) == unique(large)
    assert sum(r["flops"] for r in small + large) == 0
    row_bytes = 2 * 32
    assert unique(small) <= nnz * (4 * row_bytes + 96) + 8 * (4 * row_bytes + 64), (unique(small), nnz)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    hidden, weight, bias, labels, ks, tau = kept_gradcheck_inputs(0.4)
    with fastppo.use_backend(backend):
        def lin(h, w, b):
            return fastppo.linear_logprobs(h, w, labels, bias=b, kept=ks, temperature=tau, kept_path="gather",
                                           final_logit_softcapping=3.0)

        assert torch.autograd.gradcheck(lin, (hidden, weight, bias), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_on_vocabulary_shards(backend):
    """The sharded linear ops' pieces on the kept-only path, without a process group: each shard's forward over
    its own kept ids (KeptArg start / size), combined as vocab_parallel.combine_shards does (by hand here), gives
    the unsharded log-probs; each shard's backward with the global kept statistics gives its d(weight) / d(bias)
    slice, and the shards' d(hidden) add up to the unsharded one."""
    from fastppo.linear_pipeline import linear_backward, linear_forward
    from fastppo.vocab_parallel import sentinel_label

    N = 9
    hidden, weight, bias, labels, ks = sparse_case(N, torch.float32, seed=9)
    g = upstream(N, -1.0, 1.5)
    want = run_linear(backend, "gather", hidden, weight, bias, labels, ks, g)
    opts = build_linear_options(1.0, -100, False, False, None, 1.0, None, backend, kept_path="gather")
    h2 = hidden.detach()
    parts = []
    for lo, hi in ((0, 90), (90, V)):
        owned = (labels >= lo) & (labels < hi)
        local = torch.where(owned, labels - lo, torch.where(labels == -100, labels, sentinel_label(-100)))
        karg = KeptArg(ks.ids, ks.offsets, lo, hi - lo)
        logp_r, lse_r, _, klse_r = linear_forward(h2, weight[lo:hi], bias[lo:hi], local, opts, None, karg)
        parts.append((lo, hi, owned, local, karg, logp_r, lse_r, klse_r))
    m_r = torch.stack([torch.where(p[7][:, 1] == float("-inf"), float("-inf"), p[7][:, 0]) for p in parts])
    m = m_r.amax(0)
    m = torch.where(m == float("-inf"), 0.0, m)
    a = torch.stack([(p[7][:, 0] - m) + p[7][:, 1] for p in parts])
    log_s = torch.log(torch.exp(a).sum(0))
    logp = sum(torch.where(p[2], p[5] + a[i], 0.0) for i, p in enumerate(parts)) - log_s
    live = labels != -100
    torch.testing.assert_close(torch.where(live, logp, 0.0), want[0], rtol=1e-5, atol=1e-5)
    klse = torch.stack((m, log_s), 1)
    dh, dws, dbs = 0, [], []
    for lo, hi, _, local, karg, _, lse_r, _ in parts:
        dh_r, dw_r, db_r = linear_backward(h2, weight[lo:hi], bias[lo:hi], local, lse_r, None, g.float(), None,
                                           opts, (True, True, True), None, karg, klse)
        dh, dws, dbs = dh + dh_r, dws + [dw_r], dbs + [db_r]
    torch.testing.assert_close(dh, want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(dws), want[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(dbs), want[3], rtol=1e-5, atol=1e-5)
