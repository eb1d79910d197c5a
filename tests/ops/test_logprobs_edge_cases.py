"""Hostile inputs for the logits ops (token_logprobs, fused_ppo_loss; full_kl's are in test_full_kl.py) on
both backends, each compared with a float64 reference of the documented formula: strides and views, NaN/inf placement,
ignored / masked rows with NaN, extreme logits, every float dtype, softcap + logit_scale (issue #11,
#14 item 1). Shapes stay small: the Triton path runs in the interpreter."""

import math

import pytest
import torch

import fastppo
from fastppo import reference as ref
from fastppo.bench.counters import KernelTraffic
from tests.helpers import DEVICE, assert_close_by_dtype, make_labels, make_logits

BACKENDS = ["triton", "torch"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ref_grad(logits, labels, g_logp, g_ent, **kw):
    """float64 reference values and gradient of sum(g_logp * logp + g_ent * H)."""
    x = logits.detach().double().requires_grad_()
    lp, ent = ref.token_logprobs(x, labels, return_entropy=True, **kw)
    (torch.where(labels != -100, lp * g_logp.double() + ent * g_ent.double(), 0.0)).sum().backward()
    return lp.detach(), ent.detach(), x.grad


def _run(backend, logits, labels, **kw):
    x = logits.detach().clone().requires_grad_()
    with fastppo.use_backend(backend):
        lp, ent = fastppo.token_logprobs(x, labels, return_entropy=True, **kw)
        g_logp = torch.randn(lp.shape, dtype=lp.dtype, device=lp.device)
        g_ent = torch.randn(ent.shape, dtype=ent.dtype, device=ent.device)
        (lp * g_logp + ent * g_ent).sum().backward()
    return lp, ent, x.grad, g_logp, g_ent


def _check(backend, logits, labels, scale=1.0, **kw):
    lp, ent, grad, g_logp, g_ent = _run(backend, logits, labels, **kw)
    rlp, rent, rgrad = _ref_grad(logits, labels, g_logp, g_ent, **kw)
    acc = _acc(logits.dtype)
    assert lp.dtype == ent.dtype == acc and grad.dtype == logits.dtype and grad.shape == logits.shape
    assert_close_by_dtype(lp, rlp, acc, scale=scale)
    assert_close_by_dtype(ent, rent, acc, scale=scale)
    assert_close_by_dtype(grad, rgrad, logits.dtype, scale=scale)
    return lp, ent, grad


# ----------------------------------------------------------------------------- layouts
def _layouts(dtype):
    """(name, logits view, labels view): every layout a caller can hand us."""
    V = 257
    base = make_logits((4, 7, V), dtype)
    yield "contiguous", base, make_labels((4, 7), V)
    yield "shifted", base[:, :-1], make_labels((4, 6), V)
    yield "row-strided", make_logits((12, V), dtype)[::3], make_labels((4,), V)
    yield "last-dim-strided", make_logits((5, 2 * V), dtype)[:, ::2], make_labels((5,), V)
    yield "transposed-lead", base.transpose(0, 1), make_labels((4, 7), V).t()
    yield "labels[::2]", make_logits((6, V), dtype), make_labels((12,), V)[::2]
    yield "labels-expanded", make_logits((3, 5, V), dtype), make_labels((1, 5), V).expand(3, 5)
    yield "int32-labels-strided", make_logits((5, V), dtype), make_labels((10,), V).int()[1::2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_layout_matches_float64_reference(backend, dtype):
    for name, logits, labels in _layouts(dtype):
        try:
            _check(backend, logits, labels, temperature=0.7)
        except AssertionError as e:
            raise AssertionError(f"layout {name}: {e}") from e


@pytest.mark.parametrize("backend", BACKENDS)
def test_issue_strided_labels_case(backend):
    """The issue's case: labels[::2] used to be read as contiguous on the Triton path (0.48 off)."""
    logits = torch.randn(6, 1000, device=DEVICE)
    labels = torch.randint(0, 1000, (12,), device=DEVICE)[::2]
    with fastppo.use_backend(backend):
        lp = fastppo.token_logprobs(logits, labels)
    assert_close_by_dtype(lp, ref.token_logprobs(logits.double(), labels.contiguous()), torch.float32)


# ----------------------------------------------------------------------------- NaN / inf placement
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_nan_in_ignored_rows_never_reaches_values_or_gradients(backend, dtype):
    V = 300
    logits = make_logits((3, 4, V), dtype)
    labels = make_labels((3, 4), V, holes=0.0)
    labels[0, 1] = labels[2, 3] = -100
    logits[0, 1, 5] = float("nan")
    logits[2, 3] = float("inf")
    clean = logits.clone()
    clean[0, 1] = clean[2, 3] = 0.0
    lp, ent, grad = _check(backend, logits, labels)
    assert lp[0, 1] == 0 and ent[0, 1] == 0 and lp[2, 3] == 0 and ent[2, 3] == 0
    assert (grad[0, 1] == 0).all() and (grad[2, 3] == 0).all()
    assert torch.isfinite(grad).all() and torch.isfinite(lp).all()
    lp2, _, grad2, _, _ = _run(backend, clean, labels)
    torch.testing.assert_close(lp, lp2, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_live_row_stays_in_that_row(backend):
    """NaN propagates as in PyTorch: the row's logp, entropy and gradient are NaN, no other row is touched."""
    V = 200
    logits = make_logits((4, V), torch.float32)
    labels = make_labels((4,), V, holes=0.0)
    logits[1, 17] = float("nan")
    lp, ent, grad, _, _ = _run(backend, logits, labels)
    assert torch.isnan(lp[1]) and torch.isnan(ent[1]) and torch.isnan(grad[1]).all()
    others = torch.tensor([0, 2, 3], device=DEVICE)
    assert torch.isfinite(lp[others]).all() and torch.isfinite(grad[others]).all()
    rl = ref.token_logprobs(logits.double(), labels)
    assert torch.isnan(rl[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_and_minus_inf_logits(backend):
    V = 128
    logits = make_logits((3, V), torch.float32)
    logits[0, :100] = -float("inf")          # masked vocabulary: exact
    logits[1, 3] = float("inf")              # +inf: NaN as in log_softmax
    labels = torch.tensor([110, 3, 7], device=DEVICE)
    with fastppo.use_backend(backend):
        lp, ent = fastppo.token_logprobs(logits, labels, return_entropy=True)
    rlp, rent = ref.token_logprobs(logits.double(), labels, return_entropy=True)
    assert_close_by_dtype(lp[0], rlp[0], torch.float32)
    assert_close_by_dtype(ent[0], rent[0], torch.float32)
    assert torch.isnan(lp[1]) and torch.isnan(rlp[1])
    assert_close_by_dtype(lp[2], rlp[2], torch.float32)


# ----------------------------------------------------------------------------- extreme logits
@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_near_minus_1e4_is_exact(backend):
    """lse - sum(p z) lost 0.75 nats here on the PyTorch backend; the max-relative sum does not."""
    logits = torch.randn(4, 500, device=DEVICE) - 1e4
    _check(backend, logits, make_labels((4,), 500, holes=0.0), scale=1e4)
    with fastppo.use_backend(backend):
        _, ent = fastppo.token_logprobs(logits, torch.zeros(4, dtype=torch.long, device=DEVICE),
                                       return_entropy=True)
    _, rent = ref.token_logprobs(logits.double(), torch.zeros(4, dtype=torch.long, device=DEVICE),
                                 return_entropy=True)
    assert (ent.double() - rent).abs().max() < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_entropy_near_plus_minus_6e4(backend):
    """fp16 logits spread over +-6e4 (104 nats off before): entropy and logp to fp32 rounding."""
    logits = ((torch.rand(4, 400, device=DEVICE) * 2 - 1) * 6e4).half()
    logits[1, :] = 6e4                                      # a uniform row at the fp16 top
    labels = make_labels((4,), 400, holes=0.0)
    with fastppo.use_backend(backend):
        lp, ent = fastppo.token_logprobs(logits, labels, return_entropy=True)
    rlp, rent = ref.token_logprobs(logits.double(), labels, return_entropy=True)
    assert (ent.double() - rent).abs().max() < 1e-3
    assert abs(ent[1].item() - math.log(400)) < 1e-5
    assert_close_by_dtype(lp, rlp, torch.float32, scale=6e4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_rows(backend, dtype):
    V = 301
    logits = make_logits((5, V), torch.float32)
    logits[0] -= 3000.0
    logits[1] *= 300.0
    logits[2] = 0.0
    logits[3, 9] = 60.0
    logits = logits.to(dtype)
    _check(backend, logits, torch.tensor([1, 2, 3, 9, -100], device=DEVICE), scale=1e3)


# ----------------------------------------------------------------------------- softcap and logit_scale
def test_trl_order_scale_softcap_temperature():
    """z' = softcap(scale * z) / tau, checked on a single hand-computable row."""
    z = torch.tensor([[1.0, -2.0, 30.0]], dtype=torch.float64)
    scale, cap, tau = 0.5, 5.0, 2.0
    zp = cap * torch.tanh(scale * z / cap) / tau
    want = zp[0, 2] - torch.logsumexp(zp[0], 0)
    for backend in BACKENDS:
        with fastppo.use_backend(backend):
            got = fastppo.token_logprobs(z.to(DEVICE), torch.tensor([2], device=DEVICE), temperature=tau,
                                         logit_scale=scale, final_logit_softcapping=cap)
        assert abs(got.item() - want.item()) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cap,scale", [(30.0, 1.0), (2.5, 0.37), (None, 1.7)])
def test_softcap_and_scale_match_reference(backend, dtype, cap, scale):
    logits = make_logits((3, 5, 263), dtype, scale=8.0)
    logits[0, 0, :5] = -float("inf")
    _check(backend, logits, make_labels((3, 5), 263), scale=8.0, temperature=0.8,
           final_logit_softcapping=cap, logit_scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_gradcheck_float64(backend):
    logits = (torch.randn(2, 2, 7, dtype=torch.float64, device=DEVICE) * 4).requires_grad_()
    labels = torch.tensor([[1, -100], [6, 0]], device=DEVICE)

    def f(x):
        return fastppo.token_logprobs(x, labels, return_entropy=True, temperature=0.7,
                                      final_logit_softcapping=3.0, logit_scale=0.9)

    with fastppo.use_backend(backend):
        assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_softcap_and_scale_bad_values():
    logits = make_logits((2, 11), torch.float32)
    labels = torch.tensor([1, 2], device=DEVICE)
    for kw, err in ((dict(final_logit_softcapping=0.0), ValueError), (dict(final_logit_softcapping=-1.0), ValueError),
                    (dict(final_logit_softcapping=float("inf")), ValueError), (dict(logit_scale=0.0), ValueError),
                    (dict(logit_scale=float("nan")), ValueError), (dict(logit_scale=True), TypeError),
                    (dict(logit_scale=None), TypeError), (dict(final_logit_softcapping="30"), TypeError)):
        with pytest.raises(err, match="logit_scale|final_logit_softcapping"):
            fastppo.token_logprobs(logits, labels, **kw)


# ----------------------------------------------------------------------------- fp64 end to end
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_gradients_are_fp64_accurate(backend):
    """Upstream gradients are no longer cast with .float(): fp64 logits give fp64-accurate gradients."""
    logits = torch.randn(4, 50, dtype=torch.float64, device=DEVICE)
    labels = make_labels((4,), 50, holes=0.0)
    lp, ent, grad, g_logp, g_ent = _run(backend, logits, labels, temperature=0.7)
    g_logp = g_logp + 1e-9 * torch.pi                    # not representable in fp32
    x = logits.clone().requires_grad_()
    with fastppo.use_backend(backend):
        a, b = fastppo.token_logprobs(x, labels, return_entropy=True, temperature=0.7)
        (a * g_logp + b * g_ent).sum().backward()
    _, _, rgrad = _ref_grad(logits, labels, g_logp, g_ent, temperature=0.7)
    assert (x.grad - rgrad).abs().max() < 1e-12


# ----------------------------------------------------------------------------- fused_ppo_loss
def _ppo_batch(dtype, B=3, T=6, V=301):
    logits = make_logits((B, T, V), dtype)
    labels = make_labels((B, T), V, holes=0.0)
    mask = torch.rand(B, T, device=DEVICE) > 0.3
    mask[1] = False                                         # an empty row
    old = ref.token_logprobs(logits.double(), labels).float() + 0.2 * torch.randn(B, T, device=DEVICE)
    adv = torch.randn(B, T, device=DEVICE)
    return logits, labels, mask, old, adv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_fused_loss_masked_nan_rows_and_strided_labels(backend, dtype):
    """NaN logits in mask-0 rows and strided labels (12.5 off before) on both backends, vs float64."""
    logits, labels, mask, old, adv = _ppo_batch(dtype)
    wide = torch.stack([labels, torch.zeros_like(labels)], -1)[..., 0]   # labels with stride 2
    assert wide.stride() == (2 * labels.shape[1], 2)
    logits[~mask] = float("nan")
    kw = dict(entropy_coef=0.01, temperature=0.9, final_logit_softcapping=20.0, logit_scale=1.3,
              return_entropy=True)
    x = logits.clone().requires_grad_()
    with fastppo.use_backend(backend):
        out = fastppo.fused_ppo_loss(x, wide, old, adv, mask, **kw)
        (out.loss * 1.7).backward()
    xr = torch.where(mask[..., None], logits, 0.0).double().requires_grad_()
    rout = ref.fused_ppo_loss(xr, labels, old, adv, mask, **kw)
    (rout.loss * 1.7).backward()
    assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()
    assert (x.grad[~mask] == 0).all()
    assert (out.logprobs[~mask] == 0).all() and (out.entropy[~mask] == 0).all()
    torch.testing.assert_close(out.loss.double(), rout.loss, rtol=1e-4, atol=1e-5)
    assert_close_by_dtype(x.grad, xr.grad, dtype, scale=2.0)
    assert_close_by_dtype(out.logprobs, rout.logprobs, _acc(dtype), scale=20.0)    # tanh error ~ cap * eps


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_loss_gradcheck_with_softcap(backend):
    logits, labels, mask, old, adv = _ppo_batch(torch.float64, B=2, T=2, V=7)
    x = logits.clone().requires_grad_()

    def f(z):
        return fastppo.fused_ppo_loss(z, labels, old.double(), adv.double(), mask, entropy_coef=0.1,
                                      final_logit_softcapping=2.0, logit_scale=0.8, temperature=0.9).loss

    with fastppo.use_backend(backend):
        assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- masked rows cost nothing
def _half_masked(B=4, T=8, V=1000):
    logits = make_logits((B, T, V), torch.bfloat16)
    labels = make_labels((B, T), V, holes=0.0)
    labels[:, : T // 2] = -100                                   # the prompt half of every sequence
    return logits, labels


def _floor(logits, live_rows):
    """Valid rows read twice and written once, masked rows only their zero gradient written."""
    V, b = logits.shape[-1], logits.element_size()
    n = logits.numel() // V
    return live_rows * 3 * V * b + (n - live_rows) * V * b


def test_token_logprobs_bytes_on_a_half_masked_batch():
    logits, labels = _half_masked()
    x = logits.clone().requires_grad_()
    traffic = KernelTraffic()
    with fastppo.use_backend("triton"), traffic.count():
        lp, ent = fastppo.token_logprobs(x, labels, return_entropy=True)
        (lp.sum() + 0.1 * ent.sum()).backward()
    floor = _floor(logits, int((labels != -100).sum()))
    assert traffic.total <= 1.02 * floor, (traffic.total, floor, traffic.total / floor)
    assert (x.grad[labels == -100] == 0).all()


def test_fused_ppo_loss_bytes_on_a_half_masked_batch():
    # the loss aggregation moves O(B T) per-token vectors (~90 bytes a token over its 4 launches) beside the
    # O(B T V) logits: at V = 1000 that alone is 2.1 % of the floor, at V = 2048 1 %, at V = 152k 0.01 %
    logits, labels = _half_masked(V=2048)
    labels[:, : labels.shape[1] // 2] = 5                        # valid labels: only the mask says "prompt"
    mask = torch.zeros(labels.shape, dtype=torch.bool, device=DEVICE)
    mask[:, labels.shape[1] // 2:] = True
    old = torch.randn(labels.shape, device=DEVICE) - 7.0
    adv = torch.randn(labels.shape, device=DEVICE)
    x = logits.clone().requires_grad_()
    traffic = KernelTraffic()
    with fastppo.use_backend("triton"), traffic.count():
        out = fastppo.fused_ppo_loss(x, labels, old, adv, mask, entropy_coef=0.01)
        out.loss.backward()
    floor = _floor(logits, int(mask.sum()))
    assert traffic.total <= 1.02 * floor, (traffic.total, floor, traffic.total / floor)
    assert (x.grad[~mask] == 0).all() and (x.grad[mask] != 0).any()


# ----------------------------------------------------------------------------- double backward, inplace
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["token_logprobs", "full_kl"])
def test_double_backward_is_a_clear_error(backend, op):
    x = make_logits((3, 40), torch.float64).requires_grad_()
    with fastppo.use_backend(backend):
        if op == "token_logprobs":
            y = fastppo.token_logprobs(x, torch.tensor([1, 2, 3], device=DEVICE))
        else:
            y = fastppo.full_kl(x, make_logits((3, 40), torch.float64))
        (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            g.sum().backward()


def test_inplace_refuses_an_expanded_logits_view():
    logits, labels, mask, old, adv = _ppo_batch(torch.float32, B=2, T=3, V=50)
    expanded = logits[:1].expand(2, 3, 50).requires_grad_()
    with fastppo.use_backend("triton"), pytest.raises(ValueError, match="inplace=True"):
        fastppo.fused_ppo_loss(expanded, labels, old, adv, mask, inplace=True)
    from fastppo.kernels._rows import has_internal_overlap

    assert not has_internal_overlap(logits[:, :-1]) and not has_internal_overlap(logits.transpose(0, 1))
    assert has_internal_overlap(logits.as_strided((2, 3, 50), (0, 50, 1)))
    assert has_internal_overlap(logits.as_strided((2, 3, 50), (100, 40, 1)))   # rows overlap
