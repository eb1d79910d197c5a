"""Packed rollouts: the trainer's losses read the valid response tokens packed ([total] with cu_seqlens), and an
update gives the padded layout's numbers; the tokens saved are in the metrics. Mismatch metrics: the sampler's
log-probs of the sampled tokens (captured at generation) against the trainer's recomputation."""

import pytest
import torch

from fastppo.trainer import PPOTrainer
from fastppo.trainer.config import TrainConfig
from fastppo.trainer.launch import backend_scope
from fastppo.trainer.packing import Layout, Packing
from tests.trainer.test_trainer import _one_thread_and_backend_untouched  # noqa: F401  (autouse fixture)

TINY = dict(iterations=1, batch_size=8, minibatches=2, ppo_epochs=2, sft_steps=3, reward_steps=3, save_every=1,
            progress=False, backend="torch")
QUIET = dict(log=lambda *_: None)


def test_packing_round_trip_with_holes_and_empty_rows():
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    x = torch.arange(16.0).view(4, 4)
    p = Packing.of(mask)
    assert p.cu_seqlens.tolist() == [0, 3, 3, 7, 8] and p.total == 8
    assert p.pack(x).tolist() == [0.0, 1.0, 3.0, 8.0, 9.0, 10.0, 11.0, 13.0]
    assert torch.equal(p.unpack(p.pack(x)), torch.where(mask, x, 0.0))
    h = torch.randn(4, 4, 3)[:, :, ::2]                    # non-contiguous [B, R, H]
    assert torch.equal(p.pack(h), h[mask])
    assert torch.equal(p.pack(torch.arange(4.0)), torch.arange(4.0))   # per-sequence values stay as they are
    lay = Layout.of(mask, packed=False)
    assert lay.pack(x) is x and lay.mask is mask and lay.cu_seqlens is None
    with pytest.raises(ValueError, match=r"\[B, R\]"):
        p.pack(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="mask"):
        Packing.of(torch.ones(3, dtype=torch.bool))


def _trainer(tmp_path, name, **kw):
    cfg = TrainConfig(out=str(tmp_path / name), **{**TINY, **kw}).validate()
    return PPOTrainer.from_config(cfg, **QUIET)


@pytest.mark.parametrize("mode,agg,backend", [
    ("ppo", "token-mean", "torch"),
    ("ppo", "seq-mean-token-sum-norm", "torch"),
    ("grpo", "seq-mean-token-mean", "torch"),
    ("ppo", "token-mean", "triton"),
])
def test_one_update_packed_equals_padded(tmp_path, mode, agg, backend):
    """Same models, same rollout: one iteration (2 epochs x 2 minibatches of policy and critic steps) on packed
    tokens gives the padded layout's losses, statistics and parameters, to fp32 tolerance; fewer tokens reach
    the losses."""
    kw = dict(mode=mode, agg=agg, backend=backend, group_size=4)
    runs = {}
    for pack in (True, False):
        tr = _trainer(tmp_path, f"pack{pack}", pack=pack, **kw)
        m = tr.train_iteration()
        runs[pack] = (m, [p.detach().clone() for p in tr.policy.parameters()],
                      [] if tr.critic is None else [p.detach().clone() for p in tr.critic.parameters()])
    (mp, pp, cp), (mu, pu, cu) = runs[True], runs[False]
    assert mp["loss_tokens"] < mu["loss_tokens"] == mu["loss_tokens_padded"] == mp["loss_tokens_padded"]
    keys = ["policy_loss", "entropy", "clipfrac", "approx_kl", "mismatch_k3_kl_token", "mismatch_ratio_mean_seq",
            "mismatch_max_abs_diff_seq"] + (["value_loss", "vf_clipfrac"] if mode == "ppo" else [])
    for k in keys:
        assert mp[k] == pytest.approx(mu[k], rel=1e-5, abs=1e-6), k
    for a, b in zip(pp + cp, pu + cu):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)
    assert mp["skipped_steps"] == mu["skipped_steps"] == 0
    fresh = _trainer(tmp_path, "fresh", pack=True, **kw)
    moved = any(not torch.allclose(a, b) for a, b in zip(pp, fresh.policy.parameters()))
    assert moved, "the update changed nothing: the comparison would be vacuous"


