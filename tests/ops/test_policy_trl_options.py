"""TRL 1.16's loss pieces fastppo lacked: policy_loss="vespo", off_policy_mask_threshold (DeepSeek-V3.2's
off-policy sequence mask) and kl_bias_correction (use_bias_correction_kl), on both backends, against the
float64 reference and against TRL's own static functions (GRPOTrainer.get_gamma_weights /
get_off_policy_mask, the real host code); the fused ops from logits and from hidden states. The
every-aggregation sweeps of vespo are tests/ops/test_policy_variants.py's."""

import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer

import fastppo
from fastppo import reference as ref
from fastppo.policy_weights import off_policy_keep
from tests.helpers import DEVICE, make_labels, run_fused_losses

B, T = 4, 9


def _inputs(seed=0, per_seq_adv=True, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(B, T, generator=g) * 0.5 - 1.0
    old = logp + torch.randn(B, T, generator=g) * spread
    adv = torch.randn(B, generator=g) if per_seq_adv else torch.randn(B, T, generator=g)
    isw = torch.rand(B, T, generator=g) + 0.5
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[1] = False
    mask[0, :2] = True
    return [x.to(DEVICE) for x in (logp, old, adv, isw, mask)]


def _check(kw, logp, old, adv, mask, isw=None):
    x = logp.clone().requires_grad_()
    loss, _ = fastppo.ppo_policy_loss(x, old, adv, mask, rollout_is_weights=isw, **kw)
    (loss * 1.3).backward()
    xr = logp.double().requires_grad_()
    rloss, _ = ref.ppo_policy_loss(xr, old.double(), adv.double(), mask,
                                   rollout_is_weights=None if isw is None else isw.double(), **kw)
    (rloss * 1.3).backward()
    torch.testing.assert_close(loss.double(), rloss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-7)
    return loss, x.grad


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("with_isw", [False, True])
def test_vespo_is_trls_gamma_weighted_loss(backend, with_isw):
    """fastppo's vespo vs TRL's get_gamma_weights + its vespo per-token loss, aggregated as TRL's luspo /
    seq sum (sum over tokens, mean over all rows): loss and gradient."""
    logp, old, adv, isw, mask = _inputs(spread=0.1)
    w = isw if with_isw else None
    with fastppo.use_backend(backend):
        loss, grad = _check(dict(policy_loss="vespo", agg="seq-mean-token-sum", num_seqs=B), logp, old, adv, mask, w)
    lt = logp.clone().requires_grad_()
    mf = mask.float()
    trl_isw = None if w is None else torch.where(mask, w, torch.ones_like(w))   # TRL's weights are 1 off the mask
    phi = GRPOTrainer.get_gamma_weights(adv[:, None], lt.detach() - old, mf, trl_isw)
    trl = ((-phi * adv[:, None] * lt * mf).sum(-1)).mean()
    (trl * 1.3).backward()
    torch.testing.assert_close(loss, trl, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(grad, lt.grad, rtol=2e-5, atol=1e-8)
    assert (phi > 0).any() and (phi < 1).any()   # the weight acts


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("variant", ["ppo", "gspo_token", "cispo", "sapo", "dro", "vespo"])
@pytest.mark.parametrize("per_seq_adv", [True, False])
def test_off_policy_mask_matches_reference(backend, variant, per_seq_adv):
    logp, old, adv, isw, mask = _inputs(per_seq_adv=per_seq_adv)
    old = old + 0.3                      # the old policy far from the current one: sequences over the threshold
    adv[0] = -adv[0].abs()               # with negative advantages (dropped) and others (kept)
    kw = dict(policy_loss=variant, agg="seq-mean-token-mean", off_policy_mask_threshold=0.0)
    if variant == "dro":
        kw["dro_beta"] = 0.5
    with fastppo.use_backend(backend):
        _, grad = _check(kw, logp, old, adv, mask, isw)
    dropped = mask & ~off_policy_keep(logp, old, adv, mask, 0.0)
    assert dropped.any() and (grad[dropped] == 0).all()


@pytest.mark.parametrize("per_seq_adv", [True, False])
def test_off_policy_keep_is_trls_mask(per_seq_adv):
    logp, old, adv, _, mask = _inputs(per_seq_adv=per_seq_adv)
    logp[2, 3] = float("nan")   # an unscorable token: no KL evidence (TRL's nan_to_num)
    for thr in (-0.05, 0.0, 0.05):
        a2 = adv[:, None] if per_seq_adv else adv
        want = GRPOTrainer.get_off_policy_mask(a2, logp, old, mask.float(), thr)
        got = off_policy_keep(logp, old, adv, mask, thr)
        torch.testing.assert_close(got.float(), want.expand(B, T))


def test_off_policy_mask_packed_equals_padded():
    logp, old, adv, isw, mask = _inputs(per_seq_adv=False)
    lens = torch.tensor([9, 3, 6, 8])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(DEVICE)
    pad = torch.arange(T, device=DEVICE)[None] < lens.to(DEVICE)[:, None]
    kw = dict(policy_loss="vespo", agg="token-mean", off_policy_mask_threshold=0.0)
    x = logp[pad].clone().requires_grad_()
    loss, _ = fastppo.ppo_policy_loss(x, old[pad], adv[pad], (mask & pad)[pad], cu_seqlens=cu, **kw)
    loss.backward()
    xp = logp.clone().requires_grad_()
    want, _ = fastppo.ppo_policy_loss(xp, old, adv, mask & pad, **kw)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, xp.grad[pad], rtol=1e-6, atol=1e-8)


def _head_inputs(V, seed, H=8, **inputs_kw):
    """(generator, hidden [B, T, H], weight [V, H], labels with holes, advantages, IS weights, mask without the
    ignored labels) for the fused losses from hidden states and from logits."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(DEVICE)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(DEVICE)
    labels = make_labels((B, T), V, holes=0.1)
    _, _, adv, isw, mask = _inputs(**inputs_kw)
    return g, hidden, weight, labels, adv, isw, mask & (labels != -100)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("kw", [dict(kl_bias_correction=True, kl_coef=0.3),
                                dict(off_policy_mask_threshold=0.0, policy_loss="vespo"),
                                dict(kl_bias_correction=True, kl_coef=0.2, off_policy_mask_threshold=0.0)])
def test_fused_from_logits_and_hidden(backend, kw):
    g, hidden, weight, labels, adv, isw, mask = _head_inputs(29, 4)
    lp = ref.linear_logprobs(hidden, weight, labels)
    old = (lp + 0.3 * torch.randn(B, T, generator=g).to(DEVICE)).float()
    refp = (lp + 0.2 * torch.randn(B, T, generator=g).to(DEVICE)).float()
    kw = dict(kw, ref_logprobs=refp, agg="seq-mean-token-mean", rollout_is_weights=isw)
    hr, wr = hidden.double().requires_grad_(), weight.double().requires_grad_()
    rout = ref.fused_ppo_loss(hr @ wr.t(), labels, old, adv, mask, **dict(kw, rollout_is_weights=isw.double()))
    (rout.loss * 0.7).backward()
    out, lout, h_grad, w_grad, z_grad = run_fused_losses(hidden, weight, labels, old, adv, mask, backend, **kw)
    for o in (out, lout):
        torch.testing.assert_close(o.loss.double(), rout.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(o.stats["kl"].double(), rout.stats["kl"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_grad.double(), hr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w_grad.double(), wr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(z_grad.double(), _dlogits(hidden, weight, labels, old, adv, mask, kw), rtol=1e-4,
                               atol=1e-6)


def _dlogits(hidden, weight, labels, old, adv, mask, kw):
    z = (hidden @ weight.t()).double().requires_grad_()
    rkw = dict(kw, rollout_is_weights=kw["rollout_is_weights"].double())
    (ref.fused_ppo_loss(z, labels, old, adv, mask, **rkw).loss * 0.7).backward()
    return z.grad


def test_kl_bias_correction_changes_only_the_kl_term():
    logp, old, adv, _, mask = _inputs()
    V = 11
    logits = torch.randn(B, T, V, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    labels = make_labels((B, T), V, holes=0.0)
    lp = ref.token_logprobs(logits, labels).float()
    refp = lp + 0.3
    a = fastppo.fused_ppo_loss(logits, labels, lp + 0.2, adv, mask, ref_logprobs=refp, kl_coef=0.5)
    b = fastppo.fused_ppo_loss(logits, labels, lp + 0.2, adv, mask, ref_logprobs=refp, kl_coef=0.5,
                               kl_bias_correction=True)
    assert float(a.stats["pg_loss"]) == float(b.stats["pg_loss"]) and float(a.stats["kl"]) == float(b.stats["kl"])
    assert abs(float(a.loss) - float(b.loss)) > 1e-4


def test_option_errors():
    logp, old, adv, _, mask = _inputs()
    for kw, err, msg in [(dict(policy_loss="gmpo", off_policy_mask_threshold=0.1), ValueError, "not defined for"),
                         (dict(off_policy_mask_threshold=float("nan")), ValueError, "off_policy_mask_threshold"),
                         (dict(policy_loss="vespo", vespo_k_pos=float("inf")), ValueError, "vespo_k_pos")]:
        with pytest.raises(err, match=msg):
            fastppo.ppo_policy_loss(logp, old, adv, mask, **kw)
    with pytest.raises(TypeError, match="kl_bias_correction must be a bool"):
        fastppo.fused_ppo_loss(torch.randn(B, T, 5), torch.zeros(B, T, dtype=torch.long), old, adv, mask,
                               kl_bias_correction=1)


def _behaviour(logp, mask, seed=6):
    """vLLM's sampling log-probs: off the current policy, with an unscorable (NaN) valid token."""
    g = torch.Generator().manual_seed(seed)
    beh = logp + 0.4 + 0.3 * torch.randn(logp.shape, generator=g).to(logp.device)
    beh[0, 1] = float("nan")
    beh[~mask] = float("nan")          # masked positions: never read
    return beh


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("variant", ["ppo", "cispo", "gpg", "vespo"])
def test_off_policy_logprobs_is_trls_sampling_mask(backend, variant):
    """off_policy_logprobs: the mask measures mean(sampling - logp) as TRL's get_off_policy_mask does with
    vLLM's sampling_per_token_logps (not old_logprobs): loss and gradient vs float64, the dropped tokens those
    of TRL's mask (and not those of the mask against old_logprobs)."""
    logp, old, adv, isw, mask = _inputs(per_seq_adv=False)
    adv[0] = -adv[0].abs()
    adv[2] = -adv[2].abs()
    beh = _behaviour(logp, mask)
    kw = dict(policy_loss=variant, agg="token-sum", off_policy_mask_threshold=0.1, off_policy_logprobs=beh)
    with fastppo.use_backend(backend):
        _, grad = _check(kw, logp, old, adv, mask, isw)
    trl_keep = GRPOTrainer.get_off_policy_mask(adv, logp, beh, mask.float(), 0.1).expand(B, T).bool()
    dropped = mask & ~trl_keep
    assert dropped.any() and (grad[dropped] == 0).all() and (grad[mask & trl_keep] != 0).any()
    assert not torch.equal(off_policy_keep(logp, old, adv, mask, 0.1), trl_keep | ~mask)   # old would differ


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fused_linear_off_policy_logprobs(backend):
    g, hidden, weight, labels, adv, isw, mask = _head_inputs(29, 8, per_seq_adv=False)
    adv[0] = -adv[0].abs()
    lp = ref.linear_logprobs(hidden, weight, labels).float()
    old = lp + 0.2 * torch.randn(B, T, generator=g).to(DEVICE)
    beh = _behaviour(lp, mask, 9)
    kw = dict(policy_loss="ppo", agg="seq-mean-token-mean", off_policy_mask_threshold=0.2, off_policy_logprobs=beh,
              rollout_is_weights=isw, ref_logprobs=lp + 0.1, kl_coef=0.1)
    hr, wr = hidden.double().requires_grad_(), weight.double().requires_grad_()
    rout = ref.fused_ppo_loss(hr @ wr.t(), labels, old, adv, mask, **dict(kw, rollout_is_weights=isw.double()))
    (rout.loss * 0.7).backward()
    with fastppo.use_backend(backend):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fastppo.fused_linear_ppo_loss(h, w, labels, old, adv, mask, **kw)
        (out.loss * 0.7).backward()
    torch.testing.assert_close(out.loss.double(), rout.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), hr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=1e-4, atol=1e-6)
    plain = fastppo.fused_linear_ppo_loss(hidden, weight, labels, old, adv, mask, **dict(kw, off_policy_logprobs=None))
    assert abs(float(plain.loss) - float(out.loss.detach())) > 1e-5   # the behaviour log-probs changed the mask


