import pytest
import torch

import fastppo
from fastppo.backend import backend_for, interpreter_enabled
from fastppo.kernels.launches import count_launches


def test_interpreter_is_on_without_cuda():
    if not torch.cuda.is_available():
        assert interpreter_enabled()
        assert backend_for(torch.empty(0)) == "triton"


def test_triton_kernel_ran_not_the_fallback(device):
    logits = torch.randn(4, 37, device=device)
    labels = torch.randint(0, 37, (4,), device=device)
    with count_launches() as launches:
        fastppo.token_logprobs(logits, labels)
    assert launches == {"logprobs_fwd": 1}


def test_forced_torch_backend_runs_no_kernel(device):
    logits = torch.randn(4, 37, device=device)
    labels = torch.randint(0, 37, (4,), device=device)
    with fastppo.use_backend("torch"), count_launches() as launches:
        out = fastppo.token_logprobs(logits, labels)
    assert not launches
    torch.testing.assert_close(out, fastppo.token_logprobs(logits, labels), rtol=1e-6, atol=1e-6)


def test_env_override(monkeypatch):
    monkeypatch.setenv("FASTPPO_BACKEND", "torch")
    assert backend_for(torch.empty(1)) == "torch"
    monkeypatch.setenv("FASTPPO_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTPPO_BACKEND"):
        backend_for(torch.empty(1))


def test_forced_triton_that_cannot_run_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with fastppo.use_backend("triton"), pytest.raises(RuntimeError, match="forced"):
        backend_for(torch.empty(1))


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend"):
        fastppo.set_backend("cupy")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CPU and a CUDA tensor")
def test_mixed_devices_rejected():
    with pytest.raises(ValueError, match="one device"):
        backend_for(torch.empty(1), torch.empty(1, device="cuda"))
