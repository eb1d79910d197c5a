"""pytest-benchmark suite: `pytest bench/ --benchmark-only` times each op on the current device
(CUDA: synchronised GPU time; CPU: the PyTorch backend, since timing Triton's interpreter means
nothing). It never sets TRITON_INTERPRET."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["device"] = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"


@pytest.fixture
def device():
    return DEVICE
