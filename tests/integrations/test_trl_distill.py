"""fastppo.integrations.patch("trl") serving TRL 1.16's ChunkedDivergenceFunction (its DistillationTrainer's
divergence) through fastppo.linear_divergence: TRL's real function and its `_chunked_divergence_loss`, patched vs
unpatched (values, the student's entropy, gradients to the student's hidden, weight and bias), every beta,
temperatures, each model's logit transform, completion masks, bf16 autocast; what fastppo cannot serve goes to
TRL."""

from __future__ import annotations

import pytest
import torch
import trl.kernels.chunked_divergence as cd  # TRL 1.16, installed by .ci/install

import fastppo.integrations as fi
from fastppo.reference_divergence import linear_divergence as ref_linear_divergence


def _inputs(N=23, Hs=16, Ht=24, V=131, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(0)

    def t(*shape, scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(dtype)
    return [t(N, Hs), t(V, Hs, scale=0.4), t(V, scale=0.5) if bias else None,
            t(N, Ht), t(V, Ht, scale=0.4), t(V, scale=0.5) if bias else None]


def _both(call, inputs, upstream):
    """[(outputs, student grads, stats)] unpatched then patched."""
    res = []
    for patched in (False, True):
        ins = [None if x is None else x.clone().requires_grad_(i < 3) for i, x in enumerate(inputs)]
        with (fi.patch("trl", ops=["ChunkedDivergenceFunction"]) if patched else _Null()) as handle:
            out = call(*ins)
            stats = None if handle is None else handle.stats
        (out[0] * upstream).sum().backward()
        res.append((out, [None if x is None else x.grad for x in ins[:3]], stats))
    return res


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *e):
        return False


def _close(a, b, rtol, atol):
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature,s_cap,s_scale,t_cap,t_scale", [(1.0, None, 1.0, None, 1.0),
                                                                      (0.7, 3.0, 1.0, None, 2.0),
                                                                      (1.3, None, 0.5, 5.0, 1.0)])
def test_chunked_divergence_function_matches_trl(beta, temperature, s_cap, s_scale, t_cap, t_scale):
    inputs = _inputs()
    upstream = torch.randn(inputs[0].shape[0], generator=torch.Generator().manual_seed(1))

    def call(*ins):
        return cd.ChunkedDivergenceFunction.apply(*ins, beta, temperature, s_scale, s_cap, t_scale, t_cap)

    (trl_out, trl_grads, _), (ours, grads, stats) = _both(call, inputs, upstream)
    assert stats.served["ChunkedDivergenceFunction"] == 1 and stats.delegated == {}
    assert ours[0].dtype == ours[1].dtype == torch.float32 and not ours[1].requires_grad
    _close(ours[0], trl_out[0], 1e-4, 1e-6)
    _close(ours[1], trl_out[1], 1e-5, 1e-5)
    for a, b in zip(grads, trl_grads):
        _close(a, b, 1e-4, 1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_divergence_loss_with_completion_mask(beta):
    """The trainer's loss function (it calls the function by the name it imported) with a [B, K] completion
    mask holding holes and an empty row: loss, entropy sum, valid count and gradients as TRL's."""
    from trl.trainer import distillation_trainer as dt

    B, K = 3, 6
    hs, ws, bs, ht, wt, bt = _inputs(N=B * K)
    mask = torch.ones(B, K, dtype=torch.long)
    mask[0, 2:4] = 0
    mask[2] = 0
    res = []
    for patched in (False, True):
        x = [hs.clone().view(B, K, -1).requires_grad_(), ws.clone().requires_grad_()]
        with (fi.patch("trl", ops=["ChunkedDivergenceFunction"]) if patched else _Null()) as handle:
            loss, ent, n = dt._chunked_divergence_loss(x[0], ht.view(B, K, -1), x[1], wt, mask, beta,
                                                       student_lm_head_bias=bs, teacher_lm_head_bias=bt,
                                                       temperature=0.8)
            if patched:
                assert handle.stats.served["ChunkedDivergenceFunction"] == 1
        loss.backward()
        res.append((loss, ent, n, x[0].grad, x[1].grad))
    for a, b in zip(*res):
        _close(a, b, 1e-4, 1e-6)


def test_bf16_autocast_and_no_bias():
    """Under bf16 autocast each model projects in bf16 (fp32 products): TRL's numbers at bf16 tolerance (TRL rounds
    the logits' gradient to bf16); fastppo's gradients are those of float64 on the bf16-rounded operands at fp32
    tolerance, returned in fp32 unrounded."""
    inputs = _inputs(bias=False)
    upstream = torch.ones(inputs[0].shape[0])

    def call(*ins):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return cd.ChunkedDivergenceFunction.apply(*ins, 0.5, 1.0)

    (trl_out, trl_grads, _), (ours, grads, stats) = _both(call, inputs, upstream)
    assert stats.served["ChunkedDivergenceFunction"] == 1
    _close(ours[0], trl_out[0], 2e-2, 1e-3)
    _close(ours[1], trl_out[1], 2e-2, 1e-3)
    for a, b in zip(grads[:2], trl_grads[:2]):
        assert a.dtype == torch.float32
        _close(a, b, 3e-2, 1e-3)
    assert grads[2] is None and trl_grads[2] is None
    ref = [x.to(torch.bfloat16).double().requires_grad_(i < 2) for i, x in enumerate(inputs) if x is not None]
    div, _ = ref_linear_divergence(ref[0], ref[1], ref[2], ref[3], beta=0.5)
    div.sum().backward()
    _close(ours[0], div, 1e-5, 1e-6)
    for a, b in zip(grads[:2], ref[:2]):
        _close(a, b.grad, 1e-4, 1e-6)


def test_beta_outside_unit_interval_goes_to_trl():
    inputs = _inputs(N=4, V=17)
    with fi.patch("trl", ops=["ChunkedDivergenceFunction"]) as handle:
        out = cd.ChunkedDivergenceFunction.apply(*inputs, 1.5)
        assert handle.stats.delegated["ChunkedDivergenceFunction"] == 1
    assert out[0].shape == (4,)
    assert not hasattr(cd.ChunkedDivergenceFunction, "__fastppo_original__")
