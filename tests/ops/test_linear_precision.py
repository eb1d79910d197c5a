"""linear_logprobs and fused_linear_ppo_loss against float64 at every logit magnitude (issue #21 class 2) and
with bf16 / fp16 inputs on the PyTorch backend, whose logits must be accumulated and kept in fp32 as on the
Triton path (class 8), forward and gradients, both backends."""

import pytest
import torch

import fastppo
from fastppo import reference as ref
from tests.helpers import DEVICE, assert_close_by_dtype, make_labels

BACKENDS = ["triton", "torch"]
N, H, V = 6, 16, 203


def _exact_inputs(offset):
    """Integer hidden, weights in steps of 1/8 and a bias at `offset`: every fp32 logit is exact, so the float64
    truth is that of the very logits the op computes, and only the softmax's precision is measured."""
    hidden = torch.randint(-2, 3, (N, H), device=DEVICE).float()
    weight = torch.randint(-4, 5, (V, H), device=DEVICE) / 8.0
    return hidden, weight, torch.full((V,), float(offset), device=DEVICE)


def _random_inputs(dtype):
    hidden = torch.randn(N, H, device=DEVICE).to(dtype)
    weight = (torch.randn(V, H, device=DEVICE) / 2).to(dtype)
    return hidden, weight, (torch.randn(V, device=DEVICE) * 0.5).to(dtype)


def _truth(hidden, weight, bias, labels):
    """float64 log-probs and entropy of the upcast inputs (leaves for the gradient)."""
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    lp, ent = ref.linear_logprobs(*leaves[:2], labels, bias=leaves[2], return_entropy=True)
    return lp, ent, leaves


def _check_grads(leaves, ref_leaves, dtype):
    """fp32: to fp32 rounding of sums of H (or V) terms. bf16 / fp16: the Triton path rounds dz to the GEMM
    dtype by design, so sums of rounded products (the tolerance of tests/ops/test_linear.py)."""
    for x, r in zip(leaves, ref_leaves):
        assert x.grad.dtype == dtype
        if dtype == torch.float32:
            assert_close_by_dtype(x.grad, r.grad, dtype, scale=H)
        else:
            torch.testing.assert_close(x.grad.double(), r.grad, rtol=2e-2, atol=2e-2 * r.grad.abs().max().item())


def _linear_logprobs(backend, inputs, dtype):
    labels = make_labels((N,), V)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    g_logp, g_ent = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    with fastppo.use_backend(backend):
        lp, ent = fastppo.linear_logprobs(*leaves[:2], labels, bias=leaves[2], return_entropy=True)
        (lp * g_logp + ent * g_ent).sum().backward()
    rlp, rent, ref_leaves = _truth(*inputs, labels)
    (rlp * g_logp.double() + rent * g_ent.double()).sum().backward()
    assert_close_by_dtype(lp, rlp, torch.float32)
    assert_close_by_dtype(ent, rent, torch.float32)
    _check_grads(leaves, ref_leaves, dtype)


def _fused_linear(backend, inputs, dtype):
    labels = make_labels((1, N), V, holes=0.0)
    old, adv = torch.randn(1, N, device=DEVICE) - 5.0, torch.randn(1, N, device=DEVICE)
    mask = torch.ones(1, N, dtype=torch.bool, device=DEVICE)
    kw = dict(entropy_coef=0.1, return_entropy=True)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with fastppo.use_backend(backend):
        out = fastppo.fused_linear_ppo_loss(leaves[0][None], leaves[1], labels, old, adv, mask, bias=leaves[2], **kw)
        out.loss.backward()
    rlp, rent, ref_leaves = _truth(*inputs, labels[0])
    rlp, rent = rlp[None], rent[None]
    rout = ref.compose_ppo_loss(rlp, rent, old.double(), adv.double(), mask, ref_logprobs=None, kl_coef=0.0,
                                kl_kind="k3", entropy_coef=0.1, clip_low=0.2, clip_high=None, dual_clip=None,
                                agg="token-mean", num_tokens=None, num_seqs=None, horizon=None)
    rout.loss.backward()
    assert_close_by_dtype(out.loss, rout.loss, torch.float32)
    assert_close_by_dtype(out.logprobs, rlp, torch.float32)
    assert_close_by_dtype(out.entropy, rent, torch.float32)
    _check_grads(leaves, ref_leaves, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", [_linear_logprobs, _fused_linear], ids=["linear_logprobs", "fused_linear_ppo_loss"])
@pytest.mark.parametrize("offset", [0.0, 1e4, -1e4, 1e6])
def test_any_logit_magnitude_matches_float64(backend, op, offset):
    """One absolute fp32 lse lost 4.5e-4 at +-1e4 and 0.016 at 1e6 (Triton), and the PyTorch backend's
    lse - sum(p z) entropy 4.5 nats at 1e4; the row max and log-sum kept apart are exact."""
    op(backend, _exact_inputs(offset), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", [_linear_logprobs, _fused_linear], ids=["linear_logprobs", "fused_linear_ppo_loss"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_keep_fp32_logits(backend, op, dtype):
    """bf16 / fp16 hidden and weight: the logits are accumulated and kept in fp32 (the PyTorch backend rounded
    hidden @ W.T to bf16 first: log-probs off by 2e-3, fp16 2e-4, the fused loss 6e-5)."""
    op(backend, _random_inputs(dtype), dtype)
