"""The PyTorch backend of the linear ops over several row slices (issue #25, CPU speed): slice_rows groups whole
ROW_BLOCK blocks and grows with H; the values and gradients stay those of the float64 formula and of one slice;
the weight gradient is accumulated into one buffer (no [V, H] temporary per slice)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastppo
import fastppo.linear_torch as lt
from fastppo import reference as ref
from tests.helpers import DEVICE, make_labels


def test_slice_rows_groups_row_blocks_and_scales_with_h():
    for V, H in [(151936, 896), (151936, 4096), (32000, 4096), (1000, 8), (10**7, 64)]:
        rows = lt.slice_rows(V, H)
        assert rows % lt.ROW_BLOCK == 0 and rows >= lt.ROW_BLOCK
        assert rows * V <= max(lt.MAX_SLICE_ELEMENTS, lt.ROW_BLOCK * V)
    assert lt.slice_rows(151936, 4096) > lt.slice_rows(151936, 896) >= 64   # grows with H at a fixed V
    assert lt.slice_rows(151936, 896) * 151936 <= 151936 * 896 // lt.WEIGHT_SHARE + lt.ROW_BLOCK * 151936


class _Allocations(TorchDispatchMode):
    """Counts the tensors of `shape` created by eager ops (not views, not in place, not written through out=)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastppo":
            from fastppo.bench.counters import _fastppo_body
            return _fastppo_body(self, func, args, kwargs)
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not func.is_view and not name.endswith("_") and not func._schema.is_mutable:   # not in place / out=
            outs = out if isinstance(out, (tuple, list)) else (out,)
            self.count += sum(1 for t in outs if isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape)
        return out


def _run(N, H, V, dtype, bias, monkeypatch, chunk=None):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(N + 3, H, generator=g).to(dtype)[3:]            # an offset view
    weight = (torch.randn(V, 2 * H, generator=g) / H ** 0.5).to(dtype)[:, ::2]   # non-contiguous rows
    b = (torch.randn(V, generator=g) * 0.3).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::7] = -100
    g_lp, g_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    if chunk is not None:
        monkeypatch.setattr(lt, "CHUNK_ELEMENTS", chunk)
        monkeypatch.setattr(lt, "MAX_SLICE_ELEMENTS", chunk)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    with fastppo.use_backend("torch"):
        lp, ent = fastppo.linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], temperature=0.8,
                                          return_entropy=True)
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    monkeypatch.undo()
    x64 = [t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    rlp, rent = ref.linear_logprobs(x64[0], x64[1], labels, bias=x64[2], temperature=0.8, return_entropy=True)
    ((rlp * g_lp.double()).sum() + (rent * g_ent.double()).sum()).backward()
    return (lp, ent, *[t.grad for t in leaves if t is not None]), (rlp, rent, *[t.grad for t in x64 if t is not None])


@pytest.mark.parametrize("dtype,tol,grad_tol", [(torch.float32, 2e-5, 2e-5), (torch.bfloat16, 2e-5, 1e-2),
                                                (torch.float64, 1e-10, 1e-10)])
def test_several_slices_match_float64_and_one_slice(dtype, tol, grad_tol, monkeypatch):
    """200 rows in slices of 64 rows (4 slices, the last partial) vs float64 and vs a single slice; the
    gradients come back in the input dtype (bf16: its rounding)."""
    N, H, V = 200, 24, 301
    many, want = _run(N, H, V, dtype, True, monkeypatch, chunk=64 * V + 5)
    one, _ = _run(N, H, V, dtype, True, monkeypatch)
    assert lt.slice_rows(V, H) >= N
    for i, (got, w) in enumerate(zip(many, want)):
        t = tol if i < 2 else grad_tol
        torch.testing.assert_close(got.double(), w, rtol=t, atol=t * (1 + w.abs().max().item()))
    for a, b in zip(many[:2] + many[2:3], one[:2] + one[2:3]):   # logp, entropy, d hidden: per-row, bitwise
        assert torch.equal(a, b)


def test_weight_gradient_has_no_per_slice_temporary(monkeypatch):
    """4 slices: the backward creates one [V, H] fp32 tensor (the accumulator, returned as the fp32 gradient),
    not one more per slice (`dw += g.t() @ h` made 4)."""
    N, H, V = 256, 32, 512
    monkeypatch.setattr(lt, "CHUNK_ELEMENTS", 64 * V)
    monkeypatch.setattr(lt, "MAX_SLICE_ELEMENTS", 64 * V)
    assert lt.slice_rows(V, H) == 64
    hidden = torch.randn(N, H, device=DEVICE, requires_grad=True)
    weight = torch.randn(V, H, device=DEVICE, requires_grad=True)
    labels = make_labels((N,), V)
    with fastppo.use_backend("torch"):
        lp = fastppo.linear_logprobs(hidden, weight, labels)
        with _Allocations((V, H)) as big:
            lp.sum().backward()
    assert weight.grad.shape == (V, H)
    assert big.count == 1, big.count
