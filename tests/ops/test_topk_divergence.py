"""topk_divergence against a float64 computation of the K + 1 bin formula (fastppo.reference_divergence) on both
backends: values and gradients with a non-unit upstream, every beta, temperatures, masks with holes / empty rows /
NaN in masked rows, every float dtype, odd V and K, strided views, huge logits, a tiny student tail (kept exactly),
float64 gradcheck, bad input."""

import pytest
import torch

import fastppo
from fastppo.bench.counters import KernelTraffic
from fastppo.kernels import _config as cfg
from fastppo.kernels.launches import count_launches
from fastppo.reference_divergence import topk_divergence as ref_topk
from tests.helpers import DEVICE, assert_close_by_dtype, make_logits, make_mask

BACKENDS = ["triton", "torch"]
BETAS = [0.0, 0.3, 0.5, 1.0]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
V = 1031


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _teacher(lead, k, dtype=torch.float32, scale=3.0):
    """The top-k of a random teacher: (ids int64 [..., k], log-probs [..., k] in `dtype`)."""
    lp, ids = torch.log_softmax(make_logits((*lead, V), torch.float64, scale), -1).topk(k, -1)
    return ids, lp.to(dtype)


def _run(backend, student, ids, tlp, g, **kw):
    x = student.detach().clone().requires_grad_()
    with fastppo.use_backend(backend), count_launches() as launches:
        div = fastppo.topk_divergence(x, ids, tlp, **kw)
        (div * g).sum().backward()
    assert launches["topk_divergence_fwd"] == (backend == "triton")
    return div, x.grad


def _ref(student, ids, tlp, g, **kw):
    x = student.detach().double().requires_grad_()
    div = ref_topk(x, ids, tlp, **kw)
    (div * g.double()).sum().backward()
    return div.detach(), x.grad


def _check(backend, student, ids, tlp, g, dtype=torch.float32, **kw):
    div, grad = _run(backend, student, ids, tlp, g, **kw)
    ref_div, ref_grad = _ref(student, ids, tlp, g, **kw)
    assert_close_by_dtype(div, ref_div, _acc(dtype), scale=10)
    assert_close_by_dtype(grad, ref_grad, dtype, scale=10)
    return div, grad


# Every backend x beta x dtype; the temperature (one scale on both sides' logits) alternates over that grid, so
# every backend, beta and dtype runs at both temperatures.
FORMULA_CASES = [(b, beta, dtype, 0.7 if (i + j) % 2 else 1.0)
                 for b in BACKENDS for i, beta in enumerate(BETAS) for j, dtype in enumerate(DTYPES)]