def test_off_policy_logprobs_packed_equals_padded():
    logp, old, adv, isw, mask = _inputs(per_seq_adv=False)
    beh = _behaviour(logp, mask)
    lens = torch.tensor([9, 3, 6, 8])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(DEVICE)
    pad = torch.arange(T, device=DEVICE)[None] < lens.to(DEVICE)[:, None]
    kw = dict(policy_loss="ppo", agg="token-mean", off_policy_mask_threshold=0.1)
    x = logp[pad].clone().requires_grad_()
    loss, _ = fastppo.ppo_policy_loss(x, old[pad], adv[pad], (mask & pad)[pad], cu_seqlens=cu,
                                      off_policy_logprobs=beh[pad], **kw)
    loss.backward()
    xp = logp.clone().requires_grad_()
    want, _ = fastppo.ppo_policy_loss(xp, old, adv, mask & pad, off_policy_logprobs=beh, **kw)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, xp.grad[pad], rtol=1e-6, atol=1e-8)


def test_off_policy_logprobs_errors():
    logp, old, adv, _, mask = _inputs()
    with pytest.raises(ValueError, match="needs off_policy_mask_threshold"):
        fastppo.ppo_policy_loss(logp, old, adv, mask, off_policy_logprobs=old)
    with pytest.raises(ValueError, match="off_policy_logprobs"):
        fastppo.ppo_policy_loss(logp, old, adv, mask, off_policy_mask_threshold=0.0, off_policy_logprobs=old[:, :3])


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("kw", [dict(policy_loss="gspo", agg="seq-mean-token-mean", kl_kind="k3"),
                                dict(policy_loss="ppo", agg="token-sum", kl_kind="low_var_kl",
                                     off_policy_mask_threshold=0.0)])
