"""rollout_correction against a float64 per-sequence computation of its formulas
(fastppo.reference_rollout_correction): every IS level / mode, batch normalisation, every rejection option alone
and combined, dtypes, masks with holes / empty sequences / NaN at masked positions, strided inputs, NaN at a
valid position, the op's fake implementation (opcheck), bad input. The hosts' own functions are compared in
tests/integrations/test_verl_rollout.py and test_openrlhf.py."""

import math

import pytest
import torch

import fastppo
from fastppo.modes import REJECTION_OPTIONS
from fastppo.reference_rollout_correction import rollout_correction as ref_rc
from tests.helpers import DEVICE, make_mask

DTYPES = [torch.bfloat16, torch.float32, torch.float64]
IS_CONFIGS = [
    dict(is_level="token"),
    dict(is_level="token", is_min=0.9, is_max=1.2),
    dict(is_level="token", is_mode="mask", is_min=0.8, is_max=1.25),
    dict(is_level="token", is_mode="mask", is_max=1.1, is_batch_normalize=True),
    dict(is_level="token", is_mode="seq-mask", is_min=0.95, is_max=1.05),
    dict(is_level="token", is_mode="seq-mask", is_min=0.9, is_max=1.1, log_ratio_bound=None, is_batch_normalize=True),
    dict(is_level="sequence", is_max=1.5),
    dict(is_level="sequence", is_mode="mask", is_min=0.5, is_max=2.0, is_batch_normalize=True),
    dict(is_level="token", is_batch_normalize=True, log_ratio_bound=0.2),
    dict(is_level="token", is_mode="mask", is_gate="binary_kl", is_max=0.004, log_ratio_bound=None),
    dict(is_level="token", is_mode="mask", is_gate="tv", is_min=0.01, is_max=0.06),
    dict(is_level="token", is_mode="seq-mask", is_gate="binary_kl", is_max=0.015, log_ratio_bound=None),
    dict(is_level="token", is_mode="seq-mask", is_gate="tv", is_max=0.045, is_batch_normalize=True),
]
GATES = [c for c in IS_CONFIGS if c.get("is_gate")]
THRESHOLDS = {"k1": 1.3, "k2": 0.01, "k3": 0.01}


def _inputs(shape, dtype, spread=0.15):
    torch.manual_seed(sum(shape))
    old = (-2.0 * torch.rand(shape, device=DEVICE, dtype=torch.float64)).to(dtype)
    roll = (old.double() + spread * torch.randn(shape, device=DEVICE, dtype=torch.float64)).to(dtype)
    mask = make_mask(shape, empty_rows=(2,))
    old[~mask] = float("nan")       # never read
    roll[~mask] = float("inf")
    return old, roll, mask


