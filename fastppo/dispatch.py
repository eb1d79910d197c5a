"""The one dispatch seam: (op, backend) -> the module that implements it.

Every op's body (the torch.library op registered beside its public function) asks `ops(op, backend)` for
its launchers; the Triton launchers (fastppo.kernels.<op>) and their PyTorch twins (fastppo.<family>_torch,
the one CPU fallback per op) share each op's interface. fastppo.reference is not in the table: it is the
test oracle and the benchmarks' baseline, never the code an op runs. Modules are imported on first use."""

from __future__ import annotations

import importlib

TABLE = {
    ("logprobs", "triton"): "fastppo.kernels.logprobs",
    ("logprobs", "torch"): "fastppo.logprobs_torch",
    ("full_kl", "triton"): "fastppo.kernels.full_kl",
    ("full_kl", "torch"): "fastppo.full_kl_torch",
    ("linear", "triton"): "fastppo.kernels.linear",
    ("linear", "torch"): "fastppo.linear_torch",
    # the linear gradient with filtered vocabulary tiles (grad_filter=); the torch backend: linear_torch.grads
    ("linear_filter", "triton"): "fastppo.kernels.linear_filter",
    ("kl_penalty", "triton"): "fastppo.kernels.kl",
    ("kl_penalty", "torch"): "fastppo.kl_torch",
    ("loss_agg", "triton"): "fastppo.kernels.loss_agg",
    ("loss_agg", "torch"): "fastppo.losses_torch",
    ("gae", "triton"): "fastppo.kernels.gae",
    ("gae", "torch"): "fastppo.advantages_torch",
    ("divergence", "triton"): "fastppo.kernels.divergence",
    ("divergence", "torch"): "fastppo.divergence_torch",
    ("topk_divergence", "triton"): "fastppo.kernels.topk_divergence",
    ("topk_divergence", "torch"): "fastppo.topk_divergence_torch",
    ("kept", "triton"): "fastppo.kernels.kept",
    ("kept", "torch"): "fastppo.kept_torch",
    ("mismatch", "triton"): "fastppo.kernels.mismatch",
    ("mismatch", "torch"): "fastppo.mismatch_torch",
    # the gradient formed in forward (fused_ppo_loss, token-level losses): Triton only, the PyTorch backend
    # keeps the two-pass path (its logits rows are not held on chip)
    ("fused_grad", "triton"): "fastppo.kernels.fused_grad",
}
OPS = tuple(sorted({op for op, _ in TABLE}))


def ops(op: str, backend: str):
    """The launcher module of `op` on `backend` ('triton' or 'torch')."""
    try:
        name = TABLE[(op, backend)]
    except KeyError:
        raise ValueError(f"no implementation of op {op!r} on backend {backend!r}; ops: {OPS}") from None
    return importlib.import_module(name)
