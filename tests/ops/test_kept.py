"""KeptSet (validation, converters, vLLM's filters) and the kept-set log-prob launchers (Triton kernels in the
interpreter and the PyTorch twin) against the float64 reference."""

import pytest
import torch

from fastppo import KeptSet
from fastppo import kept_torch as twin
from fastppo.bench.counters import KernelTraffic
from fastppo.kept_filters import kept_mask_from_filters
from fastppo.kernels import kept as kern
from fastppo.reference_kept import kept_token_logprobs
from tests.helpers import DEVICE, assert_close_by_dtype

BACKENDS = {"triton": kern, "torch": twin}


# ----------------------------------------------------------------------------- KeptSet
def _i64(*x):
    return torch.tensor(x, dtype=torch.int64)


@pytest.mark.parametrize("ids, offsets, V, match", [
    (torch.tensor([1.0]), _i64(0, 1), None, "ids must be int32 or int64"),
    (_i64(1), torch.tensor([0, 1], dtype=torch.int32), None, "offsets must be int64"),
    (_i64(1, 2), _i64(1, 2), None, r"offsets\[0\] must be 0"),
    (_i64(1, 2), _i64(0, 1), None, r"offsets\[-1\] must equal nnz = ids.numel\(\) = 2"),
    (_i64(1, 2, 3), _i64(0, 2, 1, 3), None, "non-decreasing"),
    (_i64(1, 7), _i64(0, 2), 5, r"ids must lie in \[0, 5\), got 7"),
    (_i64(-1, 2), _i64(0, 2), None, "got -1"),
    (_i64(3, 1, 1), _i64(0, 1, 3), None, "duplicate id 1 in row 1"),
    (_i64(1), torch.zeros(0, dtype=torch.int64), None, "rows \\+ 1 >= 1"),
])
def test_keptset_rejects_bad_input(ids, offsets, V, match):
    with pytest.raises(ValueError, match=match):
        KeptSet(ids, offsets, V)


def test_keptset_mask_round_trip_and_views():
    mask = torch.rand(3, 4, 37) < 0.3
    mask[1, 2] = False                                   # an empty row
    ks = KeptSet.from_mask(mask)
    assert ks.rows == 12 and ks.nnz == int(mask.sum()) and ks.vocab_size == 37
    assert torch.equal(ks.to_mask().view_as(mask), mask)
    assert torch.equal(ks.to(DEVICE).to_mask(), ks.to_mask().to(DEVICE))
    assert int(ks.counts()[1 * 4 + 2]) == 0
    with pytest.raises(AttributeError):
        ks.ids = ks.ids                                  # frozen


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_keptset_sorts_ids_within_rows(dtype):
    lists = [[9, 3, 7], [], [4, 1], [6], [8, 0, 5, 2]]
    ks = KeptSet(torch.tensor([t for r in lists for t in r], dtype=dtype), _i64(0, 3, 3, 5, 6, 10))
    assert ks.ids.dtype == dtype and ks.ids.tolist() == [t for r in lists for t in sorted(r)]
    ordered = KeptSet.from_mask(ks.to_mask(10))
    assert torch.equal(ordered.ids, ks.ids.long())
    assert KeptSet(ordered.ids, ordered.offsets).ids is ordered.ids          # already ascending: kept as is


def test_keptset_converters():
    lists = [[5, 2], [], [0, 1, 9]]
    ks = KeptSet.from_lists(lists, vocab_size=10)
    assert ks.offsets.tolist() == [0, 2, 2, 5] and ks.ids.tolist() == [2, 5, 0, 1, 9]     # ascending per row
    assert torch.equal(KeptSet.from_lengths(ks.ids.int(), torch.tensor([2, 0, 3], dtype=torch.int32)).offsets,
                       ks.offsets)
    # two requests of 2 and 1 generated tokens into labels [2, 4] with responses at positions 1 and 2
    a, b = KeptSet.from_lists([[1], [2, 3]], vocab_size=10), KeptSet.from_lists([[4, 5, 6]], vocab_size=10)
    placed = KeptSet.from_sequences([b, a], row_starts=[4 + 2, 1], n_rows=8)
    assert placed.counts().tolist() == [0, 1, 2, 0, 0, 0, 3, 0]
    assert placed.ids.tolist() == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="overlaps"):
        KeptSet.from_sequences([a, a], row_starts=[0, 1], n_rows=8)
    with pytest.raises(ValueError, match="outside"):
        KeptSet.from_sequences([a], row_starts=[7], n_rows=8)


