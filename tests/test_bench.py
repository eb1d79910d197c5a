"""The benchmark counters must be exact, or the numbers they produce mean nothing."""

import pytest
import torch

import fastppo
from fastppo.bench.counters import EagerTraffic, KernelTraffic, PeakMemory, hide_interpreter_copies
from fastppo.bench.harness import LinearModel, count
from fastppo.bench.ops import OPS
from fastppo.bench.roofline import projected_ms


def test_kernel_traffic_of_logprobs_forward_is_exact():
    from fastppo.kernels.logprobs import logprobs_fwd

    N, V = 5, 1031
    logits = torch.randn(N, V)
    labels = torch.tensor([1, 2, -100, 4, 5])
    traffic = KernelTraffic()
    with traffic.count():
        logprobs_fwd(logits, labels, inv_tau=1.0, ignore_index=-100, with_entropy=False)
    # the 4 non-ignored rows' logits once (the ignored row is never read), labels (int64), their label logit
    assert traffic.loaded == 4 * V * 4 + N * 8 + 4 * 4
    assert traffic.stored == 2 * N * 4


def test_eager_traffic_counts_ops_and_skips_views_and_allocations():
    a, b = torch.randn(1000), torch.randn(1000)
    with EagerTraffic() as t:
        c = a + b                       # reads 8000, writes 4000
        c.view(10, 100).t()             # views: nothing
        torch.empty(10**6)              # allocation: nothing
    assert t.bytes == 12000 and t.launches == 1
    with EagerTraffic() as t2:
        a.to(torch.bfloat16)            # reads 4000, writes 2000
    assert t2.bytes == 6000


def test_peak_memory_tracks_frees():
    with PeakMemory() as pm:
        x = torch.ones(1000)            # 4000 bytes
        y = torch.ones(1000)            # 8000 live
        del x
        z = torch.ones(500)             # 6000 live
        del y, z
        w = torch.ones(100)
    assert pm.peak == 8000
    del w


def test_interpreter_copies_are_hidden_from_peak_memory():
    N, V = 8, 1024
    logits = torch.randn(N, V, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    with hide_interpreter_copies(), PeakMemory() as pm:
        fastppo.token_logprobs(logits, labels).backward(torch.ones(N))
    # the bf16 gradient plus per-row fp32 vectors: nothing near a second copy of the logits
    assert N * V * 2 <= pm.peak < N * V * 2 + 64 * N


def test_counts_scale_as_claimed():
    """Counts are exactly linear in the op's monomials: a fit on some shapes predicts others."""
    spec = OPS["token_logprobs"]
    for side in ("fastppo", "eager"):
        measured = [(s, count(spec, s, side)) for s in spec.measure]
        model = LinearModel(spec, measured)
        assert model.max_rel_residual < 1e-12
        held_out = {"N": 6, "V": 3000}
        assert model.predict(held_out) == count(spec, held_out, side)


def test_fused_loss_is_three_launches_at_the_floor():
    spec = OPS["fused_ppo_loss"]
    shape = {"N": 8, "V": 2048}
    c = count(spec, shape, "fastppo")
    assert c["launches"] == 3
    assert c["bytes"] / spec.floor_bytes(shape, torch.bfloat16) < 1.05


def test_projection():
    assert projected_ms("H100", 3.35e9, 0, 0) == 1.0
    assert projected_ms("A100", 0, 312e9, 1) == pytest.approx(1.004)


def test_bench_cli_writes_outputs(tmp_path):
    from fastppo.bench.cli import main

    assert main(["--ops", "gae", "token_logprobs", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "bench.csv").read_text().count("\n") > 10
    assert "| token_logprobs | N=16384 V=151936 | derived |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 10_000
