"""grad_filter= on the linear ops (kernels/linear_filter.py): the filtered gradient equals the float64 gradient
of the documented rule (dz zeroed on the vocabulary tiles where a row's |onehot - p| < eps, d(bias) exact) on both
backends, is close to the unfiltered one, batch-invariant, and the Triton GEMMs skip exactly the tiles no row
of a row tile keeps (dot FLOPs counted)."""

import math

import pytest
import torch

import fastppo
from fastppo import reference as ref
from fastppo.kernels import _config as cfg
from tests.helpers import DEVICE, make_mask

B = cfg.LIN_BLOCK_V   # the rule's vocabulary tile


def _peaked(N, H, V, dtype, bias=True, seed=0):
    """Zipf-like logits (p ~ (1 + j)^-2 in vocabulary order, as a frequency-sorted BPE vocabulary) with random
    per-row structure on top; labels mostly among the frequent ids. Without bias the Zipf term rides on a
    constant hidden column."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    zipf = -2.0 * torch.log1p(torch.arange(V, dtype=torch.float32))
    b = None
    if bias:
        b = (zipf + 0.1 * torch.randn(V, generator=g)).to(dtype).to(DEVICE)
    else:
        hidden[:, 0] = 1.0
        weight[:, 0] = zipf
    labels = torch.where(torch.rand(N, generator=g) < 0.8, torch.randint(0, 40, (N,), generator=g),
                         torch.randint(0, V, (N,), generator=g))
    labels[torch.rand(N, generator=g) < 0.15] = -100
    return hidden.to(dtype).to(DEVICE), weight.to(dtype).to(DEVICE), b, labels.to(DEVICE)


def _keep(p, labels, eps):
    """The rule, written out: keep[i, j] = some |onehot(y_i) - p_i| of j's tile is not below eps."""
    V = p.shape[1]
    d = p.clone()
    rows = (labels >= 0).nonzero().squeeze(1)
    d[rows, labels[rows]] -= 1.0
    keep = torch.zeros_like(p, dtype=torch.bool)
    for t0 in range(0, V, B):
        keep[:, t0:t0 + B] = (~(d[:, t0:t0 + B].abs() < eps)).any(1, keepdim=True)
    return keep


def _ref64(hidden, weight, bias, loss_of_logits, labels, eps, tau=1.0, scale=1.0, cap=None):
    """float64 (dh, dw, db) of the filtered rule, the unfiltered (dh, dw), the keep mask (p of
    z' = softcap(scale z) / tau) and dz."""
    h, w = hidden.double(), weight.double()
    z = (h @ w.t() + (0 if bias is None else bias.double())).requires_grad_()
    dz, = torch.autograd.grad(loss_of_logits(z), z)
    zt = z.detach() * scale
    zt = zt if cap is None else cap * torch.tanh(zt / cap)
    keep = _keep(torch.softmax(zt / tau, -1), labels, eps)
    dzf = dz * keep
    return (dzf @ w, dzf.t() @ h, dz.sum(0)), (dz @ w, dz.t() @ h), keep, dz


