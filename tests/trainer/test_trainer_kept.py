"""The trainer's log-probs renormalised over the sampler's kept set (--top_k / --top_p / --min_p with
--kept_logprobs, on by default with a filter): the rollout records each response token's kept set
(kept_rows.KeptRows, CSR), the old log-probs, the policy loss's log-probs and the mismatch stats' train side
use it (so they are the sampler's), the reference's stay full-vocabulary. Checked against float64 from the
model's own logits and vLLM's filters (fastppo.kept_filters) applied independently."""

import pytest
import torch

from fastppo.kept_filters import kept_mask_from_filters
from fastppo.trainer import PPOTrainer
from fastppo.trainer.config import TrainConfig
from fastppo.trainer.kept_rows import KeptRows
from fastppo.trainer.launch import backend_scope
from fastppo.trainer.packing import Layout
from fastppo.trainer.parallel import Parallel
from fastppo.trainer.update import token_counts
from tests.trainer.test_trainer import _one_thread_and_backend_untouched  # noqa: F401  (autouse fixture)

TINY = dict(iterations=1, batch_size=8, minibatches=2, ppo_epochs=2, sft_steps=3, reward_steps=3, save_every=1,
            progress=False, backend="torch")
QUIET = dict(log=lambda *_: None)


def _trainer(tmp_path, name, **kw):
    cfg = TrainConfig(out=str(tmp_path / name), **{**TINY, **kw}).validate()
    return PPOTrainer.from_config(cfg, **QUIET)


def _rollout(trainer, seed=0):
    with backend_scope(trainer.cfg.backend):
        return trainer.rollout(torch.Generator().manual_seed(seed))


def _head64(trainer, ro):
    """z' = (hidden @ W.T + b) / T in float64 at the response positions [B, R, V], from the policy's own
    hidden states, and the policy's fp32 logits there (what the sampler filtered)."""
    from fastppo.trainer.rollout import response_hidden_and_head

    with torch.no_grad():
        h, w, b = response_hidden_and_head(trainer.policy, ro)
    z = h.double() @ w.double().T + (0 if b is None else b.double())
    return z / trainer.cfg.temperature, (h @ w.T + (0 if b is None else b))


def _logp64(z, labels, kept=None):
    y = labels.clamp_min(0).unsqueeze(-1)
    zk = z if kept is None else z.masked_fill(~kept, float("-inf"))
    return z.gather(-1, y).squeeze(-1) - zk.logsumexp(-1)


# ---------------------------------------------------------------------- KeptRows


