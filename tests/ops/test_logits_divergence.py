"""logits_divergence against a float64 computation of the documented formula (fastppo.reference_divergence:
TRL 1.16's beta convention) on both backends: values and gradients with a non-unit upstream, every beta,
temperatures, masks with holes / empty rows / NaN in masked rows, every float dtype, odd V, strided views,
huge logits, float64 gradcheck, full_kl as the beta = 1 case, bad input."""

import pytest
import torch

import fastppo
from fastppo.bench.counters import KernelTraffic
from fastppo.kernels.launches import count_launches
from fastppo.reference_divergence import logits_divergence as ref_divergence
from tests.helpers import DEVICE, assert_close_by_dtype, make_logits, make_mask

BACKENDS = ["triton", "torch"]
BETAS = [0.0, 0.3, 0.5, 1.0]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
V = 1031


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _run(backend, student, teacher, g, **kw):
    x = student.detach().clone().requires_grad_()
    with fastppo.use_backend(backend), count_launches() as launches:
        div = fastppo.logits_divergence(x, teacher, **kw)
        (div * g).sum().backward()
    assert launches["divergence_fwd"] == (backend == "triton")
    return div, x.grad


def _ref(student, teacher, g, **kw):
    x = student.detach().double().requires_grad_()
    div = ref_divergence(x, teacher.double(), **kw)
    (div * g.double()).sum().backward()
    return div.detach(), x.grad


# Every backend x beta x dtype; the temperature (one scale on both sides' logits) alternates over that grid, so
# every backend, beta and dtype runs at both temperatures.
FORMULA_CASES = [(b, beta, dtype, 0.7 if (i + j) % 2 else 1.0)
                 for b in BACKENDS for i, beta in enumerate(BETAS) for j, dtype in enumerate(DTYPES)]


@pytest.mark.parametrize("backend,beta,dtype,temperature", FORMULA_CASES)
def test_matches_float64_formula(backend, beta, dtype, temperature):
    student = make_logits((3, 5, V), dtype)
    teacher = make_logits((3, 5, V), dtype)
    mask = make_mask((3, 5))
    student[~mask] = float("nan")        # masked rows are never read
    teacher[~mask] = float("nan")
    g = torch.randn(3, 5, device=DEVICE, dtype=_acc(dtype))
    kw = dict(beta=beta, temperature=temperature, mask=mask)
    div, grad = _run(backend, student, teacher, g, **kw)
    ref_div, ref_grad = _ref(student, teacher, g, **kw)
    assert div.dtype == _acc(dtype) and div.shape == (3, 5)
    assert_close_by_dtype(div, ref_div, _acc(dtype), scale=10)
    assert_close_by_dtype(grad, ref_grad, dtype, scale=10)
    assert (div[~mask] == 0).all() and (grad[~mask] == 0).all()
    assert grad.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
