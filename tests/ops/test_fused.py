import itertools

import pytest
import torch

import fastppo
from fastppo import reference as ref
from fastppo.kernels.launches import count_launches
from tests.helpers import DEVICE, assert_close_by_dtype, make_labels, make_logits, make_mask

B, T, V = 3, 9, 1031


def _batch(dtype, per_seq_adv=False, scale=2.0):
    logits = make_logits((B, T, V), dtype, scale=scale)
    labels = make_labels((B, T), V, holes=0.1)
    mask = make_mask((B, T)) & (labels != -100)
    with torch.no_grad():
        lp = ref.token_logprobs(logits, labels)
    old = lp + 0.3 * torch.randn(B, T, device=DEVICE)
    refp = lp + 0.2 * torch.randn(B, T, device=DEVICE)
    adv = torch.randn(B, device=DEVICE) if per_seq_adv else torch.randn(B, T, device=DEVICE)
    return logits, labels, old, adv, mask, refp


def _run(fn, logits, *args, upstream=1.7, **kw):
    x = logits.detach().clone().requires_grad_()
    out = fn(x, *args, **kw)
    (out.loss * upstream).backward()
    return out, x.grad


GRID = list(itertools.product(ref.AGG_MODES, ["k3", "low_var_kl", "k1", "abs", "k2"]))