# ----------------------------------------------------------------------------- vLLM's filters
def _vllm_rowwise(z, tau, k, p, mp):
    """The V1 sampler's steps written out for one fp32 row, with Python-level loops where possible."""
    x = z.float() / tau
    V = x.numel()
    if mp is not None:
        probs = torch.softmax(x, -1)
        x = torch.where(probs < probs.max() * torch.tensor(mp, dtype=torch.float32), float("-inf"), x)
    order = sorted(range(V), key=lambda i: (x[i].item(), i))          # ascending; ties by id
    vals = torch.stack([x[i] for i in order])
    if k is not None and 0 < k < V:
        vals = torch.where(vals < vals[V - k], float("-inf"), vals)
    if p is not None and p < 1.0:
        cum = torch.cumsum(torch.softmax(vals, -1), -1)
        drop = cum <= 1 - torch.tensor(p, dtype=torch.float32)
        drop[-1] = False
        vals = torch.where(drop, float("-inf"), vals)
    kept = torch.zeros(V, dtype=torch.bool)
    for pos, i in enumerate(order):
        kept[i] = bool(vals[pos] > float("-inf"))
    return kept


def test_filters_worked_example():
    z = torch.tensor([[3.0, 1.0, 4.0, 0.0, 2.0, -1.0]])
    assert kept_mask_from_filters(z, top_k=3, top_p=0.8)[0].nonzero().flatten().tolist() == [0, 2]
    assert kept_mask_from_filters(z, top_k=3)[0].nonzero().flatten().tolist() == [0, 2, 4]


def test_filters_ties():
    z = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # top-k keeps every id tied with the k-th largest logit (vLLM's `< threshold` mask)
    assert kept_mask_from_filters(z[:1], top_k=2)[0].tolist() == [True, True, True, False]
    # top-p over 4 equal probabilities: the ascending cumsum 0.25, 0.5 <= 1 - 0.5 drops the first two in the
    # stable order, i.e. the lower ids
    assert kept_mask_from_filters(z[1:], top_p=0.5)[0].tolist() == [False, False, True, True]


@pytest.mark.parametrize("case", range(6))
def test_filters_match_the_samplers_steps(case):
    g = torch.Generator().manual_seed(case)
    n, V = 5, 97
    z = torch.randn(n, V, generator=g) * 2
    z[0, :7] = z[0, 10]                                   # ties
    tau = [1.0, 0.7, 1.3][case % 3]
    k = [None, 5, 40][case % 3]
    p = [0.8, None, 0.95, 0.5, 1.0, 0.3][case]
    mp = [None, 0.1, None, 0.05, 0.2, None][case]
    got = kept_mask_from_filters(z, temperature=tau, top_k=k, top_p=p, min_p=mp)
    for r in range(n):
        assert torch.equal(got[r], _vllm_rowwise(z[r], tau, k, p, mp)), r