def test_strided_views(backend, beta):
    base = make_logits((2, 7, V), torch.float32)
    student = base[:, :-1, :]                                          # a shifted view (row strides)
    teacher = make_logits((2, V, 6), torch.float32).transpose(1, 2)    # the vocabulary dim is strided
    mask = make_mask((2, 6), empty_rows=()).t().contiguous().t()       # a transposed mask
    g = torch.randn(6, 2, device=DEVICE).t()
    kw = dict(beta=beta, temperature=1.3, mask=mask)
    div, grad = _run(backend, student, teacher, g, **kw)
    ref_div, ref_grad = _ref(student, teacher, g, **kw)
    assert_close_by_dtype(div, ref_div, torch.float32, scale=10)
    assert_close_by_dtype(grad, ref_grad, torch.float32, scale=10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
def test_huge_logits_stay_exact(backend, beta):
    """|z| ~ 1e4 (the two models offset by 2e4): max and log-sum are kept apart, so fp32 keeps its digits."""
    student = 1e4 + make_logits((4, V), torch.float32)
    teacher = -1e4 + make_logits((4, V), torch.float32)
    g = torch.randn(4, device=DEVICE)
    div, grad = _run(backend, student, teacher, g, beta=beta)
    ref_div, ref_grad = _ref(student, teacher, g, beta=beta)
    assert_close_by_dtype(div, ref_div, torch.float32, scale=10)
    assert_close_by_dtype(grad, ref_grad, torch.float32, scale=10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
def test_masked_vocabulary_entries(backend, beta):
    """-inf logits in both models (a banned token) contribute nothing; finite results, 0 gradient there."""
    student = make_logits((3, V), torch.float32)
    teacher = make_logits((3, V), torch.float32)
    student[:, ::7] = float("-inf")
    teacher[:, ::7] = float("-inf")
    g = torch.randn(3, device=DEVICE)
    div, grad = _run(backend, student, teacher, g, beta=beta)
    ref_div, ref_grad = _ref(student, teacher, g, beta=beta)
    assert torch.isfinite(div).all()
    assert_close_by_dtype(div, ref_div, torch.float32, scale=10)
    assert_close_by_dtype(grad, ref_grad, torch.float32, scale=10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_valid_row_propagates(backend):
    student = make_logits((3, V), torch.float32)
    student[1, 5] = float("nan")
    div, grad = _run(backend, student, make_logits((3, V), torch.float32), torch.ones(3), beta=0.5)
    assert torch.isnan(div[1]) and not torch.isnan(div[[0, 2]]).any()
    assert not torch.isnan(grad[[0, 2]]).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
def test_gradcheck_float64(backend, beta):
    student = make_logits((2, 3, 17), torch.float64).requires_grad_()
    teacher = make_logits((2, 3, 17), torch.float64)
    mask = make_mask((2, 3), empty_rows=(1,))
    with fastppo.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda x: fastppo.logits_divergence(x, teacher, beta=beta, temperature=0.8, mask=mask), (student,),
            fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_beta_one_is_full_kl(backend):
    student = make_logits((4, 6, V), torch.float32)
    teacher = make_logits((4, 6, V), torch.float32)
    with fastppo.use_backend(backend):
        div = fastppo.logits_divergence(student, teacher, beta=1.0, temperature=0.9)
        kl = fastppo.full_kl(student, teacher, temperature=0.9)
    torch.testing.assert_close(div, kl, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_are_batch_invariant(backend):
    student = make_logits((6, V), torch.float32)
    teacher = make_logits((6, V), torch.float32)
    with fastppo.use_backend(backend):
        full = fastppo.logits_divergence(student, teacher, beta=0.3)
        alone = fastppo.logits_divergence(student[2:3], teacher[2:3], beta=0.3)
    assert torch.equal(full[2:3], alone)


def test_bad_input_names_the_argument():
    s = make_logits((2, 8), torch.float32)
    call = fastppo.logits_divergence
    with pytest.raises(ValueError, match="beta"):
        call(s, s, beta=1.5)
    with pytest.raises(ValueError, match="beta"):
        call(s, s, beta=float("nan"))
    with pytest.raises(TypeError, match="beta"):
        call(s, s, beta=True)
    with pytest.raises(ValueError, match="teacher_logits"):
        call(s, s[:, :7], beta=0.5)
    with pytest.raises(ValueError, match="mask"):
        call(s, s, beta=0.5, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        call(s, s, beta=0.5, mask=torch.full((2,), 2.0))
    with pytest.raises(ValueError, match="temperature"):
        call(s, s, beta=0.5, temperature=0.0)
    with pytest.raises(TypeError, match="student_logits"):
        call(s.long(), s, beta=0.5)
    with pytest.raises(ValueError, match="student_logits"):
        call(s[:, :0], s[:, :0], beta=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_registered_ops_pass_opcheck(backend, beta):
    """torch.ops.fastppo.logits_divergence(_backward): schema, fake implementation, autograd registration."""
    student = make_logits((2, 4, 40), torch.float32)[:, 1:].requires_grad_()
    teacher = make_logits((2, 3, 40), torch.float32)
    mask = make_mask((2, 3))
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.fastppo.logits_divergence, (student, teacher, mask, 1 / 0.7, beta, backend),
                          test_utils=tests)
    with torch.no_grad():
        _, stats = torch.ops.fastppo.logits_divergence(student, teacher, mask, 1 / 0.7, beta, backend)
    torch.library.opcheck(torch.ops.fastppo.logits_divergence_backward,
                          (student.detach(), teacher, stats, torch.randn(2, 3), mask, 1 / 0.7, beta, backend),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("beta,sweeps", [(0.0, 1), (1.0, 1), (0.3, 2)])
def test_bytes_read_and_written(beta, sweeps):
    """Forward: the KLs read both rows once, the JSD twice; backward reads them once and writes the gradient;
    masked rows are never read (their zero gradient is written). Counted in the interpreter, bf16 logits."""
    rows = 6
    student = make_logits((rows, V), torch.bfloat16).requires_grad_()
    teacher = make_logits((rows, V), torch.bfloat16)
    mask = torch.tensor([True, False, True, True, False, True], device=DEVICE)
    row_pair = 2 * V * 2                        # a student row and a teacher row, bf16
    live = int(mask.sum())
    fwd, bwd = KernelTraffic(), KernelTraffic()
    with fastppo.use_backend("triton"):
        with fwd.count():
            div = fastppo.logits_divergence(student, teacher, beta=beta, mask=mask)
        with bwd.count():
            (div * torch.randn(rows, device=DEVICE)).sum().backward()
    per_row = 64                                 # validity, upstream gradient, saved statistics
    assert sweeps * live * row_pair <= fwd.loaded <= sweeps * live * row_pair + rows * per_row
    assert live * row_pair <= bwd.loaded <= live * row_pair + rows * per_row
    assert bwd.stored == rows * V * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gets_no_gradient(backend):
    student = make_logits((3, V), torch.float32).requires_grad_()
    teacher = make_logits((3, V), torch.float32).requires_grad_()
    with fastppo.use_backend(backend):
        fastppo.logits_divergence(student, teacher, beta=0.5).sum().backward()
    assert teacher.grad is None and student.grad is not None
