"""Batch invariance (docs/design.md): a row's log-prob and entropy (token_logprobs with and without kept=,
linear_logprobs and its hidden gradient, fused_ppo_loss's per-token outputs) are bitwise the same whatever
else is in the call: batch size, neighbouring rows, masks, chunk_bytes, on both backends. Each case computes
one row alone, then inside batches of other sizes with other neighbours at other positions, `torch.equal`."""

import pytest
import torch

import fastppo
from fastppo import KeptSet
from fastppo.kept_filters import kept_mask_from_filters
from tests.helpers import DEVICE

BACKENDS = ["triton", "torch"]
V, H = 1031, 48
# (rows in the call, position of the probed row, seed of the neighbours)
LAYOUTS = [(1, 0, 0), (5, 3, 1), (13, 7, 2), (70, 66, 3)]


def _probe():
    g = torch.Generator().manual_seed(123)
    z = torch.randn(V, generator=g) * 3
    return z, torch.randn(H, generator=g), 17


def _batch(n, pos, seed, z0, h0, y0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=g) * 3
    h = torch.randn(n, H, generator=g)
    y = torch.randint(0, V, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.3] = -100
    z[pos], h[pos], y[pos] = z0, h0, y0
    return z.to(DEVICE), h.to(DEVICE), y.to(DEVICE)


def _same_everywhere(fn):
    z0, h0, y0 = _probe()
    results = [fn(*_batch(n, pos, seed, z0, h0, y0), pos) for n, pos, seed in LAYOUTS]
    for got in results[1:]:
        for a, b in zip(results[0], got):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kept", [False, True])
def test_token_logprobs(backend, kept):
    def fn(z, h, y, pos):
        ks = KeptSet.from_mask(kept_mask_from_filters(z.float().cpu(), top_k=50, top_p=0.9)).to(DEVICE) \
            if kept else None
        if kept:
            y = torch.where(ks.to_mask(V).gather(1, y.clamp(min=0)[:, None])[:, 0], y, -100)
            y[pos] = int(z[pos].argmax())
        else:
            y[pos] = 17
        x = z.clone().requires_grad_()
        tau = torch.linspace(0.6, 1.4, z.shape[0], device=DEVICE)
        tau[pos] = 0.9
        with fastppo.use_backend(backend):
            lp, ent = fastppo.token_logprobs(x, y, kept=ks, return_entropy=True, temperature=tau)
        (lp.sum() + ent.sum()).backward()
        return lp[pos], ent[pos], x.grad[pos]

    _same_everywhere(fn)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs(backend):
    w = (torch.randn(V, H, generator=torch.Generator().manual_seed(9)) * 0.3).to(DEVICE)

    def fn(z, h, y, pos):
        out = []
        for chunk_bytes in (None, 1 << 14):
            x = h.clone().requires_grad_()
            with fastppo.use_backend(backend):
                lp, ent = fastppo.linear_logprobs(x, w, y, return_entropy=True, chunk_bytes=chunk_bytes)
            (lp.sum() + ent.sum()).backward()
            out += [lp[pos], ent[pos], x.grad[pos]]
        return out

    _same_everywhere(fn)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kept", [False, True])
def test_fused_ppo_loss_per_token_outputs(backend, kept):
    def fn(z, h, y, pos):
        n = z.shape[0]
        g = torch.Generator().manual_seed(n)
        mask = (torch.rand(n, generator=g) > 0.4).to(DEVICE)
        mask[pos] = True
        ks = None
        if kept:
            ks = KeptSet.from_mask(kept_mask_from_filters(z.float().cpu(), top_k=50)).to(DEVICE)
            mask &= ks.to_mask(V).gather(1, y.clamp(min=0)[:, None])[:, 0]
            y[pos] = int(z[pos].argmax())
            mask[pos] = True
        mask &= y != -100
        old = (-torch.rand(n, generator=g)).to(DEVICE)
        adv = torch.randn(n, generator=g).to(DEVICE)
        with fastppo.use_backend(backend):
            out = fastppo.fused_ppo_loss(z, y, old, adv, mask, return_entropy=True, kept=ks)
        return out.logprobs[pos], out.entropy[pos]

    _same_everywhere(fn)
