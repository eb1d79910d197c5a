"""Shared test utilities (imported by test modules)."""

import torch

from tests.conftest import DEVICE, assert_close_by_dtype  # noqa: F401


def make_logits(shape, dtype, scale=3.0, device=DEVICE):
    return (torch.randn(shape, device=device) * scale).to(dtype)


def make_labels(lead_shape, V, holes=0.15, device=DEVICE):
    labels = torch.randint(0, V, lead_shape, device=device)
    labels[torch.rand(lead_shape, device=device) < holes] = -100
    return labels


def make_mask(shape, holes=0.25, empty_rows=(1,), device=DEVICE):
    mask = torch.rand(shape, device=device) > holes
    for r in empty_rows:
        if r < shape[0]:
            mask[r] = False
    return mask


# Logit magnitudes every logits / linear op must handle as exactly as fp32 log_softmax (issue #21 class 2):
# (name, dtype, offset or None): fp32 logits around 0, +-1e4 and 1e6, and rows spanning a dtype's whole range.
MAGNITUDES = [("0", torch.float32), ("1e4", torch.float32), ("-1e4", torch.float32), ("1e6", torch.float32),
              ("bf16 +-3e38", torch.bfloat16), ("fp16 +-65504", torch.float16)]


def magnitude_logits(name, dtype, shape, device=DEVICE):
    """Logits of one MAGNITUDES case: offset + 3 randn for the fp32 ones; for the range-spanning ones every
    entry at +-top (bf16 3e38, fp16 65504 with a little noise) and the first two columns at +top."""
    if name.startswith("bf16") or name.startswith("fp16"):
        top = 3e38 if name.startswith("bf16") else 65504.0
        z = torch.where(torch.rand(shape, device=device) < 0.5, top, -top)
        if name.startswith("fp16"):
            z = (z + torch.randn(shape, device=device)).clamp(-top, top)
        z[..., :2] = top
        return z.to(dtype)
    return (float(name) + 3 * torch.randn(shape, device=device)).to(dtype)


def assert_head_grad_close(actual, expected, dtype):
    """A gradient through an lm_head product (a sum over V or N of products) against float64. For 16-bit heads the
    gradient tile enters the products rounded to that dtype (as on CUDA, and in the Triton linear pipeline), so the
    error grows with the square root of the terms: rtol 2e-2 and atol 2e-2 x the largest |expected| (the linear ops'
    tolerance); fp32 / fp64 heads by assert_close_by_dtype."""
    if dtype in (torch.bfloat16, torch.float16):
        scale = expected.abs().max().item()
        torch.testing.assert_close(actual.double(), expected.double(), rtol=2e-2, atol=2e-2 * scale)
    else:
        assert_close_by_dtype(actual, expected, dtype, scale=20)


def run_fused_losses(hidden, weight, labels, old, adv, mask, backend, upstream=0.7, **kw):
    """fused_linear_ppo_loss on (hidden, weight) and fused_ppo_loss on hidden @ weight.T under `backend`, each
    loss times `upstream` backpropagated: (linear output, logits output, d hidden, d weight, d logits)."""
    import fastppo

    with fastppo.use_backend(backend):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fastppo.fused_linear_ppo_loss(h, w, labels, old, adv, mask, **kw)
        (out.loss * upstream).backward()
        z = (hidden @ weight.t()).requires_grad_()
        lout = fastppo.fused_ppo_loss(z, labels, old, adv, mask, **kw)
        (lout.loss * upstream).backward()
    return out, lout, h.grad, w.grad, z.grad


def kept_gradcheck_inputs(keep):
    """Small float64 linear inputs with a kept set (each row keeps a column with probability `keep`, live labels
    always kept; row 1 ignored) and per-token temperatures: (hidden, weight, bias, labels, kept, tau)."""
    from fastppo import KeptSet

    g = torch.Generator().manual_seed(8)
    N, H, V = 4, 5, 13
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).to(DEVICE).requires_grad_()
    bias = (torch.randn(V, generator=g, dtype=torch.float64) * 0.3).to(DEVICE).requires_grad_()
    kmask = torch.rand(N, V, generator=g) < keep
    labels = torch.tensor([2, -100, 7, 11])
    kmask[torch.tensor([0, 2, 3]), labels[torch.tensor([0, 2, 3])]] = True
    tau = (torch.rand(N, generator=g, dtype=torch.float64) + 0.5).to(DEVICE)
    return hidden, weight, bias, labels.to(DEVICE), KeptSet.from_mask(kmask).to(DEVICE), tau
