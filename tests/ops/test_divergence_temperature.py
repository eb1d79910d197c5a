"""temperature= a per-token tensor on the distillation ops (logits_divergence, topk_divergence, linear_divergence,
linear_divergence_loss, linear_topk_divergence) on both backends: values and gradients (non-unit upstream) against a
float64 loop over the rows, each with its own float temperature (fastppo.reference_divergence); masks with holes and
empty rows, NaN and a zero temperature at masked rows, strided views, bf16 / fp32, several chunks; a tensor equal to
the float gives bitwise the float's results; no gradient to the temperature; float64 gradcheck; bad temperatures;
the only extra cost is one load per live row per launch (bytes), with the same launches."""

import importlib

import pytest
import torch

import fastppo
from fastppo import reference_divergence as ref
from fastppo.bench.counters import KernelTraffic
from fastppo.kernels.launches import count_launches
from tests.helpers import DEVICE, assert_close_by_dtype, assert_head_grad_close, make_logits, make_mask

BACKENDS = ["triton", "torch"]
B, T, V, K = 3, 5, 263, 6
N = B * T
HS, HT = 12, 7


def _tau(shape=(B, T), seed=0):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.4).to(DEVICE)


def _upstream(dtype=torch.float64):
    return torch.linspace(-1.5, 2.0, N, dtype=dtype, device=DEVICE).view(B, T)


def _teacher_topk(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(V, generator=gen)[:K] for _ in range(N)]).view(B, T, K).to(DEVICE)
    tlp = torch.log_softmax(torch.randn(B, T, K + 1, generator=gen) * 2, -1)[..., :K].to(DEVICE)
    return ids, tlp


def _dead_rows(mask, *tensors):
    """NaN in every masked row of `tensors` (never read)."""
    for t in tensors:
        t[~mask] = float("nan")


def _ref_rows(op, student, rest, tau, mask, g, **kw):
    """float64 (div [B, T], d student) of sum_r g_r div_r, one row at a time with that row's float temperature;
    masked rows 0. `student` is [B, T, X] (logits or hidden states) and `rest` per-row tensors [B, T, ...]."""
    x = student.detach().double().requires_grad_()
    divs = []
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                divs.append(torch.zeros((), dtype=torch.float64, device=DEVICE))
                continue
            row = [r[b, t][None] for r in rest]
            divs.append(op(x[b, t][None], *row, temperature=float(tau[b, t]), **kw)[0])
    div = torch.stack(divs).view(B, T)
    (div * g).sum().backward()
    return div.detach(), x.grad


