"""token_logprobs(kept=, temperature=tensor) at the public-op level against the float64 reference, on both
backends: values and gradients (upstream not all ones), fp32 / bf16, V = 1031, strided views, ignored labels,
empty kept rows, the logit transform; validation; the bytes of a forward without entropy."""

import pytest
import torch

import fastppo
from fastppo import KeptSet
from fastppo.bench.counters import KernelTraffic
from fastppo.kept_filters import kept_mask_from_filters
from fastppo.library import encode
from fastppo.options import LogprobOptions, LossOptions
from fastppo.reference_kept import kept_fused_ppo_loss, kept_token_logprobs
from tests.helpers import DEVICE, assert_close_by_dtype

BACKENDS = ["triton", "torch"]
V = 1031


def kept_case(dtype, lead=(3, 5), seed=0):
    """Logits, labels (one ignored, one ignored row with an empty kept set) and the KeptSet of top-k / top-p."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*lead, V, generator=g) * 3).to(dtype)
    mask = kept_mask_from_filters(logits.float(), top_p=0.9, top_k=200)
    labels = torch.multinomial(mask.reshape(-1, V).float(), 1, generator=g).reshape(lead)
    labels.view(-1)[1] = -100
    mask.view(-1, V)[2] = False
    labels.view(-1)[2] = -100
    return logits.to(DEVICE), labels.to(DEVICE), KeptSet.from_mask(mask).to(DEVICE)


def _compare(backend, logits, labels, ks, dtype, **kw):
    x = logits.detach().clone().double().requires_grad_()
    rlp, rent = kept_token_logprobs(x, labels, ks, return_entropy=True, **kw)
    gl = torch.linspace(-1.5, 2.0, labels.numel(), dtype=torch.float64, device=DEVICE).view(labels.shape)
    ge = torch.linspace(0.7, -0.4, labels.numel(), dtype=torch.float64, device=DEVICE).view(labels.shape)
    ((rlp * gl).sum() + (rent * ge).sum()).backward()
    y = logits.detach().clone().requires_grad_()
    with fastppo.use_backend(backend):
        lp, ent = fastppo.token_logprobs(y, labels, kept=ks, return_entropy=True, **kw)
    assert_close_by_dtype(lp, rlp, dtype)
    assert_close_by_dtype(ent, rent, dtype)
    ((lp * gl.float()).sum() + (ent * ge.float()).sum()).backward()
    assert_close_by_dtype(y.grad, x.grad, dtype)
    assert (y.grad.reshape(-1, logits.shape[-1])[labels.reshape(-1) == -100] == 0).all()
    # without the entropy, the gradient reaches the kept columns only
    z = logits.detach().clone().requires_grad_()
    with fastppo.use_backend(backend):
        (fastppo.token_logprobs(z, labels, kept=ks, **kw) * gl.float()).sum().backward()
    outside = ~ks.to_mask(logits.shape[-1])
    assert (z.grad.reshape(-1, logits.shape[-1])[outside] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_kept_matches_float64(backend, dtype):
    logits, labels, ks = kept_case(dtype)
    _compare(backend, logits, labels, ks, dtype, temperature=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_temperature_and_transform(backend):
    logits, labels, ks = kept_case(torch.float32)
    tau = torch.rand(labels.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE) + 0.5
    _compare(backend, logits, labels, ks, torch.float32, temperature=tau, logit_scale=1.3,
             final_logit_softcapping=5.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_view(backend):
    logits, labels, ks = kept_case(torch.float32, lead=(3, 6))
    sub = KeptSet.from_mask(ks.to_mask(V).view(3, 6, V)[:, :-1].cpu()).to(DEVICE)
    _compare(backend, logits[:, :-1], labels[:, :-1], sub, torch.float32, temperature=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_and_opcheck(backend):
    logits, labels, ks = kept_case(torch.float32)
    tau = torch.full(labels.shape, 0.9, device=DEVICE)
    args = (logits.requires_grad_(), labels, ks.ids, ks.offsets, tau, 1.0, -100, True, 1.0, None, backend)
    torch.library.opcheck(torch.ops.fastppo.token_logprobs_kept, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_validation():
    logits, labels, ks = kept_case(torch.float32)
    with pytest.raises(TypeError, match="kept must be a fastppo.KeptSet"):
        fastppo.token_logprobs(logits, labels, kept=ks.to_mask(V))
    short = KeptSet(ks.ids[:0], torch.zeros(3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="kept has 2 rows but labels has 15 elements"):
        fastppo.token_logprobs(logits, labels, kept=short)
    with pytest.raises(ValueError, match="vocab_size 2000 but logits have V = 1031"):
        fastppo.token_logprobs(logits, labels, kept=KeptSet(ks.ids, ks.offsets, 2000))
    bad = labels.clone()
    bad.view(-1)[4] = int((~ks.to_mask(V)[4]).nonzero()[0])
    with pytest.raises(ValueError, match="at flat position 4 is not in its row's kept set"):
        fastppo.token_logprobs(logits, bad, kept=ks)
    with pytest.raises(ValueError, match="temperature shape"):
        fastppo.token_logprobs(logits, labels, kept=ks, temperature=torch.ones(15, device=DEVICE))
    with pytest.raises(TypeError, match="must be floating point"):
        fastppo.token_logprobs(logits, labels, kept=ks, temperature=torch.ones(labels.shape, dtype=torch.long))
    tau = torch.ones(labels.shape, device=DEVICE)
    tau.view(-1)[1] = 0.0                                        # an ignored position: never read
    fastppo.token_logprobs(logits, labels, kept=ks, temperature=tau)
    tau.view(-1)[3] = float("inf")
    with pytest.raises(ValueError, match="positive and finite"):
        fastppo.token_logprobs(logits, labels, kept=ks, temperature=tau)


def test_forward_bytes_grow_with_nnz_not_vocab():
    def traffic(vocab, keep, kept=True):
        logits = torch.randn(8, vocab, device=DEVICE)
        mask = torch.zeros(8, vocab, dtype=torch.bool)
        mask[:, :keep] = True
        ks = KeptSet.from_mask(mask).to(DEVICE)
        labels = torch.zeros(8, dtype=torch.long, device=DEVICE)
        t = KernelTraffic()
        with fastppo.use_backend("triton"), t.count():
            fastppo.token_logprobs(logits, labels, kept=ks if kept else None)
        return t.total

    assert traffic(1031, 40) == traffic(8209, 40) < traffic(1031, 80)
    assert traffic(8209, 40) * 20 < traffic(8209, 40, kept=False)


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_kept_reads_no_more_than_plain_plus_ids(with_entropy, id_dtype):
    """Bytes counted in the interpreter (every access): the kept op loads at most the plain op's bytes plus its
    ids and offsets (two int64 per row), with entropy exactly that (one sweep over the row: the kept logits come
    from the tiles in registers), and stores one value more per row (m_K and log s_K beside the full lse).
    Kept sets of 300 to 2100 ids per row, V = 2100 (three tiles, several 256-id chunks per row)."""
    N, V = 6, 2100
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(N, V, generator=g).to(DEVICE)
    mask = torch.rand(N, V, generator=g) < torch.linspace(0.15, 1.0, N)[:, None]
    labels = torch.multinomial(mask.float(), 1, generator=g)[:, 0].to(DEVICE)
    ks = KeptSet.from_mask(mask)
    ks = KeptSet(ks.ids.to(id_dtype), ks.offsets).to(DEVICE)

    def traffic(kept):
        t = KernelTraffic()
        with fastppo.use_backend("triton"), t.count():
            fastppo.token_logprobs(logits, labels, kept=kept, return_entropy=with_entropy)
        return t

    plain, kept = traffic(None), traffic(ks)
    csr = ks.nnz * ks.ids.element_size() + 2 * 8 * N
    if with_entropy:
        assert kept.loaded == plain.loaded + csr
        assert kept.stored == plain.stored + 4 * N
    else:
        assert kept.loaded <= plain.loaded + csr
        assert kept.total <= plain.total + csr


# ----------------------------------------------------------------------------- fused_ppo_loss(kept=)
def fused_batch(dtype, seed=0):
    logits, labels, ks = kept_case(dtype, lead=(3, 5), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand(3, 5, generator=g).to(DEVICE) > 0.2
    mask &= labels != -100
    mask[1] = False                                                # an empty sequence
    old = (-torch.rand(3, 5, generator=g) * 2).to(DEVICE)
    adv = torch.randn(3, 5, generator=g).to(DEVICE)
    refp = (-torch.rand(3, 5, generator=g) * 2).to(DEVICE)
    return logits, labels, ks, old, adv, mask, refp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_token_tau", [False, True])
def test_fused_ppo_loss_kept_matches_float64(backend, dtype, per_token_tau):
    logits, labels, ks, old, adv, mask, refp = fused_batch(dtype)
    tau = (torch.rand(labels.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE) + 0.5
           if per_token_tau else 0.8)
    # a label outside its kept set at a mask-0 position is never read
    labels.view(-1)[5] = int((~ks.to_mask(V)[5]).nonzero()[0])
    mask.view(-1)[5] = False
    kw = dict(ref_logprobs=refp, kl_coef=0.05, entropy_coef=0.01, clip_low=0.2, clip_high=0.28,
              temperature=tau, agg="seq-mean-token-mean", logit_scale=1.1, final_logit_softcapping=6.0)
    x = logits.detach().clone().double().requires_grad_()
    rout = kept_fused_ppo_loss(
        x, labels, ks, old.double(), adv.double(), mask, **{**kw, "ref_logprobs": refp.double()})
    (rout.loss * 1.7).backward()
    y = logits.detach().clone().requires_grad_()
    with fastppo.use_backend(backend):
        out = fastppo.fused_ppo_loss(y, labels, old, adv, mask, kept=ks, return_entropy=True, **kw)
    (out.loss * 1.7).backward()
    tol = dict(rtol=2e-4, atol=2e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.loss.double(), rout.loss, **tol)
    assert_close_by_dtype(out.logprobs, rout.logprobs, dtype)
    assert_close_by_dtype(out.entropy, torch.where(mask, rout.entropy, 0.0), dtype)
    assert_close_by_dtype(y.grad, x.grad, dtype)
    assert (y.grad.reshape(-1, V)[~mask.reshape(-1)] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_kept_gradient_only_on_kept_columns_and_validation(backend):
    logits, labels, ks, old, adv, mask, refp = fused_batch(torch.float32)
    y = logits.detach().clone().requires_grad_()
    with fastppo.use_backend(backend):
        fastppo.fused_ppo_loss(y, labels, old, adv, mask, kept=ks).loss.backward()
    assert (y.grad.reshape(-1, V)[~ks.to_mask(V)] == 0).all()
    bad = labels.clone()
    r = int(mask.reshape(-1).nonzero()[0])
    bad.view(-1)[r] = int((~ks.to_mask(V)[r]).nonzero()[0])
    with pytest.raises(ValueError, match=f"at flat position {r} is not in its row's kept set"):
        fastppo.fused_ppo_loss(logits, bad, old, adv, mask, kept=ks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_kept_opcheck(backend):
    logits, labels, ks, old, adv, mask, refp = fused_batch(torch.float32)
    lopts = LogprobOptions.build(with_entropy=True, backend=backend)
    opts = LossOptions.policy(entropy_coef=0.01, kl_coef=0.1)
    args = (logits.requires_grad_(), labels, ks.ids, ks.offsets, None, old, adv, mask, refp, None, None, 1.0,
            encode(lopts), encode(opts), backend)
    torch.library.opcheck(torch.ops.fastppo.fused_ppo_loss_kept, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_without_graph_break(backend):
    logits, labels, ks, old, adv, mask, refp = fused_batch(torch.float32)
    tau = torch.full(labels.shape, 0.9, device=DEVICE)

    def step(x):
        lp, ent = fastppo.token_logprobs(x, labels, kept=ks, temperature=tau, return_entropy=True)
        out = fastppo.fused_ppo_loss(x, labels, old, adv, mask, kept=ks, temperature=tau, entropy_coef=0.01)
        return out.loss + torch.where(mask, lp + ent, 0.0).sum()

    with fastppo.use_backend(backend):
        x = logits.clone().requires_grad_()
        want = step(x)
        want.backward()
        torch._dynamo.reset()
        y = logits.clone().requires_grad_()
        got = torch.compile(step, backend="aot_eager", fullgraph=True)(y)
        got.backward()
    assert torch.equal(got, want) and torch.equal(y.grad, x.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_gradcheck(backend):
    """token_logprobs(kept=, return_entropy=True) and fused_ppo_loss(kept=, entropy_coef) in float64 through
    autograd (fast mode: a random projection of the Jacobian), V = 1100 (two tiles under the interpreter) with
    a 300-id row (two chunks of the entropy sweep), a per-token temperature and an ignored label."""
    g = torch.Generator().manual_seed(9)
    Vg = 1100
    logits = torch.randn(2, 3, Vg, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 3, Vg, generator=g) < 0.05
    mask[0, 0, :300] = True
    labels = torch.multinomial(mask.reshape(-1, Vg).double(), 1, generator=g).view(2, 3)
    labels[1, 2] = -100
    ks = KeptSet.from_mask(mask).to(DEVICE)
    logits, labels = logits.to(DEVICE), labels.to(DEVICE)
    tau = (torch.rand(2, 3, generator=g, dtype=torch.float64) + 0.5).to(DEVICE)
    old = torch.full((2, 3), -3.0, dtype=torch.float64, device=DEVICE)
    adv = torch.randn(2, 3, generator=g, dtype=torch.float64).to(DEVICE)
    live = labels != -100

    def logprobs(x):
        return fastppo.token_logprobs(x, labels, kept=ks, temperature=tau, return_entropy=True)

    def loss(x):
        return fastppo.fused_ppo_loss(x, labels, old, adv, live, kept=ks, temperature=tau, entropy_coef=0.1,
                                      kl_coef=0.2, ref_logprobs=old + 0.5).loss

    with fastppo.use_backend(backend):
        for fn in (logprobs, loss):
            assert torch.autograd.gradcheck(fn, (logits.clone().requires_grad_(),), fast_mode=True)
