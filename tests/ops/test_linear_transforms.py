"""linear_logprobs / fused_linear_ppo_loss with the logit transform (softcap, scale, temperature), TRL's extra
outputs, mixed hidden / weight dtypes, and float64 gradchecks of the transformed head."""

import pytest
import torch

import fastppo
from tests.helpers import DEVICE, make_labels, make_mask
from tests.ops.test_linear import _inputs, _ref_grads


def _ref_extras(hidden, weight, bias, labels, tau, softcap, scale):
    """float64 reference of TRL's extra outputs of z' = softcap(scale * (h W^T + b)) / tau."""
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / tau
    logp = torch.log_softmax(z, -1)
    y = labels.clamp(min=0)
    lssp = torch.logsumexp(2 * logp, -1)
    top1 = z.argmax(-1) == y
    ign = labels == -100
    return lssp.masked_fill(ign, 0), z.mean(-1).masked_fill(ign, 0), top1 & ~ign, z.abs().max().item()


SOFTCAP_CASES = [(None, 1.0, 1.0), (3.0, 1.0, 1.0), (2.5, 0.7, 0.8), (None, 1.9, 1.3)]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("softcap,scale,tau", SOFTCAP_CASES)
def test_softcap_scale_and_extras_against_float64(backend, softcap, scale, tau):
    N, H, V = 19, 24, 389
    hidden, weight, bias = _inputs(N, H, V, torch.float32)
    hidden = hidden * 2
    labels = make_labels((N,), V, holes=0.2)
    labels[0] = 7                       # a row whose label is its argmax: is_top1 True
    with torch.no_grad():
        weight[7] = hidden[0] * 2
    g_logp, g_ent = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    kw = dict(temperature=tau, final_logit_softcapping=softcap, logit_scale=scale)
    with fastppo.use_backend(backend):
        out = fastppo.linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], return_entropy=True,
                                      extra_outputs=("log_sum_sq_probs", "mean_logits", "is_top1"), **kw)
    (out.logprobs * g_logp + out.entropy * g_ent).sum().backward()
    rlp, rent, rgrads = _ref_grads(hidden, weight, bias, labels, g_logp, g_ent, **kw)
    lssp, mean, top1, zmax = _ref_extras(hidden, weight, bias, labels, tau, softcap, scale)
    atol = 4e-7 * max(zmax, 1.0) * H**0.5          # fp32 rounding of logits of size zmax, summed over H
    for got, want in ((out.logprobs, rlp), (out.entropy, rent), (out.log_sum_sq_probs, lssp),
                      (out.mean_logits, mean)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=atol)
    assert out.is_top1.dtype == torch.bool and torch.equal(out.is_top1, top1) and bool(top1[0])
    assert not any(t.requires_grad for t in (out.log_sum_sq_probs, out.mean_logits, out.is_top1))
    for leaf, want in zip(leaves, rgrads):
        torch.testing.assert_close(leaf.grad.double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("softcap,scale,tau", SOFTCAP_CASES[1:3])
def test_matches_trl_chunked_logprob_function(softcap, scale, tau):
    """Outputs and gradients of TRL 1.16's own fused head (`trl.trainer.utils._ChunkedLogProbFunction`, the
    same object as trl.kernels.ChunkedLogProbFunction) on valid labels (TRL scores only valid rows)."""
    from trl.kernels import ChunkedLogProbFunction

    N, H, V = 17, 32, 301
    hidden, weight, bias = _inputs(N, H, V, torch.float32)
    labels = torch.randint(0, V, (N,), device=DEVICE)
    g_logp, g_ent = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    names = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    a = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    trl_out = ChunkedLogProbFunction.apply(*a[:3], labels, tau, 128, softcap, scale, names)
    (trl_out[0] * g_logp + trl_out[1] * g_ent).sum().backward()
    b = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = fastppo.linear_logprobs(b[0], b[1], labels, bias=b[2], temperature=tau, return_entropy=True,
                                  final_logit_softcapping=softcap, logit_scale=scale,
                                  extra_outputs=("log_sum_sq_probs", "mean_logits", "is_top1"))
    (out.logprobs * g_logp + out.entropy * g_ent).sum().backward()
    for mine, theirs in zip(out[:4], trl_out[:4]):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.is_top1, trl_out[4])
    for x, y in zip(b, a):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-5)


