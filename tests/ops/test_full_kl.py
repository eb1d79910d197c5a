"""full_kl: exact KL(pi || ref) over the vocabulary against a float64 reference on both backends: dtypes
and temperature, strided views and -inf entries, identical distributions, float64 gradcheck, NaN placement,
every logit magnitude, shape errors. (Its double backward: tests/ops/test_logprobs_edge_cases.py.)"""

import pytest
import torch

import fastppo
from fastppo import reference as ref
from tests.helpers import DEVICE, MAGNITUDES, assert_close_by_dtype, magnitude_logits, make_logits

BACKENDS = ["triton", "torch"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_full_kl(dtype, temperature):
    p = make_logits((3, 5, 1031), dtype)
    q = (p.float() + make_logits((3, 5, 1031), torch.float32, scale=0.5)).to(dtype)
    q[0, 0, :10] = -40.0
    p[1, 1, 200:300] = -float("inf")
    x = p.detach().clone().requires_grad_()
    kl = fastppo.full_kl(x, q, temperature=temperature)
    g = torch.randn_like(kl)
    (kl * g).sum().backward()
    xr = p.detach().double().requires_grad_()
    rkl = ref.full_kl(xr, q.double(), temperature=temperature)
    (rkl * g.double()).sum().backward()
    assert kl.dtype == torch.float32 and (kl >= -1e-6).all()
    torch.testing.assert_close(kl.double(), rkl, rtol=2e-5, atol=2e-5)
    assert_close_by_dtype(x.grad, xr.grad, dtype)


def test_full_kl_of_identical_distributions_is_zero_and_ref_gets_no_grad():
    p = make_logits((4, 300), torch.float32)
    q = p.clone().requires_grad_()
    kl = fastppo.full_kl(p.clone().requires_grad_(), q)
    torch.testing.assert_close(kl, torch.zeros_like(kl), atol=2e-6, rtol=0)
    kl.sum().backward()
    assert q.grad is None


def test_full_kl_gradcheck():
    p = torch.randn(3, 17, dtype=torch.float64, device=DEVICE, requires_grad=True)
    q = torch.randn(3, 17, dtype=torch.float64, device=DEVICE)
    assert torch.autograd.gradcheck(lambda x: fastppo.full_kl(x, q, temperature=1.0), (p,), eps=1e-6, atol=1e-6)


def test_full_kl_shape_mismatch():
    with pytest.raises(ValueError, match="ref_logits shape"):
        fastppo.full_kl(torch.zeros(2, 5), torch.zeros(2, 6))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_full_kl_views_and_dtypes(backend, dtype):
    V = 263
    p = make_logits((3, 6, V), dtype)[:, 1:]                     # shifted view
    q = make_logits((6, 3, 2 * V), dtype).transpose(0, 1)[:, 1:, ::2]   # transposed + last stride 2
    q[0, 0, :10] = -float("inf")
    g = torch.randn(6, 3, device=DEVICE, dtype=_acc(dtype)).t()[:, 1:]  # strided upstream gradient
    x = p.detach().clone().requires_grad_()
    with fastppo.use_backend(backend):
        kl = fastppo.full_kl(x, q, temperature=0.8)
        (kl * g).sum().backward()
    xr = p.detach().double().requires_grad_()
    rkl = ref.full_kl(xr, q.double(), temperature=0.8)
    torch.where(torch.isfinite(rkl), rkl * g.double(), 0.0).sum().backward()
    assert kl.dtype == _acc(dtype)
    assert torch.isinf(kl[0, 0]) and torch.isinf(rkl[0, 0])
    fin = torch.isfinite(rkl)
    assert_close_by_dtype(kl[fin], rkl[fin], _acc(dtype), scale=4.0)
    rows = fin[..., None].expand_as(p)
    assert_close_by_dtype(x.grad[rows], xr.grad[rows], dtype, scale=4.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_kl_gradcheck_float64_with_temperature(backend):
    p = torch.randn(3, 7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    q = torch.randn(3, 7, dtype=torch.float64, device=DEVICE)
    with fastppo.use_backend(backend):
        assert torch.autograd.gradcheck(lambda z: fastppo.full_kl(z, q, temperature=0.7), (p,), eps=1e-6,
                                         atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_kl_nan_stays_in_its_row(backend):
    p = make_logits((4, 90), torch.float32)
    q = make_logits((4, 90), torch.float32)
    p[1, 3] = float("nan")
    q[2, 7] = float("nan")
    x = p.clone().requires_grad_()
    with fastppo.use_backend(backend):
        kl = fastppo.full_kl(x, q)
        (kl * torch.tensor([0.5, -1.0, 2.0, 1.5], device=DEVICE)).sum().backward()
    rkl = ref.full_kl(p.double(), q.double())
    assert torch.equal(torch.isnan(kl), torch.isnan(rkl)) and torch.isnan(kl[1:3]).all()
    assert_close_by_dtype(kl[[0, 3]], rkl[[0, 3]], torch.float32)
    assert torch.isnan(x.grad[1]).all() and torch.isfinite(x.grad[[0, 3]]).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name,dtype", MAGNITUDES)
def test_full_kl_at_any_magnitude(backend, name, dtype):
    """KL and its gradient against float64 at every magnitude (the fp16 +-65504 case gave 69071.46 where
    68951.31 is right on the PyTorch backend). The reference shares the policy's top entries and adds three,
    so the KL stays finite even across +-3e38."""
    V = 203
    p = magnitude_logits(name, dtype, (3, 2, V))
    q = p.flip(-1).clone() if name[0].isdigit() or name[0] == "-" else p.clone()
    q[..., 2:5] = p[..., 0:1]                                    # q's top set is a superset of p's
    g = torch.randn(3, 2, device=DEVICE)
    x = p.detach().clone().requires_grad_()
    with fastppo.use_backend(backend):
        kl = fastppo.full_kl(x, q)
        (kl * g).sum().backward()
    xr = p.detach().double().requires_grad_()
    rkl = ref.full_kl(xr, q.double())
    (rkl * g.double()).sum().backward()
    assert torch.isfinite(rkl).all()
    scale = 1.0 + rkl.abs().max().item()                         # the KL's own size: fp32 rounding of it
    assert_close_by_dtype(kl, rkl, torch.float32, scale=scale)
    assert_close_by_dtype(x.grad, xr.grad, dtype, scale=scale)
