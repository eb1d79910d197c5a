import math

import pytest
import torch

import fastppo
from fastppo import reference as ref
from tests.helpers import DEVICE, MAGNITUDES, assert_close_by_dtype, magnitude_logits, make_labels, make_logits

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ref_with_grad(logits, labels, g_logp, g_ent, **kw):
    x = logits.detach().double().requires_grad_()
    lp, ent = ref.token_logprobs(x, labels, return_entropy=True, **kw)
    (lp * g_logp.double() + ent * g_ent.double()).sum().backward()
    return lp, ent, x.grad


def _check(logits, labels, temperature=1.0, scale=1.0):
    x = logits.detach().clone().requires_grad_()
    lp, ent = fastppo.token_logprobs(x, labels, temperature=temperature, return_entropy=True)
    assert lp.dtype == ent.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert lp.shape == ent.shape == labels.shape
    g_logp = torch.randn_like(lp)
    g_ent = torch.randn_like(ent)
    (lp * g_logp + ent * g_ent).sum().backward()
    rlp, rent, rgrad = _ref_with_grad(logits, labels, g_logp, g_ent, temperature=temperature)
    out_dtype = lp.dtype
    assert_close_by_dtype(lp, rlp, out_dtype, scale=scale)
    assert_close_by_dtype(ent, rent, out_dtype, scale=scale)
    assert x.grad.dtype == logits.dtype and x.grad.shape == logits.shape
    assert_close_by_dtype(x.grad, rgrad, logits.dtype, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 1031), (41, 401), (5, 17)])
def test_forward_backward_matches_reference(dtype, shape):
    _check(make_logits(shape, dtype), make_labels(shape[:-1], shape[-1]))


@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_temperature_is_runtime(temperature):
    logits = make_logits((6, 300), torch.float32)
    _check(logits, make_labels((6,), 300), temperature=temperature)


def test_shifted_view_is_read_in_place():
    full = make_logits((3, 9, 1031), torch.bfloat16)
    view = full[:, :-1, :]
    assert not view.is_contiguous()
    _check(view, make_labels((3, 8), 1031))


def test_row_strided_and_non_unit_last_stride():
    base = make_logits((12, 2 * 517), torch.float32)
    _check(base[::2, :517], make_labels((6,), 517))        # row stride 2*1034
    _check(base[:, ::2], make_labels((12,), 517))          # last stride 2


def test_four_dim_input():
    _check(make_logits((2, 3, 4, 129), torch.float32), make_labels((2, 3, 4), 129))


def test_extreme_logits():
    V = 1031
    logits = make_logits((6, V), torch.float32)
    logits[0] -= 1000.0                                    # all negative
    logits[1, 100:900] = -float("inf")                     # masked vocabulary
    logits[2] *= 3000.0                                    # very large
    logits[3, :] = 0.0                                     # uniform
    logits[4, 7] = 80.0                                    # one dominant token
    labels = torch.tensor([3, 50, 9, 1030, 7, -100], device=DEVICE)
    _check(logits, labels, scale=3000.0)
    lp, ent = fastppo.token_logprobs(logits, labels, return_entropy=True)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    torch.testing.assert_close(ent[3], torch.tensor(torch.log(torch.tensor(float(V))).item(), device=DEVICE))


def test_label_on_masked_vocab_entry_is_minus_inf():
    logits = make_logits((2, 64), torch.float32)
    logits[0, 5] = -float("inf")
    lp = fastppo.token_logprobs(logits, torch.tensor([5, 6], device=DEVICE))
    assert lp[0] == -float("inf") and torch.isfinite(lp[1])


def test_ignore_index_gives_zero_and_no_gradient():
    logits = make_logits((4, 50), torch.float32).requires_grad_()
    labels = torch.tensor([1, -100, 3, 7], device=DEVICE)
    lp, ent = fastppo.token_logprobs(logits, labels, return_entropy=True)
    assert lp[1] == 0 and ent[1] == 0
    (lp.sum() + ent.sum()).backward()
    assert (logits.grad[1] == 0).all() and (logits.grad[0] != 0).any()
    lp2 = fastppo.token_logprobs(logits.detach(), torch.tensor([1, 5, 3, 7], device=DEVICE), ignore_index=5)
    assert lp2[1] == 0


def test_custom_ignore_index_and_int32_labels():
    logits = make_logits((4, 50), torch.float32)
    labels = torch.tensor([1, 2, 3, 4], dtype=torch.int32, device=DEVICE)
    torch.testing.assert_close(fastppo.token_logprobs(logits, labels),
                               ref.token_logprobs(logits, labels.long()), rtol=1e-6, atol=1e-6)


def test_without_entropy_backward():
    logits = make_logits((5, 77), torch.bfloat16).requires_grad_()
    labels = make_labels((5,), 77)
    lp = fastppo.token_logprobs(logits, labels)
    g = torch.randn_like(lp)
    (lp * g).sum().backward()
    x = logits.detach().double().requires_grad_()
    (ref.token_logprobs(x, labels) * g.double()).sum().backward()
    assert_close_by_dtype(logits.grad, x.grad, torch.bfloat16)


@pytest.mark.parametrize("bad", [31, -1, -7])
def test_out_of_range_labels_raise(bad):
    logits = make_logits((3, 31), torch.float32)
    labels = torch.tensor([0, bad, 2], device=DEVICE)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 31\)"):
        fastppo.token_logprobs(logits, labels)


