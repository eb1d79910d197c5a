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
