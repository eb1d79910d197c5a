"""Packed sequences (cu_seqlens) on ppo_policy_loss and value_loss: loss, stats and gradients equal those
of the same sequences padded to [S, T] (T the longest), on both backends, against a float64 reference of
the padded batch; the same launches, and bytes per token, as padded; bad cu_seqlens refused by name."""

import pytest
import torch

import fastppo
from fastppo import reference as ref
from tests.helpers import DEVICE, assert_close_by_dtype
from tests.packing import pack_case

VARIANTS = ("ppo", "gspo", "gspo_token", "cispo", "sapo", "gmpo", "gpg")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")
BACKENDS = ("torch", "triton")


def _policy_inputs(case, dtype, per_seq_adv=False):
    g = torch.Generator().manual_seed(3)
    n = case.total
    logp = (-torch.rand(n, generator=g) * 2).to(DEVICE, dtype)
    old = (logp.double() + 0.3 * torch.randn(n, generator=g, dtype=torch.float64).to(DEVICE)).to(dtype)
    adv = torch.randn(case.S if per_seq_adv else n, generator=g).to(DEVICE, dtype)
    isw = (0.5 + torch.rand(n, generator=g)).to(DEVICE, dtype)
    return logp, old, adv, isw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy_loss", VARIANTS)
def test_policy_loss_packed_equals_padded(backend, policy_loss):
    case = pack_case((5, 1, 0, 8, 3), holes=True)
    logp, old, adv, isw = _policy_inputs(case, torch.float32)
    g_up = torch.tensor(1.7)
    for agg in AGGS:
        kw = dict(policy_loss=policy_loss, agg=agg, rollout_is_weights=isw, dual_clip=3.0 if policy_loss == "ppo"
                  else None)
        x = logp.clone().requires_grad_(True)
        with fastppo.use_backend(backend):
            loss, stats = fastppo.ppo_policy_loss(x, old, adv, case.mask, cu_seqlens=case.cu, **kw)
        (loss * g_up).backward()
        xp = case.pad(logp.double(), fill=float("nan")).requires_grad_(True)
        want, want_stats = ref.ppo_policy_loss(xp, case.pad(old.double()), case.pad(adv.double()),
                                               case.pad_mask(), **{**kw, "rollout_is_weights":
                                                                   case.pad(isw.double(), fill=1.0)})
        (want * g_up.double()).backward()
        assert_close_by_dtype(loss, want, torch.float32)
        for k in ("clipfrac", "approx_kl", "ratio_mean", "ratio_max"):
            assert_close_by_dtype(stats[k], want_stats[k], torch.float32)
        assert_close_by_dtype(x.grad, case.unpad(xp.grad), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
def test_policy_loss_packed_dtypes_and_per_sequence_advantages(backend, dtype):
    case = pack_case((7, 2, 1, 0, 4))
    logp, old, adv, _ = _policy_inputs(case, dtype, per_seq_adv=True)
    for policy_loss in ("ppo", "gspo", "gmpo"):
        x = logp.clone().requires_grad_(True)
        with fastppo.use_backend(backend):
            loss, _ = fastppo.ppo_policy_loss(x, old, adv, case.mask, cu_seqlens=case.cu.int(),
                                              policy_loss=policy_loss, agg="seq-mean-token-sum-norm")
        (loss * 0.5).backward()
        xp = case.pad(logp.double()).requires_grad_(True)
        want, _ = ref.ppo_policy_loss(xp, case.pad(old.double()), adv.double(), case.pad_mask(),
                                      policy_loss=policy_loss, agg="seq-mean-token-sum-norm")
        (want * 0.5).backward()
        assert_close_by_dtype(loss, want, dtype)
        assert_close_by_dtype(x.grad.double(), case.unpad(xp.grad), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_loss_packed_equals_padded(backend):
    case = pack_case((4, 1, 9, 0, 2), holes=True)
    g = torch.Generator().manual_seed(5)
    v, old, ret = (torch.randn(case.total, generator=g).to(DEVICE) for _ in range(3))
    for agg in AGGS:
        x = v.clone().requires_grad_(True)
        with fastppo.use_backend(backend):
            loss, stats = fastppo.value_loss(x, old, ret, case.mask, clip=0.2, agg=agg, cu_seqlens=case.cu,
                                             horizon=None)
        (loss * 3.0).backward()
        xp = case.pad(v.double()).requires_grad_(True)
        want, want_stats = ref.value_loss(xp, case.pad(old.double()), case.pad(ret.double()), case.pad_mask(),
                                          clip=0.2, agg=agg)
        (want * 3.0).backward()
        assert_close_by_dtype(loss, want, torch.float32)
        assert_close_by_dtype(stats["vf_clipfrac"], want_stats["vf_clipfrac"], torch.float32)
        assert_close_by_dtype(x.grad, case.unpad(xp.grad), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_empty_mask_and_all_length_one(backend):
    case = pack_case((1, 1, 1))
    logp, old, adv, _ = _policy_inputs(case, torch.float32)
    with fastppo.use_backend(backend):
        loss, _ = fastppo.ppo_policy_loss(logp, old, adv, torch.zeros(3, dtype=torch.bool, device=DEVICE),
                                          cu_seqlens=case.cu, agg="seq-mean-token-mean")
        assert loss.item() == 0.0
        loss, _ = fastppo.ppo_policy_loss(logp, old, adv, case.mask, cu_seqlens=case.cu, policy_loss="gspo")
    want, _ = ref.ppo_policy_loss(case.pad(logp.double()), case.pad(old.double()), case.pad(adv.double()),
                                  case.pad_mask(), policy_loss="gspo")
    assert_close_by_dtype(loss, want, torch.float32)


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([0, 3, 2, 6]), "non-decreasing"),
    (torch.tensor([1, 3, 6]), "start at 0"),
    (torch.tensor([0, 3, 5]), "end at the packed length 6"),
    (torch.tensor([0.0, 6.0]), "int32 or int64"),
    (torch.tensor([6]), r"\[S \+ 1\]"),
])
def test_bad_cu_seqlens_refused(bad, match):
    x = torch.zeros(6, device=DEVICE)
    m = torch.ones(6, dtype=torch.bool, device=DEVICE)
    with pytest.raises((ValueError, TypeError), match=match) as err:
        fastppo.ppo_policy_loss(x, x, x, m, cu_seqlens=bad.to(DEVICE))
    assert "cu_seqlens" in str(err.value)
    with pytest.raises(ValueError, match="packed 1-D"):
        fastppo.value_loss(x.view(2, 3), x.view(2, 3), x.view(2, 3), m.view(2, 3), cu_seqlens=torch.tensor([0, 6]))


