"""Packed sequences (cu_seqlens) on fused_ppo_loss and fused_linear_ppo_loss: loss, stats, per-token outputs
and gradients equal those of the same sequences padded to [S, T], on both backends, against a float64
reference of the padded batch."""

import pytest
import torch

import fastppo
from fastppo import reference as ref
from tests.helpers import DEVICE, assert_close_by_dtype
from tests.packing import pack_case

BACKENDS = ("torch", "triton")
V, H = 48, 16


def _inputs(case, dtype):
    g = torch.Generator().manual_seed(11)
    n = case.total
    logits = (torch.randn(n, V, generator=g) * 2).to(DEVICE, dtype)
    labels = torch.randint(0, V, (n,), generator=g).to(DEVICE)
    old = (-torch.rand(n, generator=g) * 4).to(DEVICE)
    adv = torch.randn(n, generator=g).to(DEVICE)
    lp = torch.log_softmax(logits.double(), -1).gather(-1, labels[:, None])[:, 0]
    rlp = (lp + 0.3 * torch.randn(n, generator=g, dtype=torch.float64).to(DEVICE)).float()
    return logits, labels, old, adv, rlp


def _pad_rows(case, x, fill):
    """Packed [total, V] rows -> padded [S, T, V]."""
    out = torch.full((case.S * case.T, x.shape[-1]), fill, dtype=x.dtype, device=x.device)
    return out.index_copy(0, case.index, x).view(case.S, case.T, -1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy_loss, agg", [("ppo", "token-mean"), ("gspo", "seq-mean-token-mean"),
                                              ("gmpo", "seq-mean-token-sum-norm"), ("cispo", "seq-mean-token-sum")])
def test_fused_ppo_loss_packed_equals_padded(backend, policy_loss, agg):
    case = pack_case((5, 1, 0, 7, 2), holes=True)
    logits, labels, old, adv, rlp = _inputs(case, torch.float32)
    kw = dict(policy_loss=policy_loss, agg=agg, kl_coef=0.1, entropy_coef=0.01)
    z = logits.clone().requires_grad_(True)
    with fastppo.use_backend(backend):
        out = fastppo.fused_ppo_loss(z, labels, old, adv, case.mask, ref_logprobs=rlp, cu_seqlens=case.cu, **kw)
    (out.loss * 0.7).backward()
    zp = _pad_rows(case, logits.double(), 0.0).requires_grad_(True)
    want = ref.fused_ppo_loss(zp, case.pad(labels), case.pad(old.double()), case.pad(adv.double()),
                              case.pad_mask(), ref_logprobs=case.pad(rlp.double()), **kw)
    (want.loss * 0.7).backward()
    assert_close_by_dtype(out.loss, want.loss, torch.float32)
    m = case.mask
    assert_close_by_dtype(out.logprobs.reshape(-1)[m], case.unpad(want.logprobs)[m], torch.float32)
    assert_close_by_dtype(out.kl.reshape(-1)[m], case.unpad(want.kl)[m], torch.float32)
    for k in ("clipfrac", "approx_kl", "entropy", "kl"):
        assert_close_by_dtype(out.stats[k], want.stats[k], torch.float32)
    assert_close_by_dtype(z.grad, zp.grad.reshape(-1, V).index_select(0, case.index), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy_loss", ("ppo", "gspo"))
def test_fused_linear_ppo_loss_packed_equals_padded(backend, policy_loss):
    """ppo takes the gradient-in-forward path (per-sequence advantages spread per chunk), gspo the
    recompute path."""
    case = pack_case((4, 0, 1, 6, 3), holes=True)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(case.total, H, generator=g).to(DEVICE)
    weight = (torch.randn(V, H, generator=g) * 0.3).to(DEVICE)
    labels = torch.randint(0, V, (case.total,), generator=g).to(DEVICE)
    old = (-torch.rand(case.total, generator=g) * 4).to(DEVICE)
    adv = torch.randn(case.S, generator=g).to(DEVICE)
    kw = dict(policy_loss=policy_loss, agg="seq-mean-token-mean", entropy_coef=0.02)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    with fastppo.use_backend(backend):
        out = fastppo.fused_linear_ppo_loss(h, w, labels, old, adv, case.mask, cu_seqlens=case.cu, **kw)
    (out.loss * 1.3).backward()
    hp = _pad_rows(case, hidden.double(), 0.0).requires_grad_(True)
    wp = weight.double().requires_grad_(True)
    want = ref.fused_ppo_loss(hp @ wp.T, case.pad(labels), case.pad(old.double()), adv.double(), case.pad_mask(),
                              **kw)
    (want.loss * 1.3).backward()
    assert_close_by_dtype(out.loss, want.loss, torch.float32)
    assert_close_by_dtype(h.grad, hp.grad.reshape(-1, H).index_select(0, case.index), torch.float32)
    assert_close_by_dtype(w.grad, wp.grad, torch.float32)


def test_fused_packed_refuses_unpacked_logits():
    case = pack_case((2, 2))
    logits, labels, old, adv, _ = _inputs(case, torch.float32)
    with pytest.raises(ValueError, match="logits must be packed"):
        fastppo.fused_ppo_loss(logits.view(2, 2, V), labels.view(2, 2), old.view(2, 2), adv.view(2, 2),
                               case.mask.view(2, 2), cu_seqlens=case.cu)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end at the packed length 4"):
        fastppo.fused_ppo_loss(logits, labels, old, adv, case.mask, cu_seqlens=torch.tensor([0, 2, 3]))