def _close(got, want, tol):
    err = (got.double() - want).abs().max().item()
    assert err <= tol * want.abs().max().item(), (err, want.abs().max().item())


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("N,H,V,bias,eps,cap", [(67, 24, 401, True, 1e-3, None), (40, 17, 300, False, None, 8.0)])
def test_linear_logprobs_matches_float64_rule(backend, dtype, tol, N, H, V, bias, eps, cap):
    hidden, weight, b, labels = _peaked(N, H, V, dtype, bias)
    g = torch.Generator().manual_seed(1)
    c_logp, c_ent = torch.randn(N, generator=g).to(DEVICE), 0.3 * torch.randn(N, generator=g).to(DEVICE)
    # eps None: grad_filter=True, the dtype's default (bf16 2^-12, fp32 2^-28)
    eps_val = eps if eps is not None else torch.finfo(dtype).eps / 32
    leaves = _leaves(hidden, weight, b)
    with fastppo.use_backend(backend):
        lp, ent = fastppo.linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], return_entropy=True,
                                          temperature=0.9, final_logit_softcapping=cap, logit_scale=0.8,
                                          grad_filter=eps if eps is not None else True)
    (lp * c_logp + ent * c_ent).sum().backward()

    def loss(z):
        lp64, ent64 = ref.token_logprobs(z, labels, temperature=0.9, return_entropy=True, final_logit_softcapping=cap,
                                         logit_scale=0.8)
        return (lp64 * c_logp.double() + ent64 * c_ent.double()).sum()

    (dh, dw, db), (dh_full, dw_full), keep, dz = _ref64(hidden, weight, b, loss, labels, eps_val, 0.9, 0.8, cap)
    # the rule drops some entries and keeps others (fp32's default 2^-28 keeps all of these)
    assert 0 < keep.float().mean() < 1 or (eps is None and dtype == torch.float32)
    _close(leaves[0].grad, dh, tol)
    _close(leaves[1].grad, dw, tol)
    if b is not None:
        _close(leaves[2].grad, db, tol)
    # each dropped entry is below the documented bound eps (|c_logp| + |c_ent| (2 + |log eps| + log V)) / tau
    bound = eps_val * (c_logp.abs() + c_ent.abs() * (2 + abs(math.log(eps_val)) + math.log(V))).double() * 0.8 / 0.9
    assert (dz.abs() * ~keep <= bound[:, None]).all()
    # and (fp32) the result is distinguishably the filtered gradient, not the unfiltered one
    if dtype == torch.float32 and eps is not None:
        assert (dh - dh_full).abs().max() > 10 * tol * dh.abs().max()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fused_linear_ppo_loss_matches_float64_rule(backend):
    N, H, V, eps = 53, 20, 333, 2e-3
    hidden, weight, b, labels = _peaked(N, H, V, torch.float32, seed=3)
    hidden = hidden.t().contiguous().t()[None]   # [1, N, H], a non-contiguous view
    labels = labels[None]
    g = torch.Generator().manual_seed(4)
    old = 0.1 * torch.randn(1, N, generator=g).to(DEVICE) - 2.0
    adv = torch.randn(1, N, generator=g).to(DEVICE)
    mask = make_mask((1, N), empty_rows=())
    leaves = _leaves(hidden, weight, b)
    with fastppo.use_backend(backend):
        out = fastppo.fused_linear_ppo_loss(leaves[0], leaves[1], labels, old, adv, mask, bias=leaves[2],
                                            entropy_coef=0.05, grad_filter=eps)
    (out.loss * 1.7).backward()

    def loss(z):
        return 1.7 * ref.fused_ppo_loss(z[None], labels, old.double(), adv.double(), mask, entropy_coef=0.05).loss

    live = torch.where(mask, labels, -100)[0]
    (dh, dw, db), _, keep, _ = _ref64(hidden[0], weight, b, loss, live, eps)
    assert 0 < keep[live >= 0].float().mean() < 1
    _close(leaves[0].grad[0], dh, 2e-5)
    _close(leaves[1].grad, dw, 2e-5)
    _close(leaves[2].grad, db, 2e-5)