@pytest.mark.parametrize("agg,kl_kind", GRID)
def test_fused_equals_composition_of_reference_pieces(agg, kl_kind):
    logits, labels, old, adv, mask, refp = _batch(torch.float32)
    kw = dict(ref_logprobs=refp, kl_coef=0.05, kl_kind=kl_kind, entropy_coef=0.01, clip_low=0.2,
              clip_high=0.28, dual_clip=1.5, temperature=0.8, agg=agg)
    out, grad = _run(fastppo.fused_ppo_loss, logits, labels, old, adv, mask, **kw)
    rout, rgrad = _run(ref.fused_ppo_loss, logits.double(), labels, old, adv, mask, **kw)
    torch.testing.assert_close(out.loss.double(), rout.loss, rtol=2e-4, atol=2e-4)
    assert_close_by_dtype(grad, rgrad, torch.float32)
    torch.testing.assert_close(out.logprobs.double(), rout.logprobs, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(out.kl.double(), rout.kl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), rout.entropy, rtol=1e-5, atol=2e-5)
    assert set(out.stats) == set(rout.stats)
    for k in out.stats:
        torch.testing.assert_close(out.stats[k].double(), rout.stats[k].double(), rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_seq_adv", [False, True])
def test_low_precision_logits(dtype, per_seq_adv):
    logits, labels, old, adv, mask, refp = _batch(dtype, per_seq_adv)
    kw = dict(ref_logprobs=refp, kl_coef=0.1, entropy_coef=0.02, agg="seq-mean-token-mean")
    out, grad = _run(fastppo.fused_ppo_loss, logits, labels, old, adv, mask, **kw)
    rout, rgrad = _run(ref.fused_ppo_loss, logits.double(), labels, old, adv, mask, **kw)
    assert grad.dtype == dtype
    torch.testing.assert_close(out.loss.double(), rout.loss, rtol=2e-4, atol=2e-4)
    assert_close_by_dtype(grad, rgrad, dtype)


def test_six_launches_and_no_entropy_work_when_unused():
    """Gradient formed in forward (kernels/fused_grad.py): the aggregation weights (2 launches), the row kernel,
    the per-token terms and the finishing reduction (2), and backward's rescaling; the two-pass path (a
    sequence-level loss here: gspo) is logprobs_fwd + 5 aggregation launches + logprobs_bwd."""
    logits, labels, old, adv, mask, refp = _batch(torch.bfloat16)
    with count_launches() as launches:
        out, _ = _run(fastppo.fused_ppo_loss, logits, labels, old, adv, mask, ref_logprobs=refp, kl_coef=0.1)
    assert sum(launches.values()) == 6, launches
    assert launches["fused_grad_fwd"] == launches["fused_grad_rescale"] == 1
    assert "logprobs_fwd" not in launches and "logprobs_bwd" not in launches
    assert out.entropy is None and "entropy" not in out.stats
    with count_launches() as launches:
        out, _ = _run(fastppo.fused_ppo_loss, logits, labels, old, adv, mask, ref_logprobs=refp, kl_coef=0.1,
                      policy_loss="gspo")
    assert sum(launches.values()) == 7, launches
    assert launches["logprobs_fwd"] == launches["logprobs_bwd"] == 1


def test_return_entropy_without_coefficient():
    logits, labels, old, adv, mask, _ = _batch(torch.float32)
    out, grad = _run(fastppo.fused_ppo_loss, logits, labels, old, adv, mask, return_entropy=True)
    rout, rgrad = _run(ref.fused_ppo_loss, logits.double(), labels, old, adv, mask)
    live = torch.where(mask, labels, -100)             # mask-0 rows are not read: entropy 0 there
    torch.testing.assert_close(out.entropy.double(), ref.token_logprobs(logits.double(), live,
                                                                        return_entropy=True)[1], rtol=1e-5, atol=2e-5)
    assert_close_by_dtype(grad, rgrad, torch.float32)
    assert out.kl is None


def test_inplace_writes_the_gradient_into_logits_storage():
    """inplace=True: the gradient formed in forward is written over the logits during the forward pass; backward
    scales it in place (its logits are gone): equal to the new-buffer path for a power-of-two upstream, within
    the second rounding otherwise."""
    logits, labels, old, adv, mask, _ = _batch(torch.bfloat16)
    for upstream in (1.0, 0.5, 1.7):
        expected_out, expected = _run(fastppo.fused_ppo_loss, logits, labels, old, adv, mask, entropy_coef=0.01,
                                      upstream=upstream)
        leaf = logits.detach().clone().requires_grad_()
        x = leaf * 1.0                  # as in a model: the logits are an activation, not a leaf
        out = fastppo.fused_ppo_loss(x, labels, old, adv, mask, entropy_coef=0.01, inplace=True)
        if upstream == 1.0:             # written in the forward pass already
            _, unit = _run(fastppo.fused_ppo_loss, logits, labels, old, adv, mask, entropy_coef=0.01, upstream=1.0)
            torch.testing.assert_close(x.detach(), unit, rtol=0, atol=0)
        (out.loss * upstream).backward()
        torch.testing.assert_close(out.loss, expected_out.loss, rtol=0, atol=0)
        if upstream == 1.7:             # bf16(1.7 bf16(G)) against bf16(1.7 G): one more rounding
            torch.testing.assert_close(leaf.grad.float(), expected.float(), rtol=2 ** -7, atol=1e-30)
        else:
            torch.testing.assert_close(x.detach(), expected, rtol=0, atol=0)   # the logits' storage holds dlogits
            torch.testing.assert_close(leaf.grad, expected, rtol=0, atol=0)


def test_inplace_two_pass_path_writes_during_backward():
    """A sequence-level loss keeps the two-pass path: with inplace=True its backward writes over the logits."""
    logits, labels, old, adv, mask, _ = _batch(torch.bfloat16)
    kw = dict(entropy_coef=0.01, policy_loss="gmpo")
    _, expected = _run(fastppo.fused_ppo_loss, logits, labels, old, adv, mask, **kw)
    leaf = logits.detach().clone().requires_grad_()
    x = leaf * 1.0
    out = fastppo.fused_ppo_loss(x, labels, old, adv, mask, inplace=True, **kw)
    torch.testing.assert_close(x.detach(), logits, rtol=0, atol=0)   # untouched by the forward
    (out.loss * 1.7).backward()
    torch.testing.assert_close(x.detach(), expected, rtol=0, atol=0)
    torch.testing.assert_close(leaf.grad, expected, rtol=0, atol=0)


def test_shifted_logits_view_and_2d():
    logits, labels, old, adv, mask, _ = _batch(torch.float32)
    full = torch.cat([logits, logits[:, :1]], dim=1)
    out, grad = _run(fastppo.fused_ppo_loss, full[:, :-1], labels, old, adv, mask)
    rout, rgrad = _run(ref.fused_ppo_loss, logits.double(), labels, old, adv, mask)
    torch.testing.assert_close(out.loss.double(), rout.loss, rtol=2e-5, atol=2e-5)
    assert_close_by_dtype(grad, rgrad, torch.float32)
    out2, _ = _run(fastppo.fused_ppo_loss, logits[0], labels[0], old[0], adv[0], mask[0])
    rout2, _ = _run(ref.fused_ppo_loss, logits[0].double(), labels[0], old[0], adv[0], mask[0])
    torch.testing.assert_close(out2.loss.double(), rout2.loss, rtol=2e-5, atol=2e-5)


def test_torch_backend_matches():
    logits, labels, old, adv, mask, refp = _batch(torch.float32)
    kw = dict(ref_logprobs=refp, kl_coef=0.1, entropy_coef=0.01)
    out, grad = _run(fastppo.fused_ppo_loss, logits, labels, old, adv, mask, **kw)
    with fastppo.use_backend("torch"):
        tout, tgrad = _run(fastppo.fused_ppo_loss, logits, labels, old, adv, mask, **kw)
    torch.testing.assert_close(out.loss, tout.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, tgrad, rtol=1e-4, atol=1e-7)


def test_gradcheck_float64():
    logits = torch.randn(2, 3, 11, dtype=torch.float64, device=DEVICE, requires_grad=True)
    labels = make_labels((2, 3), 11, holes=0)
    old = torch.randn(2, 3, dtype=torch.float64, device=DEVICE) * 0.1 - 2.4
    adv = torch.randn(2, 3, dtype=torch.float64, device=DEVICE)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool, device=DEVICE)

    def f(x):
        return fastppo.fused_ppo_loss(x, labels, old, adv, mask, ref_logprobs=old, kl_coef=0.1,
                                      entropy_coef=0.05).loss

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_bad_arguments():
    logits, labels, old, adv, mask, refp = _batch(torch.float32)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        fastppo.fused_ppo_loss(logits, labels, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_kind"):
        fastppo.fused_ppo_loss(logits, labels, old, adv, mask, ref_logprobs=refp, kl_kind="full")
    with pytest.raises(ValueError, match="logits must be"):
        fastppo.fused_ppo_loss(logits[..., None], labels, old, adv, mask)
    with pytest.raises(ValueError, match="mask shape"):
        fastppo.fused_ppo_loss(logits, labels, old, adv, mask[:, 1:])
    with pytest.raises(ValueError, match="labels must be in"):
        fastppo.fused_ppo_loss(logits, labels.clamp_min(0) + V, old, adv, mask)
