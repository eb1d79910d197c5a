import pytest
import torch

import fastppo
from fastppo import reference as ref
from fastppo.bench.counters import PeakMemory, hide_interpreter_copies
from tests.helpers import DEVICE, make_labels, make_mask


def _inputs(N, H, V, dtype, bias=True):
    hidden = torch.randn(N, H, device=DEVICE).to(dtype)
    weight = (torch.randn(V, H, device=DEVICE) / H**0.5 * 2).to(dtype)
    b = (torch.randn(V, device=DEVICE) * 0.5).to(dtype) if bias else None
    return hidden, weight, b


def _grads(fn, tensors, g_logp, g_ent, **kw):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    lp, ent = fn(*leaves[:2], kw.pop("labels"), bias=leaves[2], return_entropy=True, **kw)
    (lp * g_logp.to(lp.dtype) + ent * g_ent.to(ent.dtype)).sum().backward()
    return lp, ent, [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,H,V,bias", [(37, 48, 1031, True), (16, 64, 777, False), (5, 19, 130, True)])
def test_matches_materialised_logits(dtype, N, H, V, bias):
    hidden, weight, b = _inputs(N, H, V, dtype, bias)
    labels = make_labels((N,), V)
    g_logp, g_ent = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    lp, ent, grads = _grads(fastppo.linear_logprobs, (hidden, weight, b), g_logp, g_ent, labels=labels,
                            temperature=0.9)
    as64 = [t.double() if t is not None else None for t in (hidden, weight, b)]
    rlp, rent, rgrads = _grads(ref.linear_logprobs, as64, g_logp, g_ent, labels=labels, temperature=0.9)
    tol = dict(rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(lp.double(), rlp, **tol)
    torch.testing.assert_close(ent.double(), rent, **tol)
    # gradients are sums over V (d hidden) or N (d weight) of rounded products: dtype tolerance x sqrt(terms)
    for got, want in zip(grads, rgrads):
        if want is None:
            assert got is None
            continue
        assert got.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
        else:
            scale = want.abs().max().item()
            torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * scale)


def test_ignore_index_temperature_and_strided_hidden():
    N, H, V = 20, 32, 300
    base = torch.randn(N, 2 * H, device=DEVICE)
    hidden = base[:, ::2]                           # non-unit last stride
    weight = torch.randn(V, H, device=DEVICE) * 0.2
    labels = make_labels((N,), V, holes=0.3)
    lp, ent = fastppo.linear_logprobs(hidden, weight, labels, temperature=1.3, return_entropy=True)
    rlp, rent = ref.linear_logprobs(hidden.double(), weight.double(), labels, temperature=1.3, return_entropy=True)
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), rent, rtol=1e-5, atol=1e-5)
    assert (lp[labels == -100] == 0).all()


def test_leading_dims_and_tied_weights():
    B, T, H, V = 2, 7, 16, 100
    emb = torch.nn.Embedding(V, H).to(DEVICE)
    hidden = torch.randn(B, T, H, device=DEVICE, requires_grad=True)
    labels = make_labels((B, T), V)
    lp = fastppo.linear_logprobs(hidden, emb.weight, labels)
    lp.sum().backward()
    assert lp.shape == (B, T) and hidden.grad.shape == hidden.shape and emb.weight.grad.shape == (V, H)


def test_gradcheck_float64():
    hidden, weight, b = _inputs(6, 5, 23, torch.float64)
    labels = make_labels((6,), 23, holes=0.2)
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]

    def f(h, w, bias):
        return fastppo.linear_logprobs(h, w, labels, bias=bias, return_entropy=True)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6)


