"""entropy_agg="token-mean" on the fused losses (LossOptions.entropy_agg): the entropy term is its own token
mean over the valid tokens (those entropy_quantile keeps), whatever the loss's aggregation (TRL 1.16
GRPOTrainer._compute_loss's entropy bonus). fused_linear_ppo_loss (its 6 N H V path on Triton, the recompute
path with entropy_quantile) and fused_ppo_loss, both backends, against the float64 composition of
fastppo.reference and against TRL's own formula; masked NaN, empty rows, option errors, float64 gradcheck."""

import pytest
import torch

import fastppo
from fastppo import reference as ref
from fastppo.bench.counters import DotFlops, hide_interpreter_copies
from tests.helpers import DEVICE, make_labels, run_fused_losses

B, T, H, V = 4, 7, 8, 37


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.6
    torch.manual_seed(seed)
    labels = make_labels((B, T), V, holes=0.1, device="cpu")
    mask = (torch.rand(B, T, generator=g) > 0.25) & (labels != -100)
    mask[1] = False                       # an empty row
    mask[0, :3] = True
    labels[0, :3] = labels[0, :3].clamp(min=0)
    lp = ref.linear_logprobs(hidden, weight, labels).float()
    old = lp + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    refp = lp + 0.2 * torch.randn(B, T, generator=g)
    return [x.to(DEVICE) for x in (hidden, weight, labels, mask, old, adv, refp)]


def _ref_grads(hidden, weight, labels, mask, old, adv, kw):
    hr, wr = hidden.double().requires_grad_(), weight.double().requires_grad_()
    out = ref.fused_ppo_loss(hr @ wr.t(), labels, old, adv, mask, **kw)
    (out.loss * 0.7).backward()
    return out.loss.detach(), hr.grad, wr.grad


CASES = [dict(agg="token-sum", entropy_coef=0.3),
         dict(agg="seq-mean-token-mean", num_seqs=float(B), entropy_coef=-0.2, kl_coef=0.05),
         dict(agg="token-sum", entropy_coef=0.3, entropy_quantile=0.5),
         dict(agg="seq-mean-token-sum", entropy_coef=0.1, policy_loss="cispo", clip_low=1.0, clip_high=0.3)]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fused_losses_match_float64_reference(backend, case):
    hidden, weight, labels, mask, old, adv, refp = _inputs(case)
    kw = dict(CASES[case], entropy_agg="token-mean", ref_logprobs=refp)
    want, dh, dw = _ref_grads(hidden, weight, labels, mask, old, adv, kw)
    out, lout, h_grad, w_grad, z_grad = run_fused_losses(hidden, weight, labels, old, adv, mask, backend, **kw)
    for o in (out, lout):
        torch.testing.assert_close(o.loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_grad.double(), dh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w_grad.double(), dw, rtol=1e-4, atol=1e-6)
    zr = (hidden @ weight.t()).double().requires_grad_()
    (ref.fused_ppo_loss(zr, labels, old, adv, mask, **kw).loss * 0.7).backward()
    torch.testing.assert_close(z_grad.double(), zr.grad, rtol=1e-4, atol=1e-6)
    # the option acts: the entropy term aggregated by `agg` differs
    other = fastppo.fused_ppo_loss(hidden @ weight.t(), labels, old, adv, mask, **CASES[case], ref_logprobs=refp)
    assert abs(float(other.loss) - float(lout.loss.detach())) > 1e-4


@pytest.mark.parametrize("quantile", [None, 0.6])
def test_bonus_is_trls_formula(quantile):
    """The entropy term alone (advantages 0, no KL) against TRL 1.16's bonus written as its _compute_loss
    writes it: (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0), effective_mask =
    mask * get_high_entropy_mask(...) with top_entropy_quantile."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    hidden, weight, labels, mask, old, _, _ = _inputs(7)
    zero_adv = torch.zeros(B, device=DEVICE)
    out = fastppo.fused_linear_ppo_loss(hidden, weight, labels, old, zero_adv, mask, agg="token-sum", entropy_coef=1.0,
                                        entropy_agg="token-mean", entropy_quantile=quantile, return_entropy=True)
    ent, m = out.entropy, mask.float()
    eff = m
    if quantile is not None:
        tr = GRPOTrainer.__new__(GRPOTrainer)
        tr.accelerator = type("OneProcess", (), {"gather": staticmethod(lambda x: x),
                                                 "pad_across_processes": staticmethod(lambda x, **_: x)})()
        eff = m * GRPOTrainer.get_high_entropy_mask(tr, ent, m, 1 - quantile).float()
        assert 0 < eff.sum() < m.sum()
    trl_bonus = (ent * eff).sum() / eff.sum().clamp(min=1.0)
    torch.testing.assert_close(out.loss, -trl_bonus, rtol=1e-6, atol=1e-7)


def test_gradient_stays_in_forward_with_the_option():
    """Without entropy_quantile the linear path still forms the gradient in forward: 6 N_valid H V tl.dot
    FLOPs with entropy_agg as without it (counted in the interpreter)."""
    if DEVICE != "cpu":
        pytest.skip("counts tl.dot FLOPs under the interpreter")
    hidden, weight, labels, mask, old, adv, _ = _inputs(3)
    flops = []
    for extra in ({}, {"entropy_agg": "token-mean"}):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        dots = DotFlops()
        with fastppo.use_backend("triton"), dots.count(), hide_interpreter_copies():
            out = fastppo.fused_linear_ppo_loss(h, w, labels, old, adv, mask, agg="token-sum", entropy_coef=0.2,
                                                **extra)
            out.loss.backward()
        flops.append(dots.flops)
    assert flops[0] == flops[1] > 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_masked_nan_does_not_leak(backend):
    hidden, weight, labels, mask, old, adv, _ = _inputs(5)
    hidden = hidden.clone()
    hidden[~mask] = float("nan")
    old = torch.where(mask, old, torch.full_like(old, float("nan")))
    kw = dict(agg="token-sum", entropy_coef=0.4, entropy_agg="token-mean")
    with fastppo.use_backend(backend):
        h = hidden.clone().requires_grad_()
        out = fastppo.fused_linear_ppo_loss(h, weight, labels, old, adv, mask, **kw)
        out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(h.grad).all() and (h.grad[~mask] == 0).all()


def test_all_masked_gives_zero_entropy_term():
    hidden, weight, labels, mask, old, adv, _ = _inputs(2)
    out = fastppo.fused_ppo_loss(hidden @ weight.t(), labels, old, adv, torch.zeros_like(mask), entropy_coef=0.5,
                                 entropy_agg="token-mean")
    assert float(out.loss) == 0.0


def test_float64_gradcheck():
    hidden, weight, labels, mask, old, adv, _ = _inputs(4)
    z = (hidden @ weight.t()).double()[:, :4].contiguous().requires_grad_()
    lab, m, o = labels[:, :4], mask[:, :4], old[:, :4].double()

    def f(x):
        with fastppo.use_backend("torch"):
            return fastppo.fused_ppo_loss(x, lab, o, adv.double(), m, agg="token-sum", entropy_coef=0.3,
                                          entropy_agg="token-mean").loss

    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7)


def test_option_errors():
    hidden, weight, labels, mask, old, adv, _ = _inputs(1)
    with pytest.raises(ValueError, match="entropy_agg must be one of"):
        fastppo.fused_linear_ppo_loss(hidden, weight, labels, old, adv, mask, entropy_coef=0.1,
                                      entropy_agg="seq-mean-token-mean")
