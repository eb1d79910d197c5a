"""linear_topk_divergence against a float64 computation of the documented formula (fastppo.reference_divergence:
the student's head logits in float64, then the K + 1-bin divergence) on both backends: values and gradients to the
student's hidden, weight and bias with a non-unit upstream, every beta, temperatures, masks with holes / empty rows /
NaN in masked rows, bf16 / fp32 / fp64, odd V, several chunks, the student's logit transform, strided views, float64
gradcheck; agreement with topk_divergence on materialised logits; FLOPs and peak memory counted; bad input."""

import pytest
import torch

import fastppo
from fastppo.bench.counters import EagerTraffic, PeakMemory
from fastppo.kernels.launches import count_launches
from fastppo.reference_divergence import linear_topk_divergence as ref_linear_topk
from tests.helpers import DEVICE, assert_close_by_dtype, assert_head_grad_close, make_mask

BACKENDS = ["triton", "torch"]
BETAS = [0.0, 0.5, 1.0]
H, V, K = 16, 257, 5
STUDENT = ("student_hidden", "student_weight", "student_bias")


def _inputs(lead, dtype, h=H, v=V, k=K, tail=0.1):
    """Student head and a teacher's top-K (distinct ids per row, log-probs summing to 1 - tail)."""
    def t(*shape, scale=1.0):
        return (torch.randn(shape, device=DEVICE) * scale).to(dtype)
    ids = torch.rand(*lead, v, device=DEVICE).argsort(-1)[..., :k]
    probs = torch.softmax(torch.randn(*lead, k, device=DEVICE, dtype=torch.float64), -1) * (1 - tail)
    tlp = probs.log().to(torch.float32 if dtype != torch.float64 else dtype)
    return dict(student_hidden=t(*lead, h), student_weight=t(v, h, scale=0.4), student_bias=t(v, scale=0.5),
                teacher_ids=ids, teacher_logprobs=tlp)


def _run(backend, x, g, **kw):
    x = {k: (v.detach().clone().requires_grad_() if k in STUDENT and v is not None else v) for k, v in x.items()}
    with fastppo.use_backend(backend), count_launches() as launches:
        div = fastppo.linear_topk_divergence(**x, **kw)
        (div * g).sum().backward()
    assert launches["topk_divergence_fwd"] == (backend == "triton") * launches["topk_divergence_bwd"]
    return div, [x[k].grad for k in STUDENT]