def test_kl_bias_correction_sequence_level(backend, kw):
    """kl_bias_correction_level="sequence": KL_t exp(mean_b(logp - old)) with its gradient through the sequence
    mean (TRL's use_bias_correction_kl at importance_sampling_level="sequence"), from hidden states and from
    logits, vs float64; and vs TRL's own formula on the same log-probs."""
    g, hidden, weight, labels, adv, isw, mask = _head_inputs(23, 11)
    lp = ref.linear_logprobs(hidden, weight, labels).float()
    old = lp + 0.2 * torch.randn(B, T, generator=g).to(DEVICE)
    refp = lp + 0.3 * torch.randn(B, T, generator=g).to(DEVICE)
    kw = dict(kw, ref_logprobs=refp, kl_coef=0.4, kl_bias_correction=True, kl_bias_correction_level="sequence",
              rollout_is_weights=isw)
    hr, wr = hidden.double().requires_grad_(), weight.double().requires_grad_()
    rout = ref.fused_ppo_loss(hr @ wr.t(), labels, old, adv, mask, **dict(kw, rollout_is_weights=isw.double()))
    (rout.loss * 0.7).backward()
    out, lout, h_grad, w_grad, z_grad = run_fused_losses(hidden, weight, labels, old, adv, mask, backend, **kw)
    for o in (out, lout):
        torch.testing.assert_close(o.loss.double(), rout.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_grad.double(), hr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w_grad.double(), wr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(z_grad.double(), _dlogits(hidden, weight, labels, old, adv, mask, kw), rtol=1e-4,
                               atol=1e-6)
    token = fastppo.fused_ppo_loss(hidden @ weight.t(), labels, old, adv, mask,
                                   **dict(kw, kl_bias_correction_level="token"))
    assert abs(float(token.loss) - float(lout.loss.detach())) > 1e-5


def test_kl_bias_correction_sequence_is_trls_term():
    """The KL term alone (advantages 0) vs TRL 1.16 _compute_loss's sequence-level per_token_kl * coef_1,
    aggregated as its grpo loss type: loss and gradient wrt the logits."""
    mask = _inputs()[-1]
    V = 13
    logits = torch.randn(B, T, V, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    labels = make_labels((B, T), V, holes=0.0)
    lp = ref.token_logprobs(logits, labels).float()
    z = logits.clone().requires_grad_()
    out = fastppo.fused_ppo_loss(z, labels, lp + 0.2, torch.zeros(B, device=DEVICE), mask, ref_logprobs=lp + 0.3,
                                 kl_coef=1.0, kl_bias_correction=True, kl_bias_correction_level="sequence",
                                 agg="seq-mean-token-mean", num_seqs=float(B))
    out.loss.backward()
    zt = logits.clone().requires_grad_()
    per_token_logps = torch.log_softmax(zt, -1).gather(-1, labels[..., None])[..., 0]
    m = mask.float()
    r, o = lp + 0.3, lp + 0.2
    per_token_kl = torch.exp(r - per_token_logps) - (r - per_token_logps) - 1
    coef_1 = torch.exp(((per_token_logps - o) * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    trl = ((per_token_kl * coef_1 * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    trl.backward()
    torch.testing.assert_close(out.loss, trl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(z.grad, zt.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("eh", [0.6, 0.0])
def test_cispo_cap_below_one_is_trls(backend, eh):
    """cispo with clip_low=1, clip_high=eh-1 < 0: L = -sg(min(r, eh)) A logp, TRL 1.16's cispo with
    epsilon_high < 1 (clamp(coef_1, max=epsilon_high).detach()), vs float64 and vs TRL's formula."""
    logp, old, adv, isw, mask = _inputs(per_seq_adv=False, spread=0.5)
    kw = dict(policy_loss="cispo", clip_low=1.0, clip_high=eh - 1.0, agg="token-sum")
    with fastppo.use_backend(backend):
        loss, grad = _check(kw, logp, old, adv, mask, isw)
    lt = logp.clone().requires_grad_()
    coef = torch.clamp(torch.exp(lt - old), max=eh).detach()
    trl = (-coef * adv * lt * isw * mask.float()).sum()
    (trl * 1.3).backward()   # as _check's upstream gradient
    torch.testing.assert_close(loss, trl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, lt.grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="clip_high must be >= 0"):
        fastppo.ppo_policy_loss(logp, old, adv, mask, policy_loss="cispo", clip_low=0.2, clip_high=-0.5)
    with pytest.raises(ValueError, match="clip_high must be >= 0"):
        fastppo.ppo_policy_loss(logp, old, adv, mask, policy_loss="ppo", clip_low=1.0, clip_high=-0.5)