def test_bad_arguments_raise():
    logits = make_logits((3, 31), torch.float32)
    with pytest.raises(ValueError, match="labels shape"):
        fastppo.token_logprobs(logits, torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        fastppo.token_logprobs(logits, torch.zeros(3))
    with pytest.raises(TypeError, match="floating"):
        fastppo.token_logprobs(torch.zeros(3, 31, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        fastppo.token_logprobs(logits, torch.zeros(3, dtype=torch.long), temperature=0.0)


def test_kernel_never_reads_out_of_bounds_for_bad_labels():
    """With the host check off (as on CUDA), an out-of-range label yields NaN, never a read."""
    from fastppo.kernels.logprobs import logprobs_fwd

    logits = make_logits((2, 16), torch.float32)
    logp, _, _ = logprobs_fwd(logits, torch.tensor([3, 10**9]), inv_tau=1.0, ignore_index=-100,
                              with_entropy=False)
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1])


def test_64bit_row_offsets():
    """Row 2 starts at element 2**31: a 32-bit offset would wrap (the interpreter wraps int32 too)."""
    V, stride = 256, 2**30
    storage = torch.empty(2 * stride + V, dtype=torch.bfloat16, device=DEVICE)
    logits = storage.as_strided((3, V), (stride, 1))
    logits.copy_(make_logits((3, V), torch.bfloat16))
    labels = torch.tensor([1, 2, 3], device=DEVICE)
    lp = fastppo.token_logprobs(logits, labels)
    torch.testing.assert_close(lp, ref.token_logprobs(logits.contiguous(), labels), rtol=1e-6, atol=1e-6)


def test_empty_input():
    logits = torch.randn(0, 5, 11, device=DEVICE, requires_grad=True)
    lp = fastppo.token_logprobs(logits, torch.zeros(0, 5, dtype=torch.long, device=DEVICE))
    lp.sum().backward()
    assert lp.shape == (0, 5) and logits.grad.shape == logits.shape


def test_gradcheck_float64():
    logits = torch.randn(3, 4, 13, dtype=torch.float64, device=DEVICE, requires_grad=True)
    labels = make_labels((3, 4), 13)

    def f(x):
        lp, ent = fastppo.token_logprobs(x, labels, return_entropy=True)
        return lp, ent

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_torch_backend_matches_kernel():
    logits = make_logits((3, 5, 301), torch.bfloat16).requires_grad_()
    labels = make_labels((3, 5), 301)
    lp, ent = fastppo.token_logprobs(logits, labels, temperature=0.9, return_entropy=True)
    (lp.sum() + 0.5 * ent.sum()).backward()
    g1 = logits.grad.clone()
    logits.grad = None
    with fastppo.use_backend("torch"):
        lp2, ent2 = fastppo.token_logprobs(logits, labels, temperature=0.9, return_entropy=True)
        (lp2.sum() + 0.5 * ent2.sum()).backward()
    torch.testing.assert_close(lp, lp2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1.float(), logits.grad.float(), rtol=0.02, atol=1e-3)


# ----------------------------------------------------------------------------- any magnitude (issue #21 class 2)
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name,dtype", MAGNITUDES)
def test_any_logit_magnitude_is_as_exact_as_fp32_log_softmax(backend, name, dtype):
    """logp, entropy and the gradient to fp32 rounding of the float64 values at any magnitude: the row max
    and log-sum are saved apart (one absolute fp32 lse lost 4e-4 at -1e4, 0.03 at 1e6, gave logp 0 and NaN
    entropy across +-3e38)."""
    V = 203
    logits = magnitude_logits(name, dtype, (2, 3, V))
    labels = make_labels((2, 3), V)
    labels[0, 0] = 0                                             # a label at the row's top
    with fastppo.use_backend(backend):
        _check(logits, labels)
        if name.startswith("bf16"):
            lp, ent = fastppo.token_logprobs(logits, labels, return_entropy=True)
            top = (logits[0, 0] == logits[0, 0].max()).sum().item()      # the entries at bf16's 3e38
            assert abs(lp[0, 0].item() + math.log(top)) < 1e-6 and abs(ent[0, 0].item() - math.log(top)) < 1e-6


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name,dtype", MAGNITUDES)
def test_fused_ppo_loss_at_any_magnitude(backend, name, dtype):
    """The fused loss shares token_logprobs' saved statistics: loss, log-probs, entropy, gradient vs float64."""
    B, T, V = 2, 3, 203
    logits = magnitude_logits(name, dtype, (B, T, V))
    labels = make_labels((B, T), V, holes=0.0)
    old, adv = torch.randn(B, T, device=DEVICE) - 4.0, torch.randn(B, T, device=DEVICE)
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    kw = dict(entropy_coef=0.1, return_entropy=True)
    x = logits.detach().clone().requires_grad_()
    with fastppo.use_backend(backend):
        out = fastppo.fused_ppo_loss(x, labels, old, adv, mask, **kw)
        out.loss.backward()
    xr = logits.detach().double().requires_grad_()
    rout = ref.fused_ppo_loss(xr, labels, old.double(), adv.double(), mask, **kw)
    rout.loss.backward()
    assert_close_by_dtype(out.loss, rout.loss, torch.float32)
    assert_close_by_dtype(out.logprobs, rout.logprobs, torch.float32)
    assert_close_by_dtype(out.entropy, rout.entropy, torch.float32)
    assert_close_by_dtype(x.grad, xr.grad, dtype)
