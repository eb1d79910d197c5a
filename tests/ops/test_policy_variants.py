"""Every policy-loss variant x every aggregation, unfused / fused / linear, against the float64
reference formulas (loss, per-token gradient, stats); micro-batches; bf16; entropy_quantile;
rollout IS weights; launch counts and the aggregation's parallelism."""

import itertools

import pytest
import torch

import fastppo
from fastppo import reference as ref
from fastppo.kernels.fused_grad import TOKEN_LOCAL_POLICIES
from fastppo.kernels.launches import count_launches
from fastppo.modes import AGG_MODES, POLICY_LOSSES
from tests.helpers import DEVICE, make_labels

B, T = 4, 9
VARIANT_KW = {
    "ppo": dict(clip_high=0.28, dual_clip=3.0, ratio_max=1.25),
    "gspo": dict(clip_low=3e-4, clip_high=4e-4),
    "gspo_token": dict(clip_low=3e-4, clip_high=4e-4),
    "cispo": dict(clip_low=0.9, clip_high=0.1),
    "sapo": dict(sapo_tau_pos=1.0, sapo_tau_neg=1.05),
    "gmpo": dict(clip_low=0.1, clip_high=0.15),
    "gpg": {},
    "dppo_tv": dict(clip_low=0.1, clip_high=0.02, ratio_max=1.2),
    "dppo_kl": dict(clip_low=0.01, clip_high=0.005, ratio_max=1.2),
    "dro": dict(dro_beta=0.7),
    # cov_ratio 1: every candidate is selected (verl's random draw only picks among more than k of them;
    # test_clip_cov_random_draw_is_verls covers that)
    "clip_cov": dict(clip_low=0.1, clip_high=0.2, cov_ratio=1.0, cov_lb=-0.3, cov_ub=0.3),
    "kl_cov": dict(cov_ratio=0.3, kl_cov_coef=0.4),
    "vespo": dict(vespo_k_pos=2.5, vespo_lambda_neg=1.5),
}
COV = ("clip_cov", "kl_cov")   # a batch-global selection: micro-batches do not add up


def _inputs(dtype=torch.float32, seed=0, per_seq_adv=False, b=B, t=T):
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(b, t, generator=g) * 0.5 - 2
    old = logp + torch.randn(b, t, generator=g) * 0.3
    adv = torch.randn(b, generator=g) if per_seq_adv else torch.randn(b, t, generator=g)
    isw = torch.rand(b, t, generator=g) + 0.5
    ent = torch.rand(b, t, generator=g) * 3
    mask = torch.rand(b, t, generator=g) > 0.3
    if b > 1:
        mask[1] = False                  # an empty sequence
    mask[0, :2] = True
    return [x.to(DEVICE) for x in (logp.to(dtype), old.to(dtype), adv.to(dtype), isw, ent, mask)]


def _d(x):
    return None if x is None else x.double()


def _check_stats(stats, rstats, rtol=1e-5, atol=1e-6):
    assert set(stats) == set(rstats), (set(stats), set(rstats))
    for k in stats:
        torch.testing.assert_close(stats[k].double(), rstats[k].double(), rtol=rtol, atol=atol, msg=k)


# Every variant x every aggregation; the rollout IS weights (a per-token factor on the loss before the aggregation)
# alternate over that grid, so every variant and every aggregation runs both with and without them.
UNFUSED_CASES = [(v, a, (i + j) % 2 == 1) for i, v in enumerate(POLICY_LOSSES) for j, a in enumerate(AGG_MODES)]


@pytest.mark.parametrize("variant,agg,with_isw", UNFUSED_CASES)
def test_unfused_variant_matches_reference(variant, agg, with_isw):
    logp, old, adv, isw, _, mask = _inputs()
    kw = dict(VARIANT_KW[variant], policy_loss=variant, agg=agg, rollout_is_weights=isw if with_isw else None)
    x = logp.clone().requires_grad_()
    loss, stats = fastppo.ppo_policy_loss(x, old, adv, mask, **kw)
    (loss * 1.3).backward()
    xr = logp.double().requires_grad_()
    rkw = dict(kw, rollout_is_weights=_d(kw["rollout_is_weights"]))
    rloss, rstats = ref.ppo_policy_loss(xr, old.double(), adv.double(), mask, **rkw)
    (rloss * 1.3).backward()
    torch.testing.assert_close(loss.double(), rloss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-7)
    assert (x.grad[~mask] == 0).all()
    _check_stats(stats, rstats)