def test_tiny_threshold_is_the_unfiltered_gradient():
    hidden, weight, b, labels = _peaked(30, 16, 300, torch.float64)
    grads = []
    for gf in (None, 1e-300):
        leaves = _leaves(hidden, weight, b)
        lp = fastppo.linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], grad_filter=gf)
        (lp * torch.arange(30, dtype=torch.float64, device=DEVICE)).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, c in zip(*grads):
        torch.testing.assert_close(a, c, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_filtered_rows_are_batch_invariant(backend):
    hidden, weight, b, labels = _peaked(70, 16, 300, torch.float32, seed=5)
    out = []
    for n in (70, 9):
        leaves = _leaves(hidden[:n], weight, b)
        with fastppo.use_backend(backend):
            lp = fastppo.linear_logprobs(leaves[0], leaves[1], labels[:n], bias=leaves[2], grad_filter=1e-3)
        lp.sum().backward()
        out.append(leaves[0].grad[:9])
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("peaked", [True, False])
def test_gemms_skip_exactly_the_tiles_no_row_keeps(peaked):
    """Dot FLOPs of the filtered backward = unfiltered - 2 GEMMs x (BLOCK_N x BLOCK_V x BLOCK_H tile products)
    for each (row tile of 64 valid rows, vocabulary tile) that no row keeps."""
    from fastppo.bench.counters import DotFlops

    N, H, V, eps = 150, 16, 520, 2.0**-12
    if peaked:
        hidden, weight, b, labels = _peaked(N, H, V, torch.bfloat16, seed=6)
    else:   # random init: flat p ~ 1 / V, above eps for this small V, so nothing is skipped
        hidden = torch.randn(N, H).to(torch.bfloat16).to(DEVICE)
        weight = (0.02 * torch.randn(V, H)).to(torch.bfloat16).to(DEVICE)
        b, labels = None, torch.randint(0, V, (N,)).to(DEVICE)
    flops = []
    for gf in (None, eps):
        leaves = _leaves(hidden, weight, b)
        lp = fastppo.linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], grad_filter=gf)
        counter = DotFlops()
        with counter.count():
            (lp * 0.5).sum().backward()
        flops.append(counter.flops)
    valid = labels >= 0
    z = hidden.double()[valid] @ weight.double().t() + (0 if b is None else b.double())
    keep = _keep(torch.softmax(z, -1), labels[valid], eps)[:, ::B]          # [valid rows, tiles]
    n_tiles = math.ceil(V / B)
    pad = -keep.shape[0] % cfg.LIN_BLOCK_N
    kept_tiles = torch.cat([keep, keep.new_zeros(pad, n_tiles)]).view(-1, cfg.LIN_BLOCK_N, n_tiles).any(1)
    skipped = int((~kept_tiles).sum())
    per_tile = 2 * cfg.LIN_BLOCK_N * B * cfg.LIN_BLOCK_H * math.ceil(H / cfg.LIN_BLOCK_H)
    assert flops[0] - flops[1] == 2 * per_tile * skipped
    assert (skipped > 0) == peaked


def test_bad_grad_filter():
    hidden, weight, b, labels = _peaked(4, 8, 200, torch.float32)
    with pytest.raises(TypeError, match="grad_filter"):
        fastppo.linear_logprobs(hidden, weight, labels, grad_filter="auto")
    for bad in (0.0, 1.5, float("nan"), -1e-3):
        with pytest.raises(ValueError, match="grad_filter"):
            fastppo.linear_logprobs(hidden, weight, labels, grad_filter=bad)
    kept = fastppo.KeptSet.from_mask(torch.ones(4, 200, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="grad_filter is not supported with kept"):
        fastppo.linear_logprobs(hidden, weight, labels, grad_filter=True, kept=kept)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nan_rows(backend):
    """An ignored row's NaN reaches nothing; a live row's NaN is kept by the filter (NaN is not below eps), so
    its d hidden row is NaN as autograd of the formula gives, and the other rows stay finite."""
    hidden, weight, b, labels = _peaked(20, 8, 300, torch.float32, seed=7)
    labels[3], labels[5] = -100, 7
    hidden[3, 2] = float("nan")
    leaves = _leaves(hidden, weight, b)
    with fastppo.use_backend(backend):
        lp = fastppo.linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], grad_filter=1e-3)
    lp.sum().backward()
    assert torch.isfinite(leaves[0].grad).all() and torch.isfinite(leaves[1].grad).all()
    hidden[5, 1] = float("nan")
    leaves = _leaves(hidden, weight, b)
    with fastppo.use_backend(backend):
        lp = fastppo.linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], grad_filter=1e-3)
    lp.sum().backward()
    live = (labels >= 0) & (torch.arange(20, device=DEVICE) != 5)
    assert leaves[0].grad[5].isnan().all() and torch.isfinite(leaves[0].grad[live]).all()
