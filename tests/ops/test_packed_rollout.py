"""Packed sequences (cu_seqlens) on rollout_is_weights (both levels and modes) and mismatch_stats (per-token
and per-sequence statistics): results equal those of the same sequences padded to [S, T], against the float64
references of the padded batch (fastppo.reference / fastppo.reference_mismatch), on both backends; odd lengths,
length-1 sequences, empty masks and sequences, NaN at masked positions, strided packed views; the launches and
bytes per token of the padded layout (counters); bad input refused by name."""

import math

import pytest
import torch

import fastppo
from fastppo import reference as ref
from fastppo.bench.counters import EagerTraffic
from fastppo.kernels.launches import count_launches
from fastppo.reference_mismatch import mismatch_stats as ref_mismatch
from tests.helpers import DEVICE, assert_close_by_dtype
from tests.packing import pack_case

BACKENDS = ("torch", "triton")
LENGTHS = (5, 1, 0, 8, 3, 1, 13)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logprobs(case, dtype, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = (-torch.rand(case.total, generator=g, dtype=torch.float64) * 3).to(DEVICE)
    roll = old + spread * torch.randn(case.total, generator=g, dtype=torch.float64).to(DEVICE)
    old, roll = old.to(dtype), roll.to(dtype)
    old[~case.mask] = float("nan")            # masked positions are never read
    roll[~case.mask] = float("-inf")
    return old, roll


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("level", ("token", "sequence"))
@pytest.mark.parametrize("mode, lo, hi", (("truncate", None, 1.3), ("mask", 0.7, 1.3), ("truncate", 0.8, None)))
def test_rollout_is_weights_packed_equals_padded(dtype, level, mode, lo, hi):
    case = pack_case(LENGTHS, holes=True)
    old, roll = _logprobs(case, dtype)
    w, stats = fastppo.rollout_is_weights(old, roll, case.mask, level=level, mode=mode, max=hi, min=lo,
                                          cu_seqlens=case.cu.int())
    pad_old, pad_roll, pad_m = case.pad(old.double(), fill=math.nan), case.pad(roll.double()), case.pad_mask()
    want = ref.rollout_is_weights(pad_old, pad_roll, pad_m, level=level, mode=mode, max=hi, min=lo)
    assert w.shape == (case.total,) and w.dtype == _acc(dtype)
    assert_close_by_dtype(w.double(), case.unpad(want), dtype)
    assert (w[~case.mask] == 0).all()
    # stats over the valid tokens (token level) or the non-empty sequences (sequence level)
    valid = pad_m if level == "token" else pad_m.any(-1, keepdim=True).expand_as(pad_m)
    vals = want[valid] if level == "token" else want.sum(-1)[pad_m.any(-1)] / pad_m.sum(-1)[pad_m.any(-1)]
    ratio = torch.exp(torch.where(pad_m, pad_old - pad_roll, 0.0).sum(-1))[pad_m.any(-1)] if level == "sequence" \
        else torch.exp(pad_old - pad_roll)[pad_m]
    outside = ((ratio < (lo or 0.0)) | (ratio > (hi or math.inf))).double().mean()
    frac = "is_clipped_frac" if mode == "truncate" else "is_masked_frac"
    for key, v in (("is_mean", vals.mean()), ("is_min", vals.min()), ("is_max", vals.max()), (frac, outside)):
        assert_close_by_dtype(stats[key].double(), v, dtype)
    padded_w, padded_stats = fastppo.rollout_is_weights(case.pad(old), case.pad(roll), pad_m, level=level, mode=mode,
                                                        max=hi, min=lo)
    assert_close_by_dtype(w, case.unpad(padded_w), _acc(dtype), atol=1e-6)   # the sequence sum's order may differ
    for key in stats:
        assert_close_by_dtype(stats[key], padded_stats[key], torch.float32, atol=1e-6)


def test_rollout_is_weights_packed_length_one_empty_mask_and_views():
    case = pack_case((1, 1, 1, 1))
    base, roll = _logprobs(case, torch.float32, spread=1.0)
    wide = torch.stack((base, torch.full_like(base, math.nan)), -1).reshape(-1)
    old = wide[::2]                                          # a strided packed view
    assert old.stride() == (2,)
    w, _ = fastppo.rollout_is_weights(old, roll, case.mask, level="sequence", max=1.5, cu_seqlens=case.cu)
    want = ref.rollout_is_weights(case.pad(base.double()), case.pad(roll.double()), case.pad_mask(), level="sequence",
                                  max=1.5)
    assert_close_by_dtype(w, case.unpad(want), torch.float32)
    none = torch.zeros_like(case.mask)
    w, stats = fastppo.rollout_is_weights(old, roll, none, level="sequence", cu_seqlens=case.cu)
    assert (w == 0).all() and stats["is_mean"].item() == 0.0 and stats["is_clipped_frac"].item() == 0.0


@pytest.mark.parametrize("level", ("token", "sequence"))
def test_rollout_is_weights_packed_no_host_sync_and_padded_traffic(level):
    """Equal lengths (so padding adds nothing): the packed op makes no host sync; at token level it makes the
    padded op's launches and moves its bytes; at sequence level it adds the tokens' sequence ids (arange,
    searchsorted, clamp_: 41 B per token) and the gather that spreads the sequence weights (13 B per token):
    57 B per token and 4 launches measured, bounded here by 64 B and 4."""
    case = pack_case((6, 6, 6, 6))
    old, roll = (torch.randn(case.total, device=DEVICE) for _ in range(2))
    padded_args = (case.pad(old), case.pad(roll), case.pad_mask())
    with EagerTraffic() as packed:
        torch.ops.fastppo.rollout_is_weights(old, roll, case.mask, level, "truncate", 2.0, None, case.cu)
    with EagerTraffic() as padded:
        torch.ops.fastppo.rollout_is_weights(*padded_args, level, "truncate", 2.0, None)
    assert packed.host_syncs == padded.host_syncs == 0
    if level == "token":
        assert (packed.launches, packed.bytes) == (padded.launches, padded.bytes)
    else:
        assert set(packed.per_op) - set(padded.per_op) == {"arange", "searchsorted", "clamp_", "index",
                                                            "segment_reduce"}
        assert packed.launches <= padded.launches + 4
        assert packed.bytes - padded.bytes <= 64 * case.total


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
def test_mismatch_stats_packed_equals_padded(backend, dtype, monkeypatch):
    from fastppo.kernels import _config as cfg

    monkeypatch.setattr(cfg, "MISMATCH_BLOCK_T", 4)   # a sequence spans several time blocks
    case = pack_case(LENGTHS, holes=True)
    old, roll = _logprobs(case, dtype, seed=2)
    with fastppo.use_backend(backend):
        out = fastppo.mismatch_stats(old, roll, case.mask, eps=0.2, cu_seqlens=case.cu.int())
        padded = fastppo.mismatch_stats(case.pad(old), case.pad(roll), case.pad_mask(), eps=0.2)
    want = ref_mismatch(case.pad(old), case.pad(roll), case.pad_mask(), eps=0.2)
    assert set(out) == set(want)
    for key, v in want.items():
        assert out[key].dtype == _acc(dtype)
        tol = 1e-12 if dtype == torch.float64 else 5e-5 * max(1, v.abs())
        assert_close_by_dtype(out[key], v, _acc(dtype), atol=tol)
        assert_close_by_dtype(out[key], padded[key], _acc(dtype), atol=0.0 if backend == "triton" else 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mismatch_stats_packed_length_one_empty_and_nan(backend):
    case = pack_case((1, 1, 1, 2))
    old, roll = _logprobs(case, torch.float32, spread=1.0)
    view = torch.stack((old, old), -1).reshape(-1)[::2]
    with fastppo.use_backend(backend):
        out = fastppo.mismatch_stats(view, roll, case.mask, cu_seqlens=case.cu)
        none = fastppo.mismatch_stats(old, roll, torch.zeros_like(case.mask), cu_seqlens=case.cu)
        bad = old.clone()
        bad[-1] = float("nan")
        nan = fastppo.mismatch_stats(bad, roll, case.mask, cu_seqlens=case.cu)
    want = ref_mismatch(case.pad(old), case.pad(roll), case.pad_mask())
    for key, v in want.items():
        assert_close_by_dtype(out[key], v, torch.float32, atol=5e-5 * max(1, v.abs()))
    assert none["num_tokens"].item() == none["num_seqs"].item() == 0.0
    assert all(math.isnan(none[k].item()) for k in none if not k.startswith("num_"))
    for key in ("k3_kl_token", "max_abs_diff_token", "k3_kl_seq", "chi2_seq"):   # a valid NaN propagates
        assert math.isnan(nan[key].item()), key


def test_mismatch_stats_packed_launches_and_bytes_as_padded():
    """Equal lengths: the same two launches and programs as padded; the bytes of the padded call plus the
    offsets (2 int64 per program of the first launch)."""
    case = pack_case((6, 6, 6, 6))
    old, roll = _logprobs(case, torch.float32)
    padded_args = (case.pad(old), case.pad(roll), case.pad_mask())
    with fastppo.use_backend("triton"), count_launches() as packed:
        fastppo.mismatch_stats(old, roll, case.mask, cu_seqlens=case.cu)
    with fastppo.use_backend("triton"), count_launches() as padded:
        fastppo.mismatch_stats(*padded_args)
    assert dict(packed) == dict(padded) == {"mismatch_seq": 1, "mismatch_finish": 1}
    assert packed.programs == padded.programs
    assert packed.io_bytes == padded.io_bytes + case.cu.numel() * 8


def test_packed_rollout_ops_refuse_bad_inputs():
    case = pack_case((2, 3))
    x = torch.zeros(case.total, device=DEVICE)
    with pytest.raises(ValueError, match="old_logprobs must be packed 1-D"):
        fastppo.rollout_is_weights(x.view(1, -1), x.view(1, -1), case.mask.view(1, -1), cu_seqlens=case.cu)
    with pytest.raises(ValueError, match="end at the packed length 5"):
        fastppo.rollout_is_weights(x, x, case.mask, cu_seqlens=torch.tensor([0, 2, 4], device=DEVICE))
    with pytest.raises(ValueError, match="train_logprobs must be packed 1-D"):
        fastppo.mismatch_stats(x.view(1, -1), x.view(1, -1), case.mask.view(1, -1), cu_seqlens=case.cu)
    with pytest.raises(TypeError, match="cu_seqlens must be int32 or int64"):
        fastppo.mismatch_stats(x, x, case.mask, cu_seqlens=case.cu.float())


@pytest.mark.parametrize("level", ("token", "sequence"))
def test_packed_rollout_is_weights_op_passes_opcheck(level):
    case = pack_case((3, 0, 1, 4), holes=True)
    old, roll = _logprobs(case, torch.float32)
    wide = torch.stack((roll, roll), -1).reshape(-1)[::2]     # a strided view
    torch.library.opcheck(torch.ops.fastppo.rollout_is_weights,
                          (old, wide, case.mask, level, "mask", 2.0, 0.5, case.cu.int()),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