def _ref(x, g, **kw):
    kw.pop("chunk_bytes", None)
    x = {k: None if v is None else (v.detach().double().requires_grad_() if k in STUDENT else v) for k, v in x.items()}
    div = ref_linear_topk(**x, **kw)
    (div * g.double()).sum().backward()
    return div.detach(), [None if x.get(k) is None else x[k].grad for k in STUDENT]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_float64_formula(backend, beta, dtype, temperature):
    x = _inputs((3, 4), dtype)
    mask = make_mask((3, 4))
    x["student_hidden"][~mask] = float("nan")   # masked rows are never read
    x["teacher_logprobs"][~mask] = float("nan")
    g = torch.randn(3, 4, device=DEVICE)
    kw = dict(beta=beta, temperature=temperature, mask=mask, chunk_bytes=2 * V * 4 * 3)   # 3 rows per chunk
    div, grads = _run(backend, x, g, **kw)
    ref_div, ref_grads = _ref(x, g, **kw)
    assert div.dtype == torch.float32 and div.shape == (3, 4)
    assert_close_by_dtype(div, ref_div, torch.float32, scale=10)
    for got, want, name in zip(grads, ref_grads, STUDENT):
        assert got.dtype == dtype, name
        assert_head_grad_close(got, want, dtype)
    assert (div[~mask] == 0).all() and (grads[0][~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
def test_logit_transform_float64_odd_vocab_no_mask(backend, beta):
    x = _inputs((5,), torch.float64, h=7, v=101, k=3, tail=0.0)   # a teacher with no tail mass
    g = torch.randn(5, device=DEVICE, dtype=torch.float64)
    kw = dict(beta=beta, temperature=1.3, student_logit_scale=0.8, student_final_logit_softcapping=2.5)
    div, grads = _run(backend, x, g, chunk_bytes=1, **kw)
    ref_div, ref_grads = _ref(x, g, **kw)
    assert div.dtype == torch.float64
    assert_close_by_dtype(div, ref_div, torch.float64)
    for got, want in zip(grads, ref_grads):
        assert_close_by_dtype(got, want, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_topk_divergence_on_the_logits(backend):
    """The same numbers as topk_divergence on the materialised fp32 logits (same launchers, same row math)."""
    x = _inputs((6,), torch.float32, v=129)
    z = (x["student_hidden"] @ x["student_weight"].t() + x["student_bias"]).requires_grad_()
    g = torch.randn(6, device=DEVICE)
    with fastppo.use_backend(backend):
        want = fastppo.topk_divergence(z, x["teacher_ids"], x["teacher_logprobs"], beta=0.4, temperature=0.9)
        (want * g).sum().backward()
    div, (dh, dw, db) = _run(backend, x, g, beta=0.4, temperature=0.9)
    torch.testing.assert_close(div, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dh, z.grad @ x["student_weight"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(db, z.grad.sum(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_tiny(backend):
    x = _inputs((3,), torch.float64, h=3, v=7, k=2)
    mask = torch.tensor([1, 0, 1], device=DEVICE)

    def f(hs, ws, bs):
        with fastppo.use_backend(backend):
            return fastppo.linear_topk_divergence(hs, ws, x["teacher_ids"], x["teacher_logprobs"], beta=0.3,
                                                  temperature=0.9, student_bias=bs, mask=mask,
                                                  student_final_logit_softcapping=2.0)

    assert torch.autograd.gradcheck(f, [x[k].clone().requires_grad_() for k in STUDENT], fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_int32_ids_all_masked(backend):
    x = _inputs((2, 6), torch.float32, v=61)
    base = torch.randn(2, 7, H, device=DEVICE).requires_grad_()
    ids32 = x["teacher_ids"].to(torch.int32)
    g = torch.randn(2, 6, device=DEVICE)
    with fastppo.use_backend(backend):
        div = fastppo.linear_topk_divergence(base[:, 1:], x["student_weight"], ids32, x["teacher_logprobs"], beta=0.5)
        (div * g).sum().backward()
        none = fastppo.linear_topk_divergence(base[:, 1:], x["student_weight"], ids32, x["teacher_logprobs"],
                                              beta=0.5, mask=torch.zeros(2, 6, device=DEVICE))
    ref = {**x, "student_hidden": base[:, 1:].detach(), "student_bias": None}
    ref_div, (ref_dh, _, _) = _ref(ref, g, beta=0.5)
    assert_close_by_dtype(div, ref_div, torch.float32, scale=10)
    assert_close_by_dtype(base.grad[:, 1:], ref_dh, torch.float32, scale=20)
    assert (base.grad[:, 0] == 0).all() and (none == 0).all()


def _flops(N, h, v, mask=None):
    x = _inputs((N,), torch.float32, h=h, v=v)
    x["student_hidden"].requires_grad_()
    x["student_weight"].requires_grad_()
    with fastppo.use_backend("torch"):
        fwd = EagerTraffic()
        with fwd:
            div = fastppo.linear_topk_divergence(**x, beta=0.5, mask=mask, chunk_bytes=2 * v * 4 * 8)
        bwd = EagerTraffic()
        with bwd:
            div.sum().backward()
    return fwd.flops, bwd.flops


def test_flops_counted():
    """Forward: the student's logits once (2 N H V); backward: again plus d hidden and d weight (2 N H V +
    4 N H V); the teacher costs no FLOPs; masked rows cost nothing."""
    N, h, v = 40, 16, 64
    fwd, bwd = _flops(N, h, v)
    assert fwd == 2 * N * h * v
    assert bwd == 6 * N * h * v
    mask = torch.arange(N, device=DEVICE) % 4 != 0
    if DEVICE == "cpu":   # masked rows gathered out
        assert _flops(N, h, v, mask) == (fwd * 3 // 4, bwd * 3 // 4)


def test_no_full_logits_held():
    """Peak memory of forward + backward with chunk_bytes for 4 rows stays well below one [N, V] fp32 tensor."""
    N, v, rows = 512, 256, 4
    x = _inputs((N,), torch.float32, h=8, v=v)
    x["student_hidden"].requires_grad_()
    peak = PeakMemory()
    with fastppo.use_backend("torch"), peak:
        fastppo.linear_topk_divergence(**x, beta=0.5, chunk_bytes=2 * v * 4 * rows).sum().backward()
    assert peak.peak < N * v * 4 / 4, peak.peak


def test_bad_input():
    x = _inputs((3,), torch.float32, v=11)
    f = fastppo.linear_topk_divergence
    with pytest.raises(ValueError, match="beta"):
        f(**x, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        f(**x, beta=0.5, temperature=0.0)
    with pytest.raises(ValueError, match="student: final_logit_softcapping"):
        f(**x, beta=0.5, student_final_logit_softcapping=-1.0)
    with pytest.raises(ValueError, match="student_hidden \\[..., H\\]"):
        f(**{**x, "student_hidden": x["student_hidden"][:, :3]}, beta=0.5)
    with pytest.raises(ValueError, match="student_bias"):
        f(**{**x, "student_bias": x["student_bias"][:3]}, beta=0.5)
    with pytest.raises(ValueError, match="teacher_ids shape .* student_hidden without the hidden dim"):
        f(**{**x, "teacher_ids": x["teacher_ids"][:2]}, beta=0.5)
    with pytest.raises(ValueError, match="teacher_logprobs"):
        f(**{**x, "teacher_logprobs": x["teacher_logprobs"][:, :2]}, beta=0.5)
    with pytest.raises(ValueError, match=r"teacher_ids must be in \[0, 11\)"):
        f(**{**x, "teacher_ids": x["teacher_ids"] + 11}, beta=0.5)
    with pytest.raises(ValueError, match="distinct"):
        f(**{**x, "teacher_ids": torch.zeros_like(x["teacher_ids"])}, beta=0.5)
    with pytest.raises(TypeError, match="teacher_ids"):
        f(**{**x, "teacher_ids": x["teacher_ids"].float()}, beta=0.5)
    with pytest.raises(ValueError, match="mask"):
        f(**x, beta=0.5, mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_bytes"):
        f(**x, beta=0.5, chunk_bytes=0)