def test_packed_launches_and_bytes_as_padded():
    """Equal lengths: the packed call makes the same launches as the padded one, and moves the same bytes
    plus the offsets (S + 1 int64 read by each per-sequence launch); ragged lengths move fewer."""
    from fastppo.kernels.launches import count_launches

    lengths = (6, 6, 6, 6)
    case = pack_case(lengths)
    logp, old, adv, isw = _policy_inputs(case, torch.float32)
    for policy_loss in ("ppo", "gspo", "gmpo"):
        kw = dict(policy_loss=policy_loss, rollout_is_weights=None, agg="seq-mean-token-mean")
        with fastppo.use_backend("triton"), count_launches() as packed:
            fastppo.ppo_policy_loss(logp, old, adv, case.mask, cu_seqlens=case.cu, **kw)
        with fastppo.use_backend("triton"), count_launches() as padded:
            fastppo.ppo_policy_loss(case.pad(logp), case.pad(old), case.pad(adv), case.pad_mask(), **kw)
        assert dict(packed) == dict(padded)
        reads_cu = sum(1 for launch in packed.log if launch.name in ("loss_agg_seq", "loss_agg_seq_finish",
                                                                      "loss_agg", "loss_agg_seq_grad"))
        assert packed.io_bytes == padded.io_bytes + reads_cu * case.cu.numel() * 8
        assert packed.programs == padded.programs


@pytest.mark.parametrize("policy_loss", ("ppo", "gspo", "gmpo"))
def test_packed_long_sequences_take_several_tiles(monkeypatch, policy_loss):
    """Tiles of 2 tokens: the average sequence has 2 tiles, the longest 6, so programs loop over their
    sequence's tiles j, j + n_tiles, ... (the grid-stride path) and the results stay the padded ones."""
    from fastppo.kernels import _config as cfg

    monkeypatch.setattr(cfg, "AGG_BLOCK_T", 2)
    case = pack_case((11, 1, 0, 2, 3), holes=True)
    logp, old, adv, isw = _policy_inputs(case, torch.float32)
    x = logp.clone().requires_grad_(True)
    with fastppo.use_backend("triton"):
        loss, stats = fastppo.ppo_policy_loss(x, old, adv, case.mask, cu_seqlens=case.cu, policy_loss=policy_loss,
                                              agg="seq-mean-token-mean", rollout_is_weights=isw)
    (loss * -2.0).backward()
    xp = case.pad(logp.double()).requires_grad_(True)
    want, want_stats = ref.ppo_policy_loss(xp, case.pad(old.double()), case.pad(adv.double()), case.pad_mask(),
                                           policy_loss=policy_loss, agg="seq-mean-token-mean",
                                           rollout_is_weights=case.pad(isw.double(), fill=1.0))
    (want * -2.0).backward()
    assert_close_by_dtype(loss, want, torch.float32)
    assert_close_by_dtype(stats["ratio_max"], want_stats["ratio_max"], torch.float32)
    assert_close_by_dtype(x.grad, case.unpad(xp.grad), torch.float32)