# ----------------------------------------------------------------------------- logits ops
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_logits_divergence_per_token_temperature(backend, beta, dtype):
    student = make_logits((B, T + 1, V), dtype)[:, 1:]                    # a strided view
    teacher = make_logits((B, T, V), dtype)
    mask = make_mask((B, T))
    _dead_rows(mask, student, teacher)
    tau = _tau()
    tau[~mask] = 0.0                                                     # dead rows: never read
    g = _upstream()
    want, want_grad = _ref_rows(lambda s, t, **kw: ref.logits_divergence(s, t.double(), **kw), student,
                                [teacher], tau, mask, g, beta=beta)
    x = student.detach().clone().requires_grad_()
    with fastppo.use_backend(backend), count_launches() as launches:
        div = fastppo.logits_divergence(x, teacher, beta=beta, temperature=tau, mask=mask)
        (div * g.float()).sum().backward()
    assert launches["divergence_fwd"] == launches["divergence_bwd"] == (backend == "triton")
    assert_close_by_dtype(div, want, torch.float32, scale=10)
    assert_close_by_dtype(x.grad, want_grad, dtype, scale=10)
    assert (div[~mask] == 0).all() and (x.grad[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_topk_divergence_per_token_temperature(backend, beta):
    student = make_logits((B, T, V), torch.float32)
    ids, tlp = _teacher_topk()
    mask = make_mask((B, T))
    _dead_rows(mask, student)
    tau = _tau(seed=1)
    tau[~mask] = float("nan")
    g = _upstream()
    want, want_grad = _ref_rows(lambda s, i, lp, **kw: ref.topk_divergence(s, i, lp.double(), **kw), student,
                                [ids, tlp], tau, mask, g, beta=beta)
    x = student.detach().clone().requires_grad_()
    with fastppo.use_backend(backend):
        div = fastppo.topk_divergence(x, ids, tlp, beta=beta, temperature=tau, mask=mask)
        (div * g.float()).sum().backward()
    assert_close_by_dtype(div, want, torch.float32, scale=10)
    assert_close_by_dtype(x.grad, want_grad, torch.float32, scale=10)
    assert (x.grad[~mask] == 0).all()


# ----------------------------------------------------------------------------- linear ops
def _heads(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def t(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen) * scale).to(DEVICE, dtype)
    return dict(student_hidden=t(B, T, HS), student_weight=t(V, HS, scale=0.4), student_bias=t(V, scale=0.5),
                teacher_hidden=t(B, T, HT), teacher_weight=t(V, HT, scale=0.4), teacher_bias=t(V, scale=0.5))


STUDENT = ("student_hidden", "student_weight", "student_bias")


def _linear_ref(heads, tau, mask, g, *, topk=None, **kw):
    """float64 (div, entropy or None, student grads) of sum_r g_r div_r, one row at a time with its float tau."""
    x = {k: v.detach().double().requires_grad_(k in STUDENT) for k, v in heads.items()}
    divs, ents = [], []
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                divs.append(torch.zeros((), dtype=torch.float64, device=DEVICE))
                ents.append(torch.zeros((), dtype=torch.float64, device=DEVICE))
                continue
            hs = x["student_hidden"][b, t][None]
            if topk is None:
                d, e = ref.linear_divergence(hs, x["student_weight"], x["teacher_hidden"][b, t][None],
                                             x["teacher_weight"], student_bias=x["student_bias"],
                                             teacher_bias=x["teacher_bias"], temperature=float(tau[b, t]), **kw)
                ents.append(e[0])
            else:
                ids, tlp = topk
                d = ref.linear_topk_divergence(hs, x["student_weight"], ids[b, t][None], tlp[b, t][None].double(),
                                               student_bias=x["student_bias"], temperature=float(tau[b, t]), **kw)
            divs.append(d[0])
    div = torch.stack(divs).view(B, T)
    (div * g).sum().backward()
    ent = torch.stack(ents).view(B, T) if topk is None else None
    return div.detach(), ent, [x[k].grad for k in STUDENT]


def _student(heads):
    return {k: (v.detach().clone().requires_grad_() if k in STUDENT else v) for k, v in heads.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_divergence_per_token_temperature(backend, beta, dtype):
    heads = _heads(dtype)
    mask = make_mask((B, T))
    _dead_rows(mask, heads["student_hidden"], heads["teacher_hidden"])
    tau = _tau(seed=2)
    tau[~mask] = 0.0
    g = _upstream()
    want, want_ent, want_grads = _linear_ref(heads, tau, mask, g, beta=beta)
    x = _student(heads)
    with fastppo.use_backend(backend):
        div, ent = fastppo.linear_divergence(**x, beta=beta, temperature=tau, mask=mask, return_entropy=True,
                                             chunk_bytes=2 * V * 4 * 4)  # 4 rows per chunk
        (div * g.float()).sum().backward()
    assert_close_by_dtype(div, want, torch.float32, scale=10)
    assert_close_by_dtype(ent, want_ent, torch.float32, scale=10)
    for k, want_grad in zip(STUDENT, want_grads):
        assert_head_grad_close(x[k].grad, want_grad, dtype)
    assert (div[~mask] == 0).all() and (ent[~mask] == 0).all() and (x["student_hidden"].grad[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_linear_divergence_loss_per_token_temperature(backend, beta):
    heads = _heads(torch.float32, seed=3)
    mask = make_mask((B, T))
    _dead_rows(mask, heads["student_hidden"], heads["teacher_hidden"])
    tau = _tau(seed=3)
    tau[~mask] = -1.0
    w = _upstream()
    want, _, want_grads = _linear_ref(heads, tau, mask, w, beta=beta)
    x = _student(heads)
    with fastppo.use_backend(backend):
        loss, div = fastppo.linear_divergence_loss(**x, beta=beta, weights=w.float(), temperature=tau, mask=mask,
                                                   chunk_bytes=2 * V * 4 * 4)
        (loss * 1.3).backward()
    torch.testing.assert_close(loss.double(), (want * w).sum(), rtol=1e-5, atol=1e-6)
    assert_close_by_dtype(div, want, torch.float32, scale=10)
    for k, want_grad in zip(STUDENT, want_grads):
        assert_head_grad_close(x[k].grad, 1.3 * want_grad, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_linear_topk_divergence_per_token_temperature(backend, beta):
    heads = _heads(torch.float32, seed=4)
    ids, tlp = _teacher_topk(seed=4)
    mask = make_mask((B, T))
    _dead_rows(mask, heads["student_hidden"])
    tau = _tau(seed=4)
    tau[~mask] = 0.0
    g = _upstream()
    want, _, want_grads = _linear_ref(heads, tau, mask, g, topk=(ids, tlp), beta=beta)
    x = _student(heads)
    with fastppo.use_backend(backend):
        div = fastppo.linear_topk_divergence(x["student_hidden"], x["student_weight"], ids, tlp, beta=beta,
                                             student_bias=x["student_bias"], temperature=tau, mask=mask,
                                             chunk_bytes=2 * V * 4 * 4)
        (div * g.float()).sum().backward()
    assert_close_by_dtype(div, want, torch.float32, scale=10)
    for k, want_grad in zip(STUDENT, want_grads):
        assert_head_grad_close(x[k].grad, want_grad, torch.float32)


# ----------------------------------------------------------------------------- a tensor equal to the float
def _calls():
    """(name, fn(temperature) -> (outputs, grads)) for each op on fixed fp32 inputs, a mask with holes."""
    student = make_logits((B, T, V), torch.float32)
    teacher = make_logits((B, T, V), torch.float32)
    ids, tlp = _teacher_topk(seed=5)
    heads = _heads(torch.float32, seed=5)
    mask = make_mask((B, T))
    g = _upstream(torch.float32)

    def logits_op(fn):
        def run(temperature):
            x = student.clone().requires_grad_()
            div = fn(x, temperature)
            (div * g).sum().backward()
            return [div], [x.grad]
        return run

    def linear_op(fn):
        def run(temperature):
            x = _student(heads)
            out = fn(x, temperature)
            out[0].backward() if out[0].dim() == 0 else (out[0] * g).sum().backward()
            return list(out), [x[k].grad for k in STUDENT]
        return run

    return [
        ("logits_divergence", logits_op(lambda x, tau: fastppo.logits_divergence(
            x, teacher, beta=0.4, temperature=tau, mask=mask))),
        ("topk_divergence", logits_op(lambda x, tau: fastppo.topk_divergence(
            x, ids, tlp, beta=0.0, temperature=tau, mask=mask))),
        ("linear_divergence", linear_op(lambda x, tau: fastppo.linear_divergence(
            **x, beta=1.0, temperature=tau, mask=mask, return_entropy=True, chunk_bytes=2 * V * 4 * 4))),
        ("linear_divergence_loss", linear_op(lambda x, tau: fastppo.linear_divergence_loss(
            **x, beta=0.5, weights=g, temperature=tau, mask=mask))),
        ("linear_topk_divergence", linear_op(lambda x, tau: (fastppo.linear_topk_divergence(
            x["student_hidden"], x["student_weight"], ids, tlp, beta=0.5, student_bias=x["student_bias"],
            temperature=tau, mask=mask),))),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_equal_to_the_float_is_bitwise_the_same(backend):
    """0.75 is an fp32 number: 1 / tau per row (the kernels' division) equals the host's fp32(1 / tau)."""
    rows = torch.full((B, T), 0.75, device=DEVICE)
    for name, run in _calls():
        with fastppo.use_backend(backend):
            outs_f, grads_f = run(0.75)
            outs_t, grads_t = run(rows)
        for a, b in zip(outs_f + grads_f, outs_t + grads_t):
            assert torch.equal(a, b), name


def test_temperature_gets_no_gradient():
    student = make_logits((B, T, V), torch.float32).requires_grad_()
    teacher = make_logits((B, T, V), torch.float32)
    tau = _tau().requires_grad_()
    div = fastppo.logits_divergence(student, teacher, beta=0.5, temperature=tau)
    assert div.grad_fn is not None
    div.sum().backward()
    assert tau.grad is None and student.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    n, v = 4, 7
    gen = torch.Generator().manual_seed(6)
    student = torch.randn(n, v, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    teacher = torch.randn(n, v, generator=gen, dtype=torch.float64).to(DEVICE)
    tau = torch.tensor([0.6, 1.7, 0.0, 1.1], dtype=torch.float64, device=DEVICE)
    mask = torch.tensor([1, 1, 0, 1], device=DEVICE)
    ids = torch.tensor([[0, 3], [6, 1], [2, 4], [5, 0]], device=DEVICE)
    tlp = torch.log(torch.tensor([[0.5, 0.2], [0.3, 0.3], [0.1, 0.1], [0.6, 0.3]], dtype=torch.float64)).to(DEVICE)
    hs = torch.randn(n, 3, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    ws = torch.randn(v, 3, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    ht = torch.randn(n, 2, generator=gen, dtype=torch.float64).to(DEVICE)
    wt = torch.randn(v, 2, generator=gen, dtype=torch.float64).to(DEVICE)
    with fastppo.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda s: fastppo.logits_divergence(s, teacher, beta=0.3, temperature=tau, mask=mask), (student,),
            fast_mode=True)
        assert torch.autograd.gradcheck(
            lambda s: fastppo.topk_divergence(s, ids, tlp, beta=0.6, temperature=tau, mask=mask), (student,),
            fast_mode=True)
        assert torch.autograd.gradcheck(
            lambda h, w: fastppo.linear_divergence(h, w, ht, wt, beta=0.0, temperature=tau, mask=mask,
                                                   student_final_logit_softcapping=2.0), (hs, ws), fast_mode=True)
        assert torch.autograd.gradcheck(
            lambda h, w: fastppo.linear_topk_divergence(h, w, ids, tlp, beta=1.0, temperature=tau, mask=mask),
            (hs, ws), fast_mode=True)


# ----------------------------------------------------------------------------- bad temperatures
@pytest.mark.parametrize("name", ["logits_divergence", "topk_divergence", "linear_divergence",
                                  "linear_divergence_loss", "linear_topk_divergence"])
def test_bad_temperature(name):
    run = dict(_calls())[name]
    with pytest.raises(ValueError, match=f"{name}: temperature shape"):
        run(torch.ones(B, T + 1, device=DEVICE))
    with pytest.raises(TypeError, match=f"{name}: a temperature tensor must be floating point"):
        run(torch.ones(B, T, dtype=torch.int64, device=DEVICE))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"{name}: temperature must be positive and finite"):
            run(torch.full((B, T), bad, device=DEVICE))
    with pytest.raises(ValueError, match="temperature"):
        run(0.0)


def test_bad_temperature_at_masked_rows_is_never_read():
    mask = torch.tensor([[1, 0, 1]], device=DEVICE)
    tau = torch.tensor([[0.8, 0.0, 1.2]], device=DEVICE)
    s, t = make_logits((1, 3, 17), torch.float32), make_logits((1, 3, 17), torch.float32)
    div = fastppo.logits_divergence(s, t, beta=0.5, temperature=tau, mask=mask)
    assert torch.isfinite(div).all() and div[0, 1] == 0


# ----------------------------------------------------------------------------- cost
def _traffic(fn):
    t = KernelTraffic()
    with fastppo.use_backend("triton"), t.count(), count_launches() as launches:
        fn()
    return t.total, dict(launches)


@pytest.mark.parametrize("op", ["logits", "topk", "linear"])
def test_per_token_temperature_costs_one_load_per_live_row(op):
    """Forward and backward each read one fp32 temperature per live row, nothing else changes (same launches)."""
    student = make_logits((B, T, V), torch.float32)
    teacher = make_logits((B, T, V), torch.float32)
    ids, tlp = _teacher_topk(seed=7)
    heads = _heads(torch.float32, seed=7)
    mask = make_mask((B, T))
    live = int(mask.sum())

    def run(tau):
        if op == "logits":
            x = student.clone().requires_grad_()
            div = fastppo.logits_divergence(x, teacher, beta=0.5, temperature=tau, mask=mask)
        elif op == "topk":
            x = student.clone().requires_grad_()
            div = fastppo.topk_divergence(x, ids, tlp, beta=0.5, temperature=tau, mask=mask)
        else:
            div = fastppo.linear_divergence(**_student(heads), beta=0.5, temperature=tau, mask=mask)
        div.sum().backward()

    plain, plain_launches = _traffic(lambda: run(0.7))
    rows, rows_launches = _traffic(lambda: run(torch.full((B, T), 0.7, device=DEVICE)))
    assert rows_launches == plain_launches and sum(plain_launches.values()) >= 2
    assert rows == plain + 2 * 4 * live


def test_opcheck_with_per_token_temperature():
    """The registered ops' schemas, fakes and autograd registrations with the optional `tau` (torch.library.opcheck)."""
    gen = torch.Generator().manual_seed(8)
    n, v = 4, 7

    def t(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE)
    tau = torch.tensor([0.6, 0.0, 1.3, 0.9], dtype=torch.float64, device=DEVICE)
    valid = torch.tensor([True, False, True, True], device=DEVICE)
    ids = torch.tensor([[0, 3], [6, 1], [2, 4], [5, 0]], device=DEVICE)
    tlp = torch.full((n, 2), -1.5, dtype=torch.float64, device=DEVICE)
    s = t(n, v).requires_grad_()
    torch.library.opcheck(torch.ops.fastppo.logits_divergence.default, (s, t(n, v), valid, 1.0, 0.5, "torch", tau))
    torch.library.opcheck(torch.ops.fastppo.topk_divergence.default, (s, ids, tlp, valid, 1.0, 0.5, "torch", tau))
    opts = "{'beta': 0.5, 'inv_tau': 1.0, 's_scale': 1.0, 's_softcap': None, 't_scale': 1.0, 't_softcap': None, " \
           "'with_entropy': True, 'chunk_bytes': None}"
    hs, ws, bs = t(n, 3).requires_grad_(), t(v, 3), t(v)
    head = (hs, ws, bs, t(n, 2), t(v, 2), t(v), valid)
    torch.library.opcheck(torch.ops.fastppo.linear_divergence.default, (*head, opts, "torch", tau))
    torch.library.opcheck(torch.ops.fastppo.linear_divergence_loss.default,
                          (*head, t(n), opts, True, False, True, "torch", tau))
    torch.library.opcheck(torch.ops.fastppo.linear_topk_divergence.default,
                          (hs, ws, bs, ids, tlp, valid, opts, "torch", tau))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_ops_keeping_every_row(backend, monkeypatch):
    """The device path of the linear ops (every row kept, masked rows' values replaced by 0, no gather): a masked
    row's temperature (0, NaN) is never used; the results equal the gathered path's."""
    ld = importlib.import_module("fastppo.linear_divergence")    # the module (fastppo.linear_divergence: the op)
    heads = _heads(torch.float32, seed=9)
    ids, tlp = _teacher_topk(seed=9)
    mask = make_mask((B, T))
    _dead_rows(mask, heads["student_hidden"], heads["teacher_hidden"])
    tau = _tau(seed=9)
    tau[~mask] = torch.tensor([0.0, float("nan")]).repeat(N)[: int((~mask).sum())].to(DEVICE)
    g = _upstream(torch.float32)

    def run():
        x = _student(heads)
        with fastppo.use_backend(backend):
            div, ent = fastppo.linear_divergence(**x, beta=0.5, temperature=tau, mask=mask, return_entropy=True)
            loss, _ = fastppo.linear_divergence_loss(**x, beta=0.0, weights=g, temperature=tau, mask=mask)
            topk = fastppo.linear_topk_divergence(x["student_hidden"], x["student_weight"], ids, tlp, beta=1.0,
                                                  student_bias=x["student_bias"], temperature=tau, mask=mask)
            ((div + topk) * g).sum().add(loss).backward()
        return [div, ent, topk, loss] + [x[k].grad for k in STUDENT]

    gathered = run()
    monkeypatch.setattr(ld, "gathers_rows", lambda device: False)
    kept = run()
    for a, b in zip(kept, gathered):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