def test_variants_differ_from_each_other_and_clip():
    """Guards the comparisons above against vacuous inputs: each variant's loss is its own, and the
    clipping variants clip some but not all tokens."""
    logp, old, adv, _, _, mask = _inputs()
    out = {v: fastppo.ppo_policy_loss(logp, old, adv, mask, policy_loss=v, **VARIANT_KW[v]) for v in POLICY_LOSSES}
    for v in POLICY_LOSSES:
        others = [o for o in POLICY_LOSSES if o != v and {o, v} != {"gspo", "gspo_token"}]
        assert all(abs(out[v][0].item() - out[o][0].item()) > 1e-6 for o in others), v
        if v in ("ppo", "gspo", "gspo_token", "cispo", "gmpo", "dppo_tv", "dppo_kl", "clip_cov", "kl_cov"):
            assert 0 < out[v][1]["clipfrac"] < 1, (v, out[v][1])


# The one-pass gradient kernel (TOKEN_LOCAL_POLICIES) folds the aggregation's per-token weights into each logits
# row: its variants meet every aggregation. The others take the two-pass path (the log-prob kernels, then the
# policy-loss op whose whole variant x aggregation grid test_unfused_variant_matches_reference runs): two
# aggregations each, in turn, so every aggregation meets both paths.
_TWO_PASS = [v for v in POLICY_LOSSES if v not in TOKEN_LOCAL_POLICIES]
FUSED_CASES = ([(v, a) for v in TOKEN_LOCAL_POLICIES for a in AGG_MODES]
               + [(v, AGG_MODES[(2 * i + d) % len(AGG_MODES)]) for i, v in enumerate(_TWO_PASS) for d in (0, 1)])


@pytest.mark.parametrize("variant,agg", FUSED_CASES)
def test_fused_variant_matches_reference(variant, agg):
    V = 67
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(DEVICE)
    labels = make_labels((B, T), V, holes=0.1)
    _, _, adv, isw, _, mask = _inputs()
    mask = mask & (labels != -100)
    lp = ref.token_logprobs(logits, labels)
    old = lp + 0.3 * torch.randn(B, T, generator=g).to(DEVICE)
    refp = lp + 0.2 * torch.randn(B, T, generator=g).to(DEVICE)
    kw = dict(VARIANT_KW[variant], policy_loss=variant, agg=agg, ref_logprobs=refp, kl_coef=0.05,
              entropy_coef=0.01, temperature=0.9, rollout_is_weights=isw)
    x = logits.clone().requires_grad_()
    out = fastppo.fused_ppo_loss(x, labels, old, adv, mask, **kw)
    (out.loss * 1.7).backward()
    xr = logits.double().requires_grad_()
    rout = ref.fused_ppo_loss(xr, labels, old, adv, mask, **dict(kw, rollout_is_weights=isw.double()))
    (rout.loss * 1.7).backward()
    torch.testing.assert_close(out.loss.double(), rout.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-6)
    _check_stats(out.stats, rout.stats, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", POLICY_LOSSES)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "token-sum"])
def test_linear_variant_matches_reference(variant, agg):
    V, H = 37, 8
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(B, T, H, generator=g).to(DEVICE)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(DEVICE)
    labels = make_labels((B, T), V, holes=0.0)
    _, _, adv, isw, _, mask = _inputs()
    lp = ref.linear_logprobs(hidden, weight, labels)
    old = lp + 0.3 * torch.randn(B, T, generator=g).to(DEVICE)
    kw = dict(VARIANT_KW[variant], policy_loss=variant, agg=agg, entropy_coef=0.02, rollout_is_weights=isw)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fastppo.fused_linear_ppo_loss(h, w, labels, old, adv, mask, **kw)
    (out.loss * 0.7).backward()
    hr, wr = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logits = hr @ wr.t()
    rout = ref.fused_ppo_loss(logits, labels, old, adv, mask, **dict(kw, rollout_is_weights=isw.double()))
    (rout.loss * 0.7).backward()
    torch.testing.assert_close(out.loss.double(), rout.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), hr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", POLICY_LOSSES)
def test_bf16_inputs(variant):
    logp, old, adv, _, _, mask = _inputs(torch.bfloat16)
    x = logp.clone().requires_grad_()
    loss, _ = fastppo.ppo_policy_loss(x, old, adv, mask, policy_loss=variant, **VARIANT_KW[variant])
    loss.backward()
    xr = logp.double().requires_grad_()
    rloss, _ = ref.ppo_policy_loss(xr, old.double(), adv.double(), mask, policy_loss=variant, **VARIANT_KW[variant])
    rloss.backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), rloss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), xr.grad.to(torch.bfloat16).double(), rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("variant,agg", list(itertools.product([v for v in POLICY_LOSSES if v not in COV],
                                                               AGG_MODES)))
