"""Shared by the integration tests."""

import pytest


@pytest.fixture
def verl_torch_paths(monkeypatch):
    """verl's own switches to its PyTorch paths: flash-attn's Triton cross-entropy is CUDA only (and importable here
    once the OpenRLHF tests have loaded flash_attn's Python files, so verl would pick it on CPU)."""
    import verl.utils.experimental.torch_functional as xtf

    monkeypatch.setenv("VERL_DISABLE_FLASH_ATTN_CE", "1")
    monkeypatch.setattr(xtf, "_FLASH_ATTN_CROSS_ENTROPY_AVAILABLE", False)
