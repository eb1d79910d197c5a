"""temperature= a per-token tensor on token_logprobs, fused_ppo_loss, full_kl and linear_logprobs (no kept set)
against float64 on both backends, values and gradients (fused_linear_ppo_loss: tests/ops/test_linear_kept.py; the
distillation ops: tests/ops/test_divergence_temperature.py); the shape is checked; no extra pass (bytes)."""

import pytest
import torch

import fastppo
from fastppo import reference as ref
from fastppo.bench.counters import KernelTraffic
from tests.helpers import DEVICE, assert_close_by_dtype, make_labels, make_logits, make_mask

BACKENDS = ["triton", "torch"]
B, T, V = 3, 5, 1031


def _tau(shape, seed=0):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) + 0.5).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cap", [None, 5.0])
def test_token_logprobs_per_token_temperature(backend, dtype, cap):
    torch.manual_seed(0)
    logits = make_logits((B, T + 1, V), dtype)[:, :-1]                   # a strided view
    labels = make_labels((B, T), V)
    tau = _tau((B, T))
    x = logits.detach().double().requires_grad_()
    rlp, rent = ref.token_logprobs(x, labels, temperature=tau.double().unsqueeze(-1), return_entropy=True,
                                   final_logit_softcapping=cap, logit_scale=1.2)
    gl = torch.linspace(-1.5, 2.0, B * T, dtype=torch.float64, device=DEVICE).view(B, T)
    ge = torch.linspace(0.7, -0.4, B * T, dtype=torch.float64, device=DEVICE).view(B, T)
    ((rlp * gl).sum() + (rent * ge).sum()).backward()
    y = logits.detach().clone().requires_grad_()
    with fastppo.use_backend(backend):
        lp, ent = fastppo.token_logprobs(y, labels, temperature=tau, return_entropy=True,
                                         final_logit_softcapping=cap, logit_scale=1.2)
    assert_close_by_dtype(lp, rlp, dtype)
    assert_close_by_dtype(ent, rent, dtype)
    ((lp * gl.float()).sum() + (ent * ge.float()).sum()).backward()
    assert_close_by_dtype(y.grad, x.grad, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_fused_ppo_loss_per_token_temperature(backend, inplace):
    torch.manual_seed(1)
    logits = make_logits((B, T, V), torch.float32)
    labels = make_labels((B, T), V, holes=0.1)
    mask = make_mask((B, T)) & (labels != -100)
    tau = _tau((B, T), 2)
    tau[~mask] = 0.0                                                     # dead rows: never read
    old = -torch.rand(B, T, device=DEVICE) * 3
    adv = torch.randn(B, T, device=DEVICE)
    kw = dict(entropy_coef=0.01, agg="seq-mean-token-sum")
    x = logits.detach().double().requires_grad_()
    rout = ref.fused_ppo_loss(x, labels, old.double(), adv.double(), mask,
                              temperature=torch.where(mask, tau, 1.0).double().unsqueeze(-1), **kw)
    (rout.loss * 1.7).backward()
    y = logits.detach().clone().requires_grad_()
    with fastppo.use_backend(backend):
        out = fastppo.fused_ppo_loss(y, labels, old, adv, mask, temperature=tau, inplace=inplace, **kw)
        (out.loss * 1.7).backward()
    torch.testing.assert_close(out.loss.double(), rout.loss, rtol=2e-4, atol=2e-5)
    assert_close_by_dtype(out.logprobs, rout.logprobs, torch.float32)
    assert_close_by_dtype(y.grad, x.grad, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_kl_per_token_temperature(backend):
    torch.manual_seed(2)
    logits = make_logits((B, T + 1, V), torch.float32)[:, 1:]
    ref_logits = make_logits((B, T, V), torch.float32)
    tau = _tau((B, T), 4)
    x = logits.detach().double().requires_grad_()
    want = ref.full_kl(x, ref_logits.double(), temperature=tau.double().unsqueeze(-1))
    g = torch.linspace(-1.0, 2.0, B * T, dtype=torch.float64, device=DEVICE).view(B, T)
    (want * g).sum().backward()
    y = logits.detach().clone().requires_grad_()
    with fastppo.use_backend(backend):
        got = fastppo.full_kl(y, ref_logits, temperature=tau)
    (got * g.float()).sum().backward()
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)        # as tests/ops/test_fused.py
    assert_close_by_dtype(y.grad, x.grad, torch.float32)
    with pytest.raises(ValueError, match="temperature shape"):
        fastppo.full_kl(y, ref_logits, temperature=tau[0])


def test_per_token_temperature_shape_is_checked():
    x = torch.randn(2, 3, 11, device=DEVICE)
    tau = torch.ones(2, 3, device=DEVICE)
    with pytest.raises(ValueError, match="temperature shape"):
        fastppo.token_logprobs(x, torch.zeros(2, 3, dtype=torch.long, device=DEVICE), temperature=tau[0])


def test_per_token_temperature_costs_no_extra_pass():
    logits = torch.randn(8, V, device=DEVICE)
    labels = torch.zeros(8, dtype=torch.long, device=DEVICE)

    def traffic(temperature):
        t = KernelTraffic()
        with fastppo.use_backend("triton"), t.count():
            fastppo.token_logprobs(logits, labels, temperature=temperature, return_entropy=True)
        return t.total

    assert traffic(torch.full((8,), 0.7, device=DEVICE)) == traffic(0.7) + 8 * 4      # one fp32 per row


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cap", [None, 5.0])
def test_linear_logprobs_per_token_temperature(backend, cap):
    torch.manual_seed(3)
    Hd = 24
    hidden = torch.randn(B, T, Hd, device=DEVICE)
    weight = (torch.randn(V, Hd, device=DEVICE) * 0.4)
    bias = torch.randn(V, device=DEVICE) * 0.1
    labels = make_labels((B, T), V)
    tau = _tau((B, T), 6)
    tau[labels == -100] = 0.0                                            # ignored rows: never read
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    kw = dict(final_logit_softcapping=cap, logit_scale=1.1, return_entropy=True)
    rlp, rent = ref.linear_logprobs(h64, w64, labels, bias=b64, temperature=torch.where(labels == -100, 1.0, tau)
                                    .double().unsqueeze(-1), **kw)
    gl = torch.linspace(-1.5, 2.0, B * T, dtype=torch.float64, device=DEVICE).view(B, T)
    ge = torch.linspace(0.7, -0.4, B * T, dtype=torch.float64, device=DEVICE).view(B, T)
    ((rlp * gl).sum() + (rent * ge).sum()).backward()
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    with fastppo.use_backend(backend):
        lp, ent = fastppo.linear_logprobs(h, w, labels, bias=b, temperature=tau, chunk_bytes=1 << 14, **kw)
    ((lp * gl.float()).sum() + (ent * ge.float()).sum()).backward()
    assert_close_by_dtype(lp, rlp, torch.float32)
    assert_close_by_dtype(ent, rent, torch.float32)
    for got, want in ((h.grad, h64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert_close_by_dtype(got, want, torch.float32)
