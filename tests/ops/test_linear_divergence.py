"""linear_divergence against a float64 computation of the documented formula (fastppo.reference_divergence:
both heads' logits in float64, TRL 1.16's beta convention) on both backends: values and gradients to the
student's hidden, weight and bias with a non-unit upstream, every beta, temperatures, masks with holes / empty
rows / NaN in masked rows, bf16 / fp32, odd V, several chunks, each model's logit transform, the student's
entropy, float64 gradcheck; FLOPs and peak memory counted; bad input."""

import pytest
import torch

import fastppo
from fastppo.bench.counters import EagerTraffic, PeakMemory
from fastppo.kernels.launches import count_launches
from fastppo.reference_divergence import linear_divergence as ref_linear_divergence
from tests.helpers import DEVICE, assert_close_by_dtype, assert_head_grad_close, make_mask

BACKENDS = ["triton", "torch"]
BETAS = [0.0, 0.5, 1.0]
HS, HT, V = 16, 24, 257


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _heads(lead, dtype, hs=HS, ht=HT, v=V):
    def t(*shape, scale=1.0):
        return (torch.randn(shape, device=DEVICE) * scale).to(dtype)
    return dict(student_hidden=t(*lead, hs), student_weight=t(v, hs, scale=0.4), student_bias=t(v, scale=0.5),
                teacher_hidden=t(*lead, ht), teacher_weight=t(v, ht, scale=0.4), teacher_bias=t(v, scale=0.5))


STUDENT = ("student_hidden", "student_weight", "student_bias")


def _run(backend, heads, g, **kw):
    x = {k: (v.detach().clone().requires_grad_() if k in STUDENT and v is not None else v) for k, v in heads.items()}
    with fastppo.use_backend(backend), count_launches() as launches:
        div = fastppo.linear_divergence(**x, **kw)
        out = div[0] if isinstance(div, tuple) else div
        (out * g).sum().backward()
    assert launches["divergence_fwd"] == (backend == "triton") * launches["divergence_bwd"]
    return div, [x[k].grad for k in STUDENT]