def _check(out, ref, dtype, mask):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    w, kept, stats = ref
    if w is None:
        assert out.weights is None
    else:
        assert out.weights.dtype == acc and not out.weights.requires_grad
        torch.testing.assert_close(out.weights.double(), w, rtol=rtol, atol=rtol)
        assert (out.weights[~mask.bool()] == 0).all()
    assert out.mask.dtype == mask.dtype and torch.equal(out.mask.bool(), kept)
    for key, want in stats.items():
        got = out.stats[key]
        assert got.dim() == 0 and got.dtype == acc, key
        assert math.isclose(got.item(), want, rel_tol=rtol, abs_tol=rtol), (key, got.item(), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", IS_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_is_weights_match_float64(cfg, dtype):
    old, roll, mask = _inputs((6, 41), dtype)
    _check(fastppo.rollout_correction(old, roll, mask, **cfg), ref_rc(old, roll, mask, **cfg), dtype, mask)


@pytest.mark.parametrize("cfg", GATES, ids=lambda c: f"{c['is_gate']}-{c['is_mode']}")
def test_divergence_gates_split_and_keep_the_ratio(cfg):
    """OpenRLHF's binary_kl / tv gates (FlashREINFORCE's trust region): each config drops some tokens and keeps
    others, a kept token's weight is its raw ratio exp(old - rollout), and the oob ratio is the fraction dropped."""
    old, roll, mask = _inputs((6, 41), torch.float64)
    out = fastppo.rollout_correction(old, roll, mask, **cfg)
    w_ref, _, _ = ref_rc(old, roll, mask, **cfg)
    m = mask.bool()
    dropped = (w_ref == 0) & m
    assert 0 < dropped.sum() < m.sum(), "threshold must split the tokens"
    ratio = torch.exp(old - roll)[m & ~dropped]
    if cfg.get("is_batch_normalize"):
        ratio = ratio / out.stats["rollout_is_batch_norm_factor"]
    torch.testing.assert_close(out.weights[m & ~dropped], ratio, rtol=1e-12, atol=0)
    assert out.stats["rollout_is_oob_ratio"].item() == pytest.approx(dropped.sum().item() / m.sum().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("option", REJECTION_OPTIONS)
def test_each_rejection_option_matches_float64(option, dtype):
    old, roll, mask = _inputs((7, 33), dtype)
    kind = option.rsplit("_", 1)[1]
    thr = {"seq_mean_k1": 1.03, "seq_sum_k1": 1.5, "seq_sum_k2": 0.25, "seq_sum_k3": 0.25, "seq_max_k2": 0.04,
           "seq_max_k3": 0.04}
    rej = {option: thr.get(option, THRESHOLDS[kind])}
    out = fastppo.rollout_correction(old, roll, mask, rejection=rej)
    assert 0 < out.stats[f"rollout_rs_{option}_masked_fraction"] < 1, "threshold must split the tokens"
    _check(out, ref_rc(old, roll, mask, rejection=rej), dtype, mask)


def test_combined_rejection_and_is():
    old, roll, mask = _inputs((8, 29), torch.float32)
    rej = {"token_k1": (0.85, 1.2), "seq_mean_k3": 0.01, "seq_max_k2": 0.05, "seq_sum_k1": 3.0}
    cfg = dict(is_level="sequence", is_batch_normalize=True, rejection=rej)
    out = fastppo.rollout_correction(old, roll, mask.float(), **cfg)
    _check(out, ref_rc(old, roll, mask, **cfg), torch.float32, mask.float())
    singles = [fastppo.rollout_correction(old, roll, mask, rejection={k: v}).mask for k, v in rej.items()]
    assert torch.equal(out.mask.bool(), torch.stack(singles).all(0)), "options combine with AND"
    assert out.stats["num_seqs"].item() == (mask.sum(-1) > 0).sum().item()


def test_strided_inputs():
    old, roll, mask = _inputs((30, 8), torch.float32)
    cfg = dict(is_level="token", is_mode="mask", is_max=1.2, is_min=0.9, rejection={"seq_mean_k2": 0.01})
    got = fastppo.rollout_correction(old.t(), roll.t(), mask.t(), **cfg)
    want = fastppo.rollout_correction(old.t().contiguous(), roll.t().contiguous(), mask.t().contiguous(), **cfg)
    torch.testing.assert_close(got.weights, want.weights, rtol=0, atol=0)
    assert torch.equal(got.mask, want.mask)
    _check(got, ref_rc(old.t(), roll.t(), mask.t(), **cfg), torch.float32, mask.t())


def test_nan_at_a_valid_position():
    old, roll, mask = _inputs((3, 10), torch.float32)
    mask[:] = True
    old, roll = old.nan_to_num(-1.0), roll.nan_to_num(-1.0, posinf=-1.0)
    old[0, 3] = float("nan")
    out = fastppo.rollout_correction(old, roll, mask, is_level="token", rejection={"seq_mean_k3": 1e9})
    assert math.isnan(out.weights[0, 3].item()) and not out.weights[1:].isnan().any()
    assert not out.mask[0].any() and out.mask[1:].all(), "a NaN statistic rejects its sequence"
    masked = fastppo.rollout_correction(old, roll, mask, is_level="token", is_mode="mask", is_max=5.0)
    assert masked.weights[0, 3].item() == 0.0, "IcePop drops a NaN ratio (outside any band)"


def test_no_is_weights_and_opcheck():
    old, roll, mask = _inputs((4, 6), torch.float32)
    out = fastppo.rollout_correction(old, roll, mask)
    assert out.weights is None and torch.equal(out.mask, mask)
    torch.library.opcheck(torch.ops.fastppo.rollout_correction.default,
                          (old, roll, mask, "{'is_level': 'token', 'is_mode': 'truncate', 'is_max': 2.0, "
                           "'is_min': None, 'is_batch_normalize': False, 'rejection': (('seq_max_k3', None, 0.1),), "
                           "'log_ratio_bound': 20.0}"), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("kw, err, match", [
    (dict(is_level="batch"), ValueError, "is_level"),
    (dict(is_mode="clip"), ValueError, "is_mode"),
    (dict(is_level="sequence", is_mode="seq-mask"), ValueError, "seq-mask"),
    (dict(is_max=0.0), ValueError, "is_max"),
    (dict(is_min=2.0, is_max=1.0), ValueError, "is_min"),
    (dict(is_batch_normalize=1), TypeError, "is_batch_normalize"),
    (dict(rejection={"token_k4": 1.0}), ValueError, "rejection option"),
    (dict(rejection={"seq_max_k1": 1.0}), ValueError, "rejection option"),
    (dict(rejection={"token_k2": (0.1, 1.0)}), ValueError, "one upper bound"),
    (dict(rejection={"token_k1": (2.0, 1.0)}), ValueError, "lower"),
    (dict(rejection=["token_k1"]), TypeError, "mapping"),
    (dict(log_ratio_bound=-1.0), ValueError, "log_ratio_bound"),
    (dict(is_level="token", is_mode="mask", is_gate="chi2"), ValueError, "is_gate"),
    (dict(is_level="token", is_mode="truncate", is_gate="tv"), ValueError, "is_gate"),
    (dict(is_level="sequence", is_mode="mask", is_gate="binary_kl"), ValueError, "is_gate"),
])
def test_bad_options(kw, err, match):
    old, roll, mask = _inputs((2, 5), torch.float32)
    with pytest.raises(err, match=match):
        fastppo.rollout_correction(old, roll, mask, **kw)


def test_bad_tensors():
    old, roll, mask = _inputs((2, 5), torch.float32)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        fastppo.rollout_correction(old, roll[:, :4], mask)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        fastppo.rollout_correction(old[0], roll[0], mask[0])
    with pytest.raises(ValueError, match="mask"):
        fastppo.rollout_correction(old, roll, mask.float() * 2)
    with pytest.raises(ValueError, match="B, T >= 1"):
        fastppo.rollout_correction(old[:0], roll[:0], mask[:0])


def test_nothing_valid():
    """An all-masked batch: no weight, nothing rejected, counts 0 (verl raises; fastppo's op has no host check)."""
    old, roll, mask = _inputs((3, 5), torch.float32)
    out = fastppo.rollout_correction(old, roll, torch.zeros_like(mask), is_level="sequence",
                                     rejection={"seq_mean_k1": 1.1})
    assert (out.weights == 0).all() and not out.mask.any()
    assert out.stats["num_tokens"] == 0 and out.stats["num_seqs"] == 0 and out.stats["rollout_is_mean"] == 0


def test_no_graph_break():
    """The public function traces as one graph around the one op (no host sync to break it)."""
    old, roll, mask = _inputs((4, 7), torch.float32)

    def step(o, r, m):
        out = fastppo.rollout_correction(o, r, m, is_level="sequence", is_batch_normalize=True,
                                         rejection={"token_k1": 1.5, "seq_max_k3": 0.1})
        return out.weights.sum() + out.mask.sum() + out.stats["rollout_rs_masked_fraction"]

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(old, roll, mask)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_counters_no_host_sync_launches_constant_bytes_linear():
    """The op (the PyTorch composition, eager dispatch counters): no host sync, the same launches for any
    [B, T] (no per-row loop), bytes proportional to the tokens (no [B, T, *] intermediate)."""
    from fastppo.bench.counters import EagerTraffic
    from fastppo.library import encode
    from fastppo.options import RolloutCorrectionOptions

    opts = encode(RolloutCorrectionOptions.build(is_level="token", rejection={"token_k1": 1.5, "seq_mean_k3": 0.02,
                                                                              "seq_max_k2": 0.1}))
    seen = []
    for shape in ((4, 64), (16, 256)):
        old, roll, mask = _inputs(shape, torch.float32)
        with EagerTraffic() as c:
            torch.ops.fastppo.rollout_correction(old, roll, mask, opts)
        seen.append((c.launches, c.bytes / (shape[0] * shape[1]), c.host_syncs))
    (l1, b1, s1), (l2, b2, s2) = seen
    assert s1 == s2 == 0
    assert l1 == l2
    assert b2 == pytest.approx(b1, rel=0.02)