def test_microbatches_add_up_exactly(variant, agg):
    logp, old, adv, isw, _, mask = _inputs(b=5)
    counts = dict(num_tokens=int(mask.sum()), num_seqs=int((mask.sum(-1) > 0).sum()), horizon=T)
    kw = dict(VARIANT_KW[variant], policy_loss=variant, agg=agg)
    x = logp.clone().requires_grad_()
    full, _ = fastppo.ppo_policy_loss(x, old, adv, mask, rollout_is_weights=isw, **kw)
    full.backward()
    xm = logp.clone().requires_grad_()
    parts = [fastppo.ppo_policy_loss(xm[s], old[s], adv[s], mask[s], rollout_is_weights=isw[s], **kw, **counts)[0]
             for s in (slice(0, 2), slice(2, 3), slice(3, 5))]
    sum(parts).backward()
    torch.testing.assert_close(sum(parts), full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xm.grad, x.grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("variant", [v for v in POLICY_LOSSES if v not in ("gmpo",) + COV])
@pytest.mark.parametrize("quantile", [0.2, 0.6, 1.0])
def test_entropy_quantile(variant, quantile):
    logp, old, adv, _, ent, mask = _inputs()
    kw = dict(VARIANT_KW[variant], policy_loss=variant, agg="seq-mean-token-mean", entropy_quantile=quantile)
    x = logp.clone().requires_grad_()
    loss, stats = fastppo.ppo_policy_loss(x, old, adv, mask, entropy=ent, **kw)
    loss.backward()
    xr = logp.double().requires_grad_()
    rloss, rstats = ref.ppo_policy_loss(xr, old.double(), adv.double(), mask, entropy=ent.double(), **kw)
    rloss.backward()
    torch.testing.assert_close(loss.double(), rloss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-7)
    _check_stats(stats, rstats)
    if quantile < 1.0:       # the low-entropy tokens get no gradient
        thr = torch.quantile(ent[mask].double(), 1 - quantile)
        low = mask & (ent.double() < thr)
        if variant != "gspo":   # gspo's gradient reaches every token through the sequence mean
            assert (x.grad[low] == 0).all()


def test_gspo_sequence_and_token_forms_agree_for_sequence_advantages():
    """With one advantage per sequence and seq-mean-token-mean, the sequence-ratio gradient
    s_b / n_b sum_t dlogp_t equals the token form's (GSPO paper, eq. 10 vs 12)."""
    logp, old, adv, _, _, mask = _inputs(per_seq_adv=True)
    grads = []
    for v in ("gspo", "gspo_token"):
        x = logp.clone().requires_grad_()
        fastppo.ppo_policy_loss(x, old, adv, mask, policy_loss=v, agg="seq-mean-token-mean", clip_low=0.5,
                                clip_high=0.5)[0].backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)


def test_option_errors():
    logp, old, adv, isw, ent, mask = _inputs()
    for kw, msg in [(dict(policy_loss="grpo"), "policy_loss must be one of"),
                    (dict(policy_loss="cispo", dual_clip=3.0), "dual_clip applies to policy_loss='ppo' only"),
                    (dict(ratio_max=0.5), "ratio_max must be > 1"),
                    (dict(sapo_tau_neg=0.0), "sapo_tau_neg must be > 0"),
                    (dict(entropy_quantile=0.0), "entropy_quantile must be in"),
                    (dict(entropy_quantile=0.5), "needs the per-token entropy"),
                    (dict(policy_loss="gmpo", entropy_quantile=0.5), "not defined for policy_loss='gmpo'"),
                    (dict(agg="mean"), "agg must be one of"),
                    (dict(rollout_is_weights=isw[:, 1:]), "rollout_is_weights shape")]:
        with pytest.raises(ValueError, match=msg):
            fastppo.ppo_policy_loss(logp, old, adv, mask, **kw)


# ----------------------------------------------------------------------------- launches and parallelism
LAUNCHES = {v: (5 if v == "gspo" else 4) for v in POLICY_LOSSES}


@pytest.mark.parametrize("variant", POLICY_LOSSES)
def test_launch_count_is_constant_in_the_batch_shape(variant):
    counts = []
    for b, t in ((2, 5), (3, 2100)):
        logp, old, adv, isw, ent, mask = _inputs(b=b, t=t)
        with count_launches() as launches:
            fastppo.ppo_policy_loss(logp, old, adv, mask, policy_loss=variant, rollout_is_weights=isw,
                                    **VARIANT_KW[variant])
        counts.append(sum(launches.values()))
    assert counts == [LAUNCHES[variant]] * 2, counts


def test_aggregation_uses_many_programs_at_large_batch():
    """#14.5: the per-token aggregation launch runs >= min(B*T/1024, 132) programs (one per (sequence,
    1024-token tile)); only the two small finishing steps are single programs."""
    for b, t in ((2, 68 * 1024),):
        logp, old, adv, _, _, mask = _inputs(b=b, t=t)
        with count_launches() as launches:
            fastppo.ppo_policy_loss(logp, old, adv, mask)
        need = min(b * t / 1024, 132)
        assert launches.programs["loss_agg"] >= need, (b, t, launches.programs)
        assert launches.programs["loss_agg_seq"] >= need
        assert launches.programs["loss_agg_finish"] == launches.programs["loss_agg_seq_finish"] == 1