def _dense_steps(B, R, V, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = [torch.rand(B, V, generator=g) < 0.3 for _ in range(steps)]
    for m in masks:
        m[:, 0] = True                                    # every row keeps something
    return masks


def test_kept_rows_compress_select_and_both_layouts():
    B, R, V = 5, 4, 37
    masks = _dense_steps(B, R, V, steps=3)                # generation stopped one step early
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    rows = KeptRows.of_steps([KeptRows.step(m) for m in masks], mask, V)
    assert rows.ids.dtype == torch.int32 and rows.counts.shape == (B, R)
    dense = torch.stack(masks + [torch.zeros(B, V, dtype=torch.bool)], 1) & mask.unsqueeze(-1)   # [B, R, V]
    assert torch.equal(rows.counts, dense.sum(-1))
    padded = rows.kept_set(Layout.of(mask, packed=False))
    assert padded.rows == B * R and torch.equal(padded.to_mask(), dense.reshape(B * R, V))
    packed = rows.kept_set(Layout.of(mask, packed=True))
    assert packed.rows == int(mask.sum()) and torch.equal(packed.to_mask(), dense[mask])
    for idx in (torch.tensor([3, 0, 4]), slice(1, 4), torch.tensor([2])):
        sub = rows.select(idx)
        assert torch.equal(sub.counts, rows.counts[idx])
        want = dense[idx]
        assert torch.equal(sub.kept_set(Layout.of(mask[idx], packed=False)).to_mask(), want.reshape(-1, V))
        assert torch.equal(sub.kept_set(Layout.of(mask[idx], packed=True)).to_mask(), want[mask[idx]])
    empty = KeptRows.of_steps([], mask, V)
    assert empty.ids.numel() == 0 and not empty.counts.any()
    with pytest.raises(ValueError, match="5 steps for 4"):
        KeptRows.of_steps([KeptRows.step(masks[0])] * 5, mask, V)
    with pytest.raises(ValueError, match="bool"):
        KeptRows.step(torch.zeros(2, 3))
    par = Parallel()
    assert par.all_gather_varlen(rows.ids) is rows.ids


def _rank_rows(rank):
    B, R, V = 3, 4, 29
    mask = torch.rand(B, R, generator=torch.Generator().manual_seed(10 + rank)) < 0.5 + 0.3 * rank
    return mask, KeptRows.of_steps([KeptRows.step(m) for m in _dense_steps(B, R, V, 4, seed=rank)], mask, V)


def _gather_ranks(rank, world, out):
    from types import SimpleNamespace

    mask, rows = _rank_rows(rank)
    ro = Parallel("ddp", rank, world).gather_rollout(SimpleNamespace(mask=mask, kept=rows))
    if rank == 0:
        torch.save({"mask": ro.mask, "ids": ro.kept.ids, "counts": ro.kept.counts}, out)


def test_kept_rows_gathered_over_two_ranks(tmp_path):
    """gather_rollout on 2 gloo processes: the ranks' kept sets (different nnz) concatenated in rank order, the
    [B, R] counts with the other per-token fields."""
    from tests.ops.test_distributed import run_ranks

    run_ranks(_gather_ranks, str(tmp_path / "g.pt"))
    got = torch.load(tmp_path / "g.pt", weights_only=True)
    parts = [_rank_rows(r) for r in range(2)]
    assert parts[0][1].ids.numel() != parts[1][1].ids.numel()
    assert torch.equal(got["mask"], torch.cat([m for m, _ in parts]))
    assert torch.equal(got["counts"], torch.cat([k.counts for _, k in parts]))
    assert torch.equal(got["ids"], torch.cat([k.ids for _, k in parts]))


# ---------------------------------------------------------------------- the rollout's log-probs


@pytest.mark.parametrize("kw", [dict(top_p=0.8), dict(top_k=5, min_p=0.05, temperature=1.3)])
def test_kept_logprobs_are_the_samplers(tmp_path, kw):
    """The recorded kept sets are vLLM's filters of the policy's logits, the old log-probs and the sampler's are
    the float64 log-softmax over them, the reference's the full-vocabulary one; so the first iteration's mismatch
    metrics are ~0."""
    tr = _trainer(tmp_path, "run", **kw)
    assert tr.cfg.use_kept
    ro = _rollout(tr)
    z, logits = _head64(tr, ro)
    kept = kept_mask_from_filters(logits, temperature=tr.cfg.temperature, top_k=kw.get("top_k"),
                                  top_p=kw.get("top_p"), min_p=kw.get("min_p")) & ro.mask.unsqueeze(-1)
    recorded = ro.kept.kept_set(Layout.of(ro.mask, packed=False)).to_mask().view_as(kept)
    assert torch.equal(recorded, kept)
    assert (kept.sum(-1)[ro.mask] < z.shape[-1]).all()           # the filter dropped tokens at every position
    want = torch.where(ro.mask, _logp64(z, ro.labels, kept), 0.0)
    torch.testing.assert_close(ro.old_logprobs.double(), want, rtol=0, atol=2e-6)
    torch.testing.assert_close(ro.rollout_logprobs.double(), want, rtol=0, atol=2e-6)
    full = torch.where(ro.mask, _logp64(z, ro.labels), 0.0)
    torch.testing.assert_close(ro.ref_logprobs.double(), full, rtol=0, atol=2e-6)   # ref = policy at iteration 0
    assert (want - full)[ro.mask].min() > 1e-3
    m = tr.train_iteration()
    assert m["mismatch_ratio_mean_token"] == pytest.approx(1.0, abs=1e-5)
    for k in ("frac_outside_token", "frac_outside_seq", "k3_kl_token", "chi2_token"):
        assert abs(m[f"mismatch_{k}"]) < 1e-5, (k, m[f"mismatch_{k}"])
    assert m["mismatch_max_abs_diff_token"] < 1e-5


def test_top_p_without_kept_logprobs_shows_the_gap(tmp_path):
    """--kept_logprobs false: the trainer's full-vocabulary log-probs against the sampler's, the issue's gap."""
    tr = _trainer(tmp_path, "run", top_p=0.8, kept_logprobs=False)
    ro = _rollout(tr)
    assert ro.kept is None
    m = tr.train_iteration()
    assert m["mismatch_ratio_mean_token"] < 0.95 and m["mismatch_frac_outside_token"] > 0.3
    assert m["mismatch_k3_kl_token"] > 1e-3


def test_kept_logprobs_flag_is_validated():
    with pytest.raises(ValueError, match="--kept_logprobs=True: needs --top_k, --top_p or --min_p"):
        TrainConfig(kept_logprobs=True).validate()
    for value in (-0.1, 1.5):
        with pytest.raises(ValueError, match=rf"--min_p={value}: must be in \[0, 1\]"):
            TrainConfig(min_p=value).validate()
    assert TrainConfig(top_k=3).validate().use_kept and not TrainConfig(top_k=3, kept_logprobs=False).use_kept
    assert not TrainConfig().validate().use_kept


# ---------------------------------------------------------------------- the update


@pytest.mark.parametrize("mode,backend", [("ppo", "torch"), ("grpo", "torch"), ("grpo", "triton")])
def test_one_update_with_kept_sets_packed_equals_padded(tmp_path, mode, backend):
    kw = dict(mode=mode, backend=backend, group_size=4, top_p=0.8)
    runs = {}
    for pack in (True, False):
        tr = _trainer(tmp_path, f"pack{pack}", pack=pack, **kw)
        m = tr.train_iteration()
        runs[pack] = (m, [p.detach().clone() for p in tr.policy.parameters()])
    (mp, pp), (mu, pu) = runs[True], runs[False]
    for k in ["policy_loss", "entropy", "clipfrac", "approx_kl", "mismatch_ratio_mean_token",
              "mismatch_k3_kl_seq"] + (["value_loss"] if mode == "ppo" else []):
        assert mp[k] == pytest.approx(mu[k], rel=1e-5, abs=1e-6), k
    for a, b in zip(pp, pu):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)
    fresh = _trainer(tmp_path, "fresh", **kw)
    assert any(not torch.allclose(a, b) for a, b in zip(pp, fresh.policy.parameters())), "nothing moved"