def _ref(heads, g, **kw):
    kw.pop("chunk_bytes", None)
    kw.pop("return_entropy", None)
    x = {k: None if v is None else v.detach().double().requires_grad_(k in STUDENT) for k, v in heads.items()}
    div, ent = ref_linear_divergence(**x, **kw)
    (div * g.double()).sum().backward()
    return div.detach(), ent, [None if x.get(k) is None else x[k].grad for k in STUDENT]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_float64_formula(backend, beta, dtype, temperature):
    heads = _heads((3, 4), dtype)
    mask = make_mask((3, 4))
    heads["student_hidden"][~mask] = float("nan")   # masked rows are never read
    heads["teacher_hidden"][~mask] = float("nan")
    g = torch.randn(3, 4, device=DEVICE)
    kw = dict(beta=beta, temperature=temperature, mask=mask, chunk_bytes=2 * V * 4 * 3)   # 3 rows per chunk
    div, grads = _run(backend, heads, g, **kw)
    ref_div, _, ref_grads = _ref(heads, g, **kw)
    assert div.dtype == torch.float32 and div.shape == (3, 4)
    assert_close_by_dtype(div, ref_div, torch.float32, scale=10)
    for got, want, name in zip(grads, ref_grads, STUDENT):
        assert got.dtype == dtype, name
        assert_head_grad_close(got, want, dtype)
    assert (div[~mask] == 0).all() and (grads[0][~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
def test_logit_transforms_entropy_and_no_mask(backend, beta):
    """Each model's own scale and softcap, float64 throughout, the student's entropy, odd V, no mask."""
    heads = _heads((5,), torch.float64, hs=7, ht=3, v=101)
    g = torch.randn(5, device=DEVICE, dtype=torch.float64)
    kw = dict(beta=beta, temperature=1.3, student_logit_scale=0.8, student_final_logit_softcapping=2.5,
              teacher_logit_scale=1.7, teacher_final_logit_softcapping=4.0)
    (div, ent), grads = _run(backend, heads, g, return_entropy=True, chunk_bytes=1, **kw)
    ref_div, ref_ent, ref_grads = _ref(heads, g, **kw)
    assert div.dtype == ent.dtype == torch.float64 and not ent.requires_grad
    assert_close_by_dtype(div, ref_div, torch.float64)
    assert_close_by_dtype(ent, ref_ent, torch.float64)
    for got, want in zip(grads, ref_grads):
        assert_close_by_dtype(got, want, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_tiny(backend):
    heads = _heads((3,), torch.float64, hs=3, ht=2, v=5)
    mask = torch.tensor([1, 0, 1], device=DEVICE)

    def f(hs, ws, bs):
        with fastppo.use_backend(backend):
            return fastppo.linear_divergence(hs, ws, heads["teacher_hidden"], heads["teacher_weight"], beta=0.3,
                                             temperature=0.9, student_bias=bs, teacher_bias=heads["teacher_bias"],
                                             mask=mask, student_final_logit_softcapping=2.0)

    inputs = [heads[k].clone().requires_grad_() for k in STUDENT]
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gets_no_gradient_and_all_masked(backend):
    heads = _heads((2, 3), torch.float32, v=33)
    for k in ("teacher_hidden", "teacher_weight", "teacher_bias"):
        heads[k].requires_grad_()
    mask = torch.zeros(2, 3, dtype=torch.bool, device=DEVICE)
    with fastppo.use_backend(backend):
        div = fastppo.linear_divergence(**heads, beta=0.5, mask=mask)
        assert (div == 0).all()
        div = fastppo.linear_divergence(**heads, beta=0.5)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(div.sum(), heads["teacher_hidden"])


def _flops(N, hs, ht, v, mask=None):
    heads = _heads((N,), torch.float32, hs=hs, ht=ht, v=v)
    heads["student_hidden"].requires_grad_()
    heads["student_weight"].requires_grad_()
    with fastppo.use_backend("torch"):
        fwd = EagerTraffic()
        with fwd:
            div = fastppo.linear_divergence(**heads, beta=0.5, mask=mask, chunk_bytes=2 * v * 4 * 8)
        bwd = EagerTraffic()
        with bwd:
            div.sum().backward()
    return fwd.flops, bwd.flops


def test_flops_counted():
    """Forward: both models' logits once (2 N (Hs + Ht) V); backward: both again plus d hidden and d weight of
    the student (2 N (Hs + Ht) V + 4 N Hs V); masked rows cost nothing."""
    N, hs, ht, v = 40, 16, 24, 64
    fwd, bwd = _flops(N, hs, ht, v)
    assert fwd == 2 * N * (hs + ht) * v
    assert bwd == 2 * N * (hs + ht) * v + 4 * N * hs * v
    mask = torch.arange(N, device=DEVICE) % 4 != 0
    fwd_m, bwd_m = _flops(N, hs, ht, v, mask)
    if DEVICE == "cpu":   # masked rows gathered out
        assert (fwd_m, bwd_m) == (fwd * 3 // 4, bwd * 3 // 4)


def test_no_full_logits_held():
    """Peak memory of forward + backward with chunk_bytes for 4 rows stays well below one [N, V] fp32 tensor
    (the chunks' logits and the row math's temporaries, d weight and d bias). The PyTorch backend (the chunk loop
    is the same on both; the interpreter is too slow for 512 rows)."""
    N, v, rows = 512, 256, 4
    heads = _heads((N,), torch.float32, hs=8, ht=8, v=v)
    heads["student_hidden"].requires_grad_()
    peak = PeakMemory()
    with fastppo.use_backend("torch"), peak:
        fastppo.linear_divergence(**heads, beta=0.5, chunk_bytes=2 * v * 4 * rows).sum().backward()
    assert peak.peak < N * v * 4 / 4, peak.peak


def test_bad_input():
    heads = _heads((3,), torch.float32, v=11)
    ld = fastppo.linear_divergence
    with pytest.raises(ValueError, match="beta"):
        ld(**heads, beta=1.5)
    with pytest.raises(TypeError, match="beta"):
        ld(**heads, beta="0.5")
    with pytest.raises(ValueError, match="temperature"):
        ld(**heads, beta=0.5, temperature=0.0)
    with pytest.raises(ValueError, match="student: final_logit_softcapping"):
        ld(**heads, beta=0.5, student_final_logit_softcapping=-1.0)
    with pytest.raises(ValueError, match="share the vocabulary"):
        ld(**{**heads, "teacher_weight": heads["teacher_weight"][:5], "teacher_bias": None}, beta=0.5)
    with pytest.raises(ValueError, match="student_hidden \\[..., H\\]"):
        ld(**{**heads, "student_hidden": heads["student_hidden"][:, :3]}, beta=0.5)
    with pytest.raises(ValueError, match="same leading"):
        ld(**{**heads, "teacher_hidden": heads["teacher_hidden"][:2]}, beta=0.5)
    with pytest.raises(ValueError, match="teacher_bias"):
        ld(**{**heads, "teacher_bias": heads["teacher_bias"][:3]}, beta=0.5)
    with pytest.raises(ValueError, match="mask"):
        ld(**heads, beta=0.5, mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_bytes"):
        ld(**heads, beta=0.5, chunk_bytes=0)
    with pytest.raises(TypeError, match="student_weight"):
        ld(**{**heads, "student_weight": heads["student_weight"].long()}, beta=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_and_fp16(backend):
    """A shifted view of the student's hidden states (gradient through the view), a transposed teacher's, fp16
    heads, no bias."""
    heads = _heads((2, 6), torch.float16, v=61)
    base = _heads((2, 7), torch.float16, v=61)["student_hidden"].requires_grad_()
    teacher = heads["teacher_hidden"].transpose(0, 1).contiguous().transpose(0, 1)
    w = heads["student_weight"].clone().requires_grad_()
    g = torch.randn(2, 6, device=DEVICE)
    with fastppo.use_backend(backend):
        div = fastppo.linear_divergence(base[:, 1:], w, teacher, heads["teacher_weight"], beta=0.3, temperature=1.1)
    (div * g).sum().backward()
    ref = {"student_hidden": base[:, 1:], "student_weight": w, "teacher_hidden": teacher,
           "teacher_weight": heads["teacher_weight"]}
    ref_div, _, ref_grads = _ref(ref, g, beta=0.3, temperature=1.1)
    assert_close_by_dtype(div, ref_div, torch.float32, scale=10)
    assert (base.grad[:, 0] == 0).all()
    assert_head_grad_close(base.grad[:, 1:], ref_grads[0], torch.float16)
    assert_head_grad_close(w.grad, ref_grads[1], torch.float16)


def test_opcheck():
    """The registered ops' fake implementations, schemas and autograd registrations (torch.library.opcheck)."""
    h = _heads((4,), torch.float64, hs=3, ht=2, v=7)
    valid = torch.tensor([True, False, True, True], device=DEVICE)
    opts = "{'beta': 0.5, 'inv_tau': 1.0, 's_scale': 1.0, 's_softcap': None, 't_scale': 1.0, 't_softcap': None, " \
           "'with_entropy': True, 'chunk_bytes': None}"
    args = (h["student_hidden"].requires_grad_(), h["student_weight"], h["student_bias"], h["teacher_hidden"],
            h["teacher_weight"], h["teacher_bias"], valid, opts, "torch")
    torch.library.opcheck(torch.ops.fastppo.linear_divergence.default, args)
    weights = torch.rand(4, device=DEVICE, dtype=torch.float64)
    loss_args = (*args[:7], weights, opts, True, False, True, "torch")
    torch.library.opcheck(torch.ops.fastppo.linear_divergence_loss.default, loss_args)


# ----------------------------------------------------------------------------- linear_divergence_loss
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_loss_matches_float64_and_forms_its_gradient_in_forward(backend, beta, dtype):
    """sum_r w_r div_r against float64 (weights with NaN at masked rows, a non-unit upstream), the per-token
    divergence as linear_divergence's, every gradient formed in forward (backward runs no matrix product)."""
    heads = _heads((3, 4), dtype)
    mask = make_mask((3, 4))
    heads["student_hidden"][~mask] = float("nan")
    w = torch.rand(3, 4, device=DEVICE)
    w[~mask] = float("nan")
    x = {k: (v.detach().clone().requires_grad_() if k in STUDENT else v) for k, v in heads.items()}
    kw = dict(beta=beta, temperature=0.8, mask=mask, chunk_bytes=2 * V * 4 * 5)
    with fastppo.use_backend(backend):
        loss, div = fastppo.linear_divergence_loss(**x, weights=w, **kw)
        bwd = EagerTraffic()
        with bwd:
            (0.7 * loss).backward()
        plain = fastppo.linear_divergence(**heads, **kw)
    assert bwd.flops == 0 and not div.requires_grad
    assert torch.equal(div, plain)
    ref_div, _, ref_grads = _ref(heads, torch.where(mask, 0.7 * w, 0.0), **kw)
    assert_close_by_dtype(loss, (ref_div * torch.where(mask, w, 0.0).double()).sum(), torch.float32, scale=10)
    for k, want in zip(STUDENT, ref_grads):
        assert x[k].grad.dtype == dtype
        assert_head_grad_close(x[k].grad, want, dtype)


def test_loss_flops_and_default_token_mean():
    """2 N Ht V + 6 N Hs V in the forward pass, none in backward; weights=None is the mean over valid tokens."""
    N, hs, ht, v = 40, 16, 24, 64
    heads = _heads((N,), torch.float32, hs=hs, ht=ht, v=v)
    heads["student_hidden"].requires_grad_()
    heads["student_weight"].requires_grad_()
    mask = torch.arange(N, device=DEVICE) % 4 != 0
    with fastppo.use_backend("torch"):
        fwd = EagerTraffic()
        with fwd:
            loss, div = fastppo.linear_divergence_loss(**heads, beta=0.5, chunk_bytes=2 * v * 4 * 8)
        assert fwd.flops == 2 * N * ht * v + 6 * N * hs * v
        loss_m, div_m = fastppo.linear_divergence_loss(**heads, beta=0.5, mask=mask)
    torch.testing.assert_close(loss, div.mean())
    torch.testing.assert_close(loss_m, div_m[mask].mean())
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        g, = torch.autograd.grad(loss, heads["student_hidden"], create_graph=True)
        g.sum().backward()
    with pytest.raises(ValueError, match="weights must have"):
        fastppo.linear_divergence_loss(**heads, beta=0.5, weights=torch.ones(3))
    with pytest.raises(TypeError, match="weights must be a float"):
        fastppo.linear_divergence_loss(**heads, beta=0.5, weights=torch.ones(N, dtype=torch.long))
