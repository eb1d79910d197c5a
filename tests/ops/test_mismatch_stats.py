"""mismatch_stats against a float64 per-sequence computation of its definitions (fastppo.reference_mismatch, after
verl 0.9.1's compute_offpolicy_metrics) on both backends: dtypes, masks with holes / empty sequences / NaN at
masked positions, strided inputs, several time blocks and finishing blocks, small and large log ratios, NaN
propagation, nothing valid, determinism, two launches, bad input."""

import math

import pytest
import torch

import fastppo
from fastppo.kernels.launches import count_launches
from fastppo.reference_mismatch import mismatch_stats as ref_stats
from tests.helpers import DEVICE, assert_close_by_dtype, make_mask

BACKENDS = ["triton", "torch"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inputs(shape, dtype, spread=0.1):
    train = (torch.randn(shape, device=DEVICE) - 2.0).to(dtype)
    rollout = (train.double() + spread * torch.randn(shape, device=DEVICE, dtype=torch.float64)).to(dtype)
    return train, rollout


def _run(backend, *args, **kw):
    with fastppo.use_backend(backend), count_launches() as launches:
        out = fastppo.mismatch_stats(*args, **kw)
    assert launches["mismatch_seq"] == launches["mismatch_finish"] == (backend == "triton")
    return out


def _check(out, ref, dtype):
    assert set(out) == set(ref)
    for key, want in ref.items():
        got = out[key]
        assert got.dim() == 0 and got.dtype == _acc(dtype), key
        if math.isnan(want.item()):
            assert math.isnan(got.item()), key
        else:
            # sums over up to ~1e3 tokens in fp32 (and exp of a sequence's sum): relative slack 5e-5
            rel = 1e-12 if dtype == torch.float64 else 5e-5
            assert_close_by_dtype(got, want, _acc(dtype), atol=rel * max(1.0, abs(want.item())))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [0.1, 0.2])
def test_matches_float64_definitions(backend, dtype, eps):
    train, rollout = _inputs((6, 45), dtype)
    mask = make_mask((6, 45), empty_rows=(2,))
    train[~mask] = float("nan")          # never read
    rollout[~mask] = float("-inf")
    _check(_run(backend, train, rollout, mask, eps=eps), ref_stats(train, rollout, mask, eps=eps), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 1500), (300, 3)])
def test_several_time_and_finishing_blocks(backend, shape):
    train, rollout = _inputs(shape, torch.float32, spread=0.3)
    mask = make_mask(shape, empty_rows=(0,))
    _check(_run(backend, train, rollout, mask), ref_stats(train, rollout, mask), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_float_mask(backend):
    train, rollout = _inputs((40, 5), torch.float32)
    mask = make_mask((5, 40)).float()
    args = (train.t(), rollout.t(), mask)
    _check(_run(backend, *args), ref_stats(*args), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spread", [1e-4, 5.0])
def test_small_and_large_log_ratios(backend, spread):
    """Tiny |d|: k3 ~ d^2 / 2 keeps its digits (no exp(d) - d - 1 cancellation); large |d|: rho and rho^2 use
    log ratios clamped to +-20 (sequence sums reach past it), k3 does not."""
    train, rollout = _inputs((4, 30), torch.float32, spread=spread)
    mask = make_mask((4, 30), empty_rows=())
    out = _run(backend, train, rollout, mask)
    ref = ref_stats(train, rollout, mask)
    _check(out, ref, torch.float32)
    if spread < 1:
        torch.testing.assert_close(out["k3_kl_token"].double(), ref["k3_kl_token"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_dimensional_is_one_sequence(backend):
    train, rollout = _inputs((50,), torch.float32)
    mask = make_mask((1, 50), empty_rows=())[0]
    _check(_run(backend, train, rollout, mask), ref_stats(train[None], rollout[None], mask[None]), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_at_a_valid_token_propagates(backend):
    train, rollout = _inputs((3, 20), torch.float32)
    mask = torch.ones(3, 20, dtype=torch.bool)
    train[1, 4] = float("nan")
    out = _run(backend, train, rollout, mask)
    for key in ("k3_kl_token", "chi2_token", "max_abs_diff_token", "ratio_mean_token", "k3_kl_seq",
                "max_abs_diff_seq"):
        assert torch.isnan(out[key]), key
    assert out["num_tokens"] == 60


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_valid_gives_nan_and_zero_counts(backend):
    train, rollout = _inputs((3, 20), torch.float32)
    out = _run(backend, train, rollout, torch.zeros(3, 20, dtype=torch.bool))
    assert out["num_tokens"] == 0 and out["num_seqs"] == 0
    assert all(torch.isnan(v) for k, v in out.items() if not k.startswith("num_"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    train, rollout = _inputs((64, 33), torch.float32, spread=0.5)
    mask = make_mask((64, 33))
    a = _run(backend, train, rollout, mask)
    b = _run(backend, train, rollout, mask)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_names_the_argument():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        fastppo.mismatch_stats(x, x[:, :2], m)
    with pytest.raises(ValueError, match="mask"):
        fastppo.mismatch_stats(x, x, m[:1])
    with pytest.raises(ValueError, match="mask"):
        fastppo.mismatch_stats(x, x, torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="eps"):
        fastppo.mismatch_stats(x, x, m, eps=1.5)
    with pytest.raises(TypeError, match="train_logprobs"):
        fastppo.mismatch_stats(x.long(), x, m)
    with pytest.raises(ValueError, match="train_logprobs"):
        fastppo.mismatch_stats(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.ones(2, 3, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_registered_op_passes_opcheck(backend):
    train, rollout = _inputs((3, 7), torch.float32)
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.fastppo.mismatch_stats, (train.t(), rollout.t(), make_mask((7, 3)), None, 0.1,
                                                             backend), test_utils=checks)
    cu = torch.tensor([0, 4, 4, 7], device=DEVICE)   # packed: three sequences, one empty
    torch.library.opcheck(torch.ops.fastppo.mismatch_stats, (train[0], rollout[0], make_mask((7,)), cu, 0.1, backend),
                          test_utils=checks)