@pytest.mark.parametrize("pack", [True, False])
def test_policy_step_loss_is_the_float64_kept_set_loss(tmp_path, pack):
    """One policy step on the whole batch with perturbed old log-probs (ratios away from 1, some clipped): the
    loss it reports is the float64 PPO loss of the kept-set log-probs (token-mean); the full-vocabulary one
    differs by far more than the tolerance. The logged entropy is the full-vocabulary one."""
    tr = _trainer(tmp_path, "run", top_p=0.8, pack=pack, clip_low=0.2)
    ro = _rollout(tr)
    z, logits = _head64(tr, ro)
    kept = ro.kept.kept_set(Layout.of(ro.mask, packed=False)).to_mask().view(*ro.mask.shape, -1)
    g = torch.Generator().manual_seed(1)
    ro.old_logprobs = torch.where(ro.mask, ro.old_logprobs + 0.3 * torch.randn(ro.mask.shape, generator=g), 0.0)
    adv = torch.where(ro.mask, torch.randn(ro.mask.shape, generator=g), 0.0)
    n = ro.mask.sum().double()

    def ppo64(logp):
        r = torch.exp((logp - ro.old_logprobs.double()).clamp(-20, 20))
        a = adv.double()
        per = torch.maximum(-a * r, -a * r.clamp(0.8, 1.2))
        return (per * ro.mask).sum() / n

    want, full = ppo64(_logp64(z, ro.labels, kept)), ppo64(_logp64(z, ro.labels))
    p = torch.softmax(z, -1)
    entropy = (-(p * torch.log_softmax(z, -1)).sum(-1) * ro.mask).sum() / n
    with backend_scope(tr.cfg.backend):
        logs = tr._policy_step(ro, adv, token_counts(ro.mask))
    assert abs(want - full) > 1e-2
    assert logs["policy_loss"] == pytest.approx(want.item(), abs=2e-6)
    assert logs["entropy"] == pytest.approx(entropy.item(), abs=2e-6)