def test_filters_per_row_parameters_and_greedy():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 61, generator=g) * 2
    tau = torch.tensor([1.0, 0.5, 0.0, 2.0])
    k = torch.tensor([0, 10, 3, 61])
    p = torch.tensor([0.9, 1.0, 0.5, 0.7])
    mp = torch.tensor([0.0, 0.1, 0.0, 0.02])
    got = KeptSet.from_filters(z, temperature=tau, top_k=k, top_p=p, min_p=mp)
    mask = got.to_mask()
    assert mask[2].nonzero().flatten().tolist() == [int(z[2].argmax())]      # tau 0: greedy, the argmax only
    for r in (0, 1, 3):
        kk = int(k[r]) if 0 < int(k[r]) < 61 else None
        assert torch.equal(mask[r], _vllm_rowwise(z[r], float(tau[r]), kk, float(p[r]), float(mp[r]))), r
    with pytest.raises(ValueError, match="top_p must lie in"):
        kept_mask_from_filters(z, top_p=torch.tensor([0.5, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="one value per row"):
        kept_mask_from_filters(z, top_k=torch.tensor([1, 2]))


# ----------------------------------------------------------------------------- launchers vs float64
def _case(dtype, V=1031, lead=(3, 5), scale=3.0, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*lead, V, generator=g) * scale + offset).to(dtype).to(DEVICE)
    mask = kept_mask_from_filters(logits.float().cpu(), top_p=0.9, top_k=200)
    labels = torch.multinomial(mask.reshape(-1, V).float(), 1, generator=g).reshape(lead)
    labels.view(-1)[1] = -100                            # ignored
    mask.view(-1, V)[2] = False                          # empty kept set with an ignored label
    labels.view(-1)[2] = -100
    labels.view(-1)[4] = int((~mask.view(-1, V)[4]).nonzero()[0])   # a label outside its kept set: NaN
    mask.view(-1, V)[6] = False                          # an empty kept set with a valid label: NaN
    return logits, labels.to(DEVICE), KeptSet.from_mask(mask).to(DEVICE)


def _check(backend, logits, labels, ks, dtype, temperature, with_entropy, scale=1.0):
    mod = BACKENDS[backend]
    ids = ks.ids.int() if backend == "triton" else ks.ids
    x = logits.detach().clone().double().requires_grad_()
    ref = kept_token_logprobs(x, labels, ks, temperature=temperature, return_entropy=with_entropy)
    ref_lp, ref_ent = (r.reshape(-1) for r in ref) if with_entropy else (ref.reshape(-1), None)
    st = mod.kept_logprobs_fwd(logits, labels, ids, ks.offsets, temperature=temperature,
                               with_entropy=with_entropy)
    nan = torch.isnan(ref_lp)
    assert torch.equal(torch.isnan(st.logp).cpu(), nan.cpu())
    assert nan.any()
    assert_close_by_dtype(st.logp[~nan], ref_lp[~nan], dtype, scale=scale)
    g = torch.linspace(-1.5, 2.0, labels.numel(), dtype=torch.float64, device=DEVICE)
    g = torch.where(nan, 0.0, g)
    ge = torch.linspace(0.7, -0.4, labels.numel(), dtype=torch.float64, device=DEVICE)
    loss = (torch.where(nan, 0.0, ref_lp) * g).sum()
    if with_entropy:
        assert_close_by_dtype(st.entropy, ref_ent, dtype, scale=scale)
        loss = loss + (ref_ent * ge).sum()
    loss.backward()
    up = torch.float64 if dtype == torch.float64 else torch.float32
    grad = mod.kept_logprobs_bwd(logits, labels, ids, ks.offsets, st, g.to(up),
                                 ge.to(up) if with_entropy else None, temperature=temperature)
    assert grad.shape == logits.shape and grad.dtype == logits.dtype
    live = ~nan
    V = logits.shape[-1]
    assert_close_by_dtype(grad.reshape(-1, V)[live], x.grad.reshape(-1, V)[live], dtype)
    assert (grad.reshape(-1, V)[labels.reshape(-1) == -100] == 0).all()
    if not with_entropy:
        outside = ~ks.to_mask(V)
        assert (grad.reshape(-1, V)[outside & live[:, None]] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_launchers_match_float64(backend, dtype, with_entropy):
    logits, labels, ks = _case(dtype)
    _check(backend, logits, labels, ks, dtype, 0.7, with_entropy)


def _sweep_case():
    """V = 2100 (three 1024-column tiles under the interpreter) and kept sets that exercise the entropy path's
    single sweep: more ids than one 256-id chunk, the whole vocabulary, ids in the last tile only, a chunk that
    ends exactly at a tile edge, the last column alone, an empty row, a label outside its set."""
    V = 2100
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(8, V, generator=g) * 2
    mask = torch.zeros(8, V, dtype=torch.bool)
    mask[0] = torch.rand(V, generator=g) < 0.3
    mask[1] = True
    mask[2, 2048:] = True
    mask[3, 768:1025] = True
    mask[4, V - 1] = True
    mask[6] = torch.rand(V, generator=g) < 0.15
    mask[7, :256] = True
    mask[7, 2000:2010] = True
    labels = torch.multinomial(mask.float() + (~mask.any(-1, keepdim=True)).float(), 1, generator=g)[:, 0]
    labels[5] = -100
    labels[6] = int((~mask[6]).nonzero()[0])
    return logits.to(DEVICE), labels.to(DEVICE), KeptSet.from_mask(mask).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_kept_sets_across_tiles_and_chunks(backend, with_entropy):
    logits, labels, ks = _sweep_case()
    assert int(ks.counts().max()) > 2 * 256
    _check(backend, logits, labels, ks, torch.float32, 0.9, with_entropy)


def test_entropy_sweep_agrees_with_the_kept_gather():
    logits, labels, ks = _sweep_case()
    a = kern.kept_logprobs_fwd(logits, labels, ks.ids.int(), ks.offsets)
    b = kern.kept_logprobs_fwd(logits, labels, ks.ids, ks.offsets, with_entropy=True)
    for x, y in ((a.logp, b.logp), (a.m, b.m), (a.log_s, b.log_s)):
        torch.testing.assert_close(x, y, rtol=2e-6, atol=2e-6, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_ids_outside_the_vocabulary_are_skipped(backend, with_entropy):
    """A shard's launch: ids shifted by the shard start fall outside [0, V) on both sides and are skipped,
    forward and backward; raw_stats gives the shard's kept statistics (-inf, -inf for a row keeping nothing)."""
    logits, labels, ks = _sweep_case()
    mod = BACKENDS[backend]
    V = logits.shape[-1]
    lo, hi = 700, 1500
    shard = logits[:, lo:hi]
    local = torch.where((labels >= lo) & (labels < hi), labels - lo, -1)
    local[5] = -100
    st = mod.kept_logprobs_fwd(shard, local, ks.ids - lo, ks.offsets, with_entropy=with_entropy, raw_stats=True)
    sub = ks.to_mask(V)[:, lo:hi]
    z = torch.where(sub, shard.double(), float("-inf"))
    m = z.amax(-1)
    want_log_s = torch.logsumexp(z - torch.where(m == float("-inf"), 0.0, m)[:, None], -1)
    live = local != -100
    torch.testing.assert_close(st.m[live].double(), m[live], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(st.log_s[live].double(), want_log_s[live], rtol=1e-6, atol=1e-6)
    assert st.m[2] == float("-inf") and st.log_s[2] == float("-inf")       # row 2 keeps only columns >= 2048
    found = sub.gather(1, local.clamp(min=0)[:, None])[:, 0] & (local >= 0)
    assert torch.equal(torch.isnan(st.logp), live & ~found)
    c = torch.linspace(-1.0, 1.0, 8, device=DEVICE)
    grad = mod.kept_logprobs_bwd(shard, local, ks.ids - lo, ks.offsets, st._replace(log_s=torch.where(
        st.log_s == float("-inf"), 0.0, st.log_s)), c, temperature=1.0)
    assert (grad[~sub] == 0).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_temperature(backend):
    logits, labels, ks = _case(torch.float32)
    tau = torch.rand(labels.shape, device=DEVICE) + 0.5
    _check(backend, logits, labels, ks, torch.float32, tau, True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views(backend):
    logits, labels, ks = _case(torch.float32, lead=(3, 6))
    shifted = logits[:, :-1, :]                                          # row stride != V * n_inner
    lab = labels[:, :-1]
    sub = KeptSet.from_mask(ks.to_mask(1031).view(3, 6, -1)[:, :-1, :].cpu()).to(DEVICE)
    _check(backend, shifted, lab, sub, torch.float32, 1.0, True)
    trans = logits.reshape(18, -1).t().contiguous().t()                  # last dim not contiguous
    _check(backend, trans, labels.reshape(18), ks, torch.float32, 1.0, False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits_are_exact(backend):
    logits, labels, ks = _case(torch.float32, offset=3e4)
    # the kept-set part is exact at any magnitude (m_K, log s_K saved apart); the entropy term's gradient uses
    # the saved full-vocabulary lse, as the plain op does
    _check(backend, logits, labels, ks, torch.float32, 1.0, False, scale=1e4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_outside_the_kept_set_changes_nothing(backend):
    logits, labels, ks = _case(torch.float32)
    mod = BACKENDS[backend]
    poisoned = logits.clone().reshape(-1, 1031)
    poisoned[~ks.to_mask(1031)] = float("nan")
    a = mod.kept_logprobs_fwd(logits, labels, ks.ids, ks.offsets)
    b = mod.kept_logprobs_fwd(poisoned.view_as(logits), labels, ks.ids, ks.offsets)
    assert torch.allclose(a.logp, b.logp, rtol=0, atol=0, equal_nan=True)      # bitwise, NaN rows alike


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_are_batch_invariant(backend):
    logits, labels, ks = _case(torch.float32)
    mod = BACKENDS[backend]
    full = mod.kept_logprobs_fwd(logits, labels, ks.ids, ks.offsets, with_entropy=True)
    r = 7
    a, b = int(ks.offsets[r]), int(ks.offsets[r + 1])
    one = mod.kept_logprobs_fwd(logits.reshape(-1, 1031)[r:r + 1], labels.reshape(-1)[r:r + 1], ks.ids[a:b],
                                torch.tensor([0, b - a], device=DEVICE), with_entropy=True)
    for f in ("logp", "m", "log_s", "lse", "entropy"):
        assert torch.equal(getattr(full, f)[r:r + 1], getattr(one, f)), f


def test_forward_bytes_grow_with_nnz_not_vocab():
    def traffic(V, keep):
        logits = torch.randn(8, V, device=DEVICE)
        mask = torch.zeros(8, V, dtype=torch.bool)
        mask[:, :keep] = True
        ks = KeptSet.from_mask(mask).to(DEVICE)
        t = KernelTraffic()
        with t.count():
            kern.kept_logprobs_fwd(logits, torch.zeros(8, dtype=torch.long, device=DEVICE), ks.ids, ks.offsets)
        return t.total

    small, large = traffic(1031, 40), traffic(8209, 40)
    assert small == large
    # per row: label 8 + offsets 2 x 8 + 40 ids x 8 + 40 kept logits x 4 + the label's logit 4 + 3 outputs x 4
    assert small == 8 * (8 + 16 + 40 * 8 + 40 * 4 + 4 + 12)
    assert traffic(1031, 80) > small


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_row", [False, True])
def test_logit_transform(backend, per_row):
    logits, labels, ks = _case(torch.float32)
    mod = BACKENDS[backend]
    tau = torch.rand(labels.shape, device=DEVICE) + 0.5 if per_row else 0.8
    for scale, cap in ((0.5, None), (1.3, 4.0)):
        x = logits.detach().clone().double().requires_grad_()
        ref_lp, ref_ent = kept_token_logprobs(x, labels, ks, temperature=tau, return_entropy=True,
                                              logit_scale=scale, final_logit_softcapping=cap)
        st = mod.kept_logprobs_fwd(logits, labels, ks.ids, ks.offsets, temperature=tau, with_entropy=True,
                                   logit_scale=scale, softcap=cap)
        ok = ~torch.isnan(ref_lp.reshape(-1))
        assert_close_by_dtype(st.logp[ok], ref_lp.reshape(-1)[ok], torch.float32)
        assert_close_by_dtype(st.entropy, ref_ent.reshape(-1), torch.float32)
        g = torch.linspace(-1.5, 2.0, labels.numel(), dtype=torch.float64, device=DEVICE) * ok
        ge = torch.linspace(0.7, -0.4, labels.numel(), dtype=torch.float64, device=DEVICE)
        ((torch.where(ok, ref_lp.reshape(-1), 0.0) * g).sum() + (ref_ent.reshape(-1) * ge).sum()).backward()
        grad = mod.kept_logprobs_bwd(logits, labels, ks.ids, ks.offsets, st, g.float(), ge.float(),
                                     temperature=tau, logit_scale=scale, softcap=cap)
        V = logits.shape[-1]
        assert_close_by_dtype(grad.reshape(-1, V)[ok], x.grad.reshape(-1, V)[ok], torch.float32)
