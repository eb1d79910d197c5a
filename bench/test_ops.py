"""Each public op, forward, backward and forward + backward: fastppo, the eager PyTorch reference and
the peers (TRL, Liger-Kernel) that offer the op, on the same inputs; a peer that is not installed is
skipped with the reason. Peak memory is recorded in extra_info on CUDA."""

import importlib.util

import pytest
import torch

from fastppo.bench.harness import make_backward, make_step
from fastppo.bench.ops import OPS, side_missing

SHAPES = {
    "cuda": {"N": 8192, "V": 128256, "H": 4096, "B": 256, "T": 4096},
    "cpu": {"N": 256, "V": 32000, "H": 256, "B": 16, "T": 512},
}


def _shape(spec, device):
    return {k: SHAPES[device][k] for k in spec.dims}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _bench(benchmark, step, device):
    def run():
        step()
        _sync(device)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    benchmark.pedantic(run, rounds=10, warmup_rounds=2, iterations=1)
    if device == "cuda":
        benchmark.extra_info["peak_bytes"] = torch.cuda.max_memory_allocated() - base


OP_MODES = [(op, mode) for op in OPS for mode in ("forward", "backward", "full")
            if mode == "forward" or OPS[op].has_backward]


@pytest.mark.parametrize("op,mode", OP_MODES)
@pytest.mark.parametrize("side", ["fastppo", "trl", "liger", "eager"])
def test_op(benchmark, device, op, side, mode):
    """Every side of every op (TRL and Liger-Kernel where they offer the op) on the same inputs."""
    spec = OPS[op]
    if side not in spec.sides:
        pytest.skip(f"{side} has no {op}")
    why = side_missing(side)
    if why is not None:
        pytest.skip(f"{side} missing: {why}")
    if side in ("trl", "liger") and device != "cuda":
        pytest.skip(f"{side}'s Triton kernels need a CUDA device outside the interpreter")
    inputs = spec.make(_shape(spec, device), torch.bfloat16, device)
    benchmark.group = f"{op}-{mode}"
    if mode == "backward":
        setup, target = make_backward(spec, side, inputs)

        def run(outs, grads):
            target(outs, grads)
            _sync(device)

        benchmark.pedantic(run, setup=setup, rounds=10, warmup_rounds=2, iterations=1)
        return
    _bench(benchmark, make_step(spec, side, inputs, mode), device)


def _bench_token_logprobs(benchmark, device, mode, per_token_fn):
    """Time another library's per-token log-prob (or NLL) on the token_logprobs inputs."""
    spec = OPS["token_logprobs"]
    inputs = spec.make(_shape(spec, device), torch.bfloat16, device)
    benchmark.group = f"token_logprobs-{mode}"

    def step():
        inputs["logits"].grad = None
        out = per_token_fn(inputs["logits"].flatten(0, 1), inputs["labels"].flatten())
        if mode == "full":
            out.sum().backward()

    _bench(benchmark, step, device)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="Liger-Kernel not installed")
@pytest.mark.parametrize("mode", ["forward", "full"])
def test_liger_cross_entropy(benchmark, device, mode):
    """Liger's fused cross-entropy per token (-log p of the label) on the same logits."""
    from liger_kernel.transformers import LigerCrossEntropyLoss

    _bench_token_logprobs(benchmark, device, mode, LigerCrossEntropyLoss(reduction="none"))