class LargestAllocation(PeakMemory):
    """PeakMemory that also records the largest single storage allocated inside the block (bytes)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        for _, n in self._live.values():
            self.largest = max(self.largest, n)
        return out


@pytest.mark.parametrize("op", ["linear_logprobs", "fused_linear_ppo_loss"])
def test_no_allocation_near_the_logits(op):
    """Forward + backward never allocates a tensor of N*V/8 elements or more (chunk_bytes bounds the fp32
    logits chunk: 1/16 of the rows here), and beyond the returned gradients the peak stays under half
    of the bf16 logits it replaces."""
    N, H, V = 1024, 32, 1024
    hidden, weight, b = _inputs(N, H, V, torch.bfloat16)
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]
    labels = make_labels((N,), V)
    chunk_bytes = (N // 16) * V * 4
    with hide_interpreter_copies(), LargestAllocation() as pm:
        if op == "linear_logprobs":
            lp, ent = fastppo.linear_logprobs(*leaves[:2], labels, bias=leaves[2], return_entropy=True,
                                              chunk_bytes=chunk_bytes)
            loss = lp.sum() + ent.sum()
        else:
            mask = torch.ones(N, dtype=torch.bool)
            loss = fastppo.fused_linear_ppo_loss(*leaves[:2], labels, torch.zeros(N), torch.randn(N), mask,
                                                 bias=leaves[2], entropy_coef=0.1, chunk_bytes=chunk_bytes).loss
        loss.backward()
    returned = sum(t.grad.numel() * t.grad.element_size() for t in leaves)
    assert pm.largest < N * V // 8 * 4, (pm.largest, N * V // 8 * 4)   # bytes of N*V/8 fp32 elements
    assert pm.peak - returned < N * V * 2 / 2, (pm.peak - returned, N * V * 2)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_fused_linear_ppo_loss_matches_fused_ppo_loss(agg):
    B, T, H, V = 3, 6, 24, 517
    hidden = torch.randn(B, T, H, device=DEVICE)
    weight = torch.randn(V, H, device=DEVICE) * 0.3
    bias = torch.randn(V, device=DEVICE) * 0.1
    labels = make_labels((B, T), V, holes=0.1)
    mask = make_mask((B, T)) & (labels != -100)
    with torch.no_grad():
        lp0 = ref.linear_logprobs(hidden, weight, labels, bias=bias)
    old = lp0 + 0.2 * torch.randn(B, T, device=DEVICE)
    refp = lp0 + 0.1 * torch.randn(B, T, device=DEVICE)
    adv = torch.randn(B, device=DEVICE)
    kw = dict(ref_logprobs=refp, kl_coef=0.1, entropy_coef=0.01, clip_high=0.3, dual_clip=2.0, temperature=0.9,
              agg=agg)

    h1, w1, b1 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    out = fastppo.fused_linear_ppo_loss(h1, w1, labels, old, adv, mask, bias=b1, **kw)
    (out.loss * 1.5).backward()

    h2, w2, b2 = (t.double().requires_grad_() for t in (hidden, weight, bias))
    logits = h2 @ w2.t() + b2
    rout = ref.fused_ppo_loss(logits, labels, old, adv, mask, **kw)
    (rout.loss * 1.5).backward()
    torch.testing.assert_close(out.loss.double(), rout.loss, rtol=2e-5, atol=2e-5)
    for a, b_ in ((h1, h2), (w1, w2), (b1, b2)):
        torch.testing.assert_close(a.grad.double(), b_.grad, rtol=1e-4, atol=1e-6)
    for k in out.stats:
        torch.testing.assert_close(out.stats[k].double(), rout.stats[k].double(), rtol=1e-4, atol=1e-5)


def test_torch_backend_matches():
    hidden, weight, b = _inputs(12, 16, 200, torch.float32)
    labels = make_labels((12,), 200)
    a = fastppo.linear_logprobs(hidden, weight, labels, bias=b)
    with fastppo.use_backend("torch"):
        c = fastppo.linear_logprobs(hidden, weight, labels, bias=b)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    hidden, weight, b = _inputs(4, 8, 50, torch.float32)
    labels = make_labels((4,), 50)
    with pytest.raises(ValueError, match="agree on H"):
        fastppo.linear_logprobs(hidden, weight[:, :5], labels)
    with pytest.raises(ValueError, match="bias must be"):
        fastppo.linear_logprobs(hidden, weight, labels, bias=b[:3])
    with pytest.raises(ValueError, match="labels must be in"):
        fastppo.linear_logprobs(hidden, weight, labels + 50)


# ----------------------------------------------------------------------------- Hugging Face
def _tiny_llama(tie):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(DEVICE).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_causal_lm_logprobs_on_tiny_llama(tie):
    from fastppo.hf import causal_lm_logprobs, reference_causal_lm_logprobs

    model = _tiny_llama(tie)
    ids = torch.randint(0, 211, (2, 9), device=DEVICE)
    attn = torch.ones_like(ids)
    attn[1, -3:] = 0                                   # right padding
    lp = causal_lm_logprobs(model, ids, attn)
    want = reference_causal_lm_logprobs(model, ids, attn)
    keep = attn[:, 1:] == 1
    torch.testing.assert_close(lp[keep], want[keep], rtol=1e-4, atol=1e-4)
    assert (lp[~keep] == 0).all()
    lp.sum().backward()
    assert model.get_output_embeddings().weight.grad is not None
    assert model.get_input_embeddings().weight.grad is not None
