"""patch("verl") serves verl 0.9.1's rollout correction (verl/trainer/ppo/rollout_corr_helper.py) and its chunked
entropy: each public compute function, called the way verl calls it, patched against verl's original — weights,
rejection mask and every metric to 2e-5 relative, h.stats counting the calls served — and the calls verl's own
checks reject delegated (counted) with verl's error."""

from __future__ import annotations

import math

import pytest
import torch
import verl.trainer.ppo.rollout_corr_helper as rch
import verl.utils.torch_functional as tf

import fastppo.integrations as fi

pytestmark = pytest.mark.usefixtures("verl_torch_paths")

RTOL = 2e-5


def _inputs(B=6, T=23, dtype=torch.float32, spread=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -2.0 * torch.rand(B, T, generator=g)
    roll = old + spread * torch.randn(B, T, generator=g)
    m = (torch.rand(B, T, generator=g) > 0.3).float()
    m[0] = 0.0            # an empty row
    m[1] = 1.0            # a full row
    m[2, 1::2] = 0.0      # holes
    return old.to(dtype), roll.to(dtype), m


def _close_metrics(got, want):
    assert set(got) == set(want)
    for k, v in want.items():
        assert isinstance(got[k], float), k
        assert math.isclose(got[k], v, rel_tol=RTOL, abs_tol=1e-6), (k, got[k], v)


IS = [None, ("token", 2.0), ("token", "1.5"), ("sequence", 1.8), ("token", "0.8_1.25"), ("sequence", "0.5_2.0")]
RS = [None, ("token_k1", "1.3"), ("token_k2", 0.02), ("token_k3", 0.02), ("seq_sum_k1", "0.5_2.0"),
      ("seq_sum_k2", 0.3), ("seq_sum_k3", 0.3), ("seq_mean_k1", 1.05), ("seq_mean_k2", 0.02), ("seq_mean_k3", 0.02),
      ("seq_max_k2", 0.08), ("seq_max_k3", 0.08), ("token_k1,seq_mean_k3,seq_max_k2", "0.8_1.25,0.02,0.08")]


OPS = ["compute_rollout_correction_and_rejection_mask", "compute_rollout_correction_weights",
       "compute_rollout_rejection_mask", "compute_offpolicy_metrics", "compute_rollout_corr_metrics_from_logprobs",
       "entropy_from_logits_with_chunking", "calculate_sum_pi_squared_from_logits"]


def _patch(*names):
    """patch("verl") limited to the named entry points (default: all the rollout ones): patching scans
    sys.modules once per entry point."""
    return fi.patch("verl", ops=list(names) or OPS)


def _cases():
    for is_ in IS[1:]:
        for normalize in (False, True):
            yield is_, RS[-1], normalize
    for rs in RS:
        yield IS[0], rs, False


@pytest.mark.parametrize("is_,rs,normalize", list(_cases()), ids=str)
def test_correction_and_rejection_mask(is_, rs, normalize):
    old, roll, m = _inputs()
    kw = {"rollout_is": None if is_ is None else is_[0], "rollout_is_threshold": None if is_ is None else is_[1],
          "rollout_is_batch_normalize": normalize, "rollout_rs": None if rs is None else rs[0],
          "rollout_rs_threshold": None if rs is None else rs[1]}
    want_w, want_m, want = rch.compute_rollout_correction_and_rejection_mask(old, roll, m, **kw)
    with _patch("compute_rollout_correction_and_rejection_mask") as h:
        got_w, got_m, got = rch.compute_rollout_correction_and_rejection_mask(old, roll, m, **kw)
        assert h.stats.served["compute_rollout_correction_and_rejection_mask"] == 1 and not h.stats.delegated
    assert got_m.dtype == want_m.dtype and torch.equal(got_m, want_m)
    if rs is not None:
        assert 0 < got["rollout_corr/rollout_rs_masked_fraction"] < 1, "thresholds must split the tokens"
    if is_ is None:
        assert got_w is None and want_w is None
    else:
        w, ref = got_w.batch["rollout_is_weights"], want_w.batch["rollout_is_weights"]
        assert w.dtype == ref.dtype
        torch.testing.assert_close(w, ref, rtol=RTOL, atol=1e-7)
    _close_metrics(got, want)


@pytest.mark.parametrize("level,thr,normalize", [("token", 2.0, False), ("sequence", "0.5_3.0", True),
                                                 ("token", "0.8_1.2", True)])
def test_correction_weights(level, thr, normalize):
    old, roll, m = _inputs(seed=1)
    lr = old - roll
    want_w, want = rch.compute_rollout_correction_weights(lr, m, level, thr, normalize)
    with _patch("compute_rollout_correction_weights") as h:
        got_w, got = rch.compute_rollout_correction_weights(log_ratio=lr, response_mask=m, rollout_is=level,
                                                            rollout_is_threshold=thr,
                                                            rollout_is_batch_normalize=normalize)
        assert h.stats.served["compute_rollout_correction_weights"] == 1
    torch.testing.assert_close(got_w, want_w, rtol=RTOL, atol=1e-7)
    _close_metrics(got, want)


@pytest.mark.parametrize("rs,thr", [("token_k3,seq_sum_k1", "0.02,0.5_2.0"), ("seq_max_k3", 0.08)])
def test_rejection_mask(rs, thr):
    old, roll, m = _inputs(seed=2)
    lr = old - roll
    want_m, want = rch.compute_rollout_rejection_mask(lr, m, rs, thr)
    with _patch("compute_rollout_rejection_mask") as h:
        got_m, got = rch.compute_rollout_rejection_mask(lr, m, rollout_rs=rs, rollout_rs_threshold=thr)
        assert h.stats.served["compute_rollout_rejection_mask"] == 1
    assert torch.equal(got_m, want_m)
    _close_metrics(got, want)


@pytest.mark.parametrize("with_rollout", [True, False])
def test_offpolicy_metrics(with_rollout):
    old, roll, m = _inputs(seed=3)
    roll = roll if with_rollout else None
    want = rch.compute_offpolicy_metrics(old, roll, m)
    want_pref = rch.compute_rollout_corr_metrics_from_logprobs(old, roll, m)
    with _patch("compute_offpolicy_metrics", "compute_rollout_corr_metrics_from_logprobs") as h:
        got = rch.compute_offpolicy_metrics(old_log_prob=old, rollout_log_prob=roll, response_mask=m)
        got_pref = rch.compute_rollout_corr_metrics_from_logprobs(old, roll, m)
        assert h.stats.served["compute_offpolicy_metrics"] == h.stats.served[
            "compute_rollout_corr_metrics_from_logprobs"] == 1
    _close_metrics(got, want)
    _close_metrics(got_pref, want_pref)


def test_add_to_batch_through_verl():
    """compute_rollout_correction_and_add_to_batch (what verl's trainer calls) reaches the served function."""
    from verl.protocol import DataProto
    from verl.trainer.config.algorithm import RolloutCorrectionConfig

    old, roll, m = _inputs(seed=4)
    cfg = RolloutCorrectionConfig(rollout_is="token", rollout_is_threshold=2.0, rollout_rs="seq_mean_k3",
                                  rollout_rs_threshold=0.02)

    def batch():
        return DataProto.from_dict(tensors={"old_log_probs": old, "rollout_log_probs": roll, "response_mask": m})

    want_b, want = rch.compute_rollout_correction_and_add_to_batch(batch(), cfg)
    with _patch("compute_rollout_correction_and_rejection_mask") as h:
        got_b, got = rch.compute_rollout_correction_and_add_to_batch(batch(), cfg)
        assert h.stats.served["compute_rollout_correction_and_rejection_mask"] == 1
    for key in ("response_mask", "rollout_is_weights"):
        torch.testing.assert_close(got_b.batch[key], want_b.batch[key], rtol=RTOL, atol=1e-7)
    _close_metrics(got, want)


@pytest.mark.parametrize("kw,exc", [
    ({"rollout_is": "token"}, "at least one valid token"),                       # empty mask
    ({"rollout_is": "batch"}, "Invalid rollout_is"),
    ({"rollout_is": "token", "rollout_is_threshold": "x"}, "Invalid rollout_is_threshold"),
    ({"rollout_rs": "token_k9", "rollout_rs_threshold": 1.0}, "Invalid rollout_rs option"),
    ({"rollout_rs": "seq_max_k2", "rollout_rs_threshold": None}, "rollout_rs_threshold must be"),
])
def test_what_verl_rejects_is_delegated(kw, exc):
    old, roll, m = _inputs(seed=5)
    if exc.startswith("at least"):
        m = torch.zeros_like(m)
    with _patch("compute_rollout_correction_and_rejection_mask") as h, pytest.raises(ValueError, match=exc):
        rch.compute_rollout_correction_and_rejection_mask(old, roll, m, **kw)
    assert h.stats.delegated["compute_rollout_correction_and_rejection_mask"] == 1 and not h.stats.served


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_with_chunking(dtype):
    g = torch.Generator().manual_seed(6)
    logits = (3 * torch.randn(11, 97, generator=g)).to(dtype)
    up = torch.randn(11, generator=g)
    res = []
    for patched in (False, True):
        x = logits.clone().requires_grad_(True)
        with _patch("entropy_from_logits_with_chunking") as h:
            fn = tf.entropy_from_logits_with_chunking if patched else _tf_original()
            e = fn(x, chunk_size=4)
            (e * up).sum().backward()
            res.append((e, x.grad, dict(h.stats.served)))
    (want, want_g, _), (got, got_g, served) = res
    assert served == {"entropy_from_logits_with_chunking": 1}
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got_g.float(), want_g.float(), rtol=tol, atol=tol)


def _tf_original():
    f = tf.entropy_from_logits_with_chunking
    return getattr(f, "__fastppo_original__", f)


def test_unserved_calls_show_in_stats():
    """Every call of a replaced entry point is counted: served, or delegated to verl."""
    old, roll, m = _inputs(seed=7)
    with _patch() as h:
        with pytest.raises(ValueError):   # verl's range() with step 0
            tf.entropy_from_logits_with_chunking(torch.randn(9, 5), chunk_size=0)
        with pytest.raises(AssertionError):
            rch.compute_offpolicy_metrics(old, roll, torch.zeros_like(m))
        tf.entropy_from_logits_with_chunking(torch.randn(9, 5))
        logits = torch.randn(4, 7)
        torch.testing.assert_close(tf.calculate_sum_pi_squared_from_logits(logits),
                                   torch.softmax(logits, -1).square().sum(-1))   # verl's own, counted
    assert h.stats.delegated == {"entropy_from_logits_with_chunking": 1, "compute_offpolicy_metrics": 1,
                                 "calculate_sum_pi_squared_from_logits": 1}
    assert h.stats.served == {"entropy_from_logits_with_chunking": 1}
