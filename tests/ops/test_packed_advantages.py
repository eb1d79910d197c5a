"""Packed sequences (cu_seqlens) on gae and kl_shaped_rewards: results equal those of the same sequences
padded to [S, T], on both backends, against the float64 reference of the padded batch."""

import pytest
import torch

import fastppo
from fastppo import reference as ref
from fastppo.kernels.launches import count_launches
from tests.helpers import DEVICE, assert_close_by_dtype
from tests.packing import pack_case

BACKENDS = ("torch", "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
def test_gae_packed_equals_padded(backend, dtype, monkeypatch):
    from fastppo.kernels import _config as cfg

    monkeypatch.setattr(cfg, "GAE_BLOCK_T", 4)   # sequences of up to 3 chunks: the carry crosses chunks
    case = pack_case((9, 1, 0, 5, 2, 12), holes=True)
    g = torch.Generator().manual_seed(7)
    r = torch.randn(case.total, generator=g).to(DEVICE, dtype)
    v = torch.randn(case.total, generator=g).to(DEVICE, dtype)
    with fastppo.use_backend(backend):
        adv, ret = fastppo.gae(r, v, case.mask, gamma=0.9, lam=0.8, cu_seqlens=case.cu.int())
    want_adv, want_ret = ref.gae(case.pad(r.double(), fill=float("nan")), case.pad(v.double(), fill=float("nan")),
                                 case.pad_mask(), gamma=0.9, lam=0.8)
    assert adv.shape == (case.total,)
    assert_close_by_dtype(adv.double(), case.unpad(want_adv), dtype)
    assert_close_by_dtype(ret.double(), case.unpad(want_ret), dtype)


def test_gae_packed_one_launch_same_bytes():
    case = pack_case((6, 6, 6))
    r, v = torch.randn(case.total, device=DEVICE), torch.randn(case.total, device=DEVICE)
    with fastppo.use_backend("triton"), count_launches() as packed:
        fastppo.gae(r, v, case.mask, gamma=0.9, lam=0.8, cu_seqlens=case.cu)
    with fastppo.use_backend("triton"), count_launches() as padded:
        fastppo.gae(case.pad(r), case.pad(v), case.pad_mask(), gamma=0.9, lam=0.8)
    assert dict(packed) == dict(padded) == {"gae": 1}
    assert packed.io_bytes == padded.io_bytes + case.cu.numel() * 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_shaped_rewards_packed_equals_padded(backend):
    case = pack_case((4, 0, 1, 7, 3), holes=True)
    g = torch.Generator().manual_seed(1)
    kl = torch.randn(case.total, generator=g).to(DEVICE)
    scores = torch.randn(case.S, generator=g).to(DEVICE)
    with fastppo.use_backend(backend):
        out = fastppo.kl_shaped_rewards(scores, kl, case.mask, kl_coef=0.05, cu_seqlens=case.cu)
    want = ref.kl_shaped_rewards(scores.double(), case.pad(kl.double()), case.pad_mask(), kl_coef=0.05)
    assert_close_by_dtype(out, case.unpad(want), torch.float32)


def test_packed_advantages_refuse_bad_inputs():
    case = pack_case((2, 3))
    x = torch.zeros(case.total, device=DEVICE)
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        fastppo.gae(x, x, case.mask, cu_seqlens=torch.tensor([0, 4, 3, 5]))
    with pytest.raises(ValueError, match="rewards must be packed 1-D"):
        fastppo.gae(x.view(1, -1), x.view(1, -1), case.mask.view(1, -1), cu_seqlens=case.cu)
    with pytest.raises(ValueError, match=r"scores must be \[2\]"):
        fastppo.kl_shaped_rewards(torch.zeros(3), x, case.mask, kl_coef=0.1, cu_seqlens=case.cu)
