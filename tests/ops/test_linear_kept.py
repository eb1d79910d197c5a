"""linear_logprobs / fused_linear_ppo_loss with kept sets (kept=), per-token temperatures, rounded logits
(logits_dtype=) and the fp32 head (fp32_head=), on both backends, against the float64 reference of the
documented formula (fastppo.reference_kept: hidden @ weight.T, then the kept-set log-probs): values and
gradients to hidden / weight / bias with upstream gradients that are not all ones; kept sets with an empty row,
a single-token row and a full-vocabulary row; ignored labels, masks with holes, strided hidden, several chunks;
batch invariance; validation; the FLOPs / bytes a kept set adds (counters); float64 gradcheck."""

import pytest
import torch

import fastppo
from fastppo import KeptSet
from fastppo.reference_kept import kept_fused_linear_ppo_loss, kept_linear_logprobs
from tests.helpers import DEVICE, assert_close_by_dtype, kept_gradcheck_inputs

BACKENDS = ["triton", "torch"]
H, V = 16, 257


def kept_case(N, dtype, seed=0, strided=True):
    """hidden (a strided view when asked), weight, bias, labels (some ignored) and a KeptSet with an empty row
    (ignored label), a single-token row, a full-vocabulary row and random rows (~30 % kept)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, 2 * H, generator=g)
    hidden = (base[:, ::2] if strided else base[:, :H]).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.4).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.3).to(dtype)
    mask = torch.rand(N, V, generator=g) < 0.3
    mask[0] = False               # empty kept set (its label is ignored)
    mask[1] = False
    mask[1, 7] = True             # a single kept token
    mask[2] = True                # the whole vocabulary
    mask[:, 5] |= torch.arange(N) % 2 == 0
    labels = torch.multinomial(mask.float() + 1e-12, 1, generator=g)[:, 0]
    labels[0] = -100
    labels[torch.rand(N, generator=g) < 0.1] = -100
    return (hidden.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE), labels.to(DEVICE),
            KeptSet.from_mask(mask).to(DEVICE))


def upstream(n, a, b):
    return torch.linspace(a, b, n, dtype=torch.float64, device=DEVICE)


def close_grad(got, want, dtype):
    """Gradients are sums over V (d hidden) or N (d weight) of products whose dz the Triton path rounds to a
    16-bit GEMM dtype: fp32-level for fp32, 2 % of the largest entry for 16-bit inputs (as tests/ops/test_linear)."""
    if dtype in (torch.float32, torch.float64):
        assert_close_by_dtype(got, want, torch.float32, scale=10 * max(1.0, want.abs().max().item()))
    else:
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * scale)


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def _linear_vs_reference(backend, dtype, N, kw, ref_kw=None, entropy=True, chunk_bytes=None, kept=True):
    hidden, weight, bias, labels, ks = kept_case(N, dtype)
    ks = ks if kept else KeptSet.from_mask(torch.ones(N, V, dtype=torch.bool)).to(DEVICE)
    gl, ge = upstream(N, -1.5, 2.0), upstream(N, 0.7, -0.4)
    h, w, b = _leaves(hidden, weight, bias)
    with fastppo.use_backend(backend):
        lp, ent = fastppo.linear_logprobs(h, w, labels, bias=b, kept=ks if kept else None, return_entropy=True,
                                          chunk_bytes=chunk_bytes, **kw)
    ((lp * gl.float()).sum() + (ent * ge.float()).sum() * entropy).backward()
    h6, w6, b6 = _leaves(*(t.double() for t in (hidden, weight, bias)))
    rlp, rent = kept_linear_logprobs(h6, w6, labels, ks, bias=b6, return_entropy=True, **(ref_kw or kw))
    ((rlp * gl).sum() + (rent * ge).sum() * entropy).backward()
    live = labels != -100
    assert (lp[~live] == 0).all() and (h.grad[~live] == 0).all()
    assert_close_by_dtype(lp, rlp, torch.float32, scale=10)
    assert_close_by_dtype(ent, rent, torch.float32, scale=10)
    for got, want, t in zip((h.grad, w.grad, b.grad), (h6.grad, w6.grad, b6.grad), (hidden, weight, bias)):
        assert got.dtype == t.dtype
        close_grad(got, want, dtype)
    return ks, labels, w.grad, (lp, rlp)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_logprobs_kept_matches_float64(backend, dtype):
    tau = torch.rand(12, generator=torch.Generator().manual_seed(1)).to(DEVICE) + 0.5
    kw = dict(temperature=tau, final_logit_softcapping=4.0, logit_scale=1.2) if dtype == torch.float32 \
        else dict(temperature=0.8)
    _linear_vs_reference(backend, dtype, 12, kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_kept_several_chunks_and_kept_columns_only(backend):
    """70 rows over two chunks (the d(weight) / d(bias) sums carried across them); without the entropy term
    the gradient reaches only weight / bias rows that some live row keeps."""
    ks, labels, dw, _ = _linear_vs_reference(backend, torch.float32, 70, dict(temperature=1.1), entropy=False,
                                             chunk_bytes=1)
    live_mask = ks.to_mask(V)[labels.cpu() != -100].any(0).to(DEVICE)
    assert (dw[~live_mask] == 0).all() and (dw[live_mask] != 0).any()


def _fused_case(backend, kept, policy_loss="ppo", N=12):
    hidden, weight, bias, labels, ks = kept_case(N, torch.float32, seed=3)
    B, T = 2, N // 2
    g = torch.Generator().manual_seed(4)
    mask = (torch.rand(B, T, generator=g) > 0.25).to(DEVICE)
    mask[1, -1] = False
    old = (torch.randn(B, T, generator=g) * 0.2 - 3).to(DEVICE)
    adv = torch.randn(B, T, generator=g).to(DEVICE)
    tau = (torch.rand(B, T, generator=g) + 0.5).to(DEVICE)
    kw = dict(temperature=tau, entropy_coef=0.05, return_entropy=True, policy_loss=policy_loss, kl_coef=0.1,
              ref_logprobs=old + 0.1)
    ks = ks if kept else KeptSet.from_mask(torch.ones(N, V, dtype=torch.bool)).to(DEVICE)
    h, w, b = _leaves(hidden.view(B, T, H), weight, bias)
    y = labels.view(B, T)
    with fastppo.use_backend(backend):
        out = fastppo.fused_linear_ppo_loss(h, w, y, old, adv, mask, bias=b, kept=ks if kept else None,
                                            chunk_bytes=1, **kw)
    (out.loss * 1.7).backward()
    h6, w6, b6 = _leaves(hidden.view(B, T, H).double(), weight.double(), bias.double())
    ref = kept_fused_linear_ppo_loss(h6, w6, y, ks, old.double(), adv.double(), mask, bias=b6,
                                     **dict(kw, temperature=tau.double(), ref_logprobs=(old + 0.1).double()))
    (ref.loss * 1.7).backward()
    assert_close_by_dtype(out.loss, ref.loss, torch.float32, scale=10)
    assert_close_by_dtype(out.logprobs, torch.where(mask, ref.logprobs, 0), torch.float32, scale=10)
    assert_close_by_dtype(out.entropy, torch.where(mask, ref.entropy, 0), torch.float32, scale=10)
    for got, want in zip((h.grad, w.grad, b.grad), (h6.grad, w6.grad, b6.grad)):
        close_grad(got, want, torch.float32)
    assert (h.grad[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kept", [True, False])
def test_fused_linear_ppo_loss_kept_and_per_token_temperature(backend, kept):
    _fused_case(backend, kept)


def test_fused_linear_ppo_loss_kept_recompute_path():
    """A sequence-level loss (gspo) takes the recompute path (forward, then the gradient pass) with kept sets."""
    _fused_case("triton", True, policy_loss="gspo")


# ----------------------------------------------------------------------------- logits_dtype, fp32_head
def _exact_inputs(N, dtype=torch.float32, seed=5):
    """hidden / weight in steps of 1/8 and 1/16: every product and sum is exact in fp32 and fp64, so the
    rounding to bf16 / fp16 sees the same logit on every path."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-8, 9, (N, H), generator=g) / 8.0
    weight = torch.randint(-8, 9, (V, H), generator=g) / 16.0
    bias = torch.randint(-512, 513, (V,), generator=g) / 1024.0   # 1/1024 steps: fp16 rounds them too
    labels = torch.randint(0, V, (N,), generator=g)
    labels[3] = -100
    return [t.to(dtype).to(DEVICE) for t in (hidden, weight, bias)] + [labels.to(DEVICE)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("logits_dtype", [torch.bfloat16, torch.float16])
def test_logits_dtype_rounds_each_logit(backend, logits_dtype):
    N = 10
    hidden, weight, bias, labels = _exact_inputs(N)
    ks = KeptSet.from_mask(torch.ones(N, V, dtype=torch.bool)).to(DEVICE)
    gl, ge = upstream(N, -1.0, 1.5), upstream(N, 0.3, -0.9)
    h, w, b = _leaves(hidden, weight, bias)
    with fastppo.use_backend(backend):
        lp, ent = fastppo.linear_logprobs(h, w, labels, bias=b, return_entropy=True, temperature=0.7,
                                          logits_dtype=logits_dtype)
        plain = fastppo.linear_logprobs(hidden, weight, labels, bias=bias, temperature=0.7)
    ((lp * gl.float()).sum() + (ent * ge.float()).sum()).backward()
    h6, w6, b6 = _leaves(hidden.double(), weight.double(), bias.double())
    rlp, rent = kept_linear_logprobs(h6, w6, labels, ks, bias=b6, return_entropy=True, temperature=0.7,
                                     logits_dtype=logits_dtype)
    ((rlp * gl).sum() + (rent * ge).sum()).backward()
    assert_close_by_dtype(lp, rlp, torch.float32)
    assert_close_by_dtype(ent, rent, torch.float32)
    assert (lp - plain).abs().max() > 2e-5       # the rounding is visible (10x the tolerance): the test can fail
    for got, want in zip((h.grad, w.grad, b.grad), (h6.grad, w6.grad, b6.grad)):
        close_grad(got, want, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_ppo_loss_logits_dtype_with_kept(backend):
    """Rounded logits and a kept set together in the fused loss (gradient formed in forward), entropy on."""
    N = 10
    hidden, weight, bias, labels = _exact_inputs(N)
    g = torch.Generator().manual_seed(6)
    kmask = torch.rand(N, V, generator=g) < 0.4
    kmask[torch.arange(N), labels.clamp(min=0).cpu()] = True
    ks = KeptSet.from_mask(kmask).to(DEVICE)
    mask = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    mask[0, 1] = False
    old, adv = torch.full((2, 5), -4.0, device=DEVICE), upstream(N, -1.0, 1.0).float().view(2, 5)
    kw = dict(kept=ks, logits_dtype=torch.bfloat16, entropy_coef=0.1, temperature=0.9)
    h, w = _leaves(hidden.view(2, 5, H), weight)
    with fastppo.use_backend(backend):
        out = fastppo.fused_linear_ppo_loss(h, w, labels.view(2, 5), old, adv, mask, **kw)
    out.loss.backward()
    h6, w6 = _leaves(hidden.view(2, 5, H).double(), weight.double())
    ref = kept_fused_linear_ppo_loss(h6, w6, labels.view(2, 5), ks, old.double(), adv.double(), mask,
                                     **{k: v for k, v in kw.items() if k != "kept"})
    ref.loss.backward()
    assert_close_by_dtype(out.loss, ref.loss, torch.float32, scale=10)
    assert_close_by_dtype(out.logprobs, torch.where(mask, ref.logprobs, 0), torch.float32, scale=10)
    for got, want in zip((h.grad, w.grad), (h6.grad, w6.grad)):
        close_grad(got, want, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_head_with_bf16_inputs(backend):
    """fp32_head: bf16 hidden / weight multiplied in fp32, the gradient dz kept in fp32: the gradients' only
    error is their final rounding to bf16 (assert_close_by_dtype's bound), log-probs at fp32 accuracy."""
    N = 70
    hidden, weight, bias, labels = _exact_inputs(N)
    hidden = (hidden + torch.randn(N, H, device=DEVICE) * 0.1).to(torch.bfloat16)
    weight = (weight + torch.randn(V, H, device=DEVICE) * 0.1).to(torch.bfloat16)
    gl = upstream(N, -1.0, 1.5)
    h, w = _leaves(hidden, weight)
    with fastppo.use_backend(backend):
        lp = fastppo.linear_logprobs(h, w, labels, fp32_head=True, chunk_bytes=1)
    (lp * gl.float()).sum().backward()
    h6, w6 = _leaves(hidden.double(), weight.double())
    ks = KeptSet.from_mask(torch.ones(N, V, dtype=torch.bool)).to(DEVICE)
    rlp = kept_linear_logprobs(h6, w6, labels, ks)
    (rlp * gl).sum().backward()
    assert_close_by_dtype(lp, rlp, torch.float32)
    for got, want in zip((h.grad, w.grad), (h6.grad, w6.grad)):
        assert got.dtype == torch.bfloat16
        assert_close_by_dtype(got, want, torch.bfloat16)


# ----------------------------------------------------------------------------- batch invariance
@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_rows_are_batch_invariant(backend):
    """Row 9's kept log-prob, entropy and d(hidden) are bitwise the same alone, among 70 rows and with another
    chunk size."""
    hidden, weight, bias, labels, ks = kept_case(70, torch.float32, strided=False)
    mask = ks.to_mask(V).to(DEVICE)
    g = upstream(70, -1.0, 2.0).float()

    def run(rows, chunk_bytes):
        h = hidden[rows].clone().requires_grad_()
        sub = KeptSet.from_mask(mask[rows].cpu()).to(DEVICE)
        with fastppo.use_backend(backend):
            lp, ent = fastppo.linear_logprobs(h, weight, labels[rows], bias=bias, kept=sub, return_entropy=True,
                                              chunk_bytes=chunk_bytes)
        (lp * g[rows] + ent).sum().backward()
        return lp, ent, h.grad

    alone = run(torch.tensor([9], device=DEVICE), None)
    among = run(torch.arange(70, device=DEVICE), None)
    chunked = run(torch.arange(70, device=DEVICE), 1)
    for a, b, c in zip(alone, among, chunked):
        assert torch.equal(a[0], b[9]) and torch.equal(a[0], c[9])


# ----------------------------------------------------------------------------- validation
def test_validation():
    hidden, weight, bias, labels, ks = kept_case(12, torch.float32)
    bad = labels.clone()
    bad[4] = int((~ks.to_mask(V)[4]).nonzero()[0])
    with pytest.raises(ValueError, match="not in its row's kept set"):
        fastppo.linear_logprobs(hidden, weight, bad, kept=ks)
    mask = torch.ones(2, 6, dtype=torch.bool, device=DEVICE)
    args = (hidden.view(2, 6, H), weight, bad.view(2, 6), torch.zeros(2, 6, device=DEVICE),
            torch.ones(2, 6, device=DEVICE))
    with pytest.raises(ValueError, match="not in its row's kept set"):
        fastppo.fused_linear_ppo_loss(*args, mask, kept=ks)
    mask[0, 4] = False            # a dead row's label is never read: no error
    fastppo.fused_linear_ppo_loss(*args, mask, kept=ks)
    with pytest.raises(ValueError, match="rows"):
        fastppo.linear_logprobs(hidden[:5], weight, labels[:5], kept=ks)
    with pytest.raises(TypeError, match="KeptSet"):
        fastppo.linear_logprobs(hidden, weight, labels, kept=ks.to_mask(V))
    with pytest.raises(ValueError, match="logits_dtype"):
        fastppo.linear_logprobs(hidden, weight, labels, logits_dtype=torch.float32)
    with pytest.raises(TypeError, match="logits_dtype"):
        fastppo.fused_linear_ppo_loss(*args, mask, logits_dtype="bf16")
    with pytest.raises(TypeError, match="fp32_head"):
        fastppo.linear_logprobs(hidden, weight, labels, fp32_head=1)
    with pytest.raises(ValueError, match="temperature shape"):
        fastppo.fused_linear_ppo_loss(*args, mask, temperature=torch.ones(12, device=DEVICE))


# ----------------------------------------------------------------------------- counters
def _traffic(op, kept, hidden, weight, labels):
    from fastppo.bench.counters import TritonLaunches

    h, w = _leaves(hidden, weight)
    rec = TritonLaunches()
    with rec.count():
        if op == "linear_logprobs":
            fastppo.linear_logprobs(h, w, labels, kept=kept).sum().backward()
        else:
            n = labels.numel()
            fastppo.fused_linear_ppo_loss(h.view(4, n // 4, -1), w, labels.view(4, -1),
                                          torch.full((4, n // 4), -3.0, device=DEVICE),
                                          upstream(n, -1.0, 1.0).float().view(4, -1),
                                          torch.ones(4, n // 4, dtype=torch.bool, device=DEVICE),
                                          kept=kept).loss.backward()
    return sum(r["flops"] for r in rec.log), sum(r["loaded_bytes"] + r["stored_bytes"] for r in rec.log)


@pytest.mark.parametrize("op", ["linear_logprobs", "fused_linear_ppo_loss"])
def test_kept_adds_no_gemm_pass(op):
    """tl.dot FLOPs are the same with and without a kept set (no GEMM pass added: the kept launches read the
    chunk's z' buffer); the bytes added are at most 48 per kept entry (ids, z', the kept gradient and its
    scatter) and 64 per row, plus for linear_logprobs the forward's z' buffer (4 N V: without a kept set its
    forward needs no buffer). Measured at N = 64, H = 64, V = 512, bf16, 10 % kept (nnz 3298): linear_logprobs
    25.2 MFLOP both, 764,464 -> 1,040,500 bytes; fused_linear_ppo_loss 21.0 MFLOP both, 692,896 -> 837,860."""
    N, Hd, Vd = 64, 64, 512
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, Hd, generator=g).bfloat16().to(DEVICE)
    weight = (torch.randn(Vd, Hd, generator=g) * 0.2).bfloat16().to(DEVICE)
    mask = torch.rand(N, Vd, generator=g) < 0.1
    labels = torch.multinomial(mask.float() + 1e-12, 1, generator=g)[:, 0].to(DEVICE)
    ks = KeptSet.from_mask(mask).to(DEVICE)
    flops, plain = _traffic(op, None, hidden, weight, labels)
    flops_k, with_kept = _traffic(op, ks, hidden, weight, labels)
    assert flops == flops_k > 0
    bound = 48 * ks.nnz + 64 * N + (4 * N * Vd if op == "linear_logprobs" else 0)
    assert plain < with_kept <= plain + bound, (plain, with_kept, bound)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    """float64 gradcheck of linear_logprobs(kept=, per-token temperature, softcap) with entropy and of
    fused_linear_ppo_loss(kept=) (fast mode: a random projection of the Jacobian)."""
    hidden, weight, bias, labels, ks, tau = kept_gradcheck_inputs(0.5)
    with fastppo.use_backend(backend):
        def lin(h, w, b):
            lp, ent = fastppo.linear_logprobs(h, w, labels, bias=b, kept=ks, temperature=tau, return_entropy=True,
                                              final_logit_softcapping=3.0)
            return lp, ent

        def fused(h, w, b):
            return fastppo.fused_linear_ppo_loss(h.view(2, 2, -1), w, labels.view(2, 2), torch.full((2, 2), -2.0,
                                                 dtype=torch.float64, device=DEVICE),
                                                 torch.tensor([[1.0, -0.5], [0.3, 2.0]], dtype=torch.float64,
                                                              device=DEVICE),
                                                 torch.ones(2, 2, dtype=torch.bool, device=DEVICE), bias=b, kept=ks,
                                                 temperature=tau.view(2, 2), entropy_coef=0.1).loss

        assert torch.autograd.gradcheck(lin, (hidden, weight, bias), fast_mode=True)
        assert torch.autograd.gradcheck(fused, (hidden, weight, bias), fast_mode=True)
