"""token_logprobs when only the entropy is differentiated (TRL's / OpenRLHF's `entropy_from_logits`, an entropy
bonus): the log-prob upstream is absent (None) through token_logprobs_backward, so the backward does no log-prob
work (issue #25, CPU speed: no one-hot, no c_logp (onehot - p)). Values and gradients against float64 on both
backends; the eager work drop counted on the torch backend."""

import pytest
import torch

import fastppo
from fastppo import reference as ref
from fastppo.bench.counters import EagerTraffic
from tests.helpers import DEVICE, assert_close_by_dtype, make_labels, make_logits

BACKENDS = ["triton", "torch"]


def _ref_ent_grad(logits, labels, g_ent, **kw):
    x = logits.detach().double().requires_grad_()
    _, ent = ref.token_logprobs(x, labels, return_entropy=True, **kw)
    torch.where(labels != -100, ent * g_ent.double(), 0.0).sum().backward()
    return ent.detach(), x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_entropy_only_gradient_matches_float64(backend, dtype):
    """Non-contiguous [B, T-1, V] view, ignored labels, an odd vocabulary, temperature + softcap."""
    full = make_logits((3, 8, 301), dtype)
    logits = full[:, :-1]
    labels = make_labels((3, 7), 301)
    kw = dict(temperature=0.8, final_logit_softcapping=20.0, logit_scale=1.3)
    x = logits.detach().clone().requires_grad_()
    with fastppo.use_backend(backend):
        _, ent = fastppo.token_logprobs(x, labels, return_entropy=True, **kw)
        g_ent = torch.randn(ent.shape, dtype=ent.dtype, device=DEVICE)
        (ent * g_ent).sum().backward()
    rent, rgrad = _ref_ent_grad(logits, labels, g_ent, **kw)
    assert_close_by_dtype(ent, torch.where(labels != -100, rent, 0.0), ent.dtype)
    assert_close_by_dtype(x.grad, rgrad, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_only_nan_row_and_ignored_nan(backend):
    """A NaN in a live row poisons that row's gradient (as autograd of the formula does); a NaN in an ignored
    row contributes exactly nothing."""
    logits = make_logits((4, 50), torch.float32)
    labels = make_labels((4,), 50, holes=0.0)
    labels[2] = -100
    logits[1, 7] = float("nan")
    logits[2, 3] = float("nan")
    x = logits.clone().requires_grad_()
    with fastppo.use_backend(backend):
        _, ent = fastppo.token_logprobs(x, labels, return_entropy=True)
        ent.sum().backward()
    assert torch.isnan(x.grad[1]).all()
    assert (x.grad[2] == 0).all()
    rent, rgrad = _ref_ent_grad(logits[[0, 3]], labels[[0, 3]], torch.ones(2))
    assert_close_by_dtype(x.grad[[0, 3]], rgrad, torch.float32)


def test_entropy_only_op_gradcheck():
    x = torch.randn(3, 11, dtype=torch.float64, device=DEVICE, requires_grad=True)
    labels = torch.tensor([1, -100, 4], device=DEVICE)
    with fastppo.use_backend("torch"):
        assert torch.autograd.gradcheck(
            lambda t: fastppo.token_logprobs(t, labels, return_entropy=True, temperature=0.7)[1], (x,),
            fast_mode=True)


def test_entropy_only_backward_skips_the_logprob_term():
    """Torch backend, [64, 1024] fp32: the entropy-only backward builds no one-hot (no scatter) and moves fewer
    bytes than the same backward with a (zero) log-prob upstream."""
    logits = make_logits((64, 1024), torch.float32)
    labels = make_labels((64,), 1024)

    def traffic(with_logp):
        x = logits.clone().requires_grad_()
        with fastppo.use_backend("torch"):
            lp, ent = fastppo.token_logprobs(x, labels, return_entropy=True)
            loss = ent.sum() + (0.0 * lp.sum() if with_logp else 0.0)
            with EagerTraffic() as t:
                loss.backward()
        return t, x.grad

    only, g_only = traffic(False)
    both, g_both = traffic(True)
    torch.testing.assert_close(g_only, g_both, rtol=0, atol=0)
    assert "scatter_add_" in both.per_op and "scatter_add_" not in only.per_op, (both.per_op, only.per_op)
    v_bytes = 64 * 1024 * 4
    assert only.bytes <= both.bytes - 4 * v_bytes, (only.bytes, both.bytes)
    print(f"entropy-only backward: {only.bytes} B, {only.launches} ops; with a log-prob upstream: {both.bytes} B, "
          f"{both.launches} ops")


@pytest.mark.parametrize("threads", [1, 2])
def test_torch_backend_slices_match_float64(threads, monkeypatch):
    """The PyTorch backend over several row slices (3 rows each, the last one short; the cache-sized slices of a
    single CPU thread or the large ones of several): log-probs, entropy and both gradients (upstream not all ones,
    ignored rows, temperature) against float64."""
    import fastppo.logprobs_torch as lt

    V = 301
    monkeypatch.setattr(lt, "CPU_CHUNK_ELEMENTS", 3 * V)
    monkeypatch.setattr(lt, "LOGPROBS_CHUNK_ELEMENTS", 3 * V)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        logits = make_logits((2, 7, V), torch.float32)[:, :, :]
        labels = make_labels((2, 7), V)
        g_lp, g_ent = torch.randn(2, 7, device=DEVICE), torch.randn(2, 7, device=DEVICE)
        x = logits.clone().requires_grad_()
        with fastppo.use_backend("torch"):
            lp, ent = fastppo.token_logprobs(x, labels, return_entropy=True, temperature=0.9)
            ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    finally:
        torch.set_num_threads(before)
    xd = logits.double().requires_grad_()
    rlp, rent = ref.token_logprobs(xd, labels, return_entropy=True, temperature=0.9)
    live = labels != -100
    (torch.where(live, rlp * g_lp.double() + rent * g_ent.double(), 0.0)).sum().backward()
    assert_close_by_dtype(lp, torch.where(live, rlp, 0.0), torch.float32)
    assert_close_by_dtype(ent, torch.where(live, rent, 0.0), torch.float32)
    assert_close_by_dtype(x.grad, xd.grad, torch.float32)