@pytest.mark.parametrize("backend,beta,dtype,temperature", FORMULA_CASES)
def test_matches_float64_formula(backend, beta, dtype, temperature):
    student = make_logits((3, 4, V), dtype)
    ids, tlp = _teacher((3, 4), 20, dtype)
    mask = make_mask((3, 4))
    student[~mask] = float("nan")
    tlp[~mask] = float("nan")
    g = torch.randn(3, 4, device=DEVICE, dtype=_acc(dtype))
    div, grad = _check(backend, student, ids, tlp, g, dtype, beta=beta, temperature=temperature, mask=mask)
    assert div.dtype == _acc(dtype) and grad.dtype == dtype
    assert (div[~mask] == 0).all() and (grad[~mask] == 0).all()
    assert (div[mask] >= -1e-6).all()        # a divergence of two (K + 1)-bin distributions: never negative


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 33])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_other_k_and_int32_ids(backend, k, beta):
    student = make_logits((5, V), torch.float32)
    ids, tlp = _teacher((5,), k)
    _check(backend, student, ids.int(), tlp, torch.randn(5, device=DEVICE), beta=beta, temperature=1.2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
def test_strided_views(backend, beta):
    student = make_logits((2, 7, V), torch.float32)[:, 1:, :]
    ids, tlp = _teacher((2, 6), 12)
    ids = ids.transpose(0, 1).contiguous().transpose(0, 1)
    tlp = torch.cat((tlp, tlp), -1)[..., :12]
    g = torch.randn(6, 2, device=DEVICE).t()
    _check(backend, student, ids, tlp, g, beta=beta)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
def test_tiny_student_tail_keeps_its_digits(backend, beta):
    """The student puts all but ~1e-9 of its mass on the teacher's ids: 1 - sum q_k would be 0 or noise in fp32,
    the direct sum over the other columns is exact, and the forward KL's tail term depends on it."""
    ids, tlp = _teacher((4,), 8, scale=1.0)
    student = make_logits((4, V), torch.float32, scale=0.1)
    student.scatter_(-1, ids, 30.0)
    _check(backend, student, ids, tlp, torch.randn(4, device=DEVICE), beta=beta)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
def test_huge_logits(backend, beta):
    student = 1e4 + make_logits((4, V), torch.float32)
    ids, tlp = _teacher((4,), 16)
    _check(backend, student, ids, tlp, torch.randn(4, device=DEVICE), beta=beta)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
def test_gradcheck_float64(backend, beta):
    student = make_logits((2, 3, 19), torch.float64).requires_grad_()
    tlp, ids = torch.log_softmax(make_logits((2, 3, 19), torch.float64), -1).topk(5, -1)
    mask = make_mask((2, 3), empty_rows=(0,))
    with fastppo.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda x: fastppo.topk_divergence(x, ids, tlp, beta=beta, temperature=0.9, mask=mask), (student,),
            fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_vocabulary_top_k_is_logits_divergence(backend):
    """With K = V the tail is empty: the bins are the vocabulary and the value is logits_divergence's."""
    student = make_logits((3, 37), torch.float64)
    teacher = make_logits((3, 37), torch.float64)
    tlp, ids = torch.log_softmax(teacher, -1).sort(-1, descending=True)
    with fastppo.use_backend(backend):
        top = fastppo.topk_divergence(student, ids, tlp, beta=0.3)
        full = fastppo.logits_divergence(student, teacher, beta=0.3)
    torch.testing.assert_close(top, full, rtol=1e-9, atol=1e-9)


def test_bad_input_names_the_argument():
    s = make_logits((2, 8), torch.float32)
    ids = torch.tensor([[0, 1], [2, 3]])
    tlp = torch.full((2, 2), -1.0)
    call = fastppo.topk_divergence
    with pytest.raises(ValueError, match="beta"):
        call(s, ids, tlp, beta=-0.1)
    with pytest.raises(ValueError, match="distinct"):
        call(s, torch.tensor([[0, 0], [2, 3]]), tlp, beta=0.5)
    with pytest.raises(ValueError, match="teacher_ids"):
        call(s, torch.tensor([[0, 8], [2, 3]]), tlp, beta=0.5)
    with pytest.raises(TypeError, match="teacher_ids"):
        call(s, ids.float(), tlp, beta=0.5)
    with pytest.raises(ValueError, match="teacher_ids"):
        call(s, ids[:1], tlp, beta=0.5)
    with pytest.raises(ValueError, match="teacher_logprobs"):
        call(s, ids, tlp[:, :1], beta=0.5)
    with pytest.raises(TypeError, match="teacher_logprobs"):
        call(s, ids, tlp.long(), beta=0.5)
    with pytest.raises(ValueError, match="mask"):
        call(s, ids, tlp, beta=0.5, mask=torch.ones(2, 1))
    # masked rows are not checked (never read)
    call(s, torch.tensor([[0, 0], [2, 3]]), tlp, beta=0.5, mask=torch.tensor([False, True]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_registered_ops_pass_opcheck(backend, beta):
    """torch.ops.fastppo.topk_divergence(_backward): schema, fake implementation, autograd registration."""
    student = make_logits((2, 4, 40), torch.float32)[:, 1:].requires_grad_()
    tlp, ids = torch.log_softmax(make_logits((2, 3, 40), torch.float32), -1).topk(6, -1)
    mask = make_mask((2, 3))
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.fastppo.topk_divergence, (student, ids, tlp, mask, 1 / 0.7, beta, backend),
                          test_utils=tests)
    with torch.no_grad():
        _, stats = torch.ops.fastppo.topk_divergence(student, ids, tlp, mask, 1 / 0.7, beta, backend)
    torch.library.opcheck(torch.ops.fastppo.topk_divergence_backward,
                          (student.detach(), ids, tlp, stats, torch.randn(2, 3), mask, 1 / 0.7, beta, backend),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_bytes_read_and_written(beta):
    """Forward and backward each read a live student row once (plus its K teacher columns again); masked rows are
    never read. The backward writes every gradient row, then the K teacher columns of each live row again."""
    rows, k = 6, 20
    student = make_logits((rows, V), torch.bfloat16).requires_grad_()
    ids, tlp = _teacher((rows,), k)
    mask = torch.tensor([True, False, True, True, False, True], device=DEVICE)
    live = int(mask.sum())
    fwd, bwd = KernelTraffic(), KernelTraffic()
    with fastppo.use_backend("triton"):
        with fwd.count():
            div = fastppo.topk_divergence(student, ids, tlp, beta=beta, mask=mask)
        with bwd.count():
            (div * torch.randn(rows, device=DEVICE)).sum().backward()
    row = V * 2 + k * 2                          # the bf16 row, then its K teacher columns
    blocks = -(-V // cfg.TOPK_BLOCK_V)
    # validity, statistics, upstream; K ids and log-probs; the ids again per block (compares; cached on a GPU)
    per_row = 64 + k * 12 + blocks * k * 8
    assert live * row <= fwd.loaded <= live * (row + per_row) + rows
    assert live * row <= bwd.loaded <= live * (row + per_row) + rows
    assert bwd.stored == rows * V * 2 + live * k * 2