def test_extra_outputs_return_type_and_checks():
    hidden, weight, b = _inputs(6, 8, 100, torch.float32)
    labels = make_labels((2, 3), 100, holes=0.3)
    out = fastppo.linear_logprobs(hidden.view(2, 3, 8), weight, labels, extra_outputs=("mean_logits",))
    assert isinstance(out, fastppo.LogprobOutputs) and out.entropy is None and out.is_top1 is None
    assert out.log_sum_sq_probs is None and out.mean_logits.shape == (2, 3)
    assert (out.mean_logits[labels == -100] == 0).all()
    plain = fastppo.linear_logprobs(hidden.view(2, 3, 8), weight, labels)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, out.logprobs)
    with pytest.raises(ValueError, match="subset"):
        fastppo.linear_logprobs(hidden, weight, labels.view(-1), extra_outputs=("entropy",))
    with pytest.raises(TypeError, match="tuple"):
        fastppo.linear_logprobs(hidden, weight, labels.view(-1), extra_outputs="is_top1")
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        fastppo.linear_logprobs(hidden, weight, labels.view(-1), final_logit_softcapping=0.0)
    with pytest.raises(ValueError, match="logit_scale"):
        fastppo.linear_logprobs(hidden, weight, labels.view(-1), logit_scale=float("nan"))
    with pytest.raises(ValueError, match="chunk_bytes"):
        fastppo.linear_logprobs(hidden, weight, labels.view(-1), chunk_bytes=0)


@pytest.mark.parametrize("h_dtype,w_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.bfloat16), (torch.float32, torch.float64)])
def test_mixed_hidden_and_weight_dtypes(h_dtype, w_dtype):
    """The product runs in the promoted dtype (fp32 hidden with a bf16 head: fp32 of the exact bf16 values);
    gradients come back in each input's dtype; fp64 anywhere gives fp64 outputs."""
    N, H, V = 13, 16, 200
    hidden = torch.randn(N, H, device=DEVICE).to(h_dtype)
    weight = (torch.randn(V, H, device=DEVICE) * 0.3).to(w_dtype)
    labels = make_labels((N,), V)
    g = torch.randn(N, device=DEVICE)
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    lp = fastppo.linear_logprobs(*leaves, labels)
    (lp * g.to(lp.dtype)).sum().backward()
    rlp, _, rgrads = _ref_grads(hidden, weight, None, labels, g, torch.zeros_like(g))
    assert lp.dtype == (torch.float64 if torch.float64 in (h_dtype, w_dtype) else torch.float32)
    wide = torch.promote_types(h_dtype, w_dtype) in (torch.float32, torch.float64)
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5 if wide else 1e-2, atol=1e-5 if wide else 1e-2)
    for leaf, want in zip(leaves, rgrads):
        assert leaf.grad.dtype == leaf.dtype
        tol = 1e-4 if leaf.dtype in (torch.float32, torch.float64) and wide else 2e-2
        torch.testing.assert_close(leaf.grad.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_gradcheck_float64_softcap_scale_bias():
    hidden, weight, b = _inputs(5, 4, 21, torch.float64)
    labels = make_labels((5,), 21, holes=0.2)
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]

    def f(h, w, bias):
        out = fastppo.linear_logprobs(h, w, labels, bias=bias, return_entropy=True, temperature=0.7,
                                      final_logit_softcapping=2.0, logit_scale=1.3)
        assert out[0].dtype == torch.float64
        return out

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, fast_mode=True)


def test_gradcheck_float64_fused_linear_loss():
    B, T, H, V = 2, 3, 3, 11
    hidden, weight, b = torch.randn(B, T, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64), \
        torch.randn(V, dtype=torch.float64)
    labels = make_labels((B, T), V, holes=0.2)
    mask = make_mask((B, T), empty_rows=())
    old = torch.randn(B, T, dtype=torch.float64) - 2.5
    adv = torch.randn(B, T, dtype=torch.float64)

    def f(h, w, bias):
        return fastppo.fused_linear_ppo_loss(h, w, labels, old, adv, mask, bias=bias, entropy_coef=0.1,
                                             final_logit_softcapping=3.0, logit_scale=0.9, temperature=1.1).loss

    assert torch.autograd.gradcheck(f, [t.requires_grad_() for t in (hidden, weight, b)], eps=1e-6, atol=1e-6,
                                    fast_mode=True)