def _rollout(trainer, seed=0):
    with backend_scope(trainer.cfg.backend):
        return trainer.rollout(torch.Generator().manual_seed(seed))


def _float64_logits(trainer, ro):
    """The policy's logits at the response positions [B, R, V], in float64 from its own forward."""
    P, R = ro.prompt_len, ro.response.shape[1]
    model = trainer.policy
    with torch.no_grad():
        pos = (ro.attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=ro.sequences, attention_mask=ro.attention_mask, position_ids=pos).logits
    return logits[:, P - 1:P + R - 1].double()


def test_mismatch_is_zero_when_the_trainer_recomputes_the_sampler(tmp_path):
    """Full-vocabulary sampling at T = 0.7: the captured log-probs are log_softmax(z / T) at the sampled token
    (float64 from the model's logits), the trainer's recomputation matches them, and the metrics say so."""
    tr = _trainer(tmp_path, "run", temperature=0.7)
    ro = _rollout(tr)
    ref = torch.log_softmax(_float64_logits(tr, ro) / 0.7, -1).gather(-1, ro.response.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ro.rollout_logprobs.double(), torch.where(ro.mask, ref, 0.0), rtol=0, atol=1e-5)
    assert not ro.mask.all() and ro.mask.any()
    m = tr.train_iteration()
    for k in ("k3_kl_token", "chi2_token", "frac_outside_token", "k3_kl_seq", "frac_outside_seq"):
        assert abs(m[f"mismatch_{k}"]) < 1e-5, (k, m[f"mismatch_{k}"])
    assert m["mismatch_max_abs_diff_token"] < 1e-4
    assert m["mismatch_ratio_mean_token"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("kw", [dict(top_k=3), dict(top_p=0.6), dict(top_k=5, top_p=0.8, temperature=1.3)])
def test_mismatch_shows_the_kept_set_a_top_k_top_p_sampler_drops(tmp_path, kw):
    """A top-k / top-p sampler: every sampled token is in vLLM's kept set, its captured log-prob is the one
    renormalised over that set (float64 from the model's logits), so the trainer's full-vocabulary
    recomputation (--kept_logprobs false; with kept sets see test_trainer_kept.py) differs by log(kept mass)
    and the metrics show a non-zero gap."""
    from fastppo.kept_filters import kept_mask_from_filters

    tr = _trainer(tmp_path, "run", kept_logprobs=False, **kw)
    ro = _rollout(tr)
    T = kw.get("temperature", 1.0)
    logits = _float64_logits(tr, ro)
    kept = kept_mask_from_filters(logits.float(), temperature=T, top_k=kw.get("top_k"), top_p=kw.get("top_p"))
    assert kept.gather(-1, ro.response.unsqueeze(-1)).squeeze(-1)[ro.mask].all()
    z = logits / T
    ref = z.gather(-1, ro.response.unsqueeze(-1)).squeeze(-1) - z.masked_fill(~kept, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(ro.rollout_logprobs.double(), torch.where(ro.mask, ref, 0.0), rtol=0, atol=1e-5)
    gap = (ro.rollout_logprobs - ro.old_logprobs)[ro.mask]
    assert (gap > -1e-5).all() and gap.max() > 0.05
    m = tr.train_iteration()
    assert m["mismatch_k3_kl_token"] > 1e-3 and m["mismatch_ratio_mean_token"] < 0.99
    assert m["mismatch_max_abs_diff_token"] == pytest.approx(gap.max().item(), rel=1e-4)


@pytest.mark.parametrize("flag,value,why", [("top_k", -1, ">= 0"), ("top_p", 0.0, r"\(0, 1\]"),
                                            ("top_p", 1.5, r"\(0, 1\]")])
def test_sampler_flags_are_validated(flag, value, why):
    with pytest.raises(ValueError, match=f"--{flag}={value}: must .*{why}"):
        TrainConfig(**{flag: value}).validate()
