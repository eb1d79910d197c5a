"""fused_ppo_loss(kept=, cu_seqlens=): packed rows are rows; loss, stats, per-token outputs and gradients equal
the same sequences padded to [S, T] (the unsharded op and the float64 reference of the padded batch), both
backends, a scalar and a per-token temperature, masks with holes, an empty sequence, NaN in a masked row."""

import pytest
import torch

import fastppo
from fastppo import KeptSet
from fastppo.kept_filters import kept_mask_from_filters
from fastppo.reference_kept import kept_fused_ppo_loss
from tests.helpers import DEVICE, assert_close_by_dtype
from tests.packing import pack_case

BACKENDS = ("torch", "triton")
V = 67


def _pad_rows(case, x, fill):
    out = torch.full((case.S * case.T, x.shape[-1]), fill, dtype=x.dtype, device=x.device)
    return out.index_copy(0, case.index, x).view(case.S, case.T, -1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_token_tau", [False, True])
def test_fused_kept_packed_equals_padded(backend, per_token_tau):
    case = pack_case((5, 0, 1, 7, 3), holes=True)
    g = torch.Generator().manual_seed(4)
    n = case.total
    logits = torch.randn(n, V, generator=g) * 2
    kept = kept_mask_from_filters(logits, top_p=0.85, top_k=30)
    labels = torch.multinomial(kept.float(), 1, generator=g)[:, 0]
    kept[3] = False                                        # an empty kept row, masked out
    mask = case.mask.cpu() & (torch.arange(n) != 3)
    logits[4] = float("nan")                               # NaN in a masked row: never read
    mask[4] = False
    old = -torch.rand(n, generator=g) * 3
    adv = torch.randn(case.S, generator=g)
    ref_lp = old + 0.1 * torch.randn(n, generator=g)
    tau = torch.rand(n, generator=g) + 0.5 if per_token_tau else 0.8
    kw = dict(policy_loss="gspo", agg="seq-mean-token-mean", kl_coef=0.1, entropy_coef=0.02, clip_high=0.28)
    dev = lambda t: t.to(DEVICE) if isinstance(t, torch.Tensor) else t  # noqa: E731
    logits, labels, mask, old, adv, ref_lp, tau = map(dev, (logits, labels, mask, old, adv, ref_lp, tau))
    ks = KeptSet.from_mask(kept).to(DEVICE)
    # packed
    z = logits.clone().requires_grad_()
    with fastppo.use_backend(backend):
        out = fastppo.fused_ppo_loss(z, labels, old, adv, mask, kept=ks, temperature=tau, cu_seqlens=case.cu,
                                     ref_logprobs=ref_lp, return_entropy=True, **kw)
    (out.loss * 0.7).backward()
    # the same batch padded: the unsharded op and the float64 reference
    pad_kept = KeptSet.from_mask(_pad_rows(case, kept.to(DEVICE), False))
    pad = dict(temperature=case.pad(tau, fill=1.0) if per_token_tau else tau, ref_logprobs=case.pad(ref_lp), **kw)
    zp = _pad_rows(case, logits, 0.0).requires_grad_()
    with fastppo.use_backend(backend):
        padded = fastppo.fused_ppo_loss(zp, case.pad(labels), case.pad(old), adv, case.pad(mask, fill=False),
                                        kept=pad_kept, return_entropy=True, **pad)
    (padded.loss * 0.7).backward()
    z64 = _pad_rows(case, logits.double(), 0.0).requires_grad_()
    pad64 = dict(pad, temperature=pad["temperature"].double() if per_token_tau else tau,
                 ref_logprobs=pad["ref_logprobs"].double())
    want = kept_fused_ppo_loss(z64, case.pad(labels), pad_kept, case.pad(old.double()), adv.double(),
                               case.pad(mask, fill=False), return_entropy=True, **pad64)
    (want.loss * 0.7).backward()

    assert_close_by_dtype(out.loss, want.loss, torch.float32)
    torch.testing.assert_close(out.loss, padded.loss, rtol=1e-6, atol=1e-7)
    for name, scale in (("logprobs", 1), ("entropy", 1), ("kl", 10)):    # kl = exp(d) - d - 1 up to ~20 here
        got = getattr(out, name).reshape(-1)                # (the packed kl is [1, total], as without kept)
        assert_close_by_dtype(torch.where(mask, got, 0.0), torch.where(mask, case.unpad(getattr(want, name)), 0.0),
                              torch.float32, scale=scale)
        torch.testing.assert_close(got, case.unpad(getattr(padded, name)))
    for k in out.stats:
        torch.testing.assert_close(out.stats[k], padded.stats[k], rtol=1e-6, atol=1e-7)
    grad_want = z64.grad.reshape(-1, V).index_select(0, case.index)
    assert_close_by_dtype(z.grad, grad_want, torch.float32)
    torch.testing.assert_close(z.grad, zp.grad.reshape(-1, V).index_select(0, case.index))
    assert (z.grad[~mask] == 0).all() and torch.isfinite(z.grad).all()
    assert (out.logprobs[~mask] == 0).all()


def test_fused_kept_packed_validation():
    case = pack_case((2, 2))
    logits = torch.randn(4, V, device=DEVICE)
    ks = KeptSet.from_lists([[0, 1], [2], [3], [4]]).to(DEVICE)
    labels = torch.tensor([1, 2, 3, 4], device=DEVICE)
    old, adv = torch.zeros(4, device=DEVICE), torch.zeros(2, device=DEVICE)
    out = fastppo.fused_ppo_loss(logits, labels, old, adv, case.mask, kept=ks, cu_seqlens=case.cu)
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="kept has 2 rows but labels has 4 elements"):
        fastppo.fused_ppo_loss(logits, labels, old, adv, case.mask, kept=KeptSet.from_lists([[1], [2]]).to(DEVICE),
                               cu_seqlens=case.cu)
    with pytest.raises(ValueError, match="logits must be packed"):
        fastppo.fused_ppo_loss(logits.view(2, 2, V), labels.view(2, 2), old.view(2, 2), adv, case.mask.view(2, 2),
                               kept=ks, cu_seqlens=case.cu)
