"""fastppo/bench/linear_cost.py: the per-launch model of the linear kernels gives the interpreter's exact counts
(unique bytes, tl.dot FLOPs), launch by launch, with rows x vocabulary chunks and masked prompts; a dry run at a
large shape takes its counts from it."""

import pytest
import torch

from fastppo.bench.harness import count
from fastppo.bench.ops import OPS
from fastppo.linear_pipeline import chunk_shape


@pytest.mark.parametrize("op", ["linear_logprobs", "fused_linear_ppo_loss"])
@pytest.mark.parametrize("prompt", [0.0, 0.75])
def test_model_gives_the_interpreter_counts(op, prompt):
    shape = {"N": 64, "H": 64, "V": 512, "prompt": prompt}
    assert chunk_shape(64, 512, 64, torch.float32, None, torch.bfloat16) == (64, 128)   # 4 vocabulary chunks
    c = count(OPS[op], shape, "fastppo")
    modelled = {k: v for k, v in c["kernels"].items() if "model_bytes" in v}
    assert {"_linear_fwd_kernel", "_linear_dz_kernel", "_linear_dh_kernel", "_linear_dw_kernel"} <= set(modelled)
    for k, v in modelled.items():
        assert (v["model_bytes"], v["model_flops"]) == (v["bytes"], v["flops"]), k


def test_dry_run_counts_from_the_model():
    shape = {"N": 8192, "H": 4096, "V": 151552, "prompt": 0.5}
    c = count(OPS["linear_logprobs"], shape, "fastppo", dry_run=True)
    dw = c["kernels"]["_linear_dw_kernel"]
    n_valid, H, V = 4096, 4096, 151552
    assert dw["flops"] == 2 * n_valid * H * V               # whole tiles: every dimension a multiple of its tile
    k = -(-V // chunk_shape(8192, V, H, torch.float32, None, torch.bfloat16)[1])
    assert dw["launches"] == k == 7
    # per vocabulary chunk: the count, the rows' indices and hidden rows, its dz columns, its d(weight) rows
    # written once in bf16 (no fp32 [V, H] sum: one row chunk)
    assert dw["bytes"] == k * (8 + n_valid * (8 + 2 * H)) + 2 * n_valid * V + 2 * V * H
