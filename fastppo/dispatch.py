"""The one dispatch seam: (op, backend) -> the module that implements it.

Every op's autograd Function asks `ops(op, backend)` for its launchers; the Triton launchers
(fastppo.kernels.*) and their PyTorch twins (one CPU fallback per op) share each op's interface.
fastppo.reference is not in the table: it is the test oracle, never the code an op runs."""

from __future__ import annotations

import importlib

from .backend import backend_for

TABLE = {
    ("logprobs", "triton"): "fastppo.kernels.logprobs",
    ("logprobs", "torch"): "fastppo.logprobs_torch",
    ("full_kl", "triton"): "fastppo.kernels.full_kl",
    ("full_kl", "torch"): "fastppo.logprobs_torch",
    ("linear", "triton"): "fastppo.kernels.linear",
    ("linear", "torch"): "fastppo.linear_torch",
    ("kl_penalty", "triton"): "fastppo.kernels.kl",
    ("kl_penalty", "torch"): "fastppo.losses_torch",
    ("loss_agg", "triton"): "fastppo.kernels.loss_agg",
    ("loss_agg", "torch"): "fastppo.losses_torch",
    ("gae", "triton"): "fastppo.kernels.gae",
    ("gae", "torch"): "fastppo.losses_torch",
}
OPS = tuple(sorted({op for op, _ in TABLE}))


def ops(op: str, backend: str):
    """The launcher module of `op` on `backend` ('triton' or 'torch')."""
    try:
        name = TABLE[(op, backend)]
    except KeyError:
        raise ValueError(f"no implementation of op {op!r} on backend {backend!r}; ops: {OPS}") from None
    return importlib.import_module(name)


def ops_for(op: str, *tensors):
    """(launcher module, backend) for `op` on these tensors (backend chosen by fastppo.backend)."""
    backend = backend_for(*tensors)
    return ops(op, backend), backend
